"""The ``"torch"`` backend: the reference math applied to bounded chunks of rows.

It never holds more than one chunk of softmax (``CHUNK_ELEMENTS`` fp32 values) at once,
whatever the number of tokens. Same calling convention as ``dpo_fast.kernels.logprobs``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..formulas import rows_backward, rows_forward

# Elements of [rows, V] fp32 softmax alive per chunk (4 MiB).
CHUNK_ELEMENTS = 1 << 20


def _merge_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """View each ``(B, T, V)`` as ``(1, B*T, V)`` when all their strides allow it (no copy).

    Fewer, longer chunks: without the merge a shifted batch is walked one sequence at a time.
    """
    B, T, V = tensors[0].shape
    if B == 1 or any(t.stride(0) != T * t.stride(1) for t in tensors):
        return tensors
    return tuple(t.as_strided((1, B * T, V), (0, t.stride(1), t.stride(2))) for t in tensors)


def _chunks(x: torch.Tensor) -> Iterator[tuple[int, slice]]:
    B, T, V = x.shape
    rows = max(1, CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for start in range(0, T, rows):
            yield b, slice(start, min(start + rows, T))


def logprobs_forward(
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    scale: float,
    softcap: float | None,
    stats: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Forward over ``x`` ``(B, T, V)`` and ``labels`` ``(B, T)``; returns fp32 ``(B, T)`` results."""
    shape = labels.shape
    (x,) = _merge_rows(x)
    labels = labels.reshape(x.shape[:2])
    logp = torch.empty(x.shape[:2], device=x.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    out = {
        name: torch.empty(
            x.shape[:2], device=x.device, dtype=torch.bool if name == "is_top1" else torch.float32
        )
        for name in stats
    }
    for b, rows in _chunks(x):
        chunk_logp, chunk_lse, chunk_stats = rows_forward(
            x[b, rows], labels[b, rows], ignore_index=ignore_index, scale=scale, softcap=softcap, stats=stats
        )
        logp[b, rows] = chunk_logp
        lse[b, rows] = chunk_lse
        for name, value in chunk_stats.items():
            out[name][b, rows] = value
    return logp.view(shape), lse.view(shape), {name: value.view(shape) for name, value in out.items()}


def logprobs_backward(
    grad_logp: torch.Tensor,
    x: torch.Tensor,
    labels: torch.Tensor,
    logp: torch.Tensor,
    lse: torch.Tensor,
    grad_x: torch.Tensor,
    *,
    ignore_index: int,
    scale: float,
    softcap: float | None,
) -> None:
    """Write the logits gradient into ``grad_x`` ``(B, T, V)`` (which may alias ``x``)."""
    x, grad_x = _merge_rows(x, grad_x)
    shape = x.shape[:2]
    grad_logp, labels, logp, lse = (t.reshape(shape) for t in (grad_logp, labels, logp, lse))
    for b, rows in _chunks(x):
        grad_x[b, rows] = rows_backward(
            grad_logp[b, rows],
            x[b, rows],
            labels[b, rows],
            logp[b, rows],
            lse[b, rows],
            ignore_index=ignore_index,
            scale=scale,
            softcap=softcap,
        )
