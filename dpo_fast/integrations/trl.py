"""Drop-in for TRL's ``DPOTrainer``: our fused head behind TRL's own ``fused_lm_head`` protocol.

TRL (1.15, 1.16) never asks a model for logits during DPO. ``DPOTrainer.__init__`` calls
``add_fused_lm_head`` on the policy and the reference model, which wraps ``model.forward`` so
that ``model(..., labels=L, fused_lm_head=True)`` returns a ``FusedCausalLMOutput`` of per-token
log-probs (and entropy, mean logit, label-is-arg-max) with the ``[tokens, vocab]`` logits never
built. Every loss type, metric, PEFT reference adapter and the reference precompute path read
that output. So replacing that one function with :func:`add_fused_lm_head` below, which computes
the same fields with :func:`dpo_fast.linear_token_logprobs`, swaps the kernel and keeps the rest
of TRL unchanged.

Three ways in::

    from dpo_fast.integrations.trl import FastDPOTrainer   # a trl.DPOTrainer subclass
    trainer = FastDPOTrainer(model=model, ref_model=ref, args=config, train_dataset=data,
                             processing_class=tokenizer)

or ``dpo_fast.integrations.trl.patch()`` before building an unmodified ``trl.DPOTrainer``
(``unpatch()`` restores TRL's head), or ``with patched(): ...``.

Only the DPO trainer is patched. DPO reads the entropy for logging only (detached), and our
statistics carry no gradient; trainers that differentiate the entropy (an entropy bonus in
GRPO-style losses) keep TRL's head.
"""

from __future__ import annotations

import contextlib
import functools
import types
import warnings
from collections.abc import Iterator

import torch
import trl
import trl.trainer.dpo_trainer as _dpo_module
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from trl.trainer.utils import FusedCausalLMOutput

from ..checks import check_layout
from ..constants import BRANCH_CHOSEN, BRANCH_REJECTED, STAT_NAMES
from ..hf.forward import scored_rows
from ..hf.masks import block_layout_refusal
from ..hf.model import HeadTransform
from ..hf.wrappers import call_head, refuse_unsupported
from ..linear_logprobs import linear_token_logprobs

# The TRL releases whose fused-head protocol (signature, output fields, call sites) this module
# implements; keep in step with the `trl` extra in setup.py.
SUPPORTED_TRL = SpecifierSet(">=1.15,<1.17")

__all__ = [
    "SUPPORTED_TRL",
    "FastDPOTrainer",
    "add_fused_lm_head",
    "check_trl_version",
    "patch",
    "patched",
    "unpatch",
]


