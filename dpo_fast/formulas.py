"""The one PyTorch statement of the math: label log-probs and the preference losses.

Two users share it:

* the ``"torch"`` backends: ``dpo_fast.ops.logprobs`` applies :func:`rows_forward` /
  :func:`rows_backward` to one bounded chunk of rows at a time, so no more than a chunk of
  softmax is ever alive; ``dpo_fast.preference_loss`` runs :func:`preference_losses`,
  differentiated by autograd;
* the tests, which apply :func:`dense_token_logprobs` to a whole float64 tensor and
  differentiate it with autograd, and run :func:`preference_losses` in float64 as the oracle.

Conventions shared with every backend (Triton, C++):

* The logits the softmax sees are ``z = softcap(x * scale)`` with ``scale = logit_scale /
  temperature`` and ``softcap(u) = c * tanh(u / c)`` (identity when ``c`` is None).
* Per-token statistics are taken over ``z``; positions whose label is ignored get zeros.
* The target-class gradient ``1 - p_y`` is ``-expm1(log p_y)`` in fp32, never ``1 - p_y``
  in the logits' dtype, which cancels catastrophically as ``p_y -> 1``.
* The preference losses are TRL 1.16's formulas (``DPOTrainer``, ``CPOTrainer``,
  ``ORPOTrainer``) with two bounds that keep every value and gradient finite:
  f-divergence scores ``|f'| <= SCORE_BOUND`` and ORPO's mean log-probs ``<= ORPO_MAX_LOGP``.
  ``kernels/preference_loss.py`` implements the same math with hand-written derivatives.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .preference_loss import PreferenceLossInputs, PreferenceLossSpec


def transform_logits(x: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """``softcap(x * scale)``; computed in ``x``'s dtype (callers upcast first)."""
    z = x * scale if scale != 1.0 else x
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def transform_derivative(x: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor | float:
    """``dz/dx`` of :func:`transform_logits`, elementwise (a float when it is constant).

    ``1 - tanh(v)^2`` is written as ``4 * sigmoid(2v) * sigmoid(-2v)``, which keeps its
    relative precision where ``tanh(v) -> +-1``.
    """
    if softcap is None:
        return scale
    v2 = 2.0 * (x * scale) / softcap
    return 4.0 * torch.sigmoid(v2) * torch.sigmoid(-v2) * scale


def one_minus_exp(logp: torch.Tensor) -> torch.Tensor:
    """``1 - exp(logp)`` with full relative precision for ``logp -> 0``."""
    return -torch.expm1(logp)


def rows_forward(
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    scale: float,
    softcap: float | None,
    stats: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Label log-probs of a chunk of rows.

    Args:
        x: ``(R, V)`` logits, any float dtype (upcast to fp32 here).
        labels: ``(R,)`` int64; ``ignore_index`` marks unscored rows.
    Returns:
        ``logp`` ``(R,)`` fp32 (0 for ignored rows), ``lse`` ``(R,)`` fp32 (the log-sum-exp of
        ``z``, kept for backward) and the requested statistics, each ``(R,)``.
    """
    z = transform_logits(x.float(), scale, softcap)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).unsqueeze(-1)
    z_max = z.amax(-1, keepdim=True)
    # all -inf: shift by 0 rather than -inf (exp(-inf - -inf) is nan)
    z_max = torch.where(torch.isfinite(z_max), z_max, 0.0)
    exp_z = torch.exp(z - z_max)
    sum_exp = exp_z.sum(-1)
    log_sum_exp = sum_exp.log()
    # (z_y - max) - log(sum_exp): when y is the arg-max the first term is exactly 0 and log_p keeps
    # the relative precision that 1 - p_y needs in backward. torch.log_softmax sums exp_z in an
    # order that adds ~V tiny terms one at a time to 1.0, losing that precision.
    logp = (z.gather(-1, safe_labels) - z_max).squeeze(-1) - log_sum_exp
    logp = torch.where(valid, logp, 0.0)
    lse = torch.where(valid, z_max.squeeze(-1) + log_sum_exp, 0.0)
    out: dict[str, torch.Tensor] = {}
    if "entropy" in stats:
        # sum p * z over p > 0 (a -inf logit has p = 0 and contributes 0, not nan)
        expected_z = torch.where(exp_z > 0, exp_z * z, 0.0).sum(-1) / sum_exp
        out["entropy"] = torch.where(valid, lse - expected_z, 0.0)
    if "mean_logits" in stats:
        out["mean_logits"] = torch.where(valid, z.mean(-1), 0.0)
    if "is_top1" in stats:
        # torch.argmax returns the first maximal index, the tie rule we document
        out["is_top1"] = valid & (z.argmax(-1) == safe_labels.squeeze(-1))
    if "log_sum_sq_probs" in stats:
        out["log_sum_sq_probs"] = torch.where(valid, (exp_z * exp_z).sum(-1).log() - 2.0 * log_sum_exp, 0.0)
    return logp, lse, out


def rows_backward(
    grad_logp: torch.Tensor,
    x: torch.Tensor,
    labels: torch.Tensor,
    logp: torch.Tensor,
    lse: torch.Tensor,
    *,
    ignore_index: int,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Gradient of ``sum(grad_logp * logp)`` w.r.t. a chunk of logits ``x`` ``(R, V)``.

    Returns an fp32 ``(R, V)`` tensor ``g * (onehot - softmax) * dz/dx``; ignored rows are 0.
    """
    xf = x.float()
    z = transform_logits(xf, scale, softcap)
    valid = labels != ignore_index
    g = grad_logp.float().unsqueeze(-1)
    grad = -g * torch.exp(z - lse.unsqueeze(-1))
    safe_labels = torch.where(valid, labels, 0).unsqueeze(-1)
    grad.scatter_(-1, safe_labels, g * one_minus_exp(logp.unsqueeze(-1)))
    grad = grad * transform_derivative(xf, scale, softcap)
    # where, not a multiply by 0: an ignored row's lse is 0, so exp(z - lse) may be inf
    return torch.where(valid.unsqueeze(-1), grad, 0.0)


def dense_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> torch.Tensor:
    """Materialized ``log_softmax`` + ``gather``, differentiable, in the logits' dtype.

    The test oracle: call it on float64 logits. Shapes as :func:`dpo_fast.token_logprobs`.
    """
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    z = transform_logits(logits, logit_scale / temperature, softcap)
    valid = labels != ignore_index
    logp = torch.log_softmax(z, dim=-1).gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))


