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

# One row streams through SRAM in blocks of this many logits (16 per thread with 8 warps).
MAX_BLOCK_V = 4096
NUM_WARPS = 8
# Bytes each thread loads at once: 128-bit vector loads.
VECTOR_BYTES = 16

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
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
def _fold(v, m, sum_p, sum_pv, sum_pp, c, WANT_ENTROPY, WANT_SUMSQ):
    """Fold a ``(ROWS, VEC)`` tile of values into per-row running state.

    Each row of the tile (one thread's vector) keeps its own running max ``m`` and
    ``sum_p = sum 2^(c (v - m))``; nothing is reduced across threads until the end of the row.
    ``v - m`` is exact near the max, so the max itself contributes exactly 1.
    """
    m_new = tl.maximum(m, tl.max(v, axis=1))
    # nothing but -inf so far: shift by 0, or exp2(-inf - -inf) = nan
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp2((m - m_safe) * c)
    p = tl.exp2((v - m_safe[:, None]) * c)
    sum_p = sum_p * alpha + tl.sum(p, axis=1)
    if WANT_ENTROPY:
        # max(v, -big): p = 0 where v = -inf, and 0 * -inf would be nan
        sum_pv = sum_pv * alpha + tl.sum(p * tl.maximum(v, -3.0e38), axis=1)
    if WANT_SUMSQ:
        sum_pp = sum_pp * (alpha * alpha) + tl.sum(p * p, axis=1)
    return m_new, sum_p, sum_pv, sum_pp


@triton.jit
def _row_base(row_off, VEC: tl.constexpr, ALIGN: tl.constexpr):
    """Where a row's blocks start: ``row_off`` rounded down to a whole 16-byte vector when
    ``ALIGN`` (then every block load is a vector load, whatever V), and the ``head`` of
    elements before the row's first column that this leaves."""
    base = row_off // VEC * VEC if ALIGN else row_off
    return base, (row_off - base).to(tl.int32)


