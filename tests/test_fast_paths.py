"""The optimised SFT paths give the losses and gradients of the naive ones.

Naive = what a plain HF causal LM does: padded rows with an attention mask, full-vocabulary
logits at every position, `labels` with -100 on prompt and padding. Optimised = posttrain's
packed rows (block-diagonal attention from position ids), LM head only at supervised positions,
chunked cross-entropy with recomputation. Benchmarks switch these off to show before/after.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import load_config
from posttrain.data.collate import collate
from posttrain.models.methods import apply_method
from posttrain.train.lm_forward import sft_forward
from test_loop import make_data


def lora_model(tiny_dir, tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path}", "lora.r=4"], **{"data.datasets": [{"path": "x.jsonl"}]})
    torch.manual_seed(0)
    model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), cfg)
    for name, p in model.named_parameters():  # LoRA B starts at zero: perturb so A gets gradients too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def grads_of(model, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach().item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def hf_naive_loss(model, ids, weights, pad_id=0):
    """Padded batch + attention mask + full logits + labels (-100 where no loss): HF's own loss."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    labels = torch.full((len(ids), width), -100)
    for b, (row, ws) in enumerate(zip(ids, weights)):
        input_ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
        labels[b, 1:len(row)] = torch.tensor([t if w else -100 for t, w in zip(row[1:], ws[1:])])
    return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss


def assert_same(a, b, tol=1e-5):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert abs(loss_a - loss_b) < tol, (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        err = (grads_a[name] - grads_b[name]).abs().max().item()
        scale = grads_a[name].abs().max().item()
        assert err <= tol * max(1.0, scale), (name, err, scale)


@pytest.mark.parametrize("chunk", [1024, 7])  # 7: several chunks, each recomputed in backward
def test_packed_supervised_head_matches_hf_naive(tiny_dir, tmp_path, chunk):
    ids, weights = make_data(6, seed=3)
    model = lora_model(tiny_dir, tmp_path)
    norm = float(sum(sum(1 for w in ws[1:] if w) for ws in weights))
    packed = collate([[0, 1, 2], [3, 4], [5]], ids, weights, pad_id=0)
    naive = grads_of(model, lambda: hf_naive_loss(model, ids, weights))
    fast = grads_of(model, lambda: sft_forward(model, packed, norm, chunk=chunk)[0])
    assert_same(naive, fast)


@pytest.mark.parametrize("packing", [False, True])
def test_supervised_head_matches_all_positions(tiny_dir, tmp_path, packing):
    ids, weights = make_data(5, seed=4)
    weights[0] = [w * 0.5 for w in weights[0]]  # non-unit loss weights take the same path
    model = lora_model(tiny_dir, tmp_path)
    norm = float(sum(sum(1 for w in ws[1:] if w) for ws in weights))
    units = [[0, 1], [2, 3, 4]] if packing else [[i] for i in range(5)]
    batch = collate(units, ids, weights, pad_id=0)
    full = grads_of(model, lambda: sft_forward(model, batch, norm, head_positions="all")[0])
    fast = grads_of(model, lambda: sft_forward(model, batch, norm, head_positions="supervised")[0])
    assert_same(full, fast)


def test_head_positions_key_is_validated(tmp_path):
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="head_positions"):
        load_config(None, ["train.head_positions=some"], **{"data.datasets": [{"path": "x.jsonl"}]})
