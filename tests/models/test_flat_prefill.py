"""Prefill as one packed row (models/flat_prefill.py) against the padded prefill calls, for every model family it
takes: the same last-token logits and the same keys / values on every real position, rows in the same order;
and where it must not run."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
    Qwen3ForCausalLM)

from posttrain.models import decode as lean
from posttrain.models.decode import RaggedBatch, decode
from posttrain.models.flat_prefill import flat_prefill_ok


def small(cls, config_cls, **extra):
    """A 2-layer model with peaky attention (4x query / key weights): a wrong position or mask shows."""
    config = config_cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=False, **extra)
    torch.manual_seed(1)
    model = cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                param.mul_(4.0)
    return model.eval()


MODELS = {
    "llama": lambda: small(LlamaForCausalLM, LlamaConfig),
    "qwen2": lambda: small(Qwen2ForCausalLM, Qwen2Config),
    "qwen3": lambda: small(Qwen3ForCausalLM, Qwen3Config, head_dim=16),
    "mistral": lambda: small(MistralForCausalLM, MistralConfig, sliding_window=None),
}


def prompts_with_a_shared_head() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    head = torch.randint(5, 300, (20,), generator=g).tolist()
    tails = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (3, 9, 1, 6, 14)]
    return [head + t for t in tails] + [head + tails[1]]  # one prompt asked twice


def real_positions(batch: RaggedBatch) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per row, per layer: (keys, values) of the row's real columns, in order."""
    return [[(layer.keys[row][:, batch.mask[row] == 1], layer.values[row][:, batch.mask[row] == 1])
             for layer in batch.cache.layers] for row in range(len(batch))]


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("shared", [True, False])
def test_one_packed_row_prefills_what_padded_calls_do(family, shared, monkeypatch):
    model = MODELS[family]()
    prompts = prompts_with_a_shared_head()
    if not shared:  # no common prefix at all
        prompts = [[5 + i] + p for i, p in enumerate(prompts[:-1])] + [[6] + prompts[-1]]
    assert flat_prefill_ok(model, prompts)
    calls = []
    hook = model.register_forward_hook(lambda m, a, kw, out: calls.append(tuple(kw["input_ids"].shape)),
                                       with_kwargs=True)
    with torch.no_grad():
        flat = RaggedBatch(model, pad_id=0)
        flat_logits = flat.add(prompts)
        assert len(calls) == 1 and calls[0][0] == 1  # one forward, one row
        monkeypatch.setattr(lean, "flat_prefill_ok", lambda model, prompts: False)
        padded = RaggedBatch(model, pad_id=0)
        padded_logits = padded.add(prompts)
    hook.remove()
    torch.testing.assert_close(flat_logits, padded_logits, rtol=0, atol=2e-5)
    assert flat.positions.tolist() == padded.positions.tolist() == [len(p) - 1 for p in prompts]
    assert flat.mask.sum(1).tolist() == [len(p) for p in prompts]
    for flat_row, padded_row in zip(real_positions(flat), real_positions(padded)):
        for (k1, v1), (k2, v2) in zip(flat_row, padded_row):
            torch.testing.assert_close(k1, k2, rtol=0, atol=2e-5)
            torch.testing.assert_close(v1, v2, rtol=0, atol=2e-5)
    if shared:
        assert len(flat.prefixes) == 1 and len(next(iter(flat.prefixes))) == 20  # kept for later calls


@pytest.mark.parametrize("family", sorted(MODELS))
def test_greedy_decode_after_a_packed_prefill_equals_hf_generate(family):
    from transformers import GenerationConfig

    model = MODELS[family]()
    prompts = prompts_with_a_shared_head()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=2)
    rows = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, width:].tolist()
    expected = [r[: r.index(2) + 1] if 2 in r else r for r in rows]
    got = decode(model, prompts, max_new_tokens=8, stop_ids=[2], pad_id=0, pick=lambda logits, rows: logits.argmax(-1))
    assert got == expected


def test_not_taken_where_it_would_not_be_the_same_attention():
    prompts = prompts_with_a_shared_head()
    assert not flat_prefill_ok(MODELS["llama"](), prompts[:1])  # one prompt: nothing to pack
    windowed = small(MistralForCausalLM, MistralConfig, sliding_window=8)
    assert not flat_prefill_ok(windowed, prompts)  # prompts longer than the window
    assert flat_prefill_ok(windowed, [p[:8] for p in prompts])
    eager = MODELS["llama"]()
    eager.config._attn_implementation = "eager"
    assert not flat_prefill_ok(eager, prompts)
    assert not flat_prefill_ok(copy.deepcopy(MODELS["llama"]()).to("meta"), prompts)  # not on a CPU


def test_a_stored_prefix_is_reused_where_that_costs_less_than_one_packed_row(monkeypatch):
    """A serving batch keeps its template's prefix: two short prompts joining run on its keys and values (one
    padded call of their own tokens); prompts of very different lengths run as one packed row instead."""
    model = MODELS["llama"]()
    head = prompts_with_a_shared_head()[0][:20]
    batch = RaggedBatch(model, pad_id=0)
    with torch.no_grad():
        batch.add(prompts_with_a_shared_head())
        assert [len(key) for key in batch.prefixes] == [20]
        calls = []
        hook = model.register_forward_hook(lambda m, a, kw, out: calls.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
        short = [head + [7, 8], head + [9, 10]]
        short_logits = batch.add(short)
        assert calls == [(2, 2)]
        calls.clear()
        mixed = [head + list(range(30, 30 + n)) for n in (1, 30, 2, 29, 3, 28)]
        mixed_logits = batch.add(mixed)
        assert calls == [(1, 20 + 93)]  # 3 x 3 + 3 x 30 padded tokens in two calls would cost more
        hook.remove()
        monkeypatch.setattr(lean, "flat_prefill_ok", lambda model, prompts: False)
        alone = RaggedBatch(model, pad_id=0)
        torch.testing.assert_close(short_logits, alone.add(short), rtol=0, atol=2e-5)
        torch.testing.assert_close(mixed_logits, alone.add(mixed), rtol=0, atol=2e-5)
    assert len(batch) == 6 + 2 + 6  # a prompt asked twice still gets two rows


def test_a_peft_model_with_an_active_adapter_prefills_what_padded_calls_do(monkeypatch):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0: it changes q, v
    model = get_peft_model(MODELS["qwen2"](), lora).eval()
    prompts = prompts_with_a_shared_head()
    assert flat_prefill_ok(model, prompts)
    with torch.no_grad():
        flat = RaggedBatch(model, pad_id=0).add(prompts)
        monkeypatch.setattr(lean, "flat_prefill_ok", lambda model, prompts: False)
        padded = RaggedBatch(model, pad_id=0).add(prompts)
    torch.testing.assert_close(flat, padded, rtol=0, atol=2e-5)
