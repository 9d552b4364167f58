"""Generation speed with SmolLM2-135M-Instruct: posttrain's decode loop vs plain HF `model.generate`, fp32 CPU.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/generate_speed.py                  # batch 1, 8, 32
    python benchmarks/generate_speed.py --batches 8 --repeats 1 --max-new-tokens 32    # a quick look

Both sides get the same chat prompts (the first N instructions of alpaca_en_demo, rendered by the
model's chat template), the same max_new_tokens, greedy decoding and the same stop tokens (the
template's end of turn); outputs must be token-identical (checked per row, reported). Sides:
  hf         `model.generate(input_ids, attention_mask, GenerationConfig(do_sample=False, eos...))`,
             one left-padded batch: every row is computed until the last row stops
  posttrain  `models.generate.generate_from_ids` (models/decode.py: rows leave the batch as they stop; linear
             layers through oneDNN, models/onednn_linear.py; a hand-written decode step, models/decode_step.py)
  posttrain-mkl  the same with POSTTRAIN_ONEDNN=0: linear layers on torch's default MKL path (the before)
  posttrain-packed  the same call on a copy of the model whose oneDNN weights were made once before the runs and
             kept (`onednn_linear.swap_in(head="both")`), as chat, serve, eval and rollouts hold them across
             their calls; a plain call makes them at every call (SmolLM2: 480 MB, 70-230 ms, in the posttrain
             column). Greedy steps of both take the argmax from a bfloat16 copy of the LM head where the CPU has
             bfloat16 (models/greedy_head.py: exact, the float32 logits of the candidates recomputed)
Runs alternate (hf, posttrain, hf, posttrain ...) in one process after an untimed whole call of each side (with a
4-token warm-up, HF's batch-8 calls ran ~10% faster after the batch-1 runs than alone), and the medians are
reported. Tokens/s counts generated tokens (each row up to and including its stop token)
over the whole call (prefill included). "row-steps" counts the (row, step) forward positions each side
computes; the difference to the generated tokens is the padding waste of a batch whose rows stop at
different steps. The step profile times one decode forward (100-token cache; HF's, and in brackets the
hand-written step returning logits and the greedy one returning tokens) against its linear layers alone: the
floor that no decode loop gets under in fp32 (the weights are streamed from memory each step).
Writes benchmarks/results/<name>.{json,md}. The alpaca demo set is non-commercial.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ASSETS, machine, markdown_table, matmul_peak_gflops, versions, write_results  # noqa: E402
from benchmarks.mc_eval_speed import cpu_flags  # noqa: E402

DATA = ASSETS / "data" / "llamafactory" / "alpaca_en_demo.json"


def load(model_name: str, dtype: str = "float32"):
    import torch

    from posttrain.models.load import load_tokenizer
    from posttrain.models.sources import resolve_model
    from transformers import AutoModelForCausalLM

    path = resolve_model(model_name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval(), load_tokenizer(path)


def prompts_of(tokenizer, n: int) -> list[list[int]]:
    from posttrain.records import Message
    from posttrain.templates.render import encode_prompt

    rows = json.loads(DATA.read_text(encoding="utf-8"))
    return [encode_prompt([Message("user", (r["instruction"] + "\n" + r["input"]).strip())], tokenizer)
            for r in rows[:n]]


def side_hf(model, tokenizer, prompts, max_new_tokens):
    import torch
    from transformers import GenerationConfig

    from posttrain.models.generate import pad_id_of, stop_token_ids

    stops = stop_token_ids(model, tokenizer)
    pad = pad_id_of(tokenizer, stops)
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, width:].tolist()
    rows = [r[: next((i + 1 for i, t in enumerate(r) if t in stops), len(r))] for r in out]
    return rows, len(prompts) * max(map(len, rows))  # every row runs every step


def side_posttrain(model, tokenizer, prompts, max_new_tokens):
    from posttrain.models.generate import generate_from_ids, stop_token_ids

    stops = set(stop_token_ids(model, tokenizer))
    gens = generate_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, strip=False)
    rows = [g.token_ids + ([next(iter(stops))] if g.finish_reason == "stop" else []) for g in gens]
    return rows, sum(map(len, rows))  # a row leaves the batch after its last token


def side_posttrain_mkl(model, tokenizer, prompts, max_new_tokens):
    """posttrain's loop with every linear layer on torch's default (MKL) path: the before of the oneDNN products."""
    import os

    from posttrain.models.onednn_linear import ENV

    os.environ[ENV] = "0"
    try:
        return side_posttrain(model, tokenizer, prompts, max_new_tokens)
    finally:
        del os.environ[ENV]


_PACKED: dict = {}  # id(model) -> (its copy with oneDNN weights kept, seconds the packing took)


def packed_copy(model):
    """A copy of `model` whose linear layers compute through oneDNN copies made once (and the seconds that took),
    so that the other sides keep their plain layers."""
    import copy

    from posttrain.models.onednn_linear import swap_in

    if id(model) not in _PACKED:
        held = copy.deepcopy(model)
        start = time.perf_counter()
        swap_in(held, head="both")  # as the serving engine's (and greedy chat's, eval's) copies
        _PACKED[id(model)] = (held, time.perf_counter() - start)
    return _PACKED[id(model)]


def side_posttrain_packed(model, tokenizer, prompts, max_new_tokens):
    """posttrain's call with the oneDNN weights made once and kept across calls (chat / serve / eval hold them)."""
    return side_posttrain(packed_copy(model)[0], tokenizer, prompts, max_new_tokens)


