"""Fine-tuning methods on the tiny model: exactly the right weights train, and the split head matches."""

import pytest
import torch

from posttrain.train.config import RunConfig
from posttrain.errors import ConfigError
from posttrain.models.anatomy import find_layers, lm_head_and_backbone
from posttrain.models.config import Methods
from posttrain.models.methods import apply_method, count_parameters


def _model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


def _cfg(method: str, **sections) -> Methods:
    cfg = RunConfig()
    cfg.method.type = method
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg.methods


def _batch(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(3, 500, (2, 12))  # (B, T), avoiding the special tokens


def _train_step(model) -> dict[str, torch.Tensor]:
    """One AdamW step on a plain LM loss; returns the state dict from before the step."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW moves every parameter with a nonzero gradient by about lr, and none without one.
    optim = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids = _batch()
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    return before


def _changed(model, before) -> set[str]:
    after = model.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def test_lora_trains_only_adapters(tiny_dir):
    model = apply_method(_model(tiny_dir), _cfg("lora"))
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    before = _train_step(model)
    changed = _changed(model, before)
    assert changed and all("lora_" in k for k in changed)
    # B starts at zero, so the first step moves every B and (its gradient being zero) no A.
    lora_b = {k for k in before if "lora_B" in k}
    assert lora_b <= changed
    # all-linear adapts every projection of every block but never the output head.
    assert any("mlp.down_proj.lora_B" in k for k in lora_b) and not any("lm_head" in k for k in lora_b)


def test_lora_keeps_input_embeddings(tiny_dir):
    model = apply_method(_model(tiny_dir), _cfg("lora"))
    emb = model.get_input_embeddings()
    assert isinstance(emb, torch.nn.Embedding) and emb.weight.shape[1] == 64


def test_lora_explicit_targets(tiny_dir):
    model = apply_method(_model(tiny_dir), _cfg("lora", lora__target_modules=["q_proj", "v_proj"]))
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k, _ in model.named_parameters() if "lora_" in k}
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(ConfigError, match="target_modules"):
        apply_method(_model(tiny_dir), _cfg("lora", lora__target_modules=["no_such_proj"]))


def test_full_trains_everything(tiny_dir):
    model = apply_method(_model(tiny_dir), _cfg("full"))
    trainable, total = count_parameters(model)
    assert trainable == total
    before = _train_step(model)
    assert _changed(model, before) == set(before)


def test_freeze_trains_last_layers_and_named_modules(tiny_dir):
    cfg = _cfg("freeze", freeze__trainable_layers=1, freeze__trainable_modules=["norm"])
    model = apply_method(_model(tiny_dir), cfg)
    assert find_layers(model)[0] == "model.layers"
    before = _train_step(model)
    expected = {k for k in before if k.startswith("model.layers.1.") or "norm" in k}
    assert "model.layers.0.input_layernorm.weight" in expected
    assert _changed(model, before) == expected
    assert count_parameters(model)[0] == sum(before[k].numel() for k in expected)


def test_freeze_layers_only(tiny_dir):
    model = apply_method(_model(tiny_dir), _cfg("freeze", freeze__trainable_layers=1))
    before = _train_step(model)
    assert _changed(model, before) == {k for k in before if k.startswith("model.layers.1.")}


def test_freeze_nothing_to_train_is_an_error(tiny_dir):
    with pytest.raises(ConfigError, match="nothing would train"):
        apply_method(_model(tiny_dir), _cfg("freeze", freeze__trainable_layers=0))
    with pytest.raises(ConfigError, match="nothing would train"):
        apply_method(_model(tiny_dir), _cfg("freeze", freeze__trainable_layers=0,
                                            freeze__trainable_modules=["no_such_module"]))


@pytest.mark.parametrize("method", ["lora", "full", "freeze"])
def test_split_head_matches_logits(tiny_dir, method):
    model = apply_method(_model(tiny_dir), _cfg(method))
    _train_step(model)  # nonzero LoRA B, so the adapters take part in the comparison
    backbone, head = lm_head_and_backbone(model)
    ids = _batch(seed=1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row: the mask must reach the decoder
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        hidden = backbone(input_ids=ids, attention_mask=mask)  # (B, T, H)
        got = head(hidden)
    assert hidden.shape == (2, 12, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
