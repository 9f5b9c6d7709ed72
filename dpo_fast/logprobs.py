"""Label log-probs from logits: the public API and its autograd wrapper.

Data flow: validate -> view the logits as ``(B, T, V)`` (the shift is a slice, not a copy)
-> a backend's ``logprobs_forward`` writes per-token log-probs and log-sum-exp ->
``_TokenLogprobs.backward`` recomputes the softmax row by row into the gradient buffer.
Backends share one calling convention: ``dpo_fast.kernels.logprobs`` (Triton) and
``dpo_fast.ops.logprobs`` (PyTorch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import NamedTuple

import torch

from .checks import check_float_tensor, check_labels, check_segment_ids, check_stats, check_transform
from .ops import cpp
from .ops import logprobs as chunked
from .registry import resolve_backend
from .segments import count_segments, segment_sum


class TokenLogprobs(NamedTuple):
    """Per-token results of :func:`token_logprobs` and ``dpo_fast.linear_token_logprobs``.

    Attributes:
        logps: float32 ``(..., T)``, 0.0 at positions that are not scored.
        stats: ``{name: (..., T)}`` the requested statistics (``is_top1`` bool, others float32);
            empty without ``stats``.
    """

    logps: torch.Tensor
    stats: dict[str, torch.Tensor]


class SequenceLogprobs(NamedTuple):
    """Per-sequence results of :func:`sequence_logprobs` and ``dpo_fast.linear_sequence_logprobs``.

    Attributes:
        logps: float32 ``(...,)`` summed (or averaged) log-probs, ``(..., num_segments)`` with
            ``segment_ids``.
        num_tokens: int64, same shape: the number of scored tokens in each sum.
        stats: the per-token statistics ``{name: (..., T)}`` as :class:`TokenLogprobs` has them.
    """

    logps: torch.Tensor
    num_tokens: torch.Tensor
    stats: dict[str, torch.Tensor]


def _implementation(backend: str) -> ModuleType:
    if backend == "triton":
        # imported on first use: Triton reads TRITON_INTERPRET when the kernels are defined
        from .kernels import logprobs as triton_logprobs

        return triton_logprobs
    if backend == "cpp":
        return cpp
    return chunked


def new_buffer(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device, impl: ModuleType
) -> torch.Tensor:
    """An uninitialized contiguous ``[tokens, V]`` buffer (a gradient or a logits tile).

    With the C++ backend it comes from ``dpo_fast.cpp``'s cache of freed blocks: a fresh
    CPU buffer costs more in page faults than the kernel that fills it.
    """
    if impl is cpp:
        return cpp.empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


class _TokenLogprobs(torch.autograd.Function):
    """Per-token log-probs of ``(B, T, V)`` logits; differentiable w.r.t. the logits."""

    @staticmethod
    def forward(ctx, logits, x, labels, ignore_index, scale, softcap, stats, inplace, impl):
        logp, lse, stat_values = impl.logprobs_forward(
            x, labels, ignore_index=ignore_index, scale=scale, softcap=softcap, stats=stats
        )
        ctx.save_for_backward(logits, labels, logp, lse)
        ctx.options = (ignore_index, scale, softcap, inplace, impl)
        ctx.mark_non_differentiable(*stat_values.values())
        return (logp, *stat_values.values())

    @staticmethod
    def backward(ctx, grad_logp, *_):
        logits, labels, logp, lse = ctx.saved_tensors
        ignore_index, scale, softcap, inplace, impl = ctx.options
        B, T = labels.shape
        grad = logits if inplace else new_buffer(logits.shape, logits.dtype, logits.device, impl)
        grad_rows = _rows(grad, B)
        # logits [:, T:] are the last position of a shifted batch: they score nothing
        grad_rows[:, T:].zero_()
        impl.logprobs_backward(
            grad_logp.contiguous(),
            _rows(logits, B)[:, :T],
            labels,
            logp,
            lse,
            grad_rows[:, :T],
            ignore_index=ignore_index,
            scale=scale,
            softcap=softcap,
        )
        return grad, *([None] * 8)


def _rows(logits: torch.Tensor, batch: int) -> torch.Tensor:
    """``(..., T, V)`` as ``(B, T, V)``: a view unless the leading dims cannot merge."""
    return logits.reshape(batch, logits.shape[-2], logits.shape[-1])


def _prepare(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    shift: bool,
    temperature: float,
    softcap: float | None,
    stats: Sequence[str],
) -> tuple[int, torch.Tensor, tuple[str, ...]]:
    check_float_tensor("logits", logits, min_dim=2)
    vocab_size = logits.shape[-1]
    if vocab_size == 0:
        raise ValueError(
            f"logits must have a non-empty vocabulary (last) dim, got shape {tuple(logits.shape)}"
        )
    check_labels(labels, tuple(logits.shape[:-1]), vocab_size, ignore_index, logits.device)
    check_transform(temperature, softcap)
    batch = math.prod(logits.shape[:-2])
    labels = labels.reshape(batch, logits.shape[-2])
    if shift:
        labels = labels[:, 1:]
    return batch, labels.to(torch.int64).contiguous(), check_stats(stats)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    stats: Sequence[str] = (),
    inplace_backward: bool = False,
    backend: str = "auto",
) -> TokenLogprobs:
    """Log-probability of each label under the softmax of the logits, without materializing it.

    Args:
        logits: ``(..., T, V)`` float16/bfloat16/float32, any strides.
        labels: ``(..., T)`` integer; ``ignore_index`` marks positions that are not scored.
        shift: if True, ``logits[..., t, :]`` scores ``labels[..., t + 1]`` (Hugging Face causal
            LM convention) and the result has ``T - 1`` positions; the logits are not copied.
        temperature: the logits are divided by it (> 0).
        softcap: if set, ``c * tanh(z / c)`` is applied after the temperature (Gemma 2).
        stats: any of ``"entropy"``, ``"mean_logits"``, ``"is_top1"``, ``"log_sum_sq_probs"``:
            per-token statistics of the transformed logits from the same pass, without
            gradient (0 / False where the label is ignored). ``is_top1``: the label is the
            arg-max, the first index winning ties.
        inplace_backward: backward writes the logits' gradient into the logits' own storage,
            so a step holds one ``[tokens, V]`` buffer instead of two. Destroys the logits.
            Needs contiguous logits; otherwise backward uses a separate buffer as usual.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"`` (see ``dpo_fast.registry``).

    Returns:
        :class:`TokenLogprobs` ``(logps, stats)``: float32 ``(..., T)`` (``(..., T - 1)`` with
        ``shift``), 0.0 at ignored positions, and the requested statistics of that shape.
    """
    batch, flat_labels, stats = _prepare(logits, labels, ignore_index, shift, temperature, softcap, stats)
    impl = _implementation(resolve_backend(backend, logits.device))
    scale = 1.0 / temperature
    out_shape = (*logits.shape[:-2], flat_labels.shape[1])
    x = _rows(logits, batch)[:, : flat_labels.shape[1]]
    if torch.is_grad_enabled() and logits.requires_grad:
        inplace = inplace_backward and x.data_ptr() == logits.data_ptr() and logits.is_contiguous()
        logp, *stat_values = _TokenLogprobs.apply(
            logits, x, flat_labels, ignore_index, scale, softcap, stats, inplace, impl
        )
        stat_dict = dict(zip(stats, stat_values, strict=True))
    else:
        logp, _, stat_dict = impl.logprobs_forward(
            x, flat_labels, ignore_index=ignore_index, scale=scale, softcap=softcap, stats=stats
        )
    return TokenLogprobs(logp.view(out_shape), {name: stat_dict[name].view(out_shape) for name in stats})


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    average: bool = False,
    stats: Sequence[str] = (),
    inplace_backward: bool = False,
    backend: str = "auto",
) -> SequenceLogprobs:
    """Summed label log-probs per sequence (or per segment of a packed row).

    Args:
        logits, labels, ignore_index, shift, temperature, softcap, stats, inplace_backward,
        backend: as :func:`token_logprobs`.
        segment_ids: optional ``(..., T)`` integer (shifted with the labels): the segment each
            position belongs to, -1 for positions not scored. Sums run per segment instead of
            over the whole ``T`` axis.
        num_segments: number of segments per row; default ``max(segment_ids) + 1``, which
            reads a value on the host (pass it to avoid the sync).
        average: divide each sum by its token count (0 tokens gives 0, never NaN).

    Returns:
        :class:`SequenceLogprobs` ``(logps, num_tokens, stats)``: float32 and int64, ``(...,)``,
        or ``(..., num_segments)`` with ``segment_ids``, and the per-token statistics
        ``(..., T)`` as :func:`token_logprobs` returns them.
        Sums are deterministic: no float atomics, two runs give identical bits.
    """
    per_token, stat_dict = token_logprobs(
        logits,
        labels,
        ignore_index=ignore_index,
        shift=shift,
        temperature=temperature,
        softcap=softcap,
        stats=stats,
        inplace_backward=inplace_backward,
        backend=backend,
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

    Shared by :func:`sequence_logprobs` and ``dpo_fast.linear_sequence_logprobs``.

    Args:
        per_token: float32 ``(..., T')``, ``T' = T - 1`` with ``shift``, 0 where not scored.
        labels: the validated, unshifted ``(..., T)`` labels.
        ignore_index, shift, segment_ids, num_segments, average: as :func:`sequence_logprobs`.
    """
    expected_shape = tuple(labels.shape)
    if shift:
        labels = labels[..., 1:]
    scored = labels != ignore_index
    if segment_ids is None:
        logps, num_tokens = per_token.sum(-1), scored.sum(-1)
    else:
        check_segment_ids(segment_ids, expected_shape, labels.device)
        if shift:
            segment_ids = segment_ids[..., 1:]
        segment_ids = torch.where(scored, segment_ids, -1)
        if num_segments is None:
            num_segments = count_segments(segment_ids)
        logps = segment_sum(per_token, segment_ids, num_segments)
        num_tokens = segment_sum(scored, segment_ids, num_segments)
    if average:
        logps = logps / num_tokens.clamp(min=1)
    return logps, num_tokens
