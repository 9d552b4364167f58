"""PEFT methods beyond plain LoRA on the tiny model: each trains through the SFT forward (loss
falls), changes only its own parameters, and saves -> loads to the same outputs; plus chat and
export for the methods that need special handling (QLoRA, prompt / prefix tuning)."""

import pytest
import torch

from posttrain.train.config import load_config, save_config
from posttrain.errors import ConfigError, PosttrainError
from posttrain.models.export import export_merged
from posttrain.models.load import load_base
from posttrain.models.fast_lora import disable_fast_lora
from posttrain.models.onednn_linear import disable_training_products
from posttrain.models.anatomy import lm_head_and_backbone
from posttrain.models.methods import apply_method, optimizer_groups, quantization_config
from posttrain.models.run import load_model_for_inference, save_model
from posttrain.models.forward import sft_forward

torch.manual_seed(0)
IDS = torch.randint(3, 500, (2, 12))  # (B, T) one fixed batch, avoiding special tokens

# name -> (config overrides, lr, predicate on the names of parameters allowed to change)
METHODS = {
    "dora": ({"method.type": "lora", "lora.use_dora": True}, 1e-2, lambda n: "lora_" in n),
    "rslora": ({"method.type": "lora", "lora.use_rslora": True, "lora.r": 16}, 1e-2, lambda n: "lora_" in n),
    "pissa": ({"method.type": "lora", "lora.init": "pissa"}, 1e-2, lambda n: "lora_" in n),
    "lora_plus": ({"method.type": "lora", "lora.lr_ratio": 16.0}, 1e-3, lambda n: "lora_" in n),
    "modules_to_save": ({"method.type": "lora", "lora.target_modules": ["q_proj", "v_proj"],
                         "lora.modules_to_save": ["lm_head"]}, 1e-2,
                        lambda n: "lora_" in n or "modules_to_save" in n),
    "qlora": ({"method.type": "qlora"}, 1e-2, lambda n: "lora_" in n),
    "prompt": ({"method.type": "prompt", "prompt.num_virtual_tokens": 4}, 3e-1, lambda n: "prompt_encoder" in n),
    "prompt_text": ({"method.type": "prompt", "prompt.num_virtual_tokens": 4, "prompt.init_text": "You are Aria."},
                    3e-1, lambda n: "prompt_encoder" in n),
    "prefix": ({"method.type": "prefix", "prompt.num_virtual_tokens": 4}, 3e-1, lambda n: "prompt_encoder" in n),
}


def make_cfg(tiny_dir, overrides: dict):
    return load_config(None, [], **{"data.datasets": [{"path": "x.jsonl"}], "model.name_or_path": str(tiny_dir),
                                    **overrides})


def sft_batch() -> dict:
    weights = torch.ones(IDS.shape)
    weights[:, 0] = 0.0
    return {"input_ids": IDS, "weights": weights, "position_ids": torch.arange(IDS.shape[1]).expand_as(IDS)}


def train(model, cfg, steps: int) -> list[float]:
    """AdamW on the SFT forward (the stages' path, with the method's own parameter groups)."""
    optim = torch.optim.AdamW(optimizer_groups(model, cfg.methods, cfg.optim.lr), lr=cfg.optim.lr, weight_decay=0.0)
    losses = []
    n_tokens = float(sft_batch()["weights"].sum())
    for _ in range(steps):
        loss, _ = sft_forward(model, sft_batch(), n_tokens)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits[:, -IDS.shape[1]:]  # prompt tuning prepends virtual positions


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_only_its_parameters_and_round_trips(tmp_path, tiny_dir, name):
    overrides, lr, allowed = METHODS[name]
    cfg = make_cfg(tiny_dir, {**overrides, "optim.lr": lr})
    model, tokenizer = load_base(cfg.model, "cpu", quantization_config(cfg.methods, "cpu"))
    model = apply_method(model, cfg.methods, base_model=cfg.model.name_or_path)  # prompt init_text: its tokenizer
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = train(model, cfg, steps=6)
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed and all(allowed(k) for k in changed), sorted(changed)

    run_dir = tmp_path / name
    save_model(model, tokenizer, run_dir)
    save_config(cfg, run_dir / "config.yaml")
    loaded, _, _ = load_model_for_inference(run_dir, device="cpu")
    disable_fast_lora(model)  # compare PEFT's forward with PEFT's (the fused one differs by float rounding only)
    disable_training_products(model)  # and torch's linear products with torch's
    # PiSSA is saved converted (rank 2r on the untouched base): equal up to float rounding.
    torch.testing.assert_close(logits(loaded), logits(model.eval()), rtol=0, atol=1e-5 if name == "pissa" else 1e-6)


def test_lora_plus_gives_b_its_own_lr(tiny_dir):
    cfg = make_cfg(tiny_dir, {"lora.lr_ratio": 16.0, "optim.lr": 1e-4})
    model = apply_method(load_base(cfg.model, "cpu")[0], cfg.methods)
    groups = optimizer_groups(model, cfg.methods, cfg.optim.lr)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_B" in names[id(p)] for p in groups[1]["params"]) and groups[1]["lr"] == pytest.approx(1.6e-3)
    assert all("lora_A" in names[id(p)] for p in groups[0]["params"])


