"""The lean decode loop (models/decode.py) against HF `generate` on the tiny model: same greedy tokens at
several batch sizes, prompt lengths and stop positions; seeded sampling reproducible; rows that join a
running batch get what they get alone."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig

from posttrain.models import generate as gen
from posttrain.models import onednn_linear
from posttrain.models.decode import RaggedBatch, decode, lean_decode_ok


@pytest.fixture(scope="module")
def sharp(tiny):
    """The tiny model with 4x query/key weights: its attention is peaky enough that a wrong position or a
    mis-merged cache row changes greedy tokens (the plain tiny model attends almost uniformly)."""
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(4.0)
    return model, tokenizer


def prompts_of(n: int) -> list[list[int]]:
    """n prompts of 3..(3 + 2n) tokens: every batch is ragged."""
    g = torch.Generator().manual_seed(n)
    return [torch.randint(10, 250, (3 + (5 * i) % (2 * n + 1),), generator=g).tolist() for i in range(n)]


def hf_greedy(model, prompts, stops, pad_id, max_new_tokens):
    """What `model.generate` gives, each row cut after its first stop token."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops or None,
                           pad_token_id=pad_id)
    rows = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, width:].tolist()
    return [r[: next((i + 1 for i, t in enumerate(r) if t in stops), len(r))] for r in rows]


def greedy(logits, rows):
    return logits.argmax(-1)


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_greedy_matches_hf_generate_with_rows_stopping_at_different_steps(sharp, batch, onednn, monkeypatch):
    """Also with the decode's linear layers through oneDNN (models/onednn_linear.py; the tiny model is far below
    the size where it pays, so forced here): other rounding, the same tokens on this sharp model."""
    monkeypatch.setattr(onednn_linear, "MIN_BYTES", 0 if onednn else 1 << 62)
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 0)  # the tiny model is 64 wide
    swapped, real = [], onednn_linear.swap_in

    def counted(m, **heads):
        layers = real(m, **heads)
        swapped.append(len(layers))
        return layers
    monkeypatch.setattr(onednn_linear, "swap_in", counted)
    model, _ = sharp
    assert lean_decode_ok(model)
    prompts = prompts_of(batch)
    free = hf_greedy(model, prompts, [], 0, 12)
    # Stop tokens taken from the free-running outputs at different steps, so rows end at different lengths.
    stops = sorted({row[(3 * i) % 10 + 1] for i, row in enumerate(free)})
    expected = hf_greedy(model, prompts, stops, 0, 12)
    got = decode(model, prompts, max_new_tokens=12, stop_ids=stops, pad_id=0, pick=greedy)
    assert got == expected
    assert (swapped[0] > 0) == onednn  # the layers really were (not) swapped
    if batch > 1:
        assert len({len(r) for r in got}) > 1  # rows really did leave the batch at different steps


def test_generate_from_ids_lean_equals_generate_path(sharp, monkeypatch):
    model, tokenizer = sharp
    prompts = prompts_of(5)
    lean = gen.generate_from_ids(model, tokenizer, prompts, max_new_tokens=10)
    seeded = gen.sample_ids(model, tokenizer, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9,
                            row_seeds=[7, 8, 9, 10, 11])
    again = gen.sample_ids(model, tokenizer, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9,
                           row_seeds=[7, 8, 9, 10, 11])
    monkeypatch.setattr(gen, "_lean", lambda *a: False)  # the model.generate path
    assert gen.generate_from_ids(model, tokenizer, prompts, max_new_tokens=10) == lean
    hf = gen.sample_ids(model, tokenizer, prompts, max_new_tokens=10, temperature=1.0, top_p=0.9,
                        row_seeds=[7, 8, 9, 10, 11])
    for a, b, c in zip(vars(seeded).values(), vars(again).values(), vars(hf).values()):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_generate_path_also_computes_through_onednn_with_the_same_tokens(sharp, monkeypatch):
    """Vision prompts and HF-only generation settings go through `model.generate`: its linear layers through oneDNN
    too (forced on the tiny model), the same greedy tokens as on torch's path."""
    model, tokenizer = sharp
    prompts = prompts_of(4)
    monkeypatch.setattr(gen, "_lean", lambda *a: False)
    monkeypatch.setattr(onednn_linear, "MIN_DIM", 0)
    monkeypatch.setattr(onednn_linear, "MIN_BYTES", 0)
    swapped, real = [], onednn_linear.swap_in
    monkeypatch.setattr(onednn_linear, "swap_in",
                        lambda m, **heads: swapped.append(len(layers := real(m, **heads))) or layers)
    got = [g.token_ids for g in gen.generate_from_ids(model, tokenizer, prompts, max_new_tokens=10)]
    assert swapped and swapped[0] > 0
    monkeypatch.setenv(onednn_linear.ENV, "0")
    assert [g.token_ids for g in gen.generate_from_ids(model, tokenizer, prompts, max_new_tokens=10)] == got