def check_trl_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless the installed TRL (or ``version``) is one we support."""
    version = trl.__version__ if version is None else version
    if Version(version) not in SUPPORTED_TRL:
        raise RuntimeError(
            f"dpo_fast.integrations.trl supports trl{SUPPORTED_TRL}, found trl {version}: install a "
            "supported TRL (pip install 'dpo-fast[trl]') or use dpo_fast.concatenated_forward in your loop"
        )


def trl_head_transforms(config) -> tuple[float | None, float]:
    """``(softcap, logit_scale)`` a causal LM's config applies to its logits, read as TRL reads them.

    This is the protocol's own reading, kept so the drop-in gives TRL's results on every model;
    ``dpo_fast.concatenated_forward`` reads more fields and verifies its reading against the
    model's logits (``dpo_fast.hf.model``).

    ``logit_scale`` multiplies the raw logits before the softcap: Cohere's ``logit_scale``, Muse
    Glimmer's ``output_multiplier``, Falcon-H1's ``lm_head_multiplier``, and Granite / MiniCPM3's
    ``logits_scaling`` (a divisor, except for HyperCLOVA X where it multiplies).
    """
    text_config = config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text_config, name, None)
        if scale is not None:
            return softcap, float(scale)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        return softcap, float(scaling if text_config.model_type == "hyperclovax" else 1 / scaling)
    return softcap, 1.0


def _router_aux_loss(model, text_config, router_logits, attention_mask) -> torch.Tensor:
    """TRL's MoE load-balancing loss of ``router_logits`` (per layer ``(2B * T, experts)``, TRL's
    padded token order) over the real tokens of ``attention_mask``."""
    # Mixtral's load-balancing loss is the one every MoE family in transformers shares.
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or model.num_experts
    return load_balancing_loss_func(
        router_logits, num_experts, text_config.num_experts_per_tok, attention_mask
    )


def add_fused_lm_head(
    model,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    *,
    layout: str = "padded",
) -> None:
    """TRL's ``trl.trainer.utils.add_fused_lm_head`` (same signature and contract), on our kernels.

    After it, ``model(..., labels=labels, fused_lm_head=True)`` runs the backbone, scores only
    the positions whose next-token label is not -100 with :func:`dpo_fast.linear_token_logprobs`
    (no ``[tokens, vocab]`` logits), and returns TRL's ``FusedCausalLMOutput``: ``log_probs``
    ``(B, T-1)`` float32 (``(B, T)`` with pre-shifted ``shift_labels``), the requested
    statistics among ``entropy``, ``mean_logits``, ``is_top1`` (bool), ``log_sum_sq_probs`` (no
    gradient; zero at ignored positions), ``label_mask`` (bool), ``loss`` (mean NLL, or divided
    by ``num_items_in_batch``) and, for MoE models that request router logits, ``aux_loss``.
    Without ``fused_lm_head=True`` the model's own forward runs, so ``generate`` is unchanged.

    Args:
        model: a ``transformers`` causal LM (the base model when PEFT wraps it).
        temperature: the logits are divided by it.
        cast_lm_head_to_fp32: run the head in float32, outside autocast.
        outputs: ``"log_probs"`` plus any of :data:`dpo_fast.STAT_NAMES`.
        layout: ``"padded"`` runs TRL's ``[2B, T]`` batch as it is. ``"packed"`` (padding-free)
            and ``"prefix_shared"`` (each pair's prompt once) re-lay the batch out on the host,
            run the backbone on that (``dpo_fast.hf``; verified once against the model's own
            logits) and scatter the per-token results back to TRL's ``[2B, T-1]`` positions,
            so TRL sees the same output. A model these layouts cannot serve (convolution or
            state-space layers such as LFM2's and Nemotron-H's, or flash attention with
            prefix sharing) gets ``"padded"`` and one warning. Text batches with
            ``input_ids``/``attention_mask`` only (not pre-shifted ``shift_labels``); MoE router
            logits are moved back to TRL's token order, so the load-balancing loss equals the
            padded layout's.
    """
    check_layout(layout)
    unknown = [name for name in outputs if name != "log_probs" and name not in STAT_NAMES]
    if unknown:
        raise ValueError(f"outputs must be 'log_probs' or names from {STAT_NAMES}, got unknown {unknown}")
    stats = tuple(name for name in STAT_NAMES if name in outputs)
    text_config = model.config.get_text_config()
    layout = _servable_layout(model, text_config, layout)
    softcap, logit_scale = trl_head_transforms(model.config)
    original_forward = model.forward

    # the original signature: `generate` validates its model kwargs against it
    @functools.wraps(type(model).forward)
    def fused_forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        refuse_unsupported(self)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        head = self.get_output_embeddings()
        router_logits = None
        if layout == "padded":
            # looked up on every call: PEFT and FSDP replace the backbone and head after patching
            backbone_outputs = self.base_model(*args, **kwargs)
            hidden = backbone_outputs.last_hidden_state
            router_logits = getattr(backbone_outputs, "router_logits", None)
            if shift_labels is None:
                hidden, labels = hidden[:, :-1], labels[:, 1:]
            else:
                labels = shift_labels
            hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
            mask = labels != -100
        else:
            with _own_forward(self, original_forward):
                hidden, labels, mask, router_logits = _relaid_rows(
                    self, layout, args, kwargs, labels, shift_labels, softcap, logit_scale
                )
        # an lm_head that is its own FSDP2 unit holds its weight gathered only inside its forward,
        # and reduce-scatters the gradient from its hooks: score through them
        per_token = call_head(
            head,
            lambda rows: _score(
                rows,
                head.weight,
                head.bias,
                labels,
                temperature,
                softcap,
                logit_scale,
                stats,
                cast_lm_head_to_fp32,
            ),
            hidden,
        )
        if layout != "padded":
            # masked_scatter keeps an all-ignored batch connected to the graph: a differentiable zero
            per_token = {
                name: value.new_zeros(mask.shape).masked_scatter(mask, value)
                for name, value in per_token.items()
            }
        log_probs = per_token.pop("log_probs")
        divisor = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / divisor
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_aux_loss(self, text_config, router_logits, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(
            loss=loss, label_mask=mask, aux_loss=aux_loss, log_probs=log_probs, **per_token
        )

    model.forward = types.MethodType(fused_forward, model)


_fallbacks_warned: set[tuple[str, str]] = set()


def _servable_layout(model, text_config, layout: str) -> str:
    """``layout``, or ``"padded"`` (with one warning per model class and layout) when its
    attention masks cannot serve the model: checked when the head is installed, that is when
    the trainer is built, not at the first step."""
    reason = None if layout == "padded" else block_layout_refusal(text_config, layout)
    if reason is None:
        return layout
    key = (type(model).__name__, layout)
    if key not in _fallbacks_warned:
        _fallbacks_warned.add(key)
        warnings.warn(
            f"dpo_fast: layout={layout!r} cannot serve {key[0]}: {reason}. Using layout='padded' "
            "(TRL's own batch) for it.",
            stacklevel=3,
        )
    return "padded"


# what a re-laid-out batch is made of (TRL passes use_cache=False; MoE models output_router_logits)
_LAYOUT_INPUTS = ("input_ids", "attention_mask", "use_cache", "output_router_logits")


@contextlib.contextmanager
def _own_forward(model, forward) -> Iterator[None]:
    """``model(...)`` calls ``forward`` (the model's own) for the duration.

    The self-check runs the model's own forward from inside ours. Wrappers installed on
    ``model.forward`` after ours must not run again there: accelerate's mixed-precision wrapper
    is one ``torch.autocast`` instance, and entering it a second time while it is active
    overwrites the autocast state it restores on exit, leaving autocast on after the step.
    """
    installed = model.__dict__.get("forward")
    model.forward = forward
    try:
        yield
    finally:
        if installed is None:
            del model.forward
        else:
            model.forward = installed


def _relaid_rows(
    model, layout: str, args: tuple, kwargs: dict, labels, shift_labels, softcap, logit_scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """For ``packed`` / ``prefix_shared``: ``(rows (N, H), labels (N,), mask (2B, T-1),
    router_logits)``: the hidden states predicting the N scored tokens, in the row-major order
    of ``mask``, and, when ``output_router_logits`` is requested, each MoE layer's router
    logits of TRL's real tokens laid out as TRL's padded batch (``(2B * T, experts)``)."""
    unsupported = [k for k, v in kwargs.items() if v is not None and k not in _LAYOUT_INPUTS]
    unsupported += ["positional arguments"] * bool(args) + ["shift_labels"] * (shift_labels is not None)
    if unsupported:
        raise NotImplementedError(
            f"layout={layout!r} takes text batches ({', '.join(_LAYOUT_INPUTS[:2])}, labels) only; "
            f"got {', '.join(unsupported)}"
        )
    input_ids = kwargs["input_ids"]
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": (labels != -100).long(),
    }
    # TRL's reading of the head transforms is the one to verify: the drop-in gives TRL's numbers
    scored = scored_rows(model, batch, layout, transforms=[HeadTransform(logit_scale, softcap)])
    router = [] if kwargs.get("output_router_logits") else None
    rows = scored.rows(router_logits=router)
    mask = (labels[:, 1:] != -100) & (attention_mask[:, 1:] != 0)
    # the plan lists the scored tokens by sequence (= TRL's row), then position: mask's order
    if rows.shape[0] != int(mask.sum()):
        raise ValueError(
            f"layout={layout!r}: {rows.shape[0]} scored tokens after re-laying the batch out, "
            f"{int(mask.sum())} in TRL's labels"
        )
    router_logits = None
    if router is not None:
        where = _padded_positions(scored.plan.batch, layout, attention_mask)
        router_logits = tuple(_to_padded(layer, where, attention_mask) for layer in router)
    return rows, scored.plan.labels, mask, router_logits


def _padded_positions(block: dict, layout: str, attention_mask: torch.Tensor) -> torch.Tensor:
    """For each real token of TRL's padded batch, in row-major order, its flat index in the
    re-laid-out ``block``: ``packed`` holds row ``r`` as block ``r``; ``prefix_shared`` holds
    pair ``i``'s prompt once (it stands for rows ``i`` and ``B + i``), then its chosen and
    rejected completions."""
    doc, branch = block["doc_ids"].reshape(-1), block["branch_ids"].reshape(-1)
    flat = torch.arange(doc.numel(), device=doc.device)
    real = doc >= 0
    if layout == "packed":
        rows, flat = doc[real], flat[real]
    else:
        num_pairs = int(block["num_pairs"])
        chosen = real & (branch != BRANCH_REJECTED)
        rejected = real & (branch != BRANCH_CHOSEN)
        rows = torch.cat([doc[chosen], doc[rejected] + num_pairs])
        flat = torch.cat([flat[chosen], flat[rejected]])
    # a block sits in one row of the block batch, in order: by padded row, then flat index
    order = torch.argsort(rows * doc.numel() + flat)
    rows, flat = rows[order], flat[order]
    expected = attention_mask.ne(0).sum(1).to(rows.device)
    if not torch.equal(torch.bincount(rows, minlength=expected.numel()), expected):
        raise ValueError(f"layout={layout!r}: the re-laid-out batch does not hold TRL's real tokens")
    return flat


def _to_padded(logits: torch.Tensor, where: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One layer's router logits of the block batch, ``(R * L, E)``, moved to TRL's padded
    ``(2B * T, E)`` positions (zeros at padding, which the aux loss masks out)."""
    logits = logits.reshape(-1, logits.shape[-1])
    real = attention_mask.reshape(-1).ne(0).to(logits.device)
    padded = logits.new_zeros((real.numel(), logits.shape[-1]))
    return padded.index_put((real.nonzero().squeeze(1),), logits.index_select(0, where.to(logits.device)))


def _score(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    softcap: float | None,
    logit_scale: float,
    stats: tuple[str, ...],
    cast_to_fp32: bool,
) -> dict[str, torch.Tensor]:
    """``{"log_probs": (B, T), stat: (B, T)}`` of ``labels`` (-100 = not scored: 0 there).

    Only scored positions reach the head (in DPO batches most tokens are prompt or padding);
    under autocast the head runs in the autocast dtype, as TRL's does.
    """
    no_autocast = contextlib.nullcontext()
    if cast_to_fp32:
        hidden = hidden.float()
        no_autocast = torch.autocast(hidden.device.type, enabled=False)
    if cast_to_fp32 or not torch.is_autocast_enabled(hidden.device.type):
        # TRL computes in the hidden states' dtype (some backbones return fp32 from a half model)
        weight = weight.to(hidden.dtype)
        bias = None if bias is None else bias.to(hidden.dtype)
    with no_autocast:
        log_probs, stat_values = linear_token_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            # TRL (like generation) divides by the temperature after the softcap; ours softcaps
            # after it, and c*tanh(u/c)/T equals (c/T)*tanh((u/T)/(c/T))
            softcap=None if softcap is None else softcap / temperature,
            logit_scale=logit_scale,
            stats=stats,
        )
    return {"log_probs": log_probs, **stat_values}


_trl_add_fused_lm_head = None  # TRL's function while patched


def patch(layout: str = "padded") -> None:
    """Make every ``trl.DPOTrainer`` built from now on use our fused head.

    Args:
        layout: see :func:`add_fused_lm_head`; ``"padded"`` is TRL's own.

    Raises:
        RuntimeError: the installed TRL is not one of :data:`SUPPORTED_TRL`.
    """
    global _trl_add_fused_lm_head
    check_trl_version()
    check_layout(layout)
    if _trl_add_fused_lm_head is None:
        _trl_add_fused_lm_head = _dpo_module.add_fused_lm_head
    head = add_fused_lm_head if layout == "padded" else functools.partial(add_fused_lm_head, layout=layout)
    _dpo_module.add_fused_lm_head = head


def unpatch() -> None:
    """Restore TRL's own head for trainers built from now on (idempotent). Trainers already
    built keep the head they were built with."""
    global _trl_add_fused_lm_head
    if _trl_add_fused_lm_head is not None:
        _dpo_module.add_fused_lm_head = _trl_add_fused_lm_head
        _trl_add_fused_lm_head = None


@contextlib.contextmanager
def patched(layout: str = "padded") -> Iterator[None]:
    """``patch(layout)`` for the duration of a ``with`` block; the previous state after."""
    previous = _dpo_module.add_fused_lm_head
    was_patched = _trl_add_fused_lm_head is not None
    patch(layout)
    try:
        yield
    finally:
        if was_patched:
            _dpo_module.add_fused_lm_head = previous
        else:
            unpatch()


class FastDPOTrainer(trl.DPOTrainer):
    """``trl.DPOTrainer`` with dpo_fast's fused head: same arguments, same results.

    One extra keyword: ``layout="packed"`` (padding-free) or ``"prefix_shared"`` (each pair's
    prompt through the model once), which TRL 1.16 lacks (see :func:`add_fused_lm_head`).
    The head is installed on the policy and reference model when the trainer is built;
    other trainers are left alone.
    """

    def __init__(self, *args, layout: str = "padded", **kwargs):
        with patched(layout):
            super().__init__(*args, **kwargs)
