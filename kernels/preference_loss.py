"""Preference losses of the DPO family: the per-pair arithmetic of every loss type in one launch.

One jitted function, :func:`_pair_terms`, states the loss of one pair and its derivatives
for every loss type; each type is switched on by a non-zero ``W_<TYPE>`` weight, a
compile-time constant, so a kernel holds exactly the types of its mixture and an MPO-style
list (``sigmoid`` + ``bco_pair`` + ``sft``) is still one launch. The two kernels share it:

* forward: ONE program loops over the pairs in blocks, writes the rewards (and the per-pair
  loss for ``reduction="none"``), and reduces the loss and TRL's metrics into a small
  ``stats`` vector in a fixed order (deterministic, no atomics, no host round trip);
* backward: one program per block of pairs recomputes the terms and writes
  ``grad_output * dloss/d(input)`` for the policy log-probs (and the chosen NLL and the
  sorted AOT deltas, whose sort is differentiated by PyTorch).

Everything is fp32 whatever the inputs' dtype. Log-sigmoids are written
``min(x, 0) - log1p(exp(-|x|))`` so margins of +-1e4 stay finite.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .logprobs import _neg_expm1

# Pairs per block; the forward loops over blocks in one program (its sums stay deterministic).
MAX_BLOCK = 1024
NUM_WARPS = 4
# Order of the entries of ``stats`` written by the forward kernel: means over the pairs.
STATS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
)


@triton.jit
def _log1p(u):
    """log(1 + u) for u > -1 with full relative precision near 0 (no tl.log1p on every backend)."""
    w = 1.0 + u
    # w - 1 is exact, so log(w) * u / (w - 1) cancels the rounding of 1 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _log1mexp(a):
    """log(1 - exp(a)) for a < 0, branching at -ln 2 like TRL's ``log1mexp``."""
    return tl.where(a < -0.6931471805599453, _log1p(-tl.exp(a)), tl.log(_neg_expm1(tl.minimum(a, 0.0))))


@triton.jit
def _score(x, f_alpha, FDIV: tl.constexpr):
    """f'(exp(x)) of the f-divergence and its derivative in the log-ratio x.

    ``FDIV`` indexes ``dpo_fast.losses.F_DIVERGENCES``; exponents clamp at 80 (``EXP_CLAMP``).
    """
    if FDIV == 1:  # forward KL: 1 - exp(-x)
        e = tl.exp(tl.minimum(-x, 80.0))
        s = 1.0 - e
        ds = tl.where(-x <= 80.0, e, 0.0)
    elif FDIV == 2:  # Jensen-Shannon: log 2 + logsigmoid(x)
        s = 0.6931471805599453 + _logsigmoid(x)
        ds = tl.sigmoid(-x)
    elif FDIV == 3:  # alpha: (exp((alpha - 1) x) - 1) / (alpha - 1)
        t = (f_alpha - 1.0) * x
        e = tl.exp(tl.minimum(t, 80.0))
        s = (e - 1.0) / (f_alpha - 1.0)
        ds = tl.where(t <= 80.0, e, 0.0)
    else:  # reverse KL (standard DPO)
        s = x
        ds = tl.full(x.shape, 1.0, tl.float32)
    return s, ds


@triton.jit
def _smoothed_logistic(z, eps):
    """-(1 - eps) logsigmoid(z) - eps logsigmoid(-z) and its z-derivative (cDPO's form)."""
    loss = -(1.0 - eps) * _logsigmoid(z) - eps * _logsigmoid(-z)
    return loss, -(1.0 - eps) * tl.sigmoid(-z) + eps * tl.sigmoid(z)


