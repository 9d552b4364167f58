"""The optimised training paths give the losses and gradients of the naive ones.

Naive = what a plain HF causal LM with PEFT does: padded rows with an attention mask, PEFT's own
LoRA forward, full-vocabulary logits at every position, `labels` with -100 on prompt and padding.
Optimised = posttrain's packed rows (block-diagonal attention from position ids), fused LoRA
linears (models/fast_lora.py), the LM head only at supervised positions with log-probs and their
gradient formed chunk by chunk (models/head_logps.py). Benchmarks switch these off for before/after.
"""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from posttrain.train.config import load_config
from posttrain.data.collate import collate
from posttrain.models.fast_lora import disable_fast_lora, enable_fast_lora
from posttrain.models.methods import apply_method
from posttrain.models.head_logps import token_logps
from posttrain.models.forward import sft_forward

from conftest import make_data


def lora_model(tiny_dir, tmp_path, *extra, fused: bool = True):
    cfg = load_config(None, [f"output.dir={tmp_path}", "lora.r=4", "model.name_or_path=tiny-random", *extra],
                      **{"data.datasets": [{"path": "x.jsonl"}]})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    model = apply_method(base, cfg.methods, fused=fused)
    for name, p in model.named_parameters():  # LoRA B starts at zero: perturb so A gets gradients too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def grads_of(model, loss_fn, fast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients with the fused LoRA forward switched on or off."""
    enable_fast_lora(model) if fast else disable_fast_lora(model)
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


@pytest.mark.parametrize("chunk", [1024, 7])  # 7: several chunks of the head
def test_packed_fused_path_matches_hf_naive(tiny_dir, tmp_path, chunk):
    ids, weights = make_data(6, seed=3)
    model = lora_model(tiny_dir, tmp_path)
    norm = float(sum(sum(1 for w in ws[1:] if w) for ws in weights))
    packed = collate([[0, 1, 2], [3, 4], [5]], ids, weights, pad_id=0)
    naive = grads_of(model, lambda: hf_naive_loss(model, ids, weights), fast=False)
    fast = grads_of(model, lambda: sft_forward(model, packed, norm, chunk=chunk)[0], fast=True)
    assert_same(naive, fast)


@pytest.mark.parametrize("fused", [False, True])  # plain head path (chunks recomputed) and the fused one
@pytest.mark.parametrize("packing", [False, True])
def test_supervised_head_matches_all_positions(tiny_dir, tmp_path, packing, fused):
    ids, weights = make_data(5, seed=4)
    weights[0] = [w * 0.5 for w in weights[0]]  # non-unit loss weights take the same path
    model = lora_model(tiny_dir, tmp_path)
    norm = float(sum(sum(1 for w in ws[1:] if w) for ws in weights))
    units = [[0, 1], [2, 3, 4]] if packing else [[i] for i in range(5)]
    batch = collate(units, ids, weights, pad_id=0)
    full = grads_of(model, lambda: sft_forward(model, batch, norm, head_positions="all", fused=False)[0], fast=False)
    fast = grads_of(model, lambda: sft_forward(model, batch, norm, chunk=9, fused=fused)[0], fast=fused)
    assert_same(full, fast)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("hidden_size,vocab", [(8, 11), (160, 300)])  # the second through oneDNN on a CPU
def test_fused_head_logps_match_log_softmax(bias, hidden_size, vocab):
    torch.manual_seed(1)
    head = nn.Linear(hidden_size, vocab, bias=bias).requires_grad_(False)
    hidden = torch.randn(13, hidden_size, requires_grad=True) / hidden_size ** 0.5
    targets = torch.randint(0, vocab, (13,))
    upstream = torch.randn(13)  # any loss above the log-probs (DPO weights rows differently)
    expected = torch.log_softmax(head(hidden), dim=-1).gather(-1, targets[:, None])[:, 0]
    (grad_expected,) = torch.autograd.grad((expected * upstream).sum(), hidden)
    for chunk in (4, 100):
        got = token_logps(head, hidden, targets, chunk=chunk)
        (grad_got,) = torch.autograd.grad((got * upstream).sum(), hidden)
        torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(grad_got, grad_expected, rtol=0, atol=1e-6)
    with torch.no_grad():  # inference: the same values, no gradient rows formed
        torch.testing.assert_close(token_logps(head, hidden, targets, chunk=4), expected.detach(), rtol=0, atol=1e-6)
    head.weight.requires_grad_(True)  # a trainable head takes the plain autograd path, same values
    torch.testing.assert_close(token_logps(head, hidden, targets, chunk=4), expected, rtol=0, atol=1e-6)


