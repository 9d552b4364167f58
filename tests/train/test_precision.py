"""train.precision and the engines' bad input: a bf16 run keeps float32 master weights; fp16 on a CPU, an engine
without its launcher or library, a sharded engine with QLoRA or LISA: one clear line each, exit 2."""

import sys

import pytest
import torch

from posttrain.cli import main
from posttrain.train.config import load_config
from posttrain.errors import ConfigError
from posttrain.train.engines import join
from test_loop import run_loop, trainable


def test_bf16_run_trains_float32_master_weights(tiny_dir, tmp_path):
    before = trainable(run_loop(tiny_dir, tmp_path / "a", "train.max_steps=0", "train.epochs=0.01")[0])
    model, summary = run_loop(tiny_dir, tmp_path / "b", "train.precision=bf16", "train.max_steps=2")
    after = trainable(model)
    assert summary["steps"] == 2 and all(p.dtype == torch.float32 for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in after)


@pytest.mark.parametrize("overrides, message", [
    (["train.precision=fp16"], "train.precision=fp16 needs a CUDA GPU"),
    (["train.distributed=fsdp", "method.type=qlora"], "does not shard a 4-bit"),
    (["train.distributed=deepspeed", "method.type=lisa"], "method.type=lisa changes which weights"),
    (["train.distributed=deepspeed", "train.precision=bf16", "train.deepspeed.offload_params=true"],
     "offload_params needs train.deepspeed.zero_stage=3"),
    (["train.distributed=deepspeed", "train.deepspeed.bucket_size=-1"], "train.deepspeed.bucket_size must be >= 0"),
])
def test_bad_engine_settings_are_one_line_exit_2(tiny_dir, tmp_path, capsys, overrides, message):
    (tmp_path / "d.jsonl").write_text('{"instruction": "Hi", "input": "", "output": "Hello"}\n')
    (tmp_path / "c.yaml").write_text(f"model: {{name_or_path: {tiny_dir}}}\ndata: {{datasets: [{{path: d.jsonl}}]}}\n")
    code = main(["train", str(tmp_path / "c.yaml"), f"output.dir={tmp_path / 'out'}", "train.device=cpu", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err, err


def test_launch_and_engine_mismatches_are_clear(monkeypatch):
    cfg = load_config(None, ["model.name_or_path=tiny-random", "train.device=cpu"],
                      **{"data.datasets": [{"path": "unused.jsonl"}]})
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun started 2 processes, but the config asks for no engine
    with pytest.raises(ConfigError, match="train.distributed is none"):
        join(cfg.train)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP config: not half-applied
    with pytest.raises(ConfigError, match="takes its engine from train.distributed"):
        join(load_config(None, ["model.name_or_path=tiny-random", "train.device=cpu", "train.distributed=ddp"],
                         **{"data.datasets": [{"path": "unused.jsonl"}]}).train)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    with pytest.raises(ConfigError, match="DeepSpeed is not installed"):
        join(load_config(None, ["model.name_or_path=tiny-random", "train.device=cpu", "train.distributed=deepspeed"],
                         **{"data.datasets": [{"path": "unused.jsonl"}]}).train)


def test_deepspeed_buckets_follow_the_model_unless_set():
    """HF's "auto" sizes from the hidden size (DeepSpeed's own 5e8-element bucket holds a small model whole);
    live_parameters sets both of ZeRO-3's keep-gathered limits."""
    from posttrain.train.engines.zero import deepspeed_config

    def zero(*overrides, hidden=576):
        cfg = load_config(None, ["model.name_or_path=tiny-random", "train.distributed=deepspeed", *overrides],
                          **{"data.datasets": [{"path": "unused.jsonl"}]})
        return deepspeed_config(cfg.train, cfg.optim, 2, hidden)["zero_optimization"]

    assert zero() == {"stage": 2, "reduce_bucket_size": 331_776}
    assert zero("train.deepspeed.zero_stage=3") == {
        "stage": 3, "reduce_bucket_size": 331_776, "stage3_prefetch_bucket_size": 298_598,
        "stage3_param_persistence_threshold": 5_760, "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0}
    live = zero("train.deepspeed.zero_stage=3", "train.deepspeed.live_parameters=1000000000")
    assert live["stage3_max_live_parameters"] == live["stage3_max_reuse_distance"] == 10**9
    assert zero("train.deepspeed.bucket_size=1000", hidden=None) == {"stage": 2, "reduce_bucket_size": 1000}
    assert zero(hidden=None) == {"stage": 2}  # no hidden size known: DeepSpeed's own defaults


def test_lora_bf16_stores_frozen_linears_in_bf16_losing_nothing(tiny_dir, tmp_path, monkeypatch):
    """A base whose float32 weights are bf16 numbers (a bf16 checkpoint such as SmolLM2's loaded in float32):
    under train.precision=bf16 its frozen linears are held in bf16 during the run, the run is bit-identical to
    one that lets autocast cast them at every call, and the loaded float32 values are back before saving."""
    import shutil

    from transformers import AutoModelForCausalLM

    from posttrain.train.engines import base

    bf16_dir = tmp_path / "bf16-numbers"
    shutil.copytree(tiny_dir, bf16_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(bf16_dir)
    held = []

    def recording(model, dtype):
        params = store(model, dtype)
        held.append([(p, p.dtype) for p in params])
        return params

    store = base.store_frozen_linears
    monkeypatch.setattr(base, "store_frozen_linears", recording)
    stored, summary = run_loop(bf16_dir, tmp_path / "stored", "train.precision=bf16", "train.max_steps=3")
    assert len(held) == 1 and len(held[0]) >= 7 and all(dtype == torch.bfloat16 for _, dtype in held[0])
    assert all(p.dtype == torch.float32 for p, _ in held[0])  # restored for saving
    loaded = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32).state_dict()
    for name, p in stored.named_parameters():
        if not p.requires_grad:
            key = name.replace("base_model.model.", "").replace("base_layer.", "")
            assert torch.equal(p, loaded[key]), name

    monkeypatch.setattr(base, "store_frozen_linears", lambda model, dtype: [])  # autocast casts every call
    cast, summary_cast = run_loop(bf16_dir, tmp_path / "cast", "train.precision=bf16", "train.max_steps=3")
    assert summary["final_train_loss"] == summary_cast["final_train_loss"]
    for name, p in trainable(stored).items():
        assert torch.equal(p, trainable(cast)[name]), name
    frozen = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).requires_grad_(False)
    assert store(frozen, torch.bfloat16) == []  # float32 numbers keep their storage: the cast would round them


def test_bf16_storage_only_where_every_model_call_goes_through_the_engine():
    """GRPO's greedy eval and the vision tower call the model outside the engine's autocast, where a bf16 weight
    would meet a float32 input: those runs keep float32 storage, as do methods that train the base."""
    from posttrain.train.engines.frozen_storage import frozen_base_in_engine_calls

    def cfg(*overrides):
        return load_config(None, ["model.name_or_path=tiny-random", *overrides],
                           **{"data.datasets": [{"path": "x.jsonl"}]})

    assert frozen_base_in_engine_calls(cfg("method.type=lora"))
    assert frozen_base_in_engine_calls(cfg("stage=dpo", "method.type=lora"))
    grpo = cfg("method.type=lora")
    grpo.stage = "grpo"  # (a GRPO config also needs its reward and steps; the rule reads the stage)
    assert not frozen_base_in_engine_calls(grpo)
    assert not frozen_base_in_engine_calls(cfg("method.type=lisa"))
