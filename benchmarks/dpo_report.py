"""The DPO-LoRA benchmark's Markdown report (benchmarks/dpo_lora_vs_trl.py): medians, ratios, sanity check."""

from __future__ import annotations

from benchmarks.common import markdown_table


def sanity_rows(runs: dict[str, list[dict]]) -> tuple[list[list], float]:
    """Per side: first run's reference log-probs and token counts of the first pairs; max |diff| vs TRL."""
    rows, ref = [], runs["trl"][0]["sanity"]
    worst = 0.0
    for side, rs in runs.items():
        s = rs[0]["sanity"]
        diff = max(abs(a - b) for key in ("chosen_logps", "rejected_logps") for a, b in zip(s[key], ref[key]))
        worst = max(worst, diff)
        rows.append([side, " / ".join(f"{v:.3f}" for v in s["chosen_logps"]),
                     " / ".join(f"{v:.3f}" for v in s["rejected_logps"]),
                     " / ".join(str(int(v)) for v in s["chosen_tokens"] + s["rejected_tokens"]),
                     rs[0]["first_loss"], diff])
    return rows, worst


def render_markdown(result: dict) -> str:
    med, peak, s = result["medians"], result["matmul_peak_gflops"], result["spec"]
    headers = ["side", "runs", "tokens/s", "supervised tok/s", "train s", "process s", "peak RSS MB",
               "first loss", "final loss", "padding", "positions run / token", "model GFLOP/s", "MFU"]
    rows = [[side, len(result["runs"][side]), m["tokens_per_s"], m["loss_tokens_per_s"], m["train_s"],
             m["process_wall_s"], m["peak_rss_mb"], m["first_loss"], m["final_loss"],
             f"{100 * m['padding_fraction']:.1f}%", m["computed_per_token"], m["model_gflops_per_s"],
             f"{100 * m['model_gflops_per_s'] / peak:.1f}%"] for side, m in med.items()]
    sanity, worst = sanity_rows(result["runs"])
    return "\n\n".join([
        f"# DPO-LoRA: posttrain vs TRL DPOTrainer ({result['machine']['date']})",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch threads "
        f"{result['machine']['torch_threads']}. Versions: {result['versions']}.",
        f"Data: {s['data']} from row {s['start']}: {s['rows']} pairs that fit max length {s['max_length']} "
        f"({s['skipped']} longer rows skipped); SmolLM2-135M-Instruct fp32; LoRA r={s['lora_r']} "
        f"alpha={s['lora_alpha']} all-linear; sigmoid DPO beta={s['beta']}, reference = base with adapters off; "
        f"{s['steps']} optimizer steps of {s['micro']}x{s['accum']} pairs; order {result['order']}.",
        f"fp32 matmul peak (2048^3, best of 8, measured before and after the runs): {peak:.1f} GFLOP/s "
        f"(before {result['matmul_gflops_before']:.1f}, after {result['matmul_gflops_after']:.1f}).",
        "Medians per side:", markdown_table(headers, rows), "Ratios (medians):",
        markdown_table(["ratio", "value"], [[k, f"{v:.2f}x"] for k, v in result["ratios"].items()]),
        f"Sanity (first run of each side, before training): reference log-probs of the first {s['sanity_pairs']} "
        f"pairs by each tool's own code, their token counts (chosen... / rejected...), and the first step's loss "
        f"(log 2 = 0.693 while LoRA B = 0). Largest log-prob difference between the tools: {worst:.4f}.",
        markdown_table(["side", "chosen logp", "rejected logp", "tokens", "first loss", "max |diff| vs TRL"],
                       sanity),
        "Tokens count the chosen and rejected sequences as rendered (the prompt once per response), the same "
        "for both tools; supervised tokens are the response tokens. Positions run / token: positions the model "
        "computed per such token (above 1: padding; below 1: posttrain stores a prompt once for its responses). "
        "Model FLOPs: policy forward + backward (LoRA-aware, head at response positions) plus the reference "
        "forward over those tokens, identical for both tools (a shared prompt does less than this work); "
        "MFU = model FLOP/s / matmul peak.",
    ]) + "\n"
