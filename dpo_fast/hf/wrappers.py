"""Models wrapped by ``DistributedDataParallel`` or FSDP2 (``fully_shard``): run our code as
the wrapped module's forward, so the wrappers do what they do for a plain forward.

dpo_fast calls a model's backbone and reads its lm_head weight itself instead of calling
``model(...)``. Wrappers act around a module's ``__call__``:

- DDP's ``forward`` prepares its reducer for backward (without it the gradients are never
  all-reduced) and syncs buffers, then calls the wrapped module;
- FSDP2 (``fully_shard``) registers hooks on each unit: before its forward, all-gather the
  unit's parameters (outside forward they are sharded ``DTensor`` s); after it, reshard and
  hook the outputs so backward all-gathers again and reduce-scatters the gradients.

So dpo_fast runs its function *as* the forward: :func:`in_root_forward` puts it in place of the
root module's forward for one call (``ddp.module`` for DDP, the model itself for an FSDP2
root) and calls the root; :func:`call_head` does the same for an lm_head that is its own FSDP2
unit, so its weight is the gathered parameter while the fused head reads it and the unit's
backward hooks see the head's outputs. A parameter is never read in its sharded form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

Result = TypeVar("Result")
_NO_FORWARD = object()


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` is a DDP wrapper or an FSDP2 root, whose forward must run to train it."""
    return isinstance(model, (DistributedDataParallel, FSDPModule))


def as_forward(
    module: nn.Module, function: Callable[..., Result], *args, caller: nn.Module | None = None
) -> Result:
    """``function(*args)`` run as ``module``'s forward by calling ``caller`` (default ``module``).

    ``module.forward`` is replaced for the one call and restored after (an instance-level
    forward, such as the TRL head's, included).
    """
    previous = module.__dict__.get("forward", _NO_FORWARD)
    module.forward = function
    try:
        return (module if caller is None else caller)(*args)
    finally:
        if previous is _NO_FORWARD:
            del module.forward
        else:
            module.forward = previous


def in_root_forward(model: nn.Module, function: Callable[[], Result]) -> Result:
    """``function()`` run inside ``model``'s forward when ``model`` is DDP-wrapped or an FSDP2
    root (see the module doc); called directly for any other model.

    ``function`` should return tensors in a dict, tuple or list: DDP looks for the outputs'
    tensors, and FSDP2 hooks the ones that require grad.
    """
    if isinstance(model, DistributedDataParallel):
        return as_forward(model.module, function, caller=model)
    if isinstance(model, FSDPModule):
        return as_forward(model, function)
    return function()


def call_head(head: nn.Linear, function: Callable[..., Result], *args: torch.Tensor) -> Result:
    """``function(*args)``, which reads ``head.weight`` / ``head.bias``, run through ``head``'s
    hooks when it is its own FSDP2 unit (then its parameters are gathered only inside)."""
    if isinstance(head, FSDPModule):
        return as_forward(head, function, *args)
    return function(*args)


def refuse_unsupported(model: nn.Module) -> None:
    """Raise ``NotImplementedError`` for a model under DeepSpeed ZeRO-3 or FSDP1.

    ZeRO-3 partitions every parameter and gathers it in its own module hooks, FSDP1
    (``FullyShardedDataParallel``) flattens them into its own parameters; dpo_fast goes
    through DDP's and FSDP2's hooks (tested) and neither of these.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if isinstance(model, FullyShardedDataParallel):
        raise NotImplementedError(
            "dpo_fast does not support FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel); shard the "
            "model with FSDP2 instead: torch.distributed.fsdp.fully_shard, or accelerate with fsdp_version: 2"
        )
    first = next(model.parameters(), None)
    if is_deepspeed_zero3_enabled() or hasattr(first, "ds_id"):  # ds_id: a ZeRO-3 partitioned parameter
        raise NotImplementedError(
            "dpo_fast does not support DeepSpeed ZeRO-3 (partitioned parameters); shard the model with "
            "FSDP2 instead (torch.distributed.fsdp.fully_shard, or accelerate with fsdp_version: 2), "
            "which dpo_fast supports, or with TRL call dpo_fast.integrations.trl.unpatch() for TRL's own head"
        )
