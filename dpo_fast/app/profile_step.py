"""One DPO step per method, for the memory profiler (``dpo-fast profile-memory``).

A step is what a DPO trainer does per batch: the policy forward (backbone + head ->
per-sequence log-probs), the reference forward without gradients, the sigmoid DPO loss, the
backward, and (``optimizer="adamw"``/``"sgd"``) the optimizer step. The methods differ in the
head and the layout:

- ``naive``: ``model(...).logits`` -> ``float().log_softmax(-1)`` -> ``gather``, padded;
- ``trl``: TRL 1.16's ``DPOTrainer`` head (``trl.trainer.utils.add_fused_lm_head``: its
  chunked log-prob function on the scored positions), padded;
- ``liger``: Liger's ``LigerFusedLinearDPOLoss`` on the backbone's hidden states, padded;
- ``ours-<layout>``: :func:`dpo_fast.concatenated_forward` in ``padded``, ``packed`` or
  ``prefix_shared``, with the attention implementation that suits the layout on the device
  (:func:`attention_for`).

Phases (marked on the meter): ``forward`` (policy backbone), ``head`` (from the backbone's
output to the policy log-probs), ``reference``, ``head_backward`` (loss and backward until the
backbone's output has its gradient), ``backward`` (the backbone's backward), ``optimizer``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from ..collate import Pair, collate_packed, collate_padded, collate_prefix_shared
from ..hf import concatenated_forward
from ..hf.model import find_backbone
from ..preference_loss import preference_loss

BASELINES = ("naive", "trl", "liger")
OURS = ("ours-padded", "ours-packed", "ours-prefix_shared")
METHODS = BASELINES + OURS
BETA = 0.1


@dataclass(frozen=True)
class Method:
    """A method of the profile: its name, its batch layout and its attention implementation."""

    name: str
    layout: str
    attention: str

    @property
    def label(self) -> str:
        return f"{self.name} ({self.attention})"


def attention_for(layout: str, device_type: str, *, backward: bool = True, flash: bool | None = None) -> str:
    """The attention implementation that suits ``layout`` on ``device_type``.

    padded: sdpa (flash / memory-efficient kernels; the mask is the padding only). packed:
    flash_attention_2 when flash-attn is installed (varlen kernels from position_ids), else
    FlexAttention. prefix_shared: FlexAttention (block mask). FlexAttention has no backward
    on CPU, so a CPU step with a backward uses sdpa and the dense additive mask. ``flash``:
    whether flash-attn may be used (default: when it is installed).
    """
    if layout == "padded":
        return "sdpa"
    if device_type == "cpu":
        return "sdpa" if backward else "flex_attention"
    if flash is None:
        flash = importlib.util.find_spec("flash_attn") is not None
    if layout == "packed" and flash:
        return "flash_attention_2"
    return "flex_attention"


def parse_method(spec: str, device_type: str, *, backward: bool, flash: bool | None = None) -> Method:
    """``name`` or ``name:attention`` (e.g. ``ours-prefix_shared:sdpa``) -> :class:`Method`.

    Raises:
        ValueError: an unknown method name.
    """
    name, _, attention = spec.partition(":")
    if name not in METHODS:
        raise ValueError(
            f"unknown method {name!r}; expected one of {', '.join(METHODS)} (optionally :attention)"
        )
    layout = name.removeprefix("ours-") if name in OURS else "padded"
    return Method(
        name, layout, attention or attention_for(layout, device_type, backward=backward, flash=flash)
    )


def make_pairs(
    num_pairs: int,
    length: int,
    vocab_size: int,
    prompt_fraction: float,
    seed: int,
    prompt_length: int | None = None,
) -> list[Pair]:
    """``num_pairs`` random pairs whose prompt + completion is ``length`` tokens each; the
    prompt is ``prompt_length`` tokens, or ``prompt_fraction`` of ``length``."""
    generator = torch.Generator().manual_seed(seed)
    prompt = round(length * prompt_fraction) if prompt_length is None else prompt_length
    prompt = max(1, min(length - 1, prompt))

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab_size, (n,), generator=generator).tolist()

    return [Pair(ids(prompt), ids(length - prompt), ids(length - prompt)) for _ in range(num_pairs)]


def collate(pairs: list[Pair], layout: str) -> dict:
    """The batch of ``layout`` (one sequence or pair block per row; no row longer than needed)."""
    if layout == "padded":
        return collate_padded(pairs, pad_token_id=0)
    if layout == "packed":
        sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
            (p.prompt_ids, p.rejected_ids) for p in pairs
        ]
        return collate_packed(sequences, pad_token_id=0)
    return collate_prefix_shared(pairs, pad_token_id=0)


def batch_tokens(batch: dict) -> int:
    """Tokens the backbone runs (rows x row length)."""
    return batch["input_ids"].numel()


def build_models(
    config,
    method: Method,
    *,
    checkpointing: bool,
    dtype: torch.dtype,
    device: torch.device,
    fake_mode=None,
) -> tuple[nn.Module, nn.Module]:
    """(policy in train mode with dropout off and gradient checkpointing as asked, frozen
    reference in eval mode), random weights, both with ``method.attention``.

    With ``fake_mode`` (a ``FakeTensorMode``) the weights are fake tensors on ``device``: built
    on the meta device (no initialization to run), then given fake storage.
    """
    import transformers

    config = copy.deepcopy(config)
    config._attn_implementation = method.attention
    for field in (
        "attention_dropout",
        "hidden_dropout",
        "dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
    ):
        if hasattr(config, field):
            setattr(config, field, 0.0)
    with torch.device("meta" if fake_mode is not None else device):
        policy = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if fake_mode is not None:
        with fake_mode:
            for model in (policy, reference):
                model.to_empty(device=device)
                model.tie_weights()  # to_empty gives shared parameters (tied embeddings) one copy each
    policy.train()
    if checkpointing:
        enable = (
            getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})
    if method.name == "trl":
        from trl.trainer.utils import add_fused_lm_head

        for model in (policy, reference):
            add_fused_lm_head(model)
    return policy, reference


def make_optimizer(policy: nn.Module, name: str) -> torch.optim.Optimizer | None:
    params = [p for p in policy.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-6, foreach=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-6)
    return None


def _sequence_sums(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum(-1)


def _padded_labels(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's labels (-100 off the completion) and the scored mask ``(2B, T-1)``."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return labels, (labels[:, 1:] != -100)


def _naive_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    _, mask = _padded_labels(batch)
    # log_softmax of the whole (contiguous) logits, then the shift: a kernel given the shifted
    # view would copy it inside itself, out of the estimator's sight
    logps = logits.float().log_softmax(-1)[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return _sequence_sums(logps, mask)


def _trl_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    labels, mask = _padded_labels(batch)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        fused_lm_head=True,
    )
    return _sequence_sums(out.log_probs, mask)


def _ours_logps(model: nn.Module, batch: dict, layout: str, grad: bool) -> torch.Tensor:
    # check=False: the self-check's one full-logits forward is a one-time cost, not the step's
    out = concatenated_forward(model, batch, layout=layout, grad=grad, check=False)
    return torch.cat([out.chosen_logps, out.rejected_logps])


def _logps(method: Method, model: nn.Module, batch: dict, grad: bool) -> torch.Tensor:
    if method.name == "naive":
        return _naive_logps(model, batch)
    if method.name == "trl":
        return _trl_logps(model, batch)
    return _ours_logps(model, batch, method.layout, grad)


def _hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    return out.last_hidden_state[:, :-1]


def _liger_loss(policy: nn.Module, reference: nn.Module, batch: dict, meter) -> torch.Tensor:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    hidden = _hidden(policy, batch)
    meter.mark("reference")
    with torch.no_grad():
        ref_hidden = _hidden(reference, batch)
    meter.mark("head_backward")
    labels, _ = _padded_labels(batch)
    # compiled=False: torch.compile of Liger's chunk function costs minutes on CPU and cannot
    # run on fake tensors; memory is the same
    loss_fn = LigerFusedLinearDPOLoss(beta=BETA, compiled=hidden.is_cuda, use_ref_model=True)
    head, ref_head = policy.get_output_embeddings(), reference.get_output_embeddings()
    out = loss_fn(
        head.weight,
        hidden,
        labels[:, 1:],
        head.bias,
        ref_input=ref_hidden,
        ref_weight=ref_head.weight,
        ref_bias=ref_head.bias,
    )
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def phase_hooks(policy: nn.Module, meter, masks: list):
    """Mark ``head`` when the policy's backbone returns and ``backward`` when its output gets
    its gradient; record what the first decoder layer receives as ``attention_mask``."""
    backbone = find_backbone(policy)

    def after_backbone(module, args, output):
        meter.mark("head")
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if hidden.requires_grad:
            hidden.register_hook(lambda grad: meter.mark("backward"))

    def record_mask(module, args, kwargs):
        masks.append(kwargs.get("attention_mask"))

    handles = [backbone.register_forward_hook(after_backbone)]
    layers = getattr(backbone, "layers", None)
    if layers is not None and len(layers):
        handles.append(layers[0].register_forward_pre_hook(record_mask, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def mask_bytes(mask) -> int:
    """Storage of an attention mask: a tensor, a BlockMask, or a dict of them."""
    if mask is None:
        return 0
    if isinstance(mask, dict):
        return sum(mask_bytes(m) for m in mask.values())
    if isinstance(mask, torch.Tensor):
        return mask.untyped_storage().nbytes()
    tensors = [t for t in getattr(mask, "as_tuple", tuple)() if isinstance(t, torch.Tensor)]
    return sum(t.untyped_storage().nbytes() for t in tensors)


def dpo_step(
    method: Method,
    policy: nn.Module,
    reference: nn.Module,
    batch: dict,
    optimizer: torch.optim.Optimizer | None,
    meter,
    *,
    forward_only: bool = False,
) -> tuple[float, int]:
    """One DPO step, phases marked on ``meter``; ``forward_only``: the reference forward alone.

    Returns (the loss, or nan without one or on fake tensors; bytes of the attention mask the
    policy's layers received).
    """
    masks: list = []
    if forward_only:
        meter.mark("reference")
        with torch.no_grad(), phase_hooks(reference, meter, masks):
            _logps(method, reference, batch, grad=False)
        meter.mark("end")
        return float("nan"), mask_bytes(masks[0] if masks else None)
    with phase_hooks(policy, meter, masks):
        meter.mark("forward")
        if method.name == "liger":
            loss = _liger_loss(policy, reference, batch, meter)
        else:
            policy_logps = _logps(method, policy, batch, grad=True)
            meter.mark("reference")
            with torch.no_grad():
                ref_logps = _logps(method, reference, batch, grad=False)
            meter.mark("head_backward")
            chosen, rejected = policy_logps.chunk(2)
            ref_chosen, ref_rejected = ref_logps.chunk(2)
            loss = preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=BETA).loss
        loss.backward()
    if optimizer is not None:
        meter.mark("optimizer")
        optimizer.step()
    policy.zero_grad(set_to_none=True)
    meter.mark("end")
    return (float("nan") if _is_fake(loss) else float(loss.detach())), mask_bytes(masks[0] if masks else None)


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)