def test_seeded_sampling_without_row_seeds_is_generate_s(sharp, monkeypatch):
    model, tokenizer = sharp
    prompt = prompts_of(1)
    kwargs = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    lean = gen.generate_from_ids(model, tokenizer, prompt, **kwargs)
    assert gen.generate_from_ids(model, tokenizer, prompt, **kwargs) == lean
    monkeypatch.setattr(gen, "_lean", lambda *a: False)
    assert gen.generate_from_ids(model, tokenizer, prompt, **kwargs) == lean  # same warpers, same stream


def test_stop_string_ends_its_row_only(sharp):
    model, tokenizer = sharp
    prompts = prompts_of(3)
    free = gen.generate_from_ids(model, tokenizer, prompts, max_new_tokens=12, strip=False)
    text = free[1].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip() and stop not in free[0].text[:1]
    cut = gen.generate_from_ids(model, tokenizer, prompts, max_new_tokens=12, strip=False, stop=[stop])
    assert cut[1].text == text[: text.index(stop)] and cut[1].finish_reason == "stop"
    assert len(cut[1].token_ids) < len(free[1].token_ids)  # generation ended there, not just the text
    for before, after in zip(free, cut):
        assert after.text == before.text.split(stop)[0]


def test_rows_joining_a_running_batch_get_what_they_get_alone(sharp):
    model, _ = sharp
    first, late = prompts_of(3), prompts_of(2)
    alone = [decode(model, [p], max_new_tokens=8, stop_ids=[], pad_id=0, pick=greedy)[0] for p in first + late]
    batch = RaggedBatch(model, pad_id=0)
    out = [[] for _ in first + late]
    rows = [0, 1, 2]
    logits = batch.add(first)
    for step in range(12):
        tokens = logits.argmax(-1)
        for row, token in zip(rows, tokens.tolist()):
            out[row].append(token)
        keep = [k for k, row in enumerate(rows) if len(out[row]) < 8]
        if len(keep) < len(rows):
            batch.keep(keep)
            rows, tokens = [rows[k] for k in keep], tokens[keep]
        if not rows:
            break
        logits = batch.step(tokens)
        if step == 2:  # two requests arrive mid-way: prefilled and merged between decode steps
            logits = torch.cat([logits, batch.add(late)])
            rows += [3, 4]
    assert out == alone


def test_growing_cache_layer_appends_like_concatenation_and_survives_reassignment():
    import torch

    from posttrain.models.kv_cache import GrowingLayer

    layer, steps = GrowingLayer(), [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 70, 1)]
    for i, new in enumerate(steps):
        keys, values = layer.update(new, -new)
        want = torch.cat(steps[: i + 1], dim=2)
        assert torch.equal(keys, want) and torch.equal(values, -want) and layer.get_seq_length() == want.shape[2]
    layer.batch_select_indices(torch.tensor([2, 0]))  # rows leave ...
    layer.keys, layer.values = layer.keys[:, :, 3:], layer.values[:, :, 3:]  # ... and unused columns go
    new = torch.randn(2, 2, 1, 4)
    keys, _ = layer.update(new, new)
    assert torch.equal(keys, torch.cat([torch.cat(steps, 2)[[2, 0], :, 3:], new], 2))


def test_rows_and_leading_columns_leave_a_growing_layer_in_place():
    from posttrain.models.kv_cache import GrowingLayer

    layer, steps = GrowingLayer(), [torch.randn(5, 2, n, 4) for n in (6, 1)]
    for new in steps:
        layer.update(new, -new)
    buffer = layer.keys.data_ptr()
    layer.keep_rows([0, 2, 3])  # rows 1 and 4 end
    layer.drop_leading(2)
    new = torch.randn(3, 2, 1, 4)
    keys, values = layer.update(new, -new)
    want = torch.cat([torch.cat(steps, 2)[[0, 2, 3], :, 2:], new], 2)
    assert torch.equal(keys, want) and torch.equal(values, -want) and layer.get_seq_length() == 6
    assert keys.data_ptr() == buffer + 2 * keys.stride(2) * keys.element_size()  # the same buffer: nothing copied


def test_a_growing_layer_crops_like_a_dynamic_layer_in_place():
    from transformers.cache_utils import DynamicLayer

    from posttrain.models.kv_cache import GrowingLayer

    states = torch.randn(2, 2, 7, 4)
    for remove in (-2, 0, -9):
        growing, plain = GrowingLayer(), DynamicLayer()
        for layer in (growing, plain):
            layer.update(states, -states)
        buffer = growing.keys.data_ptr()
        for layer in (growing, plain):
            layer.crop(remove)
        assert torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)
        new = torch.randn(2, 2, 1, 4)
        assert torch.equal(growing.update(new, -new)[0], plain.update(new, -new)[0])
        assert growing.keys.data_ptr() == buffer  # appended where the cropped positions were: no copy
    with pytest.raises(ValueError, match="positive value"):
        growing.crop(3)


def test_dropped_rows_are_filled_from_the_end_and_the_rest_stay(sharp):
    model, _ = sharp
    batch = RaggedBatch(model, pad_id=0)
    prompts = prompts_of(6)
    batch.add(prompts)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in batch.cache.layers]
    mask = batch.mask.clone()
    order = batch.drop([1, 5, 2])
    assert order == [0, 3, 4]  # rows 3 and 4 fill the holes at 1 and 2; row 0 does not move
    assert len(batch) == 3 and torch.equal(batch.mask, mask[order][:, -batch.mask.shape[1]:])
    width = batch.mask.shape[1]
    for layer, (keys, values) in zip(batch.cache.layers, before):
        assert torch.equal(layer.keys, keys[order][:, :, -width:])
        assert torch.equal(layer.values, values[order][:, :, -width:])


