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
