"""Fused linear log-probs (design (b) of issue 3): logits tiles exist only in SRAM.

Inputs are the scored rows only: ``rows`` ``(n, H)``, the lm_head ``weight`` ``(V, H)``, an
optional ``bias`` ``(V,)`` (one compute dtype for all three) and ``labels`` ``(n,)`` int64 in
``[0, V)``. A logits tile ``x = rows[tok_blk] @ weight[v_blk].T + bias[v_blk]`` is a
``(BLOCK_N, BLOCK_V)`` fp32 accumulator of ``tl.dot`` steps over ``H``; it is transformed
(``z = softcap(x * scale)``, the core kernels' ``_transform``) and consumed where it is made.
Nothing of size ``n x V`` is written to global memory.

* Forward, grid over token blocks: each program walks the vocabulary with an online
  log-sum-exp and writes ``logp``, ``lse`` and the optional statistics per token.
* Backward, deterministic (no atomics; every output element has one owner program and a
  fixed summation order, so two runs give the same bits):

  - ``_grad_rows_kernel``, grid over token blocks: for each vocabulary block recompute the
    tile, form ``G = g * (onehot - softmax) * dz/dx`` and add ``G @ weight[v_blk]`` into the
    program's own rows of an fp32 ``(n, H)`` buffer;
  - ``_grad_weight_kernel``, grid over vocabulary blocks: for each token block recompute the
    tile, form ``G`` and add ``G.T @ rows[tok_blk]`` into the program's own rows of an fp32
    ``(V, H)`` buffer; the bias gradient ``sum(G, 0)`` is kept in registers.

  That is five ``2 n H V`` matmuls per training step (forward, two recomputations, two
  gradients) against four for the chunked design (a).

* Optional gradient filtering (``grad_filter_eps``): a ``(token block, vocabulary block)``
  tile whose softmax probabilities are all below ``eps`` and which holds no label skips its
  gradient matmul in both backward kernels (its recomputation is still needed to decide).
  A skipped element's gradient is ``|g_i| * p_ij * |dz/dx_ij| < eps * |scale| * |g_i|``
  (``|d softcap / du| <= 1``), so per entry:

  - ``|err grad_rows[i, k]| <= eps * |scale| * |g_i| * sum_j |weight[j, k]|``
  - ``|err grad_weight[j, k]| <= eps * |scale| * sum_i |g_i| * |rows[i, k]|``

  with ``scale = logit_scale / temperature``. The bias gradient is never filtered (its sum
  costs nothing next to the matmuls).

All offsets are int64; sizes need not be multiples of the blocks (masked loads and stores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logprobs import _neg_expm1, _transform, _transform_with_derivative

# Untuned Hopper defaults (no GPU was available to time them): a 64 x 128 fp32 logits tile
# per program, tl.dot steps of 32 along H (tl.dot needs every dimension >= 16). Compiled
# offline for sm_90 (ptxas resource usage): bf16 without softcap or filtering fits in
# 204-218 registers with 8 warps and no spills; softcap + filtering spill ~100 bytes in
# backward; fp32 (IEEE dots on FMA units) spills in every configuration tried. BLOCK_H = 64
# or 4 warps spilled more.
# Accumulator traffic to weigh when tuning: _grad_rows_kernel reads and writes its fp32
# (BLOCK_N, H) rows once per vocabulary block (8 n H V / BLOCK_V bytes in all), and
# _grad_weight_kernel its (BLOCK_V, H) rows once per token block (8 n H V / BLOCK_N bytes).
BLOCK_N = 64
BLOCK_V = 128
BLOCK_H = 32
NUM_WARPS = 8


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32.

    DOT_UPCAST is set only under Triton's CPU interpreter, whose ``tl.dot`` multiplies bf16
    operands' bit patterns as integers; a bf16 product is exact in fp32, so the upcast
    computes what the tensor cores do.
    """
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(
    rows_ptr,
    weight_ptr,
    bias_ptr,
    offs_n,
    offs_v,
    n,
    V,
    H,
    stride_rn,
    stride_rh,
    stride_wv,
    stride_wh,
    stride_bias,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """fp32 ``rows[offs_n] @ weight[offs_v].T + bias[offs_v]``; 0 (+ bias) outside n, V."""
    row_ok = offs_n < n
    col_ok = offs_v < V
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h_start in range(0, H, BLOCK_H):
        h = h_start + tl.arange(0, BLOCK_H).to(tl.int64)
        h_ok = h < H
        r = tl.load(
            rows_ptr + offs_n[:, None] * stride_rn + h[None, :] * stride_rh,
            mask=row_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + offs_v[None, :] * stride_wv + h[:, None] * stride_wh,
            mask=col_ok[None, :] & h_ok[:, None],
            other=0.0,
        )
        acc = _dot(r, w, acc, DOT_PRECISION, DOT_UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v * stride_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _token_grad_terms(labels_ptr, grad_logp_ptr, logp_ptr, lse_ptr, offs_n, n):
    """Per-token labels, ``g``, the target term ``g * (1 - p_y)`` and ``lse`` of a block.

    Rows past ``n`` get label -1 (matches no column), ``g = 0`` and ``lse = +inf`` (their
    softmax is exactly 0, not ``exp`` of an unbounded logit).
    """
    row_ok = offs_n < n
    labels = tl.load(labels_ptr + offs_n, mask=row_ok, other=-1)
    g = tl.load(grad_logp_ptr + offs_n, mask=row_ok, other=0.0)
    # 1 - p_y in fp32 from the forward's precise log-prob
    g_label = g * _neg_expm1(tl.load(logp_ptr + offs_n, mask=row_ok, other=0.0))
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=float("inf"))
    return labels, g, g_label, lse


@triton.jit
def _logits_grad(
    x,
    offs_v,
    V,
    labels,
    g,
    g_label,
    lse,
    scale,
    softcap,
    filter_eps,
    HAS_SOFTCAP: tl.constexpr,
    FILTER: tl.constexpr,
):
    """``G = g * (onehot - softmax) * dz/dx`` of a logits tile (0 outside V), and whether its
    gradient matmuls are needed (always, unless FILTER finds every prob < eps and no label)."""
    z, dz_dx = _transform_with_derivative(x, scale, softcap, HAS_SOFTCAP)
    col_ok = offs_v < V
    p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
    is_label = offs_v[None, :] == labels[:, None]
    grad = tl.where(is_label, g_label[:, None], -g[:, None] * p) * dz_dx
    grad = tl.where(col_ok[None, :], grad, 0.0)
    needed = True
    if FILTER:
        has_label = tl.max(tl.max(is_label.to(tl.int32), 1), 0) > 0
        needed = has_label | (tl.max(tl.max(p, 1), 0) >= filter_eps)
    return grad, needed


@triton.jit
def _forward_kernel(
    rows_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    mean_ptr,
    top1_ptr,
    sumsq_ptr,
    n,
    V,
    H,
    stride_rn,
    stride_rh,
    stride_wv,
    stride_wh,
    stride_bias,
    scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    WANT_SUMSQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n
    labels = tl.load(labels_ptr + offs_n, mask=row_ok, other=-1)

    # Online log-sum-exp per row, as the core forward kernel; statistics rescale with m.
    # Every tile holds at least one column < V, so m is finite after the first one.
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_z = tl.zeros((BLOCK_N,), tl.float32)
    sum_exp_sq = tl.zeros((BLOCK_N,), tl.float32)
    sum_z = tl.zeros((BLOCK_N,), tl.float32)
    z_label = tl.zeros((BLOCK_N,), tl.float32)
    max_before_label = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for v_start in range(0, V, BLOCK_V):
        offs_v = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = offs_v < V
        x = _logits_tile(
            rows_ptr,
            weight_ptr,
            bias_ptr,
            offs_n,
            offs_v,
            n,
            V,
            H,
            stride_rn,
            stride_rh,
            stride_wv,
            stride_wh,
            stride_bias,
            HAS_BIAS,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            DOT_PRECISION,
            DOT_UPCAST,
        )
        z = tl.where(col_ok[None, :], _transform(x, scale, softcap, HAS_SOFTCAP), float("-inf"))
        z_label += tl.sum(tl.where(offs_v[None, :] == labels[:, None], z, 0.0), 1)
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        sum_exp = sum_exp * alpha + tl.sum(e, 1)
        if WANT_ENTROPY:
            # e == 0 where z == -inf: 0, not 0 * -inf
            sum_exp_z = sum_exp_z * alpha + tl.sum(tl.where(e > 0, e * z, 0.0), 1)
        if WANT_SUMSQ:
            sum_exp_sq = sum_exp_sq * alpha * alpha + tl.sum(e * e, 1)
        if WANT_MEAN:
            sum_z += tl.sum(tl.where(col_ok[None, :], z, 0.0), 1)
        if WANT_TOP1:
            before = offs_v[None, :] < labels[:, None]
            max_before_label = tl.maximum(max_before_label, tl.max(tl.where(before, z, float("-inf")), 1))
        m = m_new

    log_sum_exp = tl.log(sum_exp)
    # (z_y - m) - log(sum_exp), not z_y - lse: keeps the relative precision of 1 - p_y
    tl.store(logp_ptr + offs_n, (z_label - m) - log_sum_exp, mask=row_ok)
    tl.store(lse_ptr + offs_n, m + log_sum_exp, mask=row_ok)
    if WANT_ENTROPY:
        tl.store(entropy_ptr + offs_n, m + log_sum_exp - sum_exp_z / sum_exp, mask=row_ok)
    if WANT_MEAN:
        tl.store(mean_ptr + offs_n, sum_z / V, mask=row_ok)
    if WANT_TOP1:
        # first index wins ties, as the core kernel and torch.argmax
        top1 = (z_label >= m) & (z_label > max_before_label)
        tl.store(top1_ptr + offs_n, top1.to(tl.int8), mask=row_ok)
    if WANT_SUMSQ:
        tl.store(sumsq_ptr + offs_n, tl.log(sum_exp_sq) - 2.0 * log_sum_exp, mask=row_ok)


@triton.jit
def _grad_rows_kernel(
    rows_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    grad_logp_ptr,
    logp_ptr,
    lse_ptr,
    grad_rows_ptr,
    n,
    V,
    H,
    stride_rn,
    stride_rh,
    stride_wv,
    stride_wh,
    stride_bias,
    scale,
    softcap,
    filter_eps,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FILTER: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """``grad_rows[tok_blk] = sum over vocabulary blocks of G @ weight[v_blk]`` (fp32, (n, H)
    contiguous, zero-initialized; this program owns rows ``tok_blk``)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n
    labels, g, g_label, lse = _token_grad_terms(labels_ptr, grad_logp_ptr, logp_ptr, lse_ptr, offs_n, n)
    for v_start in range(0, V, BLOCK_V):
        offs_v = v_start + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = offs_v < V
        x = _logits_tile(
            rows_ptr,
            weight_ptr,
            bias_ptr,
            offs_n,
            offs_v,
            n,
            V,
            H,
            stride_rn,
            stride_rh,
            stride_wv,
            stride_wh,
            stride_bias,
            HAS_BIAS,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            DOT_PRECISION,
            DOT_UPCAST,
        )
        grad, needed = _logits_grad(
            x, offs_v, V, labels, g, g_label, lse, scale, softcap, filter_eps, HAS_SOFTCAP, FILTER
        )
        if needed:
            # the operands' dtype for the tensor cores, as design (a)'s logits-gradient tile
            grad_mm = grad.to(weight_ptr.dtype.element_ty)
            for h_start in range(0, H, BLOCK_H):
                h = h_start + tl.arange(0, BLOCK_H).to(tl.int64)
                h_ok = h < H
                w = tl.load(
                    weight_ptr + offs_v[:, None] * stride_wv + h[None, :] * stride_wh,
                    mask=col_ok[:, None] & h_ok[None, :],
                    other=0.0,
                )
                out = grad_rows_ptr + offs_n[:, None] * H + h[None, :]
                out_ok = row_ok[:, None] & h_ok[None, :]
                acc = tl.load(out, mask=out_ok, other=0.0)
                acc = _dot(grad_mm, w, acc, DOT_PRECISION, DOT_UPCAST)
                tl.store(out, acc, mask=out_ok)


@triton.jit
def _grad_weight_kernel(
    rows_ptr,
    weight_ptr,
    bias_ptr,
    labels_ptr,
    grad_logp_ptr,
    logp_ptr,
    lse_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    n,
    V,
    H,
    stride_rn,
    stride_rh,
    stride_wv,
    stride_wh,
    stride_bias,
    scale,
    softcap,
    filter_eps,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    FILTER: tl.constexpr,
    WANT_WEIGHT: tl.constexpr,
    WANT_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """``grad_weight[v_blk] = sum over token blocks of G.T @ rows[tok_blk]`` (fp32, (V, H)
    contiguous, zero-initialized) and ``grad_bias[v_blk] = sum G`` (fp32 (V,), written once);
    this program owns vocabulary rows ``v_blk``."""
    offs_v = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    grad_bias = tl.zeros((BLOCK_V,), tl.float32)
    for n_start in range(0, n, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = offs_n < n
        labels, g, g_label, lse = _token_grad_terms(labels_ptr, grad_logp_ptr, logp_ptr, lse_ptr, offs_n, n)
        x = _logits_tile(
            rows_ptr,
            weight_ptr,
            bias_ptr,
            offs_n,
            offs_v,
            n,
            V,
            H,
            stride_rn,
            stride_rh,
            stride_wv,
            stride_wh,
            stride_bias,
            HAS_BIAS,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            DOT_PRECISION,
            DOT_UPCAST,
        )
        grad, needed = _logits_grad(
            x, offs_v, V, labels, g, g_label, lse, scale, softcap, filter_eps, HAS_SOFTCAP, FILTER
        )
        if WANT_BIAS:
            grad_bias += tl.sum(grad, 0)
        if WANT_WEIGHT:  # noqa: SIM102 (compile-time switch around a run-time test)
            if needed:
                grad_t = tl.trans(grad.to(rows_ptr.dtype.element_ty))
                for h_start in range(0, H, BLOCK_H):
                    h = h_start + tl.arange(0, BLOCK_H).to(tl.int64)
                    h_ok = h < H
                    r = tl.load(
                        rows_ptr + offs_n[:, None] * stride_rn + h[None, :] * stride_rh,
                        mask=row_ok[:, None] & h_ok[None, :],
                        other=0.0,
                    )
                    out = grad_weight_ptr + offs_v[:, None] * H + h[None, :]
                    out_ok = col_ok[:, None] & h_ok[None, :]
                    acc = tl.load(out, mask=out_ok, other=0.0)
                    acc = _dot(grad_t, r, acc, DOT_PRECISION, DOT_UPCAST)
                    tl.store(out, acc, mask=out_ok)
    if WANT_BIAS:
        tl.store(grad_bias_ptr + offs_v, grad_bias, mask=col_ok)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands follow torch's matmul setting (IEEE unless TF32 is allowed), as the
    chunked design's torch.mm does; half-precision operands ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _common_args(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    n, H = rows.shape
    return (
        n,
        weight.shape[0],
        H,
        rows.stride(0),
        rows.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if bias is not None else 0,
    )


def _block_args(rows: torch.Tensor) -> dict:
    return {
        "BLOCK_N": BLOCK_N,
        "BLOCK_V": BLOCK_V,
        "BLOCK_H": BLOCK_H,
        "DOT_PRECISION": _dot_precision(rows.dtype),
        "DOT_UPCAST": rows.dtype == torch.bfloat16 and rows.device.type == "cpu",
        "num_warps": NUM_WARPS,
    }


def linear_logprobs_forward(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    scale: float,
    softcap: float | None,
    stats: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Launch the fused forward.

    Args:
        rows: ``(n, H)`` scored hidden rows, any strides.
        weight: ``(V, H)``, any strides; ``bias`` ``(V,)`` or None; all in rows' dtype
            (fp16/bf16/fp32).
        labels: ``(n,)`` contiguous int64 in ``[0, V)`` (every row is scored).
    Returns:
        ``logp`` and ``lse`` ``(n,)`` fp32, and the requested statistics ``(n,)``
        (``is_top1`` bool, others fp32), as the core ``logprobs_forward``.
    """
    n = rows.shape[0]
    logp = torch.empty(n, device=rows.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    outputs = {
        "entropy": torch.empty_like(logp) if "entropy" in stats else None,
        "mean_logits": torch.empty_like(logp) if "mean_logits" in stats else None,
        "is_top1": torch.empty(n, device=rows.device, dtype=torch.int8) if "is_top1" in stats else None,
        "log_sum_sq_probs": torch.empty_like(logp) if "log_sum_sq_probs" in stats else None,
    }
    if n > 0:
        _forward_kernel[(triton.cdiv(n, BLOCK_N),)](
            rows,
            weight,
            bias if bias is not None else weight,
            labels,
            logp,
            lse,
            *(value if value is not None else logp for value in outputs.values()),
            *_common_args(rows, weight, bias),
            scale,
            softcap if softcap is not None else 1.0,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            WANT_ENTROPY="entropy" in stats,
            WANT_MEAN="mean_logits" in stats,
            WANT_TOP1="is_top1" in stats,
            WANT_SUMSQ="log_sum_sq_probs" in stats,
            **_block_args(rows),
        )
    stat_values = {name: value for name, value in outputs.items() if value is not None}
    if "is_top1" in stat_values:
        stat_values["is_top1"] = stat_values["is_top1"].bool()
    return logp, lse, stat_values


def linear_logprobs_backward(
    grad_logp: torch.Tensor,
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    logp: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    softcap: float | None,
    need_rows: bool,
    need_weight: bool,
    need_bias: bool,
    grad_filter_eps: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernels for the gradients asked for.

    Args:
        grad_logp, logp, lse: ``(n,)`` contiguous fp32 (``logp``/``lse`` from the forward).
        rows, weight, bias, labels, scale, softcap: as :func:`linear_logprobs_forward`.
        grad_filter_eps: None (exact) or the probability below which a tile without labels
            skips its gradient matmuls (see the module docstring for the error bound).
    Returns:
        fp32 ``grad_rows`` ``(n, H)``, ``grad_weight`` ``(V, H)``, ``grad_bias`` ``(V,)``;
        None for those not asked for.
    """
    n, H = rows.shape
    V = weight.shape[0]
    device = rows.device
    grad_rows = torch.zeros((n, H), device=device, dtype=torch.float32) if need_rows else None
    grad_weight = torch.zeros((V, H), device=device, dtype=torch.float32) if need_weight else None
    grad_bias = torch.zeros(V, device=device, dtype=torch.float32) if need_bias else None
    if n == 0:
        return grad_rows, grad_weight, grad_bias
    operands = (
        rows,
        weight,
        bias if bias is not None else weight,
        labels,
        grad_logp,
        logp,
        lse,
    )
    options = {
        "HAS_BIAS": bias is not None,
        "HAS_SOFTCAP": softcap is not None,
        "FILTER": grad_filter_eps is not None,
        **_block_args(rows),
    }
    transform = (
        scale,
        softcap if softcap is not None else 1.0,
        grad_filter_eps if grad_filter_eps is not None else 0.0,
    )
    if grad_rows is not None:
        _grad_rows_kernel[(triton.cdiv(n, BLOCK_N),)](
            *operands, grad_rows, *_common_args(rows, weight, bias), *transform, **options
        )
    if grad_weight is not None or grad_bias is not None:
        _grad_weight_kernel[(triton.cdiv(V, BLOCK_V),)](
            *operands,
            grad_weight if grad_weight is not None else lse,
            grad_bias if grad_bias is not None else lse,
            *_common_args(rows, weight, bias),
            *transform,
            WANT_WEIGHT=grad_weight is not None,
            WANT_BIAS=grad_bias is not None,
            **options,
        )
    return grad_rows, grad_weight, grad_bias
