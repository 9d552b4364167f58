"""Stage grpo on the tiny model: a run's metrics and outputs, response log-probs (packed = padded = plain),
learning a rule reward under each estimator, and resume equal to an uninterrupted run."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

UPPER = "def upper(prompts, responses):\n    return [sum(c.isupper() for c in r) / max(1, len(r)) for r in responses]\n"


def _cfg(tmp_path, tiny_dir, name="out", **extra):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}\n#### {2 * i}"}]} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:9]))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows[9:]))
    (tmp_path / "rule.py").write_text(UPPER)
    overrides = {"stage": "grpo", "model.name_or_path": str(tiny_dir),
                 "data.datasets": [{"path": str(tmp_path / "train.jsonl")}],
                 "data.eval_datasets": [{"path": str(tmp_path / "test.jsonl")}],
                 "reward.sources": [{"type": "exact_match"},
                                    {"type": "function", "function": f"{tmp_path / 'rule.py'}:upper", "name": "upper"}],
                 "grpo.group_size": 4, "grpo.prompts_per_step": 2, "grpo.max_new_tokens": 6, "optim.lr": 0.01,
                 "train.max_steps": 2, "train.micro_batch_size": 4, "output.dir": str(tmp_path / name),
                 "output.tensorboard": False} | extra
    from posttrain.train.config import load_config

    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def _rows(out_dir, split="train"):
    rows = [json.loads(line) for line in (out_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_grpo_run_reports_the_issue_metrics_and_trains_only_the_adapter(tmp_path, tiny_dir):
    from posttrain.train import grpo

    cfg = _cfg(tmp_path, tiny_dir, **{"grpo.kl_coef": 0.1, "grpo.epochs": 2, "grpo.mini_batch_size": 4,
                                      "grpo.sample_every": 1})
    summary = grpo.run(cfg)
    out = tmp_path / "out"
    train = _rows(out)
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward", "reward/exact_match", "reward/upper", "accuracy", "kl", "clip_frac", "approx_kl",
                "response_length", "zero_variance_groups", "truncated", "policy_loss", "loss", "grad_norm"):
        assert all(key in r for r in train), key
    # k3 KL to the reference (the adapter turned off): >= 0, and > 0 once the adapter has moved
    assert all(r["kl"] >= 0 for r in train) and train[1]["kl"] > 0
    assert train[0]["accuracy"] == train[0]["reward/exact_match"]
    # 2 epochs x 2 mini-batches: the later updates see ratios != 1, so the policy moved within the step
    assert any(r["approx_kl"] > 0 for r in train)
    samples = [json.loads(line) for line in (out / "logs" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2] and len(samples[0]["responses"]) == 4
    assert "####" in samples[0]["reference"] and len(samples[0]["rewards"]) == 4
    assert summary["eval_before"]["accuracy"] == 0.0 and "accuracy" in summary["eval_after"]
    assert summary["estimator"] == "grpo" and summary["loss_norm"] == "sequence" and summary["eval_prompts"] == 3
    assert (out / "reward_accuracy.png").is_file()
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(float(t.abs().sum()) > 0 for k, t in adapter.items() if "lora_B" in k)


def test_response_logps_packed_equal_padded_equal_a_plain_forward(tmp_path, tiny_dir):
    from posttrain.data.prompts import load_prompts
    from posttrain.models.load import load_base
    from posttrain.train.response_logps import response_logps
    from posttrain.train.rollout import sample

    cfg = _cfg(tmp_path, tiny_dir, **{"grpo.max_new_tokens": 8, "grpo.temperature": 0.7})
    model, tok = load_base(cfg.model, "cpu")
    prompts, _ = load_prompts(cfg.data, cfg.template, tok, 8)
    chosen = [prompts[0]] * 3 + [prompts[5]] * 2  # two groups with prompts of different lengths
    s = sample(model, tok, chosen, [1, 2, 3, 4, 5], cfg.grpo)
    groups = [0, 0, 0, 1, 1]
    with torch.no_grad():
        packed = response_logps(model, s.input_ids, s.attention_mask, s.response_mask, groups, pack=True,
                                temperature=0.7)
        padded = response_logps(model, s.input_ids, s.attention_mask, s.response_mask, groups, pack=False,
                                temperature=0.7)
        width = s.response_mask.shape[1]
        plain = []
        for ids, keep, resp in zip(s.input_ids, s.attention_mask, s.response_mask):
            seq = ids[keep]  # (L,) this row alone, no padding
            logits = model(input_ids=seq[None]).logits[0].float() / 0.7
            n = int(resp.sum())
            lp = torch.log_softmax(logits[-n - 1:-1], -1).gather(-1, seq[-n:, None])[:, 0]
            plain.append(torch.cat([lp, torch.zeros(width - n)]))
        plain = torch.stack(plain)
    assert s.response_mask.sum() > 10 and torch.all(packed[s.response_mask] < 0)
    assert torch.allclose(packed, plain, atol=1e-4) and torch.allclose(padded, plain, atol=1e-4)
    assert torch.all(packed[~s.response_mask] == 0)


def test_rollouts_sample_with_lora_merged_and_leave_the_base_as_it_was(tmp_path, tiny_dir, monkeypatch):
    import contextlib

    from posttrain.train import rollout
    from posttrain.data.prompts import load_prompts
    from posttrain.models.load import load_base
    from posttrain.models.methods import apply_method
    from posttrain.train.rollout import sample

    cfg = _cfg(tmp_path, tiny_dir, **{"grpo.max_new_tokens": 8, "grpo.temperature": 0.7})
    model, tok = load_base(cfg.model, "cpu")
    model = apply_method(model, cfg.methods)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained adapter, so merging changes the weights
            torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts, _ = load_prompts(cfg.data, cfg.template, tok, 8)
    seen = []
    real = rollout.merged_lora

    def spy(policy, synced):
        seen.append(1)
        return real(policy, synced)

    monkeypatch.setattr(rollout, "merged_lora", spy)
    merged = sample(model, tok, prompts[:4], [1, 2, 3, 4], cfg.grpo)
    assert seen == [1]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # exactly: the originals went back
    base = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad(), real(model, synced=False):
        delta = base.get_delta_weight("default")
        assert float(delta.abs().max()) > 0
        assert torch.allclose(base.get_base_layer().weight, before[
            "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] + delta)
    with real(model, synced=True):  # sharded weights: never merged
        assert torch.equal(base.get_base_layer().weight,
                           before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
    monkeypatch.setattr(rollout, "merged_lora", lambda *a: contextlib.nullcontext())
    plain = sample(model, tok, prompts[:4], [1, 2, 3, 4], cfg.grpo)
    assert torch.equal(merged.input_ids, plain.input_ids)  # the same draws, merged or not (to fp32 rounding)


def _mean(xs):
    return sum(xs) / len(xs)


COUNT_UPPER = ("def count_upper(prompts, responses):\n"
               "    return [float(sum(c.isupper() for c in r)) for r in responses]\n")


@pytest.mark.parametrize("estimator, seed", [("grpo", 0), ("grpo", 1), ("rloo", 0), ("dr_grpo", 0)])
def test_each_estimator_raises_a_rule_reward_against_a_frozen_control(tmp_path, tiny_dir, estimator, seed):
    from posttrain.train import grpo

    (tmp_path / "count.py").write_text(COUNT_UPPER)

    def run(name, lr):
        cfg = _cfg(tmp_path, tiny_dir, name, **{
            "reward.sources": [{"type": "function", "function": f"{tmp_path / 'count.py'}:count_upper"}],
            "grpo.estimator": estimator, "grpo.group_size": 4, "grpo.prompts_per_step": 2, "grpo.max_new_tokens": 8,
            "grpo.sample_every": 0, "method.type": "full", "optim.lr": lr, "optim.scheduler": "constant",
            "train.max_steps": 24, "train.seed": seed, "data.eval_datasets": []})
        grpo.run(cfg)
        return [r["reward"] for r in _rows(tmp_path / name)]

    trained, frozen = run("trained", 0.01), run("frozen", 0.0)
    assert trained[0] == frozen[0]  # the same prompts and row seeds: step 1 samples before any update
    # the frozen control shows what chance gives at the same steps; measured (these 4 cases, one Zen CPU): trained
    # 4.5-7.6 uppercase letters per 8-token reply over the last 6 steps, frozen 0.4-0.6
    assert _mean(trained[-6:]) > 2 * _mean(frozen[-6:]) + 0.5, (trained, frozen)


def test_resume_after_interruption_matches_uninterrupted(tmp_path, tiny_dir, monkeypatch):
    from posttrain.train import grpo

    extra = {"train.max_steps": 4, "train.save_every": 2, "train.keep_last": 1, "train.eval_every": 2,
             "grpo.kl_coef": 0.1, "grpo.epochs": 2, "grpo.mini_batch_size": 4, "grpo.estimator": "rloo"}
    full = grpo.run(_cfg(tmp_path, tiny_dir, "full", **extra))
    cut_cfg = _cfg(tmp_path, tiny_dir, "cut", **extra)
    real, calls = grpo.sample, []

    def crash_at_step_4(*args, **kwargs):  # after the step-2 checkpoint and the logged step 3
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "sample", crash_at_step_4)
    with pytest.raises(RuntimeError, match="interrupted"):
        grpo.run(cut_cfg)
    monkeypatch.setattr(grpo, "sample", real)
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-2"]
    resumed = grpo.run(dataclasses.replace(cut_cfg, train=dataclasses.replace(cut_cfg.train, resume="auto")))

    a, b = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(tmp_path / "cut" /
                                                                                  "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = {"tokens_per_s"}
    rows_full, rows_cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["step"] for r in rows_cut] == [1, 2, 3, 4]
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows_full] == \
        [{k: v for k, v in r.items() if k not in timing} for r in rows_cut]
    assert rows_full[2]["kl"] != 0.0  # the reference term was live after the resume point
    for key in ("eval_before", "before", "eval_after", "after", "first_reward", "last_reward"):
        assert resumed[key] == full[key], key


def test_two_processes_match_one(tmp_path, tiny_dir):
    """`torchrun --nproc_per_node 2` shards each step's samples, the held-out prompts and the mini-batches over
    2 processes: the same samples, logged figures and adapter as one process."""
    import os
    import subprocess
    import sys

    from posttrain.train.config import save_config

    cfg = _cfg(tmp_path, tiny_dir, **{"grpo.kl_coef": 0.1, "grpo.epochs": 2, "grpo.mini_batch_size": 4,
                                      "grpo.sample_every": 1, "train.max_steps": 3, "grpo.estimator": "rloo"})
    save_config(cfg, tmp_path / "grpo.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["-m", "posttrain.cli", "train", str(tmp_path / "grpo.yaml")]
    subprocess.run([sys.executable, *cli, f"output.dir={tmp_path / 'one'}"], check=True, env=env,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537"]
    subprocess.run([*torchrun, *cli, f"output.dir={tmp_path / 'two'}", "train.micro_batch_size=2",
                    "train.distributed=ddp"], check=True,
                   env=env, capture_output=True)
    for split in ("train", "eval"):
        one, two = _rows(tmp_path / "one", split), _rows(tmp_path / "two", split)
        assert len(one) == len(two) > 0
        for a, b in zip(one, two):
            assert a.keys() == b.keys() and a["step"] == b["step"]
            for key in a.keys() - {"split", "step", "tokens_per_s", "lr", "grad_norm"}:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (split, key, a[key], b[key])
    samples = [(tmp_path / d / "logs" / "samples.jsonl").read_text() for d in ("one", "two")]
    assert samples[0] == samples[1]
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" /
                                                                                "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["processes"] == 2
