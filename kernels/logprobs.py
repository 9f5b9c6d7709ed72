"""Label log-probs from logits: one streaming pass over the vocabulary per token.

Forward reads each row of logits once with an online log-sum-exp in fp32 and writes O(1)
values per token (log-prob, log-sum-exp, optional statistics); nothing of size
``[tokens, V]`` is written. Backward reads the row once more and writes
``g * (onehot - softmax) * dz/dx`` straight into the gradient buffer, which may be the
logits' own storage (``inplace_backward``). That is three passes over ``[tokens, V]`` for a
training step: read, read, write.

Rows are addressed as ``(b, t)`` with the logits' own strides, so a shifted view
``logits[..., :-1, :]`` or any strided slice is read in place, never copied. All offsets
are int64: a ``[16k, 128k]`` tensor has more than 2**31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .tl_math import LN2, neg_expm1

# One row streams through SRAM in blocks of this many logits (16 per thread with 8 warps).
MAX_BLOCK_V = 4096
NUM_WARPS = 8
# Bytes each thread loads at once: 128-bit vector loads.
VECTOR_BYTES = 16

LOG2E = tl.constexpr(1.4426950408889634)
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _softcap(u, softcap):
    """``softcap * tanh(u / softcap)`` and, for its derivative, ``e = exp(2 u / softcap)`` and
    ``r = 1 / (e + 1)``: ``tanh = 1 - 2 r`` and ``1 - tanh^2 = 4 e r^2`` (no cancellation
    near saturation). One exp2 and one division."""
    e = tl.exp2(u * (2.0 * LOG2E / softcap))
    r = 1.0 / (e + 1.0)
    return softcap - (2.0 * softcap) * r, e, r


@triton.jit
def _values(x, scale, softcap, HAS_SOFTCAP: tl.constexpr, FOLD_SCALE: tl.constexpr):
    """What the log-sum-exp runs on, in the units of :func:`_units`: ``x`` itself when a
    positive scale folds into the exponent, else ``z = softcap(scale * x)``."""
    if FOLD_SCALE:
        return x
    if HAS_SOFTCAP:
        return _softcap(x * scale, softcap)[0]
    return x * scale


@triton.jit
def _units(scale, FOLD_SCALE: tl.constexpr):
    """``(c, s)``: logits ``z = s * v`` of the values ``v``, and exp(z - z') = 2^(c (v - v'))."""
    if FOLD_SCALE:
        return scale * LOG2E, scale
    return LOG2E, 1.0


@triton.jit
def _row_base(row_off, VEC: tl.constexpr, ALIGN: tl.constexpr):
    """Where a row's blocks start: ``row_off`` rounded down to a whole 16-byte vector when
    ``ALIGN`` (then every block load is a vector load, whatever V), and the ``head`` of
    elements before the row's first column that this leaves."""
    base = row_off // VEC * VEC if ALIGN else row_off
    return base, (row_off - base).to(tl.int32)


@triton.jit
def _load_block(
    row, start, offs, tf, MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FOLD_SCALE: tl.constexpr
):
    """The values of the block at positions ``start + offs`` from the row's base (columns
    ``position - head``), -inf outside the row, and which of them are in it. Only the first
    and last blocks of a row are ``MASKED``.

    ``row = (row_ptr, head, V, label, stride_v)``, ``tf = (scale, softcap, c)``.
    """
    row_ptr, head, V, _, stride_v = row
    scale, softcap, _ = tf
    pos = start + offs
    if MASKED:
        in_row = (pos >= head) & (pos - head < V)
        x = tl.load(row_ptr + pos.to(tl.int64) * stride_v, mask=in_row, other=0.0).to(tl.float32)
        return tl.where(in_row, _values(x, scale, softcap, HAS_SOFTCAP, FOLD_SCALE), NEG_INF), in_row
    x = tl.load(row_ptr + pos.to(tl.int64) * stride_v).to(tl.float32)
    return _values(x, scale, softcap, HAS_SOFTCAP, FOLD_SCALE), pos >= 0  # all in the row


