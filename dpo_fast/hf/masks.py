"""Attention masks for the packed and prefix-shared layouts.

transformers passes a 4D ``attention_mask`` straight to the attention functions, skipping its
own mask construction (``masking_utils._preprocess_mask_arguments`` in 5.17 and 5.23), so an
explicit mask works for every ``sdpa`` / ``eager`` model, whatever its version. It is built
here rather than left to transformers' packed-sequence detection (which reads restarts of
``position_ids``, and only when no 2D mask is given) because prefix sharing is not a
block-diagonal pattern: rejected positions restart at the end of the prompt, not at 0.

A query token ``q`` may attend a key ``k`` of the same row when
``doc[q] == doc[k]``, ``k <= q`` and ``branch[k] in (0, branch[q])``: its own block, causally,
seeing the prompt and its own branch only. Sliding-window and chunked layers add their
window in *position* space (what they see in their own padded sequence). Padding attends
itself only, so no softmax row is empty (an empty row would give NaN in sdpa).

Flash-attention implementations take no mask: ``packed`` passes ``position_ids`` only and
transformers derives ``cu_seqlens`` for the varlen kernels from their restarts (untested
here: flash-attn is not installable on these machines); ``prefix_shared`` cannot be
expressed that way and raises.
"""

from __future__ import annotations

import torch


def is_flash(attn_implementation: str | None) -> bool:
    return attn_implementation is not None and "flash" in attn_implementation


def _layer_types(config) -> list[str]:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return list(dict.fromkeys(layer_types))
    return ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"]


def _allowed(doc: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``(R, L, L)`` bool: query (dim 1) may attend key (dim 2), without windows."""
    L = doc.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc.device).tril()
    same_doc = (doc.unsqueeze(2) == doc.unsqueeze(1)) & (doc >= 0).unsqueeze(2)
    visible_branch = (branch.unsqueeze(1) == 0) | (branch.unsqueeze(1) == branch.unsqueeze(2))
    return same_doc & visible_branch & causal


def _window(config, layer_type: str, position_ids: torch.Tensor) -> torch.Tensor | None:
    """``(R, L, L)`` bool restriction of one layer type, or None for full attention."""
    if layer_type == "full_attention":
        return None
    q, k = position_ids.unsqueeze(2), position_ids.unsqueeze(1)
    if layer_type == "sliding_attention":
        return (q - k) < config.sliding_window
    if layer_type == "chunked_attention":
        size = config.attention_chunk_size
        return (q // size) == (k // size)
    raise ValueError(
        f"layer type {layer_type!r} of {type(config).__name__} has no packed/prefix-shared mask in dpo_fast; "
        "use layout='padded'"
    )


def block_attention_mask(
    config,
    doc_ids: torch.Tensor,
    branch_ids: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` argument for a packed / prefix-shared batch ``(R, L)``.

    Returns a ``(R, 1, L, L)`` mask — bool for sdpa, additive (0 / dtype min) in ``dtype`` for
    eager and other implementations — or, for models mixing layer types (Gemma 2's sliding and
    full layers), a dict ``{layer_type: mask}``, which those models accept in place of a mask.
    """
    allowed = _allowed(doc_ids, branch_ids)
    diagonal = torch.eye(doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device)
    sdpa = getattr(config, "_attn_implementation", None) == "sdpa"
    masks = {}
    for layer_type in _layer_types(config):
        window = _window(config, layer_type, position_ids)
        mask = (allowed if window is None else allowed & window) | diagonal
        mask = mask.unsqueeze(1)
        if not sdpa:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(dtype).min
            )
        masks[layer_type] = mask
    return next(iter(masks.values())) if len(masks) == 1 else masks