def test_fused_lora_alone_matches_peft_lora(tiny_dir, tmp_path):
    """Only the LoRA forward differs (same padded batch, same full-logits head): same loss and gradients."""
    ids, weights = make_data(4, seed=6)
    model = lora_model(tiny_dir, tmp_path)
    norm = float(sum(sum(1 for w in ws[1:] if w) for ws in weights))
    batch = collate([[i] for i in range(4)], ids, weights, pad_id=0)

    def loss():
        return sft_forward(model, batch, norm, head_positions="all", fused=False)[0]

    assert_same(grads_of(model, loss, fast=False), grads_of(model, loss, fast=True), tol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n_in,n_out", [(6, 7), (192, 256)])  # the second's base products through oneDNN on a CPU
def test_fused_lora_function_matches_autograd(bias, n_in, n_out):
    """The autograd Function against the five-op formula PEFT uses: output and x, A, B gradients."""
    from posttrain.models.fast_lora import _LoraLinearFn

    torch.manual_seed(2)
    x = torch.randn(10, n_in, requires_grad=True)
    weight, b = torch.randn(n_out, n_in) / n_in ** 0.5, (torch.randn(n_out) if bias else None)
    lora_a, lora_b = torch.randn(3, n_in, requires_grad=True), torch.randn(n_out, 3, requires_grad=True)
    upstream = torch.randn(10, n_out)
    expected = nn.functional.linear(x, weight, b) + (x @ lora_a.t() @ lora_b.t()) * 0.5
    want = torch.autograd.grad((expected * upstream).sum(), (x, lora_a, lora_b))
    got = _LoraLinearFn.apply(x, weight, b, lora_a, lora_b, 0.5)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-5)  # float32 sums in another order
    for g, w in zip(torch.autograd.grad((got * upstream).sum(), (x, lora_a, lora_b)), want):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-5)  # the adapter's gradients reach ~40


