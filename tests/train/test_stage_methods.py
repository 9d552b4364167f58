"""Every fine-tuning method on every stage that trains a model (sft, rm, dpo, ppo), through the stage's own
run(): a few steps on the tiny model, finite losses, the reference the method allows, and only the
method's own parameters (plus the reward head) change. Combinations that cannot work are config errors."""

import json
import math
import re

import pytest
import torch

from posttrain.train.config import load_config
from posttrain.errors import ConfigError

LAYER = re.compile(r"layers\.(\d+)\.")

# name -> (overrides, may this parameter change?, must this one change?)
METHODS = {
    "full": ({"method.type": "full"}, lambda n: True, lambda n: "layers.0." in n),
    "freeze": ({"method.type": "freeze", "freeze.trainable_layers": 1}, lambda n: "layers.1." in n,
               lambda n: "layers.1." in n),
    "lora": ({"method.type": "lora"}, lambda n: "lora_" in n, lambda n: "lora_B" in n),
    "dora": ({"method.type": "lora", "lora.use_dora": True}, lambda n: "lora_" in n,
             lambda n: "lora_magnitude" in n),
    "rslora": ({"method.type": "lora", "lora.use_rslora": True}, lambda n: "lora_" in n, lambda n: "lora_B" in n),
    "pissa": ({"method.type": "lora", "lora.init": "pissa"}, lambda n: "lora_" in n, lambda n: "lora_A" in n),
    "qlora": ({"method.type": "qlora"}, lambda n: "lora_" in n, lambda n: "lora_B" in n),
    # one block at a time, no re-draw within the run: embeddings, norm, head and exactly one block train
    "lisa": ({"method.type": "lisa", "lisa.layers": 1, "lisa.interval": 10}, lambda n: True,
             lambda n: "embed_tokens" in n),
    "prompt": ({"method.type": "prompt", "prompt.num_virtual_tokens": 3}, lambda n: "prompt_encoder" in n,
               lambda n: "prompt_encoder" in n),
    "prefix": ({"method.type": "prefix", "prompt.num_virtual_tokens": 3}, lambda n: "prompt_encoder" in n,
               lambda n: "prompt_encoder" in n),
}
# The model with its adapter off is the loaded base: DPO / PPO use it as the reference (else copy / precompute).
ADAPTER_REFERENCE = {"lora", "dora", "rslora", "qlora", "prompt", "prefix"}
VIRTUAL = {"prompt", "prefix"}  # random virtual tokens: the policy starts away from the base


def _is_head(name: str) -> bool:
    return "score" in name and "original_module" not in name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage-methods")
    (root / "sft.jsonl").write_text("".join(json.dumps({"instruction": f"Say {w}", "output": f"{w} {w}."}) + "\n"
                                            for w in ("red", "blue", "green", "gold")))
    (root / "prefs.jsonl").write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": "Yes. Yes.",
                                                          "rejected": "No, no no."}) + "\n" for i in range(4)))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": c}]}) + "\n"
                                                for c in ("Say something.", "Hello there")))
    (root / "rule.py").write_text("def upper(prompts, responses):\n"
                                  "    return [sum(c.isupper() for c in r) / max(1, len(r)) for r in responses]\n")
    return root


def stage_config(stage: str, method: str, tiny_dir, files, out, **extra):
    tree = {"stage": stage, "model.name_or_path": str(tiny_dir), "output.dir": str(out), "output.tensorboard": False,
            "train.device": "cpu", "train.max_steps": 2, "train.micro_batch_size": 2, "data.max_length": 64,
            **METHODS[method][0], **extra}
    if stage == "sft":
        tree["data.datasets"] = [{"path": str(files / "sft.jsonl")}]
    elif stage in ("rm", "dpo"):
        tree["data.datasets"] = [{"path": str(files / "prefs.jsonl")}]
    else:
        tree |= {"data.datasets": [{"path": str(files / "prompts.jsonl")}],
                 "reward.function": f"{files / 'rule.py'}:upper", "ppo.rollout_batch_size": 2,
                 "ppo.mini_batch_size": 2, "ppo.ppo_epochs": 1, "ppo.max_new_tokens": 4, "ppo.sample_every": 0}
    return load_config(None, [], **tree)


