"""Registering dpo_fast's operators with ``torch.library``.

Every kernel is a custom operator of the ``dpo_fast`` namespace with a fake (shape, dtype and
device only) implementation, so ``torch.compile``, ``torch.export``, meta and fake tensors
trace it without running it.

Triton launchers become ``torch.library.triton_op`` operators, whose kernels Inductor sees and
schedules. ``triton_op`` needs compiled kernels; under Triton's interpreter (``TRITON_INTERPRET=1``,
CPU tensors) the same launcher becomes an opaque ``custom_op`` with the given fake instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..constants import STAT_NAMES
from ..registry import triton_interpreted

NAMESPACE = "dpo_fast"


def custom_op(name: str, fn: Callable, fake: Callable, *, mutates_args: tuple[str, ...] = ()):
    """``dpo_fast::<name>``: an opaque operator running ``fn``, traced through ``fake``."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=mutates_args)
    op.register_fake(fake)
    return op


def triton_op(name: str, launcher: Callable, fake: Callable, *, mutates_args: tuple[str, ...] = ()):
    """``dpo_fast::<name>`` running a Triton ``launcher`` (which calls its kernels through
    ``torch.library.wrap_triton``); ``fake`` is used under the interpreter only: compiled,
    the launcher itself traces with fake tensors."""
    if triton_interpreted():
        return custom_op(name, launcher, fake, mutates_args=mutates_args)
    return torch.library.triton_op(f"{NAMESPACE}::{name}", launcher, mutates_args=mutates_args)


def stat_mask(stats: tuple[str, ...]) -> int:
    """The ``int stats`` argument of the operators: bit ``i`` requests ``STAT_NAMES[i]``.

    Operators return the requested statistics in ``STAT_NAMES`` order.
    """
    return sum(1 << STAT_NAMES.index(name) for name in stats)


def stat_names(mask: int) -> tuple[str, ...]:
    """The statistics a mask requests, in the order the operators return them."""
    return tuple(name for i, name in enumerate(STAT_NAMES) if mask >> i & 1)


def stat_fakes(like: torch.Tensor, mask: int) -> list[torch.Tensor]:
    """Uninitialized statistics of ``like``'s shape (``is_top1`` bool, others fp32)."""
    return [
        like.new_empty(like.shape, dtype=torch.bool if name == "is_top1" else torch.float32)
        for name in stat_names(mask)
    ]


def input_gradients(op_name: str, **grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """What an autograd formula of ``dpo_fast::<op_name>`` returns: one entry per argument of
    the operator's schema, the named gradients in their places and None elsewhere."""
    schema = getattr(torch.ops.dpo_fast, op_name).default._schema
    names = [argument.name for argument in schema.arguments]
    unknown = set(grads) - set(names)
    if unknown:
        raise KeyError(f"{op_name} has no arguments {sorted(unknown)}")
    return tuple(grads.get(name) for name in names)


def refuse_double_backward(op: str) -> None:
    """Raise when autograd asks for a differentiable gradient (``create_graph=True``): the
    backward operators compute the gradient, they do not differentiate it."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"dpo_fast's {op} op has no double backward: its gradient is computed by a kernel, not "
            "by differentiable operations; call backward without create_graph=True"
        )