# ----------------------------------------------------------------------------------------------
# Preference losses (TRL 1.16's DPOTrainer, CPOTrainer and ORPOTrainer), run in the inputs' dtype
# promoted to at least fp32.
# ----------------------------------------------------------------------------------------------

# Bound on the f-divergence scores f'(pi / pi_ref) of forward_kl and alpha_divergence, which grow
# exponentially in the log-ratio: their exponent is clamped so |f'| <= SCORE_BOUND (derivative 0
# beyond, as torch.clamp). IPO squares a score difference, so a pair's loss and gradient stay
# below ~1e31 and a mean over up to ~1e7 pairs stays finite in fp32 and bf16.
SCORE_BOUND = 1e15
# ORPO's log odds log(p / (1 - p)) of a mean token probability p = exp(a) are infinite at a = 0
# (and its derivative 1 / (1 - exp(a)) with it): mean log-probs clamp at this value, with the
# derivative passing the clamp unchanged, so the loss and gradient at a = 0 are their limits.
ORPO_MAX_LOGP = -1e-30


def canonical_f_divergence(f_divergence: str, f_alpha: float) -> str:
    """The f-divergence computed: the alpha divergence at ``|alpha - 1| < 1e-6`` is its limit,
    the reverse KL (TRL switches at the same tolerance)."""
    if f_divergence == "alpha_divergence" and abs(f_alpha - 1.0) < 1e-6:
        return "reverse_kl"
    return f_divergence


def max_score_exponent(f_divergence: str, f_alpha: float) -> float:
    """Where the exponent of ``f'`` is clamped so that ``|f'| <= SCORE_BOUND``.

    forward KL: ``f' = 1 - exp(-x)``, exponent ``-x``; alpha: ``f' = (exp(t) - 1) / (alpha - 1)``
    with ``t = (alpha - 1) x``. Other divergences have no exponent (the value is unused).
    """
    if f_divergence == "forward_kl":
        return math.log(SCORE_BOUND)
    if f_divergence == "alpha_divergence":
        return math.log1p(SCORE_BOUND * abs(f_alpha - 1.0))
    return 0.0


