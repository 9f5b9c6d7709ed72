"""``concatenated_forward``: chosen and rejected log-probs of a preference batch in one forward.

Data flow: the batch is *lowered* to a :class:`Plan` (backbone inputs + which hidden row
predicts which completion token of which sequence) -> the backbone returns hidden states ->
the predicting rows are gathered (``(N, H)``, N = completion tokens, so prompt and padding
never reach the head) -> ``dpo_fast.linear_sequence_logprobs`` projects them through the
lm_head tile by tile and sums per sequence with ``segment_ids``. No ``[tokens, vocab]``
tensor exists.

In ``prefix_shared`` the last prompt token predicts both completions' first tokens: its
hidden row is gathered twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checks import check_stats
from ..collate import (
    check_layout,
    collate_packed,
    collate_prefix_shared,
    pairs_from_padded,
    sequences_from_padded,
)
from ..linear_logprobs import linear_sequence_logprobs
from .check import self_check
from .masks import block_attention_mask, is_flash
from .model import Head, find_backbone, find_head, run_backbone, text_config, unwrap_model

_BLOCK_KEYS = ("input_ids", "position_ids", "doc_ids", "branch_ids", "sequence_ids")


@dataclass
class ConcatenatedOutput:
    """What :func:`concatenated_forward` returns (B pairs).

    Attributes:
        chosen_logps, rejected_logps: ``(B,)`` float32, summed log-probs of the completion
            tokens (0.0 for a completion with no scored token).
        chosen_tokens, rejected_tokens: ``(B,)`` int64, the number of tokens summed.
        stats: ``{name: (2B, C)}`` the requested per-token statistics (``dpo_fast.STAT_NAMES``)
            of each sequence's completion tokens in order, chosen rows first; C is the
            longest completion, zeros beyond a row's length. Empty without ``stats``.
        token_mask: ``(2B, C)`` bool, True where ``stats`` hold a token; None without stats.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None


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


def _tensor(batch: Mapping, key: str, layout: str) -> torch.Tensor:
    value = batch.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"batch[{key!r}] must be a tensor for layout={layout!r}, got {type(value).__name__}; "
            f"batch keys: {sorted(batch)}"
        )
    if value.dtype.is_floating_point:
        raise TypeError(f"batch[{key!r}] must be an integer tensor, got dtype {value.dtype}")
    return value


def _check_padded(batch: Mapping) -> None:
    ids = _tensor(batch, "input_ids", "padded")
    if ids.dim() != 2 or ids.shape[0] % 2 or ids.shape[1] < 2:
        raise ValueError(
            f"batch['input_ids'] must be [2B, T] (B chosen rows, then B rejected rows, T >= 2), "
            f"got shape {tuple(ids.shape)}" + (" (an odd number of rows)" if ids.dim() == 2 else "")
        )
    for key in ("attention_mask", "completion_mask"):
        mask = _tensor(batch, key, "padded")
        if mask.shape != ids.shape:
            raise ValueError(
                f"batch[{key!r}] must have input_ids' shape {tuple(ids.shape)}, got {tuple(mask.shape)}"
            )


def _is_block_batch(batch: Mapping) -> bool:
    return "sequence_ids" in batch


def _check_block(batch: Mapping, layout: str) -> int:
    ids = _tensor(batch, "input_ids", layout)
    if ids.dim() != 2:
        raise ValueError(f"batch['input_ids'] must be [R, L] for layout={layout!r}, got {tuple(ids.shape)}")
    for key in _BLOCK_KEYS[1:]:
        if _tensor(batch, key, layout).shape != ids.shape:
            raise ValueError(
                f"batch[{key!r}] must have input_ids' shape {tuple(ids.shape)}, got {tuple(batch[key].shape)}"
            )
    num_pairs = batch.get("num_pairs")
    if isinstance(num_pairs, torch.Tensor) and num_pairs.numel() == 1:
        num_pairs = int(num_pairs)
    if not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"batch['num_pairs'] must be a positive int (B), got {num_pairs!r}")
    return num_pairs


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


def _plan_block(batch: Mapping, layout: str, num_pairs: int, config, dtype: torch.dtype) -> Plan:
    ids, positions, doc, branch, sequence_ids = (batch[key] for key in _BLOCK_KEYS)
    L = ids.shape[1]
    before, has_before = _predecessors(doc, branch)
    rows, cols = ((sequence_ids >= 0) & has_before).nonzero(as_tuple=True)
    sequence = sequence_ids[rows, cols]
    if sequence.numel() and int(sequence.max()) >= 2 * num_pairs:
        raise ValueError(f"batch['sequence_ids'] must be < 2 * num_pairs = {2 * num_pairs}")
    order = torch.argsort(sequence, stable=True)
    rows, cols, sequence = rows[order], cols[order], sequence[order]
    source = rows * L + before[rows, cols]
    attn = getattr(config, "_attn_implementation", None)
    inputs = {"input_ids": ids, "position_ids": positions}
    if is_flash(attn):
        if layout == "prefix_shared":
            raise ValueError(
                f"layout='prefix_shared' needs an explicit attention mask, which "
                f"attn_implementation={attn!r} does not take; load the model with "
                "attn_implementation='sdpa' or 'eager'"
            )
    else:
        inputs["attention_mask"] = block_attention_mask(config, doc, branch, positions, dtype=dtype)
    return Plan(layout, inputs, source, ids[rows, cols], sequence, num_pairs, batch)