def test_fast_lora_switches_plain_lora_only_and_respects_adapter_state(tiny_dir, tmp_path):
    model = lora_model(tiny_dir, tmp_path)
    lora_linears = [m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
    assert enable_fast_lora(model) == len(lora_linears) > 0  # apply_method switched them already: idempotent
    ids = torch.tensor([[5, 9, 14, 3, 7, 21]])
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        with model.disable_adapter():  # the DPO reference: adapters off must mean the base model
            torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)
        fast = model(input_ids=ids).logits
        disable_fast_lora(model)
        torch.testing.assert_close(fast, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    dropout = lora_model(tiny_dir, tmp_path, "lora.dropout=0.1")  # dropout and DoRA keep PEFT's forward
    dora = lora_model(tiny_dir, tmp_path, "lora.use_dora=true")
    assert enable_fast_lora(dropout) == 0 and enable_fast_lora(dora) == 0
    unfused = lora_model(tiny_dir, tmp_path, fused=False)
    assert not any("forward" in m.__dict__ for m in unfused.modules())


def preference_samples(seed: int) -> list:
    """Prompts of 4..9 tokens (no loss) with 2 or 3 responses of 2..7 tokens each (loss), ranked pairs."""
    from posttrain.data.preference import PrefSample

    g = torch.Generator().manual_seed(seed)
    samples = []
    for k in (2, 3, 2):
        prompt = torch.randint(3, 300, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
        answers = [torch.randint(3, 300, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(k)]
        weights = [[0.0] * len(prompt) + [1.0] * len(a) for a in answers]
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        samples.append(PrefSample([prompt + a for a in answers], weights, pairs))
    return samples


def test_dpo_packed_shared_prompt_logps_match_padded_plain(tiny_dir, tmp_path):
    from posttrain.data.preference_batch import collate_preferences, shared_prefix
    from posttrain.train.dpo import response_logps

    samples = preference_samples(5)
    model = lora_model(tiny_dir, tmp_path)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0])  # per-sequence weights, as DPO's loss gives them
    results = {}
    for layout in ("padded", "packed", "shared"):
        batch = collate_preferences([[0], [1, 2]], samples, pad_id=0, pack=layout != "padded",
                                    share_prompt=layout == "shared")
        lengths = sum(len(x) for s in samples for x in s.input_ids)
        saved = sum((len(s.input_ids) - 1) * shared_prefix(s) for s in samples) if layout == "shared" else 0
        assert batch["real_mask"].sum() == lengths - saved and int(batch["n_samples"]) == 7
        fused = layout != "padded"

        def loss(batch=batch, fused=fused, layout=layout):
            logps, counts = response_logps(model, batch, chunk=5, fused=fused)
            results[layout] = (logps.detach(), counts)
            return (logps * upstream).sum()

        grads = grads_of(model, loss, fast=fused)  # padded + plain paths vs packed rows + fused paths
        results[layout] += grads
    assert all(shared_prefix(s) == len(s.input_ids[0]) - int(s.weights[0].count(1.0)) for s in samples)
    for layout in ("packed", "shared"):
        torch.testing.assert_close(results[layout][0], results["padded"][0], rtol=0, atol=1e-4)
        assert torch.equal(results[layout][1], results["padded"][1])
        assert_same(results["padded"][2:], results[layout][2:], tol=1e-4)


def test_packed_attention_runs_per_sample_and_matches_the_mask(tiny_dir, tmp_path, monkeypatch):
    from posttrain.models.forward import hidden_states

    ids, weights = make_data(5, seed=6)
    model = lora_model(tiny_dir, tmp_path)
    units = [[0, 1, 2], [3]]  # 3 samples; 1 sample + right padding
    batch = collate(units, ids, weights, pad_id=0)
    real_sdpa, lengths = torch.nn.functional.scaled_dot_product_attention, []

    def counting_sdpa(query, *args, **kwargs):
        lengths.append(query.shape[2])
        return real_sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    upstream = torch.randn(batch["input_ids"].shape + (64,), generator=torch.Generator().manual_seed(0))
    fast = grads_of(model, lambda: (hidden_states(model, batch, fused=True) * upstream).sum(), fast=False)
    width, sizes = batch["input_ids"].shape[1], []
    for unit in units:  # padding continues the row's last sample
        sizes += [len(ids[i]) for i in unit[:-1]] + [width - sum(len(ids[i]) for i in unit[:-1])]
    assert len(sizes) == 4 and lengths == sizes * 2  # one causal call per sample in each of the 2 layers
    assert model.config._attn_implementation == "sdpa"  # switched back after the forward
    lengths.clear()
    masked = grads_of(model, lambda: (hidden_states(model, batch, fused=False) * upstream).sum(), fast=False)
    assert len(lengths) == 2  # the reference: one masked call per layer
    assert_same(masked, fast, tol=1e-4)  # a sum over (B, T, H): absolute error scales with it


@pytest.mark.parametrize("key", ["train.head_positions=all", "train.fused=false"])
def test_fast_path_switches_are_not_config_keys(key):
    """Benchmarks switch the fast paths off through FastPaths (a stage's run argument); a user config cannot."""
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match=f"unknown config key {key.split('=')[0]}"):
        load_config(None, [key], **{"data.datasets": [{"path": "x.jsonl"}]})


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_loss_packed_fused_matches_padded_plain(tiny_dir, tmp_path, loss):
    """The whole DPO loss (policy + adapter-off reference): padded rows on PEFT's path vs packed rows,
    a shared prompt copy, fused LoRA and the fused head; same loss and same LoRA gradients."""
    from posttrain.data.preference_batch import collate_preferences
    from posttrain.train.dpo import dpo_forward

    cfg = load_config(None, ["stage=dpo", f"output.dir={tmp_path}", f"dpo.loss={loss}", "dpo.beta=0.5"],
                      **{"model.name_or_path": "tiny-random", "data.datasets": [{"path": "x.jsonl"}]})
    samples = preference_samples(7)
    model = lora_model(tiny_dir, tmp_path)
    runs = {}
    for fused in (False, True):
        batch = collate_preferences([[0, 1], [2]], samples, pad_id=0, pack=fused, share_prompt=fused)
        runs[fused] = grads_of(model, lambda b=batch, f=fused: dpo_forward(model, b, 3.0, dpo_cfg=cfg.dpo, chunk=6,
                                                                           fused=f)[0], fast=fused)
    assert runs[False][0] != 0.0
    assert_same(runs[False], runs[True], tol=1e-5)


