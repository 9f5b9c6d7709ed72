"""Liger-Kernel's preference losses on dpo_fast's kernels: switch by changing the import.

``liger_kernel.chunked_loss`` (0.8.5) names, with Liger's constructor arguments and defaults,
attributes, ``forward`` / ``apply`` argument names and positions, validation at construction,
return structure and metric definitions::

    from dpo_fast.integrations.liger import LigerFusedLinearDPOLoss   # was liger_kernel.chunked_loss

- modules ``LigerFusedLinearDPOLoss``, ``LigerFusedLinearCPOLoss``,
  ``LigerFusedLinearSimPOLoss``, ``LigerFusedLinearORPOLoss``;
- autograd Functions ``LigerFusedLinear{DPO,CPO,SimPO,ORPO}Function`` (``.apply`` with Liger's
  positional arguments);
- functional forms ``liger_fused_linear_{dpo,cpo,simpo,orpo}``.

Each call returns ``(loss, aux)``: ``aux`` is ``(chosen_logps, rejected_logps,
chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards)`` and for
ORPO also ``log_odds_ratio, log_odds_chosen``, all detached. As Liger defines them: the
logits means average over every position of the chosen (rejected) rows and the whole
vocabulary, padding included; ``nll_loss`` is the chosen rows' token-mean NLL, 0.0 without
``compute_nll_loss``; the loss is ``alpha * nll_loss`` plus the preference loss.

Underneath, the log-probs come from :func:`dpo_fast.linear_sequence_logprobs` (the lm_head
tiled over tokens: no ``[tokens, V]`` logits) and the loss, rewards and ORPO's log-odds from
:func:`dpo_fast.preference_loss`. The logits means need no logits either: the mean over the
vocabulary of ``h . W[j] + b[j]`` is ``h . mean_j(W[j]) + mean(b)``. Like Liger's, a Function
computes the gradients in its forward and scales them in backward; ``compiled`` and
``chunk_size`` are accepted and stored (our tiles are sized by memory, over tokens). Float64
inputs run in float32, where Liger computes its log-softmax too.
"""

from __future__ import annotations

import functools

import torch

from ..linear_logprobs import linear_sequence_logprobs
from ..preference_loss import PreferenceLossSpec, preference_loss

__all__ = [
    "LigerFusedLinearCPOFunction",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearDPOFunction",
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearORPOFunction",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearSimPOFunction",
    "LigerFusedLinearSimPOLoss",
    "liger_fused_linear_cpo",
    "liger_fused_linear_dpo",
    "liger_fused_linear_orpo",
    "liger_fused_linear_simpo",
]

# the DPO variants Liger's DPO loss implements (its ipo needs token counts it does not have)
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
)


def check_dpo_options(loss_type: str, label_smoothing: float) -> None:
    """Liger's construction-time checks, with its messages (its tests match them)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unsupported loss_type: {loss_type}. Supported types are: {set(DPO_LOSS_TYPES)}")
    if loss_type == "exo_pair" and label_smoothing <= 0.0:
        raise ValueError(
            "label_smoothing must be > 0 for loss_type='exo_pair'. The EXO paper recommends 1e-3."
        )
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. Got {label_smoothing}."
        )


@functools.lru_cache(maxsize=64)
def loss_spec(
    kind: str,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    gamma: float = 0.5,
) -> PreferenceLossSpec:
    """The validated :class:`dpo_fast.PreferenceLossSpec` of a Liger loss (built once per
    option set: modules build it at construction, the Functions find it cached)."""
    if kind == "dpo":
        check_dpo_options(loss_type, label_smoothing)
        # Liger's other DPO variants take no label smoothing (its sigmoid is not cDPO)
        smoothing = label_smoothing if loss_type in ("robust", "exo_pair") else 0.0
        return PreferenceLossSpec(
            loss_type=loss_type, beta=beta, label_smoothing=smoothing, discopop_tau=discopop_tau
        )
    if kind == "simpo":
        return PreferenceLossSpec(
            loss_type="simpo", beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma
        )
    if kind == "cpo":
        return PreferenceLossSpec(loss_type="cpo", beta=beta, label_smoothing=label_smoothing)
    return PreferenceLossSpec(loss_type="orpo", beta=beta)


def _check_inputs(_input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(_input, torch.Tensor) or _input.dim() != 3 or _input.shape[0] % 2 or not len(_input):
        shape = tuple(_input.shape) if isinstance(_input, torch.Tensor) else type(_input).__name__
        raise ValueError(f"_input must be (2B, T, H): B chosen rows then B rejected rows, got {shape}")
    if not isinstance(target, torch.Tensor) or target.shape != _input.shape[:2]:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must be (2B, T) = {tuple(_input.shape[:2])}, got {shape}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != _input.shape[2]:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be (V, H) with H = {_input.shape[2]}, got {shape}")


def _fp32_if_double(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Our kernels take half and single precision: float64 runs in float32 (autograd casts back)."""
    return tensor.float() if tensor is not None and tensor.dtype == torch.float64 else tensor