def test_prefill_groups_are_the_cheapest_split_by_length():
    import itertools

    from posttrain.models.prefill import prefill_groups

    assert prefill_groups([3, 50, 4, 52], 10) == [[0, 2], [1, 3]]  # 2 calls: 2*4 + 2*52 + 20 = 132 < 4*52 + 10
    assert prefill_groups([3, 50, 4, 52], 1000) == [[0, 2, 1, 3]]  # a call costs more than the padding
    assert prefill_groups([7], 0) == [[0]]
    lengths = [35, 90, 41, 47, 38, 62, 44, 55, 36, 80]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])

    def cost(groups):
        return sum(len(g) * max(lengths[i] for i in g) + 64 for g in groups)

    splits = ([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))]
              for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
    got = prefill_groups(lengths, 64)
    assert sorted(i for g in got for i in g) == list(range(len(lengths)))
    assert cost(got) == min(cost(s) for s in splits)  # every contiguous split of the sorted lengths, brute force


def test_greedy_matches_hf_generate_with_prompts_prefilled_in_length_groups(sharp, monkeypatch):
    from posttrain.models import decode as lean

    model, _ = sharp
    prompts = prompts_of(8)
    monkeypatch.setattr(lean, "flat_prefill_ok", lambda model, prompts: False)  # a GPU's padded calls
    monkeypatch.setattr(lean, "PREFILL_CALL_TOKENS_CPU", 0)  # every length its own prefill call
    assert len(lean.prefill_groups([len(p) for p in prompts], 0)) > 3
    expected = hf_greedy(model, prompts, [], 0, 10)
    assert decode(model, prompts, max_new_tokens=10, stop_ids=[], pad_id=0, pick=greedy) == expected


@pytest.mark.parametrize("flat", [True, False])
def test_a_shared_prefix_and_repeated_prompts_are_prefilled_once_with_hf_generate_s_tokens(sharp, flat, monkeypatch):
    """On a CPU: one packed row, the prefix once and then each distinct prompt's own tokens (models/flat_prefill.py);
    on a GPU (flat off): the prefix in its own call, then the distinct prompts' tails in length groups."""
    from posttrain.models import decode as lean

    if not flat:
        monkeypatch.setattr(lean, "flat_prefill_ok", lambda model, prompts: False)
    model, _ = sharp
    head = prompts_of(1)[0] + list(range(20, 40))  # what every prompt starts with (a template's system turn)
    tails = [t[:2] + [7] + t[2:] for t in prompts_of(5)]  # [7]: no tail starts like another
    prompts = [head + t for t in tails] + [head + tails[1], head + tails[3]]  # two prompts asked twice
    widths = []
    hook = model.register_forward_hook(lambda m, a, kw, out: widths.append(tuple(kw["input_ids"].shape)),
                                       with_kwargs=True)
    try:
        got = decode(model, prompts, max_new_tokens=10, stop_ids=[], pad_id=0, pick=greedy)
    finally:
        hook.remove()
    assert got == hf_greedy(model, prompts, [], 0, 10)
    prefills = [w for w in widths if w[1] > 1]
    shared = len(head) + common_tail_start(tails)
    if flat:
        assert prefills == [(1, shared + sum(len(head) + len(t) - shared for t in tails))]
    else:
        assert prefills[0] == (1, shared)  # the shared prefix, once
        assert sum(rows for rows, _ in prefills[1:]) == 5 and max(w for _, w in prefills[1:]) <= max(map(len, tails))
    assert widths[len(prefills)][0] == 7  # then every prompt decodes, repeats included


def common_tail_start(tails):
    from posttrain.models.prefill import common_prefix

    return common_prefix(tails, min(map(len, tails)))


def test_a_stored_prefix_serves_later_single_prompts(sharp):
    model, _ = sharp
    head = prompts_of(1)[0] + list(range(20, 40))
    batch = RaggedBatch(model, pad_id=0)
    batch.add([head + [9, 10 + i, 11] for i in range(8)])
    assert len(batch.prefixes) == 1
    widths = []
    hook = model.register_forward_hook(lambda m, a, kw, out: widths.append(tuple(kw["input_ids"].shape)),
                                       with_kwargs=True)
    try:
        late = batch.add([head + [9, 50, 51, 52]])  # one request joining: only its own tokens run
    finally:
        hook.remove()
    stored = len(next(iter(batch.prefixes)))
    assert widths == [(1, len(head) + 4 - stored)] and stored >= len(head)
    alone = RaggedBatch(model, pad_id=0).add([head + [9, 50, 51, 52]])
    torch.testing.assert_close(late, alone, rtol=0, atol=1e-5)
    assert batch.mask[-1].sum() == len(head) + 4 and batch.positions[-1] == len(head) + 3
