"""The ``logprobs`` op: per-token label log-probs from logits, one operator pair per backend.

Every backend registers the same two operators (``<b>`` is ``triton``, ``cpp`` or ``torch``)::

    dpo_fast::logprobs_forward_<b>(Tensor logits, Tensor labels, int ignore_index, float scale,
        float? softcap, int stats, bool inplace_backward) -> (Tensor logp, Tensor lse, Tensor[] stats)
    dpo_fast::logprobs_backward_<b>(Tensor grad_logp, Tensor logits, Tensor labels, Tensor logp,
        Tensor lse, Tensor(a!) grad_logits, int ignore_index, float scale, float? softcap) -> ()

``logits`` is ``(B, T, V)`` with any strides and ``labels`` ``(B, T')``, ``T' <= T``: position
``t`` of ``labels`` is scored by ``logits[:, t]`` (a causal shift is ``T' = T - 1``, read in
place). Forward returns fp32 ``(B, T')`` log-probs (0 where ``labels == ignore_index``), the
log-sum-exp kept for backward, and the statistics of the ``stats`` bit mask
(``dpo_fast.ops.library.stat_mask``). Backward writes every element of ``grad_logits``
(zeros on rows ``t >= T'``), which may be ``logits`` itself. The logits the softmax sees are
``z = softcap(scale * logits)`` (``dpo_fast.formulas``).

Implementations: ``kernels/logprobs.py`` (Triton), ``csrc/logprobs_cpu.cpp`` (C++, loaded by
``dpo_fast.ops.cpp``) and, here, the PyTorch backend, which applies ``dpo_fast.formulas``'
row functions to bounded chunks of rows (never more than ``CHUNK_ELEMENTS`` of softmax alive).
This module also holds the fakes and the autograd formula the three share: backward writes
the gradient straight into a fresh ``(B, T, V)`` buffer, or into the logits' own storage with
``inplace_backward`` (one ``[tokens, V]`` buffer per step instead of two).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import registry
from ..formulas import rows_backward, rows_forward
from . import cpp
from .library import custom_op, input_gradients, refuse_double_backward, stat_fakes, stat_names, triton_op

# Elements of [rows, V] fp32 softmax alive per chunk of the PyTorch backend (4 MiB).
CHUNK_ELEMENTS = 1 << 20


# ----------------------------------------------------------------------------------------------
# The PyTorch backend.
# ----------------------------------------------------------------------------------------------


def _chunks(B: int, T: int, V: int) -> Iterator[tuple[int, slice]]:
    rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for start in range(0, T, rows):
            yield b, slice(start, min(start + rows, T))


def torch_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    scale: float,
    softcap: float | None,
    stats: int,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``dpo_fast::logprobs_forward_torch`` (see the module docstring)."""
    del inplace_backward  # read by the autograd formula
    B, T = labels.shape
    names = stat_names(stats)
    logp = torch.empty((B, T), device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    out = stat_fakes(logp, stats)
    for b, rows in _chunks(B, T, logits.shape[2]):
        chunk_logp, chunk_lse, chunk_stats = rows_forward(
            logits[b, rows],
            labels[b, rows],
            ignore_index=ignore_index,
            scale=scale,
            softcap=softcap,
            stats=names,
        )
        logp[b, rows] = chunk_logp
        lse[b, rows] = chunk_lse
        for value, name in zip(out, names, strict=True):
            value[b, rows] = chunk_stats[name]
    return logp, lse, out


def torch_backward(
    grad_logp: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    logp: torch.Tensor,
    lse: torch.Tensor,
    grad_logits: torch.Tensor,
    ignore_index: int,
    scale: float,
    softcap: float | None,
) -> None:
    """``dpo_fast::logprobs_backward_torch`` (see the module docstring)."""
    B, T = labels.shape
    grad_logits[:, T:].zero_()
    for b, rows in _chunks(B, T, logits.shape[2]):
        grad_logits[b, rows] = rows_backward(
            grad_logp[b, rows],
            logits[b, rows],
            labels[b, rows],
            logp[b, rows],
            lse[b, rows],
            ignore_index=ignore_index,
            scale=scale,
            softcap=softcap,
        )


# ----------------------------------------------------------------------------------------------
# Fakes and autograd, shared by every backend.
# ----------------------------------------------------------------------------------------------


def _forward_fake(logits, labels, ignore_index, scale, softcap, stats, inplace_backward):
    logp = labels.new_empty(labels.shape, dtype=torch.float32)
    return logp, torch.empty_like(logp), stat_fakes(logp, stats)


def _backward_fake(grad_logp, logits, labels, logp, lse, grad_logits, ignore_index, scale, softcap):
    return None


def new_buffer(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, backend: str
) -> torch.Tensor:
    """An uninitialized contiguous ``[tokens, V]`` buffer (a gradient or a logits tile).

    With the C++ backend it comes from ``dpo_fast.ops.cpp``'s cache of freed blocks: a fresh
    CPU buffer costs more in page faults than the kernel that fills it.
    """
    if backend == "cpp" and device.type == "cpu":  # (meta tensors trace the C++ ops too)
        return cpp.empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def _register_autograd(backend: str) -> None:
    backward = registry.operator("logprobs", "backward", backend)

    def setup_context(ctx, inputs, output):
        logits, labels, ignore_index, scale, softcap, _, inplace = inputs
        logp, lse, stat_values = output
        ctx.save_for_backward(logits, labels, logp, lse)
        ctx.options = (ignore_index, scale, softcap)
        ctx.inplace = inplace
        ctx.mark_non_differentiable(lse, *stat_values)

    def backward_formula(ctx, grad_logp, grad_lse, grad_stats):
        refuse_double_backward("logprobs")
        logits, labels, logp, lse = ctx.saved_tensors
        grad = logits if ctx.inplace else new_buffer(logits.shape, logits.dtype, logits.device, backend)
        backward(grad_logp.contiguous(), logits, labels, logp, lse, grad, *ctx.options)
        return input_gradients(f"logprobs_forward_{backend}", logits=grad)

    torch.library.register_autograd(
        f"dpo_fast::logprobs_forward_{backend}", backward_formula, setup_context=setup_context
    )


def load(backend: str) -> None:
    """Register the operators of ``backend`` (called once per process by ``dpo_fast.registry``)."""
    if backend == "triton":
        # imported on first use: Triton reads TRITON_INTERPRET when the kernels are defined
        from ..kernels import logprobs as kernels

        triton_op("logprobs_forward_triton", kernels.logprobs_forward, _forward_fake)
        triton_op(
            "logprobs_backward_triton",
            kernels.logprobs_backward,
            _backward_fake,
            mutates_args=("grad_logits",),
        )
    elif backend == "cpp":
        cpp.load()
        torch.library.register_fake("dpo_fast::logprobs_forward_cpp", _forward_fake)
        torch.library.register_fake("dpo_fast::logprobs_backward_cpp", _backward_fake)
    else:
        custom_op("logprobs_forward_torch", torch_forward, _forward_fake)
        custom_op("logprobs_backward_torch", torch_backward, _backward_fake, mutates_args=("grad_logits",))
    _register_autograd(backend)