def _sequence_logps(hidden, weight, bias, labels, ignore_index) -> tuple[torch.Tensor, torch.Tensor]:
    sums, counts, _ = linear_sequence_logprobs(
        _fp32_if_double(hidden),
        _fp32_if_double(weight),
        labels,
        bias=_fp32_if_double(bias),
        ignore_index=ignore_index,
    )
    return sums, counts


@torch.no_grad()
def _logits_mean(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Mean logit over every position of ``hidden`` ``(B, T, H)`` and the whole vocabulary,
    without logits: ``mean(h . mean_j W[j]) + mean(b)`` (fp32 ``()``)."""
    mean = (hidden.float() @ weight.float().mean(0)).mean()
    return mean if bias is None else mean + bias.float().mean()


def _preference_head(
    kind: str,
    _input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ref_input: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    nll_target: torch.Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    alpha: float = 1.0,
    compute_nll_loss: bool = False,
    use_ref_model: bool = False,
    average_log_prob: bool = False,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Liger's loss and aux outputs for ``kind`` in ``("dpo", "cpo", "simpo", "orpo")``,
    differentiable in ``_input``, ``weight`` and ``bias``."""
    spec = loss_spec(kind, beta, loss_type, label_smoothing, discopop_tau, gamma)  # before any work
    _check_inputs(_input, weight, target)
    P = _input.shape[0] // 2
    sums, counts = _sequence_logps(_input, weight, bias, target, ignore_index)
    lengths = counts.clamp(min=1)
    means = sums / counts  # Liger's average: 0/0 = nan for a row without a scored token

    nll = sums.new_zeros(())
    if compute_nll_loss:
        if nll_target is None:
            nll = -sums[:P].sum() / counts[:P].sum()
        else:
            nll_sums, nll_counts = _sequence_logps(_input[:P], weight, bias, nll_target[:P], ignore_index)
            nll = -nll_sums.sum() / nll_counts.sum()

    refs = (None, None)
    if kind == "dpo":
        if use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ValueError("use_ref_model=True needs ref_input and ref_weight (the reference lm_head)")
            with torch.no_grad():
                ref_sums, ref_counts = _sequence_logps(ref_input, ref_weight, ref_bias, target, ignore_index)
            ref = ref_sums / ref_counts if average_log_prob else ref_sums
            refs = (ref[:P], ref[P:])
        else:
            zeros = sums.new_zeros(P)
            refs = (zeros, zeros)

    if kind in ("simpo", "orpo"):
        # always on mean token log-probs: ours takes sums and counts and divides
        seen, loss_lengths = sums, lengths
    else:
        seen, loss_lengths = (means if average_log_prob else sums), None
    out = preference_loss(
        seen[:P],
        seen[P:],
        *refs,
        chosen_lengths=None if loss_lengths is None else loss_lengths[:P],
        rejected_lengths=None if loss_lengths is None else loss_lengths[P:],
        chosen_nll=nll if kind == "orpo" else None,
        spec=spec,
    )
    loss = out.loss if kind == "orpo" else out.loss + alpha * nll
    logps = (means if kind in ("simpo", "orpo") or average_log_prob else sums).detach()
    aux = (
        logps[:P],
        logps[P:],
        _logits_mean(_input[:P], weight, bias),
        _logits_mean(_input[P:], weight, bias),
        nll.detach(),
        out.chosen_rewards,
        out.rejected_rewards,
    )
    if kind == "orpo":
        aux += (out.metrics["log_odds_ratio"], out.metrics["log_odds_chosen"])
    return loss, aux


def _fused_forward(ctx, kind: str, _input, weight, target, bias, **options):
    """Liger's pattern: the loss and its gradients at once; backward only scales them."""
    needs = (
        _input.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
    )
    leaves = [
        t.detach().requires_grad_(need) if t is not None else None
        for t, need in zip((_input, weight, bias), needs, strict=True)
    ]
    with torch.enable_grad():
        loss, aux = _preference_head(kind, leaves[0], leaves[1], target, leaves[2], **options)
    wanted = [leaf for leaf, need in zip(leaves, needs, strict=True) if need]
    grads = iter(torch.autograd.grad(loss, wanted) if wanted else ())
    ctx.grads = [next(grads) if need else None for need in needs]
    return loss.detach(), aux


def _fused_backward(ctx, grad_loss, num_inputs: int) -> tuple:
    grad_input, grad_weight, grad_bias = (None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads)
    return (grad_input, grad_weight, None, grad_bias) + (None,) * (num_inputs - 4)


class LigerFusedLinearDPOFunction(torch.autograd.Function):
    """Liger's ``LigerFusedLinearDPOFunction``: ``apply(_input, weight, target, bias, ref_input,
    ref_weight, ref_bias, ignore_index, beta, compute_nll_loss, compiled, use_ref_model,
    average_log_prob, chunk_size, loss_type, label_smoothing, discopop_tau, alpha)``."""

    @staticmethod
    def forward(
        ctx,
        _input,
        weight,
        target,
        bias=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        ignore_index=-100,
        beta=0.1,
        compute_nll_loss=False,
        compiled=True,
        use_ref_model=True,
        average_log_prob=False,
        chunk_size=1,
        loss_type="sigmoid",
        label_smoothing=0.0,
        discopop_tau=0.05,
        alpha=1.0,
    ):
        return _fused_forward(
            ctx,
            "dpo",
            _input,
            weight,
            target,
            bias,
            ref_input=ref_input,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            ignore_index=ignore_index,
            beta=beta,
            alpha=alpha,
            compute_nll_loss=compute_nll_loss,
            use_ref_model=use_ref_model,
            average_log_prob=average_log_prob,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            discopop_tau=discopop_tau,
        )

    @staticmethod
    def backward(ctx, grad_loss, *_):
        return _fused_backward(ctx, grad_loss, 18)


class LigerFusedLinearCPOFunction(torch.autograd.Function):
    """Liger's ``LigerFusedLinearCPOFunction``: ``apply(_input, weight, target, bias,
    ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled, average_log_prob,
    chunk_size)``."""

    @staticmethod
    def forward(
        ctx,
        _input,
        weight,
        target,
        bias=None,
        ignore_index=-100,
        beta=0.1,
        alpha=1.0,
        label_smoothing=0.0,
        compute_nll_loss=True,
        compiled=True,
        average_log_prob=False,
        chunk_size=1,
    ):
        return _fused_forward(
            ctx,
            "cpo",
            _input,
            weight,
            target,
            bias,
            ignore_index=ignore_index,
            beta=beta,
            alpha=alpha,
            label_smoothing=label_smoothing,
            compute_nll_loss=compute_nll_loss,
            average_log_prob=average_log_prob,
        )

    @staticmethod
    def backward(ctx, grad_loss, *_):
        return _fused_backward(ctx, grad_loss, 12)


class LigerFusedLinearSimPOFunction(torch.autograd.Function):
    """Liger's ``LigerFusedLinearSimPOFunction``: ``apply(_input, weight, target, bias,
    ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled, gamma,
    chunk_size)``; on mean token log-probs."""

    @staticmethod
    def forward(
        ctx,
        _input,
        weight,
        target,
        bias=None,
        ignore_index=-100,
        beta=0.1,
        alpha=1.0,
        label_smoothing=0.0,
        compute_nll_loss=False,
        compiled=True,
        gamma=0.5,
        chunk_size=1,
    ):
        return _fused_forward(
            ctx,
            "simpo",
            _input,
            weight,
            target,
            bias,
            ignore_index=ignore_index,
            beta=beta,
            alpha=alpha,
            label_smoothing=label_smoothing,
            compute_nll_loss=compute_nll_loss,
            gamma=gamma,
        )

    @staticmethod
    def backward(ctx, grad_loss, *_):
        return _fused_backward(ctx, grad_loss, 12)


class LigerFusedLinearORPOFunction(torch.autograd.Function):
    """Liger's ``LigerFusedLinearORPOFunction``: ``apply(_input, weight, target, bias,
    ignore_index, beta, compute_nll_loss, nll_target, compiled, chunk_size)``; on mean token
    log-probs, the NLL of ``nll_target`` (default ``target``) when given."""

    @staticmethod
    def forward(
        ctx,
        _input,
        weight,
        target,
        bias=None,
        ignore_index=-100,
        beta=0.1,
        compute_nll_loss=True,
        nll_target=None,
        compiled=True,
        chunk_size=1,
    ):
        return _fused_forward(
            ctx,
            "orpo",
            _input,
            weight,
            target,
            bias,
            ignore_index=ignore_index,
            beta=beta,
            compute_nll_loss=compute_nll_loss,
            nll_target=nll_target,
        )

    @staticmethod
    def backward(ctx, grad_loss, *_):
        return _fused_backward(ctx, grad_loss, 10)


liger_fused_linear_dpo = LigerFusedLinearDPOFunction.apply
liger_fused_linear_cpo = LigerFusedLinearCPOFunction.apply
liger_fused_linear_simpo = LigerFusedLinearSimPOFunction.apply
liger_fused_linear_orpo = LigerFusedLinearORPOFunction.apply


class LigerFusedLinearDPOLoss(torch.nn.Module):
    """Liger's ``LigerFusedLinearDPOLoss``: ``forward(lin_weight, _input, target, bias=None,
    ref_input=None, ref_weight=None, ref_bias=None) -> (loss, aux)`` (see the module doc).

    ``use_ref_model=False`` scores against a reference of log-prob 0 and ignores any
    reference inputs, as Liger does.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
    ):
        super().__init__()
        loss_spec("dpo", beta, loss_type, label_smoothing, discopop_tau)  # Liger's checks, then ours
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        return LigerFusedLinearDPOFunction.apply(
            _input,
            lin_weight,
            target,
            bias,
            ref_input,
            ref_weight,
            ref_bias,
            self.ignore_index,
            self.beta,
            self.compute_nll_loss,
            self.compiled,
            self.use_ref_model,
            self.average_log_prob,
            self.chunk_size,
            self.loss_type,
            self.label_smoothing,
            self.discopop_tau,
            self.alpha,
        )


class LigerFusedLinearCPOLoss(torch.nn.Module):
    """Liger's ``LigerFusedLinearCPOLoss``: ``forward(lin_weight, _input, target, bias=None)``."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
    ):
        super().__init__()
        loss_spec("cpo", beta, label_smoothing=label_smoothing)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size

    def forward(self, lin_weight, _input, target, bias=None):
        return LigerFusedLinearCPOFunction.apply(
            _input,
            lin_weight,
            target,
            bias,
            self.ignore_index,
            self.beta,
            self.alpha,
            self.label_smoothing,
            self.compute_nll_loss,
            self.compiled,
            self.average_log_prob,
            self.chunk_size,
        )


