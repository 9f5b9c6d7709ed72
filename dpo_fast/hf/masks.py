"""Attention masks for the packed and prefix-shared layouts: which key each query may see.

transformers passes a 4D ``attention_mask`` (a tensor or a FlexAttention ``BlockMask``) straight
to the attention functions, skipping its own mask construction
(``masking_utils._preprocess_mask_arguments`` in 5.17 and 5.24), so an explicit mask works for
every model whatever its version. It is built here rather than left to transformers'
packed-sequence detection (which reads restarts of ``position_ids``, and only when no 2D mask
is given) because prefix sharing is not a block-diagonal pattern: rejected positions restart
at the end of the prompt, not at 0.

:func:`visible` is the one statement of the rule. A query token ``q`` may attend a key ``k``
of the same row when they belong to the same block (``doc_ids``), ``k <= q``, and ``k`` is on
the prompt or on ``q``'s own branch; sliding-window and chunked layers add their window in
*position* space (what the token sees in its own sequence). Padding attends itself only, so no
softmax row is empty (an empty row gives NaN in sdpa). The dense builder here and the
FlexAttention ``mask_mod`` (:mod:`dpo_fast.hf.flex`) both call it.

Dense masks (``sdpa``, ``eager`` and other implementations that take a 4D tensor) are one
additive ``(R, 1, L, L)`` tensor in the dtype attention computes in, shared by every layer: a
bool mask would be converted to a float copy inside every layer's sdpa call, and autograd
keeps each copy. They are filled a band of query rows at a time, so building one needs no
``L^2`` temporaries beyond the mask itself. Above :data:`DENSE_MASK_WARN_BYTES` a warning
names the FlexAttention path, whose block mask is ``O((L / 128)^2)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

# A dense mask above this size warns once per attention implementation (256 MiB: L = 8192
# in fp32, 11585 in bf16, for one row).
DENSE_MASK_WARN_BYTES = 256 * 2**20
# Elements of one band of the dense builder's int64 temporaries (32 MiB each).
_BAND_ELEMENTS = 2**22
_warned: set[str] = set()


@dataclass(frozen=True)
class Window:
    """The window a layer type adds, in position space: ``q_pos - k_pos < sliding`` and
    ``q_pos // chunk == k_pos // chunk``; None where the layer has no such limit."""

    sliding: int | None = None
    chunk: int | None = None


def is_flash(attn_implementation: str | None) -> bool:
    return attn_implementation is not None and "flash" in attn_implementation


def is_flex(attn_implementation: str | None) -> bool:
    return attn_implementation == "flex_attention"


def layer_windows(config) -> dict[str, Window]:
    """``{layer_type: Window}`` of the model's attention layers (one entry unless the model
    mixes layer types, e.g. Gemma 2's sliding and full layers).

    Raises:
        ValueError: a layer type without a packed/prefix-shared mask here (e.g. linear
            attention or state-space layers, whose state crosses documents).
    """
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        layer_types = ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"]
    windows = {}
    for layer_type in dict.fromkeys(layer_types):
        if layer_type == "full_attention":
            windows[layer_type] = Window()
        elif layer_type == "sliding_attention":
            windows[layer_type] = Window(sliding=int(config.sliding_window))
        elif layer_type == "chunked_attention":
            windows[layer_type] = Window(chunk=int(config.attention_chunk_size))
        else:
            raise ValueError(
                f"layer type {layer_type!r} of {type(config).__name__} has no packed/prefix-shared mask in "
                "dpo_fast; use layout='padded'"
            )
    return windows


