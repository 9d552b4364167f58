"""train.distributed: ddp. torch DistributedDataParallel: a whole replica per process, gradients all-reduced
once per optimizer update (the micro-batches before the last run under `no_sync`)."""

from __future__ import annotations

from contextlib import nullcontext

from torch.nn.parallel import DistributedDataParallel

from posttrain.train.engines.base import Engine, Forward


class DDPEngine(Engine):
    name = "ddp"

    def wrap(self, model, groups):
        device = self.dist.device
        # Buffers (rotary tables) are equal everywhere: nothing to broadcast per forward. The last micro-batch of
        # an update must use every trainable weight (its backward is the one that all-reduces). Gradients live in
        # the all-reduce buckets, not in a second copy beside them (-0.5 GB per process between updates for 135M
        # full fine-tuning; the peak, early in backward, is the same: benchmarks/README.md, engine memory).
        self.ddp = DistributedDataParallel(Forward(model), device_ids=[device.index] if device.type == "cuda" else None,
                                           broadcast_buffers=False, gradient_as_bucket_view=True)
        return groups

    def forward(self, micro):
        with self.autocast():
            return self.ddp(micro, self.model)

    def accumulating(self, last: bool):
        return nullcontext() if last else self.ddp.no_sync()

    def backward(self, loss, last: bool) -> None:
        # DDP averages gradients over processes; each loss is already a share of the global mean, so x world
        super().backward(loss * self.dist.world, last)
