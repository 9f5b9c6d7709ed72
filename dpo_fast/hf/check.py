"""The self-check: does our path reproduce the model's own logits?

The first :func:`dpo_fast.concatenated_forward` call for a model and layout runs, in eval
mode without gradients, (a) our path — the layout's backbone inputs, then the head with the
transforms read from the config — and (b) the model's own ``forward(...).logits`` on one
sequence of the batch alone, and compares the logits at up to ``PROBE_TOKENS`` of its
completion positions. It checks the head (an architecture that transforms its logits in a
way its config does not say) and the layout (masks and positions the model does not honour)
at once. The probe is a rejected sequence when there is one: in ``prefix_shared`` it is the
sequence the mask most constrains.

Among several candidate transforms (``logits_scaling`` has two readings) it keeps the first
that agrees; the result is cached on the model, per layout.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn

from .model import Head, HeadTransform, run_backbone, unwrap_model
from .wrappers import call_head, in_root_forward, is_wrapped

if TYPE_CHECKING:
    from .plan import Plan

PROBE_TOKENS = 8
# max |our logits - model logits| / max(1, max |model logits|) allowed, by compute dtype
# (half precision, or any dtype under autocast: HALF_TOLERANCE)
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TOLERANCE = 5e-2

# The confirmed transform per layout lives on the model itself ({layout: HeadTransform}): it goes
# away with the model, and torch.compile guards on a module attribute like on any other.
CHECKED_ATTRIBUTE = "_dpo_fast_checked_transforms"


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the comparison, each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def warn_inactive_checkpointing(model: nn.Module) -> None:
    """Warn when the model's gradient checkpointing is enabled but will not run.

    transformers checkpoints a layer only in training mode with gradients enabled; a model
    trained in ``eval()`` (to switch dropout off) keeps every activation silently. Train in
    ``train()`` mode with dropout disabled instead (``trl.trainer.utils.disable_dropout_in_model``
    does it). Our own eval-mode self-check restores each module's mode, so it leaves
    checkpointing in effect.
    """
    if model.training or not torch.is_grad_enabled():
        return
    base = unwrap_model(model)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules()):
        warnings.warn(
            f"dpo_fast: gradient checkpointing is enabled on {type(base).__name__} but inactive: "
            "the model is in eval() mode, where transformers keeps every activation. Call model.train() and "
            "disable dropout instead (e.g. trl.trainer.utils.disable_dropout_in_model(model)).",
            stacklevel=3,
        )


def _probe(plan: Plan) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One sequence alone: the model inputs, and for up to ``PROBE_TOKENS`` of its completion
    tokens the flat hidden row of our path and the position in the model's own logits."""
    num_pairs = plan.num_pairs
    present = plan.sequence.unique().tolist()
    # nothing scored (possible on one rank of a wrapped model): sequence 0, no positions
    s = next((s for s in present if s >= num_pairs), present[0] if present else 0)
    entries = (plan.sequence == s).nonzero().squeeze(1)[-PROBE_TOKENS:]
    source = plan.source[entries]
    batch = plan.batch
    if plan.layout == "padded":
        T = batch["input_ids"].shape[1]
        inputs = {
            key: batch[key][s : s + 1]
            for key in ("input_ids", "attention_mask", "position_ids")
            if key in batch
        }
        return inputs, source, source - s * T
    found = (batch["sequence_ids"] == s).nonzero()
    row, col = found[0].tolist() if len(found) else (0, 0)
    doc, branch = batch["doc_ids"][row], batch["branch_ids"][row]
    keep = (doc == doc[col]) & ((branch == 0) | (branch == branch[col]))
    # block positions are the positions each token has in its own sequence
    return (
        {"input_ids": batch["input_ids"][row][keep].unsqueeze(0)},
        source,
        batch["position_ids"].reshape(-1)[source],
    )


def self_check(
    model: nn.Module, backbone: nn.Module, linear: nn.Linear, transforms: list[HeadTransform], plan: Plan
) -> HeadTransform:
    """The transform that reproduces ``model``'s logits for ``plan.layout`` (cached).

    Raises:
        ValueError: no candidate agrees within the tolerance; the message names the model
            class, the layout and the observed difference.
    """
    base = unwrap_model(model)
    cache = getattr(base, CHECKED_ATTRIBUTE, None)
    if cache is None:
        cache = {}
        object.__setattr__(base, CHECKED_ATTRIBUTE, cache)  # not a submodule, parameter or buffer
    if plan.layout in cache:
        return cache[plan.layout]
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"the dpo_fast self-check of {type(base).__name__} for layout={plan.layout!r} compares logits on "
            "the host and runs eagerly: call concatenated_forward once without torch.compile (it is cached "
            "per model and layout), or pass check=False"
        )
    if plan.source.numel() == 0 and not is_wrapped(model):
        return transforms[0]  # nothing scored: nothing to compare yet
    with torch.no_grad(), _eval_mode(model):
        inputs, source, positions = _probe(plan)

        def our_path() -> dict[str, torch.Tensor | list[torch.Tensor]]:
            hidden = run_backbone(backbone, plan.inputs).index_select(0, source)
            logits = call_head(linear, lambda h: [Head(linear, t).logits(h) for t in transforms], hidden)
            return {"hidden": hidden, "logits": logits}

        # both through the wrappers (DDP, FSDP2): every rank makes the same collective calls
        reference = model(**inputs, use_cache=False).logits[0, positions].float()
        computed = in_root_forward(model, our_path)
    if source.numel() == 0:
        return transforms[0]  # a wrapped model with nothing scored on this rank: nothing to compare
    candidates = list(zip(transforms, computed["logits"], strict=True))
    dtype = computed["hidden"].dtype
    autocast = torch.is_autocast_enabled(reference.device.type)
    tolerance = HALF_TOLERANCE if autocast else TOLERANCE.get(dtype, HALF_TOLERANCE)
    scale = max(1.0, float(reference.abs().max()))
    errors = []
    for transform, ours in candidates:
        if ours.shape != reference.shape:
            errors.append(
                f"{transform.describe()}: logits of shape {tuple(ours.shape)} vs {tuple(reference.shape)}"
            )
            continue
        difference = float((ours - reference).abs().max())
        if difference <= tolerance * scale:
            cache[plan.layout] = transform
            return transform
        errors.append(f"{transform.describe()}: max |difference| {difference:.4g}")
    raise ValueError(
        f"dpo_fast self-check failed for {type(base).__name__} (layout={plan.layout!r}): the fused head "
        f"does not reproduce the model's own logits (max |logit| {scale:.4g}, tolerance "
        f"{tolerance:g} relative) — "
        + "; ".join(errors)
        + ". The model transforms its logits or attention in "
        "a way dpo_fast does not read from its config; pass check=False only if you know the difference "
        "is harmless."
    )
