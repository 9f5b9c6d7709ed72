"""The PyTorch reference for label log-probs: the one place the math is written in torch.

Two users share it:

* the ``"torch"`` backend, which applies :func:`rows_forward` / :func:`rows_backward` to one
  bounded chunk of rows at a time, so no more than a chunk of softmax is ever alive;
* the tests, which apply :func:`dense_token_logprobs` to a whole float64 tensor and
  differentiate it with autograd.

Conventions shared with every backend (Triton, C++):

* The logits the softmax sees are ``z = softcap(x * scale)`` with ``scale = logit_scale /
  temperature`` and ``softcap(u) = c * tanh(u / c)`` (identity when ``c`` is None).
* Per-token statistics are taken over ``z``; positions whose label is ignored get zeros.
* The target-class gradient ``1 - p_y`` is ``-expm1(log p_y)`` in fp32, never ``1 - p_y``
  in the logits' dtype, which cancels catastrophically as ``p_y -> 1``.
"""

from __future__ import annotations

import torch


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
