"""How a `posttrain` process ends.

A process that joined a process group (torchrun) leaves it and ends with os._exit once its output is
flushed: gloo's worker threads could otherwise still be joinable when C++ static destructors run, and the
process aborts after a finished run (SIGABRT, "terminate called without an active exception"; seen in
2-process tests even with the group destroyed at exit). Other processes exit normally.
"""

from __future__ import annotations

import logging
import os
import sys


def end_process(code: int) -> None:
    """Exit with `code` (see the module docstring)."""
    dist = sys.modules.get("torch.distributed")  # never imported by a command that did not need it
    if dist is None or not dist.is_available() or not dist.is_initialized():
        sys.exit(code)
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
