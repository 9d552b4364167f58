"""Eval on tiny models: MC letter scoring, batched generation, perplexity, judges (RM and a fake API)."""

import json
import math

import pytest
import torch

from posttrain.data.config import DataConfig, DatasetConfig
from posttrain.templates.config import TemplateConfig
from posttrain.records import Message
from posttrain.eval.judges import OpenAIJudge, RewardModelJudge
from posttrain.eval.mc_data import MCItem
from posttrain.eval.mc_prompts import letter_token_ids
from posttrain.eval.mc_scoring import next_token_logps


def test_mc_scoring_matches_hand_logprobs_and_picks_max(tiny):
    model, tok = tiny
    shared, ids = letter_token_ids(tok, "答案：", "ABCD")
    assert shared == [] and len(set(ids)) == 4
    prompts = [tok("Question one?\nA. x\nB. y\n答案：")["input_ids"], tok("Q?\n答案：")["input_ids"]]
    for packed in (False, True):  # one padded row per prompt; one packed row, each prompt its own run
        batched = torch.tensor(next_token_logps(model, [([], prompts)], [ids, ids], packed, pad_id=0))  # (2, 4)
        for b, p in enumerate(prompts):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p])).logits[0, -1]
            expected = logits.log_softmax(-1)[ids]
            assert torch.allclose(batched[b], expected, atol=1e-5)
            assert int(batched[b].argmax()) == int(expected.argmax())


def test_generate_batch_matches_single_greedy(tiny):
    from posttrain.models.generate import generate_reply
    from posttrain.models.generate import generate_batch

    model, tok = tiny
    convs = [[Message("user", "Hello there, how are you today?")], [Message("user", "Hi")]]
    batch = generate_batch(model, tok, convs, max_new_tokens=8)
    single = [generate_reply(model, tok, c, max_new_tokens=8) for c in convs]
    assert batch == single
    assert generate_batch(model, tok, []) == []