@triton.jit
def _fold_block(
    row,
    start,
    offs,
    tf,
    acc,
    MASKED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
    STATS: tl.constexpr,
):
    """Fold one block into the running state ``acc``, kept per vector (per row of the
    ``(ROWS, VEC)`` tile, i.e. per thread): nothing is reduced across threads until the end
    of the row.

    ``acc = (m, sum_p, sum_pv, sum_pp, sum_v, before_label)``: the running max and
    ``sum 2^(c (v - m))`` (``v - m`` is exact near the max, so the max contributes exactly 1),
    the rescaled sums of ``p v`` and ``p^2``, the plain sum of ``v``, and the max of the
    vectors wholly before the label's column.
    """
    m, sum_p, sum_pv, sum_pp, sum_v, before_label = acc
    v, in_row = _load_block(row, start, offs, tf, MASKED, HAS_SOFTCAP, FOLD_SCALE)
    c = tf[2]
    v_max = tl.max(v, axis=1)
    m_new = tl.maximum(m, v_max)
    # nothing but -inf so far: shift by 0, or exp2(-inf - -inf) = nan
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp2((m - m_safe) * c)
    p = tl.exp2((v - m_safe[:, None]) * c)
    sum_p = sum_p * alpha + tl.sum(p, axis=1)
    if STATS & 1:  # entropy
        # max(v, -big): p = 0 where v = -inf, and 0 * -inf would be nan
        sum_pv = sum_pv * alpha + tl.sum(p * tl.maximum(v, -3.0e38), axis=1)
    if STATS & 2:  # mean_logits
        # the row's own -inf logits count, as in the mean of the logits; masked columns do not
        sum_v += tl.sum(tl.where(in_row, v, 0.0), axis=1) if MASKED else tl.sum(v, axis=1)
    if STATS & 4:  # is_top1
        _, head, _, label, _ = row
        ROWS: tl.constexpr = offs.shape[0]
        VEC: tl.constexpr = offs.shape[1]
        # the label's own vector is read again at the end
        before = start + tl.arange(0, ROWS) * VEC + (VEC - 1) - head < label
        before_label = tl.where(before, tl.maximum(before_label, v_max), before_label)
    if STATS & 8:  # log_sum_sq_probs
        sum_pp = sum_pp * (alpha * alpha) + tl.sum(p * p, axis=1)
    return m_new, sum_p, sum_pv, sum_pp, sum_v, before_label


