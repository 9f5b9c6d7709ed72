"""Lowering: a preference batch becomes a :class:`Plan` for the backbone.

A plan holds the backbone's inputs for the layout (``input_ids``, positions, the attention
mask) and, for every completion token, which flattened hidden row predicts it. Both
:func:`dpo_fast.concatenated_forward` and the TRL integration lower their batches here and
gather the predicting rows with :func:`dpo_fast.hf.forward.scored_rows`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..checks import check_batch
from ..collate import (
    collate_packed,
    collate_prefix_shared,
    pairs_from_padded,
    sequences_from_padded,
)
from ..constants import BLOCK_KEYS
from .flex import flex_block_mask, flex_supports_backward, use_flex_attention
from .masks import dense_attention_mask, is_flash, is_flex
from .model import text_config, unwrap_model


@dataclass
class Plan:
    """A batch lowered for the backbone.

    ``source`` ``(N,)`` indexes the flattened ``(R * L)`` hidden rows; hidden row ``source[i]``
    predicts token ``labels[i]`` of sequence ``sequence[i]`` (0..2B-1, chosen first). Entries
    are ordered by sequence, then by position.
    """

    layout: str
    inputs: dict[str, torch.Tensor]
    source: torch.Tensor
    labels: torch.Tensor
    sequence: torch.Tensor
    num_pairs: int
    batch: Mapping[str, torch.Tensor]


def _plan_padded(batch: Mapping) -> Plan:
    ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    R, T = ids.shape
    # hidden row t predicts token t + 1
    rows, cols = ((completion[:, 1:] != 0) & (attention[:, 1:] != 0)).nonzero(as_tuple=True)
    inputs = {"input_ids": ids, "attention_mask": attention}
    if isinstance(batch.get("position_ids"), torch.Tensor):
        inputs["position_ids"] = batch["position_ids"]
    return Plan("padded", inputs, rows * T + cols, ids[rows, cols + 1], rows, R // 2, batch)


def _predecessors(doc: torch.Tensor, branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token, the column of the token before it in its own sequence, and whether
    there is one. That is the previous column unless the previous token is on the other
    branch (the first rejected token after the chosen ones): then the prompt's last token."""
    R, L = doc.shape
    col = torch.arange(L, device=doc.device).expand(R, L)
    follows = torch.zeros_like(doc, dtype=torch.bool)
    follows[:, 1:] = (doc[:, 1:] == doc[:, :-1]) & ((branch[:, :-1] == 0) | (branch[:, :-1] == branch[:, 1:]))
    last_prompt = torch.where((branch == 0) & (doc >= 0), col, -1).cummax(dim=1).values
    prompt_in_doc = (last_prompt >= 0) & (doc.gather(1, last_prompt.clamp(min=0)) == doc)
    return torch.where(follows, col - 1, last_prompt), follows | prompt_in_doc


def check_attention(config, layout: str, device: torch.device) -> str:
    """The attention implementation of ``config``, if it can serve ``layout`` on ``device``.

    Raises:
        ValueError: naming the layout and the implementation, before any forward, for
            ``prefix_shared`` on flash attention (no mask; see :func:`route_attention`), any block
            layout on paged attention, and FlexAttention with gradients on CPU (no backward).
    """
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if "paged" in attn:
        raise ValueError(
            f"layout={layout!r} cannot run on attn_implementation={attn!r} (paged attention serves "
            "generation with a cache); load the model with 'sdpa', 'eager' or 'flex_attention'"
        )
    if is_flash(attn) and layout == "prefix_shared":
        raise ValueError(
            f"layout='prefix_shared' needs a block attention mask, which attn_implementation={attn!r} "
            "does not take, and FlexAttention (the block-mask alternative) cannot run here"
            + ("" if flex_supports_backward(device) else " with gradients: it has no backward on CPU")
            + "; load the model with attn_implementation='flex_attention', 'sdpa' or 'eager', or use "
            "layout='packed'"
        )
    if is_flex(attn) and torch.is_grad_enabled() and not flex_supports_backward(device):
        raise ValueError(
            f"layout={layout!r} with attn_implementation='flex_attention' on {torch.device(device).type}: "
            "FlexAttention has no backward on CPU; run under torch.no_grad() (e.g. grad=False for reference "
            "log-probs), on a GPU, or load the model with attn_implementation='sdpa'"
        )
    return attn


def route_attention(model, layout: str, device: torch.device) -> None:
    """Switch a flash-attention model to FlexAttention for ``layout="prefix_shared"``.

    Flash kernels take no mask, and prefix sharing is not a set of independent sequences; the
    model is switched (once, with a warning, for good: gradient checkpointing replays the layers
    in backward with whatever implementation the config names then) when FlexAttention can run
    on ``device`` for this call and the model supports it. Otherwise it is left as it is and
    :func:`check_attention` refuses the layout.
    """
    base = unwrap_model(model)
    attn = getattr(text_config(base), "_attn_implementation", None)
    if layout != "prefix_shared" or not is_flash(attn) or not getattr(base, "_supports_flex_attn", False):
        return
    if torch.is_grad_enabled() and not flex_supports_backward(device):
        return
    warnings.warn(
        f"dpo_fast: layout='prefix_shared' needs a block attention mask, which attn_implementation={attn!r} "
        f"does not take: switching {type(base).__name__} to attn_implementation='flex_attention'",
        stacklevel=3,
    )
    use_flex_attention(base)


def _plan_block(batch: Mapping, layout: str, num_pairs: int, config, dtype: torch.dtype) -> Plan:
    ids, positions, doc, branch, sequence_ids = (batch[key] for key in BLOCK_KEYS)
    L = ids.shape[1]
    before, has_before = _predecessors(doc, branch)
    rows, cols = ((sequence_ids >= 0) & has_before).nonzero(as_tuple=True)
    sequence = sequence_ids[rows, cols]
    order = torch.argsort(sequence, stable=True)
    rows, cols, sequence = rows[order], cols[order], sequence[order]
    source = rows * L + before[rows, cols]
    inputs = {"input_ids": ids, "position_ids": positions}
    attn = check_attention(config, layout, ids.device)
    if is_flash(attn):
        # transformers' varlen path: sequences from the restarts of position_ids, which it reads
        # for a batch of one row only (several rows would each run as one causal sequence)
        inputs = {key: value.reshape(1, -1) for key, value in inputs.items()}
    elif is_flex(attn):
        inputs["attention_mask"] = flex_block_mask(config, doc, branch, positions)
    else:
        if torch.is_autocast_enabled(ids.device.type):
            dtype = torch.get_autocast_dtype(ids.device.type)  # what attention computes in
        inputs["attention_mask"] = dense_attention_mask(config, doc, branch, positions, dtype=dtype)
    return Plan(layout, inputs, source, ids[rows, cols], sequence, num_pairs, batch)


def lower_batch(batch: Mapping, layout: str, config, dtype: torch.dtype) -> Plan:
    """Validate ``batch`` and lower it for ``layout`` (a padded batch is re-laid out on the host)."""
    if check_batch(batch, layout, getattr(config, "vocab_size", None)) == "block":
        return _plan_block(batch, layout, int(batch["num_pairs"]), config, dtype)
    if layout == "padded":
        return _plan_padded(batch)
    device, pad = batch["input_ids"].device, 0
    if layout == "packed":
        block = collate_packed(sequences_from_padded(batch), pad_token_id=pad)
    else:
        block = collate_prefix_shared(pairs_from_padded(batch), pad_token_id=pad)
    block = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in block.items()}
    return _plan_block(block, layout, block["num_pairs"], config, dtype)
