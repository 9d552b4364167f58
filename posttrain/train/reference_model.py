"""A stage's frozen reference copy inside the module the engine wraps (DPO, KTO and GRPO with a copy; PPO keeps
its copy in PolicyAndValue the same way).

A copy held beside the trained module is whole on every process under FSDP and ZeRO-3 (a second full model per
GPU for full fine-tuning). Held inside it, the engine shards the copy like the policy, and gathers its weights
where the reference's passes run: inside the engine's forward and call. When the trained model is gathered for
the output, the sharded engines leave the copy out (`frozen_reference`): it is not part of what is saved.
"""

from __future__ import annotations

from torch import nn


class WithReference(nn.Module):
    """The policy and its frozen reference copy as one module; stages unwrap it with `policy_of`."""

    def __init__(self, policy: nn.Module, reference: nn.Module):
        super().__init__()
        self.policy, self.reference = policy, reference.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()  # the reference never trains: no dropout, whatever the loop asks
        return self


def with_reference(policy: nn.Module, reference: nn.Module | None) -> nn.Module:
    """What a stage gives the loop: the policy alone, or the policy with its reference copy."""
    return policy if reference is None else WithReference(policy, reference)


def policy_of(model: nn.Module) -> nn.Module:
    """The trained policy inside what the loop holds."""
    return model.policy if isinstance(model, WithReference) else model


def frozen_reference(model: nn.Module) -> nn.Module | None:
    """The frozen reference copy inside what the loop holds (WithReference, PPO's PolicyAndValue), if any."""
    if isinstance(model, WithReference):
        return model.reference
    found = getattr(model, "frozen_reference", None)
    return found if isinstance(found, nn.Module) else None
