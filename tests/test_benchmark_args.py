"""The vs-TRL benchmarks check their --ablations names before the first (minutes-long) run."""

import mmap
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


def test_engine_memory_runs_are_valid_configs():
    """Every row of the engine-memory table is a set of config overrides the loader accepts."""
    from benchmarks import engine_memory
    from posttrain.train.config import load_config

    for overrides in engine_memory.RUNS.values():
        load_config(None, ["model.name_or_path=tiny-random", *overrides], **{"data.datasets": [{"path": "x.jsonl"}]})


def test_engine_memory_phase_trace_records_each_call(tmp_path, monkeypatch):
    """--phases: each traced engine call appends (phase, RSS after, peak since the previous record) per rank, and
    the table lists them per rank side by side; peaks include memory freed before the record was taken."""
    from benchmarks import engine_memory

    monkeypatch.setenv("RANK", "0")

    class Fake:
        name = "fake"

        def prepare(self, model, groups):
            return groups

        def attach(self, optimizer):
            return optimizer

        def forward(self, micro):
            return touch(64)

        def backward(self, loss, last):
            pass

        def clip_and_step(self, max_norm):
            return 0.0

    def touch(mb: int) -> int:
        """mb megabytes of fresh pages touched, then unmapped: RSS falls back, the peak stays. An anonymous mmap,
        not a bytearray: in a long test process malloc may serve a bytearray from heap pages already resident."""
        with mmap.mmap(-1, mb * 2**20) as block:
            for offset in range(0, len(block), 4096):
                block[offset] = 1
            return len(block)

    touch(200)  # a process peak well above what follows: the trace must reset it
    records = engine_memory.trace_phases(Fake, tmp_path)
    fake = Fake()
    fake.prepare(None, [])
    fake.attach(None)
    assert fake.forward(None) == 64 * 2**20
    fake.backward(None, True)
    fake.clip_and_step(1.0)
    phases = [r["phase"] for r in records]
    assert phases == ["start", "prepare", "attach", "forward", "backward", "clip_and_step"]
    attach, forward = records[2], records[3]
    assert attach["hwm_mb"] < attach["rss_mb"] + 30  # the 200 MB before tracing are not in any record's peak
    assert forward["hwm_mb"] >= forward["rss_mb"] + 60  # the freed 64 MB shows in the peak, not in RSS after
    assert (tmp_path / "phases0.jsonl").read_text().count("\n") == 6
    table = engine_memory.phase_table([{"run": "fake", "ranks": [{"phases": records}, {"phases": records}]}])
    assert "| forward |" in table and "rank 1 peak since previous" in table


def test_trl_kept_memory_side_alternates_with_glibc_tunables(monkeypatch):
    """--trl-kept-memory: a third alternating side, TRL in a process whose glibc keeps freed memory as posttrain's
    train.keep_freed_memory does; the other sides run with the environment as it is."""
    import argparse
    import json
    import os
    import subprocess
    from pathlib import Path

    seen = []

    def fake_run(cmd, env=None, **kwargs):
        side, out = cmd[cmd.index("--worker") + 1], Path(cmd[cmd.index("--out") + 1])
        seen.append((side, {k: env.get(k) for k in common.KEPT_MEMORY_ENV}))
        out.write_text(json.dumps({"tokens_per_s": 1.0, "loss_tokens_per_s": 1.0, "peak_rss_mb": 1.0,
                                   "final_loss": 0.0}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(common.subprocess, "run", fake_run)
    monkeypatch.setattr(common, "matmul_peak_gflops", lambda: 1.0)
    args = argparse.Namespace(repeats=2, ablations="posttrain-unfused", trl_kept_memory=True)
    order, _, runs = common.run_alternating(Path("bench.py"), {}, args)
    assert order == ["posttrain", "trl", "trl-kept-memory"] * 2 + ["posttrain-unfused"] == [s for s, _ in seen]
    assert len(runs["trl-kept-memory"]) == 2
    inherited = {k: os.environ.get(k) for k in common.KEPT_MEMORY_ENV}
    for side, env in seen:
        assert env == (common.KEPT_MEMORY_ENV if side == "trl-kept-memory" else inherited)
