"""A hand-written decode step (one new token per row) for Llama-family models on the CPU, from oneDNN's weights.

Why: with its linear layers through oneDNN (models/onednn_linear.py), a SmolLM2 decode step of 8 rows over a
100-token cache took 27.8 ms in HF's forward, of which the products were 17.4: the rest is HF's general code
(a 4D mask built per step, rotary and norms as a dozen small ops each, GQA attention through SDPA with the
keys expanded). This step computes the same thing for the one case decoding needs: one query per row, q / k / v
and gate / up as one stacked product each (onednn_linear.FUSED), rotary for q and k in one pass, attention as
two batched products over the grouped heads with one additive mask for all layers, RMSNorm as torch's fused
op. Measured on the same job: 21.3-23.1 ms in three sittings (benchmarks/README.md, Generation). The cache is
the RaggedBatch's own (models/decode.py), written through its layers' `update`; prefill and anything else still
run HF's forward.

Only where the result is the same computation as HF's modeling code: the LlamaForCausalLM / Qwen2 / Mistral
classes of transformers 5.x checked by name, SiLU MLP, full attention (no sliding window), no LoRA active
(PEFT wrappers with adapters switched off or merged are looked through), linear layers swapped to oneDNN
(fp32 on a CPU). Greedy tokens equal HF `generate`'s (tests/models/test_generate_engine.py, and every row of
benchmarks/generate_speed.py); logits differ by rounding (other summation orders, ~1e-5 on SmolLM2).
`POSTTRAIN_DECODE_STEP=0` keeps HF's forward for every step (an A/B switch, and a way out).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from posttrain.models.onednn_linear import FusedSiblings, packed_product

ENV = "POSTTRAIN_DECODE_STEP"  # "0": HF's forward at every step
_LAYERS = {"LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer"}
_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"}  # weight * (x * rsqrt(mean(x^2) + eps)), fp32 here


def _plain(module: nn.Module) -> nn.Module | None:
    """The linear layer a projection computes with now: itself, or the base layer of a PEFT LoRA wrapper whose
    adapters are off or merged; None while an adapter is active."""
    if type(module) is nn.Linear:
        return module
    if hasattr(module, "get_base_layer") and (getattr(module, "disable_adapters", False)
                                              or getattr(module, "merged", False)):
        base = module.get_base_layer()
        return base if type(base) is nn.Linear else None
    return None


class DecodeStep:
    """`DecodeStep.of(model)` or None; `step(tokens, mask, positions, cache)` -> (B, V) float logits. Each layer's
    weights and constants are looked up once (`of`): attribute lookups through nn.Module cost about as much as a
    small op, 1.6 ms of a 22 ms step when done per layer per step."""

    def __init__(self, lm: nn.Module, layers: list[tuple], first: FusedSiblings):
        self.lm, self.body, self.layers, self.first = lm, lm.model, layers, first
        self.heads, self.kv_heads = lm.config.num_attention_heads, lm.config.num_key_value_heads
        self.head = _plain(lm.lm_head)
        self.greedy_head = self.head.__dict__.get("_greedy_head")  # models/greedy_head.py, where the CPU has bf16

    @staticmethod
    def of(model: nn.Module) -> DecodeStep | None:
        """The step for `model` if it can run it as it is now, else None."""
        if os.environ.get(ENV, "1") == "0":
            return None
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        body = getattr(lm, "model", None)
        config = getattr(lm, "config", None)
        if (body is None or config is None or getattr(config, "hidden_act", None) != "silu"
                or not all(hasattr(body, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb"))
                or type(body.norm).__name__ not in _NORMS or torch.is_grad_enabled()
                or not _packed(_plain(getattr(lm, "lm_head", None)))):
            return None
        layers = []
        for layer in body.layers:
            if (type(layer).__name__ not in _LAYERS or getattr(layer.self_attn, "sliding_window", None)
                    or type(layer.input_layernorm).__name__ not in _NORMS
                    or type(layer.post_attention_layernorm).__name__ not in _NORMS):
                return None
            attn, mlp = layer.self_attn, layer.mlp
            q, k, v, o = (_plain(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            gate, up, down = (_plain(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj"))
            if not (_fused(q, k, v) and _fused(gate, up) and _packed(o) and _packed(down)):
                return None
            norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
            layers.append((norm1.weight, norm1.variance_epsilon, q._onednn_fused, attn.scaling, o,
                           norm2.weight, norm2.variance_epsilon, gate._onednn_fused, down))
        return DecodeStep(lm, layers, layers[0][2]) if layers else None

    def still_valid(self) -> bool:
        """Whether the model is still as `of` found it, checked cheaply on its first layer: the same oneDNN
        copies (not swapped out and in again), no adapter switched on, gradients off."""
        q = _plain(self.body.layers[0].self_attn.q_proj)
        return q is not None and q.__dict__.get("_onednn_fused") is self.first and not torch.is_grad_enabled()

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """tokens (B,) the last token of each row, mask (B, T) long with this token's column, positions (B,) its
        position; appends each layer's key / value to `cache`."""
        return packed_product(self.hidden(tokens, mask, positions, cache), self.head).float()

    def greedy(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """As `step`, but (B,) the argmax of each row's logits (from the head's bfloat16 copy where it has one)."""
        hidden = self.hidden(tokens, mask, positions, cache)
        if self.greedy_head is not None:
            return self.greedy_head.argmax(hidden)
        return packed_product(hidden, self.head).argmax(-1)

    def hidden(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """(B, D) the final norm's output, which the head multiplies."""
        b, nh, nkv = tokens.shape[0], self.heads, self.kv_heads
        g = nh // nkv
        x = self.body.embed_tokens(tokens)  # (B, D)
        cos, sin = self.body.rotary_emb(x, positions[:, None])  # (B, 1, hd) each, attention scaling applied
        hd = cos.shape[-1]
        half, qk_width = hd // 2, (nh + nkv) * hd
        cos, sin = cos[:, None, 0], sin[:, None, 0]  # (B, 1, hd)
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # rotate_half's sign folded in
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(mask == 0, float("-inf"))
        bias = bias[:, None, None, :].expand(b, nkv, g, -1).reshape(b * nkv, g, -1)  # (B * kv, G, T)
        for (w1, eps1, qkv_of, scaling, o, w2, eps2, gate_up_of, down), layer_cache in zip(self.layers, cache.layers):
            qkv = qkv_of(F.rms_norm(x, w1.shape, w1, eps1))  # (B, (nh + 2 nkv) hd)
            qk = qkv[:, :qk_width].view(b, nh + nkv, hd)
            qk = qk * cos + qk.view(b, nh + nkv, 2, half).flip(-2).view(b, nh + nkv, hd) * sin  # rotary
            keys, values = layer_cache.update(qk[:, nh:, None], qkv[:, qk_width:].view(b, nkv, 1, hd))
            scores = torch.baddbmm(bias, qk[:, :nh].reshape(b * nkv, g, hd),
                                   keys.reshape(b * nkv, -1, hd).transpose(1, 2), alpha=scaling)
            out = torch.bmm(torch.softmax(scores, dim=-1), values.reshape(b * nkv, -1, hd))  # (B * kv, G, hd)
            x = x + packed_product(out.view(b, nh * hd), o)
            gate_up = gate_up_of(F.rms_norm(x, w2.shape, w2, eps2))
            inter = gate_up.shape[-1] // 2
            x = x + packed_product(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], down)
        w, eps = self.body.norm.weight, self.body.norm.variance_epsilon
        return F.rms_norm(x, w.shape, w, eps)


def _packed(layer: nn.Module | None) -> bool:
    return layer is not None and layer.__dict__.get("_onednn_weight") is not None


def _fused(*members: nn.Module | None) -> bool:
    """These layers share one stacked packed weight, in this order."""
    fused = [None if m is None else m.__dict__.get("_onednn_fused") for m in members]
    return (isinstance(fused[0], FusedSiblings) and all(f is fused[0] for f in fused)
            and [m._onednn_index for m in members] == list(range(len(members))))