@triton.jit
def _logprobs_forward_kernel(
    x_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    mean_ptr,
    top1_ptr,
    sumsq_ptr,
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    ignore_index,
    scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """``STATS``: bit mask of the statistics to compute (1 entropy, 2 mean_logits, 4 is_top1,
    8 log_sum_sq_probs: ``dpo_fast.ops.library.stat_mask``'s order)."""
    row_id = tl.program_id(0).to(tl.int64)
    base, head = _row_base((row_id // T) * stride_b + (row_id % T) * stride_t, VEC, ALIGN)
    row_ptr = x_ptr + base
    label = tl.load(labels_ptr + row_id)
    valid = label != ignore_index
    # 32-bit from here on: V < 2**31, and an ignored row reads column 0
    label = tl.where(valid, label, 0).to(tl.int32)
    c, s = _units(scale, FOLD_SCALE)
    x_label = tl.load(row_ptr + (label + head).to(tl.int64) * stride_v).to(tl.float32)
    v_label = _values(x_label, scale, softcap, HAS_SOFTCAP, FOLD_SCALE)

    # a block as (ROWS, VEC): each thread holds whole 16-byte vectors
    ROWS: tl.constexpr = BLOCK_V // VEC
    offs = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    row = (row_ptr, head, V, label, stride_v)
    tf = (scale, softcap, c)
    zeros = tl.zeros((ROWS,), tl.float32)
    acc = (zeros + NEG_INF, zeros, zeros, zeros, zeros, zeros + NEG_INF)
    # positions [0, end) from base hold the row; an ignored row computes nothing
    end = tl.where(valid, V + head, 0)
    full_end = end // BLOCK_V * BLOCK_V
    if valid:  # the first block, partial when head > 0 or V < BLOCK_V
        acc = _fold_block(row, 0, offs, tf, acc, True, HAS_SOFTCAP, FOLD_SCALE, STATS)
    for start in range(BLOCK_V, full_end, BLOCK_V):
        acc = _fold_block(row, start, offs, tf, acc, False, HAS_SOFTCAP, FOLD_SCALE, STATS)
    if (full_end >= BLOCK_V) & (full_end < end):  # the last, partial block
        acc = _fold_block(row, full_end, offs, tf, acc, True, HAS_SOFTCAP, FOLD_SCALE, STATS)
    m, sum_p, sum_pv, sum_pp, sum_v, before_label = acc

    # one reduction across the row's threads
    m_row = tl.max(m, 0)
    rescale = tl.exp2((m - tl.where(m_row == NEG_INF, 0.0, m_row)) * c)
    sum_row = tl.sum(sum_p * rescale, 0)
    log_sum = tl.log2(sum_row) * LN2  # log sum exp(z - s M)
    # s (v_y - M) - log_sum rather than z_y - lse: exactly 0 - log(1 + eps) when y is the max,
    # which keeps the relative precision of 1 - p_y for backward
    logp = s * (v_label - m_row) - log_sum
    lse = s * m_row + log_sum
    tl.store(logp_ptr + row_id, tl.where(valid, logp, 0.0))
    tl.store(lse_ptr + row_id, tl.where(valid, lse, 0.0))
    if STATS & 1:  # entropy
        mean_z = s * tl.sum(sum_pv * rescale, 0) / sum_row
        tl.store(entropy_ptr + row_id, tl.where(valid, lse - mean_z, 0.0))
    if STATS & 2:  # mean_logits
        tl.store(mean_ptr + row_id, tl.where(valid, s * tl.sum(sum_v, 0) / V, 0.0))
    if STATS & 8:  # log_sum_sq_probs
        sum_sq = tl.sum(sum_pp * rescale * rescale, 0)
        log_sum_sq = (tl.log2(sum_sq) - 2.0 * tl.log2(sum_row)) * LN2
        tl.store(sumsq_ptr + row_id, tl.where(valid, log_sum_sq, 0.0))
    if STATS & 4:  # is_top1
        # the label is top-1 iff it reaches the max and no earlier column does (first index wins
        # ties, as torch.argmax). Vectors wholly before the label were folded in above; the
        # VEC columns before it are read again, only when the label is the max.
        earlier = tl.max(before_label, 0)
        if valid & (v_label >= m_row):
            cols = label - VEC + tl.arange(0, VEC)
            before = cols >= 0
            x = tl.load(row_ptr + (cols + head).to(tl.int64) * stride_v, mask=before, other=0.0)
            v = tl.where(before, _values(x.to(tl.float32), scale, softcap, HAS_SOFTCAP, FOLD_SCALE), NEG_INF)
            earlier = tl.maximum(earlier, tl.max(v, 0))
        tl.store(top1_ptr + row_id, (valid & (v_label >= m_row) & (v_label > earlier)).to(tl.int8))


@triton.jit
def _grad_block(
    rows, start, offs, coef, MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UNIT_SCALE: tl.constexpr
):
    """Write ``g * (onehot - softmax) * dz/dx`` for the block at positions ``start + offs``.

    ``rows = (row_ptr, grad_row_ptr, head, V, label, stride_v, grad_stride_v)``; ``coef =
    (g_label, g_other, lse, scale, softcap)``: the per-row constants ``g (1 - p_y) dz/dx``
    and ``-g dz/dx`` (without the softcap's factor), and the forward's log-sum-exp.
    """
    row_ptr, grad_row_ptr, head, V, label, stride_v, grad_stride_v = rows
    g_label, g_other, lse, scale, softcap = coef
    pos = start + offs
    cols = pos - head
    if MASKED:
        in_row = (cols >= 0) & (cols < V)
        x = tl.load(row_ptr + pos.to(tl.int64) * stride_v, mask=in_row, other=0.0).to(tl.float32)
    else:
        x = tl.load(row_ptr + pos.to(tl.int64) * stride_v).to(tl.float32)
    u = x if UNIT_SCALE else x * scale
    if HAS_SOFTCAP:
        z, e, r = _softcap(u, softcap)
        # d softcap / du = 1 - tanh^2 = 4 r (e r), e r = e / (e + 1) rather than 1 - r (no
        # cancellation where r is near 1), and 1 where exp overflowed (not inf * 0)
        derivative = 4.0 * r * tl.where(e == float("inf"), 1.0, e * r)
        # z - lse, not z log2(e) - lse log2(e): the forward's own z and lse, so the difference
        # is exact near the max whatever their magnitude
        dz = g_other * tl.exp2((z - lse) * LOG2E) * derivative
        dz_label = g_label * derivative
    else:
        dz = g_other * tl.exp2((u - lse) * LOG2E)
        dz_label = g_label
    grad = tl.where(cols == label, dz_label, dz).to(grad_row_ptr.dtype.element_ty)
    if MASKED:
        tl.store(grad_row_ptr + pos.to(tl.int64) * grad_stride_v, grad, mask=in_row)
    else:
        tl.store(grad_row_ptr + pos.to(tl.int64) * grad_stride_v, grad)


@triton.jit
def _logprobs_backward_kernel(
    grad_logp_ptr,
    x_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    grad_x_ptr,
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    grad_stride_b,
    grad_stride_t,
    grad_stride_v,
    ignore_index,
    scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    UNIT_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """``ALIGN`` needs both rows at the same offset from a 16-byte boundary (the launcher checks
    the strides): one ``head`` serves both."""
    row_id = tl.program_id(0).to(tl.int64)
    b = row_id // T
    t = row_id % T
    base, head = _row_base(b * stride_b + t * stride_t, VEC, ALIGN)
    grad_base, _ = _row_base(b * grad_stride_b + t * grad_stride_t, VEC, ALIGN)
    grad_row_ptr = grad_x_ptr + grad_base
    label = tl.load(labels_ptr + row_id)
    valid = label != ignore_index
    ROWS: tl.constexpr = BLOCK_V // VEC
    offs = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    end = V + head  # positions [0, end) from the bases hold the row
    full_end = end // BLOCK_V * BLOCK_V
    if valid:
        rows = (x_ptr + base, grad_row_ptr, head, V, label.to(tl.int32), stride_v, grad_stride_v)
        g = tl.load(grad_logp_ptr + row_id)
        # dz/dx = scale outside the softcap; the target-class term in fp32 from the forward's
        # precise log-prob
        g_label = g * neg_expm1(tl.load(logp_ptr + row_id)) * scale
        coef = (g_label, -g * scale, tl.load(lse_ptr + row_id), scale, softcap)
        # the first block (partial when head > 0 or V < BLOCK_V), the full ones, the last
        _grad_block(rows, 0, offs, coef, True, HAS_SOFTCAP, UNIT_SCALE)
        for start in range(BLOCK_V, full_end, BLOCK_V):
            _grad_block(rows, start, offs, coef, False, HAS_SOFTCAP, UNIT_SCALE)
        if (full_end >= BLOCK_V) & (full_end < end):
            _grad_block(rows, full_end, offs, coef, True, HAS_SOFTCAP, UNIT_SCALE)
    else:
        # an ignored row reads nothing and writes zeros
        zeros = tl.zeros((ROWS, VEC), grad_x_ptr.dtype.element_ty)
        for start in range(0, end, BLOCK_V):
            cols = start + offs - head
            in_row = (cols >= 0) & (cols < V)
            tl.store(grad_row_ptr + (start + offs).to(tl.int64) * grad_stride_v, zeros, mask=in_row)


def _tiling(logits: torch.Tensor, softcap: float | None, *, align: bool) -> dict:
    """Compile-time options both kernels share: the block, its 16-byte vectors, and whether
    rows start their blocks at a 16-byte boundary."""
    vec = VECTOR_BYTES // logits.element_size()
    return {
        "HAS_SOFTCAP": softcap is not None,
        "BLOCK_V": max(min(triton.next_power_of_2(logits.shape[2]), MAX_BLOCK_V), vec),
        "VEC": vec,
        "ALIGN": align,
        "num_warps": NUM_WARPS,
    }


def _same_alignment(logits: torch.Tensor, grad: torch.Tensor) -> bool:
    """Both contiguous along V, and every row of both the same number of elements past a whole
    vector (strides equal modulo a vector), so that one ``head`` serves both."""
    vec = VECTOR_BYTES // logits.element_size()
    return (
        logits.stride(2) == grad.stride(2) == 1
        and logits.element_size() == grad.element_size()
        and all((a - b) % vec == 0 for a, b in zip(logits.stride()[:2], grad.stride()[:2], strict=True))
    )


def logprobs_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    scale: float,
    softcap: float | None,
    stats: int,
    inplace_backward: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Launch the forward kernel (the ``dpo_fast::logprobs_forward_triton`` operator).

    Args:
        logits: ``(B, T, V)`` fp16/bf16/fp32, any strides.
        labels: ``(B, T')`` contiguous int64, ``T' <= T``: position ``t`` scores ``logits[:, t]``.
        stats: bit mask of the statistics to compute, bits in the order entropy, mean_logits,
            is_top1, log_sum_sq_probs.
        inplace_backward: read by the operator's autograd, not here.
    Returns:
        ``logp`` and ``lse`` ``(B, T')`` fp32, and the requested statistics ``(B, T')`` in bit
        order (``is_top1`` bool, others fp32).
    """
    del inplace_backward
    B, T = labels.shape
    V = logits.shape[2]
    logp = torch.empty((B, T), device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    want = [bool(stats >> bit & 1) for bit in range(4)]
    entropy, mean, top1, sumsq = (
        torch.empty((B, T), device=logits.device, dtype=torch.int8 if bit == 2 else torch.float32)
        if want[bit]
        else logp
        for bit in range(4)
    )
    if B * T > 0:
        wrap_triton(_logprobs_forward_kernel)[(B * T,)](
            logits,
            labels,
            logp,
            lse,
            entropy,
            mean,
            top1,
            sumsq,
            T,
            V,
            logits.stride(0),
            logits.stride(1),
            logits.stride(2),
            ignore_index,
            scale,
            softcap if softcap is not None else 1.0,
            STATS=stats,
            # a positive scale folds into the exponent: no multiply per element
            FOLD_SCALE=softcap is None and scale > 0,
            # a contiguous vocabulary: blocks start on 16-byte boundaries whatever V
            **_tiling(logits, softcap, align=logits.stride(2) == 1),
        )
    values = [entropy, mean, top1.bool() if want[2] else top1, sumsq]
    return logp, lse, [value for value, wanted in zip(values, want, strict=True) if wanted]


def logprobs_backward(
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
    """Launch the backward kernel (the ``dpo_fast::logprobs_backward_triton`` operator),
    writing every element of ``grad_logits`` ``(B, T, V)``.

    ``grad_logp``, ``logp``, ``lse`` are ``(B, T')`` contiguous fp32 as forward returns them;
    rows ``t >= T'`` of ``grad_logits`` get zeros. ``grad_logits`` may alias ``logits``
    (in-place backward): each element is read before it is written by the same program.
    """
    B, T = labels.shape
    V = logits.shape[2]
    grad_logits[:, T:].zero_()
    if B * T == 0:
        return
    wrap_triton(_logprobs_backward_kernel)[(B * T,)](
        grad_logp,
        logits,
        labels,
        logp,
        lse,
        grad_logits,
        T,
        V,
        logits.stride(0),
        logits.stride(1),
        logits.stride(2),
        grad_logits.stride(0),
        grad_logits.stride(1),
        grad_logits.stride(2),
        ignore_index,
        scale,
        softcap if softcap is not None else 1.0,
        UNIT_SCALE=scale == 1.0,
        **_tiling(logits, softcap, align=_same_alignment(logits, grad_logits)),
    )
