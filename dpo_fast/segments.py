"""Deterministic per-segment sums for packed rows (several sequences in one row)."""

from __future__ import annotations

import torch

# Elements of the (segments x tokens) one-hot alive per step.
_ONE_HOT_ELEMENTS = 1 << 24


def count_segments(segment_ids: torch.Tensor) -> int:
    """``max(segment_ids) + 1`` (0 when empty). Reads one value on the host."""
    return int(segment_ids.max().item()) + 1 if segment_ids.numel() else 0


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum ``values`` ``(..., T)`` per segment id; ids outside ``[0, num_segments)`` are dropped.

    Returns ``(..., num_segments)`` in ``values``' dtype (int64 for bool values: counts).
    Reduces with a one-hot mask and ``sum`` (no atomics), so results are bitwise
    reproducible, and it is differentiable in ``values``.
    """
    if values.dtype == torch.bool:
        values = values.to(torch.int64)
    out_shape = (*values.shape[:-1], num_segments)
    T = values.shape[-1]
    step = max(1, _ONE_HOT_ELEMENTS // max(T, 1))
    parts = []
    for start in range(0, num_segments, step):
        ids = torch.arange(start, min(start + step, num_segments), device=values.device)
        one_hot = segment_ids.unsqueeze(-2) == ids.unsqueeze(-1)  # (..., S_chunk, T)
        parts.append(torch.where(one_hot, values.unsqueeze(-2), 0).sum(-1))
    if not parts:
        return values.new_zeros(out_shape)
    return torch.cat(parts, dim=-1)