def lower_batch(batch: Mapping, layout: str, config, dtype: torch.dtype) -> Plan:
    """Validate ``batch`` and lower it for ``layout`` (a padded batch is re-laid out on the host)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of tensors, got {type(batch).__name__}")
    if _is_block_batch(batch):
        if layout == "padded":
            raise ValueError("layout='padded' got a packed/prefix-shared batch (it has 'sequence_ids')")
        return _plan_block(batch, layout, _check_block(batch, layout), config, dtype)
    _check_padded(batch)
    if layout == "padded":
        return _plan_padded(batch)
    device, pad = batch["input_ids"].device, 0
    if layout == "packed":
        block = collate_packed(sequences_from_padded(batch), pad_token_id=pad)
    else:
        block = collate_prefix_shared(pairs_from_padded(batch), pad_token_id=pad)
    block = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in block.items()}
    return _plan_block(block, layout, block["num_pairs"], config, dtype)


def _head_inputs(rows: torch.Tensor, head: Head) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    weight, bias = head.projection()
    if rows.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"the backbone's hidden size {rows.shape[-1]} does not match the output embedding's "
            f"weight {tuple(weight.shape)}"
        )
    if not torch.is_autocast_enabled(rows.device.type):
        # some backbones return fp32 hidden states from a half model; the fused head wants one
        # dtype (under autocast it computes in the autocast dtype itself)
        rows = rows.to(weight.dtype)
    return rows, weight, bias


def _per_token(
    values: torch.Tensor, sequence: torch.Tensor, counts: torch.Tensor, width: int
) -> torch.Tensor:
    """Scatter ``(N,)`` values ordered by sequence into ``(2B, width)`` rows."""
    starts = counts.cumsum(0) - counts
    rank = torch.arange(sequence.numel(), device=sequence.device) - starts[sequence]
    out = values.new_zeros((counts.numel(), width))
    out[sequence, rank] = values
    return out


def concatenated_forward(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    layout: str = "padded",
    stats: Sequence[str] = (),
    grad: bool = True,
    check: bool = True,
    backend: str = "auto",
) -> ConcatenatedOutput:
    """Chosen and rejected log-probs of a preference batch under a Hugging Face causal LM.

    Args:
        model: a transformers ``*ForCausalLM`` (or a PEFT wrapper of one) with a linear
            output embedding. Its head transforms (soft-capping, logit scaling) are read
            from its config (see ``dpo_fast.hf.model``).
        batch: for ``"padded"``, TRL's collated format: ``input_ids`` ``[2B, T]`` (B chosen
            rows then B rejected rows), ``attention_mask`` and ``completion_mask`` (1 on
            completion tokens), optionally ``position_ids``. For ``"packed"`` and
            ``"prefix_shared"``, the output of ``dpo_fast.collate.PreferenceCollator`` for that
            layout, or a padded batch, which is then re-laid out on the host.
        layout: ``"padded"`` (one forward over ``[2B, T]``), ``"packed"`` (sequences end to
            end, no padding) or ``"prefix_shared"`` (``[prompt | chosen | rejected]``: the
            prompt runs once per pair). Same results; see docs/ARCHITECTURE.md.
        stats: per-token statistics to return, names from ``dpo_fast.STAT_NAMES``.
        grad: False (reference model) runs under ``torch.no_grad()``: nothing is saved.
        check: on the first call per model and layout, compare the fused head with the
            model's own ``forward(...).logits`` on a few positions and raise ``ValueError``
            when they disagree. False skips it.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for the fused head.

    Returns:
        :class:`ConcatenatedOutput` (float32 log-probs, int64 token counts).

    Raises:
        ValueError / TypeError: unknown layout, malformed batch (odd number of rows, mask of
        the wrong shape), a model without a linear output embedding, prefix-sharing rows whose
        prompts differ, or a failed self-check.
    """
    layout = check_layout(layout)
    stats = check_stats(stats)
    base = unwrap_model(model)
    linear, transforms = find_head(base)
    backbone = find_backbone(base)
    config = text_config(base)
    context = torch.no_grad() if not grad else contextlib.nullcontext()
    with context:
        plan = lower_batch(batch, layout, config, linear.weight.dtype)
        transform = self_check(model, backbone, linear, transforms, plan) if check else transforms[0]
        head = Head(linear.weight, linear.bias, transform)
        rows = run_backbone(backbone, plan.inputs).index_select(0, plan.source)
        num_sequences = 2 * plan.num_pairs
        rows, weight, bias = _head_inputs(rows, head)
        logps, counts, *stat_dict = linear_sequence_logprobs(
            rows.unsqueeze(0),
            weight,
            plan.labels.unsqueeze(0),
            bias=bias,
            logit_scale=transform.logit_scale,
            softcap=transform.softcap,
            segment_ids=plan.sequence.unsqueeze(0),
            num_segments=num_sequences,
            stats=stats,
            backend=backend,
        )
    logps, counts = logps[0], counts[0]
    output = ConcatenatedOutput(
        logps[: plan.num_pairs], logps[plan.num_pairs :], counts[: plan.num_pairs], counts[plan.num_pairs :]
    )
    if stats:
        width = int(counts.max()) if counts.numel() else 0
        output.stats = {
            name: _per_token(value[0], plan.sequence, counts, width) for name, value in stat_dict[0].items()
        }
        output.token_mask = torch.arange(width, device=counts.device) < counts.unsqueeze(1)
    return output
