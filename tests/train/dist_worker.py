"""Run by tests/test_engines.py, under torchrun or alone: one training config trained uninterrupted
(OUT/full), then, when STOP > 0, interrupted before optimizer update STOP (OUT/cut) and resumed from its
last checkpoint, all in one process group. Usage: dist_worker.py CONFIG OUT STOP [key=value ...]"""

import sys

from posttrain.cli import main
from posttrain.process import end_process
from posttrain.train.loop import Loop

config, out, stop, *overrides = sys.argv[1:]
assert main(["train", config, f"output.dir={out}/full", *overrides]) == 0
if int(stop):
    real = Loop.update

    def update_or_stop(self, micro_batches):  # every process stops at the same update, as a crash of the job would
        if self.scheduler.last_epoch == int(stop):
            raise RuntimeError("interrupted")
        return real(self, micro_batches)

    Loop.update = update_or_stop
    assert main(["train", config, f"output.dir={out}/cut", *overrides]) == 1  # 1: the unexpected-error exit code
    Loop.update = real
    assert main(["train", config, f"output.dir={out}/cut", "train.resume=auto", *overrides]) == 0
end_process(0)  # as the posttrain command ends: leave the group, then os._exit
