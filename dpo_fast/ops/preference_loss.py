"""The ``preference_loss`` op: the Triton backend's operators, their fakes and their autograd.

The Triton backend registers::

    dpo_fast::preference_loss_forward_triton(Tensor inputs, Tensor params, int loss_mask,
        int rows_present, int f_divergence, int rewards, int reduction)
        -> (Tensor loss, Tensor rewards, Tensor stats)
    dpo_fast::preference_loss_backward_triton(Tensor grad_loss, Tensor inputs, Tensor params,
        int loss_mask, int rows_present, int f_divergence, int reduction) -> Tensor

:func:`forward_arguments` builds their two tensors with torch ops, so autograd reaches the
caller's tensors through them: ``inputs`` stacks the per-pair inputs into one fp32
``(K, P)`` tensor (its one differentiable input; backward returns its ``(K, P)`` gradient and
the stack hands each row back), ``params`` holds the loss weights and scalar options
(``kernels/preference_loss.py`` documents both layouts). The loss types are a compile-time bit
mask, the weights run-time values: one compiled kernel per set of loss types. A new spec
(say, a changed beta) costs one small host-to-device copy on its first call.

The ``"torch"`` backend registers nothing: it is ``dpo_fast.formulas.preference_losses``,
plain differentiable PyTorch.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import formulas, registry
from ..constants import F_DIVERGENCES, LOSS_TYPES, REDUCTIONS, REWARD_KINDS
from .library import input_gradients, refuse_double_backward, triton_op

if TYPE_CHECKING:
    from ..preference_loss import PreferenceLossInputs, PreferenceLossSpec

# kernels/preference_loss.py once load("triton") has imported it (Triton reads TRITON_INTERPRET
# when the kernels are defined, so nothing imports them before the backend is chosen)
_loaded: dict[str, ModuleType] = {}


def _kernels() -> ModuleType:
    return _loaded["triton"]


def _param_values(spec: PreferenceLossSpec) -> tuple[float, ...]:
    """``params`` of a spec, in ``PARAMS`` order, with the per-call ``sft_scale`` 0."""
    kernels = _kernels()
    f_divergence = formulas.canonical_f_divergence(spec.f_divergence, spec.f_alpha)
    values = dict.fromkeys(LOSS_TYPES, 0.0)
    values.update(zip(spec.loss_type, spec.loss_weights, strict=True))
    values.update(
        beta=spec.beta,
        label_smoothing=spec.label_smoothing,
        discopop_tau=spec.discopop_tau,
        simpo_gamma=spec.simpo_gamma,
        f_alpha=spec.f_alpha,
        max_exponent=formulas.max_score_exponent(f_divergence, spec.f_alpha),
        orpo_max_logp=formulas.ORPO_MAX_LOGP,
        bco_delta=spec.bco_delta,
        sft_scale=0.0,
    )
    return tuple(values[name] for name in kernels.PARAMS)


@functools.lru_cache(maxsize=64)
def _cached_params(spec: PreferenceLossSpec, device: torch.device) -> torch.Tensor:
    return torch.tensor(_param_values(spec), dtype=torch.float32, device=device)


def _spec_params(spec: PreferenceLossSpec, like: torch.Tensor) -> torch.Tensor:
    """A spec's ``params`` on ``like``'s device.

    Eagerly, one tensor per (spec, device), made on first use: later calls copy nothing from
    the host, so they capture in CUDA graphs (after one warm-up call, as the kernels' own
    compilation needs anyway). Traced (``torch.compile``, fake or meta tensors), a constant of
    the graph.
    """
    if torch.compiler.is_compiling() or like.is_meta or is_fake(like):
        return torch.tensor(_param_values(spec), dtype=torch.float32, device=like.device)
    return _cached_params(spec, like.device)


def forward_arguments(x: PreferenceLossInputs, spec: PreferenceLossSpec) -> tuple:
    """The arguments of ``dpo_fast::preference_loss_forward_triton`` for one validated call,
    built with differentiable torch ops."""
    kernels = _kernels()
    f32 = torch.float32
    c = x.chosen
    rows = [c, x.rejected]
    rows_present = 0
    if x.ref_chosen is not None:
        rows += [x.ref_chosen.detach(), x.ref_rejected.detach()]
        rows_present |= kernels.HAS_REF.value
    if x.chosen_lengths is not None:
        rows += [x.chosen_lengths, x.rejected_lengths]
        rows_present |= kernels.HAS_LENGTHS.value
    if x.chosen_nll is not None:
        rows.append(x.chosen_nll)
        rows_present |= kernels.HAS_NLL.value
    # the batch-coupled parts, in PyTorch: sorts for AOT (which needs the references) ...
    if "aot" in spec.loss_type or "aot_unpaired" in spec.loss_type:
        f = [t.to(f32) for t in (c, x.rejected, x.ref_chosen, x.ref_rejected)]
        if "aot" in spec.loss_type:
            rows.append(formulas.aot_delta(*f))
        if "aot_unpaired" in spec.loss_type:
            rows.append(formulas.aot_unpaired_delta(*f))
    inputs = torch.stack([row.to(f32) for row in rows])
    params = _spec_params(spec, c)
    # ... and the per-call scalars: SFT's chosen token count, a tensor bco_delta
    sft = formulas.sft_scale(x.chosen_lengths, c.shape[0]) if "sft" in spec.loss_type else None
    tensor_delta = isinstance(x.bco_delta, torch.Tensor)
    if sft is not None or tensor_delta:
        delta = x.bco_delta.to(f32) if tensor_delta else params[kernels.P_BCO_DELTA.value]
        scale = sft if sft is not None else params[kernels.P_SFT_SCALE.value]
        params = torch.cat([params[: kernels.P_BCO_DELTA.value], torch.stack([delta, scale])])
    loss_mask = sum(1 << LOSS_TYPES.index(name) for name in spec.loss_type)
    f_divergence = formulas.canonical_f_divergence(spec.f_divergence, spec.f_alpha)
    return (
        inputs,
        params,
        loss_mask,
        rows_present,
        F_DIVERGENCES.index(f_divergence),
        REWARD_KINDS.index(spec.rewards),
        REDUCTIONS.index(spec.reduction),
    )


def triton_preference_loss(
    x: PreferenceLossInputs, spec: PreferenceLossSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The Triton backend of ``dpo_fast.preference_loss``: ``(loss, chosen_rewards,
    rejected_rewards, stats)``, fp32, as ``dpo_fast.formulas.preference_losses``."""
    forward = registry.operator("preference_loss", "forward", "triton")
    loss, rewards, stats = forward(*forward_arguments(x, spec))
    return loss, rewards[0], rewards[1], dict(zip(_kernels().STATS, stats.unbind(0), strict=True))


