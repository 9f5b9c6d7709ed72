"""Label log-probs from logits: the public functions.

Data flow: validate (``dpo_fast.checks``) -> view the logits as ``(B, T, V)`` (the causal
shift is ``labels[:, 1:]`` against the same logits, never a copy) -> ``dpo_fast.registry``
picks a backend -> its ``dpo_fast::logprobs_forward_<backend>`` operator writes per-token
log-probs and log-sum-exp; its autograd (``dpo_fast.ops.logprobs``) recomputes the softmax
row by row into the gradient buffer. Per-sequence and per-segment sums: ``dpo_fast.segments``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import registry
from .checks import check_float_tensor, check_labels, check_stats, check_transform
from .ops.library import stat_mask, stat_names
from .segments import sequence_sums


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


def _prepare(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    shift: bool,
    temperature: float,
    softcap: float | None,
    stats: Sequence[str],
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Validated ``(logits (B, T, V), labels (B, T') int64, stats)``; ``T' = T - 1`` with ``shift``."""
    check_float_tensor("logits", logits, min_dim=2)
    vocab_size = logits.shape[-1]
    if vocab_size == 0:
        raise ValueError(
            f"logits must have a non-empty vocabulary (last) dim, got shape {tuple(logits.shape)}"
        )
    check_labels(labels, tuple(logits.shape[:-1]), vocab_size, ignore_index, logits.device)
    check_transform(temperature, softcap)
    batch = math.prod(logits.shape[:-2])
    # a view unless the leading dims cannot merge (then autograd copies the gradient back)
    rows = logits.reshape(batch, logits.shape[-2], vocab_size)
    labels = labels.reshape(batch, logits.shape[-2])
    if shift:
        labels = labels[:, 1:]
    return rows, labels.to(torch.int64).contiguous(), check_stats(stats)


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
            Under ``torch.compile`` every backend traces without a graph break.

    Returns:
        :class:`TokenLogprobs` ``(logps, stats)``: float32 ``(..., T)`` (``(..., T - 1)`` with
        ``shift``), 0.0 at ignored positions, and the requested statistics of that shape.
    """
    rows, flat_labels, stats = _prepare(logits, labels, ignore_index, shift, temperature, softcap, stats)
    backend = registry.resolve("logprobs", backend, logits.device.type)
    # in place only where the gradient buffer can be the caller's own storage, and never while
    # compiling: the compiler owns the buffers of a traced graph
    inplace = (
        inplace_backward
        and rows.data_ptr() == logits.data_ptr()
        and logits.is_contiguous()
        and not torch.compiler.is_compiling()
    )
    forward = registry.operator("logprobs", "forward", backend)
    mask = stat_mask(stats)
    logp, _, stat_values = forward(rows, flat_labels, ignore_index, 1.0 / temperature, softcap, mask, inplace)
    out_shape = (*logits.shape[:-2], flat_labels.shape[1])
    named = dict(zip(stat_names(mask), stat_values, strict=True))
    return TokenLogprobs(logp.view(out_shape), {name: named[name].view(out_shape) for name in stats})


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
