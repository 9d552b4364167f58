"""Serving under load with SmolLM2-135M-Instruct: 64 concurrent clients against the serving engine, before and
after continuous batching, fp32 CPU (--dtype bfloat16: bf16 weights on both sides).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/serve_speed.py                     # 64 clients x 2 requests
    python benchmarks/serve_speed.py --clients 16 --requests 1 --max-new-tokens 16     # a quick look
    python benchmarks/serve_speed.py --temperature 1.0 --name serve_speed_sampled      # sampled requests
    python benchmarks/serve_speed.py --repeats 2 --fresh-processes                     # each run its own process
    python benchmarks/serve_speed.py --max-new-tokens 16,128 --name serve_speed_mixed  # short and long requests

Each client thread sends its requests one after another (a new one as soon as the last answer came):
chat replies (greedy, or sampled at --temperature) to alpaca_en_demo instructions (a different one per
request), the same max_tokens (or, given a list, request i takes the list's entry i mod its length).
Sides, each a fresh `serve.engine.Engine` on the same loaded model (max_batch 32, 10 ms gather window):
  before  continuous=False: the queue is drained into `generate` calls of up to 32 rows, each running
          until its longest row ends; requests that arrive meanwhile wait for the whole call
  after   continuous=True: requests join the running batch between decode steps, rows leave as they end
Latency is submit -> answer per request (in-process: no HTTP, which both sides would pay alike);
throughput counts requests and generated tokens over the wall time of the whole load. Sides alternate
(before, after, ...); every greedy request's answer must be the same on both sides (reported; sampled
answers differ by nature, so their count is not).
Writes benchmarks/results/<name>.{json,md}. The alpaca demo set is non-commercial.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, markdown_table, matmul_peak_gflops, versions, write_results  # noqa: E402
from benchmarks.generate_speed import load, prompts_of  # noqa: E402
from benchmarks.mc_eval_speed import cpu_flags  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_side(model, tokenizer, prompts, continuous: bool, clients: int, requests: int, max_new_tokens: list[int],
             temperature: float = 0.0) -> dict:
    from posttrain.serve.engine import Engine, Job, Sampling

    engine = Engine(model, tokenizer, "bench", max_batch=32, continuous=continuous)
    latencies, answers, tokens = [0.0] * len(prompts), [""] * len(prompts), [0] * len(prompts)

    def client(c: int) -> None:
        for r in range(requests):
            i = c * requests + r
            start = time.perf_counter()
            limit = max_new_tokens[i % len(max_new_tokens)]
            job = Job(prompts[i], 1, Sampling(max_new_tokens=limit, temperature=temperature))
            gen = engine.submit(job).result()[0]
            latencies[i], answers[i], tokens[i] = time.perf_counter() - start, gen.text, len(gen.token_ids)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    engine.close()
    return {"wall_s": round(wall, 2), "requests_per_s": len(prompts) / wall, "tokens_per_s": sum(tokens) / wall,
            "tokens": sum(tokens), "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95),
            "max_s": max(latencies), "forward_batches": engine.batches_run, "answers": answers,
            "p50_by_max_tokens": {str(n): statistics.median(latencies[i::len(max_new_tokens)])
                                  for i, n in enumerate(max_new_tokens)}}


def render(result: dict) -> str:
    m, s = result["machine"], result["spec"]
    rows = []
    for side in ("before", "after"):
        r = result["medians"][side]
        rows.append([side, r["requests_per_s"], r["tokens_per_s"], r["p50_s"], r["p95_s"], r["max_s"]])
    ratio = result["ratios"]
    table = markdown_table(["side", "requests/s", "generated tok/s", "p50 latency s", "p95 latency s", "max s"], rows)
    return (f"{m['date']}, {m['cpu']} ({result['cpu_flags']}), {m['cores']} cores, torch "
            f"{result['versions']['torch']} ({m['torch_threads']} threads); matmul peak "
            f"{result['matmul_gflops_before']:.1f} GFLOP/s before, {result['matmul_gflops_after']:.1f} after. "
            f"{s['model']} {s.get('dtype', 'float32')}, {s['clients']} concurrent clients x {s['requests']} requests, "
            f"{'sampled at temperature ' + str(s['temperature']) if s.get('temperature') else 'greedy'}, "
            f"max_tokens {','.join(map(str, s['max_new_tokens']))}, engine max_batch 32; medians of {s['repeats']} "
            f"alternating runs per side"
            f"{' (each run in its own process)' if s.get('fresh_processes') else ''}. "
            f"Same answers on both sides: {result['same_answers']}.\n\n{table}\n\nafter/before: throughput "
            f"**{ratio['throughput']:.2f}x**, p50 latency {ratio['p50']:.2f}x, p95 latency {ratio['p95']:.2f}x\n"
            + by_limit(result))


def by_limit(result: dict) -> str:
    """Median p50 latency of each max_tokens class, when requests had several."""
    limits = result["spec"]["max_new_tokens"]
    if len(limits) < 2:
        return ""
    p50 = {side: {n: statistics.median(r["p50_by_max_tokens"][str(n)] for r in result["runs"][side]) for n in limits}
           for side in ("before", "after")}
    return "\np50 latency by max_tokens: " + "; ".join(
        f"{n}: {p50['before'][n]:.1f} s before, {p50['after'][n]:.1f} s after" for n in limits) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model folder or built-in (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=64, help="concurrent client threads (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another (default: 2)")
    ap.add_argument("--max-new-tokens", type=lambda v: [int(x) for x in v.split(",")], default=[48],
                    help="max_tokens of every request, or a comma list taken in turn (default: 48)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs per side (default: %(default)s)")
    ap.add_argument("--name", default="serve_speed", help="results file stem (default: %(default)s)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the weights' dtype, both sides (default: %(default)s)")
    ap.add_argument("--fresh-processes", action="store_true",
                    help="run every side's run in its own process (the model loaded there, untimed)")
    ap.add_argument("--one-side", choices=["before", "after"], help=argparse.SUPPRESS)  # a --fresh-processes child
    args = ap.parse_args()
    if args.fresh_processes:  # the children load the model; here only the prompts are needed
        from posttrain.models.load import load_tokenizer
        from posttrain.models.sources import resolve_model

        model, tokenizer = None, load_tokenizer(resolve_model(args.model))
    else:
        model, tokenizer = load(args.model, args.dtype)
    prompts = prompts_of(tokenizer, args.clients * args.requests)
    if args.one_side:
        print(json.dumps(run_side(model, tokenizer, prompts, args.one_side == "after", args.clients, args.requests,
                                  args.max_new_tokens, args.temperature)))
        return
    before = matmul_peak_gflops()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for side in ["before", "after"] * args.repeats:
        if args.fresh_processes:
            own = [a for a in sys.argv[1:] if a != "--fresh-processes"]
            child = [sys.executable, __file__, "--one-side", side, *own]
            r = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        else:
            r = run_side(model, tokenizer, prompts, side == "after", args.clients, args.requests,
                         args.max_new_tokens, args.temperature)
        runs[side].append(r)
        print(f"{side}: {r['wall_s']} s, {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, "
              f"p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s ({r['forward_batches']} prefill/generate calls)",
              flush=True)
    answers = [r.pop("answers") for rs in runs.values() for r in rs]
    same = sum(all(a[i] == answers[0][i] for a in answers) for i in range(len(prompts)))
    keys = ("requests_per_s", "tokens_per_s", "p50_s", "p95_s", "max_s", "wall_s")
    medians = {side: {k: statistics.median(r[k] for r in rs) for k in keys} for side, rs in runs.items()}
    result = {"machine": machine(), "cpu_flags": cpu_flags(), "versions": versions("torch", "transformers"),
              "spec": {"model": args.model, "dtype": args.dtype, "fresh_processes": args.fresh_processes,
                       "clients": args.clients, "requests": args.requests,
                       "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "temperature": args.temperature},
              "matmul_gflops_before": before, "matmul_gflops_after": matmul_peak_gflops(), "runs": runs,
              "medians": medians,
              "same_answers": f"{same}/{len(prompts)}" if args.temperature <= 0 else "not expected (sampled)",
              "ratios": {"throughput": medians["after"]["requests_per_s"] / medians["before"]["requests_per_s"],
                         "p50": medians["after"]["p50_s"] / medians["before"]["p50_s"],
                         "p95": medians["after"]["p95_s"] / medians["before"]["p95_s"]}}
    write_results(args.name, result, render)


if __name__ == "__main__":
    main()