SIDES = {"hf": side_hf, "posttrain": side_posttrain, "posttrain-mkl": side_posttrain_mkl,
         "posttrain-packed": side_posttrain_packed}


def stop_tokens_equal(a: list[list[int]], b: list[list[int]], stops: set[int]) -> int:
    """Rows whose generated tokens agree (a row's stop token counts as any stop token)."""
    norm = [[[-1 if t in stops else t for t in row] for row in side] for side in (a, b)]
    return sum(x == y for x, y in zip(*norm))


def step_profiles(model, batch: int) -> dict:
    """The step profile on torch's default linear path and with the oneDNN products."""
    from posttrain.models.onednn_linear import onednn_linears

    mkl = step_profile(model, batch)
    with onednn_linears(model, head="both"):
        return {"mkl": mkl, "onednn": step_profile(model, batch)}


def step_profile(model, batch: int, context: int = 100, repeats: int = 10) -> dict:
    """Where a decode step's time goes: one forward of `batch` tokens over a `context`-token KV cache (HF's forward,
    and posttrain's hand-written step where it runs: models/decode_step.py), against the same step's linear
    products alone (every weight streamed once, the FLOPs of the step: the floor no decode loop gets under; a
    stacked q/k/v or gate/up product counted once) and the LM head alone (ms, best of `repeats`)."""
    import torch
    from transformers import DynamicCache

    from posttrain.models.decode_step import DecodeStep
    from posttrain.models.kv_cache import growing_cache

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * min(times)

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m: torch.randn(batch, m.in_features, dtype=m.weight.dtype) for m in linears}
    products = {}  # one call per product: a stacked group's (onednn_linear.FusedSiblings) once
    for m in linears:
        fused = m.__dict__.get("_onednn_fused")
        products.setdefault(id(fused) if fused is not None else id(m), (fused or m, inputs[m]))
    with torch.no_grad():
        vocab = model.config.vocab_size
        context_ids = torch.randint(0, vocab, (batch, context))
        cache, growing = DynamicCache(config=model.config), growing_cache(model.config)  # generate's, decode's
        for kv in (cache, growing):
            model(input_ids=context_ids, past_key_values=kv, use_cache=True, logits_to_keep=1)
        token = torch.randint(0, vocab, (batch, 1))
        lean = DecodeStep.of(model)
        mask, position = torch.ones(batch, context + 1, dtype=torch.long), torch.full((batch,), context)

        def step():
            model(input_ids=token, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the token again: the same context every time

        def lean_step(greedy: bool = False):
            (lean.greedy if greedy else lean.step)(token[:, 0], mask, position, growing)
            growing.crop(-1)
        greedy = lean is not None and lean.greedy_head is not None  # models/greedy_head.py
        return {"step_ms": best(step), "lean_step_ms": best(lean_step) if lean is not None else None,
                "lean_greedy_ms": best(lambda: lean_step(greedy=True)) if greedy else None,
                "linears_ms": best(lambda: [f(x) for f, x in products.values()]),
                "head_ms": best(lambda: model.lm_head(inputs[model.lm_head]))}


def run_batch(model, tokenizer, prompts, max_new_tokens: int, repeats: int) -> dict:
    from posttrain.models.generate import stop_token_ids

    stops = set(stop_token_ids(model, tokenizer))
    for fn in SIDES.values():  # warm-up: a whole call of each side, untimed (first-call allocations, lazy imports,
        fn(model, tokenizer, prompts, max_new_tokens)  # and the allocator's state after calls of this size)
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    outputs: dict[str, list] = {}
    for side in list(SIDES) * repeats:
        start = time.perf_counter()
        rows, row_steps = SIDES[side](model, tokenizer, prompts, max_new_tokens)
        seconds = time.perf_counter() - start
        tokens = sum(map(len, rows))
        runs[side].append({"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": tokens / seconds,
                           "row_steps": row_steps})
        outputs[side] = rows
        print(f"batch {len(prompts)} {side}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s "
              f"({row_steps} row-steps)", flush=True)
    med = {s: statistics.median(r["tokens_per_s"] for r in rs) for s, rs in runs.items()}
    lengths = sorted(map(len, outputs["hf"]))
    profile = step_profiles(model, len(prompts))
    print(f"batch {len(prompts)} decode step: {profile}", flush=True)
    return {"batch": len(prompts), "profile": profile, "runs": runs, "tokens_per_s": med,
            "speedup": med["posttrain"] / med["hf"], "speedup_mkl": med["posttrain-mkl"] / med["hf"],
            "speedup_packed": med["posttrain-packed"] / med["hf"], "packing_s": round(packed_copy(model)[1], 3),
            "identical_rows": f"{stop_tokens_equal(outputs['hf'], outputs['posttrain'], stops)}/{len(prompts)}",
            "identical_rows_mkl": f"{stop_tokens_equal(outputs['hf'], outputs['posttrain-mkl'], stops)}/{len(prompts)}",
            "identical_rows_packed":
                f"{stop_tokens_equal(outputs['hf'], outputs['posttrain-packed'], stops)}/{len(prompts)}",
            "lengths": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
            "posttrain_rows": outputs["posttrain"]}  # to compare runs at another dtype


def render(result: dict) -> str:
    m = result["machine"]
    def step(profile: dict) -> str:
        greedy = f", greedy {profile['lean_greedy_ms']:.1f}" if profile.get("lean_greedy_ms") else ""
        lean = f" ({profile['lean_step_ms']:.1f}{greedy})" if profile.get("lean_step_ms") else ""
        return f"{profile['step_ms']:.1f}{lean} / {profile['linears_ms']:.1f} / {profile['head_ms']:.1f}"
    rows = [[c["batch"], c["tokens_per_s"]["hf"], c["tokens_per_s"]["posttrain-mkl"], c["tokens_per_s"]["posttrain"],
             c["tokens_per_s"]["posttrain-packed"], f"{c['speedup_mkl']:.2f}x", f"**{c['speedup']:.2f}x**",
             f"{c['speedup_packed']:.2f}x",
             f"{c['identical_rows']} ({c['identical_rows_mkl']}, {c['identical_rows_packed']})",
             "{min}/{median}/{max}".format(**c["lengths"]),
             f"{c['runs']['hf'][0]['row_steps']} / {c['runs']['posttrain'][0]['row_steps']}",
             step(c["profile"]["mkl"]), step(c["profile"]["onednn"])] for c in result["cases"]]
    table = markdown_table(["batch", "HF generate tok/s", "posttrain MKL tok/s", "posttrain oneDNN tok/s",
                            "posttrain, packed once, tok/s", "MKL/HF", "oneDNN/HF", "packed once/HF",
                            "identical rows oneDNN (MKL, packed once)", "tokens per row min/median/max",
                            "row-steps HF / posttrain", "step / linears / head ms, MKL",
                            "step (hand-written step, greedy step) / linears / head ms, oneDNN"], rows)
    return (f"{m['date']}, {m['cpu']} ({result['cpu_flags']}), {m['cores']} cores, torch "
            f"{result['versions']['torch']}, transformers {result['versions']['transformers']} "
            f"({m['torch_threads']} threads); matmul peak {result['matmul_gflops_before']:.1f} GFLOP/s before, "
            f"{result['matmul_gflops_after']:.1f} after. {result['spec']['model']} {result['spec']['dtype']}, greedy, "
            f"max_new_tokens {result['spec']['max_new_tokens']}; medians of {result['spec']['repeats']} alternating "
            f"runs per side. Packed once: the oneDNN copies made once before the runs ("
            f"{result['cases'][0]['packing_s']:.2f} s), as chat, serve, eval and rollouts hold them."
            f"\n\n{table}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model folder or built-in (default: %(default)s)")
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="per row (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side (default: %(default)s)")
    ap.add_argument("--name", default="generate_speed", help="results file stem (default: %(default)s)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the weights' dtype, both sides (default: %(default)s)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model, tokenizer = load(args.model, args.dtype)
    prompts = prompts_of(tokenizer, max(batches))
    before = matmul_peak_gflops()
    cases = [run_batch(model, tokenizer, prompts[:b], args.max_new_tokens, args.repeats) for b in batches]
    result = {"machine": machine(), "cpu_flags": cpu_flags(), "versions": versions("torch", "transformers"),
              "spec": {"model": args.model, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
                       "repeats": args.repeats, "data": str(DATA.name)},
              "matmul_gflops_before": before, "matmul_gflops_after": matmul_peak_gflops(), "cases": cases}
    write_results(args.name, result, render)


if __name__ == "__main__":
    main()
