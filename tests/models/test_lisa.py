"""LISA on a 4-block tiny model: the active block set changes every K steps as drawn, only the
always-on parameters and the active blocks get gradients and change, frozen blocks hold no
optimizer state, and the SFT stage runs with it end to end (checkpoint + resume included)."""

import json

import torch

from posttrain.train.config import load_config
from posttrain.models.lisa import LisaSchedule
from posttrain.models.methods import apply_method, optimizer_groups, step_hook
from posttrain.models.tiny import build_model


def _setup(tiny_tokenizer, layers=1, interval=2):
    cfg = load_config(None, ["model.name_or_path=tiny-random", "method.type=lisa"], **{
        "data.datasets": [{"path": "x.jsonl"}], "lisa.layers": layers, "lisa.interval": interval})
    model = apply_method(build_model(tiny_tokenizer, layers=4), cfg.methods)
    return cfg, model


def _block(name: str) -> int | None:
    return int(name.split(".")[2]) if name.startswith("model.layers.") else None


def test_active_blocks_change_on_schedule_and_only_they_train(tiny_tokenizer):
    cfg, model = _setup(tiny_tokenizer)
    schedule = step_hook(model, cfg.methods, cfg.train.seed)
    assert isinstance(schedule, LisaSchedule)
    optim = torch.optim.AdamW(optimizer_groups(model, cfg.methods, cfg.optim.lr), lr=1e-2, weight_decay=0.0)
    assert len(optim.param_groups[0]["params"]) == len(list(model.parameters()))  # owns every block
    ids = torch.randint(3, 500, (2, 10))
    seen = []
    for step in range(12):
        schedule(step, optim)
        active = schedule.active
        assert len(active) == 1 and active == schedule.draw(step)
        if step % 2 == 1:
            assert active == seen[-1]  # no switch inside an interval of K=2 steps
        seen.append(active)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in model.named_parameters():
            block = _block(name)
            assert (p.grad is not None) == (block is None or block in active), name
        optim.step()
        optim.zero_grad(set_to_none=True)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed == {n for n in before if _block(n) is None or _block(n) in active}
        # Adam moments exist only for the always-on parameters and the active block.
        stateful = {n for n, p in model.named_parameters() if p in optim.state}
        assert stateful == changed
    assert len({tuple(a) for a in seen}) > 1  # fresh draws do pick other blocks


def test_trainable_per_step_counts_gamma_blocks(tiny_tokenizer):
    cfg, model = _setup(tiny_tokenizer, layers=2)
    schedule = step_hook(model, cfg.methods, cfg.train.seed)
    block = sum(p.numel() for n, p in model.named_parameters() if _block(n) == 0)
    outside = sum(p.numel() for n, p in model.named_parameters() if _block(n) is None)
    assert schedule.trainable_per_step(model) == outside + 2 * block


def test_lisa_sft_run_with_checkpoint_resume(tmp_path, tiny_dir):
    from posttrain.train import sft

    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say {w}", "output": f"{w} {w} {w}"} for w in ("red", "blue", "green", "gold")] * 4
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    overrides = {"data.datasets": [{"path": str(data)}], "model.name_or_path": str(tiny_dir), "method.type": "lisa",
                 "lisa.layers": 1, "lisa.interval": 2, "train.max_steps": 4, "train.save_every": 2,
                 "train.micro_batch_size": 4, "optim.lr": 1e-2, "output.dir": str(tmp_path / "run"),
                 "output.tensorboard": False, "train.device": "cpu"}
    full = sft.run(load_config(None, [], **overrides))
    assert full["steps"] == 4 and full["trainable_params"] < full["total_params"]
    resumed = sft.run(load_config(None, [], **{**overrides, "train.resume": str(tmp_path / "run/checkpoints/step-2"),
                                                "output.dir": str(tmp_path / "run2")}))
    assert resumed["final_train_loss"] == full["final_train_loss"]
