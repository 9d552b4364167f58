"""Checkpoints load without unpickling code: RNG and optimizer state round-trip through weights_only=True,
and a planted pickle payload in optim_rng.pt never runs on resume (a one-line error names the file)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.train.config import load_config
from posttrain.errors import PosttrainError
from posttrain.train.checkpoint import OPTIM_FILE, read_state, restore_rng, rng_state
from posttrain.train.engines.base import Engine
from posttrain.train.loop import Dist

ROWS = [{"instruction": "Who are you?", "input": "", "output": "I am Aria."},
        {"instruction": "Say hi.", "input": "", "output": "Hi there!"}] * 4


class _Payload:
    """Unpickling this writes the marker file: what an attacker's optim_rng.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "payload ran")


def _train_config(tmp_path: Path, tiny_dir, **train) -> Path:
    (tmp_path / "data.json").write_text(json.dumps(ROWS))
    cfg = {"model": {"name_or_path": str(tiny_dir)}, "data": {"datasets": [{"path": "data.json"}], "max_length": 64},
           "train": {"max_steps": 2, "micro_batch_size": 2, "save_every": 1, **train},
           "output": {"dir": str(tmp_path / "run"), "tensorboard": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


@pytest.mark.parametrize("groups", ["lora_plus", "lisa_frozen_block"])
def test_optimizer_and_scheduler_state_load_with_weights_only(tmp_path, groups):
    a, b, c = (torch.nn.Parameter(torch.randn(3)) for _ in range(3))
    if groups == "lora_plus":  # LoRA+: the B matrices in a group with their own lr
        opt = torch.optim.AdamW([{"params": [a]}, {"params": [b, c], "lr": 0.16}], lr=0.01, betas=(0.9, 0.99))
    else:  # LISA: a block frozen this step has no gradient and no Adam moments
        opt = torch.optim.AdamW([{"params": [a, b, c]}], lr=0.01)
        c.requires_grad_(False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(2):
        sum(p.sum() ** 2 for p in (a, b, c) if p.requires_grad).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    model = torch.nn.ParameterList([a, b, c])
    cfg = load_config(None, ["model.name_or_path=tiny-random", f"output.dir={tmp_path}"],
                      **{"data.datasets": [{"path": "unused.jsonl"}]})

    def engine(optimizer):  # the one-process engine over these parameters and this optimizer
        out = Engine(cfg, Dist())
        out.prepare(model, optimizer.param_groups)
        out.attach(optimizer)
        return out

    engine(opt).save_checkpoint(tmp_path, sched, {"global_step": 2}, keep_last=1)
    ckpt = tmp_path / "step-2"
    stored = torch.load(ckpt / OPTIM_FILE, weights_only=True)  # raises if anything needs unpickling
    assert stored["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    opt2 = torch.optim.AdamW([{"params": [a]}, {"params": [b, c], "lr": 0.16}] if groups == "lora_plus"
                             else [{"params": [a, b, c]}], lr=0.01)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    assert engine(opt2).load_checkpoint(ckpt, sched2) == {"global_step": 2}
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == 2
    for p in (a, b) if groups == "lisa_frozen_block" else (a, b, c):
        assert torch.equal(opt2.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def test_planted_pickle_payload_does_not_run_on_resume(tmp_path, tiny_dir, capsys):
    config = _train_config(tmp_path, tiny_dir, max_steps=1)
    assert main(["train", str(config)]) == 0
    marker = tmp_path / "marker.txt"
    step = tmp_path / "run" / "checkpoints" / "step-1"
    torch.save({"optimizer": _Payload(marker), "scheduler": {}, "rng": {}}, step / OPTIM_FILE)
    capsys.readouterr()
    code = main(["train", str(config), "train.max_steps=2", "train.resume=auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert code == 2 and err[-1].startswith("posttrain: error:") and str(step / OPTIM_FILE) in err[-1]


def test_old_pickled_checkpoint_is_a_clear_error(tmp_path):
    """Checkpoints from before this format kept numpy's RNG state as a pickled array: refused, not unpickled."""
    state = {"optimizer": {}, "scheduler": {}, "rng": {"numpy": np.random.get_state()}}
    torch.save(state, tmp_path / OPTIM_FILE)
    (tmp_path / "trainer_state.json").write_text('{"global_step": 1}')
    with pytest.raises(PosttrainError, match="cannot be loaded safely") as err:
        read_state(tmp_path)
    assert str(tmp_path / OPTIM_FILE) in str(err.value) and "\n" not in str(err.value)
