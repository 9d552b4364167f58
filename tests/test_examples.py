"""Every shipped example config loads and validates (a renamed key must not break `posttrain train examples/...`)."""

from pathlib import Path

import pytest

from posttrain.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_examples_exist():
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_loads(path):
    cfg = load_config(path)
    assert cfg.stage in {"sft", "rm", "dpo", "ppo", "grpo", "eval"}
