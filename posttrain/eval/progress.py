"""Progress for eval loops: a tqdm bar on a terminal, periodic log lines everywhere else.

tqdm's `disable=None` hides the bar when stderr is not a TTY (logs, pipes, CI); those runs still
see "desc: done/total" lines through logging, at most one per `every_s` seconds and at the end.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


class Progress:
    """Counts finished items out of `total`, `done` of them already cached before the run."""

    def __init__(self, total: int, desc: str, unit: str = "item", done: int = 0, every_s: float = 30.0):
        self.total, self.desc, self.unit, self.done, self.every_s = total, desc, unit, done, every_s
        self.start = self.last_log = time.monotonic()
        self.bar = tqdm(total=total, initial=done, desc=desc, unit=unit, disable=None, file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5)
        if self.bar.disable and done:
            log.info("%s: %d/%d %ss cached", desc, done, total, unit)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.bar.disable:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_log >= self.every_s or self.done >= self.total:
            self.last_log = now
            log.info("%s: %d/%d %ss (%.0f s)", self.desc, self.done, self.total, self.unit, now - self.start)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
