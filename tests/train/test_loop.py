"""The shared loop: packing equals padding, accumulation 8x1 equals 1x8, exact resume, 2 processes."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.train.config import load_config
from posttrain.data.collate import collate
from posttrain.models.methods import apply_method
from posttrain.models.forward import sft_forward
from posttrain.train.loop import Dist, Loop
from posttrain.data.batches import Batches
from posttrain.train.steps import DataSteps

from conftest import make_data


def batches(ids, weights):
    return Batches([len(x) for x in ids], [sum(1 for w in ws[1:] if w) for ws in weights],
                   functools.partial(collate, input_ids=ids, weights=weights, pad_id=0))


def config(tmp_path, *overrides):
    return load_config(None, ["model.name_or_path=tiny-random", "optim.lr=1e-2", "optim.scheduler=constant",
                              "train.log_every=1", "output.tensorboard=false", f"output.dir={tmp_path}", *overrides],
                       **{"data.datasets": [{"path": "unused.jsonl"}]})


def make_loop(cfg, model, data, dist_ctx=None):
    dist_ctx = dist_ctx or Dist()
    steps = DataSteps(data, sft_forward, train=cfg.train, packing=cfg.data.packing, max_length=cfg.data.max_length,
                      dist_ctx=dist_ctx)
    return Loop(cfg, model, steps, dist_ctx=dist_ctx)


def model_for(tiny_dir, cfg):
    torch.manual_seed(0)
    return apply_method(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), cfg.methods)


def test_packed_loss_equals_unpacked(tiny_dir, tmp_path):
    ids, weights = make_data(6)
    model = model_for(tiny_dir, config(tmp_path, "method.type=full")).eval()
    norm = float(sum(sum(1 for w in ws[1:] if w) for ws in weights))
    padded = collate([[i] for i in range(6)], ids, weights, pad_id=0)
    packed = collate([[0, 1, 2], [3, 4, 5]], ids, weights, pad_id=0)
    assert packed["input_ids"].shape[0] == 2
    with torch.no_grad():
        loss_padded, _ = sft_forward(model, padded, norm)
        loss_packed, _ = sft_forward(model, packed, norm)
    assert abs(float(loss_padded) - float(loss_packed)) < 1e-5


def grads_after_one_step(tiny_dir, tmp_path, micro, accum):
    ids, weights = make_data(8)
    cfg = config(tmp_path, "method.type=full", f"train.micro_batch_size={micro}", f"train.grad_accum={accum}",
                 "train.max_steps=1", "optim.max_grad_norm=0")
    model = model_for(tiny_dir, cfg)
    loop = make_loop(cfg, model, batches(ids, weights))
    plan = loop.steps.plans(0)[0]
    saved = {}
    real_step = loop.optimizer.step

    def capture_then_step():
        saved.update({n: p.grad.clone() for n, p in model.named_parameters()})
        real_step()

    loop.optimizer.step = capture_then_step
    metrics = loop.update(loop.steps.micro_batches(plan))
    return metrics["loss"], saved


def test_accumulation_8x1_equals_1x8(tiny_dir, tmp_path):
    loss_a, grads_a = grads_after_one_step(tiny_dir, tmp_path / "a", micro=8, accum=1)
    loss_b, grads_b = grads_after_one_step(tiny_dir, tmp_path / "b", micro=1, accum=8)
    assert abs(loss_a - loss_b) < 1e-6
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4), name


def run_loop(tiny_dir, out, *overrides, learnable=False, data_seed=0):
    ids, weights = make_data(12, seed=data_seed, learnable=learnable)
    cfg = config(out, "method.type=lora", "lora.r=4", "train.micro_batch_size=2", "train.grad_accum=2",
                 "train.epochs=2", *overrides)
    model = model_for(tiny_dir, cfg)
    summary = make_loop(cfg, model, batches(ids, weights)).run(lambda out, trained: None)
    return model, summary


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("seed", [0, 6])  # data and order; 6 had the highest ratio of seeds 0-9
def test_loss_falls_and_reports_are_written(tiny_dir, tmp_path, seed):
    _, summary = run_loop(tiny_dir, tmp_path, "train.epochs=6", "output.tensorboard=true", "method.type=full",
                          "optim.lr=3e-3", f"train.seed={seed}", learnable=True, data_seed=seed)
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["split"] == "train"]
    assert len(losses) == summary["steps"] == 18
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])  # 0.60-0.67 over data and order seeds 0-9
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "logs").glob("events.out.tfevents*"))
    saved = json.loads((tmp_path / "train_summary.json").read_text())
    assert saved["steps"] == 18 and saved["tokens_per_s"] > 0 and saved["peak_rss_mb"] > 0


def test_resume_reaches_the_same_weights(tiny_dir, tmp_path):
    full, _ = run_loop(tiny_dir, tmp_path / "full")
    run_loop(tiny_dir, tmp_path / "cut", "train.save_every=2", "train.max_steps=4", "train.keep_last=1")
    # the interrupted run stopped at step 4 of 6; resume it with the full budget
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["step-4"]  # keep_last=1 deleted step-2
    resumed, summary = run_loop(tiny_dir, tmp_path / "cut", "train.resume=auto")
    assert summary["steps"] == 6
    a, b = trainable(full), trainable(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


WORKER = r'''
import functools, json, sys, torch
sys.path[:0] = [{here!r}, {tests!r}]
from test_loop import batches, config, make_data, make_loop, model_for, trainable
from posttrain.process import end_process
from posttrain.train.loop import Dist
from pathlib import Path
out = Path(sys.argv[1])
cfg = config(out, "method.type=full", "train.micro_batch_size=2", *sys.argv[2:], "train.max_steps=3")
model = model_for({tiny!r}, cfg)
ids, weights = make_data(12)
dist_ctx = Dist.from_environment(cfg.train)
make_loop(cfg, model, batches(ids, weights), dist_ctx).run(lambda out, trained: None)
if dist_ctx.main:
    torch.save(trainable(model), out / "weights.pt")
end_process(0)  # as the posttrain command ends: leave the group, then os._exit (gloo's threads can abort exit)
'''


def test_two_processes_match_one(tiny_dir, tmp_path):
    script = tmp_path / "worker.py"
    here = Path(__file__).parent
    script.write_text(WORKER.format(here=str(here), tests=str(here.parent), tiny=str(tiny_dir)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, str(script), str(one), "train.grad_accum=2"], check=True, env=env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
    subprocess.run([*torchrun, str(script), str(two), "train.grad_accum=1", "train.distributed=ddp"], check=True,
                   env=env)
    a, b = torch.load(one / "weights.pt"), torch.load(two / "weights.pt")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert json.loads((two / "train_summary.json").read_text())["processes"] == 2
