"""RM and DPO stages on tiny-random: loss falls, the right weights train, saved RM reloads, score CLI."""

import json
import os

import numpy as np
import pytest
import torch

from posttrain.train.config import load_config

ROWS = [{"prompt": f"Question {i}?", "chosen": "Yes. Yes. Yes.", "rejected": "No, no no no."} for i in range(12)]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _cfg(stage, tiny_dir, prefs, out, *extra):
    return load_config(None, [f"stage={stage}", f"model.name_or_path={tiny_dir}", f"data.datasets=[{{path: {prefs}}}]",
                              f"output.dir={out}", "optim.lr=1e-2", "output.tensorboard=false", "train.device=cpu",
                              "data.val_size=4", "train.micro_batch_size=4", *extra])


def _history(out):
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "eval"]


@pytest.mark.parametrize("seed", [42, 6])  # 6: the highest first loss of train.seed 0-9
def test_reward_model_learns_saves_and_scores(tiny_dir, prefs, tmp_path, capsys, seed):
    from transformers import AutoModelForSequenceClassification

    from posttrain.cli import main
    from posttrain.train import rm

    out = tmp_path / "rm"
    rm.run(_cfg("rm", tiny_dir, prefs, out, "train.max_steps=6", f"train.seed={seed}"))
    train, evals = _history(out)
    # last / first loss 0.01-0.03 over train.seed 0-9 (the first one, near log 2, varies with the random head)
    assert train[-1]["loss"] < 0.25 * train[0]["loss"] and evals[-1]["accuracy"] == 1.0
    # only the LoRA-merged weights and the head changed: embeddings are never adapted
    torch.manual_seed(seed)  # the stage seeds before loading: the same initial head
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    saved = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)
    assert torch.equal(base.model.embed_tokens.weight, saved.model.embed_tokens.weight)
    assert not torch.equal(base.model.layers[0].self_attn.q_proj.weight, saved.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(base.score.weight, saved.score.weight)
    # plain transformers on one tokenized pair gives the scores `posttrain score` reports
    assert main(["score", str(out), "--data", str(prefs), "--out", str(tmp_path / "s.jsonl")]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{"):])
    assert result["pairs"] == 12 and result["accuracy"] == 1.0 and result["mean_margin"] > 0
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    first = scored[0]
    # the length figures come from the per-response lengths written to --out: 12 x (chosen, rejected)
    rewards = [x for row in scored for x in row["rewards"]]
    lengths = [n for row in scored for n in row["lengths"]]
    assert result["length_correlation"]["responses"] == 24 and min(lengths) > 0
    pairs = [row["lengths"] for row in scored]
    assert result["longer_wins_accuracy"] == _mean([(c > r) + 0.5 * (c == r) for c, r in pairs])
    pearson = result["length_correlation"]["pearson"]
    if pearson is not None:  # None only if every reward or every length is equal
        assert pearson == pytest.approx(float(np.corrcoef(rewards, lengths)[0, 1]), abs=1e-6)
    from posttrain.data.preference import encode_preference, row_to_preference
    from posttrain.models.load import load_tokenizer

    tok = load_tokenizer(str(out))
    sample = encode_preference(row_to_preference(ROWS[0], source="x"), tok, max_length=None, system=None)
    with torch.no_grad():
        plain = [float(saved(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in sample.input_ids]
    assert plain == pytest.approx(first["rewards"], abs=1e-5)



def _all_rewards(model, samples, pad_id):
    from posttrain.data.batches import preference_batches
    from posttrain.models.reward_head import sequence_rewards

    with torch.no_grad():
        return sequence_rewards(model.eval(), preference_batches(samples, pad_id).collate([list(range(len(samples)))]))


def test_reward_std_is_the_std_over_every_response(tiny_dir, prefs, tmp_path):
    """Logged rewards/mean and /std equal torch's over all responses: train summed over 2 micro-batches, and eval."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.data.preference import build_preference_data
    from posttrain.models.load import load_tokenizer
    from posttrain.train import rm

    out = tmp_path / "rm"
    # lr 0: the weights that produced the logged metrics are the saved ones; 8 train prompts = 4 x 2 micro-batches
    cfg = _cfg("rm", tiny_dir, prefs, out, "train.max_steps=1", "optim.lr=0", "train.grad_accum=2")
    rm.run(cfg)
    train, evals = _history(out)
    tok = load_tokenizer(str(out))
    data = build_preference_data(cfg.data, cfg.template, tok, cfg.train.seed)
    saved = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)
    for logged, samples in ((train[0], data.train), (evals[-1], data.eval)):
        rewards = _all_rewards(saved, samples, tok.pad_token_id)  # (R,) every response once
        assert len(rewards) == 2 * len(samples) and float(rewards.std()) > 1e-4
        assert logged["rewards/std"] == pytest.approx(float(rewards.std()), abs=1e-5)
        assert logged["rewards/mean"] == pytest.approx(float(rewards.mean()), abs=1e-5)


def _mean(xs):
    return sum(xs) / len(xs)


def test_normalized_reward_model_scores_the_reference_set_at_zero(tiny_dir, prefs, tmp_path, capsys):
    """rm.normalize_data stores an offset; posttrain score, the PPO source and serve subtract it."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.cli import main
    from posttrain.data.preference import encode_preference, row_to_preference
    from posttrain.records import Message
    from posttrain.models.load import load_tokenizer
    from posttrain.serve.api import ApiError, _generator, load_engine
    from posttrain.serve.engine import Job, Sampling
    from posttrain.train import rm
    from posttrain.models.reward_head import RewardModel

    out = tmp_path / "rm"
    rm.run(_cfg("rm", tiny_dir, prefs, out, "train.max_steps=2", f"rm.normalize_data={prefs}"))
    offset = json.loads((out / "train_summary.json").read_text())["reward_offset"]
    assert json.loads((out / "config.json").read_text())["reward_offset"] == offset and abs(offset) > 1e-3

    def scored(*args):  # posttrain score -> each row's [chosen, rejected] rewards
        assert main(["score", str(out), "--data", str(prefs), "--out", str(tmp_path / "s.jsonl"), *args]) == 0
        capsys.readouterr()
        return [json.loads(line)["rewards"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]

    rewards = scored()
    assert abs(_mean([r[0] for r in rewards])) < 1e-5  # the reference responses: the chosen ones
    saved = AutoModelForSequenceClassification.from_pretrained(out)  # plain transformers: the raw score
    ids = encode_preference(row_to_preference(ROWS[0], source="x"), load_tokenizer(str(out)), max_length=None,
                            system=None).input_ids[0]
    with torch.no_grad():
        raw = float(saved(input_ids=torch.tensor([ids])).logits[0, 0])
    assert raw - saved.config.reward_offset == pytest.approx(rewards[0][0], abs=1e-5)

    ppo = RewardModel(str(out))([r["prompt"] for r in ROWS], [r["chosen"] for r in ROWS])
    assert abs(_mean(ppo)) < 1e-5
    engine = load_engine(str(out), device="cpu")
    try:
        assert engine.score_kind == "reward"
        with pytest.raises(ApiError, match="reward model"):  # chat/completions on it: a 400, not a crash
            _generator(engine)
        served = [engine.submit(Job([], 1, Sampling(), score=([Message("user", r["prompt"])], [r["chosen"]])))
                  .result(timeout=60)[0] for r in ROWS]
    finally:
        engine.close()
    assert abs(_mean(served)) < 1e-5

    # --normalize on a conversation file re-fits from the raw scores: now its replies (the rejected) average 0
    convs = tmp_path / "rejected.jsonl"
    convs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                      {"role": "assistant", "content": r["rejected"]}]}) + "\n"
                             for r in ROWS))
    assert main(["score", str(out)]) == 2 and "--normalize" in capsys.readouterr().err  # neither: one-line error
    again = scored("--normalize", str(convs))
    assert abs(_mean([r[1] for r in again])) < 1e-5
    gaps = [(a[0] - a[1], b[0] - b[1]) for a, b in zip(again, rewards)]
    assert all(x == pytest.approx(y, abs=1e-5) for x, y in gaps)  # an offset never changes a margin

def test_dpo_learns_and_trains_only_adapters(tiny_dir, prefs, tmp_path):
    from posttrain.train import dpo

    out = tmp_path / "dpo"
    dpo.run(_cfg("dpo", tiny_dir, prefs, out, "train.max_steps=6"))
    train, evals = _history(out)
    assert abs(train[0]["loss"] - 0.693147) < 1e-4 and train[0]["rewards/chosen"] == 0.0  # policy = reference
    assert train[-1]["loss"] < 0.6 and evals[-1]["accuracy"] == 1.0 and evals[-1]["margin"] > 0
    assert (out / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_reference_modes_give_the_same_loss(tiny_dir, prefs, method):
    """Adapter-off, frozen copy and precomputed reference log-probs agree (before and after a step);
    for virtual tokens too (their adapter off is the base model, as the copy and precomputed ones are)."""
    import copy

    from posttrain.data.preference import build_preference_data
    from posttrain.models.load import load_base
    from posttrain.models.methods import apply_method
    from posttrain.train.dpo import WithReference, dpo_forward, precompute_reference, response_logps
    from posttrain.data.batches import preference_batches

    cfg = _cfg("dpo", tiny_dir, prefs, "unused", f"method.type={method}", "prompt.num_virtual_tokens=3")
    model, tok = load_base(cfg.model, "cpu")
    data = build_preference_data(cfg.data, cfg.template, tok, 0)
    ref_copy = copy.deepcopy(model).requires_grad_(False)
    precompute_reference(model, data.train, tok.pad_token_id, 4, "cpu", 1024)
    model = apply_method(model, cfg.methods)
    torch.manual_seed(0)
    with torch.no_grad():  # move the adapters away from identity so the reference matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "prompt_encoder" in name:  # virtual tokens: a random init can sit close to the base's loss
                p.normal_(0, 1.0)
    batch = preference_batches(data.train, tok.pad_token_id).collate([[0], [1], [2]])
    losses = [float(dpo_forward(model, batch, 3.0, dpo_cfg=cfg.dpo)[0])]  # precomputed ref_logps
    no_pre = {k: v for k, v in batch.items() if k != "ref_logps"}
    losses.append(float(dpo_forward(model, no_pre, 3.0, dpo_cfg=cfg.dpo)[0]))  # adapters disabled
    losses.append(float(dpo_forward(WithReference(model, ref_copy), no_pre, 3.0, dpo_cfg=cfg.dpo)[0]))  # a copy
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) == pytest.approx(losses[2], abs=1e-6)
    with torch.no_grad():  # the policy moved away from the reference, so agreeing above means something
        policy = response_logps(model, batch, 1024)[0]
    assert (policy - batch["ref_logps"]).abs().max() > 1e-2


def test_precomputed_reference_logps_are_cached_on_disk(tiny_dir, prefs, tmp_path, monkeypatch):
    """Full fine-tuning DPO: the second run loads the reference log-probs (no reference pass) and logs the same."""
    import shutil

    from posttrain.data.preference import build_preference_data
    from posttrain.models.load import load_base
    from posttrain.train import dpo, reference_cache

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    calls = []
    real = dpo.precompute_reference
    monkeypatch.setattr(dpo, "precompute_reference", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    args = ("train.max_steps=2", "method.type=full", "dpo.reference=precompute", "optim.lr=1e-3")
    first = dpo.run(_cfg("dpo", tiny_dir, prefs, tmp_path / "a", *args))
    assert first["reference_logps"] == {"train": "computed", "eval": "computed"} and len(calls) == 2
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.pt"))) == 2
    second = dpo.run(_cfg("dpo", tiny_dir, prefs, tmp_path / "b", *args))
    assert second["reference_logps"] == {"train": "loaded", "eval": "loaded"} and len(calls) == 2
    logged = [[{k: v for k, v in row.items() if k != "tokens_per_s"} for rows in _history(tmp_path / run)
               for row in rows] for run in ("a", "b")]
    assert logged[0] == logged[1] and abs(logged[0][0]["loss"] - 0.693147) < 1e-4  # step 0: policy = reference

    # the key follows the tokenized data and the model files: a new system prompt or touched weights miss
    model_dir = shutil.copytree(tiny_dir, tmp_path / "model")
    cfg = _cfg("dpo", model_dir, prefs, "unused")
    model, tok = load_base(cfg.model, "cpu")
    samples = build_preference_data(cfg.data, cfg.template, tok, 0).train
    key = reference_cache.cache_file(samples, model, cfg.model, "cpu")
    assert key == reference_cache.cache_file(samples, model, cfg.model, "cpu")
    other = _cfg("dpo", model_dir, prefs, "unused", "template.system=Be brief.")
    assert key != reference_cache.cache_file(build_preference_data(other.data, other.template, tok, 0).train,
                                             model, cfg.model, "cpu")
    weights = next(model_dir.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert key != reference_cache.cache_file(samples, model, cfg.model, "cpu")
