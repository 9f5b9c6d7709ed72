"""The ``linear_logprobs`` op: label log-probs from hidden states and the lm_head weight.

No tensor of ``tokens x V`` elements exists, in forward or backward. Every backend registers
(``<b>``: ``triton``, ``cpp``, ``torch``, whose ``logprobs`` kernels fold the logits tiles)::

    dpo_fast::linear_logprobs_forward_<b>(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels,
        int ignore_index, float scale, float? softcap, int stats, ScalarType compute_dtype,
        bool keep_tile) -> (Tensor logp, Tensor lse, Tensor[] stats, Tensor tile)
    dpo_fast::linear_logprobs_backward_<b>(Tensor grad_logp, Tensor hidden, Tensor weight,
        Tensor? bias, Tensor labels, Tensor logp, Tensor lse, Tensor(a!) tile, int ignore_index,
        float scale, float? softcap, ScalarType compute_dtype, bool[] needs)
        -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)

``hidden`` is ``(B, T, H)`` with any strides, ``labels`` ``(B, T')``, ``T' <= T`` (position
``t`` is scored by ``hidden[:, t]``: a causal shift reads ``hidden`` in place), ``weight``
``(V, H)``, ``bias`` ``(V,)``; the logits are ``softcap(scale * (hidden @ weight.T + bias))``,
computed in ``compute_dtype``.

1. **Select.** Only scored positions (``label != ignore_index``) reach the lm_head: their
   hidden rows are gathered into ``rows`` ``(n, H)``; prompt and padding tokens cost nothing.
2. **Forward**: for each chunk of :func:`chunk_rows` tokens, one matmul writes a ``(chunk, V)``
   logits tile in the compute dtype (bias fused), and the backend's ``logprobs`` kernel folds
   it into per-token ``logp``, ``lse`` and statistics. ``keep_tile`` returns the tile buffer,
   which still holds the last chunk's logits, so backward need not recompute them (eager
   mode: the lm_head is a model's last layer, so its backward usually comes next).
3. **Backward**: the last chunk first (from the kept tile, if any), then every other tile is
   recomputed (same call, same bits), turned into the logits gradient in place by the
   backend's ``logprobs`` backward and multiplied out: ``grad_rows[chunk] = tile @ W``,
   ``grad_W += tile.T @ rows`` and ``grad_b += tile.sum(0)`` into fp32 accumulators, in a
   fixed order (no atomics: bitwise reproducible). Gradients come back in each operand's
   dtype, ``grad_hidden`` as ``(B, T, H)`` with zeros at unscored positions. Unneeded
   gradients (``needs``: hidden, weight, bias) come back empty.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch._subclasses.functional_tensor import FunctionalTensor

from .. import registry
from . import logprobs as logprobs_op
from .library import custom_op, input_gradients, refuse_double_backward, stat_fakes

# Upper bound on one (chunk, V) logits tile, in bytes; the only [*, V] buffer alive.
# GPU: every chunk adds its product into the fp32 (V, H) weight-gradient accumulator, which
# cuBLAS reads and writes once per chunk (4.2 GB for a 128k x 4096 head); below ~2048 tokens
# per chunk that traffic, not the FLOPs, bounds the matmul on an H100. 512 MiB is 2048 tokens
# of a 128k bf16 vocabulary. CPU: the matmuls lose efficiency below a few hundred rows, and
# backward skips one recompute (the last tile): at 2048 x 512 x 32000 fp32, forward+backward
# took 1.59 / 1.42 / 1.37 s with 32 / 64 / 128 MiB tiles, naive matmul+log_softmax 1.35 s.
TILE_BYTES = {"cuda": 512 << 20}
DEFAULT_TILE_BYTES = 128 << 20


def chunk_rows(vocab_size: int, dtype: torch.dtype, device_type: str) -> int:
    """Tokens per logits tile: as many as fit in the device's ``TILE_BYTES`` budget (>= 1)."""
    budget = TILE_BYTES.get(device_type, DEFAULT_TILE_BYTES)
    rows = budget // (vocab_size * dtype.itemsize)
    # multiples of 64 keep the matmul on full tensor-core tiles
    return max(1, rows // 64 * 64 if rows >= 64 else rows)


def _mm_out_dtype_supported(device: torch.device) -> bool:
    # torch.addmm(..., out_dtype=float32) from bf16/fp16 inputs exists on CUDA since torch 2.8
    return device.type == "cuda" and hasattr(torch.ops.aten.addmm, "dtype_out")


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
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


def token_chunks(n: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _scored(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """``(scored (B, T') bool, rows (n, H), labels (n,))``: the positions that reach the head."""
    scored = labels != ignore_index
    return scored, hidden[:, : labels.shape[1]][scored], labels[scored]


def unpack_scored(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """``(n,)`` values of the scored positions laid out as ``scored.shape``, zeros elsewhere."""
    return torch.zeros(scored.shape, device=values.device, dtype=values.dtype).masked_scatter(scored, values)


def _tile_rows(labels: torch.Tensor, step: int) -> int:
    """Rows of the logits tile buffer: a chunk, or fewer when the batch has fewer positions.

    Sized by positions, not by scored tokens, so the buffer's shape never depends on the
    labels' values (the fakes, the compiler and the memory estimator know it up front).
    """
    return torch.sym_min(labels.numel(), step)


def _cast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> tuple:
    """Each tensor (or None) in the compute dtype (no copy when already in it)."""
    return tuple(t.to(dtype) if t is not None else None for t in tensors)


def _forward(backend: str):
    fold = registry.operator("logprobs", "forward", backend)

    def forward(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        ignore_index: int,
        scale: float,
        softcap: float | None,
        stats: int,
        compute_dtype: torch.dtype,
        keep_tile: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        scored, rows, targets = _scored(hidden, labels, ignore_index)
        n, V = rows.shape[0], weight.shape[0]
        logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logp)
        per_token = stat_fakes(logp, stats)
        step = chunk_rows(V, compute_dtype, hidden.device.type)
        buffer = logprobs_op.new_buffer((_tile_rows(labels, step), V), compute_dtype, hidden.device, backend)
        with torch.autocast(hidden.device.type, enabled=False):
            rows, weight, bias = _cast(compute_dtype, rows, weight, bias)
            for start, end in token_chunks(n, step):
                tile = buffer[: end - start]
                _project(tile, rows[start:end], weight, bias)
                chunk_logp, chunk_lse, chunk_stats = fold(
                    tile.unsqueeze(0),
                    targets[start:end].unsqueeze(0),
                    ignore_index,
                    scale,
                    softcap,
                    stats,
                    False,
                )
                logp[start:end] = chunk_logp[0]
                lse[start:end] = chunk_lse[0]
                for out, value in zip(per_token, chunk_stats, strict=True):
                    out[start:end] = value[0]
        logp, lse, *per_token = (unpack_scored(values, scored) for values in (logp, lse, *per_token))
        tile_out = buffer if keep_tile else buffer.new_empty((0, V))
        return logp, lse, per_token, tile_out

    return forward


def _backward(backend: str):
    fold_backward = registry.operator("logprobs", "backward", backend)

    def backward(
        grad_logp: torch.Tensor,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        logp: torch.Tensor,
        lse: torch.Tensor,
        tile: torch.Tensor,
        ignore_index: int,
        scale: float,
        softcap: float | None,
        compute_dtype: torch.dtype,
        needs: list[bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scored, rows, targets = _scored(hidden, labels, ignore_index)
        g, logp, lse = grad_logp[scored].float(), logp[scored], lse[scored]
        need_rows, need_weight, need_bias = needs
        need_bias = need_bias and bias is not None
        n, V = rows.shape[0], weight.shape[0]
        step = chunk_rows(V, compute_dtype, hidden.device.type)
        chunks = list(token_chunks(n, step))
        # the forward's buffer still holds the last chunk's logits (not in a second backward)
        holds_last_tile = tile.shape[0] > 0
        if not holds_last_tile:
            tile = logprobs_op.new_buffer(
                (_tile_rows(labels, step), V), compute_dtype, hidden.device, backend
            )
        grad_rows = torch.empty(rows.shape, device=rows.device, dtype=compute_dtype) if need_rows else None
        grad_weight = (
            torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
        )
        grad_bias = torch.zeros(V, device=weight.device, dtype=torch.float32) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            rows_c, weight_c, bias_c = _cast(compute_dtype, rows, weight, bias)
            # the last chunk first, while its forward logits are still in the buffer
            for index, (start, end) in enumerate(chunks[-1:] + chunks[:-1]):
                chunk = tile[: end - start]
                if index > 0 or not holds_last_tile:
                    _project(chunk, rows_c[start:end], weight_c, bias_c)
                x = chunk.unsqueeze(0)
                fold_backward(
                    g[start:end].unsqueeze(0),
                    x,
                    targets[start:end].unsqueeze(0),
                    logp[start:end].unsqueeze(0),
                    lse[start:end].unsqueeze(0),
                    x,
                    ignore_index,
                    scale,
                    softcap,
                )
                # one matmul covers a chunk's whole vocabulary: nothing to accumulate across chunks
                if grad_rows is not None:
                    torch.mm(chunk, weight_c, out=grad_rows[start:end])
                if grad_weight is not None:
                    accumulate_fp32(grad_weight, chunk.t(), rows_c[start:end])
                if grad_bias is not None:
                    grad_bias += chunk.sum(0, dtype=torch.float32)
        # each unneeded gradient its own empty tensor: an operator's outputs may not alias
        grad_hidden = hidden.new_empty(0)
        if grad_rows is not None:
            grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=hidden.dtype)
            grad_hidden[:, : labels.shape[1]][scored] = grad_rows.to(hidden.dtype)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if grad_weight is not None else weight.new_empty(0),
            grad_bias.to(bias.dtype) if grad_bias is not None else weight.new_empty(0),
        )

    return backward


def _forward_fake(
    hidden, weight, bias, labels, ignore_index, scale, softcap, stats, compute_dtype, keep_tile
):
    logp = labels.new_empty(labels.shape, dtype=torch.float32)
    V = weight.shape[0]
    rows = _tile_rows(labels, chunk_rows(V, compute_dtype, hidden.device.type)) if keep_tile else 0
    tile = weight.new_empty((rows, V), dtype=compute_dtype)
    return logp, torch.empty_like(logp), stat_fakes(logp, stats), tile


def _backward_fake(
    grad_logp,
    hidden,
    weight,
    bias,
    labels,
    logp,
    lse,
    tile,
    ignore_index,
    scale,
    softcap,
    compute_dtype,
    needs,
):
    return (
        torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
        torch.empty_like(weight) if needs[1] else weight.new_empty(0),
        torch.empty_like(bias) if needs[2] and bias is not None else weight.new_empty(0),
    )


def _register_autograd(backend: str) -> None:
    backward = registry.operator("linear_logprobs", "backward", backend)

    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, ignore_index, scale, softcap, _, compute_dtype, keep_tile = inputs
        logp, lse, stat_values, tile = output
        ctx.save_for_backward(hidden, weight, bias, labels, logp, lse)
        ctx.options = (ignore_index, scale, softcap, compute_dtype)
        # the kept last tile is consumed (overwritten) by the first backward: an attribute, not a
        # saved tensor, so a second backward (retain_graph=True) finds None and recomputes it.
        # Eager only (fake tensors included, as the memory estimator runs them): a traced graph
        # (AOTAutograd's functional tensors) cannot carry a tensor outside its saved ones.
        ctx.tile = tile if keep_tile and not isinstance(tile, FunctionalTensor) else None
        ctx.mark_non_differentiable(lse, *stat_values, tile)

    def backward_formula(ctx, grad_logp, grad_lse, grad_stats, grad_tile):
        refuse_double_backward("linear_logprobs")
        hidden, weight, bias, labels, logp, lse = ctx.saved_tensors
        compute_dtype = ctx.options[-1]
        tile, ctx.tile = ctx.tile, None
        if tile is None:
            tile = weight.new_empty((0, weight.shape[0]), dtype=compute_dtype)
        needs = [bool(need) for need in ctx.needs_input_grad[:3]]
        grad_hidden, grad_weight, grad_bias = backward(
            grad_logp.contiguous(), hidden, weight, bias, labels, logp, lse, tile, *ctx.options, needs
        )
        return input_gradients(
            f"linear_logprobs_forward_{backend}",
            hidden=grad_hidden if needs[0] else None,
            weight=grad_weight if needs[1] else None,
            bias=grad_bias if needs[2] else None,
        )

    torch.library.register_autograd(
        f"dpo_fast::linear_logprobs_forward_{backend}", backward_formula, setup_context=setup_context
    )


def load(backend: str) -> None:
    """Register the operators of ``backend`` (called once per process by ``dpo_fast.registry``)."""
    if not registry.load("logprobs", backend):
        raise RuntimeError(f"the {backend} logprobs kernels, which fold the logits tiles, did not load")
    custom_op(f"linear_logprobs_forward_{backend}", _forward(backend), _forward_fake)
    custom_op(
        f"linear_logprobs_backward_{backend}", _backward(backend), _backward_fake, mutates_args=("tile",)
    )
    _register_autograd(backend)
