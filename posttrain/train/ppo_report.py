"""What an RL run shows besides the loop's report: sample responses as JSON lines and the reward/KL plot."""

from __future__ import annotations

import json
from pathlib import Path


def write_sample(out_dir: Path, step: int, sample: dict) -> None:
    """Append one sampled response ({"prompt", "response", "reward"}) to logs/samples.jsonl."""
    with open(out_dir / "logs" / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")


def plot_reward_kl(history: list[dict], path: Path, kl_target: float | None = None) -> None:
    """reward_kl.png: raw reward and KL to the reference per step (+ a 4-step trailing mean; the KL target)."""
    import matplotlib  # heavy (~0.5 s): only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib, ~1 s

    rows = [r for r in history if r["split"] == "train"]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    raw = [r["reward_raw"] for r in rows]
    trailing = [sum(raw[max(0, i - 3):i + 1]) / len(raw[max(0, i - 3):i + 1]) for i in range(len(raw))]
    fig, (ax_r, ax_k) = plt.subplots(1, 2, figsize=(10, 4))
    ax_r.plot(steps, raw, alpha=0.5, label="reward (raw score)")
    ax_r.plot(steps, trailing, color="tab:blue", linewidth=2, label="reward, mean of last 4 steps")
    ax_r.plot(steps, [r["reward_with_kl"] for r in rows], label="reward - beta * KL (shaped)")
    ax_k.plot(steps, [r["kl"] for r in rows], color="tab:red", label="KL to reference (per response)")
    if kl_target is not None:
        ax_k.axhline(kl_target, color="gray", linestyle="--", label="adaptive KL target")
    for ax in (ax_r, ax_k):
        ax.set_xlabel("PPO step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