def f_divergence_scores(log_ratio: torch.Tensor, f_divergence: str, f_alpha: float) -> torch.Tensor:
    """f'(pi / pi_ref) of the f-divergence, as a function of the log-ratio (f-DPO)."""
    f_divergence = canonical_f_divergence(f_divergence, f_alpha)
    max_exponent = max_score_exponent(f_divergence, f_alpha)
    if f_divergence == "forward_kl":
        # f'(t) = 1 - 1/t
        return 1 - torch.exp(torch.clamp(-log_ratio, max=max_exponent))
    if f_divergence == "js_divergence":
        # f'(t) = log(2t / (t + 1)) = log 2 + logsigmoid(log t)
        return math.log(2) + F.logsigmoid(log_ratio)
    if f_divergence == "alpha_divergence":
        # f'(t) = (t^(alpha - 1) - 1) / (alpha - 1)
        t = torch.clamp((f_alpha - 1.0) * log_ratio, max=max_exponent)
        return (torch.exp(t) - 1.0) / (f_alpha - 1.0)
    return log_ratio


def aot_delta(c: torch.Tensor, r: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """AOT (paired): sorted policy log-ratios minus sorted reference log-ratios, ``(P,)``.

    The sort couples the pairs, so this part always runs in PyTorch (autograd
    differentiates the sort); the Triton kernels take its output as one more per-pair input.
    """
    return torch.sort(c - r, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]


def aot_unpaired_delta(c: torch.Tensor, r: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """AOT (unpaired): sorted chosen log-ratios minus sorted rejected log-ratios, ``(P,)``."""
    return torch.sort(c - rc, dim=0)[0] - torch.sort(r - rr, dim=0)[0]


def sft_scale(chosen_lengths: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """``P / chosen tokens`` (fp32 ``()``): TRL's SFT term, the token mean of the chosen NLL,
    is ``sum_i -chosen_logps_i * P / tokens`` averaged over pairs."""
    return num_pairs / chosen_lengths.to(torch.float32).sum().clamp(min=1.0)


def smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """DPO's logistic loss; label smoothing ``eps`` gives cDPO (TRL <= 0.28, OpenRLHF)."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(a))`` for ``a < 0``, branching at ``-ln 2`` as TRL's ORPO does.

    Each branch is fed only the inputs it is selected for ("safe where"): ``torch.where``'s
    backward multiplies the unselected branch's gradient by 0, and the ``log1p`` branch's
    gradient is infinite near ``a = 0`` (``log1p(-1)``), which would make that 0 * inf = nan.
    """
    far = a < -math.log(2)
    return torch.where(
        far,
        torch.log1p(-torch.exp(torch.where(far, a, -1.0))),
        torch.log(-torch.expm1(torch.where(far, -1.0, a))),
    )


def clamp_passing_gradient(x: torch.Tensor, max_value: float) -> torch.Tensor:
    """``min(x, max_value)`` whose derivative is 1 everywhere (the clamp's shift is a constant)."""
    return x - (x - max_value).clamp(min=0).detach()


def pair_loss_terms(
    x: PreferenceLossInputs, sft: torch.Tensor | None, spec: PreferenceLossSpec
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-pair loss of every type in ``spec.loss_type`` (unweighted) and ORPO's log-odds.

    Args:
        x: every tensor present and of one floating dtype, in which the math runs: policy and
            reference log-probs ``(P,)`` (zeros for absent references), token counts clamped to
            >= 1 (ones when absent), the chosen NLL ``(P,)`` (zeros when absent).
        sft: :func:`sft_scale` of the unclamped counts (for ``sft``).
    Returns:
        ``({loss_type: (P,)}, {"log_odds": (P,), "log_odds_ratio": (P,)})`` (the second
        empty without ``orpo``).
    """
    c, r, rc, rr, lc, lr, nll, bco_delta = x
    beta, eps = spec.beta, spec.label_smoothing
    xc, xr = c - rc, r - rr
    sc = f_divergence_scores(xc, spec.f_divergence, spec.f_alpha)
    sr = f_divergence_scores(xr, spec.f_divergence, spec.f_alpha)
    z = beta * (sc - sr)
    terms: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for name in spec.loss_type:
        if name == "sigmoid":
            terms[name] = smoothed_logistic(z, eps)
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
            terms[name] = -F.logsigmoid(beta * xc - bco_delta) - F.logsigmoid(-(beta * xr - bco_delta))
        elif name == "sppo_hard":
            terms[name] = (xc - 0.5 / beta) ** 2 + (xr + 0.5 / beta) ** 2
        elif name == "aot":
            terms[name] = smoothed_logistic(beta * aot_delta(c, r, rc, rr), eps)
        elif name == "aot_unpaired":
            terms[name] = smoothed_logistic(beta * aot_unpaired_delta(c, r, rc, rr), eps)
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
            terms[name] = smoothed_logistic(beta * ((c / lc - r / lr) - spec.simpo_gamma / beta), eps)
        elif name == "cpo":
            terms[name] = smoothed_logistic(beta * (c - r), eps) + nll
        elif name == "orpo":
            ac = clamp_passing_gradient(c / lc, ORPO_MAX_LOGP)
            ar = clamp_passing_gradient(r / lr, ORPO_MAX_LOGP)
            log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
            extras = {"log_odds": log_odds, "log_odds_ratio": F.logsigmoid(log_odds)}
            terms[name] = nll - beta * extras["log_odds_ratio"]
    return terms, extras


def seen_logps(
    x: PreferenceLossInputs, rewards: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chosen_rewards / beta, rejected_rewards / beta, logps/chosen, logps/rejected)`` per pair,
    for a ``rewards`` kind of ``dpo_fast.constants.REWARD_KINDS``."""
    c, r = x.chosen, x.rejected
    if rewards == "log_ratio":
        return c - x.ref_chosen, r - x.ref_rejected, c, r
    if rewards == "policy_mean":
        return c / x.chosen_lengths, r / x.rejected_lengths, c / x.chosen_lengths, r / x.rejected_lengths
    return c, r, c, r


def preference_losses(
    x: PreferenceLossInputs, spec: PreferenceLossSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The whole preference loss: ``(loss, chosen_rewards, rejected_rewards, stats)``.

    Runs in the policy log-probs' dtype promoted to at least fp32 (the tests pass float64),
    differentiable w.r.t. ``x.chosen``, ``x.rejected`` and ``x.chosen_nll``; the references and
    token counts are constants. ``stats`` holds the per-pair means of
    ``kernels/preference_loss.py``'s ``STATS`` (ORPO's two only with ``orpo``).
    """
    c = x.chosen
    dtype = torch.promote_types(c.dtype, torch.float32)
    # TRL's token mean counts the real tokens: the scale sees the counts before the clamp
    sft = sft_scale(x.chosen_lengths, c.shape[0]).to(dtype) if "sft" in spec.loss_type else None
    zeros, ones = torch.zeros_like(c, dtype=dtype), torch.ones_like(c, dtype=dtype)
    x = x._replace(
        chosen=c.to(dtype),
        rejected=x.rejected.to(dtype),
        ref_chosen=zeros if x.ref_chosen is None else x.ref_chosen.detach().to(dtype),
        ref_rejected=zeros if x.ref_rejected is None else x.ref_rejected.detach().to(dtype),
        chosen_lengths=ones if x.chosen_lengths is None else x.chosen_lengths.to(dtype).clamp(min=1),
        rejected_lengths=ones if x.rejected_lengths is None else x.rejected_lengths.to(dtype).clamp(min=1),
        chosen_nll=zeros if x.chosen_nll is None else x.chosen_nll.to(dtype),
    )
    terms, extras = pair_loss_terms(x, sft, spec)
    per_pair = sum(w * terms[name] for name, w in zip(spec.loss_type, spec.loss_weights, strict=True))
    loss = {"mean": per_pair.mean, "sum": per_pair.sum, "none": lambda: per_pair}[spec.reduction]()
    with torch.no_grad():
        ratio_c, ratio_r, logps_c, logps_r = seen_logps(x, spec.rewards)
        chosen_rewards, rejected_rewards = spec.beta * ratio_c, spec.beta * ratio_r
        stats = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).to(dtype).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": logps_c.mean(),
            "logps/rejected": logps_r.mean(),
            "nll_loss": x.chosen_nll.mean(),
        }
        if extras:
            stats["log_odds_ratio"] = extras["log_odds_ratio"].mean()
            stats["log_odds_chosen"] = extras["log_odds"].mean()
    return loss, chosen_rewards, rejected_rewards, stats
