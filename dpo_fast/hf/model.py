"""Find a causal LM's backbone and output head, and the transforms its config puts on the logits.

Generic by design: no table of architectures. The backbone is ``get_decoder()`` of the
(PEFT-unwrapped) model, the head is ``get_output_embeddings()``, and the logit transforms
are read from config fields that the ``*ForCausalLM`` classes of transformers apply after the
head (inspected in transformers 5.23):

- soft-capping ``c * tanh(z / c)``: ``final_logit_softcapping`` (Gemma 2/3/3n/4, VaultGemma,
  nanochat), ``logits_soft_cap`` (RecurrentGemma), ``output_logit_soft_cap`` (xLSTM);
- a multiplier: ``logit_scale`` (Cohere family), ``lm_head_multiplier`` (Falcon-H1);
- ``logits_scaling``, whose direction differs by family: Granite and MiniCPM3 divide by it,
  HyperCLOVA X multiplies. Both readings are candidates; the self-check keeps the one that
  reproduces the model's logits (without the check, division, the first, is used);
- ``unpadded_vocab_size`` (Inkling): the logits are cut to the first rows of the head.

Anything else a model does to its logits is caught by the self-check (``dpo_fast.hf.check``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..formulas import transform_logits
from .wrappers import unwrap_ddp

_SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
_MULTIPLIER_FIELDS = ("logit_scale", "lm_head_multiplier")


@dataclass(frozen=True)
class HeadTransform:
    """Logits ``z = softcap(logit_scale * (h @ W[:vocab_size].T + b))``."""

    logit_scale: float = 1.0
    softcap: float | None = None
    vocab_size: int | None = None

    def describe(self) -> str:
        return f"logit_scale={self.logit_scale:g}, softcap={self.softcap}, vocab_size={self.vocab_size}"


@dataclass(frozen=True)
class Head:
    """The output projection of a causal LM, ``linear`` (weight ``(V, H)``, optional bias ``(V,)``),
    and the transform its logits get.

    The parameters are read from ``linear`` when used, not when the head is found: an FSDP2
    unit holds them gathered only inside its forward (``dpo_fast.hf.wrappers.call_head``).
    """

    linear: nn.Linear
    transform: HeadTransform

    def projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``weight`` and ``bias`` cut to the vocabulary the logits keep (views: gradients flow)."""
        weight, bias, size = self.linear.weight, self.linear.bias, self.transform.vocab_size
        if size is None:
            return weight, bias
        return weight[:size], None if bias is None else bias[:size]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Materialized transformed logits ``(..., V)`` of a few hidden states (the self-check)."""
        weight, bias = self.projection()
        raw = nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
        return transform_logits(raw, self.transform.logit_scale, self.transform.softcap)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``DistributedDataParallel`` and / or PEFT wrapper
    (adapters stay active in its layers). Wrappers are not called here: see ``dpo_fast.hf.wrappers``.

    Raises:
        ValueError: a prompt-learning PEFT adapter (prefix/prompt tuning), which changes the
            inputs rather than the layers; the backbone cannot be called without it.
    """
    model = unwrap_ddp(model)
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        config = getattr(model, "active_peft_config", None)
        if getattr(config, "is_prompt_learning", False):
            raise ValueError(
                f"{type(model).__name__} uses a prompt-learning adapter ({type(config).__name__}), which "
                "dpo_fast.concatenated_forward does not support; LoRA-style adapters are supported"
            )
        model = model.get_base_model()
    return model


def find_backbone(model: nn.Module) -> nn.Module:
    """The module returning ``last_hidden_state`` (after the final norm): ``get_decoder()``."""
    get_decoder = getattr(model, "get_decoder", None)
    backbone = get_decoder() if callable(get_decoder) else None
    if backbone is None or backbone is model:
        raise ValueError(
            f"cannot find the backbone of {type(model).__name__}: expected a transformers *ForCausalLM whose "
            "get_decoder() returns the base model"
        )
    return backbone


def run_backbone(
    backbone: nn.Module, inputs: dict[str, torch.Tensor], *, router_logits: list | None = None
) -> torch.Tensor:
    """``(R * L, H)`` final hidden states (after the last norm) of ``inputs`` ``(R, L)``.

    With a list as ``router_logits`` the backbone of a mixture-of-experts model is asked for its
    router logits, and the list receives them (one ``(R * L, experts)`` tensor per MoE layer).
    """
    extra = {} if router_logits is None else {"output_router_logits": True}
    out = backbone(**inputs, use_cache=False, return_dict=True, **extra)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if router_logits is not None:
        router_logits.extend(out.router_logits)
    return hidden.reshape(-1, hidden.shape[-1])


def text_config(model: nn.Module):
    """The config of the language part (``get_text_config()`` of composite models)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; expected a transformers causal LM")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_transforms(config) -> list[HeadTransform]:
    """Candidate logit transforms read from ``config``, the most likely first (see module doc)."""
    softcap = next((getattr(config, f) for f in _SOFTCAP_FIELDS if getattr(config, f, None)), None)
    scale = 1.0
    for field in _MULTIPLIER_FIELDS:
        value = getattr(config, field, None)
        if value is not None:
            scale *= float(value)
    vocab_size = getattr(config, "unpadded_vocab_size", None)
    scaling = getattr(config, "logits_scaling", None)
    scales = [scale] if scaling in (None, 1, 1.0) else [scale / float(scaling), scale * float(scaling)]
    return [HeadTransform(s, None if softcap is None else float(softcap), vocab_size) for s in scales]


def find_head(model: nn.Module) -> tuple[nn.Linear, list[HeadTransform]]:
    """The output embedding (an ``nn.Linear``) and its candidate transforms.

    Raises:
        ValueError: the model has no output embedding, or it is not a plain linear layer
            (e.g. a PEFT adapter on the head: merge it or leave ``lm_head`` out of the targets).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no output embedding (get_output_embeddings() returned None); "
            "dpo_fast.concatenated_forward needs a causal LM with a linear output head"
        )
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"the output embedding of {type(model).__name__} is a {type(head).__name__}, expected a plain "
            "torch.nn.Linear (an adapter on lm_head must be merged, or lm_head left out of its targets)"
        )
    return head, head_transforms(text_config(model))
