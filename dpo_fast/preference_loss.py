"""Preference losses of the DPO family, from per-sequence log-probs to a loss and TRL's metrics.

Data flow: validate -> the batch-coupled parts in PyTorch (the sorts of ``aot`` and
``aot_unpaired``, the token count of ``sft``) -> a backend computes the per-pair
arithmetic of every loss type in the list:

* ``"triton"``: ``dpo_fast.kernels.preference_loss``, one launch forward (loss, rewards and
  all metrics) and one backward, through the autograd function :class:`_PreferenceLoss`;
* ``"torch"``: :func:`pair_losses`, the formulas below differentiated by autograd. It is
  also THE reference: the tests run it in float64 and compare it with TRL itself.

Nothing reads a value on the host, so the op composes with CUDA graphs and ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import registry
from .constants import (
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    LOSS_TYPES,
    NEEDS_LENGTHS,
    REDUCTIONS,
    REFERENCE_FREE,
    REWARD_KINDS,
)

LOGP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# f-divergence exponents are clamped here (TRL clamps the alpha-divergence's in fp32 alike).
EXP_CLAMP = 80.0


class PreferenceLossOutput(NamedTuple):
    """What :func:`preference_loss` returns.

    Attributes:
        loss: fp32, ``()`` (``(P,)`` with ``reduction="none"``); differentiable w.r.t. the
            policy log-probs (and ``chosen_nll``).
        chosen_rewards, rejected_rewards: fp32 ``(P,)``, detached: ``beta`` times the
            log-ratio (reference-based losses), the summed policy log-prob (``cpo``) or the
            mean token log-prob (``simpo``, ``orpo``), as TRL's trainers define them.
        metrics: ``{name: fp32 ()}`` with TRL's names, each a mean over the pairs:
            ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
            ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; plus ``nll_loss`` when
            ``chosen_nll`` is given and ``log_odds_ratio``, ``log_odds_chosen`` for ``orpo``.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Spec:
    """A validated call: loss weights and every scalar option."""

    weights: dict[str, float]
    beta: float
    label_smoothing: float
    discopop_tau: float
    simpo_gamma: float
    f_divergence: str
    f_alpha: float
    bco_delta: float | torch.Tensor
    rewards: str
    reduction: str

    def kernel_options(self) -> dict:
        fdiv = self.f_divergence
        # alpha -> 1 is the reverse-KL limit; TRL switches at the same tolerance
        if fdiv == "alpha_divergence" and abs(self.f_alpha - 1.0) < 1e-6:
            fdiv = "reverse_kl"
        return {
            "beta": self.beta,
            "label_smoothing": self.label_smoothing,
            "discopop_tau": self.discopop_tau,
            "simpo_gamma": self.simpo_gamma,
            "f_alpha": self.f_alpha,
            "fdiv": F_DIVERGENCES.index(fdiv),
            "bco_delta": self.bco_delta,
        }


# ----------------------------------------------------------------------------------------------
# The reference: one PyTorch statement of each formula (TRL 1.16's DPOTrainer, CPOTrainer and
# ORPOTrainer), in the inputs' dtype. The Triton kernels implement the same math with
# hand-written derivatives.
# ----------------------------------------------------------------------------------------------


def f_divergence_scores(log_ratio: torch.Tensor, f_divergence: str, f_alpha: float) -> torch.Tensor:
    """f'(pi / pi_ref) of the f-divergence, as a function of the log-ratio (f-DPO)."""
    if f_divergence == "forward_kl":
        # f'(t) = 1 - 1/t; TRL's exp(-x) overflows for x < -88, the clamp keeps it finite
        return 1 - torch.exp(torch.clamp(-log_ratio, max=EXP_CLAMP))
    if f_divergence == "js_divergence":
        # f'(t) = log(2t / (t + 1)) = log 2 + logsigmoid(log t)
        return math.log(2) + F.logsigmoid(log_ratio)
    if f_divergence == "alpha_divergence" and abs(f_alpha - 1.0) >= 1e-6:
        # f'(t) = (t^(alpha - 1) - 1) / (alpha - 1)
        t = torch.clamp((f_alpha - 1.0) * log_ratio, max=EXP_CLAMP)
        return (torch.exp(t) - 1.0) / (f_alpha - 1.0)
    return log_ratio


