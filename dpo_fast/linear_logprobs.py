"""Fused linear log-probs: label log-probs from hidden states and the lm_head weight.

No tensor of ``tokens x V`` elements exists, in forward or backward. Data flow:

1. validate; only scored positions (``label != ignore_index``, after the shift) are kept:
   their hidden rows are gathered into ``rows`` ``(n, H)``, so prompt and padding tokens
   never reach the lm_head. The causal shift is index arithmetic on the labels
   (``hidden[..., :-1, :]`` is a view).
2. ``_LinearLogprobs.forward`` walks ``rows`` in chunks of ``chunk_rows`` tokens: one matmul
   writes a ``(chunk, V)`` logits tile in the compute dtype, and the core backend's
   ``logprobs_forward`` (Triton kernel, chunked PyTorch, or the C++ CPU kernel, whichever
   ``dpo_fast.logprobs._implementation`` picks) folds it into per-token ``logp`` and ``lse``.
   Those O(tokens) values are saved, and the one tile buffer is kept for backward.
3. ``backward`` starts with the last chunk, whose logits are still in the tile buffer, then
   recomputes each other tile (same matmul, same bits), turns it into the logits gradient in
   place with the backend's ``logprobs_backward(grad_x=tile)`` and multiplies it out:
   ``grad_rows = tile @ W`` per chunk, ``grad_W += tile.T @ rows`` and
   ``grad_b += tile.sum(0)`` accumulated in fp32 across chunks, in a fixed order (no
   atomics, so two runs give the same bits).

``method="fused"`` (design (b), opt-in, Triton only) replaces steps 2-3 with the kernels of
``dpo_fast.kernels.linear_logprobs`` (``_FusedLinearLogprobs``): the logits tiles never leave
SRAM, and ``grad_filter_eps`` may skip backward tiles whose softmax is negligible. Step 1,
the unpacking of the results, dtypes and autocast are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from .checks import check_labels, check_linear_head, check_linear_method, check_stats, check_transform
from .logprobs import SequenceLogprobs, TokenLogprobs, _implementation, new_buffer, sequence_sums
from .registry import resolve_backend

# Upper bound on one (chunk, V) logits tile, in bytes; the only [*, V] buffer alive.
# GPU: every chunk adds its product into the fp32 (V, H) weight-gradient accumulator, which
# cuBLAS reads and writes once per chunk (4.2 GB for a 128k x 4096 head); below ~2048 tokens
# per chunk that traffic, not the FLOPs, bounds the matmul on an H100. 512 MiB is 2048 tokens
# of a 128k bf16 vocabulary. CPU: the matmuls lose efficiency below a few hundred rows, and
# backward skips one recompute (the last tile): at 2048 x 512 x 32000 fp32, forward+backward
# took 1.59 / 1.42 / 1.37 s with 32 / 64 / 128 MiB tiles, naive matmul+log_softmax 1.35 s.
TILE_BYTES = {"cuda": 512 << 20}
DEFAULT_TILE_BYTES = 128 << 20


def chunk_rows(vocab_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per logits tile: as many as fit in the device's ``TILE_BYTES`` budget (>= 1)."""
    budget = TILE_BYTES.get(device.type, DEFAULT_TILE_BYTES)
    rows = budget // (vocab_size * dtype.itemsize)
    # multiples of 64 keep the matmul on full tensor-core tiles
    return max(1, rows // 64 * 64 if rows >= 64 else rows)


def _mm_out_dtype_supported(device: torch.device) -> bool:
    # torch.addmm(..., out_dtype=float32) from bf16/fp16 inputs exists on CUDA since torch 2.8
    return device.type == "cuda" and hasattr(torch.ops.aten.addmm, "dtype_out")


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` without first rounding ``a @ b`` to bf16/fp16.

    The lm_head gradient sums one product per chunk; rounding each to the inputs' dtype
    before the sum makes it drift.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _mm_out_dtype_supported(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _project(tile: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``tile = rows @ weight.T + bias``, in the compute dtype (the same bits every call)."""
    if bias is None:
        torch.mm(rows, weight.t(), out=tile)
    else:
        torch.addmm(bias, rows, weight.t(), out=tile)


def _chunks(n: int, step: int):
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _forward_chunks(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    impl: ModuleType,
    options: dict,
    stats: tuple[str, ...],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Per-token ``logp``, ``lse`` (fp32 ``(n,)``) and statistics for compute-dtype operands,
    and the ``(chunk, V)`` tile buffer, which still holds the last chunk's logits."""
    n, V = rows.shape[0], weight.shape[0]
    logp = torch.empty(n, device=rows.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    out = {
        name: torch.empty(n, device=rows.device, dtype=torch.bool if name == "is_top1" else torch.float32)
        for name in stats
    }
    step = chunk_rows(V, weight.dtype, rows.device)
    buffer = new_buffer((min(n, step), V), weight.dtype, rows.device, impl)
    for start, end in _chunks(n, step):
        tile = buffer[: end - start]
        _project(tile, rows[start:end], weight, bias)
        chunk_logp, chunk_lse, chunk_stats = impl.logprobs_forward(
            tile.unsqueeze(0), labels[start:end].unsqueeze(0), stats=stats, **options
        )
        logp[start:end] = chunk_logp[0]
        lse[start:end] = chunk_lse[0]
        for name, value in chunk_stats.items():
            out[name][start:end] = value[0]
    return logp, lse, out, buffer


def _cast(dtype: torch.dtype, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """``rows``, ``weight``, ``bias`` in the compute dtype (no copy when already in it)."""
    return rows.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None


def _in_own_dtypes(grads: tuple, operands: tuple) -> tuple:
    """Each gradient (or None) in its operand's dtype."""
    return tuple(g.to(t.dtype) if g is not None else None for g, t in zip(grads, operands, strict=True))


def _run_forward(rows, weight, bias, labels, compute_dtype, impl, options, stats):
    """Cast the operands to the compute dtype and run the chunked forward (``_forward_chunks``)."""
    with torch.autocast(rows.device.type, enabled=False):
        return _forward_chunks(*_cast(compute_dtype, rows, weight, bias), labels, impl, options, stats)


def _run_fused_forward(rows, weight, bias, labels, compute_dtype, kernels, options, stats):
    """Cast the operands to the compute dtype and run the fused forward kernel."""
    with torch.autocast(rows.device.type, enabled=False):
        return kernels.linear_logprobs_forward(
            *_cast(compute_dtype, rows, weight, bias),
            labels,
            scale=options["scale"],
            softcap=options["softcap"],
            stats=stats,
        )


class _LinearLogprobs(torch.autograd.Function):
    """Log-probs of ``labels`` under ``rows @ weight.T + bias``; differentiable w.r.t. all three.

    ``rows`` ``(n, H)``, ``weight`` ``(V, H)``, ``bias`` ``(V,)`` arrive in their own dtypes
    and are cast to ``compute_dtype`` inside (once per pass for the weight), so an fp32
    master weight under autocast gets its gradient from the fp32 accumulator, not through a
    bf16 copy.
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, labels, compute_dtype, impl, options, stats):
        logp, lse, stat_values, buffer = _run_forward(
            rows, weight, bias, labels, compute_dtype, impl, options, stats
        )
        ctx.save_for_backward(rows, weight, bias, labels, logp, lse)
        ctx.compute_dtype, ctx.impl, ctx.options = compute_dtype, impl, options
        # The tile buffer outlives forward: backward needs one of the same size, and it holds
        # the last chunk's logits, which backward then need not recompute (one tile's matmul
        # fewer). The lm_head is a model's last layer, so its backward usually comes next.
        ctx.buffer = buffer
        ctx.mark_non_differentiable(*stat_values.values())
        return (logp, *stat_values.values())

    @staticmethod
    def backward(ctx, grad_logp, *_):
        rows, weight, bias, labels, logp, lse = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype, impl, options = ctx.compute_dtype, ctx.impl, ctx.options
        n, V = rows.shape[0], weight.shape[0]
        with torch.autocast(rows.device.type, enabled=False):
            weight_c = weight.to(dtype)
            bias_c = bias.to(dtype) if bias is not None else None
            grad_rows = torch.empty(rows.shape, device=rows.device, dtype=dtype) if need_rows else None
            grad_weight = (
                torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
            )
            grad_bias = torch.zeros(V, device=weight.device, dtype=torch.float32) if need_bias else None
            grad_logp = grad_logp.float().contiguous()
            step = chunk_rows(V, dtype, rows.device)
            chunks = list(_chunks(n, step))
            buffer, ctx.buffer = ctx.buffer, None
            holds_last_tile = buffer is not None  # not in a second backward (retain_graph)
            if not holds_last_tile:
                buffer = new_buffer((min(n, step), V), dtype, rows.device, impl)
            # the last chunk first, while its forward logits are still in the buffer
            for index, (start, end) in enumerate(chunks[-1:] + chunks[:-1]):
                rows_c = rows[start:end].to(dtype)
                tile = buffer[: end - start]
                if index > 0 or not holds_last_tile:
                    _project(tile, rows_c, weight_c, bias_c)
                x = tile.unsqueeze(0)
                impl.logprobs_backward(
                    grad_logp[start:end].unsqueeze(0),
                    x,
                    labels[start:end].unsqueeze(0),
                    logp[start:end].unsqueeze(0),
                    lse[start:end].unsqueeze(0),
                    x,
                    **options,
                )
                # one matmul covers a chunk's whole vocabulary: nothing to accumulate across chunks
                if grad_rows is not None:
                    torch.mm(tile, weight_c, out=grad_rows[start:end])
                if grad_weight is not None:
                    _accumulate_fp32(grad_weight, tile.t(), rows_c)
                if grad_bias is not None:
                    grad_bias += tile.sum(0, dtype=torch.float32)
        grads = _in_own_dtypes((grad_rows, grad_weight, grad_bias), (rows, weight, bias))
        return (*grads, *([None] * 5))


class _FusedLinearLogprobs(torch.autograd.Function):
    """``_LinearLogprobs`` with design (b)'s kernels (``kernels``, the module
    ``dpo_fast.kernels.linear_logprobs``): no logits tile leaves SRAM. ``grad_filter_eps``
    (None = exact) skips backward tiles whose softmax is negligible, within the bound that
    module documents."""

    @staticmethod
    def forward(ctx, rows, weight, bias, labels, compute_dtype, kernels, options, stats, grad_filter_eps):
        logp, lse, stat_values = _run_fused_forward(
            rows, weight, bias, labels, compute_dtype, kernels, options, stats
        )
        ctx.save_for_backward(rows, weight, bias, labels, logp, lse)
        ctx.compute_dtype, ctx.kernels, ctx.options = compute_dtype, kernels, options
        ctx.grad_filter_eps = grad_filter_eps
        ctx.mark_non_differentiable(*stat_values.values())
        return (logp, *stat_values.values())

    @staticmethod
    def backward(ctx, grad_logp, *_):
        rows, weight, bias, labels, logp, lse = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        with torch.autocast(rows.device.type, enabled=False):
            grads = ctx.kernels.linear_logprobs_backward(
                grad_logp.float().contiguous(),
                *_cast(ctx.compute_dtype, rows, weight, bias),
                labels,
                logp,
                lse,
                scale=ctx.options["scale"],
                softcap=ctx.options["softcap"],
                need_rows=need_rows,
                need_weight=need_weight,
                need_bias=need_bias,
                grad_filter_eps=ctx.grad_filter_eps,
            )
        return (*_in_own_dtypes(grads, (rows, weight, bias)), *([None] * 6))


def _fused_kernels() -> ModuleType:
    # imported on first use, as the core's Triton backend: Triton reads TRITON_INTERPRET
    # when the kernels are defined
    from .kernels import linear_logprobs

    return linear_logprobs


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    """The autocast dtype when autocast is on; otherwise all operands must share one dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(
                f"{name} must have hidden's dtype {hidden.dtype} (outside autocast), got {tensor.dtype}"
            )
    return hidden.dtype


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    stats: Sequence[str] = (),
    backend: str = "auto",
    method: str = "chunked",
    grad_filter_eps: float | None = None,
) -> TokenLogprobs:
    """Label log-probs of ``softcap(logit_scale * (hidden @ weight.T + bias) / temperature)``,
    never materializing those ``(..., T, V)`` logits.

    Args:
        hidden: ``(..., T, H)`` float16/bfloat16/float32, any strides (e.g. ``h[:, :-1]``).
        weight: ``(V, H)`` the lm_head weight (may be tied to the input embeddings).
        labels: ``(..., T)`` integer; ``ignore_index`` marks positions that are not scored.
            Unscored positions cost nothing: their hidden rows never reach the matmul.
        bias: optional ``(V,)``.
        shift: if True, ``hidden[..., t, :]`` scores ``labels[..., t + 1]`` (Hugging Face
            causal LM convention) and the result has ``T - 1`` positions.
        temperature, softcap, stats, backend: as :func:`dpo_fast.token_logprobs`.
        logit_scale: multiplies the logits before the temperature (e.g. Cohere's).
        method: ``"chunked"`` (default; design (a): a matmul per chunk of tokens writes a
            ``(chunk, V)`` logits tile that the backend folds; every backend) or ``"fused"``
            (design (b): Triton kernels keep the logits tiles in SRAM; needs the Triton
            backend: CUDA tensors, or ``backend="triton"`` under ``TRITON_INTERPRET=1``).
        grad_filter_eps: ``method="fused"`` only. None (default) is exact; a float in
            ``(0, 1]`` skips the gradient matmuls of backward tiles (``BLOCK_N`` tokens x
            ``BLOCK_V`` vocabulary entries of ``dpo_fast.kernels.linear_logprobs``) whose
            softmax probabilities are all below it and which hold no label. Each entry's
            error is at most ``eps * |scale| * |g_i| * sum_j |W[j, k]|`` for the hidden
            gradient and ``eps * |scale| * sum_i |g_i| * |hidden_i[k]|`` for the weight
            gradient (``scale = logit_scale / temperature``, ``g`` the incoming gradient,
            ``i`` over scored tokens); the bias gradient stays exact.

    ``hidden``, ``weight`` and ``bias`` must share a dtype unless autocast is on, in which
    case the matmuls run in the autocast dtype. Gradients flow to all three; the weight and
    bias gradients accumulate in fp32 and are returned in their own dtypes.

    Returns:
        :class:`dpo_fast.TokenLogprobs` ``(logps, stats)``: float32 ``(..., T)``
        (``(..., T - 1)`` with ``shift``), 0.0 at ignored positions, and the statistics.
    """
    check_linear_head(hidden, weight, bias)
    vocab_size = weight.shape[0]
    check_labels(labels, tuple(hidden.shape[:-1]), vocab_size, ignore_index, hidden.device, source="hidden")
    check_transform(temperature, softcap, logit_scale)
    stats = check_stats(stats)
    compute_dtype = _compute_dtype(hidden, weight, bias)
    resolved = resolve_backend(backend, hidden.device)
    check_linear_method(method, grad_filter_eps, backend, resolved, hidden.device)
    if method == "fused":
        function, run, impl = _FusedLinearLogprobs, _run_fused_forward, _fused_kernels()
        extra = (grad_filter_eps,)
    else:
        function, run, impl, extra = _LinearLogprobs, _run_forward, _implementation(resolved), ()

    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    scored = labels != ignore_index
    rows = hidden[scored]  # (n, H): a gather of the scored rows only
    options = {"ignore_index": ignore_index, "scale": logit_scale / temperature, "softcap": softcap}
    args = (rows, weight, bias, labels[scored].to(torch.int64), compute_dtype, impl, options, stats)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, weight, bias)):
        logp, *stat_values = function.apply(*args, *extra)
        stat_dict = dict(zip(stats, stat_values, strict=True))
    else:
        logp, _, stat_dict = run(*args)[:3]  # the chunked run also returns its tile buffer
    return TokenLogprobs(
        _unpack(logp, scored), {name: _unpack(value, scored) for name, value in stat_dict.items()}
    )


def _unpack(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """``(n,)`` values of the scored positions laid out as ``scored.shape``, zeros elsewhere;
    ``masked_scatter`` routes the gradient back to ``values``."""
    return torch.zeros(scored.shape, device=values.device, dtype=values.dtype).masked_scatter(scored, values)


def linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    average: bool = False,
    stats: Sequence[str] = (),
    backend: str = "auto",
    method: str = "chunked",
    grad_filter_eps: float | None = None,
) -> SequenceLogprobs:
    """Summed label log-probs per sequence (or per segment) from hidden states and the lm_head.

    Args:
        hidden, weight, labels, bias, ignore_index, shift, temperature, softcap, logit_scale,
        stats, backend, method, grad_filter_eps: as :func:`linear_token_logprobs`.
        segment_ids, num_segments, average: as :func:`dpo_fast.sequence_logprobs`.

    Returns:
        :class:`dpo_fast.SequenceLogprobs` ``(logps, num_tokens, stats)``, as
        :func:`dpo_fast.sequence_logprobs`.
    """
    per_token, stat_dict = linear_token_logprobs(
        hidden,
        weight,
        labels,
        bias=bias,
        ignore_index=ignore_index,
        shift=shift,
        temperature=temperature,
        softcap=softcap,
        logit_scale=logit_scale,
        stats=stats,
        backend=backend,
        method=method,
        grad_filter_eps=grad_filter_eps,
    )
    logps, num_tokens = sequence_sums(
        per_token,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        segment_ids=segment_ids,
        num_segments=num_segments,
        average=average,
    )
    return SequenceLogprobs(logps, num_tokens, stat_dict)
