"""The hand-written decode step (models/decode_step.py) against HF's own forward: the same logits up to rounding
over several steps of a ragged batch, for Llama and Qwen2 (q/k/v biases); used only where it is HF's computation."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
    Qwen3ForCausalLM)

from posttrain.models import decode_step, onednn_linear
from posttrain.models.decode import decode
from posttrain.models.kv_cache import growing_cache
from posttrain.models.decode_step import DecodeStep
from posttrain.models.onednn_linear import onednn_linears


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_BYTES", 0)  # the tiny models are far below the size it pays from
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 0)


def sharpened(model):
    """Peaky attention (4x query / key weights), so a wrong position, mask or rotary shows in the logits."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                param.mul_(4.0)
    return model.eval()


def small(cls, config_cls, **extra):
    config = config_cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=False, **extra)
    torch.manual_seed(1)
    return sharpened(cls(config))


def hf_and_lean_logits(model, steps: int = 6):
    """(HF forward's, DecodeStep's) logits of `steps` greedy steps after a left-padded prefill of 3 rows."""
    torch.manual_seed(2)
    ids = torch.randint(5, 300, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4], mask[2, :1] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = []
    for _ in range(2):
        cache = growing_cache(model.config)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        caches.append(cache)
    step = DecodeStep.of(model)
    assert step is not None
    tokens, position, hf, lean = ids[:, -1], positions[:, -1], [], []
    for _ in range(steps):
        mask, position = torch.cat([mask, mask.new_ones(3, 1)], dim=1), position + 1
        hf.append(model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position[:, None],
                        past_key_values=caches[0], use_cache=True).logits[:, -1])
        lean.append(step.step(tokens, mask, position, caches[1]))
        tokens = hf[-1].argmax(-1)
    return torch.stack(hf), torch.stack(lean)


@pytest.mark.parametrize("family", ["llama", "llama_biases", "qwen2", "mistral"])
def test_the_step_computes_hf_s_logits(family, tiny):
    model = {"llama": lambda: sharpened(tiny[0]),
             "llama_biases": lambda: small(LlamaForCausalLM, LlamaConfig, attention_bias=True, mlp_bias=True),
             "qwen2": lambda: small(Qwen2ForCausalLM, Qwen2Config),
             "mistral": lambda: small(MistralForCausalLM, MistralConfig, sliding_window=None)}[family]()
    if family in ("llama_biases", "qwen2"):
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # biases go through the stacked product
    with torch.no_grad(), onednn_linears(model):
        hf, lean = hf_and_lean_logits(model)
    torch.testing.assert_close(lean, hf, rtol=1e-5, atol=1e-5)  # other summation orders only
    assert torch.equal(lean.argmax(-1), hf.argmax(-1))
    assert (hf[1:] - hf[:-1]).abs().amax() > 0.1  # steps whose logits differ by far more than the tolerance


def test_decode_uses_it_and_gives_generate_s_tokens(tiny, monkeypatch):
    model = sharpened(tiny[0])
    steps, real = [], DecodeStep.step
    monkeypatch.setattr(DecodeStep, "step", lambda self, *a: steps.append(1) or real(self, *a))
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 21]]
    got = decode(model, prompts, max_new_tokens=12, stop_ids=[], pad_id=0, pick=lambda logits, rows: logits.argmax(-1))
    assert len(steps) == 11  # every step after the prefill
    monkeypatch.setattr(DecodeStep, "of", staticmethod(lambda model: None))
    assert decode(model, prompts, max_new_tokens=12, stop_ids=[], pad_id=0,
                  pick=lambda logits, rows: logits.argmax(-1)) == got  # HF's forward at every step


def test_only_where_it_is_hf_s_computation(tiny, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = sharpened(tiny[0])
    with torch.no_grad():
        assert DecodeStep.of(model) is None  # not swapped to oneDNN (float32 on a CPU): HF's forward
    with onednn_linears(model):
        assert DecodeStep.of(model) is None  # gradients on
        with torch.no_grad():
            step = DecodeStep.of(model)
            assert step is not None and step.still_valid()
            monkeypatch.setenv(decode_step.ENV, "0")
            assert DecodeStep.of(model) is None  # switched off
            monkeypatch.delenv(decode_step.ENV)
    with torch.no_grad():
        assert not step.still_valid()  # swapped out since
    qwen3 = small(Qwen3ForCausalLM, Qwen3Config, head_dim=16)  # q / k norms: another computation
    with torch.no_grad(), onednn_linears(qwen3):
        assert DecodeStep.of(qwen3) is None
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: it changes q, v
    peft = get_peft_model(copy.deepcopy(model), lora)
    with torch.no_grad(), onednn_linears(peft):
        assert DecodeStep.of(peft) is None  # an active adapter adds to q and v
        with peft.disable_adapter():
            assert DecodeStep.of(peft) is not None  # the base layers, stacked under the wrappers
            hf, lean = hf_and_lean_logits(peft)
    torch.testing.assert_close(lean, hf, rtol=1e-5, atol=1e-5)


def test_a_failed_check_is_remembered_for_the_batch(tiny, monkeypatch):
    """A model the step cannot run is checked once per batch, not at every step."""
    model = sharpened(tiny[0])
    looks = []
    monkeypatch.setattr(DecodeStep, "of", staticmethod(lambda m: looks.append(1) or None))
    decode(model, [[5, 6, 7]], max_new_tokens=6, stop_ids=[], pad_id=0, pick=lambda logits, rows: logits.argmax(-1))
    assert len(looks) == 1
