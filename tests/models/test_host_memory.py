"""models/host_memory.py (train.keep_freed_memory, and every oneDNN swap-in): a freed large tensor's pages are reused
by the next one instead of faulted in anew."""

import json
import os
import subprocess
import sys

PROBE = r"""
import json, resource, sys
import torch
from posttrain.models.host_memory import retain_freed_memory

applied = retain_freed_memory() if sys.argv[1] == "keep" else False
share = []  # of the tensor's 4 KB pages that faulted in when it was written
for mb in (64, 48, 32, 16):  # each tensor freed before the next, smaller one: it fits in the freed memory
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(mb << 20, dtype=torch.uint8).fill_(1)
    share.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / ((mb << 20) // 4096))
    del t
print(json.dumps({"applied": applied, "faulted": share}))
"""


def probe(mode: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=clean | env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_is_reused_without_page_faults():
    default, kept = probe("default"), probe("keep")
    assert kept["applied"] and not default["applied"]
    assert all(f > 0.9 for f in default["faulted"]), default  # glibc's defaults: a fresh mmap every time
    assert kept["faulted"][0] > 0.9  # the first one grows the heap
    assert all(f < 0.05 for f in kept["faulted"][1:]), kept  # then its pages are reused


def test_user_malloc_settings_win():
    assert probe("keep", MALLOC_ARENA_MAX="2")["applied"]  # not glibc's MALLOC_*_ tunable form
    assert not probe("keep", MALLOC_TRIM_THRESHOLD_="1")["applied"]


SWAP_PROBE = r"""
import json, resource
import torch
from torch import nn
from posttrain.models.onednn_linear import swap_in, swap_out

model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(12)])  # 48 MB of weights: above MIN_BYTES
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    layers = swap_in(model)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    swap_out(layers)
print(json.dumps({"swapped": len(layers), "faulted": faults, "pages": 12 * 1024 * 1024 * 4 // 4096}))
"""


def test_a_second_generate_calls_weight_copies_reuse_the_firsts_pages():
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    runs = {}
    for mode in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", SWAP_PROBE], env=clean | {"POSTTRAIN_KEEP_FREED": mode},
                             capture_output=True, text=True, check=True)
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    kept, default = runs["1"], runs["0"]
    assert kept["swapped"] == default["swapped"] == 12
    assert all(f > 0.9 * default["pages"] for f in default["faulted"]), default  # glibc's defaults: every call
    assert all(f < 0.1 * kept["pages"] for f in kept["faulted"][1:]), kept  # kept: the first call's pages again


def test_a_training_config_that_says_no_holds_for_later_swap_ins(monkeypatch):
    from posttrain.models import host_memory

    monkeypatch.setattr(host_memory, "_choice", None)
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.delenv(host_memory.ENV, raising=False)
    assert not host_memory.retain_freed_memory(False)
    assert not host_memory.retain_freed_memory()  # a later swap_in, which does not say
    monkeypatch.setattr(host_memory, "_choice", None)
    monkeypatch.setenv(host_memory.ENV, "0")
    assert not host_memory.retain_freed_memory()