def _forward_fake(inputs, params, loss_mask, rows_present, f_divergence, rewards, reduction):
    P = inputs.shape[1]
    loss = inputs.new_empty((P,) if reduction == REDUCTIONS.index("none") else ())
    return loss, inputs.new_empty((2, P)), inputs.new_empty((len(_kernels().STATS),))


def _backward_fake(grad_loss, inputs, params, loss_mask, rows_present, f_divergence, reduction):
    return torch.empty_like(inputs)


def _setup_context(ctx, inputs, output):
    x, params, loss_mask, rows_present, f_divergence, _, reduction = inputs
    _, rewards, stats = output
    ctx.save_for_backward(x, params)
    ctx.options = (loss_mask, rows_present, f_divergence, reduction)
    ctx.mark_non_differentiable(rewards, stats)


def _backward(ctx, grad_loss, grad_rewards, grad_stats):
    refuse_double_backward("preference_loss")
    x, params = ctx.saved_tensors
    backward = registry.operator("preference_loss", "backward", "triton")
    grad_inputs = backward(grad_loss.contiguous(), x, params, *ctx.options)
    return input_gradients("preference_loss_forward_triton", inputs=grad_inputs)


def load(backend: str) -> None:
    """Register the operators of ``backend`` (called once per process by ``dpo_fast.registry``);
    the ``"torch"`` backend has none."""
    if backend != "triton":
        return
    from ..kernels import preference_loss as kernels

    _loaded["triton"] = kernels
    triton_op("preference_loss_forward_triton", kernels.preference_loss_forward, _forward_fake)
    triton_op("preference_loss_backward_triton", kernels.preference_loss_backward, _backward_fake)
    torch.library.register_autograd(
        "dpo_fast::preference_loss_forward_triton", _backward, setup_context=_setup_context
    )
