"""The greedy head (models/greedy_head.py): the argmax of the float32 logits from a bfloat16 copy, exactly; and
its use by greedy decode calls (models/decode.py, models/onednn_linear.swap_in)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.models import greedy_head, onednn_linear
from posttrain.models.decode import decode, greedy
from posttrain.models.greedy_head import GreedyHead
from posttrain.models.onednn_linear import onednn_linears

# oneDNN has no bfloat16 products on AVX2-only CPUs (Zen 3): posttrain never builds a greedy head there
# (`cpu_has_fast_bf16`, tested below on every machine), so these tests need a CPU that has them
needs_bf16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                reason="no oneDNN bfloat16 products on this CPU")


def near_ties(vocab: int = 1000, dim: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A head whose rows come in near-duplicate pairs (and one exact duplicate), and hidden states of several
    scales: many rows' top two logits are closer than bfloat16 can tell apart."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(vocab // 2, dim, generator=g)
    weight = torch.cat([base, base + 1e-3 * torch.randn(base.shape, generator=g)])[torch.randperm(vocab, generator=g)]
    weight[3, 0] = weight[vocab - 1, 0] = 100.0  # an exact tie on the first input: argmax takes the lower index
    x = torch.cat([torch.randn(64, dim, generator=g) * scale for scale in (0.1, 1.0, 30.0)])
    x[:8] = 0.0
    x[:8, 0] = 1.0  # logits = the first column, exactly: the tied two are the best
    return weight.contiguous(), x


@needs_bf16
def test_argmax_equals_the_float32_argmax_on_near_ties_at_every_batch_size():
    weight, x = near_ties()
    head = GreedyHead(weight)
    for b in (1, 3, 8, 32):
        for start in range(0, len(x) - b + 1, b):
            rows = x[start:start + b]
            assert torch.equal(head.argmax(rows), F.linear(rows, weight).argmax(-1))
    assert head.argmax(x[:8]).tolist() == [3] * 8


@needs_bf16
def test_the_bound_holds_and_without_it_the_bfloat16_argmax_is_wrong(monkeypatch):
    weight, x = near_ties(seed=1)
    approx = torch.ops.mkldnn._linear_pointwise(x.bfloat16(), GreedyHead(weight).packed, None, "none", [], "")
    exact = F.linear(x.double(), weight.double())
    bound = torch.linalg.vector_norm(x, dim=1, keepdim=True) * torch.linalg.vector_norm(weight, dim=1) * \
        greedy_head.SLACK
    assert ((approx.double() - exact).abs() <= bound).all()
    assert (approx.float().argmax(-1) != exact.argmax(-1)).sum() > 5  # the bfloat16 logits alone pick wrongly
    monkeypatch.setattr(greedy_head, "SLACK", 0.0)  # no bound: the candidates are the bfloat16 argmax alone
    unbounded = GreedyHead(weight)
    assert sum(int(unbounded.argmax(x[i:i + 1])) != int(exact[i].argmax()) for i in range(len(x))) >= 1


@needs_bf16
def test_a_vocabulary_not_a_multiple_of_the_block_and_a_nan_row():
    weight, x = near_ties(vocab=1078, seed=2)  # 16 blocks of 64 and a part
    head = GreedyHead(weight)
    assert torch.equal(head.argmax(x), F.linear(x, weight).argmax(-1))
    x[5, 0] = float("nan")
    assert torch.equal(head.argmax(x[:8]), F.linear(x[:8], weight).argmax(-1))  # the full product's answer


@needs_bf16
def test_of_only_for_a_plain_bias_free_float32_cpu_head(monkeypatch):
    monkeypatch.setattr(greedy_head, "cpu_has_fast_bf16", lambda: True)
    assert GreedyHead.of(nn.Linear(96, 500, bias=False)) is not None
    assert GreedyHead.of(nn.Linear(96, 500)) is None  # a bias
    assert GreedyHead.of(nn.Linear(96, 500, bias=False).double()) is None
    assert GreedyHead.of(nn.Linear(32, 500, bias=False)) is None  # narrower than MIN_DIM
    assert GreedyHead.of(None) is None


def test_a_cpu_without_bfloat16_keeps_the_float32_head(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_BYTES", 0)
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 0)
    monkeypatch.setattr(greedy_head, "cpu_has_fast_bf16", lambda: False)  # Zen 3: the float32 head is faster there
    head = nn.Linear(96, 500, bias=False)
    assert GreedyHead.of(head) is None
    model = nn.Sequential(nn.Linear(96, 96), head)
    model.get_output_embeddings = lambda: head
    with onednn_linears(model, head="greedy"):
        assert "_greedy_head" not in head.__dict__ and head._onednn_weight.is_mkldnn  # packed float32, as before


@pytest.fixture
def llama(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_BYTES", 0)
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 0)
    monkeypatch.setattr(greedy_head, "cpu_has_fast_bf16", lambda: True)  # on every machine, bfloat16 or not
    config = LlamaConfig(vocab_size=700, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(3)
    return LlamaForCausalLM(config).eval()


@needs_bf16
def test_greedy_decode_picks_through_the_greedy_head_with_hf_generates_tokens(llama, monkeypatch):
    calls, real = [], GreedyHead.argmax
    monkeypatch.setattr(GreedyHead, "argmax", lambda self, x: calls.append(len(x)) or real(self, x))
    torch.manual_seed(4)
    prompts = [torch.randint(3, 700, (n,)).tolist() for n in (5, 9, 7)]
    ours = decode(llama, prompts, max_new_tokens=12, stop_ids=[], pad_id=0, pick=greedy)
    assert calls and sum(calls) == 3 * 11  # every step after the prefill's token
    for prompt, row in zip(prompts, ours):
        hf = llama.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert row == hf[0, len(prompt):].tolist()
    sampled = decode(llama, prompts, max_new_tokens=4, stop_ids=[], pad_id=0,
                     pick=lambda logits, rows: logits.argmax(-1))  # any other picker sees the float32 logits
    assert sum(calls) == 3 * 11 and [r[:4] for r in ours] == sampled


@needs_bf16
def test_swap_in_greedy_only_keeps_the_dense_head_and_swap_out_drops_the_copy(llama):
    head = llama.lm_head
    with onednn_linears(llama, head="greedy"):
        assert head._onednn_weight is not None and head._onednn_weight.data_ptr() == head.weight.data_ptr()
        assert isinstance(head._greedy_head, GreedyHead)
        x = torch.randn(2, 96)
        torch.testing.assert_close(head(x), F.linear(x, head.weight), rtol=1e-5, atol=1e-5)  # prefill's logits
    assert "_greedy_head" not in head.__dict__ and "_onednn_weight" not in head.__dict__
    with onednn_linears(llama):  # the default: no greedy head, the head packed
        assert "_greedy_head" not in head.__dict__ and head._onednn_weight.is_mkldnn
