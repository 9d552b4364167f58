"""Every shipped example config loads and validates (a renamed key must not break `posttrain train examples/...`)."""

from pathlib import Path

import pytest
import yaml

from posttrain.eval.config import load_eval_config
from posttrain.train.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_examples_exist():
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_loads(path):
    is_eval = yaml.safe_load(path.read_text(encoding="utf-8")).get("stage") == "eval"  # `posttrain eval FILE`
    cfg = load_eval_config(path) if is_eval else load_config(path)
    assert cfg.stage in {"sft", "rm", "dpo", "kto", "ppo", "grpo", "eval"}


@pytest.mark.parametrize("name", ["one_node", "two_nodes"])
def test_accelerate_configs_launch_plain_processes(name):
    """examples/accelerate/ loads as accelerate's own cluster config, and asks accelerate for processes only: an FSDP
    or DeepSpeed plugin there would be refused by posttrain (its engine is train.distributed)."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / f"{name}.yaml"
    cfg = ClusterConfig.from_yaml_file(path)
    assert cfg.distributed_type == "MULTI_GPU" and cfg.num_machines == (2 if name == "two_nodes" else 1)
    assert not cfg.fsdp_config and not cfg.deepspeed_config