def test_perplexity_equals_manual_masked_nll(tiny, tmp_path):
    from posttrain.eval.perplexity import perplexity
    from posttrain.templates.render import encode_conversation
    from posttrain.records import Conversation

    model, tok = tiny
    path = tmp_path / "held.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello you"}]},
            {"messages": [{"role": "user", "content": "a longer question"}, {"role": "assistant", "content": "ok"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    out = perplexity(model, tok, DataConfig(datasets=[DatasetConfig(path=str(path))]), TemplateConfig(),
                     batch_size=2)
    nll = n = 0.0
    for r in rows:
        conv = Conversation([Message(m["role"], m["content"]) for m in r["messages"]])
        enc = encode_conversation(conv, tok)[0]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([enc.input_ids])).logits[0].log_softmax(-1)
        for t in range(1, len(enc.input_ids)):
            if enc.weights[t]:
                nll -= float(logp[t - 1, enc.input_ids[t]])
                n += 1
    assert out["tokens"] == n
    assert out["loss"] == pytest.approx(nll / n, abs=1e-4)
    assert out["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_reward_model_judge(tiny_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    judge = RewardModelJudge(str(tmp_path / "rm"))
    prompt = [Message("user", "hi")]
    ra, rb = judge.reward(prompt, "hello"), judge.reward(prompt, "go away now")
    assert ra != rb
    vote = judge.compare(prompt, "hello", "go away now")
    assert vote["winner"] == ("model_a" if ra > rb else "model_b")
    judge.epsilon = abs(ra - rb) + 1.0
    assert judge.compare(prompt, "hello", "go away now")["winner"] == "tie"


class FakeJudge:
    """Prefers the answer containing 'good'; with bias=True always says the first answer (position bias)."""

    def __init__(self):
        self.bias, self.seen = False, []

    def __call__(self, body, headers):
        text = body["messages"][0]["content"]
        self.seen.append((body["model"], headers["Authorization"]))
        first = text.split("[The Start of Assistant A's Answer]\n")[1].split("\n")[0]
        verdict = "A" if self.bias or "good" in first else "B"
        if body.get("max_tokens", 1000) < 8:  # a short cap cuts the reply before its verdict
            return "Reasoning..."
        return f"Reasoning... [[{verdict}]]"


def test_llm_judge_against_fake_server_with_order_swap(fake_openai):
    fake = FakeJudge()
    judge = OpenAIJudge(fake_openai(fake), "judge-x", api_key="k")
    prompt = [Message("user", "q")]
    assert judge.compare(prompt, "good answer", "bad answer")["winner"] == "model_a"
    assert judge.compare(prompt, "bad answer", "good answer")["winner"] == "model_b"
    fake.bias = True  # always "A": the swap exposes it and the vote is a tie
    assert judge.compare(prompt, "good answer", "bad answer")["winner"] == "tie"
    assert fake.seen[0] == ("judge-x", "Bearer k")


def test_mc_item_letters():
    item = MCItem("q", ["a", "b", "c"], "C", "s", "src")
    assert item.answer == "C"


def test_compare_end_to_end_tiny_models_fake_judge(tiny_dir, tmp_path, fake_openai):
    from posttrain.eval.config import load_eval_config
    from posttrain.eval import compare

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "tell me more"}\n', encoding="utf-8")
    cfg = load_eval_config(None, [], **{
        "eval.task": "compare", "eval.output_dir": str(tmp_path / "cmp"), "eval.device": "cpu",
        "eval.compare.models": [str(tiny_dir), str(tiny_dir) + "/"], "eval.compare.prompts": str(prompts),
        "eval.compare.judge": fake_openai(FakeJudge()), "eval.compare.judge_model": "j",
        "eval.compare.max_new_tokens": 4, "eval.compare.rounds": 5}).eval
    result = compare.run(cfg)
    assert result["votes"] == 2 and list(result["models"]) == ["model", "model-2"]
    assert result["judge"].startswith("llm:j@http://127.0.0.1")
    votes = compare.read_votes(tmp_path / "cmp" / "votes.jsonl")
    assert all(v["winner"] == "tie" for v in votes)  # identical answers: "B" both ways is not a verdict
    for name in ("report.md", "ratings.json", "ratings_bt.png", "win_matrix.png", "answers/model-2.jsonl"):
        assert (tmp_path / "cmp" / name).is_file()


def test_unparsed_votes_cached_counted_as_no_verdict_and_reported(tmp_path, fake_openai):
    """A judge cut short (judge_max_tokens) gives no verdict: votes kept with winner None, cached (not
    re-asked), left out of ratings, reported; another judge_max_tokens is another judge and asks again."""
    from posttrain.eval import compare, ratings
    from posttrain.data.prompts import PromptItem
    from posttrain.eval.report import write_compare_report

    prompts = [PromptItem("p0", [Message("user", "q0")], None, None),
               PromptItem("p1", [Message("user", "q1")], None, None)]
    answers = {"x": {"p0": {"prediction": "good one"}, "p1": {"prediction": "good two"}},
               "y": {"p0": {"prediction": "bad one"}, "p1": {"prediction": "bad two"}}}
    votes_path = tmp_path / "votes.jsonl"
    fake = FakeJudge()
    url = fake_openai(fake)
    short = OpenAIJudge(url, "j", max_tokens=4)
    votes = compare.judge_pairs(short, ["x", "y"], prompts, answers, votes_path)
    assert [(v["winner"], v["verdicts"]) for v in votes] == [(None, ["unparsed", "unparsed"])] * 2
    assert len(fake.seen) == 4  # two prompts, asked in both orders
    assert compare.judge_pairs(short, ["x", "y"], prompts, answers, votes_path) == votes
    assert len(fake.seen) == 4  # cached, not re-asked
    long = OpenAIJudge(url, "j", max_tokens=64)
    assert long.id != short.id and short.id.endswith(":max_tokens=4")
    decided = compare.judge_pairs(long, ["x", "y"], prompts, answers, votes_path)
    assert len(fake.seen) == 8 and [v["winner"] for v in decided] == ["model_a", "model_a"]
    meta = {"models": {"x": "x", "y": "y"}, "prompts": "p.jsonl", "judge": short.id}
    none = {**meta, **ratings.ratings_from_votes(votes, rounds=5)}
    assert (none["votes"], none["no_verdict"], none["bradley_terry"], none["win_matrix"]) == (0, 2, [], {})
    text = write_compare_report(tmp_path, none).read_text()
    assert "2 judged pairs got a judge reply without a verdict" in text and "No vote has a winner" in text
    mixed = {**meta, **ratings.ratings_from_votes([votes[0], decided[1]], rounds=5)}
    assert (mixed["votes"], mixed["no_verdict"]) == (1, 1)
    assert [(r["model"], r["n"], r["win_rate"]) for r in mixed["win_rates"]] == [("x", 1, 1.0)]
    text = write_compare_report(tmp_path, mixed).read_text()
    assert "1 judged pairs got a judge reply without a verdict" in text and "| x | y | 1 | 1.00 |" in text


def test_judge_max_tokens_is_a_typed_compare_key(tmp_path):
    from posttrain.eval.config import load_eval_config
    from posttrain.errors import ConfigError

    base = {"eval.task": "compare", "eval.compare.models": ["a", "b"], "eval.compare.prompts": "p.jsonl",
            "eval.compare.judge": "http://127.0.0.1:1/v1"}
    assert load_eval_config(None, [], **base).eval.compare.judge_max_tokens is None
    cfg = load_eval_config(None, ["eval.compare.judge_max_tokens=16"], **base)
    assert cfg.eval.compare.judge_max_tokens == 16
    with pytest.raises(ConfigError, match="judge_max_tokens must be >= 1"):
        load_eval_config(None, ["eval.compare.judge_max_tokens=0"], **base)
    with pytest.raises(ConfigError, match="LLM judge only"):
        load_eval_config(None, ["eval.compare.judge_max_tokens=16"], **{**base, "eval.compare.judge": "ref"})


def test_eval_generate_without_references_writes_predictions_and_does_not_score(tiny_dir, tmp_path, capsys):
    from posttrain.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "tell me more"}\n', encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    code = main(["eval", "generate", "--model", str(tiny_dir), "--data", str(prompts), "--out", str(out),
                 "--max-new-tokens", "3", "--device", "cpu"])
    assert code == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    assert not out.with_suffix(".scores.json").exists()
    printed = json.loads(capsys.readouterr().out)
    assert printed["predictions"] == 2 and printed["scored"] == 0
