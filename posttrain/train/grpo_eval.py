"""What a GRPO run measures besides its training metrics: greedy held-out rewards and accuracy, and the plot.

Held-out prompts are answered greedily (temperature 0, through the one generation layer) and scored by
the run's own reward sources, so `accuracy` before and after training is exact match of the final
answer on prompts the policy never trained on. Prompts are sharded over processes and the counts summed;
with sharded weights (FSDP, ZeRO-3) every process runs the same generate calls, a process with fewer
prompts a filler call whose replies are not counted. The policy answers as rollouts sample it: LoRA merged,
outside autocast (`rollout.sampling_weights`).
"""

from __future__ import annotations

import torch

from posttrain.models.generate import generate_from_ids
from posttrain.train.reporting import figure, plot_trailing, train_rows
from posttrain.train.rollout import sampling_weights

SAMPLES_KEPT = 3  # greedy replies kept for the summary's before / after comparison


@torch.no_grad()
def greedy_eval(policy, tokenizer, prompts: list, rewards, *, max_new_tokens: int, stop: list[str],
                batch_size: int, dist_ctx) -> tuple[dict, list[dict]]:
    """(metrics over every process's prompts: reward, reward/<source>, accuracy, response_tokens; the greedy
    replies to the first SAMPLES_KEPT prompts, with their rewards, gathered from the processes that answered them)."""
    mine = prompts[dist_ctx.rank::dist_ctx.world]
    policy.eval()
    sums, tokens, samples = torch.zeros(len(rewards.names), dtype=torch.float64), 0, []
    calls = -(-len(mine) // batch_size)
    if dist_ctx.lockstep:  # every forward is a collective: the same number of generate calls everywhere
        calls = dist_ctx.max(calls)
    with sampling_weights(policy, dist_ctx.lockstep):  # LoRA merged once for all the calls
        for start in range(0, calls * batch_size, batch_size):
            chunk = mine[start:start + batch_size]
            gens = generate_from_ids(policy, tokenizer, [q.ids for q in chunk or prompts[:1]],
                                     max_new_tokens=max_new_tokens, temperature=0.0, stop=stop or None,
                                     synced=dist_ctx.lockstep)
            if not chunk:  # the filler call of a process with fewer prompts
                continue
            scores = rewards.score([q.text for q in chunk], [g.text for g in gens], [q.reference for q in chunk])
            sums += scores.double().sum(0)
            tokens += sum(len(g.token_ids) for g in gens)
            for j, (q, gen, total) in enumerate(zip(chunk, gens, rewards.total(scores).tolist())):
                if start + j < SAMPLES_KEPT:  # the run's first prompts are among each process's first ones
                    samples.append((dist_ctx.rank + dist_ctx.world * (start + j), {
                        "prompt": q.text, "reference": q.reference, "response": gen.text, "reward": total}))
    kept = sorted((s for part in dist_ctx.gather(samples) for s in part), key=lambda s: s[0])[:SAMPLES_KEPT]
    n, tokens, *sums = dist_ctx.sum([float(len(mine)), float(tokens), *sums.tolist()])
    means = {f"reward/{name}": s / max(n, 1.0) for name, s in zip(rewards.names, sums)}
    total = float(torch.tensor(sums, dtype=torch.float64) @ rewards.weights.double())  # the weighted sum
    metrics = {"reward": total / max(n, 1.0), **means, "response_tokens": tokens / max(n, 1.0)}
    if rewards.accuracy is not None:
        metrics["accuracy"] = means[f"reward/{rewards.accuracy}"]
    return metrics, [sample for _, sample in kept]


def plot_rewards(history: list[dict], path, names: list[str]) -> None:
    """reward_accuracy.png: sampled reward per step (each source and a 4-step trailing mean of the sum), and
    accuracy of the samples per step with greedy held-out accuracy at each evaluation."""
    rows, steps = train_rows(history)
    if not rows:
        return
    with figure(path, 2, xlabel="GRPO step") as (ax_r, ax_a):
        plot_trailing(ax_r, steps, [r["reward"] for r in rows], "reward (weighted sum), sampled",
                      "reward, mean of last 4 steps", alpha=0.4)
        if len(names) > 1:
            for name in names:
                ax_r.plot(steps, [r[f"reward/{name}"] for r in rows], linestyle="--", label=f"reward/{name}")
        if "accuracy" in rows[0]:
            ax_a.plot(steps, [r["accuracy"] for r in rows], alpha=0.5, label="accuracy of the samples")
        evals = [r for r in history if r["split"] == "eval" and "accuracy" in r]
        if evals:
            ax_a.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", color="tab:red",
                      label="held-out accuracy, greedy")