@triton.jit
def _fold_block(
    row_ptr,
    start,
    head,
    V,
    label,
    stride_v,
    scale,
    softcap,
    c,
    m,
    sum_p,
    sum_pv,
    sum_pp,
    sum_v,
    before_label,
    MASKED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    WANT_SUMSQ: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    """Load the block at positions ``start + [0, BLOCK_V)`` from the row's base (columns
    ``position - head``) and fold it in; only the first and last blocks of a row are ``MASKED``."""
    ROWS: tl.constexpr = BLOCK_V // VEC
    pos = start + tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    cols = pos - head
    if MASKED:
        in_row = (cols >= 0) & (cols < V)
        x = tl.load(row_ptr + pos.to(tl.int64) * stride_v, mask=in_row, other=0.0).to(tl.float32)
        v = tl.where(in_row, _values(x, scale, softcap, HAS_SOFTCAP, FOLD_SCALE), NEG_INF)
        if WANT_MEAN:
            sum_v += tl.sum(tl.where(in_row, v, 0.0), axis=1)
    else:
        x = tl.load(row_ptr + pos.to(tl.int64) * stride_v).to(tl.float32)
        v = _values(x, scale, softcap, HAS_SOFTCAP, FOLD_SCALE)
        if WANT_MEAN:
            sum_v += tl.sum(v, axis=1)
    if WANT_TOP1:
        # vectors wholly before the label's column; the label's own is read again at the end
        before = start + tl.arange(0, ROWS) * VEC + (VEC - 1) - head < label
        before_label = tl.where(before, tl.maximum(before_label, tl.max(v, axis=1)), before_label)
    m, sum_p, sum_pv, sum_pp = _fold(v, m, sum_p, sum_pv, sum_pp, c, WANT_ENTROPY, WANT_SUMSQ)
    return m, sum_p, sum_pv, sum_pp, sum_v, before_label


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
    WANT_ENTROPY: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    WANT_SUMSQ: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base, head = _row_base((row // T) * stride_b + (row % T) * stride_t, VEC, ALIGN)
    row_ptr = x_ptr + base
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    # 32-bit from here on: V < 2**31, and an ignored row reads column 0
    label = tl.where(valid, label, 0).to(tl.int32)
    c, s = _units(scale, FOLD_SCALE)
    x_label = tl.load(row_ptr + (label + head).to(tl.int64) * stride_v).to(tl.float32)
    v_label = _values(x_label, scale, softcap, HAS_SOFTCAP, FOLD_SCALE)

    # a block as (ROWS, VEC): each thread holds whole 16-byte vectors, and keeps one running
    # max and sum per vector until the end of the row
    ROWS: tl.constexpr = BLOCK_V // VEC
    m = tl.full((ROWS,), NEG_INF, tl.float32)
    sum_p = tl.zeros((ROWS,), tl.float32)
    sum_pv = tl.zeros((ROWS,), tl.float32)
    sum_pp = tl.zeros((ROWS,), tl.float32)
    sum_v = tl.zeros((ROWS,), tl.float32)
    before_label = tl.full((ROWS,), NEG_INF, tl.float32)
    # positions [0, end) from base hold the row; an ignored row computes nothing
    end = tl.where(valid, V + head, 0)
    full_end = end // BLOCK_V * BLOCK_V
    if valid:  # the first block, partial when head > 0 or V < BLOCK_V
        m, sum_p, sum_pv, sum_pp, sum_v, before_label = _fold_block(
            row_ptr,
            0,
            head,
            V,
            label,
            stride_v,
            scale,
            softcap,
            c,
            m,
            sum_p,
            sum_pv,
            sum_pp,
            sum_v,
            before_label,
            True,
            HAS_SOFTCAP,
            FOLD_SCALE,
            WANT_ENTROPY,
            WANT_MEAN,
            WANT_TOP1,
            WANT_SUMSQ,
            BLOCK_V,
            VEC,
        )
    for start in range(BLOCK_V, full_end, BLOCK_V):
        m, sum_p, sum_pv, sum_pp, sum_v, before_label = _fold_block(
            row_ptr,
            start,
            head,
            V,
            label,
            stride_v,
            scale,
            softcap,
            c,
            m,
            sum_p,
            sum_pv,
            sum_pp,
            sum_v,
            before_label,
            False,
            HAS_SOFTCAP,
            FOLD_SCALE,
            WANT_ENTROPY,
            WANT_MEAN,
            WANT_TOP1,
            WANT_SUMSQ,
            BLOCK_V,
            VEC,
        )
    if (full_end >= BLOCK_V) & (full_end < end):  # the last, partial block
        m, sum_p, sum_pv, sum_pp, sum_v, before_label = _fold_block(
            row_ptr,
            full_end,
            head,
            V,
            label,
            stride_v,
            scale,
            softcap,
            c,
            m,
            sum_p,
            sum_pv,
            sum_pp,
            sum_v,
            before_label,
            True,
            HAS_SOFTCAP,
            FOLD_SCALE,
            WANT_ENTROPY,
            WANT_MEAN,
            WANT_TOP1,
            WANT_SUMSQ,
            BLOCK_V,
            VEC,
        )

    # one reduction across the row's threads
    m_row = tl.max(m, 0)
    rescale = tl.exp2((m - tl.where(m_row == NEG_INF, 0.0, m_row)) * c)
    sum_row = tl.sum(sum_p * rescale, 0)
    log_sum = tl.log2(sum_row) * LN2  # log sum exp(z - s M)
    # s (v_y - M) - log_sum rather than z_y - lse: exactly 0 - log(1 + eps) when y is the max,
    # which keeps the relative precision of 1 - p_y for backward
    logp = s * (v_label - m_row) - log_sum
    lse = s * m_row + log_sum
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if WANT_ENTROPY:
        mean_z = s * tl.sum(sum_pv * rescale, 0) / sum_row
        tl.store(entropy_ptr + row, tl.where(valid, lse - mean_z, 0.0))
    if WANT_MEAN:
        tl.store(mean_ptr + row, tl.where(valid, s * tl.sum(sum_v, 0) / V, 0.0))
    if WANT_SUMSQ:
        sum_sq = tl.sum(sum_pp * rescale * rescale, 0)
        tl.store(sumsq_ptr + row, tl.where(valid, (tl.log2(sum_sq) - 2.0 * tl.log2(sum_row)) * LN2, 0.0))
    if WANT_TOP1:
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
        tl.store(top1_ptr + row, (valid & (v_label >= m_row) & (v_label > earlier)).to(tl.int8))


@triton.jit
def _neg_expm1(x):
    """1 - exp(x) for x <= 0, with a Taylor series near 0 where 1 - exp(x) cancels."""
    series = -x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0))))
    return tl.where(x > -0.01, series, 1.0 - tl.exp(x))


