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

from .tl_math import logit_transform, logit_transform_with_derivative, neg_expm1

# One row streams through SRAM in blocks of this many logits (16 KiB of fp32 per block).
MAX_BLOCK_V = 4096
NUM_WARPS = 8


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
    WANT_ENTROPY: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    WANT_SUMSQ: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + (row // T) * stride_b + (row % T) * stride_t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    # an ignored row reads nothing; a mask of (cols < V) & valid also trips Triton's interpreter
    n_cols = tl.where(valid, V, 0)

    x_label = tl.load(row_ptr + safe_label * stride_v, mask=valid, other=0.0).to(tl.float32)
    z_label = logit_transform(x_label, scale, softcap, HAS_SOFTCAP)

    # Online log-sum-exp: running max m, sum_exp = sum exp(z - m). Statistics rescale with it.
    m = float("-inf")
    sum_exp = 0.0
    sum_exp_z = 0.0
    sum_exp_sq = 0.0
    sum_z = 0.0
    max_before_label = float("-inf")
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < n_cols
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=in_row, other=float("-inf")).to(tl.float32)
        # softcap(-inf) is finite: re-mask after the transform
        z = tl.where(in_row, logit_transform(x, scale, softcap, HAS_SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        # all -inf so far: shift by 0 instead of -inf, or exp(-inf - -inf) = nan
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        sum_exp = sum_exp * alpha + tl.sum(e, 0)
        if WANT_ENTROPY:
            sum_exp_z = sum_exp_z * alpha + tl.sum(tl.where(e > 0, e * z, 0.0), 0)
        if WANT_SUMSQ:
            sum_exp_sq = sum_exp_sq * alpha * alpha + tl.sum(e * e, 0)
        if WANT_MEAN:
            sum_z += tl.sum(tl.where(in_row, z, 0.0), 0)
        if WANT_TOP1:
            max_before_label = tl.maximum(
                max_before_label, tl.max(tl.where(cols < safe_label, z, float("-inf")), 0)
            )
        m = m_new

    log_sum_exp = tl.log(sum_exp)
    # (z_y - m) - log(sum_exp) rather than z_y - lse: exact 0 - log(1 + eps) when y is the max,
    # which keeps the relative precision of 1 - p_y for backward
    logp = (z_label - m) - log_sum_exp
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, m + log_sum_exp, 0.0))
    if WANT_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, m + log_sum_exp - sum_exp_z / sum_exp, 0.0))
    if WANT_MEAN:
        tl.store(mean_ptr + row, tl.where(valid, sum_z / V, 0.0))
    if WANT_TOP1:
        # first index wins ties: the label is top-1 iff it reaches the max and no earlier column does
        tl.store(top1_ptr + row, (valid & (z_label >= m) & (z_label > max_before_label)).to(tl.int8))
    if WANT_SUMSQ:
        tl.store(sumsq_ptr + row, tl.where(valid, tl.log(sum_exp_sq) - 2.0 * log_sum_exp, 0.0))


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
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    row_ptr = x_ptr + b * stride_b + t * stride_t
    grad_row_ptr = grad_x_ptr + b * grad_stride_b + t * grad_stride_t
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    g = tl.where(valid, tl.load(grad_logp_ptr + row), 0.0)
    lse = tl.load(lse_ptr + row)
    # the target-class term in fp32 from the forward's precise log-prob
    g_label = g * neg_expm1(tl.load(logp_ptr + row))
    n_cols = tl.where(valid, V, 0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_v, mask=cols < n_cols, other=0.0).to(tl.float32)
        z, dz_dx = logit_transform_with_derivative(x, scale, softcap, HAS_SOFTCAP)
        dz = tl.where(cols == label, g_label, -g * tl.exp(z - lse))
        grad = tl.where(valid, dz * dz_dx, 0.0)
        tl.store(
            grad_row_ptr + cols.to(tl.int64) * grad_stride_v,
            grad.to(grad_x_ptr.dtype.element_ty),
            mask=in_row,
        )


def _block_v(vocab_size: int) -> int:
    return min(triton.next_power_of_2(vocab_size), MAX_BLOCK_V)


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
            HAS_SOFTCAP=softcap is not None,
            WANT_ENTROPY=want[0],
            WANT_MEAN=want[1],
            WANT_TOP1=want[2],
            WANT_SUMSQ=want[3],
            BLOCK_V=_block_v(V),
            num_warps=NUM_WARPS,
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
        HAS_SOFTCAP=softcap is not None,
        BLOCK_V=_block_v(V),
        num_warps=NUM_WARPS,
    )