def aot_delta(c: torch.Tensor, r: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """AOT (paired): sorted policy log-ratios minus sorted reference log-ratios, ``(P,)``.

    The sort couples the pairs, so this part always runs in PyTorch (autograd
    differentiates the sort); the kernels take its output as one more per-pair input.
    """
    return torch.sort(c - r, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]


def aot_unpaired_delta(c: torch.Tensor, r: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """AOT (unpaired): sorted chosen log-ratios minus sorted rejected log-ratios, ``(P,)``."""
    return torch.sort(c - rc, dim=0)[0] - torch.sort(r - rr, dim=0)[0]


def sft_scale(chosen_lengths: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """``P / chosen tokens`` (fp32 ``()``): TRL's SFT term, the token mean of the chosen NLL,
    is ``sum_i -chosen_logps_i * P / tokens`` averaged over pairs."""
    return num_pairs / chosen_lengths.to(torch.float32).sum().clamp(min=1.0)


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    # DPO's logistic loss; label smoothing eps gives cDPO (TRL <= 0.28, OpenRLHF)
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    # log(1 - exp(a)), branching at -ln 2 as TRL's ORPO does
    return torch.where(a < -math.log(2), torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(a)))


def pair_loss_terms(
    c: torch.Tensor,
    r: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    lc: torch.Tensor,
    lr: torch.Tensor,
    nll: torch.Tensor,
    sft: torch.Tensor | None,
    spec: _Spec,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-pair loss of every type in ``spec.weights`` (unweighted) and ORPO's log-odds.

    Args:
        c, r: policy log-probs ``(P,)``; rc, rr: reference log-probs (zeros when absent);
        lc, lr: token counts clamped to >= 1 (ones when absent); nll: the chosen NLL ``(P,)``
        (zeros when absent); sft: :func:`sft_scale` of the unclamped counts (for ``sft``).
        All the same floating dtype, in which the math runs.
    Returns:
        ``({loss_type: (P,)}, {"log_odds": (P,), "log_odds_ratio": (P,)})`` (the second
        empty without ``orpo``).
    """
    beta, eps = spec.beta, spec.label_smoothing
    xc, xr = c - rc, r - rr
    sc = f_divergence_scores(xc, spec.f_divergence, spec.f_alpha)
    sr = f_divergence_scores(xr, spec.f_divergence, spec.f_alpha)
    z = beta * (sc - sr)
    terms: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for name in spec.weights:
        if name == "sigmoid":
            terms[name] = _smoothed_logistic(z, eps)
        elif name == "hinge":
            terms[name] = torch.relu(1 - z)
        elif name == "ipo":
            # TRL normalizes by the completion token counts (confirmed with the IPO authors)
            terms[name] = (sc / lc - sr / lr - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            qw, ql = torch.sigmoid(z), torch.sigmoid(-z)
            terms[name] = qw * (F.logsigmoid(z) - math.log1p(-eps)) + ql * (F.logsigmoid(-z) - math.log(eps))
        elif name == "nca_pair":
            a, b = beta * xc, beta * xr
            terms[name] = -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
        elif name == "robust":
            terms[name] = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif name == "bco_pair":
            delta = spec.bco_delta
            terms[name] = -F.logsigmoid(beta * xc - delta) - F.logsigmoid(-(beta * xr - delta))
        elif name == "sppo_hard":
            terms[name] = (xc - 0.5 / beta) ** 2 + (xr + 0.5 / beta) ** 2
        elif name == "aot":
            terms[name] = _smoothed_logistic(beta * aot_delta(c, r, rc, rr), eps)
        elif name == "aot_unpaired":
            terms[name] = _smoothed_logistic(beta * aot_unpaired_delta(c, r, rc, rr), eps)
        elif name == "apo_zero":
            terms[name] = 1 - torch.sigmoid(beta * xc) + torch.sigmoid(beta * xr)
        elif name == "apo_down":
            terms[name] = torch.sigmoid(beta * xc) + 1 - torch.sigmoid(beta * (xc - xr))
        elif name == "discopop":
            # TRL's -logsigmoid(z) (1 - m) + exp(-z) m with m = sigmoid(z / tau), written so that
            # exp(-z) never overflows alone (inf * 0 = nan for z << 0)
            tau = spec.discopop_tau
            terms[name] = -F.logsigmoid(z) * torch.sigmoid(-z / tau) + torch.exp(-z + F.logsigmoid(z / tau))
        elif name == "sigmoid_norm":
            terms[name] = -F.logsigmoid(beta * (sc / lc - sr / lr))
        elif name == "sft":
            terms[name] = -c * sft
        elif name == "simpo":
            terms[name] = _smoothed_logistic(beta * ((c / lc - r / lr) - spec.simpo_gamma / beta), eps)
        elif name == "cpo":
            terms[name] = _smoothed_logistic(beta * (c - r), eps) + nll
        elif name == "orpo":
            ac, ar = c / lc, r / lr
            log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
            extras = {"log_odds": log_odds, "log_odds_ratio": F.logsigmoid(log_odds)}
            terms[name] = nll - beta * extras["log_odds_ratio"]
    return terms, extras


def seen_logps(
    c: torch.Tensor,
    r: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    lc: torch.Tensor,
    lr: torch.Tensor,
    rewards: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chosen_rewards / beta, rejected_rewards / beta, logps/chosen, logps/rejected)`` per pair."""
    if rewards == "log_ratio":
        return c - rc, r - rr, c, r
    if rewards == "policy_mean":
        return c / lc, r / lr, c / lc, r / lr
    return c, r, c, r


def pair_losses(
    c: torch.Tensor,
    r: torch.Tensor,
    rc: torch.Tensor | None,
    rr: torch.Tensor | None,
    lc: torch.Tensor | None,
    lr: torch.Tensor | None,
    nll: torch.Tensor | None,
    spec: _Spec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The whole op in PyTorch: ``(loss, chosen_rewards, rejected_rewards, metrics)``.

    Runs in ``c``'s dtype, promoted to at least fp32 (the tests pass float64); ``nll`` is
    ``(P,)`` (a batch scalar expanded) or None.
    """
    dtype = torch.promote_types(c.dtype, torch.float32)
    c, r = c.to(dtype), r.to(dtype)
    rc = torch.zeros_like(c) if rc is None else rc.detach().to(dtype)
    rr = torch.zeros_like(r) if rr is None else rr.detach().to(dtype)
    sft = None if lc is None else sft_scale(lc, c.shape[0]).to(dtype)
    lc = torch.ones_like(c) if lc is None else lc.to(dtype).clamp(min=1)
    lr = torch.ones_like(r) if lr is None else lr.to(dtype).clamp(min=1)
    nll_values = torch.zeros_like(c) if nll is None else nll.to(dtype)
    terms, extras = pair_loss_terms(c, r, rc, rr, lc, lr, nll_values, sft, spec)
    per_pair = sum(spec.weights[name] * terms[name] for name in spec.weights)
    loss = {"mean": per_pair.mean, "sum": per_pair.sum, "none": lambda: per_pair}[spec.reduction]()
    with torch.no_grad():
        ratio_c, ratio_r, logps_c, logps_r = seen_logps(c, r, rc, rr, lc, lr, spec.rewards)
        chosen_rewards, rejected_rewards = spec.beta * ratio_c, spec.beta * ratio_r
        stats = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(dtype).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": logps_c.mean(),
            "logps/rejected": logps_r.mean(),
            "nll_loss": nll_values.mean(),
            "log_odds_ratio": extras["log_odds_ratio"].mean() if extras else None,
            "log_odds_chosen": extras["log_odds"].mean() if extras else None,
        }
    return loss, chosen_rewards, rejected_rewards, _select_metrics(stats, spec, nll is not None)


def _select_metrics(stats: dict, spec: _Spec, has_nll: bool) -> dict[str, torch.Tensor]:
    """The metrics this call reports (TRL's trainers report ORPO's and the NLL only with them)."""
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
    names += ["logps/chosen", "logps/rejected"]
    if has_nll:
        names.append("nll_loss")
    if "orpo" in spec.weights:
        names += ["log_odds_ratio", "log_odds_chosen"]
    return {name: stats[name] for name in names}


# ----------------------------------------------------------------------------------------------
# The Triton path.
# ----------------------------------------------------------------------------------------------


class _PreferenceLoss(torch.autograd.Function):
    """One kernel launch forward, one backward; gradients for the policy log-probs, the chosen
    NLL and the sorted AOT deltas (autograd carries those through the sort)."""

    @staticmethod
    def forward(ctx, c, r, nll, aot, aot_unpaired, constants, spec, kernels):
        inputs = _kernel_inputs(c, r, nll, aot, aot_unpaired, constants)
        options = spec.kernel_options()
        loss, chosen_rewards, rejected_rewards, stats = kernels.preference_forward(
            inputs, spec.weights, options, rewards=REWARD_KINDS.index(spec.rewards), reduction=spec.reduction
        )
        ctx.save_for_backward(c, r, nll, aot, aot_unpaired, *constants)
        ctx.spec, ctx.kernels = spec, kernels
        ctx.mark_non_differentiable(chosen_rewards, rejected_rewards, stats)
        return loss, chosen_rewards, rejected_rewards, stats

    @staticmethod
    def backward(ctx, grad_loss, *_):
        c, r, nll, aot, aot_unpaired, *constants = ctx.saved_tensors
        spec = ctx.spec
        inputs = _kernel_inputs(c, r, nll, aot, aot_unpaired, constants)
        grads = ctx.kernels.preference_backward(
            grad_loss.contiguous(), inputs, spec.weights, spec.kernel_options(), reduction=spec.reduction
        )
        needed = ctx.needs_input_grad
        names = ("chosen", "rejected", "nll", "aot", "aot_unpaired")
        return *(grads[n] if needed[i] else None for i, n in enumerate(names)), None, None, None


def _kernel_inputs(c, r, nll, aot, aot_unpaired, constants) -> dict[str, torch.Tensor | None]:
    rc, rr, lc, lr, scale = constants
    return {
        "chosen": c,
        "rejected": r,
        "ref_chosen": rc,
        "ref_rejected": rr,
        "chosen_lengths": lc,
        "rejected_lengths": lr,
        "nll": nll,
        "aot": aot,
        "aot_unpaired": aot_unpaired,
        "sft_scale": scale,
    }


# torch.compile runs this eagerly (a graph break): the kernels' compile-time weights and the
# interpreter used on CPU are not traceable, and one launch gains nothing from fusion.
@torch.compiler.disable
def _triton_preference_loss(c, r, rc, rr, lc, lr, nll, spec: _Spec):
    from .kernels import preference_loss as kernels

    P = c.shape[0]
    # the batch-coupled parts, in PyTorch: sorts for AOT, the chosen token count for SFT
    aot = aot_unpaired = scale = None
    if "aot" in spec.weights or "aot_unpaired" in spec.weights:
        f32 = [t.float() for t in (c, r, rc, rr)]
        if "aot" in spec.weights:
            aot = aot_delta(*f32).contiguous()
        if "aot_unpaired" in spec.weights:
            aot_unpaired = aot_unpaired_delta(*f32).contiguous()
    if "sft" in spec.weights:
        scale = sft_scale(lc, P)
    if rc is not None:
        rc, rr = rc.detach(), rr.detach()
    constants = (rc, rr, lc, lr, scale)
    differentiable = (c, r, nll, aot, aot_unpaired)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        loss, chosen_rewards, rejected_rewards, stats = _PreferenceLoss.apply(
            *differentiable, constants, spec, kernels
        )
    else:
        inputs = _kernel_inputs(*differentiable, constants)
        loss, chosen_rewards, rejected_rewards, stats = kernels.preference_forward(
            inputs,
            spec.weights,
            spec.kernel_options(),
            rewards=REWARD_KINDS.index(spec.rewards),
            reduction=spec.reduction,
        )
    named = dict(zip(kernels.STATS, stats.unbind(0), strict=True))
    return loss, chosen_rewards, rejected_rewards, _select_metrics(named, spec, nll is not None)


# ----------------------------------------------------------------------------------------------
# The public op.
# ----------------------------------------------------------------------------------------------


def _check_float(name: str, tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in LOGP_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {tensor.dtype}")


def _check_pairs(name: str, tensor: object, like: torch.Tensor | None, real: bool = False) -> None:
    """A ``(P,)`` tensor matching ``like`` (shape, device); float (any real dtype if ``real``)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if real:
        if tensor.dtype == torch.bool or tensor.dtype.is_complex:
            raise TypeError(
                f"{name} must be an integer or float tensor of token counts, got dtype {tensor.dtype}"
            )
    else:
        _check_float(name, tensor)
    if like is None:
        if tensor.dim() != 1 or tensor.shape[0] == 0:
            raise ValueError(f"{name} must have shape (P,) with P >= 1 pairs, got {tuple(tensor.shape)}")
        return
    if tensor.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of chosen_logps {tuple(like.shape)}, got {tuple(tensor.shape)}"
        )
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device} but chosen_logps is on {like.device}")


def _loss_weights(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None) -> dict[str, float]:
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError(f"loss_type must name at least one loss from {LOSS_TYPES}, got an empty list")
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown[0]!r}; valid loss types are {LOSS_TYPES}")
    if loss_weights is None:
        loss_weights = [1.0] * len(types)
    loss_weights = [float(w) for w in loss_weights]
    if len(loss_weights) != len(types):
        raise ValueError(
            f"loss_weights must have one weight per loss type ({len(types)} for {types}), "
            f"got {len(loss_weights)}"
        )
    if not all(math.isfinite(w) for w in loss_weights):
        raise ValueError(f"loss_weights must be finite, got {loss_weights}")
    weights: dict[str, float] = {}
    for name, w in zip(types, loss_weights, strict=True):
        weights[name] = weights.get(name, 0.0) + w
    return weights


def _check_options(weights: dict[str, float], beta, label_smoothing, f_divergence, f_alpha, tau, reduction):
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    eps = label_smoothing
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {eps}")
    if "exo_pair" in weights and not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1) (the EXO paper uses 1e-3), got {eps}")
    if "robust" in weights and not eps < 0.5:
        raise ValueError(f"robust needs label_smoothing in [0, 0.5), got {eps}")
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {f_divergence!r}")
    unsupported = sorted(set(weights) - F_DIVERGENCE_LOSS_TYPES)
    if f_divergence != "reverse_kl" and unsupported:
        raise ValueError(
            f"f_divergence={f_divergence!r} is only defined for {sorted(F_DIVERGENCE_LOSS_TYPES)}; "
            f"got loss types {unsupported}"
        )
    if not math.isfinite(f_alpha):
        raise ValueError(f"f_alpha must be finite, got {f_alpha}")
    if "discopop" in weights and not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"discopop_tau must be > 0, got {tau}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reward_kind(weights: dict[str, float], has_ref: bool) -> str:
    """How rewards are defined for this list; mixtures must agree (see ``preference_loss``)."""
    kinds = set()
    for name in weights:
        if name in ("simpo", "orpo"):
            kinds.add("policy_mean")
        elif name == "cpo":
            kinds.add("policy_sum")
        elif name != "sft":
            kinds.add("log_ratio")
    if len(kinds) > 1:
        raise ValueError(
            f"loss types {sorted(weights)} define rewards differently (reference log-ratios for the DPO "
            "family, summed policy log-probs for cpo, mean token log-probs for simpo and orpo); "
            "combine only losses of one kind"
        )
    kind = kinds.pop() if kinds else "log_ratio"
    if kind != "log_ratio" and has_ref:
        raise ValueError(
            f"{sorted(weights)} are reference-free losses: "
            "pass ref_chosen_logps=None and ref_rejected_logps=None"
        )
    return kind


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    discopop_tau: float = 0.05,
    simpo_gamma: float = 0.5,
    reduction: str = "mean",
    chosen_nll: torch.Tensor | None = None,
    bco_delta: float | torch.Tensor = 0.0,
    backend: str = "auto",
) -> PreferenceLossOutput:
    """Preference loss of the DPO family from per-sequence log-probs, with TRL's metrics.

    The formulas are TRL 1.16's (``DPOTrainer`` for the DPO family, ``CPOTrainer`` for
    ``cpo``/``simpo``, ``ORPOTrainer`` for ``orpo``), computed in fp32 whatever the inputs'
    dtype (the torch backend computes float64 inputs in float64: the tests' oracle).
    Gradients flow to ``chosen_logps``, ``rejected_logps`` and ``chosen_nll`` only; the
    references and lengths are constants. No value is read on the host.

    Args:
        chosen_logps, rejected_logps: ``(P,)`` float16/bfloat16/float32/float64 summed
            log-probs of the chosen / rejected completions (sums over completion tokens).
        ref_chosen_logps, ref_rejected_logps: ``(P,)`` the reference model's; required by every
            loss except the reference-free ``simpo``, ``cpo``, ``orpo`` (which reject them)
            and ``sft``.
        loss_type: one of :data:`LOSS_TYPES` or a list of them (TRL's MPO-style mixture, e.g.
            ``["sigmoid", "bco_pair", "sft"]``): the loss is the weighted sum of the types'
            losses.

            * ``sigmoid``: DPO; with ``label_smoothing > 0`` it is cDPO (TRL <= 0.28, OpenRLHF).
            * ``hinge``, ``exo_pair``, ``nca_pair``, ``robust``, ``bco_pair``, ``sppo_hard``,
              ``apo_zero``, ``apo_down``, ``discopop``: as TRL.
            * ``ipo``, ``sigmoid_norm``: scores divided by the completion token counts.
            * ``aot``, ``aot_unpaired``: sort log-ratios across the batch. The sort runs in
              PyTorch (it couples the pairs); with ``reduction="none"`` their per-pair values
              are per sorted position, not per pair.
            * ``sft``: TRL's token-mean NLL of the chosen completions,
              ``-sum(chosen_logps) / sum(chosen_lengths)``; per pair (``reduction="none"``)
              ``-chosen_logps_i * P / sum(chosen_lengths)``, whose mean is that.
            * ``simpo``: reference-free, on mean token log-probs, margin ``simpo_gamma``.
            * ``cpo``: reference-free DPO on summed log-probs (TRL's CPOTrainer with
              ``loss_type="sigmoid"``), plus ``chosen_nll`` when given (scale it by
              ``cpo_alpha`` yourself; TRL's default is 1).
            * ``orpo``: ``chosen_nll - beta * logsigmoid(log odds ratio)`` of the mean token
              log-probs; needs ``chosen_nll``.
        loss_weights: one weight per entry of ``loss_type`` (default 1 each).
        beta: > 0.
        label_smoothing: in [0, 1]: cDPO's for ``sigmoid``, ``cpo``, ``simpo``, ``aot``,
            ``aot_unpaired``; the flip rate for ``robust`` (< 0.5); EXO's epsilon for
            ``exo_pair`` (> 0). Ignored by the other types.
        chosen_lengths, rejected_lengths: ``(P,)`` integer or float completion token counts
            (both or neither); required by ``ipo``, ``sigmoid_norm``, ``simpo``, ``orpo`` and
            ``sft``. Counts of 0 clamp to 1, as TRL does.
        f_divergence: ``reverse_kl`` (DPO), ``forward_kl``, ``js_divergence`` or
            ``alpha_divergence`` (f-DPO; only with ``sigmoid``, ``sigmoid_norm``, ``hinge``,
            ``ipo``, ``exo_pair``, ``robust``, ``discopop``, ``sft``, as TRL). Exponents are
            clamped at 80 (TRL clamps alpha's; its forward KL would overflow there).
        f_alpha: the alpha of ``alpha_divergence`` (|alpha - 1| < 1e-6 is the reverse KL).
        discopop_tau: DiscoPOP's temperature (> 0).
        simpo_gamma: SimPO's target reward margin.
        reduction: ``"mean"`` over pairs (TRL), ``"sum"`` or ``"none"`` (per pair).
        chosen_nll: ``()`` or ``(P,)`` float: the chosen completions' NLL (TRL's ``nll_loss``,
            a token-mean cross-entropy). Required by ``orpo``, optional for ``cpo``, rejected
            otherwise. It adds to the loss once per ``orpo``/``cpo`` entry.
        bco_delta: ``bco_pair``'s reward shift delta, a float or a 0-dim tensor:
            ``-logsigmoid(beta x_c - delta) - logsigmoid(-(beta x_r - delta))``. TRL 1.16 uses
            none (0, the default); TRL <= 0.2x shifted by a running mean of the rewards: keep
            that mean yourself (e.g. on the device) and pass it here.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``dpo_fast.registry``).

    Returns:
        :class:`PreferenceLossOutput` ``(loss, chosen_rewards, rejected_rewards, metrics)``,
        fp32 (float64 from the torch backend on float64 inputs).
        Rewards are ``beta`` times the log-ratio for the DPO family, the summed policy
        log-prob for ``cpo``, the mean token log-prob for ``simpo``/``orpo`` (TRL's trainers);
        a mixture must combine losses of one such kind (``sft`` goes with any).

    Raises:
        ValueError / TypeError: naming the argument, what it got and what was expected.
    """
    weights = _loss_weights(loss_type, loss_weights)
    _check_options(weights, beta, label_smoothing, f_divergence, f_alpha, discopop_tau, reduction)
    _check_pairs("chosen_logps", chosen_logps, None)
    _check_pairs("rejected_logps", rejected_logps, chosen_logps)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    has_ref = ref_chosen_logps is not None
    if has_ref:
        _check_pairs("ref_chosen_logps", ref_chosen_logps, chosen_logps)
        _check_pairs("ref_rejected_logps", ref_rejected_logps, chosen_logps)
    rewards = _reward_kind(weights, has_ref)
    needs_ref = sorted(set(weights) - REFERENCE_FREE)
    if needs_ref and not has_ref:
        raise ValueError(
            f"{needs_ref} need the reference log-probs: pass ref_chosen_logps and ref_rejected_logps"
        )
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is None:
        missing = sorted(set(weights) & NEEDS_LENGTHS)
        if missing:
            raise ValueError(
                f"{missing} need the completion token counts: pass chosen_lengths and rejected_lengths"
            )
    else:
        _check_pairs("chosen_lengths", chosen_lengths, chosen_logps, real=True)
        _check_pairs("rejected_lengths", rejected_lengths, chosen_logps, real=True)
    P = chosen_logps.shape[0]
    if chosen_nll is not None:
        if not set(weights) & {"orpo", "cpo"}:
            raise ValueError(f"chosen_nll is used by orpo and cpo only, got loss types {sorted(weights)}")
        _check_float("chosen_nll", chosen_nll)
        if chosen_nll.shape not in ((), (P,)):
            raise ValueError(f"chosen_nll must have shape () or ({P},), got {tuple(chosen_nll.shape)}")
        if chosen_nll.device != chosen_logps.device:
            raise ValueError(
                f"chosen_nll is on {chosen_nll.device} but chosen_logps is on {chosen_logps.device}"
            )
        chosen_nll = chosen_nll.expand(P)  # a stride-0 view; autograd sums its gradient back
    elif "orpo" in weights:
        raise ValueError("orpo needs chosen_nll, the NLL of the chosen completions")
    if isinstance(bco_delta, torch.Tensor):
        _check_float("bco_delta", bco_delta)
        if bco_delta.shape != () or bco_delta.device != chosen_logps.device:
            raise ValueError(
                f"bco_delta must be a float or a 0-dim tensor on {chosen_logps.device}, "
                f"got shape {tuple(bco_delta.shape)} on {bco_delta.device}"
            )
        bco_delta = bco_delta.detach()
    elif not math.isfinite(bco_delta):
        raise ValueError(f"bco_delta must be finite, got {bco_delta}")
    spec = _Spec(
        weights=weights,
        beta=float(beta),
        label_smoothing=float(label_smoothing),
        discopop_tau=float(discopop_tau),
        simpo_gamma=float(simpo_gamma),
        f_divergence=f_divergence,
        f_alpha=float(f_alpha),
        bco_delta=bco_delta,
        rewards=rewards,
        reduction=reduction,
    )
    args = (
        chosen_logps,
        rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths,
        rejected_lengths,
    )
    if registry.resolve("preference_loss", backend, chosen_logps.device.type) == "triton":
        return PreferenceLossOutput(*_triton_preference_loss(*args, chosen_nll, spec))
    return PreferenceLossOutput(*pair_losses(*args, chosen_nll, spec))