class LigerFusedLinearSimPOLoss(torch.nn.Module):
    """Liger's ``LigerFusedLinearSimPOLoss``: ``forward(lin_weight, _input, target, bias=None)``."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        label_smoothing: float = 0.0,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        gamma: float = 0.5,
        chunk_size: int = 1,
    ):
        super().__init__()
        loss_spec("simpo", beta, label_smoothing=label_smoothing, gamma=gamma)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.label_smoothing = label_smoothing
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.gamma = gamma
        self.chunk_size = chunk_size

    def forward(self, lin_weight, _input, target, bias=None):
        return LigerFusedLinearSimPOFunction.apply(
            _input,
            lin_weight,
            target,
            bias,
            self.ignore_index,
            self.beta,
            self.alpha,
            self.label_smoothing,
            self.compute_nll_loss,
            self.compiled,
            self.gamma,
            self.chunk_size,
        )


class LigerFusedLinearORPOLoss(torch.nn.Module):
    """Liger's ``LigerFusedLinearORPOLoss``: ``forward(lin_weight, _input, target, bias=None,
    nll_target=None)``; aux has ORPO's ``log_odds_ratio`` and ``log_odds_chosen`` last."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        compute_nll_loss: bool = True,
        compiled: bool = True,
        chunk_size: int = 1,
    ):
        super().__init__()
        loss_spec("orpo", beta)
        self.ignore_index = ignore_index
        self.beta = beta
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.chunk_size = chunk_size

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        return LigerFusedLinearORPOFunction.apply(
            _input,
            lin_weight,
            target,
            bias,
            self.ignore_index,
            self.beta,
            self.compute_nll_loss,
            nll_target,
            self.compiled,
            self.chunk_size,
        )
