"""The oneDNN products of decoding (posttrain/models/onednn_linear.py): close to F.linear, used only where
meant (no gradients, no autocast, float32 CPU layers, not switched off), and gone after the context."""

import pytest
import torch
from torch import nn

from posttrain.models import onednn_linear
from posttrain.models.onednn_linear import ENV, onednn_linears, swap_in, swap_out


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_BYTES", 0)  # these layers are far below the size it pays from
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 0)


def model_of(bias: bool, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 160, bias=bias), nn.Linear(160, 48, bias=bias)).to(dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5, 37])
def test_products_match_f_linear_and_the_layers_come_back(bias, rows):
    model = model_of(bias)
    x = torch.randn(2, rows, 96)
    with torch.no_grad():
        want = model(x)
        with onednn_linears(model):
            assert all("_onednn_weight" in m.__dict__ for m in model)  # really swapped
            got = model(x)
        assert not any(k in m.__dict__ for m in model for k in ("forward", "_onednn_weight", "_onednn_bias"))
        again = model(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the same products, summed in another order
    assert torch.equal(again, want)


def test_gradients_and_autocast_take_the_default_path():
    model = model_of(True)
    x = torch.randn(4, 96)
    want = model(x)
    with onednn_linears(model):
        got = model(x)  # gradients on: F.linear itself, differentiable
        assert torch.equal(got, want) and got.requires_grad
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16  # autocast's precision, not the float32 oneDNN product


def test_not_swapped_when_switched_off_nested_or_not_float32(monkeypatch):
    assert swap_in(model_of(False, torch.bfloat16)) == []
    model = model_of(False)
    layers = swap_in(model)
    assert len(layers) == 2 and swap_in(model) == []  # an inner context leaves the outer copies alone
    swap_out(layers)
    monkeypatch.setenv(ENV, "0")
    assert swap_in(model) == []
    monkeypatch.delenv(ENV)
    monkeypatch.setattr(onednn_linear, "MIN_BYTES", 1 << 20)
    assert swap_in(model) == []  # 77 KB of weights: not worth it


def test_thin_layers_such_as_lora_factors_are_left_alone(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 128)
    model = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 8), nn.Linear(8, 256))  # a rank-8 pair after a layer
    layers = swap_in(model)
    assert layers == [model[0]]
    swap_out(layers)



def spy(monkeypatch) -> list:
    calls = []
    real = onednn_linear._pointwise
    monkeypatch.setattr(onednn_linear, "_pointwise", lambda *a: calls.append(a[1].shape) or real(*a))
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_training_products_match_matmul_from_the_weight_or_its_transposed_view(bias, monkeypatch):
    """`product`, the fused LoRA linear's and the fused head's products: x W^T and g W (through W.t(), no copy)."""
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 128)
    calls = spy(monkeypatch)
    torch.manual_seed(3)
    weight, b = torch.randn(256, 192), (torch.randn(256) if bias else None)
    x, g = torch.randn(37, 192), torch.randn(37, 256)
    torch.testing.assert_close(onednn_linear.product(x, weight, b), nn.functional.linear(x, weight, b),
                               rtol=1e-5, atol=1e-4)  # sums of 192 terms of size ~1: rounding of another order
    torch.testing.assert_close(onednn_linear.product(g, weight.t()), g @ weight, rtol=1e-5, atol=1e-4)
    assert calls == [(256, 192), (192, 256)]  # both through oneDNN


def test_training_products_fall_back_when_thin_not_float32_or_switched_off(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 128)
    calls = spy(monkeypatch)
    torch.manual_seed(4)
    weight, x = torch.randn(256, 192), torch.randn(9, 192)
    thin = torch.randn(8, 192)  # a LoRA factor
    assert torch.equal(onednn_linear.product(x, thin), x @ thin.t())
    half = onednn_linear.product(x.bfloat16(), weight.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.equal(half, x.bfloat16() @ weight.bfloat16().t())
    monkeypatch.setenv(ENV, "0")
    assert torch.equal(onednn_linear.product(x, weight), x @ weight.t())
    assert calls == []


@pytest.mark.parametrize("bias", [False, True])
def test_training_forward_gives_f_linear_values_and_gradients(bias, monkeypatch):
    """`enable_training_products` (full, freeze, LISA, the base of PEFT's unfused LoRA): forward, input, weight and
    bias gradients of F.linear, the products through oneDNN; few rows and autocast keep torch's path."""
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 128)
    torch.manual_seed(5)
    layer = nn.Linear(192, 256, bias=bias)
    ref = nn.Linear(192, 256, bias=bias)
    ref.load_state_dict(layer.state_dict())
    assert onednn_linear.enable_training_products(nn.Sequential(layer)) == 1
    x = torch.randn(3, 50, 192) / 192 ** 0.5  # 150 rows
    upstream = torch.randn(3, 50, 256)
    calls = spy(monkeypatch)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    got, want = layer(xs[0]), ref(xs[1])
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-5)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    assert calls == [(256, 192), (192, 256), (192, 150)]  # x W^T, g W, g^T x
    for a, b in [(xs[0].grad, xs[1].grad), (layer.weight.grad, ref.weight.grad)] + (
            [(layer.bias.grad, ref.bias.grad)] if bias else []):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-5)
    calls.clear()
    layer(torch.randn(8, 192))  # a decode-sized product
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert calls == []
    onednn_linear.disable_training_products(nn.Sequential(layer))
    assert "forward" not in layer.__dict__


