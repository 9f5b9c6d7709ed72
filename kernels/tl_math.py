"""Elementwise math shared by the Triton kernels (``@triton.jit`` helpers, fp32 blocks in and out).

Every kernel module imports these by their public names; no kernel module reaches into
another's private helpers. Each helper states the function's range and why it is written as
it is: ``triton.language`` lacks ``log1p`` and ``expm1`` on some backends, and the naive
forms cancel or overflow where the losses and log-probs need them.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def log1p(u):
    """``log(1 + u)`` for ``u > -1``, with full relative precision near 0."""
    w = 1.0 + u
    # w - 1 is exact, so log(w) * u / (w - 1) cancels the rounding of 1 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def logsigmoid(x):
    """``log(sigmoid(x))`` as ``min(x, 0) - log1p(exp(-|x|))``: finite for every finite ``x``."""
    return tl.minimum(x, 0.0) - log1p(tl.exp(-tl.abs(x)))


@triton.jit
def neg_expm1(x):
    """``1 - exp(x)`` for ``x <= 0``, with a Taylor series near 0 where ``1 - exp(x)`` cancels."""
    series = -x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0))))
    return tl.where(x > -0.01, series, 1.0 - tl.exp(x))


@triton.jit
def log1mexp(a):
    """``log(1 - exp(a))`` for ``a < 0``, branching at ``-ln 2`` like TRL's ORPO (Maechler 2012)."""
    return tl.where(a < -LN2, log1p(-tl.exp(a)), tl.log(neg_expm1(tl.minimum(a, 0.0))))
