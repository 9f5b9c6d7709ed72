"""``concatenated_forward``: chosen and rejected log-probs of a preference batch in one forward.

Data flow: the batch is *lowered* to a :class:`~dpo_fast.hf.plan.Plan` (backbone inputs +
which hidden row predicts which completion token of which sequence) and the model's parts
are found and self-checked (:func:`scored_rows`) -> inside the model's forward (through DDP /
FSDP2, ``dpo_fast.hf.wrappers``) :meth:`ScoredRows.rows` runs the backbone and gathers the
predicting rows (``(N, H)``, N = completion tokens, so prompt and padding never reach the
head) -> ``dpo_fast.linear_sequence_logprobs`` projects them through the lm_head tile by tile
and sums per sequence with ``segment_ids``. No ``[tokens, vocab]`` tensor exists.

In ``prefix_shared`` the last prompt token predicts both completions' first tokens: its
hidden row is gathered twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checks import check_layout, check_stats
from ..linear_logprobs import linear_sequence_logprobs
from .check import self_check, warn_inactive_checkpointing
from .model import Head, HeadTransform, find_backbone, find_head, run_backbone, text_config, unwrap_model
from .plan import Plan, lower_batch, route_attention
from .wrappers import call_head, in_root_forward, refuse_unsupported


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
class ScoredRows:
    """A lowered batch and the model parts that score it.

    Attributes:
        plan: the lowered batch (``plan.labels`` ``(N,)``, ``plan.sequence`` ``(N,)``).
        backbone: the module returning the final hidden states.
        head: the output projection and the logit transform that the self-check confirmed.
    """

    plan: Plan
    backbone: nn.Module
    head: Head

    def rows(self, *, router_logits: list | None = None) -> torch.Tensor:
        """``(N, H)`` the hidden states predicting the completion tokens, in ``plan`` order (by
        sequence, then position); the last prompt token's row appears twice in ``prefix_shared``.
        Runs the backbone: inside the model's forward (``in_root_forward``) when it is wrapped.
        A list as ``router_logits`` receives a mixture-of-experts model's router logits
        (``(R * L, experts)`` per MoE layer, in ``plan.inputs``' token order)."""
        hidden = run_backbone(self.backbone, self.plan.inputs, router_logits=router_logits)
        return hidden.index_select(0, self.plan.source)


def scored_rows(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    layout: str,
    *,
    transforms: Sequence[HeadTransform] | None = None,
    check: bool = True,
) -> ScoredRows:
    """Lower ``batch`` for ``layout`` and find (and self-check) ``model``'s backbone and head.

    The one path from a batch to hidden rows, shared by :func:`concatenated_forward` and the
    TRL integration. Call it outside the model's forward (the self-check calls the model),
    then :meth:`ScoredRows.rows` inside.

    Args:
        model: a transformers causal LM, or a PEFT, DDP or FSDP2 wrapper of one.
        batch, layout: as :func:`concatenated_forward`.
        transforms: candidate logit transforms (default: read from the config, see
            ``dpo_fast.hf.model.head_transforms``); the self-check keeps the first that
            reproduces the model's own logits.
        check: run the self-check (once per model and layout); False takes the first candidate.
    """
    base = unwrap_model(model)
    linear, found = find_head(base)
    backbone = find_backbone(base)
    candidates = list(transforms) if transforms is not None else found
    warn_inactive_checkpointing(model)
    route_attention(model, layout, linear.weight.device)  # the batch is checked when lowered
    plan = lower_batch(batch, layout, text_config(base), linear.weight.dtype)
    transform = self_check(model, backbone, linear, candidates, plan) if check else candidates[0]
    return ScoredRows(plan, backbone, Head(linear, transform))


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
            from its config (see ``dpo_fast.hf.model``). Under DDP or FSDP2 pass the wrapped
            model (the ``DistributedDataParallel`` wrapper, the ``fully_shard`` root): the
            computation runs as its forward, so gradients are reduced as for ``model(...)``.
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
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"`` for the fused head.

    Returns:
        :class:`ConcatenatedOutput` (float32 log-probs, int64 token counts).

    Raises:
        ValueError / TypeError: unknown layout, malformed batch (odd number of rows, mask of
        the wrong shape), a model without a linear output embedding, prefix-sharing rows whose
        prompts differ, or a failed self-check.
        NotImplementedError: a model under DeepSpeed ZeRO-3 or FSDP1 (use FSDP2).
    """
    layout = check_layout(layout)
    stats = check_stats(stats)
    refuse_unsupported(model)
    context = torch.no_grad() if not grad else contextlib.nullcontext()
    with context:
        scored = scored_rows(model, batch, layout, check=check)
        plan, head = scored.plan, scored.head

        def fused_head(rows: torch.Tensor) -> dict[str, torch.Tensor]:
            rows, weight, bias = _head_inputs(rows, head)
            logps, counts, stat_dict = linear_sequence_logprobs(
                rows.unsqueeze(0),
                weight,
                plan.labels.unsqueeze(0),
                bias=bias,
                logit_scale=head.transform.logit_scale,
                softcap=head.transform.softcap,
                segment_ids=plan.sequence.unsqueeze(0),
                num_segments=2 * plan.num_pairs,
                stats=stats,
                backend=backend,
            )
            return {"logps": logps[0], "counts": counts[0], **stat_dict}

        # through DDP's / FSDP2's forward (and the head's own FSDP2 unit): see dpo_fast.hf.wrappers
        outputs = in_root_forward(model, lambda: call_head(head.linear, fused_head, scored.rows()))
    logps, counts, stat_dict = outputs.pop("logps"), outputs.pop("counts"), outputs
    output = ConcatenatedOutput(
        logps[: plan.num_pairs], logps[plan.num_pairs :], counts[: plan.num_pairs], counts[plan.num_pairs :]
    )
    if stats:
        width = int(counts.max()) if counts.numel() else 0
        output.stats = {
            name: _per_token(value[0], plan.sequence, counts, width) for name, value in stat_dict.items()
        }
        output.token_mask = torch.arange(width, device=counts.device) < counts.unsqueeze(1)
    return output