def test_qlora_base_is_4bit_and_export_dequantises(tmp_path, tiny_dir):
    import bitsandbytes as bnb

    cfg = make_cfg(tiny_dir, {"method.type": "qlora"})
    model, tokenizer = load_base(cfg.model, "cpu", quantization_config(cfg.methods, "cpu"))
    model = apply_method(model, cfg.methods)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    train(model, cfg, steps=2)
    save_model(model, tokenizer, tmp_path / "run")
    save_config(cfg, tmp_path / "run" / "config.yaml")
    out = export_merged(tmp_path / "run", tmp_path / "export")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    assert "quantization_config" not in plain.config.to_dict()
    # The merged float model reproduces the 4-bit + adapter model up to the re-rounding of NF4 blocks.
    torch.testing.assert_close(logits(plain), logits(model.eval()), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_virtual_tokens_split_head_chat_and_no_export(tmp_path, tiny_dir, kind):
    from posttrain.records import Message
    from posttrain.models.generate import generate_reply

    cfg = make_cfg(tiny_dir, {"method.type": kind, "prompt.num_virtual_tokens": 3})
    model, tokenizer = load_base(cfg.model, "cpu")
    model = apply_method(model, cfg.methods)
    backbone, head = lm_head_and_backbone(model)
    mask = torch.ones_like(IDS)
    mask[1, 9:] = 0  # right padding in one row
    with torch.no_grad():
        expected = model(input_ids=IDS, attention_mask=mask).logits[:, -IDS.shape[1]:]
        got = head(backbone(input_ids=IDS, attention_mask=mask))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    reply = generate_reply(model.eval(), tokenizer, [Message(role="user", content="hi")], max_new_tokens=4)
    assert isinstance(reply, str)
    save_model(model, tokenizer, tmp_path / "run")
    save_config(cfg, tmp_path / "run" / "config.yaml")
    with pytest.raises(PosttrainError, match="virtual tokens"):
        export_merged(tmp_path / "run", tmp_path / "export")


def test_method_config_rules(tiny_dir):
    with pytest.raises(ConfigError, match="packing"):
        make_cfg(tiny_dir, {"method.type": "prefix", "data.packing": True})
    with pytest.raises(ConfigError, match="pissa"):
        make_cfg(tiny_dir, {"method.type": "qlora", "lora.init": "pissa"})
    with pytest.raises(ConfigError, match="init_text"):
        make_cfg(tiny_dir, {"method.type": "prefix", "prompt.init_text": "hello"})
    with pytest.raises(ConfigError, match="lisa"):
        make_cfg(tiny_dir, {"method.type": "lisa", "lisa.layers": 0})


PISSA_RUN = """
import sys
from posttrain.train.config import load_config
from posttrain.models.load import load_base
from posttrain.models.methods import apply_method
from posttrain.models.run import save_model

cfg = load_config(None, [], **{"data.datasets": [{"path": "x.jsonl"}], "model.name_or_path": sys.argv[1],
                                "lora.init": "pissa"})
base, tok = load_base(cfg.model, "cpu")
model = apply_method(base, cfg.methods)
save_model(model, tok, sys.argv[2])
print(model.posttrain_pissa_init)
"""


def test_pissa_init_folder_goes_away_with_the_model_and_at_exit(tmp_path, tiny_dir):
    """The initial adapter PiSSA's save conversion needs leaves no posttrain-pissa-init-* folder behind."""
    import gc
    import os
    import subprocess
    import sys
    from pathlib import Path

    base, tokenizer = load_base(make_cfg(tiny_dir, {}).model, "cpu")
    model = apply_method(base, make_cfg(tiny_dir, METHODS["pissa"][0]).methods)
    init_dir = Path(model.posttrain_pissa_init)
    save_model(model, tokenizer, tmp_path / "saved")
    assert init_dir.is_dir()  # still there for later saves (checkpoints, then the final model)
    del model, base
    gc.collect()
    assert not init_dir.exists()
    # a process that never drops its model (a training run) removes it at exit
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", PISSA_RUN, str(tiny_dir), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip().splitlines()[-1]).parent == temp  # it was made where we look
    assert (tmp_path / "run" / "adapter_config.json").is_file()
    assert list(temp.glob("posttrain-pissa-init-*")) == []


@pytest.mark.parametrize("kind,fused", [("full", True), ("lora", True), ("full", False)])
def test_training_products_are_switched_on_with_the_fast_paths(tiny_dir, monkeypatch, kind, fused):
    """apply_method gives plain linear layers oneDNN's training products (models/onednn_linear.py) unless the
    fast paths are off; the tiny model's layers are below MIN_DIM, so it is lowered here."""
    from posttrain.models import onednn_linear

    monkeypatch.setattr(onednn_linear, "MIN_DIM", 0)
    cfg = make_cfg(tiny_dir, {"method.type": kind})
    model, _ = load_base(cfg.model, "cpu", None)
    model = apply_method(model, cfg.methods, fused=fused)
    switched = [m for m in model.modules() if "forward" in m.__dict__ and type(m) is torch.nn.Linear]
    assert bool(switched) == fused
    if fused:  # every plain linear at least MIN_DIM wide: LoRA's base layers and the head included
        assert len(switched) == sum(type(m) is torch.nn.Linear for m in model.modules())
