"""Preference losses of the DPO family: the per-pair arithmetic of every loss type in one launch.

The kernels read two small tensors prepared by ``dpo_fast.ops.preference_loss``:

* ``inputs``, fp32 ``(K, P)``: one row per per-pair input (the order is stated with
  ``HAS_REF`` below); the optional rows are present as ``ROWS_PRESENT`` and ``LOSS_MASK`` say;
* ``params``, fp32 ``(len(PARAMS),)``: the weight of every loss type, then the scalar options
  (:data:`PARAMS`), read at run time. A set of loss types (the ``LOSS_MASK`` bit mask, a
  compile-time constant) is one compiled kernel whatever its weights and options.

One jitted function, :func:`_pair_terms`, states the loss of a block of pairs and its
derivatives for every loss type whose bit is set; both kernels call it:

* forward: ONE program loops over the pairs in blocks, writes the rewards (and the per-pair
  loss for ``reduction="none"``) and reduces the loss and TRL's metrics into a small ``stats``
  vector in a fixed order (deterministic, no atomics, no host round trip);
* backward: one program per block of pairs recomputes the terms and writes
  ``grad_output * dloss/d(row)`` for every row of ``inputs`` (zeros for the rows that are
  constants: references and token counts).

Everything is fp32. Log-sigmoids are ``min(x, 0) - log1p(exp(-|x|))`` so margins of +-1e6
stay finite; the f-divergence exponents are clamped at ``params[P_MAX_EXPONENT]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..constants import F_DIVERGENCES, LOSS_TYPES, REDUCTIONS, REWARD_KINDS
from .tl_math import LN2, log1mexp, log1p, logsigmoid, neg_expm1

# Bit i of LOSS_MASK switches loss type i on; params[i] is its weight. The kernels test a type
# as ``2**SIGMOID & LOSS_MASK``: compile-time arithmetic, written with the ``constexpr`` on the
# left of every operator (under the interpreter the mask is a plain int, and ``constexpr`` has
# no reflected bit operators), inline (each jitted call costs the interpreter milliseconds).
SIGMOID = tl.constexpr(LOSS_TYPES.index("sigmoid"))
HINGE = tl.constexpr(LOSS_TYPES.index("hinge"))
IPO = tl.constexpr(LOSS_TYPES.index("ipo"))
EXO_PAIR = tl.constexpr(LOSS_TYPES.index("exo_pair"))
NCA_PAIR = tl.constexpr(LOSS_TYPES.index("nca_pair"))
ROBUST = tl.constexpr(LOSS_TYPES.index("robust"))
BCO_PAIR = tl.constexpr(LOSS_TYPES.index("bco_pair"))
SPPO_HARD = tl.constexpr(LOSS_TYPES.index("sppo_hard"))
AOT = tl.constexpr(LOSS_TYPES.index("aot"))
AOT_UNPAIRED = tl.constexpr(LOSS_TYPES.index("aot_unpaired"))
APO_ZERO = tl.constexpr(LOSS_TYPES.index("apo_zero"))
APO_DOWN = tl.constexpr(LOSS_TYPES.index("apo_down"))
DISCOPOP = tl.constexpr(LOSS_TYPES.index("discopop"))
SIGMOID_NORM = tl.constexpr(LOSS_TYPES.index("sigmoid_norm"))
SFT = tl.constexpr(LOSS_TYPES.index("sft"))
SIMPO = tl.constexpr(LOSS_TYPES.index("simpo"))
CPO = tl.constexpr(LOSS_TYPES.index("cpo"))
ORPO = tl.constexpr(LOSS_TYPES.index("orpo"))

# ``params``: the weights (0 for absent types), then the spec's scalar options, then two per-call
# values; P_<NAME> is the index of an entry.
PARAMS = (
    *LOSS_TYPES,
    "beta",
    "label_smoothing",
    "discopop_tau",
    "simpo_gamma",
    "f_alpha",
    "max_exponent",  # f-divergence exponents are clamped here (dpo_fast.formulas.max_score_exponent)
    "orpo_max_logp",  # ORPO's mean log-probs are clamped here (dpo_fast.formulas.ORPO_MAX_LOGP)
    "bco_delta",
    "sft_scale",  # pairs / chosen tokens (dpo_fast.formulas.sft_scale)
)
P_BETA = tl.constexpr(PARAMS.index("beta"))
P_LABEL_SMOOTHING = tl.constexpr(PARAMS.index("label_smoothing"))
P_DISCOPOP_TAU = tl.constexpr(PARAMS.index("discopop_tau"))
P_SIMPO_GAMMA = tl.constexpr(PARAMS.index("simpo_gamma"))
P_F_ALPHA = tl.constexpr(PARAMS.index("f_alpha"))
P_MAX_EXPONENT = tl.constexpr(PARAMS.index("max_exponent"))
P_ORPO_MAX_LOGP = tl.constexpr(PARAMS.index("orpo_max_logp"))
P_BCO_DELTA = tl.constexpr(PARAMS.index("bco_delta"))
P_SFT_SCALE = tl.constexpr(PARAMS.index("sft_scale"))

# The rows of ``inputs``, in order: chosen, rejected, [ref_chosen, ref_rejected],
# [chosen_lengths, rejected_lengths], [nll], [aot], [aot_unpaired]. The ROWS_PRESENT bits say
# which bracketed groups are there, LOSS_MASK whether the AOT rows are (with their loss types).
HAS_REF = tl.constexpr(1)
HAS_LENGTHS = tl.constexpr(2)
HAS_NLL = tl.constexpr(4)

# FDIV, REWARDS and REDUCTION index dpo_fast.constants' F_DIVERGENCES, REWARD_KINDS, REDUCTIONS.
FORWARD_KL = tl.constexpr(F_DIVERGENCES.index("forward_kl"))
JS_DIVERGENCE = tl.constexpr(F_DIVERGENCES.index("js_divergence"))
ALPHA_DIVERGENCE = tl.constexpr(F_DIVERGENCES.index("alpha_divergence"))
REVERSE_KL = tl.constexpr(F_DIVERGENCES.index("reverse_kl"))
LOG_RATIO = tl.constexpr(REWARD_KINDS.index("log_ratio"))
POLICY_SUM = tl.constexpr(REWARD_KINDS.index("policy_sum"))
REDUCE_MEAN = tl.constexpr(REDUCTIONS.index("mean"))
REDUCE_SUM = tl.constexpr(REDUCTIONS.index("sum"))
REDUCE_NONE = tl.constexpr(REDUCTIONS.index("none"))

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

# Pairs per block: the forward loops over blocks in one program (its sums stay deterministic),
# the backward runs one program per block. A constant, so no shape specializes the kernels.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _load_pairs(x_ptr, offs, mask, P, LOSS_MASK: tl.constexpr, ROWS_PRESENT: tl.constexpr):
    """fp32 blocks of every row of ``inputs``; absent rows read as 0 (token counts as 1)."""
    zero = tl.zeros(offs.shape, tl.float32)
    rc = zero
    rr = zero
    lc = zero + 1.0
    lr = zero + 1.0
    nll = zero
    aot = zero
    aot_unpaired = zero
    # row r starts at r * P: int64 offsets (K * P may pass 2**31)
    row = offs + tl.cast(P, tl.int64)
    c = tl.load(x_ptr + offs, mask=mask, other=0.0)
    r = tl.load(x_ptr + row, mask=mask, other=0.0)
    if HAS_REF & ROWS_PRESENT:
        row += P
        rc = tl.load(x_ptr + row, mask=mask, other=0.0)
        row += P
        rr = tl.load(x_ptr + row, mask=mask, other=0.0)
    if HAS_LENGTHS & ROWS_PRESENT:
        # token counts of zero clamp to one, as TRL's clamp(min=1)
        row += P
        lc = tl.maximum(tl.load(x_ptr + row, mask=mask, other=1.0), 1.0)
        row += P
        lr = tl.maximum(tl.load(x_ptr + row, mask=mask, other=1.0), 1.0)
    if HAS_NLL & ROWS_PRESENT:
        row += P
        nll = tl.load(x_ptr + row, mask=mask, other=0.0)
    if 2**AOT & LOSS_MASK:
        row += P
        aot = tl.load(x_ptr + row, mask=mask, other=0.0)
    if 2**AOT_UNPAIRED & LOSS_MASK:
        row += P
        aot_unpaired = tl.load(x_ptr + row, mask=mask, other=0.0)
    return c, r, rc, rr, lc, lr, nll, aot, aot_unpaired


@triton.jit
def _score(x, f_alpha, max_exponent, FDIV: tl.constexpr):
    """f'(exp(x)) of the f-divergence and its derivative in the log-ratio ``x``.

    ``FDIV`` indexes ``dpo_fast.constants.F_DIVERGENCES``; exponents clamp at ``max_exponent``
    (zero derivative beyond, as ``torch.clamp``).
    """
    if FORWARD_KL == FDIV:  # 1 - exp(-x)
        e = tl.exp(tl.minimum(-x, max_exponent))
        s = 1.0 - e
        ds = tl.where(-x <= max_exponent, e, 0.0)
    elif JS_DIVERGENCE == FDIV:  # log 2 + logsigmoid(x)
        s = LN2 + logsigmoid(x)
        ds = tl.sigmoid(-x)
    elif ALPHA_DIVERGENCE == FDIV:  # (exp((alpha - 1) x) - 1) / (alpha - 1)
        t = (f_alpha - 1.0) * x
        e = tl.exp(tl.minimum(t, max_exponent))
        s = (e - 1.0) / (f_alpha - 1.0)
        ds = tl.where(t <= max_exponent, e, 0.0)
    else:  # reverse KL (standard DPO)
        s = x
        ds = tl.full(x.shape, 1.0, tl.float32)
    return s, ds


@triton.jit
def _smoothed_logistic(z, eps):
    """-(1 - eps) logsigmoid(z) - eps logsigmoid(-z) and its z-derivative (cDPO's form)."""
    loss = -(1.0 - eps) * logsigmoid(z) - eps * logsigmoid(-z)
    return loss, -(1.0 - eps) * tl.sigmoid(-z) + eps * tl.sigmoid(z)


@triton.jit
def _pair_terms(
    c, r, rc, rr, lc, lr, nll, aot, aot_unpaired, params_ptr, LOSS_MASK: tl.constexpr, FDIV: tl.constexpr
):
    """Weighted loss of a block of pairs and its derivatives (all fp32 blocks).

    Inputs: policy log-probs ``c``, ``r``; reference ``rc``, ``rr``; token counts (>= 1)
    ``lc``, ``lr``; the chosen NLL; the sorted AOT deltas. Returns ``(loss, d/dc, d/dr,
    d/dnll, d/daot, d/daot_unpaired, log_odds, logsigmoid(log_odds))``; the last two are
    ORPO's metrics (zeros without it).
    """
    beta = tl.load(params_ptr + P_BETA)
    eps = tl.load(params_ptr + P_LABEL_SMOOTHING)
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
    if REVERSE_KL != FDIV:
        f_alpha = tl.load(params_ptr + P_F_ALPHA)
        max_exponent = tl.load(params_ptr + P_MAX_EXPONENT)
    else:
        f_alpha = 0.0
        max_exponent = 0.0
    sc, dsc = _score(xc, f_alpha, max_exponent, FDIV)
    sr, dsr = _score(xr, f_alpha, max_exponent, FDIV)
    # losses written in z = beta * (score_c - score_r) add dz to this; chain rule at the end
    dz_total = zero
    z = beta * (sc - sr)

    if 2**SIGMOID & LOSS_MASK:
        w = tl.load(params_ptr + SIGMOID)
        term, dz = _smoothed_logistic(z, eps)
        loss += w * term
        dz_total += w * dz
    if 2**HINGE & LOSS_MASK:
        w = tl.load(params_ptr + HINGE)
        loss += w * tl.maximum(1.0 - z, 0.0)
        dz_total += w * tl.where(1.0 - z > 0.0, -1.0, 0.0)
    if 2**EXO_PAIR & LOSS_MASK:
        w = tl.load(params_ptr + EXO_PAIR)
        # EXO's target distribution (1 - eps, eps), in log space
        log_pw = log1p(-eps)
        log_pl = tl.log(eps)
        qw = tl.sigmoid(z)
        ql = tl.sigmoid(-z)
        loss += w * (qw * (logsigmoid(z) - log_pw) + ql * (logsigmoid(-z) - log_pl))
        # d/dz [qw log(qw/pw) + ql log(ql/pl)] = qw ql (log qw - log ql - log pw + log pl)
        dz_total += w * qw * ql * (z - log_pw + log_pl)
    if 2**ROBUST & LOSS_MASK:
        w = tl.load(params_ptr + ROBUST) / (1.0 - 2.0 * eps)
        loss += w * (-(1.0 - eps) * logsigmoid(z) + eps * logsigmoid(-z))
        dz_total += w * (-(1.0 - eps) * tl.sigmoid(-z) - eps * tl.sigmoid(z))
    if 2**DISCOPOP & LOSS_MASK:
        w = tl.load(params_ptr + DISCOPOP)
        tau = tl.load(params_ptr + P_DISCOPOP_TAU)
        softplus = -logsigmoid(z)
        m = tl.sigmoid(z / tau)
        m_not = tl.sigmoid(-z / tau)
        # exp(-z) * sigmoid(z / tau) in log space: exp(-z) alone overflows for z << 0
        exp_part = tl.exp(-z + logsigmoid(z / tau))
        loss += w * (softplus * m_not + exp_part)
        d_logistic = -tl.sigmoid(-z) * m_not - softplus * m * m_not / tau
        dz_total += w * (d_logistic + exp_part * (m_not / tau - 1.0))
    gc += beta * dz_total * dsc
    gr -= beta * dz_total * dsr

    # length-normalized scores, as TRL divides by the completion token counts
    d = sc / lc - sr / lr
    if 2**IPO & LOSS_MASK:
        w = tl.load(params_ptr + IPO)
        q = d - 1.0 / (2.0 * beta)
        loss += w * q * q
        gc += w * 2.0 * q * dsc / lc
        gr -= w * 2.0 * q * dsr / lr
    if 2**SIGMOID_NORM & LOSS_MASK:
        w = tl.load(params_ptr + SIGMOID_NORM)
        loss += w * -logsigmoid(beta * d)
        dd = w * -beta * tl.sigmoid(-beta * d)
        gc += dd * dsc / lc
        gr -= dd * dsr / lr
    if 2**NCA_PAIR & LOSS_MASK:
        w = tl.load(params_ptr + NCA_PAIR)
        a = beta * xc
        b = beta * xr
        loss += w * (-logsigmoid(a) - 0.5 * logsigmoid(-a) - 0.5 * logsigmoid(-b))
        gc += w * beta * (0.5 * tl.sigmoid(a) - tl.sigmoid(-a))
        gr += w * beta * 0.5 * tl.sigmoid(b)
    if 2**BCO_PAIR & LOSS_MASK:
        w = tl.load(params_ptr + BCO_PAIR)
        delta = tl.load(params_ptr + P_BCO_DELTA)
        a = beta * xc - delta
        b = beta * xr - delta
        loss += w * (-logsigmoid(a) - logsigmoid(-b))
        gc -= w * beta * tl.sigmoid(-a)
        gr += w * beta * tl.sigmoid(b)
    if 2**SPPO_HARD & LOSS_MASK:
        w = tl.load(params_ptr + SPPO_HARD)
        a = xc - 0.5 / beta
        b = xr + 0.5 / beta
        loss += w * (a * a + b * b)
        gc += w * 2.0 * a
        gr += w * 2.0 * b
    if 2**AOT & LOSS_MASK:
        w = tl.load(params_ptr + AOT)
        term, dz = _smoothed_logistic(beta * aot, eps)
        loss += w * term
        ga += w * beta * dz
    if 2**AOT_UNPAIRED & LOSS_MASK:
        w = tl.load(params_ptr + AOT_UNPAIRED)
        term, dz = _smoothed_logistic(beta * aot_unpaired, eps)
        loss += w * term
        gu += w * beta * dz
    if 2**APO_ZERO & LOSS_MASK:
        w = tl.load(params_ptr + APO_ZERO)
        sa = tl.sigmoid(beta * xc)
        sb = tl.sigmoid(beta * xr)
        loss += w * (1.0 - sa + sb)
        gc -= w * beta * sa * tl.sigmoid(-beta * xc)
        gr += w * beta * sb * tl.sigmoid(-beta * xr)
    if 2**APO_DOWN & LOSS_MASK:
        w = tl.load(params_ptr + APO_DOWN)
        u = beta * (xc - xr)
        sa = tl.sigmoid(beta * xc)
        su = tl.sigmoid(u)
        du = beta * su * tl.sigmoid(-u)
        loss += w * (sa + 1.0 - su)
        gc += w * (beta * sa * tl.sigmoid(-beta * xc) - du)
        gr += w * du
    if 2**SFT & LOSS_MASK:
        w = tl.load(params_ptr + SFT)
        sft_scale = tl.load(params_ptr + P_SFT_SCALE)
        loss -= w * c * sft_scale
        gc -= w * sft_scale
    if 2**CPO & LOSS_MASK:
        w = tl.load(params_ptr + CPO)
        term, dz = _smoothed_logistic(beta * (c - r), eps)
        # the NLL row is zeros when cpo comes without one
        loss += w * (term + nll)
        gc += w * beta * dz
        gr -= w * beta * dz
        gn += w
    # SimPO and ORPO see the mean token log-probs
    ac = c / lc
    ar = r / lr
    if 2**SIMPO & LOSS_MASK:
        w = tl.load(params_ptr + SIMPO)
        gamma = tl.load(params_ptr + P_SIMPO_GAMMA)
        term, dz = _smoothed_logistic(beta * ((ac - ar) - gamma / beta), eps)
        loss += w * term
        gc += w * beta * dz / lc
        gr -= w * beta * dz / lr
    if 2**ORPO & LOSS_MASK:
        w = tl.load(params_ptr + ORPO)
        # mean log-probs at (or above) 0 clamp just below it, where the log odds are finite;
        # the derivative passes the clamp unchanged (dpo_fast.formulas.below)
        max_logp = tl.load(params_ptr + P_ORPO_MAX_LOGP)
        ac = tl.minimum(ac, max_logp)
        ar = tl.minimum(ar, max_logp)
        # log odds(chosen) - log odds(rejected) of the mean token probability
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        odds_ratio = logsigmoid(log_odds)
        loss += w * (nll - beta * odds_ratio)
        gn += w
        dlo = w * -beta * tl.sigmoid(-log_odds)
        # d log_odds / d a = 1 / (1 - exp(a)) for the chosen side, minus that for the rejected
        gc += dlo / neg_expm1(ac) / lc
        gr -= dlo / neg_expm1(ar) / lr
    return loss, gc, gr, gn, ga, gu, log_odds, odds_ratio


@triton.jit
def _preference_loss_forward_kernel(
    x_ptr,
    params_ptr,
    loss_ptr,
    rewards_ptr,
    stats_ptr,
    P,
    LOSS_MASK: tl.constexpr,
    ROWS_PRESENT: tl.constexpr,
    FDIV: tl.constexpr,
    REWARDS: tl.constexpr,
    REDUCTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    beta = tl.load(params_ptr + P_BETA)
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
            x_ptr, offs, mask, P, LOSS_MASK, ROWS_PRESENT
        )
        loss, _, _, _, _, _, log_odds, odds_ratio = _pair_terms(
            c, r, rc, rr, lc, lr, nll, aot, aot_unpaired, params_ptr, LOSS_MASK, FDIV
        )
        # the log-probs the rewards are made of (dpo_fast.constants.REWARD_KINDS):
        # log-ratios, policy sums or policy means
        if LOG_RATIO == REWARDS:
            seen_c = c
            seen_r = r
            reward_c = beta * (c - rc)
            reward_r = beta * (r - rr)
        elif POLICY_SUM == REWARDS:
            seen_c = c
            seen_r = r
            reward_c = beta * c
            reward_r = beta * r
        else:
            seen_c = c / lc
            seen_r = r / lr
            reward_c = beta * seen_c
            reward_r = beta * seen_r
        tl.store(rewards_ptr + offs, reward_c, mask=mask)
        tl.store(rewards_ptr + P + offs, reward_r, mask=mask)
        if REDUCE_NONE == REDUCTION:
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
    if REDUCE_MEAN == REDUCTION:
        tl.store(loss_ptr, tl.sum(acc_loss, 0) * inv_p)
    elif REDUCE_SUM == REDUCTION:
        tl.store(loss_ptr, tl.sum(acc_loss, 0))
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
def _preference_loss_backward_kernel(
    grad_loss_ptr,
    x_ptr,
    params_ptr,
    grad_x_ptr,
    P,
    LOSS_MASK: tl.constexpr,
    ROWS_PRESENT: tl.constexpr,
    FDIV: tl.constexpr,
    REDUCTION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    c, r, rc, rr, lc, lr, nll, aot, aot_unpaired = _load_pairs(x_ptr, offs, mask, P, LOSS_MASK, ROWS_PRESENT)
    _, gc, gr, gn, ga, gu, _, _ = _pair_terms(
        c, r, rc, rr, lc, lr, nll, aot, aot_unpaired, params_ptr, LOSS_MASK, FDIV
    )
    if REDUCE_NONE == REDUCTION:  # one upstream gradient per pair
        g = tl.load(grad_loss_ptr + offs, mask=mask, other=0.0)
    elif REDUCE_MEAN == REDUCTION:
        g = tl.load(grad_loss_ptr) / P
    else:
        g = tl.load(grad_loss_ptr)
    # one row of gradient per row of inputs, in the same order; constants get zeros
    zero = tl.zeros_like(gc)
    row = offs
    tl.store(grad_x_ptr + row, g * gc, mask=mask)
    row += P
    tl.store(grad_x_ptr + row, g * gr, mask=mask)
    if HAS_REF & ROWS_PRESENT:
        row += P
        tl.store(grad_x_ptr + row, zero, mask=mask)
        row += P
        tl.store(grad_x_ptr + row, zero, mask=mask)
    if HAS_LENGTHS & ROWS_PRESENT:
        row += P
        tl.store(grad_x_ptr + row, zero, mask=mask)
        row += P
        tl.store(grad_x_ptr + row, zero, mask=mask)
    if HAS_NLL & ROWS_PRESENT:
        row += P
        tl.store(grad_x_ptr + row, g * gn, mask=mask)
    if 2**AOT & LOSS_MASK:
        row += P
        tl.store(grad_x_ptr + row, g * ga, mask=mask)
    if 2**AOT_UNPAIRED & LOSS_MASK:
        row += P
        tl.store(grad_x_ptr + row, g * gu, mask=mask)


def preference_loss_forward(
    inputs: torch.Tensor,
    params: torch.Tensor,
    loss_mask: int,
    rows_present: int,
    f_divergence: int,
    rewards: int,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (the ``dpo_fast::preference_loss_forward_triton`` operator).

    Args:
        inputs: contiguous fp32 ``(K, P)``, the rows that are present, in order (see ``HAS_REF``).
        params: contiguous fp32 ``(len(PARAMS),)``.
        loss_mask: bit ``i`` switches ``LOSS_TYPES[i]`` on.
        rows_present: ``HAS_REF | HAS_LENGTHS | HAS_NLL`` of the optional rows present in ``inputs``.
        f_divergence, rewards, reduction: indices in ``dpo_fast.constants``' ``F_DIVERGENCES``,
            ``REWARD_KINDS``, ``REDUCTIONS``.
    Returns:
        ``(loss, rewards, stats)`` fp32: ``loss`` ``()`` (``(P,)`` for ``"none"``), the chosen
        and rejected rewards ``(2, P)``, ``stats`` the means named by :data:`STATS`.
    """
    P = inputs.shape[1]
    loss = inputs.new_empty((P,) if reduction == REDUCE_NONE.value else ())
    reward_values = inputs.new_empty((2, P))
    stats = inputs.new_empty((len(STATS),))
    wrap_triton(_preference_loss_forward_kernel)[(1,)](
        inputs,
        params,
        loss,
        reward_values,
        stats,
        P,
        LOSS_MASK=loss_mask,
        ROWS_PRESENT=rows_present,
        FDIV=f_divergence,
        REWARDS=rewards,
        REDUCTION=reduction,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return loss, reward_values, stats


def preference_loss_backward(
    grad_loss: torch.Tensor,
    inputs: torch.Tensor,
    params: torch.Tensor,
    loss_mask: int,
    rows_present: int,
    f_divergence: int,
    reduction: int,
) -> torch.Tensor:
    """Launch the backward kernel (the ``dpo_fast::preference_loss_backward_triton`` operator).

    Args:
        grad_loss: contiguous fp32, the loss's gradient: ``()`` for ``"mean"``/``"sum"``,
            ``(P,)`` for ``"none"``.
        inputs, params, loss_mask, rows_present, f_divergence, reduction: as
            :func:`preference_loss_forward`.
    Returns:
        fp32 ``(K, P)``: the gradient of every row of ``inputs`` (zeros for the references and
        token counts).
    """
    P = inputs.shape[1]
    grad_inputs = torch.empty_like(inputs)
    wrap_triton(_preference_loss_backward_kernel)[(triton.cdiv(P, BLOCK),)](
        grad_loss,
        inputs,
        params,
        grad_inputs,
        P,
        LOSS_MASK=loss_mask,
        ROWS_PRESENT=rows_present,
        FDIV=f_divergence,
        REDUCTION=reduction,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return grad_inputs
