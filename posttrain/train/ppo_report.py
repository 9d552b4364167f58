"""What a PPO run shows besides the loop's report: the reward / KL plot."""

from __future__ import annotations

from pathlib import Path

from posttrain.train.reporting import figure, plot_trailing, train_rows


def plot_reward_kl(history: list[dict], path: Path, kl_target: float | None = None) -> None:
    """reward_kl.png: raw reward and KL to the reference per step (+ a 4-step trailing mean; the KL target)."""
    rows, steps = train_rows(history)
    if not rows:
        return
    with figure(path, 2, xlabel="PPO step") as (ax_r, ax_k):
        plot_trailing(ax_r, steps, [r["reward_raw"] for r in rows], "reward (raw score)",
                      "reward, mean of last 4 steps", alpha=0.5)
        ax_r.plot(steps, [r["reward_with_kl"] for r in rows], label="reward - beta * KL (shaped)")
        ax_k.plot(steps, [r["kl"] for r in rows], color="tab:red", label="KL to reference (per response)")
        if kl_target is not None:
            ax_k.axhline(kl_target, color="gray", linestyle="--", label="adaptive KL target")
