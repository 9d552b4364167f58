"""What a run tells the user: progress bar, metrics JSONL, TensorBoard, loss PNG, summary JSON; and what every
stage's report shares: sampled responses as JSON lines (RL stages) and the plot figure."""

from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

SUMMARY_FILE = "train_summary.json"


def already_complete(out_dir: Path, step: int, total_steps: int) -> dict | None:
    """What a resumed run returns instead of training when nothing is left: its final step is checkpointed
    and its summary written (a run cut between the two still finishes its tail). Else None."""
    if step < total_steps or not (Path(out_dir) / SUMMARY_FILE).is_file():
        return None
    return {"already_complete": True, "steps": step, "total_steps": total_steps}


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (Linux reports KiB), and CUDA peak allocated if used."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class RunReport:
    """Rank-0 reporting; other ranks get a silent instance (enabled=False)."""

    def __init__(self, out_dir: Path, total_steps: int, *, enabled: bool, tensorboard: bool, start_step: int = 0):
        self.enabled = enabled
        self.log_dir = Path(out_dir) / "logs"
        self.out_dir = Path(out_dir)
        self.start = time.perf_counter()
        self.tokens = 0
        self.loss_tokens = 0
        self.history: list[dict] = []
        self.bar = self.tb = self.jsonl = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0:
            self.history = self._rows_until(start_step)
        self.jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # heavy: tensorboard (~2 s), only with train.tensorboard

            self.tb = SummaryWriter(str(self.log_dir))
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    def _rows_until(self, start_step: int) -> list[dict]:
        """On resume: the logged rows up to the checkpoint, kept; later rows (redone after resume) dropped."""
        path = self.log_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [r for r in rows if r["step"] <= start_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return rows

    def step(self, step: int, metrics: dict, *, tokens: int, loss_tokens: int, log: bool) -> None:
        self.tokens += tokens
        self.loss_tokens += loss_tokens
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        metrics = {**metrics, "tokens_per_s": self.tokens / max(elapsed, 1e-9)}
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}")
        if log:
            self.write(step, "train", metrics)

    def last_train(self, key: str):
        """The latest logged training value of `key` (also from before a resume), or None."""
        return next((r[key] for r in reversed(self.history) if r["split"] == "train" and key in r), None)

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(f"{split}/{key}", float(value), step)

    def eval(self, step: int, metrics: dict) -> None:
        if self.enabled:
            self.bar.write(f"eval step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        self.write(step, "eval", metrics)

    def finish(self, summary: dict) -> dict:
        """Close writers, draw the loss curve, write train_summary.json; returns the summary."""
        elapsed = time.perf_counter() - self.start
        summary = {
            **summary, "wall_time_s": round(elapsed, 2), "tokens": self.tokens,
            "loss_tokens": self.loss_tokens, "tokens_per_s": round(self.tokens / max(elapsed, 1e-9), 2),
            "loss_tokens_per_s": round(self.loss_tokens / max(elapsed, 1e-9), 2), **peak_memory_mb(),
        }
        if not self.enabled:
            return summary
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        self._plot()
        (self.out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        return summary

    def _plot(self) -> None:
        with figure(self.out_dir / "loss.png", figsize=(7, 4), xlabel="optimizer step", ylabel="loss") as (ax,):
            for split, style in (("train", "-"), ("eval", "o-")):
                points = [(r["step"], r["loss"]) for r in self.history if r["split"] == split and "loss" in r]
                if points:
                    ax.plot(*zip(*points), style, label=split)


def write_sample(out_dir: Path, step: int, sample: dict) -> None:
    """Append one sampled response ({"prompt", "response", "reward", ...}) to logs/samples.jsonl."""
    with open(Path(out_dir) / "logs" / "samples.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")


@contextmanager
def figure(path: Path, panels: int = 1, *, figsize=(10, 4), xlabel: str, ylabel: str | None = None):
    """The axes of a row of `panels` plots; on exit each gets its labels, legend and grid, and the PNG is saved."""
    import matplotlib  # heavy: matplotlib, ~1 s

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib, ~1 s

    fig, axes = plt.subplots(1, panels, figsize=figsize)
    axes = [axes] if panels == 1 else list(axes)
    yield axes
    for ax in axes:
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_rows(history: list[dict]) -> tuple[list[dict], list[int]]:
    """The training rows of a run's metric history and their steps (what the RL plots draw per step)."""
    rows = [r for r in history if r["split"] == "train"]
    return rows, [r["step"] for r in rows]


def plot_trailing(ax, steps: list, values: list, label: str, mean_label: str, alpha: float, window: int = 4) -> None:
    """`values` per step (faint) and their mean over the last `window` steps (bold): RL rewards are noisy."""
    trailing = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                for i in range(len(values))]
    ax.plot(steps, values, alpha=alpha, label=label)
    ax.plot(steps, trailing, color="tab:blue", linewidth=2, label=mean_label)