@triton.jit
def _pair_terms(
    c,
    r,
    rc,
    rr,
    lc,
    lr,
    nll,
    aot,
    aot_unpaired,
    sft_scale,
    bco_delta,
    beta,
    eps,
    tau,
    gamma,
    f_alpha,
    exo_log_pw,
    exo_log_pl,
    W_SIGMOID: tl.constexpr,
    W_HINGE: tl.constexpr,
    W_IPO: tl.constexpr,
    W_EXO_PAIR: tl.constexpr,
    W_NCA_PAIR: tl.constexpr,
    W_ROBUST: tl.constexpr,
    W_BCO_PAIR: tl.constexpr,
    W_SPPO_HARD: tl.constexpr,
    W_AOT: tl.constexpr,
    W_AOT_UNPAIRED: tl.constexpr,
    W_APO_ZERO: tl.constexpr,
    W_APO_DOWN: tl.constexpr,
    W_DISCOPOP: tl.constexpr,
    W_SIGMOID_NORM: tl.constexpr,
    W_SFT: tl.constexpr,
    W_SIMPO: tl.constexpr,
    W_CPO: tl.constexpr,
    W_ORPO: tl.constexpr,
    FDIV: tl.constexpr,
    HAS_NLL: tl.constexpr,
):
    """Weighted loss of a block of pairs and its derivatives (all fp32 blocks).

    Inputs: policy log-probs ``c``, ``r``; reference ``rc``, ``rr``; token counts clamped to
    >= 1 ``lc``, ``lr``; the chosen NLL; the sorted AOT deltas; the SFT scale
    ``pairs / chosen tokens``. Returns ``(loss, d/dc, d/dr, d/dnll, d/daot, d/daot_unpaired,
    log_odds, logsigmoid(log_odds))``; the last two are ORPO's metrics.
    """
    zero = tl.zeros_like(c)
    loss = zero
    gc = zero
    gr = zero
    gn = zero
    ga = zero
    gu = zero
    log_odds = zero
    odds_ratio = zero

    xc = c - rc
    xr = r - rr
    sc, dsc = _score(xc, f_alpha, FDIV)
    sr, dsr = _score(xr, f_alpha, FDIV)
    # losses written in z = beta * (score_c - score_r) add dz to this; chain rule at the end
    dz_total = zero
    z = beta * (sc - sr)

    if W_SIGMOID != 0.0:
        term, dz = _smoothed_logistic(z, eps)
        loss += W_SIGMOID * term
        dz_total += W_SIGMOID * dz
    if W_HINGE != 0.0:
        loss += W_HINGE * tl.maximum(1.0 - z, 0.0)
        dz_total += W_HINGE * tl.where(1.0 - z > 0.0, -1.0, 0.0)
    if W_EXO_PAIR != 0.0:
        qw = tl.sigmoid(z)
        ql = tl.sigmoid(-z)
        loss += W_EXO_PAIR * (qw * (_logsigmoid(z) - exo_log_pw) + ql * (_logsigmoid(-z) - exo_log_pl))
        # d/dz [qw log(qw/pw) + ql log(ql/pl)] = qw ql (log qw - log ql - log pw + log pl)
        dz_total += W_EXO_PAIR * qw * ql * (z - exo_log_pw + exo_log_pl)
    if W_ROBUST != 0.0:
        inv = 1.0 / (1.0 - 2.0 * eps)
        loss += W_ROBUST * inv * (-(1.0 - eps) * _logsigmoid(z) + eps * _logsigmoid(-z))
        dz_total += W_ROBUST * inv * (-(1.0 - eps) * tl.sigmoid(-z) - eps * tl.sigmoid(z))
    if W_DISCOPOP != 0.0:
        softplus = -_logsigmoid(z)
        m = tl.sigmoid(z / tau)
        m_not = tl.sigmoid(-z / tau)
        # exp(-z) * sigmoid(z / tau) in log space: exp(-z) alone overflows for z << 0
        exp_part = tl.exp(-z + _logsigmoid(z / tau))
        loss += W_DISCOPOP * (softplus * m_not + exp_part)
        d_logistic = -tl.sigmoid(-z) * m_not - softplus * m * m_not / tau
        dz_total += W_DISCOPOP * (d_logistic + exp_part * (m_not / tau - 1.0))
    gc += beta * dz_total * dsc
    gr -= beta * dz_total * dsr

    # length-normalized scores, as TRL divides by the completion token counts
    d = sc / lc - sr / lr
    if W_IPO != 0.0:
        q = d - 1.0 / (2.0 * beta)
        loss += W_IPO * q * q
        gc += W_IPO * 2.0 * q * dsc / lc
        gr -= W_IPO * 2.0 * q * dsr / lr
    if W_SIGMOID_NORM != 0.0:
        loss += W_SIGMOID_NORM * -_logsigmoid(beta * d)
        dd = W_SIGMOID_NORM * -beta * tl.sigmoid(-beta * d)
        gc += dd * dsc / lc
        gr -= dd * dsr / lr
    if W_NCA_PAIR != 0.0:
        a = beta * xc
        b = beta * xr
        loss += W_NCA_PAIR * (-_logsigmoid(a) - 0.5 * _logsigmoid(-a) - 0.5 * _logsigmoid(-b))
        gc += W_NCA_PAIR * beta * (0.5 * tl.sigmoid(a) - tl.sigmoid(-a))
        gr += W_NCA_PAIR * beta * 0.5 * tl.sigmoid(b)
    if W_BCO_PAIR != 0.0:
        a = beta * xc - bco_delta
        b = beta * xr - bco_delta
        loss += W_BCO_PAIR * (-_logsigmoid(a) - _logsigmoid(-b))
        gc -= W_BCO_PAIR * beta * tl.sigmoid(-a)
        gr += W_BCO_PAIR * beta * tl.sigmoid(b)
    if W_SPPO_HARD != 0.0:
        a = xc - 0.5 / beta
        b = xr + 0.5 / beta
        loss += W_SPPO_HARD * (a * a + b * b)
        gc += W_SPPO_HARD * 2.0 * a
        gr += W_SPPO_HARD * 2.0 * b
    if W_AOT != 0.0:
        term, dz = _smoothed_logistic(beta * aot, eps)
        loss += W_AOT * term
        ga += W_AOT * beta * dz
    if W_AOT_UNPAIRED != 0.0:
        term, dz = _smoothed_logistic(beta * aot_unpaired, eps)
        loss += W_AOT_UNPAIRED * term
        gu += W_AOT_UNPAIRED * beta * dz
    if W_APO_ZERO != 0.0:
        sa = tl.sigmoid(beta * xc)
        sb = tl.sigmoid(beta * xr)
        loss += W_APO_ZERO * (1.0 - sa + sb)
        gc -= W_APO_ZERO * beta * sa * tl.sigmoid(-beta * xc)
        gr += W_APO_ZERO * beta * sb * tl.sigmoid(-beta * xr)
    if W_APO_DOWN != 0.0:
        u = beta * (xc - xr)
        sa = tl.sigmoid(beta * xc)
        su = tl.sigmoid(u)
        du = beta * su * tl.sigmoid(-u)
        loss += W_APO_DOWN * (sa + 1.0 - su)
        gc += W_APO_DOWN * (beta * sa * tl.sigmoid(-beta * xc) - du)
        gr += W_APO_DOWN * du
    if W_SFT != 0.0:
        loss -= W_SFT * c * sft_scale
        gc -= W_SFT * sft_scale
    if W_CPO != 0.0:
        term, dz = _smoothed_logistic(beta * (c - r), eps)
        loss += W_CPO * term
        gc += W_CPO * beta * dz
        gr -= W_CPO * beta * dz
        if HAS_NLL:
            loss += W_CPO * nll
            gn += W_CPO
    # SimPO and ORPO see the mean token log-probs
    ac = c / lc
    ar = r / lr
    if W_SIMPO != 0.0:
        term, dz = _smoothed_logistic(beta * ((ac - ar) - gamma / beta), eps)
        loss += W_SIMPO * term
        gc += W_SIMPO * beta * dz / lc
        gr -= W_SIMPO * beta * dz / lr
    if W_ORPO != 0.0:
        # log odds(chosen) - log odds(rejected) of the mean token probability
        log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
        odds_ratio = _logsigmoid(log_odds)
        loss += W_ORPO * (nll - beta * odds_ratio)
        gn += W_ORPO
        dlo = W_ORPO * -beta * tl.sigmoid(-log_odds)
        # d log_odds / d a = 1 / (1 - exp(a)) for the chosen side, minus that for the rejected
        gc += dlo / _neg_expm1(tl.minimum(ac, 0.0)) / lc
        gr -= dlo / _neg_expm1(tl.minimum(ar, 0.0)) / lr
    return loss, gc, gr, gn, ga, gu, log_odds, odds_ratio