def visible(
    doc_q: torch.Tensor,
    doc_k: torch.Tensor,
    branch_q: torch.Tensor,
    branch_k: torch.Tensor,
    pos_q: torch.Tensor,
    pos_k: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    sliding: torch.Tensor | int | None,
    chunk: torch.Tensor | int | None,
) -> torch.Tensor:
    """Bool: query ``q`` may attend key ``k`` (any broadcastable shapes; see the module doc).

    ``doc_*``, ``branch_*``, ``pos_*`` are the ``doc_ids``, ``branch_ids`` and
    ``position_ids`` of the query and key tokens, ``q`` / ``k`` their columns in the row.
    """
    allowed = (doc_q >= 0) & (doc_q == doc_k) & (k <= q) & ((branch_k == 0) | (branch_k == branch_q))
    if sliding is not None:
        allowed = allowed & (pos_q - pos_k < sliding)
    if chunk is not None:
        allowed = allowed & (pos_q // chunk == pos_k // chunk)
    return allowed | (q == k)


def _warn_if_large(config, shape: tuple[int, ...], dtype: torch.dtype, count: int) -> None:
    size = count * torch.Size(shape).numel() * dtype.itemsize
    attn = getattr(config, "_attn_implementation", None)
    if size <= DENSE_MASK_WARN_BYTES or attn in _warned:
        return
    _warned.add(attn)
    warnings.warn(
        f"dpo_fast: the packed/prefix-shared attention mask of shape {tuple(shape)} takes "
        f"{size / 2**30:.2f} GiB for attn_implementation={attn!r} (it grows with the square of the row "
        "length). Load the model with attn_implementation='flex_attention' (or call "
        "dpo_fast.hf.use_flex_attention(model)) for a block mask of a few MB, or use shorter rows "
        "(pack_length).",
        stacklevel=4,
    )


def dense_attention_mask(
    config,
    doc_ids: torch.Tensor,
    branch_ids: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The dense ``attention_mask`` argument for a packed / prefix-shared batch ``(R, L)``.

    Returns an additive ``(R, 1, L, L)`` mask (0 where visible, ``finfo(dtype).min`` elsewhere)
    in ``dtype`` — or, for models mixing layer types (Gemma 2's sliding and full layers), a dict
    ``{layer_type: mask}``, which those models accept in place of a mask. Peak memory while
    building: the mask(s) plus one band of ``_BAND_ELEMENTS`` elements.
    """
    R, L = doc_ids.shape
    windows = layer_windows(config)
    _warn_if_large(config, (R, 1, L, L), dtype, len(windows))
    band = max(1, _BAND_ELEMENTS // max(L, 1))
    cols = torch.arange(L, device=doc_ids.device)
    lowest = torch.finfo(dtype).min
    masks = {}
    for layer_type, window in windows.items():
        mask = torch.zeros((R, 1, L, L), dtype=dtype, device=doc_ids.device)
        for r in range(R):
            doc, branch, pos = doc_ids[r], branch_ids[r], position_ids[r]
            for start in range(0, L, band):
                rows = slice(start, min(start + band, L))
                seen = visible(
                    doc[rows, None],
                    doc[None],
                    branch[rows, None],
                    branch[None],
                    pos[rows, None],
                    pos[None],
                    cols[rows, None],
                    cols[None],
                    window.sliding,
                    window.chunk,
                )
                mask[r, 0, rows].masked_fill_(~seen, lowest)
        masks[layer_type] = mask
    return next(iter(masks.values())) if len(masks) == 1 else masks


# Config fields of layers that carry a state along a row (short convolutions, state-space and
# linear-attention mixers): no attention mask confines them to one block of a packed row.
_RECURRENT_FIELDS = ("conv_L_cache", "ssm_state_size", "mamba_d_state", "mamba_d_ssm", "state_size")
_MASKED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
# NemotronH-style block lists also name the feed-forward blocks, which mix no tokens
_TOKENWISE_BLOCKS = ("attention", "mlp", "moe")


def block_layout_refusal(config, layout: str) -> str | None:
    """Why ``layout`` (packed / prefix_shared) cannot serve a model with this text ``config``,
    or None when its masks do. Read from the config, before any batch is seen."""
    kinds = list(getattr(config, "layer_types", None) or [])
    kinds += list(getattr(config, "layers_block_type", None) or [])
    unknown = sorted({k for k in kinds if k not in _MASKED_LAYER_TYPES + _TOKENWISE_BLOCKS})
    if unknown:
        return (
            f"its {', '.join(map(repr, unknown))} layers mix tokens without an attention mask, so "
            "they would run across the sequences packed into one row"
        )
    state = [name for name in _RECURRENT_FIELDS if getattr(config, name, None) is not None]
    if state:
        fields = ", ".join(state)
        return f"it has recurrent (convolution / state-space) layers ({fields}) that no mask confines"
    attn = getattr(config, "_attn_implementation", None)
    if layout == "prefix_shared" and is_flash(attn):
        return f"attn_implementation={attn!r} takes no attention mask, and prefix sharing needs one"
    return None