@triton.jit
def _gradient(
    x,
    cols,
    label,
    g_label,
    g_other,
    lse2,
    scale,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
):
    """``g * (onehot - softmax) * dz/dx`` of a tile; ``g_label = g (1 - p_y) dz/dx`` and
    ``g_other = -g dz/dx`` (without the softcap's factor) are per-row constants."""
    if HAS_SOFTCAP:
        z, e, r = _softcap(x * scale, softcap)
        p = tl.exp2(z * LOG2E - lse2)
        # d softcap / du = 4 e r^2
        dz = g_other * p * (4.0 * e * r * r)
        dz_label = g_label * (4.0 * e * r * r)
    else:
        c, _ = _units(scale, FOLD_SCALE)
        v = _values(x, scale, softcap, HAS_SOFTCAP, FOLD_SCALE)
        dz = g_other * tl.exp2(v * c - lse2)
        dz_label = g_label
    return tl.where(cols == label, dz_label, dz)


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
    FOLD_SCALE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """``ALIGN`` needs both rows at the same offset from a 16-byte boundary (the launcher checks
    the strides): one ``head`` serves both."""
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    base, head = _row_base(b * stride_b + t * stride_t, VEC, ALIGN)
    grad_base, _ = _row_base(b * grad_stride_b + t * grad_stride_t, VEC, ALIGN)
    row_ptr = x_ptr + base
    grad_row_ptr = grad_x_ptr + grad_base
    out_type = grad_x_ptr.dtype.element_ty
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    label = label.to(tl.int32)
    ROWS: tl.constexpr = BLOCK_V // VEC
    offs = tl.arange(0, ROWS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    end = V + head  # positions [0, end) from the bases hold the row
    full_end = end // BLOCK_V * BLOCK_V
    if valid:
        g = tl.load(grad_logp_ptr + row)
        # exp(z - lse) = 2^(z log2(e) - lse log2(e)); dz/dx = scale outside the softcap
        lse2 = tl.load(lse_ptr + row) * LOG2E
        # the target-class term in fp32 from the forward's precise log-prob
        g_label = g * _neg_expm1(tl.load(logp_ptr + row)) * scale
        g_other = -g * scale
        # the first block, partial when head > 0 or V < BLOCK_V
        cols = offs - head
        in_row = (cols >= 0) & (cols < V)
        x = tl.load(row_ptr + offs.to(tl.int64) * stride_v, mask=in_row, other=0.0).to(tl.float32)
        grad = _gradient(x, cols, label, g_label, g_other, lse2, scale, softcap, HAS_SOFTCAP, FOLD_SCALE)
        tl.store(grad_row_ptr + offs.to(tl.int64) * grad_stride_v, grad.to(out_type), mask=in_row)
        for start in range(BLOCK_V, full_end, BLOCK_V):
            pos = start + offs
            x = tl.load(row_ptr + pos.to(tl.int64) * stride_v).to(tl.float32)
            grad = _gradient(
                x, pos - head, label, g_label, g_other, lse2, scale, softcap, HAS_SOFTCAP, FOLD_SCALE
            )
            tl.store(grad_row_ptr + pos.to(tl.int64) * grad_stride_v, grad.to(out_type))
        if (full_end >= BLOCK_V) & (full_end < end):  # the last, partial block
            pos = full_end + offs
            in_row = pos - head < V
            x = tl.load(row_ptr + pos.to(tl.int64) * stride_v, mask=in_row, other=0.0).to(tl.float32)
            grad = _gradient(
                x, pos - head, label, g_label, g_other, lse2, scale, softcap, HAS_SOFTCAP, FOLD_SCALE
            )
            tl.store(grad_row_ptr + pos.to(tl.int64) * grad_stride_v, grad.to(out_type), mask=in_row)
    else:
        # an ignored row reads nothing and writes zeros
        zeros = tl.zeros((ROWS, VEC), out_type)
        for start in range(0, end, BLOCK_V):
            cols = start + offs - head
            in_row = (cols >= 0) & (cols < V)
            tl.store(grad_row_ptr + (start + offs).to(tl.int64) * grad_stride_v, zeros, mask=in_row)


def _tiling(logits: torch.Tensor, scale: float, softcap: float | None, *, align: bool) -> dict:
    """Compile-time options both kernels share: the block, its 16-byte vectors, whether rows
    start their blocks at a 16-byte boundary, and whether a positive scale folds into the
    exponent (no multiply per element; ``scale == 1`` costs nothing)."""
    vec = VECTOR_BYTES // logits.element_size()
    return {
        "HAS_SOFTCAP": softcap is not None,
        "FOLD_SCALE": softcap is None and scale > 0,
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
            WANT_ENTROPY=want[0],
            WANT_MEAN=want[1],
            WANT_TOP1=want[2],
            WANT_SUMSQ=want[3],
            # a contiguous vocabulary: blocks start on 16-byte boundaries whatever V
            **_tiling(logits, scale, softcap, align=logits.stride(2) == 1),
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
        **_tiling(logits, scale, softcap, align=_same_alignment(logits, grad_logits)),
    )