def run_and_watch(stage: str, cfg, monkeypatch) -> tuple[dict, dict, dict]:
    """(summary, parameters right after apply_method, parameters when the stage saves) for one stage run."""
    from posttrain.train import dpo, ppo, rm, setup, sft

    module = {"sft": sft, "rm": rm, "dpo": dpo, "ppo": ppo}[stage]
    seen: dict = {}
    real_apply = setup.apply_method  # every stage applies its method through train/setup.py
    save_name = "save_reward_model" if stage == "rm" else "save_model"
    real_save = getattr(module, save_name)

    def apply_and_snapshot(model, *args, **kwargs):
        model = real_apply(model, *args, **kwargs)
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    def snapshot_and_save(model, *args, **kwargs):  # before rm merges LoRA into the base
        seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return real_save(model, *args, **kwargs)

    monkeypatch.setattr(setup, "apply_method", apply_and_snapshot)
    monkeypatch.setattr(module, save_name, snapshot_and_save)
    summary = module.run(cfg)
    return summary, seen["before"], seen["after"]


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_on_stage(tmp_path, tiny_dir, files, monkeypatch, stage, method):
    cfg = stage_config(stage, method, tiny_dir, files, tmp_path / "run")
    summary, before, after = run_and_watch(stage, cfg, monkeypatch)
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"])
    train = [json.loads(line) for line in (tmp_path / "run/logs/metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["split"] == "train"]

    changed = {n for n, t in before.items() if not torch.equal(t, after[n])}
    _, allowed, required = METHODS[method]
    if stage == "rm":
        assert any(_is_head(n) for n in changed), sorted(changed)  # the reward head always trains
        assert all(allowed(n) or _is_head(n) for n in changed), sorted(changed)
    else:
        assert all(allowed(n) for n in changed), sorted(changed)
    assert any(required(n) for n in changed), sorted(changed)
    if method == "lisa":
        assert len({LAYER.search(n).group(1) for n in changed if LAYER.search(n)}) == 1, sorted(changed)

    if stage == "dpo":
        assert summary["reference"] == ("adapter" if method in ADAPTER_REFERENCE else "precompute")
        if method not in VIRTUAL:  # the reference is the starting policy: step 1 sits at log 2
            assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    if stage == "ppo" and method not in VIRTUAL:  # ... and the first rollout has zero KL to it
        assert abs(train[0]["kl"]) < 1e-4


@pytest.mark.parametrize("overrides, message", [
    ({"stage": "dpo", "method.type": "full", "dpo.reference": "adapter"}, "dpo.reference=adapter"),
    ({"stage": "dpo", "method.type": "freeze", "dpo.reference": "adapter"}, "dpo.reference=adapter"),
    ({"stage": "dpo", "method.type": "lisa", "dpo.reference": "adapter"}, "dpo.reference=adapter"),
    ({"stage": "dpo", "lora.init": "pissa", "dpo.reference": "adapter"}, "not PiSSA"),
    ({"stage": "ppo", "method.type": "full", "ppo.value_model": "separate"}, "value_model=separate"),
    ({"stage": "ppo", "method.type": "prompt", "ppo.value_model": "separate"}, "value_model=separate"),
    ({"stage": "sft", "method.type": "prompt", "data.packing": True}, "cannot train on packed rows"),
    ({"stage": "sft", "method.type": "prefix", "data.packing": True}, "cannot train on packed rows"),
    ({"stage": "sft", "optim.lr": {"lora": 1e-3, "lisaa": 1e-5}}, "'lisaa' is not a method.type"),
])
def test_unsupported_combinations_are_config_errors(overrides, message):
    base = {"model.name_or_path": "tiny-random", "data.datasets": [{"path": "x.jsonl"}], "train.max_steps": 1}
    if overrides["stage"] == "ppo":  # the reward section belongs to stage ppo only
        base["reward.function"] = "m:f"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [], **(base | overrides))


def test_per_method_learning_rate_and_packing_auto():
    base = {"model.name_or_path": "tiny-random", "data.datasets": [{"path": "x.jsonl"}], "data.packing": "auto"}
    by_method = {"lora": 1e-3, "qlora": 1e-3}
    lora = load_config(None, [], **base, **{"optim.lr": by_method})
    assert lora.optim.lr == 1e-3 and lora.data.packing is True
    prompt = load_config(None, ["method.type=prompt"], **base, **{"optim.lr": by_method})
    assert prompt.optim.lr == 3e-2 and prompt.data.packing is False  # the method's default, unpacked
    assert load_config(None, ["method.type=full", "optim.lr=5e-6"], **base).optim.lr == 5e-6
    assert load_config(None, ["stage=dpo"], **base).data.packing is False


# ---------------------------------------------------------------- reward models that cannot simply merge


def _rm(tiny_dir, method: str, **extra):
    from posttrain.models.methods import apply_method, quantization_config
    from posttrain.models.load import load_reward_model

    cfg = load_config(None, [], **{"stage": "rm", "data.datasets": [{"path": "x.jsonl"}], "method.type": method,
                                   "model.name_or_path": str(tiny_dir), "prompt.num_virtual_tokens": 3, **extra})
    model, tokenizer = load_reward_model(cfg.model, "cpu", quantization_config=quantization_config(cfg.methods, "cpu"))
    return cfg, apply_method(model, cfg.methods, task_type="SEQ_CLS"), tokenizer


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_token_reward_reads_the_last_real_token_and_reloads(tmp_path, tiny_dir, method):
    from posttrain.models.config import ModelConfig
    from posttrain.models.load import load_reward_model
    from posttrain.models.reward_head import RewardModel, sequence_rewards
    from posttrain.train.rm import save_reward_model

    cfg, model, tokenizer = _rm(tiny_dir, method)
    ids = torch.randint(3, 500, (2, 9))  # (R, T)
    ids[1, 5:] = tokenizer.pad_token_id  # a right-padded row
    model.eval()
    with torch.no_grad():
        rewards = sequence_rewards(model, {"input_ids": ids})
        alone = sequence_rewards(model, {"input_ids": ids[1:, :5]})
        if method == "prefix":  # real input ids reach transformers' head here: both rules agree
            torch.testing.assert_close(rewards, model(input_ids=ids).logits[:, 0], rtol=0, atol=1e-6)
    assert float(rewards[1]) == pytest.approx(float(alone[0]), abs=1e-5)  # padding is never read

    save_reward_model(model, tokenizer, tmp_path / "rm", cfg)
    assert (tmp_path / "rm" / "adapter_config.json").is_file()
    loaded, _ = load_reward_model(ModelConfig(name_or_path=str(tmp_path / "rm")), "cpu")
    with torch.no_grad():
        torch.testing.assert_close(sequence_rewards(loaded.eval(), {"input_ids": ids}), rewards, rtol=0, atol=1e-6)
    assert all(math.isfinite(r) for r in RewardModel(str(tmp_path / "rm"))(["Hi", "Say"], ["hello there", "no"]))


def test_qlora_reward_model_is_saved_merged_on_the_dequantised_base(tmp_path, tiny_dir):
    import bitsandbytes as bnb
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.reward_head import sequence_rewards
    from posttrain.train.rm import save_reward_model

    cfg, model, tokenizer = _rm(tiny_dir, "qlora")
    with torch.no_grad():  # a trained-looking adapter and head
        for name, p in model.named_parameters():
            if "lora_B" in name or _is_head(name):
                p.normal_(0, 0.05)
    batch = {"input_ids": torch.randint(3, 500, (3, 9))}
    with torch.no_grad():
        expected = sequence_rewards(model.eval(), batch)
    save_reward_model(model, tokenizer, tmp_path / "rm", cfg)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    assert "quantization_config" not in plain.config.to_dict()
    with torch.no_grad():  # equal up to the NF4 re-rounding of the blocks
        torch.testing.assert_close(sequence_rewards(plain, batch), expected, rtol=0, atol=1e-4)


def test_4bit_eval_forward_takes_the_training_kernel(tiny_dir):
    """bitsandbytes would switch to a bf16 CPU kernel in eval mode; rollouts and training must agree."""
    from posttrain.models.load import load_base
    from posttrain.models.methods import quantization_config

    cfg = load_config(None, ["method.type=qlora", f"model.name_or_path={tiny_dir}"],
                      **{"data.datasets": [{"path": "x.jsonl"}]})
    model, _ = load_base(cfg.model, "cpu", quantization_config(cfg.methods, "cpu"))
    ids = torch.randint(3, 500, (2, 9))
    with torch.no_grad():
        train_logits = model.train()(input_ids=ids).logits
        eval_logits = model.eval()(input_ids=ids).logits
    assert torch.equal(train_logits, eval_logits)