def test_kto_loss_packed_fused_matches_padded_plain(tiny_dir, tmp_path):
    """The whole KTO loss (samples, mismatched KL sequences, adapter-off reference): one padded row per
    sequence on PEFT's path vs one packed row per set on the fused paths; same loss and LoRA gradients."""
    from posttrain.data.batches import kto_batches
    from posttrain.data.kto import KTOSample
    from posttrain.train.kto import kto_forward

    cfg = load_config(None, ["stage=kto", f"output.dir={tmp_path}", "kto.beta=0.5", "kto.desirable_weight=1.5"],
                      **{"model.name_or_path": "tiny-random", "data.datasets": [{"path": "x.jsonl"}]})
    ids, weights = make_data(10, seed=3)
    samples = [KTOSample(ids[k], weights[k], ids[k + 5], weights[k + 5], k % 2 == 0) for k in range(5)]
    model = lora_model(tiny_dir, tmp_path)
    runs, batches = {}, {}
    for fused in (False, True):
        batches[fused] = batch = kto_batches(samples, pad_id=0, pack=fused).collate([[0, 1, 2], [3], [4]])
        runs[fused] = grads_of(model, lambda b=batch, f=fused: kto_forward(model, b, 5.0, kto_cfg=cfg.kto, chunk=6,
                                                                           fused=f)[0], fast=fused)
    assert batches[True]["input_ids"].shape[0] == 1 and batches[False]["input_ids"].shape[0] == 5
    assert int(batches[True]["real_mask"].sum()) == sum(len(x) for x in ids[:5]) < batches[False]["input_ids"].numel()
    assert runs[False][0] != 0.0
    assert_same(runs[False], runs[True], tol=1e-5)


def test_fused_paths_under_bf16_autocast_match_the_plain_ones(tiny_dir, tmp_path, monkeypatch):
    """train.precision=bf16: the fused LoRA linears and head run their products in bf16 as autocast would,
    the gradients reach the float32 adapter weights; same loss and gradients as PEFT + autograd under
    autocast, to bf16's rounding."""
    from posttrain.models import fast_lora, head_logps

    calls = []  # (fused op, the dtype its products run in), autocast being off inside: the casts set it
    for mod, cls, key in ((fast_lora, "_LoraLinearFn", "lora"), (head_logps, "_FrozenHeadLogps", "head")):
        def counted(*args, _apply=getattr(mod, cls).apply, _key=key):
            assert not torch.is_autocast_enabled("cpu")
            calls.append((_key, args[0].dtype if _key == "lora" else args[-1]))
            return _apply(*args)

        monkeypatch.setattr(getattr(mod, cls), "apply", counted)
    ids, weights = make_data(4, seed=7)
    model = lora_model(tiny_dir, tmp_path)
    norm = float(sum(sum(1 for w in ws[1:] if w) for ws in weights))
    batch = collate([[0, 1], [2, 3]], ids, weights, pad_id=0)

    def loss(fused):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return sft_forward(model, batch, norm, chunk=5, fused=fused)[0]
        return run

    plain = grads_of(model, loss(False), fast=False)
    assert calls == []
    fused = grads_of(model, loss(True), fast=True)
    assert {("lora", torch.bfloat16), ("head", torch.bfloat16)} == set(calls)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert_same(plain, fused, tol=2e-2)
    assert abs(plain[0] - grads_of(model, lambda: sft_forward(model, batch, norm)[0], fast=True)[0]) > 1e-6


def test_short_runs_attend_in_float32_on_cpu_under_autocast():
    """bf16 flash-attention backward is slower than float32 on a CPU for short runs: those attend in float32
    (the result rounded to bf16 once); long runs keep autocast's bf16 kernel."""
    from posttrain.models.packed_attention import CPU_FP32_BELOW, _sdpa

    torch.manual_seed(3)
    for n, fp32 in ((8, True), (CPU_FP32_BELOW, False)):
        q, k, v = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
        exact = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _sdpa(q, k, v, is_causal=True, enable_gqa=True)
            autocast = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, exact.to(torch.bfloat16) if fp32 else autocast, rtol=0, atol=0)
        assert not fp32 or not torch.equal(got, autocast)  # the float32 path is a different computation
    bf16 = [t.to(torch.bfloat16) for t in (q, k, v)]  # half-precision weights without autocast: same rule
    assert _sdpa(*(t[:, :, :8] for t in bf16), is_causal=True, enable_gqa=True).dtype == torch.bfloat16
