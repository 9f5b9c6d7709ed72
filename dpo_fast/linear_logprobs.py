"""Fused linear log-probs: label log-probs from hidden states and the lm_head weight.

No tensor of ``tokens x V`` elements exists, in forward or backward: only the scored
positions reach the lm_head, tile by tile (``dpo_fast.ops.linear_logprobs`` holds the
algorithm and its autograd; ``dpo_fast.registry`` picks the backend whose ``logprobs``
kernels fold the tiles). This module validates, handles autocast and lays the results out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import registry, tensor_parallel
from .checks import check_compute_dtype, check_labels, check_linear_head, check_stats, check_transform
from .logprobs import SequenceLogprobs, TokenLogprobs
from .ops.library import stat_mask, stat_names
from .segments import sequence_sums


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
) -> TokenLogprobs:
    """Label log-probs of ``softcap(logit_scale * (hidden @ weight.T + bias) / temperature)``,
    never materializing those ``(..., T, V)`` logits.

    Args:
        hidden: ``(..., T, H)`` float16/bfloat16/float32, any strides (e.g. ``h[:, :-1]``).
        weight: ``(V, H)`` the lm_head weight (may be tied to the input embeddings), or a
            ``DTensor`` replicated or sharded over the vocabulary (tensor parallelism: see
            ``dpo_fast.tensor_parallel``).
        labels: ``(..., T)`` integer; ``ignore_index`` marks positions that are not scored.
            Unscored positions cost nothing: their hidden rows never reach the matmul.
        bias: optional ``(V,)``.
        shift: if True, ``hidden[..., t, :]`` scores ``labels[..., t + 1]`` (Hugging Face
            causal LM convention) and the result has ``T - 1`` positions.
        temperature, softcap, stats, backend: as :func:`dpo_fast.token_logprobs`.
        logit_scale: multiplies the logits before the temperature (e.g. Cohere's).

    ``hidden``, ``weight`` and ``bias`` must share a dtype unless autocast is on, in which
    case the matmuls run in the autocast dtype. Gradients flow to all three; the weight and
    bias gradients accumulate in fp32 and are returned in their own dtypes.

    Returns:
        :class:`dpo_fast.TokenLogprobs` ``(logps, stats)``: float32 ``(..., T)``
        (``(..., T - 1)`` with ``shift``), 0.0 at ignored positions, and the statistics.
    """
    if tensor_parallel.is_dtensor(hidden, weight, bias):  # before any op: ops take plain tensors
        return tensor_parallel.linear_token_logprobs(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, shift=shift,
            temperature=temperature, softcap=softcap, logit_scale=logit_scale, stats=stats,
            backend=backend,
        )  # fmt: skip
    check_linear_head(hidden, weight, bias)
    vocab_size, hidden_size = weight.shape
    check_labels(labels, tuple(hidden.shape[:-1]), vocab_size, ignore_index, hidden.device, source="hidden")
    check_transform(temperature, softcap, logit_scale)
    stats = check_stats(stats)
    compute_dtype = check_compute_dtype(hidden, weight, bias)
    backend = registry.resolve("linear_logprobs", backend, hidden.device.type)
    batch = math.prod(hidden.shape[:-2])
    # (B, T, H): a view unless the leading dims cannot merge; the shift is labels[:, 1:]
    rows = hidden.reshape(batch, hidden.shape[-2], hidden_size)
    flat_labels = labels.reshape(batch, labels.shape[-1])
    if shift:
        flat_labels = flat_labels[:, 1:]
    flat_labels = flat_labels.to(torch.int64).contiguous()
    mask = stat_mask(stats)
    # eager training keeps the last logits tile for backward; a compiled graph recomputes it
    keep_tile = (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        and not torch.compiler.is_compiling()
    )
    forward = registry.operator("linear_logprobs", "forward", backend)
    logp, _, stat_values, _ = forward(
        rows,
        weight,
        bias,
        flat_labels,
        ignore_index,
        logit_scale / temperature,
        softcap,
        mask,
        compute_dtype,
        keep_tile,
    )
    out_shape = (*hidden.shape[:-2], flat_labels.shape[1])
    named = dict(zip(stat_names(mask), stat_values, strict=True))
    return TokenLogprobs(logp.view(out_shape), {name: named[name].view(out_shape) for name in stats})


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
) -> SequenceLogprobs:
    """Summed label log-probs per sequence (or per segment) from hidden states and the lm_head.

    Args:
        hidden, weight, labels, bias, ignore_index, shift, temperature, softcap, logit_scale,
        stats, backend: as :func:`linear_token_logprobs`.
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
