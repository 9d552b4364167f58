"""RM and DPO stages on tiny-random: loss falls, the right weights train, saved RM reloads, score CLI."""

import json

import pytest
import torch

from posttrain.config import load_config

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


def test_reward_model_learns_saves_and_scores(tiny_dir, prefs, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from posttrain.cli import main
    from posttrain.train import reward

    out = tmp_path / "rm"
    reward.run(_cfg("rm", tiny_dir, prefs, out, "train.max_steps=6"))
    train, evals = _history(out)
    assert train[-1]["loss"] < train[0]["loss"] < 0.8 and evals[-1]["accuracy"] == 1.0
    # only the LoRA-merged weights and the head changed: embeddings are never adapted
    torch.manual_seed(42)  # the stage seeds before loading: the same initial head
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
    first = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
    from posttrain.data.preference import encode_preference, row_to_preference
    from posttrain.models.load import load_tokenizer

    tok = load_tokenizer(str(out))
    sample = encode_preference(row_to_preference(ROWS[0], source="x"), tok, max_length=None, system=None)
    with torch.no_grad():
        plain = [float(saved(input_ids=torch.tensor([ids])).logits[0, 0]) for ids in sample.input_ids]
    assert plain == pytest.approx(first["rewards"], abs=1e-5)


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
    from posttrain.train.dpo import dpo_forward, precompute_reference
    from posttrain.train.reward import to_batches

    cfg = _cfg("dpo", tiny_dir, prefs, "unused", f"method.type={method}", "prompt.num_virtual_tokens=3")
    model, tok = load_base(cfg.model, "cpu")
    data = build_preference_data(cfg.data, cfg.template, tok, 0)
    ref_copy = copy.deepcopy(model).requires_grad_(False)
    precompute_reference(model, data.train, tok.pad_token_id, 4, "cpu", 1024)
    model = apply_method(model, cfg)
    with torch.no_grad():  # move the adapters away from identity so the reference matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = to_batches(data.train, tok.pad_token_id).collate([[0], [1], [2]])
    losses = [float(dpo_forward(model, batch, 3.0, dpo_cfg=cfg.dpo)[0])]  # precomputed ref_logps
    no_pre = {k: v for k, v in batch.items() if k != "ref_logps"}
    losses.append(float(dpo_forward(model, no_pre, 3.0, dpo_cfg=cfg.dpo)[0]))  # adapters disabled
    losses.append(float(dpo_forward(model, no_pre, 3.0, dpo_cfg=cfg.dpo, ref_model=ref_copy)[0]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) == pytest.approx(losses[2], abs=1e-6)
    assert abs(losses[0] - 0.693147) > 1e-3