@triton.jit
def _load_pairs(
    offs,
    mask,
    c_ptr,
    r_ptr,
    rc_ptr,
    rr_ptr,
    lc_ptr,
    lr_ptr,
    nll_ptr,
    aot_ptr,
    aot_unpaired_ptr,
    s_c,
    s_r,
    s_rc,
    s_rr,
    s_lc,
    s_lr,
    s_nll,
    HAS_REF: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_NLL: tl.constexpr,
    HAS_AOT: tl.constexpr,
    HAS_AOT_UNPAIRED: tl.constexpr,
):
    """fp32 blocks of every per-pair input; absent inputs read as 0 (lengths as 1)."""
    zero = tl.zeros(offs.shape, tl.float32)
    c = tl.load(c_ptr + offs * s_c, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs * s_r, mask=mask, other=0.0).to(tl.float32)
    rc = zero
    rr = zero
    lc = zero + 1.0
    lr = zero + 1.0
    nll = zero
    aot = zero
    aot_unpaired = zero
    if HAS_REF:
        rc = tl.load(rc_ptr + offs * s_rc, mask=mask, other=0.0).to(tl.float32)
        rr = tl.load(rr_ptr + offs * s_rr, mask=mask, other=0.0).to(tl.float32)
    if HAS_LENGTHS:
        # token counts of zero clamp to one, as TRL's clamp(min=1)
        lc = tl.maximum(tl.load(lc_ptr + offs * s_lc, mask=mask, other=1).to(tl.float32), 1.0)
        lr = tl.maximum(tl.load(lr_ptr + offs * s_lr, mask=mask, other=1).to(tl.float32), 1.0)
    if HAS_NLL:
        nll = tl.load(nll_ptr + offs * s_nll, mask=mask, other=0.0).to(tl.float32)
    if HAS_AOT:
        aot = tl.load(aot_ptr + offs, mask=mask, other=0.0)
    if HAS_AOT_UNPAIRED:
        aot_unpaired = tl.load(aot_unpaired_ptr + offs, mask=mask, other=0.0)
    return c, r, rc, rr, lc, lr, nll, aot, aot_unpaired


