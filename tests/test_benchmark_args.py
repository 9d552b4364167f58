"""The vs-TRL benchmarks check their --ablations names before the first (minutes-long) run."""

import sys

import pytest

from benchmarks import common, dpo_lora_vs_trl, grpo_vs_trl, kto_vs_trl, sft_lora_vs_trl


@pytest.mark.parametrize("bench", [sft_lora_vs_trl, dpo_lora_vs_trl, grpo_vs_trl, kto_vs_trl])
def test_unknown_ablation_fails_before_any_run(bench, monkeypatch, capsys):
    def no_run(*args, **kwargs):
        raise AssertionError("a benchmark run started before the ablation names were checked")

    monkeypatch.setattr(common, "run_worker", no_run)
    monkeypatch.setattr(common, "matmul_peak_gflops", no_run)
    monkeypatch.setattr(sys, "argv", [bench.__file__, "--ablations", "posttrain-unfused,posttrain-nope"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "posttrain-nope" in err and "posttrain-unfused" in err  # the bad name and the valid ones


@pytest.mark.parametrize("bench", [sft_lora_vs_trl, dpo_lora_vs_trl])
def test_variants_are_config_overrides_and_fast_path_switches(bench):
    """Each ablation splits into valid config overrides and FastPaths fields (the switches are not config keys)."""
    from posttrain.models.forward import FastPaths
    from posttrain.train.config import load_config

    for variant in bench.POSTTRAIN_VARIANTS.values():
        overrides, fast = common.split_fast(variant)
        FastPaths(**fast)
        load_config(None, ["model.name_or_path=tiny-random", *overrides], **{"data.datasets": [{"path": "x.jsonl"}]})
    assert common.split_fast(["fast.fused=false", "data.packing=false", "fast.head_positions=all"]) == \
        (["data.packing=false"], {"fused": False, "head_positions": "all"})


@pytest.mark.parametrize("bench, argv", [
    (grpo_vs_trl, ["--micro", "3", "--accum", "1"]),  # 3 responses per step: not whole groups of 8
    (kto_vs_trl, ["--micro", "1"]),  # TRL's KL estimate needs 2 samples per micro-batch
    (kto_vs_trl, ["--data", "no-such-file.json"]),
])
def test_bad_shape_fails_before_any_run(bench, argv, monkeypatch, capsys):
    def no_run(*args, **kwargs):
        raise AssertionError("a benchmark run started before the arguments were checked")

    monkeypatch.setattr(common, "run_worker", no_run)
    monkeypatch.setattr(common, "matmul_peak_gflops", no_run)
    monkeypatch.setattr(sys, "argv", [bench.__file__, *argv])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
