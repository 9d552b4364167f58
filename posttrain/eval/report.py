"""Markdown reports with PNG plots: accuracy per subject, rating intervals, win-rate matrix."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib  # heavy: matplotlib, ~1 s

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt  # heavy: matplotlib, ~1 s

    return plt


def plot_ratings(rows: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    rows = sorted(rows, key=lambda r: r["rating"])
    fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * len(rows)))
    ys = range(len(rows))
    ax.errorbar([r["rating"] for r in rows], ys, fmt="o",
                xerr=[[r["rating"] - r["lower"] for r in rows], [r["upper"] - r["rating"] for r in rows]], capsize=4)
    ax.set_yticks(list(ys), [r["model"] for r in rows])
    ax.set_xlabel("rating (95% bootstrap interval)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_win_matrix(matrix: dict[str, dict[str, float]], path: Path) -> None:
    """Heatmap of the row model's win rate against the column model (ties count as neither)."""
    plt = _plt()
    names = list(matrix)
    grid = [[matrix[r].get(c, float("nan")) for c in names] for r in names]
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(names), 1 + 1.0 * len(names)))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.2f}", ha="center", va="center")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_title("win rate of row vs column")
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ci(pair) -> str:
    return f"[{pair[0]:.2f}, {pair[1]:.2f}]"


def _win_table(rows: list[dict]) -> list[str]:
    lines = ["| model | opponent | n | win | tie | loss | win 95% CI | tie 95% CI | loss 95% CI |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['opponent']} | {r['n']} | {r['win_rate']:.2f} | {r['tie_rate']:.2f} | "
              f"{r['loss_rate']:.2f} | {_ci(r['win_ci'])} | {_ci(r['tie_ci'])} | {_ci(r['loss_ci'])} |" for r in rows]
    return lines


def write_compare_report(out: Path, result: dict) -> Path:
    """report.md with win/tie/loss (Wilson intervals), the win-rate matrix, BT and Elo ratings
    (bootstrap intervals), per-category win rates when present, and three PNG plots; the votes
    without a verdict are counted at the top, and with no decided vote the report says so and stops."""
    lines = [f"# Pairwise comparison: {result['votes']} votes", "",
             f"Judge: `{result['judge']}`. {result.get('prompts_label', 'Prompts')}: `{result['prompts']}`. Models: "
             + ", ".join(f"`{n}` = `{r}`" for n, r in result["models"].items()) + "."]
    if result.get("left_out"):  # eval ratings: votes read but not rated, by reason
        lines += ["", f"{result['read']} vote lines read; left out: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(result["left_out"].items())) + "."]
    if result.get("no_verdict"):
        lines += ["", f"{result['no_verdict']} judged pairs got a judge reply without a verdict (`winner: null` in "
                  "votes.jsonl, counted as `no_verdict`); they are left out of the rates and ratings below."]
    path = out / "report.md"
    if not result["votes"]:
        path.write_text("\n".join(lines + ["", "No vote has a winner, so there are no rates or ratings."]) + "\n",
                        encoding="utf-8")
        return path
    plot_ratings(result["bradley_terry"], out / "ratings_bt.png", "Bradley-Terry")
    plot_ratings(result["elo"], out / "ratings_elo.png", "Elo (K=4)")
    plot_win_matrix(result["win_matrix"], out / "win_matrix.png")
    names = list(result["win_matrix"])
    lines += ["", "## Win / tie / loss (95% Wilson intervals)", "", *_win_table(result["win_rates"])]
    for cat, rows in result.get("by_category", {}).items():
        lines += ["", f"### Prompt category `{cat}`", "", *_win_table(rows)]
    lines += ["", "## Win-rate matrix (row vs column; ties count for neither)", "",
              "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(f"{result['win_matrix'][r][c]:.2f}" if c in result["win_matrix"][r] else "-"
                                       for c in names) + " |" for r in names]
    lines += ["", "![win matrix](win_matrix.png)"]
    plots = (("bradley_terry", "Bradley-Terry", "ratings_bt.png"), ("elo", "Elo (K=4)", "ratings_elo.png"))
    for key, title, png in plots:
        lines += ["", f"## {title} ratings (Elo scale, mean 1000; 95% bootstrap interval)", "",
                  "| rank | model | rating | interval |", "|---|---|---|---|"]
        lines += [f"| {r['rank']} | {r['model']} | {r['rating']:.0f} | [{r['lower']:.0f}, {r['upper']:.0f}] |"
                  for r in result[key]]
        lines += ["", f"![{title}]({png})"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _mc_category_notes(summary: dict) -> list[str]:
    """Paragraphs (each after a blank line) on overlapping categories and uncategorized subjects."""
    notes = []
    if summary.get("categories_overlap"):
        notes += ["", "A subject may count in two categories (as the benchmark's own map has it)."]
    if summary.get("uncategorized_subjects"):
        notes += ["", f"{len(summary['uncategorized_subjects'])} subject(s) in no category, reported as "
                      f"`uncategorized`: {', '.join(summary['uncategorized_subjects'])}."]
    return notes


def write_mc_report(out: Path, summary: dict) -> Path:
    """report.md (how it was scored, categories, predicted vs correct letters, subjects) and accuracy.png."""
    plt = _plt()
    subjects = summary["subjects"]
    fig, ax = plt.subplots(figsize=(7, 1 + 0.22 * len(subjects)))
    names = list(subjects)
    ax.barh(range(len(names)), [100 * subjects[s]["accuracy"] for s in names])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("accuracy (%)")
    ax.set_xlim(0, 100)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)
    s, o = summary["settings"], summary["overall"]
    lines = [f"# Multiple choice: `{s['model']}` on `{s['data']}` ({s['split']}, {s['shots']}-shot, {s['prompt']})",
             "", f"Overall accuracy {100 * o['accuracy']:.1f}% over {o['n']} questions "
             f"(mean of subjects {100 * o['macro_accuracy']:.1f}%).", "",
             f"Scoring: **{s['scoring']}** (length normalisation: {s['normalization']}). "
             f"Categories: the {s['category_map']} map (file layout: {s['layout']}).", *_mc_category_notes(summary),
             "", "| category | n | accuracy |", "|---|---|---|"]
    lines += [f"| {c} | {v['n']} | {100 * v['accuracy']:.1f}% |" for c, v in summary["categories"].items()]
    letters = sorted(set(summary["predictions"]) | set(summary["answers"]))
    lines += ["", "| letter | predicted | correct answer |", "|---|---|---|"]
    lines += [f"| {k} | {summary['predictions'].get(k, 0)} | {summary['answers'].get(k, 0)} |" for k in letters]
    lines += ["", "| subject | n | accuracy |", "|---|---|---|"]
    lines += [f"| {n} | {v['n']} | {100 * v['accuracy']:.1f}% |" for n, v in subjects.items()]
    lines += ["", "![accuracy per subject](accuracy.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