@triton.jit
def _preference_forward_kernel(
    c_ptr,
    r_ptr,
    rc_ptr,
    rr_ptr,
    lc_ptr,
    lr_ptr,
    nll_ptr,
    aot_ptr,
    aot_unpaired_ptr,
    sft_scale_ptr,
    bco_delta_ptr,
    loss_ptr,
    chosen_rewards_ptr,
    rejected_rewards_ptr,
    stats_ptr,
    P,
    s_c,
    s_r,
    s_rc,
    s_rr,
    s_lc,
    s_lr,
    s_nll,
    beta,
    eps,
    tau,
    gamma,
    f_alpha,
    exo_log_pw,
    exo_log_pl,
    bco_delta,
    W_SIGMOID: tl.constexpr,
    W_HINGE: tl.constexpr,
    W_IPO: tl.constexpr,
    W_EXO_PAIR: tl.constexpr,
    W_NCA_PAIR: tl.constexpr,
    W_ROBUST: tl.constexpr,
    W_BCO_PAIR: tl.constexpr,
    W_SPPO_HARD: tl.constexpr,
    W_AOT: tl.constexpr,
    W_AOT_UNPAIRED: tl.constexpr,
    W_APO_ZERO: tl.constexpr,
    W_APO_DOWN: tl.constexpr,
    W_DISCOPOP: tl.constexpr,
    W_SIGMOID_NORM: tl.constexpr,
    W_SFT: tl.constexpr,
    W_SIMPO: tl.constexpr,
    W_CPO: tl.constexpr,
    W_ORPO: tl.constexpr,
    FDIV: tl.constexpr,
    REWARDS: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_NLL: tl.constexpr,
    BCO_DELTA_PTR: tl.constexpr,
    STORE_LOSS: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    sft_scale = 0.0
    if W_SFT != 0.0:
        sft_scale = tl.load(sft_scale_ptr)
    if BCO_DELTA_PTR:
        bco_delta = tl.load(bco_delta_ptr).to(tl.float32)
    acc_loss = tl.zeros([BLOCK], tl.float32)
    acc_cr = tl.zeros([BLOCK], tl.float32)
    acc_rr = tl.zeros([BLOCK], tl.float32)
    acc_acc = tl.zeros([BLOCK], tl.float32)
    acc_margin = tl.zeros([BLOCK], tl.float32)
    acc_c = tl.zeros([BLOCK], tl.float32)
    acc_r = tl.zeros([BLOCK], tl.float32)
    acc_nll = tl.zeros([BLOCK], tl.float32)
    acc_ratio = tl.zeros([BLOCK], tl.float32)
    acc_odds = tl.zeros([BLOCK], tl.float32)
    for start in range(0, P, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < P
        c, r, rc, rr, lc, lr, nll, aot, aot_unpaired = _load_pairs(
            offs,
            mask,
            c_ptr,
            r_ptr,
            rc_ptr,
            rr_ptr,
            lc_ptr,
            lr_ptr,
            nll_ptr,
            aot_ptr,
            aot_unpaired_ptr,
            s_c,
            s_r,
            s_rc,
            s_rr,
            s_lc,
            s_lr,
            s_nll,
            HAS_REF,
            HAS_LENGTHS,
            HAS_NLL,
            W_AOT != 0.0,
            W_AOT_UNPAIRED != 0.0,
        )
        loss, _, _, _, _, _, log_odds, odds_ratio = _pair_terms(
            c,
            r,
            rc,
            rr,
            lc,
            lr,
            nll,
            aot,
            aot_unpaired,
            sft_scale,
            bco_delta,
            beta,
            eps,
            tau,
            gamma,
            f_alpha,
            exo_log_pw,
            exo_log_pl,
            W_SIGMOID,
            W_HINGE,
            W_IPO,
            W_EXO_PAIR,
            W_NCA_PAIR,
            W_ROBUST,
            W_BCO_PAIR,
            W_SPPO_HARD,
            W_AOT,
            W_AOT_UNPAIRED,
            W_APO_ZERO,
            W_APO_DOWN,
            W_DISCOPOP,
            W_SIGMOID_NORM,
            W_SFT,
            W_SIMPO,
            W_CPO,
            W_ORPO,
            FDIV,
            HAS_NLL,
        )
        # the log-probs the rewards are made of: log-ratios, policy sums or policy means
        if REWARDS == 0:
            seen_c = c
            seen_r = r
            reward_c = beta * (c - rc)
            reward_r = beta * (r - rr)
        elif REWARDS == 1:
            seen_c = c
            seen_r = r
            reward_c = beta * c
            reward_r = beta * r
        else:
            seen_c = c / lc
            seen_r = r / lr
            reward_c = beta * seen_c
            reward_r = beta * seen_r
        tl.store(chosen_rewards_ptr + offs, reward_c, mask=mask)
        tl.store(rejected_rewards_ptr + offs, reward_r, mask=mask)
        if STORE_LOSS:
            tl.store(loss_ptr + offs, loss, mask=mask)
        acc_loss += tl.where(mask, loss, 0.0)
        acc_cr += tl.where(mask, reward_c, 0.0)
        acc_rr += tl.where(mask, reward_r, 0.0)
        acc_acc += tl.where(mask & (reward_c > reward_r), 1.0, 0.0)
        acc_margin += tl.where(mask, reward_c - reward_r, 0.0)
        acc_c += tl.where(mask, seen_c, 0.0)
        acc_r += tl.where(mask, seen_r, 0.0)
        acc_nll += tl.where(mask, nll, 0.0)
        acc_ratio += tl.where(mask, odds_ratio, 0.0)
        acc_odds += tl.where(mask, log_odds, 0.0)
    inv_p = 1.0 / P
    if not STORE_LOSS:
        total = tl.sum(acc_loss, 0)
        if MEAN:
            total = total * inv_p
        tl.store(loss_ptr, total)
    tl.store(stats_ptr + 0, tl.sum(acc_cr, 0) * inv_p)
    tl.store(stats_ptr + 1, tl.sum(acc_rr, 0) * inv_p)
    tl.store(stats_ptr + 2, tl.sum(acc_acc, 0) * inv_p)
    tl.store(stats_ptr + 3, tl.sum(acc_margin, 0) * inv_p)
    tl.store(stats_ptr + 4, tl.sum(acc_c, 0) * inv_p)
    tl.store(stats_ptr + 5, tl.sum(acc_r, 0) * inv_p)
    tl.store(stats_ptr + 6, tl.sum(acc_nll, 0) * inv_p)
    tl.store(stats_ptr + 7, tl.sum(acc_ratio, 0) * inv_p)
    tl.store(stats_ptr + 8, tl.sum(acc_odds, 0) * inv_p)


@triton.jit
def _preference_backward_kernel(
    grad_loss_ptr,
    c_ptr,
    r_ptr,
    rc_ptr,
    rr_ptr,
    lc_ptr,
    lr_ptr,
    nll_ptr,
    aot_ptr,
    aot_unpaired_ptr,
    sft_scale_ptr,
    bco_delta_ptr,
    grad_c_ptr,
    grad_r_ptr,
    grad_nll_ptr,
    grad_aot_ptr,
    grad_aot_unpaired_ptr,
    P,
    s_grad,
    grad_scale,
    s_c,
    s_r,
    s_rc,
    s_rr,
    s_lc,
    s_lr,
    s_nll,
    beta,
    eps,
    tau,
    gamma,
    f_alpha,
    exo_log_pw,
    exo_log_pl,
    bco_delta,
    W_SIGMOID: tl.constexpr,
    W_HINGE: tl.constexpr,
    W_IPO: tl.constexpr,
    W_EXO_PAIR: tl.constexpr,
    W_NCA_PAIR: tl.constexpr,
    W_ROBUST: tl.constexpr,
    W_BCO_PAIR: tl.constexpr,
    W_SPPO_HARD: tl.constexpr,
    W_AOT: tl.constexpr,
    W_AOT_UNPAIRED: tl.constexpr,
    W_APO_ZERO: tl.constexpr,
    W_APO_DOWN: tl.constexpr,
    W_DISCOPOP: tl.constexpr,
    W_SIGMOID_NORM: tl.constexpr,
    W_SFT: tl.constexpr,
    W_SIMPO: tl.constexpr,
    W_CPO: tl.constexpr,
    W_ORPO: tl.constexpr,
    FDIV: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_NLL: tl.constexpr,
    BCO_DELTA_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    sft_scale = 0.0
    if W_SFT != 0.0:
        sft_scale = tl.load(sft_scale_ptr)
    if BCO_DELTA_PTR:
        bco_delta = tl.load(bco_delta_ptr).to(tl.float32)
    c, r, rc, rr, lc, lr, nll, aot, aot_unpaired = _load_pairs(
        offs,
        mask,
        c_ptr,
        r_ptr,
        rc_ptr,
        rr_ptr,
        lc_ptr,
        lr_ptr,
        nll_ptr,
        aot_ptr,
        aot_unpaired_ptr,
        s_c,
        s_r,
        s_rc,
        s_rr,
        s_lc,
        s_lr,
        s_nll,
        HAS_REF,
        HAS_LENGTHS,
        HAS_NLL,
        W_AOT != 0.0,
        W_AOT_UNPAIRED != 0.0,
    )
    _, gc, gr, gn, ga, gu, _, _ = _pair_terms(
        c,
        r,
        rc,
        rr,
        lc,
        lr,
        nll,
        aot,
        aot_unpaired,
        sft_scale,
        bco_delta,
        beta,
        eps,
        tau,
        gamma,
        f_alpha,
        exo_log_pw,
        exo_log_pl,
        W_SIGMOID,
        W_HINGE,
        W_IPO,
        W_EXO_PAIR,
        W_NCA_PAIR,
        W_ROBUST,
        W_BCO_PAIR,
        W_SPPO_HARD,
        W_AOT,
        W_AOT_UNPAIRED,
        W_APO_ZERO,
        W_APO_DOWN,
        W_DISCOPOP,
        W_SIGMOID_NORM,
        W_SFT,
        W_SIMPO,
        W_CPO,
        W_ORPO,
        FDIV,
        HAS_NLL,
    )
    g = tl.load(grad_loss_ptr + offs * s_grad, mask=mask, other=0.0).to(tl.float32) * grad_scale
    tl.store(grad_c_ptr + offs, (g * gc).to(grad_c_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_r_ptr + offs, (g * gr).to(grad_r_ptr.dtype.element_ty), mask=mask)
    if HAS_NLL:
        tl.store(grad_nll_ptr + offs, (g * gn).to(grad_nll_ptr.dtype.element_ty), mask=mask)
    if W_AOT != 0.0:
        tl.store(grad_aot_ptr + offs, g * ga, mask=mask)
    if W_AOT_UNPAIRED != 0.0:
        tl.store(grad_aot_unpaired_ptr + offs, g * gu, mask=mask)


# Loss types the kernels implement: one ``W_<TYPE>`` weight each.
KERNEL_LOSS_TYPES = tuple(
    name[2:].lower() for name in _preference_forward_kernel.arg_names if name.startswith("W_")
)
_OPTIONAL = ("ref_chosen", "ref_rejected", "chosen_lengths", "rejected_lengths", "nll")


def _block(num_pairs: int) -> int:
    return min(MAX_BLOCK, max(16, triton.next_power_of_2(num_pairs)))


def _kernel_args(inputs: dict[str, torch.Tensor | None], weights: dict[str, float], options: dict) -> tuple:
    """(pointers, scalars, compile-time constants) shared by both kernels."""
    c = inputs["chosen"]
    per_pair = [inputs["chosen"], inputs["rejected"], *(inputs[n] for n in _OPTIONAL)]
    # absent inputs are never read: any valid pointer stands in for them
    present = [t if t is not None else c for t in per_pair]
    bco_delta = options["bco_delta"]
    extra = [inputs["aot"], inputs["aot_unpaired"], inputs["sft_scale"]]
    extra.append(bco_delta if isinstance(bco_delta, torch.Tensor) else None)
    pointers = [*present, *(t if t is not None else c for t in extra)]
    eps = options["label_smoothing"]
    scalars = [
        *(t.stride(0) if t.dim() else 0 for t in present),
        options["beta"],
        eps,
        options["discopop_tau"],
        options["simpo_gamma"],
        options["f_alpha"],
        # EXO's target distribution (1 - eps, eps), in log space
        math.log1p(-eps) if 0.0 < eps < 1.0 else 0.0,
        math.log(eps) if 0.0 < eps < 1.0 else 0.0,
        0.0 if isinstance(bco_delta, torch.Tensor) else float(bco_delta),
    ]
    constants = {f"W_{name.upper()}": float(weights.get(name, 0.0)) for name in KERNEL_LOSS_TYPES}
    constants.update(
        FDIV=options["fdiv"],
        HAS_REF=inputs["ref_chosen"] is not None,
        HAS_LENGTHS=inputs["chosen_lengths"] is not None,
        HAS_NLL=inputs["nll"] is not None,
        BCO_DELTA_PTR=isinstance(bco_delta, torch.Tensor),
    )
    return pointers, scalars, constants


def preference_forward(
    inputs: dict[str, torch.Tensor | None],
    weights: dict[str, float],
    options: dict,
    *,
    rewards: int,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel once.

    Args:
        inputs: ``chosen``, ``rejected`` ``(P,)`` float log-probs (any float dtype, any stride);
            optional (None when absent) ``ref_chosen``, ``ref_rejected`` (both or neither),
            ``chosen_lengths``, ``rejected_lengths`` (both or neither; any real dtype),
            ``nll`` ``(P,)`` (stride 0 for a batch scalar); ``aot``, ``aot_unpaired``
            contiguous fp32 ``(P,)`` sorted deltas; ``sft_scale`` fp32 ``()``.
        weights: loss type -> weight (types from :data:`KERNEL_LOSS_TYPES`).
        options: ``beta``, ``label_smoothing``, ``discopop_tau``, ``simpo_gamma``, ``f_alpha``,
            ``fdiv`` (index in ``dpo_fast.losses.F_DIVERGENCES``), ``bco_delta`` (float or
            0-dim tensor).
        rewards: index in ``dpo_fast.losses.REWARD_KINDS``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    Returns:
        ``(loss, chosen_rewards, rejected_rewards, stats)``: fp32; ``loss`` is ``()`` (or
        ``(P,)`` for ``"none"``), the rewards ``(P,)``, ``stats`` the means named by :data:`STATS`.
    """
    c = inputs["chosen"]
    P = c.shape[0]
    f32 = {"device": c.device, "dtype": torch.float32}
    loss = torch.empty(P if reduction == "none" else (), **f32)
    chosen_rewards = torch.empty(P, **f32)
    rejected_rewards = torch.empty(P, **f32)
    stats = torch.empty(len(STATS), **f32)
    pointers, scalars, constants = _kernel_args(inputs, weights, options)
    _preference_forward_kernel[(1,)](
        *pointers,
        loss,
        chosen_rewards,
        rejected_rewards,
        stats,
        P,
        *scalars,
        **constants,
        REWARDS=rewards,
        STORE_LOSS=reduction == "none",
        MEAN=reduction == "mean",
        BLOCK=_block(P),
        num_warps=NUM_WARPS,
    )
    return loss, chosen_rewards, rejected_rewards, stats


def preference_backward(
    grad_loss: torch.Tensor,
    inputs: dict[str, torch.Tensor | None],
    weights: dict[str, float],
    options: dict,
    *,
    reduction: str,
) -> dict[str, torch.Tensor | None]:
    """Launch the backward kernel once.

    Args:
        grad_loss: the loss's gradient: ``()`` for ``"mean"``/``"sum"``, ``(P,)`` for ``"none"``.
        inputs, weights, options: as :func:`preference_forward`.
    Returns:
        gradients ``(P,)`` for ``chosen``, ``rejected`` and ``nll`` (in their dtypes) and fp32
        for ``aot``, ``aot_unpaired``; None for inputs that are absent.
    """
    c = inputs["chosen"]
    P = c.shape[0]
    grads: dict[str, torch.Tensor | None] = {}
    for name in ("chosen", "rejected", "nll", "aot", "aot_unpaired"):
        t = inputs[name]
        grads[name] = None if t is None else torch.empty(P, device=c.device, dtype=t.dtype)
    pointers, scalars, constants = _kernel_args(inputs, weights, options)
    block = _block(P)
    _preference_backward_kernel[(triton.cdiv(P, block),)](
        grad_loss,
        *pointers,
        *(g if g is not None else grads["chosen"] for g in grads.values()),
        P,
        grad_loss.stride(0) if grad_loss.dim() else 0,
        1.0 / P if reduction == "mean" else 1.0,
        *scalars,
        **constants,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )
    return grads
