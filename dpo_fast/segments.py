"""Per-sequence and per-segment sums of per-token values: deterministic (no atomics)."""

from __future__ import annotations

import torch

from .checks import check_segment_ids, check_segment_values, data_checks_enabled

# Elements of the (segments x tokens) one-hot alive per step.
_ONE_HOT_ELEMENTS = 1 << 24


def count_segments(segment_ids: torch.Tensor) -> int:
    """``max(segment_ids) + 1`` (0 when empty). Reads one value on the host.

    Raises:
        ValueError: ``segment_ids`` has no values to read: a meta or fake tensor, or a CUDA
            graph being captured (``torch.compile`` reads it through a graph break).
    """
    if not (torch.compiler.is_compiling() or data_checks_enabled(segment_ids)):
        raise ValueError(
            "num_segments must be given for meta or fake segment_ids and during CUDA graph capture: "
            "its default, max(segment_ids) + 1, reads their values"
        )
    return int(segment_ids.max().item()) + 1 if segment_ids.numel() else 0


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum ``values`` ``(..., T)`` per segment id; ids outside ``[0, num_segments)`` are dropped.

    Returns ``(..., num_segments)`` in ``values``' dtype (int64 for bool values: counts).
    Reduces with a one-hot mask and ``sum`` (no atomics), so results are bitwise
    reproducible, and it is differentiable in ``values``. Eagerly the one-hot is built for a
    bounded number of segments at a time; a compiled graph takes all segments in one
    reduction, which Inductor fuses without materializing the one-hot (and ``T`` may then be
    data-dependent, e.g. the number of completion tokens).
    """
    if values.dtype == torch.bool:
        values = values.to(torch.int64)
    out_shape = (*values.shape[:-1], num_segments)
    if torch.compiler.is_compiling():
        step = max(num_segments, 1)
    else:
        step = max(1, _ONE_HOT_ELEMENTS // max(values.shape[-1], 1))
    parts = []
    for start in range(0, num_segments, step):
        ids = torch.arange(start, min(start + step, num_segments), device=values.device)
        one_hot = segment_ids.unsqueeze(-2) == ids.unsqueeze(-1)  # (..., S_chunk, T)
        parts.append(torch.where(one_hot, values.unsqueeze(-2), 0).sum(-1))
    if not parts:
        return values.new_zeros(out_shape)
    return torch.cat(parts, dim=-1)


def sequence_sums(
    per_token: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    shift: bool,
    segment_ids: torch.Tensor | None,
    num_segments: int | None,
    average: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (or per-segment) sums of per-token log-probs and token counts.

    Shared by ``dpo_fast.sequence_logprobs`` and ``dpo_fast.linear_sequence_logprobs``.

    Args:
        per_token: float32 ``(..., T')``, ``T' = T - 1`` with ``shift``, 0 where not scored.
        labels: the validated, unshifted ``(..., T)`` labels.
        ignore_index, shift, segment_ids, num_segments, average: as ``dpo_fast.sequence_logprobs``.
    """
    if segment_ids is not None:
        check_segment_ids(segment_ids, tuple(labels.shape), labels.device, num_segments)
    if shift:
        labels = labels[..., 1:]
    scored = labels != ignore_index
    if segment_ids is None:
        logps, num_tokens = per_token.sum(-1), scored.sum(-1)
    else:
        segment_ids = segment_ids.to(torch.int64)  # -1 below needs a signed type
        if shift:
            segment_ids = segment_ids[..., 1:]
        scored_ids = torch.where(scored, segment_ids, -1)
        if num_segments is None:
            num_segments = count_segments(scored_ids)
        check_segment_values(segment_ids, scored_ids, num_segments)
        logps = segment_sum(per_token, scored_ids, num_segments)
        num_tokens = segment_sum(scored, scored_ids, num_segments)
    if average:
        logps = logps / num_tokens.clamp(min=1)
    return logps, num_tokens