def test_decoding_inside_training_gives_the_training_forward_back(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 128)
    model = nn.Sequential(nn.Linear(256, 256))
    onednn_linear.enable_training_products(model)
    training_forward = model[0].forward
    with onednn_linears(model):
        assert model[0].forward != training_forward  # the decode copies' forward
    assert model[0].forward == training_forward


def test_training_forward_of_a_frozen_layer_keeps_no_input(monkeypatch):
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 128)
    layer = nn.Linear(192, 256).requires_grad_(False)
    onednn_linear.enable_training_products(nn.Sequential(layer))
    x = torch.randn(150, 192, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert saved == [(256, 192)]  # only the weight, for the input gradient
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, torch.ones(150, 256) @ layer.weight, rtol=2e-6, atol=1e-5)


def test_a_torch_without_onednn_keeps_torchs_path(monkeypatch):
    """Builds without oneDNN (macOS arm64) have no `_linear_pointwise`: nothing is swapped, every product is torch's."""
    monkeypatch.setattr(onednn_linear, "_ON", False)
    monkeypatch.setattr(onednn_linear, "_pointwise", None)
    model = model_of(True)
    assert swap_in(model) == [] and onednn_linear.enable_training_products(model) == 0
    weight, rows = torch.randn(256, 192), torch.randn(150, 192)
    assert torch.equal(onednn_linear.product(rows, weight), rows @ weight.t())


class Siblings(nn.Module):
    """An attention-like parent: q / k / v read the same input (onednn_linear.FUSED), o does not."""

    def __init__(self, bias: bool):
        super().__init__()
        torch.manual_seed(6)
        self.q_proj, self.k_proj = nn.Linear(96, 160, bias), nn.Linear(96, 32, bias)
        self.v_proj = nn.Linear(96, 32, bias)
        self.o_proj = nn.Linear(160, 96, bias)


@pytest.mark.parametrize("bias", [False, True])
def test_siblings_share_one_stacked_product_in_any_call_order(bias, monkeypatch):
    model = Siblings(bias)
    x, other = torch.randn(3, 5, 96), torch.randn(3, 5, 96)
    with torch.no_grad():
        want = {n: getattr(model, n)(x) for n in ("q_proj", "k_proj", "v_proj")}
        want_other = model.k_proj(other)
        with onednn_linears(model):
            fused = model.q_proj.__dict__["_onednn_fused"]
            assert fused is model.v_proj.__dict__["_onednn_fused"] and "_onednn_fused" not in model.o_proj.__dict__
            calls = spy(monkeypatch)
            got = {n: getattr(model, n)(x) for n in ("q_proj", "k_proj", "v_proj")}  # HF's order
            assert calls == [(224, 96)] and fused.pending is None  # one product, every part taken
            shuffled = {n: getattr(model, n)(x) for n in ("v_proj", "q_proj", "k_proj")}
            assert torch.equal(model.k_proj(other), model.k_proj(other))  # another input: computed afresh, twice
            got_other = model.k_proj(other)
            again = model.q_proj(x)
            x.mul_(2.0)  # changed in place since: not the same input any more
            doubled = model.k_proj(x)
            assert len(calls) == 7  # HF order, shuffled, other x3, again, doubled
        assert not any(k in m.__dict__ for m in model.children() for k in ("forward", "_onednn_fused", "_onednn_index"))
    for name, value in want.items():
        assert got[name].is_contiguous() and got[name].shape == value.shape
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5)
        assert torch.equal(shuffled[name], got[name])
    torch.testing.assert_close(got_other, want_other, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, got["q_proj"])
    torch.testing.assert_close(doubled, 2 * want["k_proj"] - (model.k_proj.bias if bias else 0), rtol=1e-5,
                               atol=1e-5)


def test_siblings_under_inference_mode_compute_each_layer_s_own_product():
    """Inference tensors keep no version counter, so a stacked product is not shared between the members there."""
    model = Siblings(True)
    x = torch.randn(2, 7, 96)
    with torch.no_grad():
        want = [model.q_proj(x), model.v_proj(x)]
    with torch.inference_mode(), onednn_linears(model):
        inner = x.clone()  # made in inference mode, as a model's hidden states would be
        got = [model.q_proj(inner), model.v_proj(inner)]
        assert model.q_proj.__dict__["_onednn_fused"].pending is None
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
