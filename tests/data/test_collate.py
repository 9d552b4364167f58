"""Batching plans and collation: packing, step plans across processes, positions."""

from posttrain.data.collate import collate, epoch_units, pack_first_fit, plan_epoch


def test_pack_first_fit_respects_max_length_and_keeps_every_sample():
    lengths = [5, 3, 8, 2, 7, 1]
    bins = pack_first_fit(list(range(6)), lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4  # 26 tokens need at least 4 rows of 8


def test_epoch_units_deterministic_per_seed_and_epoch():
    lengths = [3] * 10
    a = epoch_units(lengths, packing=False, max_length=8, seed=1, epoch=0)
    assert a == epoch_units(lengths, packing=False, max_length=8, seed=1, epoch=0)
    assert a != epoch_units(lengths, packing=False, max_length=8, seed=1, epoch=1)


def test_plan_epoch_shards_micro_batches_over_ranks():
    units = [[i] for i in range(10)]
    tokens = list(range(10))
    one = plan_epoch(units, tokens, micro=2, accum=2, world=1, rank=0)
    r0 = plan_epoch(units, tokens, micro=2, accum=1, world=2, rank=0)
    r1 = plan_epoch(units, tokens, micro=2, accum=1, world=2, rank=1)
    assert len(one) == len(r0) == 3
    for s in range(3):
        merged = sorted(u for mb in r0[s].micro_batches + r1[s].micro_batches for u in mb)
        assert merged == sorted(u for mb in one[s].micro_batches for u in mb)
        assert one[s].normalizer == r0[s].normalizer == r1[s].normalizer
    assert one[0].normalizer == 0 + 1 + 2 + 3
    assert r1[2].micro_batches == []  # the short last step leaves rank 1 idle


def test_collate_packs_with_restarting_positions_and_zero_first_weight():
    ids = [[5, 6, 7], [8, 9]]
    weights = [[1.0, 1.0, 1.0], [1.0, 0.5]]
    batch = collate([[0, 1], [1]], ids, weights, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [8, 9, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["weights"].tolist() == [[0, 1, 1, 0, 0.5], [0, 0.5, 0, 0, 0]]
    assert batch["real_mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
