"""Tests of ``dpo_fast.preference_loss``: every loss type and f-divergence against the float64
PyTorch reference (values, rewards, metrics, gradients) on both backends, against TRL 1.16
itself, extreme margins, reductions, dtypes, strides and bad input.

How TRL's own math is called (there is no standalone loss function in TRL 1.16):

* DPO family: ``DPOTrainer._compute_loss`` is the loss. A trainer is made with
  ``DPOTrainer.__new__`` (no model loading, no dataset) and given only the attributes that
  method reads. Its "model" is a stub returning per-token log-probs whose row sums are our
  ``chosen_logps`` / ``rejected_logps``; the reference log-probs go in as TRL's precomputed
  ``ref_chosen_logps`` / ``ref_rejected_logps``. Gradients are read from the per-token
  log-probs (d loss / d sum = d loss / d token) and metrics from ``trainer._metrics``.
* ``cpo``, ``simpo``: ``CPOTrainer.cpo_loss`` on a ``__new__`` instance; ``orpo``:
  ``ORPOTrainer.odds_ratio_loss``. Their trainers feed them mean token log-probs for
  ``simpo``/``orpo`` and add the chosen NLL outside, which the harness does the same way.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from dpo_fast import FusedLinearPreferenceLoss, PreferenceLossSpec, preference_loss, registry
from dpo_fast.constants import F_DIVERGENCE_LOSS_TYPES, LOSS_TYPES, REFERENCE_FREE

BACKENDS = ("torch", "triton")
DPO_TRAINER_TYPES = [t for t in LOSS_TYPES if t not in ("simpo", "cpo", "orpo")]
F_DIVS = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.5)]
SMOOTHING = {"exo_pair": 0.05, "robust": 0.2}


def make_pairs(P: int, *, min_length: int = 0, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """Summed log-probs < -1 with log-ratios of a few units, token counts in [min_length, 12]."""
    c = -1 - 40 * torch.rand(P, device=device)
    r = -1 - 40 * torch.rand(P, device=device)
    pairs = {
        "chosen_logps": c,
        "rejected_logps": r,
        "ref_chosen_logps": c + 3 * torch.randn(P, device=device),
        "ref_rejected_logps": r + 3 * torch.randn(P, device=device),
        "chosen_lengths": torch.randint(min_length, 13, (P,), device=device),
        "rejected_lengths": torch.randint(min_length, 13, (P,), device=device),
    }
    for name in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        pairs[name] = pairs[name].to(dtype)
    return pairs


def call_kwargs(loss_type, pairs: dict, label_smoothing: float = 0.1) -> dict:
    """Arguments of one valid call: references only where the loss takes them, the NLL for
    ORPO/CPO, a label smoothing each loss accepts."""
    names = [loss_type] if isinstance(loss_type, str) else loss_type
    kwargs = dict(pairs)
    if set(names) <= REFERENCE_FREE and not set(names) <= {"sft"}:
        kwargs.pop("ref_chosen_logps")
        kwargs.pop("ref_rejected_logps")
    if set(names) & {"orpo", "cpo"}:
        kwargs["chosen_nll"] = 0.5 + torch.rand((), device=pairs["chosen_logps"].device)
    eps = min([SMOOTHING.get(n, label_smoothing) for n in names])
    return {**kwargs, "loss_type": loss_type, "label_smoothing": eps}


def run(backend: str, kwargs: dict, grad_output: torch.Tensor | None = None, **options):
    """Loss, rewards, metrics and gradients (chosen, rejected, chosen_nll) of one call."""
    leaves = {}
    for name in ("chosen_logps", "rejected_logps", "chosen_nll"):
        if name in kwargs:
            leaves[name] = kwargs[name].detach().clone().requires_grad_(True)
    out = preference_loss(**{**kwargs, **leaves, **options}, backend=backend)
    loss = out.loss
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    grads = torch.autograd.grad(loss, list(leaves.values()), grad_output.to(loss.dtype), allow_unused=True)
    grads = {
        n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads, strict=True)
    }
    return out, grads


def to64(kwargs: dict) -> dict:
    return {
        k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in kwargs.items()
    }


def assert_close(actual, expected, rtol=2e-5, name=""):
    expected = torch.as_tensor(expected, dtype=torch.float64).detach()
    actual = torch.as_tensor(actual).detach().to(torch.float64)
    atol = rtol * max(1.0, float(expected.abs().max()) if expected.numel() else 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def check_against_reference(backend: str, kwargs: dict, rtol=2e-5, **options):
    """Per-pair losses with a random upstream gradient, then the mean, against float64."""
    P = kwargs["chosen_logps"].shape[0]
    upstream = torch.randn(P, dtype=torch.float64)
    for reduction, grad_output in (("none", upstream), ("mean", None)):
        out, grads = run(backend, kwargs, grad_output, reduction=reduction, **options)
        ref, ref_grads = run("torch", to64(kwargs), grad_output, reduction=reduction, **options)
        assert out.loss.dtype == torch.float32
        assert_close(out.loss, ref.loss, rtol, "loss")
        assert_close(out.chosen_rewards, ref.chosen_rewards, rtol, "chosen_rewards")
        assert_close(out.rejected_rewards, ref.rejected_rewards, rtol, "rejected_rewards")
        assert out.metrics.keys() == ref.metrics.keys()
        for name in ref.metrics:
            assert_close(out.metrics[name], ref.metrics[name], rtol, name)
        for name in grads:
            assert grads[name].dtype == kwargs[name].dtype
            # gradients are returned in the inputs' dtype: half precision rounds them
            grad_rtol = max(rtol, torch.finfo(grads[name].dtype).eps)
            assert_close(grads[name], ref_grads[name], grad_rtol, f"grad {name}")
        assert not out.chosen_rewards.requires_grad and not out.metrics["rewards/margins"].requires_grad


# --------------------------------------------------------------------------- reference ----


def test_kernels_have_a_bit_for_every_loss_type():
    registry.resolve("preference_loss", "triton", "cpu")
    from dpo_fast.kernels import preference_loss as kernels

    for bit, name in enumerate(LOSS_TYPES):
        assert getattr(kernels, name.upper()).value == bit == kernels.PARAMS.index(name)
    # the per-call values come last: the op replaces them without rebuilding the spec's
    assert kernels.PARAMS[-2:] == ("bco_delta", "sft_scale")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_float64_reference(loss_type, backend):
    kwargs = call_kwargs(loss_type, make_pairs(37))
    check_against_reference(backend, kwargs)


@pytest.mark.parametrize("f_divergence,f_alpha", F_DIVS)
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES))
def test_f_divergences_match_reference(loss_type, f_divergence, f_alpha):
    kwargs = call_kwargs(loss_type, make_pairs(19))
    check_against_reference("triton", kwargs, f_divergence=f_divergence, f_alpha=f_alpha)


def test_alpha_divergence_at_one_is_reverse_kl():
    kwargs = call_kwargs(["sigmoid", "ipo"], make_pairs(9))
    for backend in BACKENDS:
        out, grads = run(backend, kwargs, f_divergence="alpha_divergence", f_alpha=1.0 + 1e-8)
        ref, ref_grads = run(backend, kwargs)
        assert_close(out.loss, ref.loss, 1e-6)
        assert_close(grads["chosen_logps"], ref_grads["chosen_logps"], 1e-6)


@pytest.mark.parametrize(
    "loss_type,weights",
    [
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # TRL's MPO recipe
        ([t for t in DPO_TRAINER_TYPES if t != "exo_pair"], None),
        (["simpo", "orpo", "sft"], [1.0, 0.5, 0.1]),
        (["sigmoid", "sigmoid"], [0.3, 0.4]),
    ],
)
def test_mixtures_match_reference(loss_type, weights):
    kwargs = call_kwargs(loss_type, make_pairs(23))
    check_against_reference("triton", kwargs, loss_weights=weights)
    single = call_kwargs(loss_type[0], make_pairs(5))
    if loss_type == ["sigmoid", "sigmoid"]:
        # duplicate entries add their weights
        out, _ = run("triton", {**single, "loss_type": loss_type}, loss_weights=weights)
        ref, _ = run("torch", single)
        assert_close(out.loss, 0.7 * ref.loss, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "aot", "aot_unpaired", "ipo", "orpo", "sft"])
def test_one_pair(loss_type, backend):
    check_against_reference(backend, call_kwargs(loss_type, make_pairs(1)))


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm", "simpo", "orpo"])
def test_zero_lengths_clamp_to_one(loss_type):
    pairs = make_pairs(8)
    pairs["chosen_lengths"][:4] = 0
    pairs["rejected_lengths"][2:6] = 0
    kwargs = call_kwargs(loss_type, pairs)
    clamped = {
        **kwargs,
        "chosen_lengths": pairs["chosen_lengths"].clamp(min=1),
        "rejected_lengths": pairs["rejected_lengths"].clamp(min=1),
    }
    for backend in BACKENDS:
        out, grads = run(backend, kwargs)
        ref, ref_grads = run(backend, clamped)
        assert_close(out.loss, ref.loss, 1e-6)
        assert_close(grads["chosen_logps"], ref_grads["chosen_logps"], 1e-6)


def extreme_pairs(big: float = -1e4, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Every combination of chosen / rejected log-ratios of +-|big| (policy log-probs <= 0)."""
    small = -1e-2
    rows = [
        (c, rc, r, rr) for c, rc in ((small, big), (big, small)) for r, rr in ((small, big), (big, small))
    ]
    rows += [(big, big, small, small), (small, small, big, big)]
    c, rc, r, rr = (torch.tensor(col, dtype=dtype) for col in zip(*rows, strict=True))
    ones = torch.ones(len(rows), dtype=torch.int64)
    return {
        "chosen_logps": c,
        "rejected_logps": r,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
        "chosen_lengths": ones,
        "rejected_lengths": ones,
    }


# Every loss type and f-divergence, as the fewest valid calls: a list's loss and gradients are
# sums of its types', so they are finite exactly when every type's are (an inf or nan in one
# type's term stays inf or nan in the sum). Lists of one reward kind each; f-divergences only
# for the types that define them.
FINITE_CALLS = [
    (DPO_TRAINER_TYPES, "reverse_kl", 0.5),
    *((sorted(F_DIVERGENCE_LOSS_TYPES), f_divergence, f_alpha) for f_divergence, f_alpha in F_DIVS),
    (["simpo", "sft"], "reverse_kl", 0.5),
    (["cpo"], "reverse_kl", 0.5),
    (["orpo"], "reverse_kl", 0.5),
]


def _non_finite(backend, kwargs, **options) -> bool:
    out, grads = run(backend, kwargs, **options, reduction="none")
    return not (torch.isfinite(out.loss).all() and all(torch.isfinite(g).all() for g in grads.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_margins_are_finite(backend, dtype):
    """Log-ratio margins of +-1e4 and +-1e6: every loss type and f-divergence gives finite losses
    and gradients in fp32 and bf16 (issue 14: IPO with forward_kl / alpha_divergence overflowed)."""
    for big in (-1e4, -1e6):
        for loss_types, f_divergence, f_alpha in FINITE_CALLS:
            kwargs = call_kwargs(loss_types, extreme_pairs(big, dtype))
            for beta in (0.1, 1.0):
                options = {"beta": beta, "f_divergence": f_divergence, "f_alpha": f_alpha}
                if _non_finite(backend, kwargs, **options):
                    single = [call_kwargs(t, extreme_pairs(big, dtype)) for t in loss_types]
                    culprits = [k["loss_type"] for k in single if _non_finite(backend, k, **options)]
                    pytest.fail(f"non-finite loss or gradient at margins {big}: {culprits} {options}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("f_divergence,f_alpha", [f for f in F_DIVS if f[0] != "js_divergence"])
def test_ipo_with_exponential_divergences_is_bounded(backend, f_divergence, f_alpha):
    """IPO squares f-divergence scores that grow like exp(|log-ratio|): the exponent clamp
    bounds them by SCORE_BOUND, so a pair's loss stays below ~(2 * SCORE_BOUND)^2 and matches
    the float64 reference, gradient included (zero beyond the clamp)."""
    from dpo_fast.formulas import SCORE_BOUND

    # log-ratios from 0 to far beyond the clamp (TRL's exponents overflow fp32 past ~88, their
    # squares past ~44)
    x = torch.tensor([-1e4, -200.0, -150.0, -60.0, -40.0, -30.0, -3.0, 0.0, 30.0, 60.0, 150.0, 1e4])
    pairs = make_pairs(len(x))
    pairs["ref_chosen_logps"] = pairs["chosen_logps"] - x
    pairs["ref_rejected_logps"] = pairs["rejected_logps"] - 0.7 * x.roll(5)  # no tied rewards
    kwargs = call_kwargs("ipo", pairs)
    check_against_reference(backend, kwargs, f_divergence=f_divergence, f_alpha=f_alpha)
    out, grads = run(backend, kwargs, f_divergence=f_divergence, f_alpha=f_alpha, reduction="none")
    assert torch.isfinite(grads["chosen_logps"]).all() and torch.isfinite(grads["rejected_logps"]).all()
    assert out.loss.max() <= (2 * SCORE_BOUND + 1 / (2 * 0.1)) ** 2
    assert out.loss.max() > SCORE_BOUND  # the clamp bounds, not hides, the large scores


@pytest.mark.parametrize("loss_type", ["sigmoid", "discopop", "exo_pair", "orpo"])
def test_extreme_margins_match_reference(loss_type):
    check_against_reference("triton", call_kwargs(loss_type, extreme_pairs()), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    pairs = make_pairs(33, dtype=dtype)
    kwargs = call_kwargs(["sigmoid", "ipo", "apo_down"], pairs)
    # the kernels upcast to fp32: same as the reference on the same (rounded) values
    check_against_reference("triton", kwargs)


def test_strided_inputs():
    base = make_pairs(40)
    strided = {k: v[::2] for k, v in base.items()}
    kwargs = call_kwargs(["sigmoid", "sft", "nca_pair"], strided)
    assert not kwargs["chosen_logps"].is_contiguous()
    check_against_reference("triton", kwargs)
    contiguous = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out, grads = run("triton", kwargs)
    ref, ref_grads = run("triton", contiguous)
    assert torch.equal(out.loss, ref.loss) and torch.equal(grads["chosen_logps"], ref_grads["chosen_logps"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions(backend):
    kwargs = call_kwargs(["robust", "bco_pair"], make_pairs(12))
    per_pair, _ = run(backend, kwargs, reduction="none")
    assert per_pair.loss.shape == (12,)
    mean, mean_grads = run(backend, kwargs, reduction="mean")
    total, total_grads = run(backend, kwargs, reduction="sum")
    assert mean.loss.shape == total.loss.shape == ()
    assert_close(mean.loss, per_pair.loss.double().mean(), 1e-6)
    assert_close(total.loss, per_pair.loss.double().sum(), 1e-6)
    assert_close(total_grads["chosen_logps"], 12 * mean_grads["chosen_logps"], 1e-6)


def test_chosen_nll_scalar_or_per_pair():
    pairs = make_pairs(6)
    kwargs = call_kwargs("orpo", pairs)
    per_pair_nll = 0.5 + torch.rand(6)
    out, grads = run("triton", {**kwargs, "chosen_nll": per_pair_nll})
    assert_close(grads["chosen_nll"], torch.full((6,), 1 / 6), 1e-6)
    assert_close(out.metrics["nll_loss"], per_pair_nll.double().mean(), 1e-6)
    out, grads = run("triton", kwargs)
    assert grads["chosen_nll"].shape == () and abs(float(grads["chosen_nll"]) - 1.0) < 1e-6
    # cpo: the NLL is optional and adds once
    cpo = call_kwargs("cpo", pairs)
    with_nll, _ = run("triton", cpo)
    without, _ = run("triton", {k: v for k, v in cpo.items() if k != "chosen_nll"})
    assert_close(with_nll.loss - without.loss, cpo["chosen_nll"], 1e-5)
    assert "nll_loss" not in without.metrics


@pytest.mark.parametrize("backend", BACKENDS)
def test_bco_delta_float_or_tensor(backend):
    kwargs = call_kwargs("bco_pair", make_pairs(10))
    check_against_reference(backend, kwargs, bco_delta=0.3)
    as_float, g_float = run(backend, kwargs, bco_delta=0.3)
    as_tensor, g_tensor = run(backend, kwargs, bco_delta=torch.tensor(0.3))
    assert_close(as_tensor.loss, as_float.loss, 1e-6)
    assert_close(g_tensor["chosen_logps"], g_float["chosen_logps"], 1e-6)
    # TRL <= 0.2x's running-mean form, written out
    c, r = kwargs["chosen_logps"].double(), kwargs["rejected_logps"].double()
    xc = c - kwargs["ref_chosen_logps"].double()
    xr = r - kwargs["ref_rejected_logps"].double()
    old = -torch.nn.functional.logsigmoid(0.1 * xc - 0.3) - torch.nn.functional.logsigmoid(-(0.1 * xr - 0.3))
    assert_close(as_float.loss, old.mean(), 1e-5)


def test_deterministic_and_writes_every_output(request):
    """Two runs give identical bits; outputs allocated uninitialized are all written (the
    second run's allocations start as NaN)."""
    kwargs = call_kwargs(["sigmoid", "aot", "sft"], make_pairs(1500))
    first, grads = run("triton", kwargs, reduction="none", grad_output=torch.ones(1500))
    request.getfixturevalue("poisoned_outputs")
    second, grads2 = run("triton", kwargs, reduction="none", grad_output=torch.ones(1500))
    for a, b in [(first.loss, second.loss), (first.chosen_rewards, second.chosen_rewards)]:
        assert torch.equal(a, b)
    for name in grads:
        assert torch.equal(grads[name], grads2[name])
    for name in first.metrics:
        assert torch.equal(first.metrics[name], second.metrics[name])
    mean, _ = run("triton", kwargs)
    assert torch.isfinite(mean.loss)


def test_no_grad_and_detached_inputs():
    kwargs = call_kwargs("sigmoid", make_pairs(5))
    with torch.no_grad():
        out = preference_loss(**kwargs, backend="triton")
    ref = preference_loss(**kwargs, backend="torch")
    assert not out.loss.requires_grad
    assert_close(out.loss, ref.loss, 1e-6)


@pytest.mark.parametrize(
    ("backend", "compiler"),
    [(b, c) for c in ("eager", "inductor") for b in BACKENDS] + [("triton", "aot_eager")],
)
def test_torch_compile_fullgraph(backend, compiler):
    """The whole op traces into one graph on both backends (the Triton one through its
    operators: an opaque custom op under the interpreter, a triton_op Inductor sees on CUDA),
    with the results and gradients of eager mode. ``aot_eager`` traces the operators' fakes and
    autograd; ``inductor`` compiles C++ on CPU (slow: a smaller loss list)."""
    torch._dynamo.reset()
    loss_type = ["sigmoid", "bco_pair", "sft"] + (["aot"] if compiler != "inductor" else [])
    kwargs = call_kwargs(loss_type, make_pairs(16))
    c = kwargs.pop("chosen_logps").clone().requires_grad_(True)
    spec = PreferenceLossSpec(
        loss_type=kwargs.pop("loss_type"), label_smoothing=kwargs.pop("label_smoothing")
    )

    def step(chosen, bco_delta):
        out = preference_loss(chosen, **kwargs, backend=backend, spec=spec, bco_delta=bco_delta)
        return out.loss, out.metrics["rewards/accuracies"], out.chosen_rewards

    compiled = torch.compile(step, backend=compiler, fullgraph=True)
    delta = torch.tensor(0.3)
    got, expected = compiled(c, delta), step(c, delta)
    for a, b in zip(got, expected, strict=True):
        assert_close(a, b, 1e-6)
    assert_close(torch.autograd.grad(got[0], c)[0], torch.autograd.grad(expected[0], c)[0], 1e-6)


# ------------------------------------------------------------------------------ ORPO ------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_orpo_confident_chosen_has_finite_gradients(backend, dtype):
    """Issue 14: chosen_logps = -2.75e-11 gave nan gradients on the torch backend (the unselected
    branch of log1mexp's torch.where has an infinite gradient there)."""
    pairs = make_pairs(6, min_length=1, dtype=dtype)
    pairs["chosen_logps"][:3] = torch.tensor([-2.75e-11, -1e-20, -1e-7], dtype=dtype)
    kwargs = call_kwargs("orpo", pairs)
    out, grads = run(backend, kwargs, reduction="none")
    assert torch.isfinite(out.loss).all() and all(torch.isfinite(g).all() for g in grads.values())
    check_against_reference(backend, kwargs, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_orpo_at_zero_logps_gives_the_limits(backend):
    """At a chosen log-prob of 0 the log odds are infinite but the loss and gradient have finite
    limits: loss -> nll, d/dc -> -beta * odds(rejected mean) / chosen tokens, d/dr -> 0. A
    rejected log-prob of 0 (an infinite loss in exact math) stays finite: mean log-probs clamp
    at ORPO_MAX_LOGP."""
    pairs = make_pairs(4, min_length=1)
    pairs["chosen_logps"][0] = 0.0
    pairs["rejected_logps"][1] = 0.0
    pairs["chosen_logps"][2] = pairs["rejected_logps"][2] = 0.0
    kwargs = call_kwargs("orpo", pairs)
    nll = 0.5 + torch.rand(4)
    out, grads = run(backend, {**kwargs, "chosen_nll": nll}, reduction="none", grad_output=torch.ones(4))
    assert torch.isfinite(out.loss).all() and all(torch.isfinite(g).all() for g in grads.values())
    ar = pairs["rejected_logps"][0].double() / pairs["rejected_lengths"][0]
    odds = ar.exp() / -torch.expm1(ar)
    assert_close(out.loss[0], nll[0], 1e-6)
    assert_close(grads["chosen_logps"][0], -0.1 * odds / pairs["chosen_lengths"][0], 1e-5)
    assert abs(float(grads["rejected_logps"][0])) < 1e-20
    ref, ref_grads = run("torch", to64({**kwargs, "chosen_nll": nll}), reduction="none")
    assert_close(out.loss, ref.loss, 1e-5)
    assert_close(grads["chosen_logps"], ref_grads["chosen_logps"], 1e-5)


# ---------------------------------------------------------------------------- the spec ------


def test_spec_normalizes_and_is_a_value():
    spec = PreferenceLossSpec(loss_type=["sigmoid", "sft", "sigmoid"], loss_weights=[0.3, 1, 0.4], beta=1)
    assert spec.loss_type == ("sigmoid", "sft") and spec.loss_weights == (0.7, 1.0)
    assert spec.beta == 1.0 and isinstance(spec.beta, float) and spec.rewards == "log_ratio"
    same = PreferenceLossSpec(loss_type=("sigmoid", "sft"), loss_weights=(0.7, 1.0), beta=1.0)
    assert spec == same and hash(spec) == hash(same)
    assert PreferenceLossSpec("orpo").rewards == "policy_mean"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.beta = 0.5


def test_keyword_defaults_are_the_spec_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(PreferenceLossSpec) if f.init}
    parameters = inspect.signature(preference_loss).parameters
    assert {name: parameters[name].default for name in defaults} == defaults


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"beta": 0.0}, ValueError, "beta must be"),
        ({"loss_type": "dpo"}, ValueError, "unknown loss_type"),
        ({"loss_type": ["ipo", "orpo"]}, ValueError, "define rewards differently"),
        ({"simpo_gamma": math.inf}, ValueError, "simpo_gamma must be a finite number"),
        ({"bco_delta": math.nan}, ValueError, "bco_delta must be a finite number"),
        ({"f_alpha": math.nan}, ValueError, "f_alpha must be a finite number"),
        ({"loss_weights": [math.inf]}, ValueError, "loss_weights must be finite"),
        ({"loss_type": 3}, TypeError, "loss_type must be a loss name"),
        ({"label_smoothing": "0.1"}, ValueError, "label_smoothing must be in"),
        ({"bco_delta": torch.tensor(0.1)}, TypeError, "pass a 0-dim tensor as preference_loss"),
    ],
)
def test_spec_validates_when_built(options, error, match):
    with pytest.raises(error, match=match):
        PreferenceLossSpec(**options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_spec_call_equals_keyword_call(backend):
    kwargs = call_kwargs(["sigmoid", "bco_pair"], make_pairs(9))
    options = {"loss_type": kwargs.pop("loss_type"), "label_smoothing": kwargs.pop("label_smoothing")}
    spec = PreferenceLossSpec(**options, beta=0.3, loss_weights=[1.0, 0.5], reduction="sum")
    for delta in (0.0, torch.tensor(0.2)):  # a tensor bco_delta is a per-call value
        keywords = preference_loss(
            **kwargs,
            **options,
            beta=0.3,
            loss_weights=[1.0, 0.5],
            reduction="sum",
            bco_delta=delta,
            backend=backend,
        )
        with_spec = preference_loss(**kwargs, spec=spec, bco_delta=delta, backend=backend)
        assert torch.equal(keywords.loss, with_spec.loss)
        assert keywords.metrics.keys() == with_spec.metrics.keys()


def test_spec_and_keywords_are_not_mixed():
    kwargs = call_kwargs("sigmoid", make_pairs(3))
    kwargs.pop("loss_type"), kwargs.pop("label_smoothing")
    with pytest.raises(ValueError, match=r"not both: got spec and \['beta'\]"):
        preference_loss(**kwargs, spec=PreferenceLossSpec(), beta=0.2)
    with pytest.raises(ValueError, match=r"\['bco_delta'\]"):
        preference_loss(**kwargs, spec=PreferenceLossSpec(bco_delta=0.1), bco_delta=torch.tensor(0.1))
    with pytest.raises(TypeError, match="spec must be a PreferenceLossSpec"):
        preference_loss(**kwargs, spec={"beta": 0.1})


def test_fused_linear_loss_validates_its_spec_once():
    with pytest.raises(ValueError, match="beta must be"):
        FusedLinearPreferenceLoss(beta=-1.0)
    module = FusedLinearPreferenceLoss(loss_type=["sigmoid", "sft"], beta=0.2)
    assert module.spec == PreferenceLossSpec(loss_type=["sigmoid", "sft"], beta=0.2)


# ----------------------------------------------------------------------------- the op -------


def test_loss_weights_and_options_are_runtime_values(monkeypatch):
    """One compiled kernel per set of loss types: changing the weights (or beta) changes the
    results but none of the kernels' compile-time arguments (the GPU test checks Triton's
    cache itself)."""
    registry.resolve("preference_loss", "triton", "cpu")
    from dpo_fast.kernels import preference_loss as kernels

    launches = []
    for kernel in (kernels._preference_loss_forward_kernel, kernels._preference_loss_backward_kernel):
        real_run = kernel.run

        def spy(*args, real_run=real_run, **kw):
            launches.append({k: v for k, v in kw.items() if not isinstance(v, torch.Tensor)})
            return real_run(*args, **kw)

        monkeypatch.setattr(kernel, "run", spy)
    kwargs = call_kwargs(["sigmoid", "bco_pair", "sft"], make_pairs(6))
    losses = []
    for weights, beta in (([0.8, 0.2, 1.0], 0.1), ([0.1, 0.5, 2.0], 0.3)):
        out, _ = run("triton", kwargs, loss_weights=weights, beta=beta)
        losses.append(out.loss)
    assert len(launches) == 4 and launches[0] == launches[2] and launches[1] == launches[3]
    assert "LOSS_MASK" in launches[0] and not torch.equal(losses[0], losses[1])


def test_triton_double_backward_is_refused():
    kwargs = call_kwargs("sigmoid", make_pairs(4))
    c = kwargs.pop("chosen_logps").clone().requires_grad_(True)
    loss = preference_loss(c, **kwargs, backend="triton").loss
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, c, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_tensors_trace_without_value_checks(backend):
    """Under FakeTensorMode (as torch.compile traces) the value checks are skipped and every
    output has its shape; negative counts are not seen (they have no values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        pairs = make_pairs(5)
        pairs["chosen_lengths"] = pairs["chosen_lengths"] - 100
        out, grads = run(backend, call_kwargs(["sigmoid", "sft", "aot"], pairs), reduction="none")
    assert out.loss.shape == out.chosen_rewards.shape == grads["chosen_logps"].shape == (5,)
    assert all(value.shape == () for value in out.metrics.values())


def test_cpu_auto_builds_nothing_and_warns_nothing(tmp_path):
    """On CPU, backend="auto" runs the PyTorch loss: no C++ build (no compiler here), no
    warning; "cpp" is not a loss backend."""
    code = """
import warnings
warnings.simplefilter("error")
import torch, dpo_fast
from dpo_fast import registry
from dpo_fast.ops import cpp
c = (-torch.rand(4) * 5).requires_grad_()
out = dpo_fast.preference_loss(c, -torch.rand(4), -torch.rand(4), -torch.rand(4), loss_type=["ipo", "sft"],
                               chosen_lengths=torch.ones(4), rejected_lengths=torch.ones(4))
out.loss.backward()
assert torch.isfinite(c.grad).all()
assert not cpp.loaded() and registry.unavailable_reason("cpp") is None, registry.unavailable_reason("cpp")
try:
    dpo_fast.preference_loss(c, c, c, c, backend="cpp")
except ValueError as error:
    print(error)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DPO_FAST_BACKEND")}
    env.update(
        CXX=str(tmp_path / "no-compiler"),
        CC=str(tmp_path / "no-compiler"),
        TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "preference_loss has no 'cpp' backend" in result.stdout
    assert "arning" not in result.stderr, result.stderr
    assert not (tmp_path / "extensions").exists()


# ------------------------------------------------------------------------------- TRL ------


class _StubLM(torch.nn.Module):
    """Returns fixed per-token log-probs in the shape of TRL's fused LM head output."""

    def __init__(self, per_token: torch.Tensor):
        super().__init__()
        self.per_token = per_token

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, use_cache=False):
        zeros = torch.zeros_like(self.per_token)
        return types.SimpleNamespace(
            log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def trl_dpo(pairs: dict, loss_type, *, beta=0.1, label_smoothing=0.0, loss_weights=None, **options):
    """TRL 1.16's ``DPOTrainer._compute_loss`` on these log-probs (see the module docstring).

    Returns ``(loss, grad_chosen, grad_rejected, metrics, chosen_logps, rejected_logps)``,
    the last two being the sums TRL saw (the per-token split rounds).
    """
    from trl import DPOTrainer

    c, r = pairs["chosen_logps"], pairs["rejected_logps"]
    P = c.shape[0]
    lengths = torch.cat([pairs["chosen_lengths"], pairs["rejected_lengths"]])
    T = int(lengths.max()) + 2
    completion_mask = torch.zeros(2 * P, T, dtype=torch.long)
    per_token = torch.zeros(2 * P, T - 1)
    for i, (logp, n) in enumerate(zip(torch.cat([c, r]).tolist(), lengths.tolist(), strict=True)):
        completion_mask[i, 1 : 1 + n] = 1  # the first token is the prompt
        # spread over the completion tokens (TRL's "sft" reads them); no tokens: one unmasked slot
        per_token[i, : max(n, 1)] = logp / max(n, 1)
    per_token.requires_grad_(True)
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.model = _StubLM(per_token).train()
    trainer.accelerator = types.SimpleNamespace(
        device=c.device, gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer.args = types.SimpleNamespace(discopop_tau=options.get("discopop_tau", 0.05))
    trainer.loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer.loss_weights = loss_weights or [1.0] * len(trainer.loss_types)
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    trainer.f_divergence_type = options.get("f_divergence", "reverse_kl")
    trainer.f_alpha_divergence_coef = options.get("f_alpha", 0.5)
    trainer.aux_loss_enabled, trainer.ld_alpha, trainer.use_weighting = False, None, False
    trainer.precompute_ref_logps = True
    trainer._metrics = {"train": collections.defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    inputs = {
        "input_ids": torch.zeros(2 * P, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * P, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": pairs["ref_chosen_logps"],
        "ref_rejected_logps": pairs["ref_rejected_logps"],
    }
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    loss.backward()
    grad = per_token.grad[:, 0]  # every token of a row has d loss / d (row sum)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    sums = per_token.detach().sum(1)
    return loss.detach(), grad[:P], grad[P:], metrics, sums[:P], sums[P:]


def compare_with_trl_dpo(loss_type, pairs, *, label_smoothing=0.0, **options):
    pytest.importorskip("trl")
    loss, grad_c, grad_r, metrics, c, r = trl_dpo(
        pairs, loss_type, label_smoothing=label_smoothing, **options
    )
    kwargs = {
        **call_kwargs(loss_type, {**pairs, "chosen_logps": c, "rejected_logps": r}),
        "label_smoothing": label_smoothing,
    }
    if not torch.isfinite(loss):
        # TRL's DiscoPOP multiplies exp(-logits / tau) by a vanishing sigmoid: with the
        # forward-KL logits (exponentials of the log-ratios) that is inf * 0 = nan, where
        # ours, written in log space, stays finite (its values are checked against float64)
        assert "discopop" in ([loss_type] if isinstance(loss_type, str) else loss_type)
        for backend in BACKENDS:
            assert torch.isfinite(run(backend, kwargs, **options)[0].loss)
        return
    # TRL evaluates its own fp32 formulas (other operation orders, no clamping): two fp32
    # evaluations agree to ~1e-4; precision itself is checked against float64 above
    rtol = 1e-4
    for backend in BACKENDS:
        out, grads = run(backend, kwargs, **options)
        assert_close(out.loss, loss, rtol, f"{backend} loss")
        assert_close(grads["chosen_logps"], grad_c, rtol, f"{backend} grad chosen")
        assert_close(grads["rejected_logps"], grad_r, rtol, f"{backend} grad rejected")
        for name, value in out.metrics.items():
            assert_close(value, metrics[name], rtol, f"{backend} {name}")


@pytest.mark.parametrize("loss_type", DPO_TRAINER_TYPES)
def test_matches_trl_dpo_trainer(loss_type):
    # TRL's "sigmoid" has no label smoothing (cDPO is checked against CPOTrainer below)
    eps = SMOOTHING.get(loss_type, 0.1 if loss_type in ("aot", "aot_unpaired") else 0.0)
    # zero-token completions clamp to one; TRL's "sft" averages over real tokens only
    pairs = make_pairs(13, min_length=1 if loss_type == "sft" else 0)
    compare_with_trl_dpo(loss_type, pairs, label_smoothing=eps, beta=0.2)


@pytest.mark.parametrize("f_divergence,f_alpha", F_DIVS)
def test_f_divergences_match_trl(f_divergence, f_alpha):
    for loss_type in sorted(F_DIVERGENCE_LOSS_TYPES - {"sft"}):
        eps = SMOOTHING.get(loss_type, 0.0)
        pairs = make_pairs(7)
        compare_with_trl_dpo(
            loss_type, pairs, label_smoothing=eps, f_divergence=f_divergence, f_alpha=f_alpha
        )


def test_mpo_mixture_matches_trl():
    pairs = make_pairs(11, min_length=1)
    compare_with_trl_dpo(["sigmoid", "bco_pair", "sft"], pairs, loss_weights=[0.8, 0.2, 1.0])


def _reference_free_leaves(pairs):
    c = pairs["chosen_logps"].clone().requires_grad_(True)
    r = pairs["rejected_logps"].clone().requires_grad_(True)
    nll = (0.5 + torch.rand(())).requires_grad_(True)
    return c, r, nll


@pytest.mark.parametrize(
    "loss_type,label_smoothing", [("cpo", 0.0), ("cpo", 0.1), ("simpo", 0.0), ("simpo", 0.1)]
)
def test_cpo_and_simpo_match_trl(loss_type, label_smoothing):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    pairs = make_pairs(9, min_length=1)
    c, r, nll = _reference_free_leaves(pairs)
    trainer = CPOTrainer.__new__(CPOTrainer)
    trainer.beta, trainer.label_smoothing, trainer.alpha = 0.2, label_smoothing, 0.0
    trainer.loss_type = "sigmoid" if loss_type == "cpo" else "simpo"
    trainer.simpo_gamma = 0.7
    trainer.accelerator = types.SimpleNamespace(device=c.device)
    if loss_type == "simpo":  # CPOTrainer averages the log-probs for simpo
        seen_c, seen_r = c / pairs["chosen_lengths"], r / pairs["rejected_lengths"]
        losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(seen_c, seen_r)
        loss = losses.mean()
        inputs = [c, r]
    else:  # TRL: losses.mean() + cpo_alpha * nll_loss, cpo_alpha = 1
        seen_c, seen_r = c, r
        losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(c, r)
        loss = losses.mean() + nll
        inputs = [c, r, nll]
    expected_grads = torch.autograd.grad(loss, inputs)
    kwargs = {**pairs, "label_smoothing": label_smoothing, "loss_type": loss_type}
    kwargs.pop("ref_chosen_logps"), kwargs.pop("ref_rejected_logps")
    if loss_type == "cpo":
        kwargs["chosen_nll"] = nll.detach()
    for backend in BACKENDS:
        out, grads = run(backend, kwargs, beta=0.2, simpo_gamma=0.7)
        assert_close(out.loss, loss.detach(), 2e-5, backend)
        for got, want in zip(grads.values(), expected_grads, strict=True):
            assert_close(got, want, 2e-5, f"{backend} grads")
        assert_close(out.chosen_rewards, chosen_rewards, 2e-5, "rewards")
        assert_close(out.metrics["rewards/margins"], (chosen_rewards - rejected_rewards).mean(), 2e-5)
        assert_close(out.metrics["rewards/accuracies"], (chosen_rewards > rejected_rewards).float().mean())
        assert_close(out.metrics["logps/chosen"], seen_c.detach().mean(), 2e-5)


def test_cdpo_matches_trl_cpo_smoothed_sigmoid():
    """cDPO = DPO's sigmoid with label smoothing; TRL 1.16 keeps that form in CPOTrainer, which
    equals DPO with zero reference log-probs."""
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    pairs = make_pairs(10)
    trainer = CPOTrainer.__new__(CPOTrainer)
    trainer.beta, trainer.label_smoothing, trainer.alpha, trainer.loss_type = 0.1, 0.25, 0.0, "sigmoid"
    trainer.accelerator = types.SimpleNamespace(device="cpu")
    c, r, _ = _reference_free_leaves(pairs)
    xc, xr = c - pairs["ref_chosen_logps"], r - pairs["ref_rejected_logps"]
    losses, _, _ = trainer.cpo_loss(xc, xr)
    expected = torch.autograd.grad(losses.mean(), [c, r])
    for backend in BACKENDS:
        out, grads = run(backend, call_kwargs("sigmoid", pairs, 0.25))
        assert_close(out.loss, losses.mean().detach(), 2e-5)
        assert_close(grads["chosen_logps"], expected[0], 2e-5)
        assert_close(grads["rejected_logps"], expected[1], 2e-5)


def test_orpo_matches_trl():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    pairs = make_pairs(9, min_length=1)
    c, r, nll = _reference_free_leaves(pairs)
    trainer = ORPOTrainer.__new__(ORPOTrainer)
    trainer.beta = 0.2
    trainer.accelerator = types.SimpleNamespace(device=c.device)
    seen_c, seen_r = c / pairs["chosen_lengths"], r / pairs["rejected_lengths"]
    losses, chosen_rewards, _, log_odds_ratio, log_odds_chosen = trainer.odds_ratio_loss(seen_c, seen_r)
    loss = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    expected = torch.autograd.grad(loss, [c, r, nll])
    kwargs = call_kwargs("orpo", pairs)
    kwargs["chosen_nll"] = nll.detach()
    for backend in BACKENDS:
        out, grads = run(backend, kwargs, beta=0.2)
        assert_close(out.loss, loss.detach(), 2e-5, backend)
        for got, want in zip(grads.values(), expected, strict=True):
            assert_close(got, want, 2e-5, f"{backend} grads")
        assert_close(out.metrics["log_odds_ratio"], log_odds_ratio.detach(), 2e-5)
        assert_close(out.metrics["log_odds_chosen"], log_odds_chosen.detach(), 2e-5)
        assert_close(out.metrics["rewards/chosen"], chosen_rewards.mean(), 2e-5)
        assert_close(out.metrics["nll_loss"], nll.detach(), 2e-5)


# ------------------------------------------------------------------------- bad input ------


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"loss_type": "dpo"}, ValueError, r"unknown loss_type 'dpo'.*'sigmoid', 'hinge'"),
        ({"loss_type": []}, ValueError, "at least one"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, ValueError, "one weight per loss type"),
        ({"rejected_logps": torch.zeros(5)}, ValueError, r"rejected_logps must have the shape.*\(4,\)"),
        ({"ref_chosen_logps": torch.zeros(4, 1)}, ValueError, "ref_chosen_logps must have the shape"),
        ({"chosen_logps": torch.zeros(2, 2), "rejected_logps": torch.zeros(2, 2)}, ValueError, r"\(P,\)"),
        ({"chosen_logps": torch.zeros(0), "rejected_logps": torch.zeros(0)}, ValueError, "P >= 1"),
        ({"chosen_logps": torch.zeros(4, dtype=torch.int64)}, TypeError, "chosen_logps must be float"),
        ({"chosen_logps": [0.0] * 4}, TypeError, "must be a torch.Tensor"),
        (
            {"loss_type": "exo_pair", "label_smoothing": 0.0},
            ValueError,
            r"exo_pair needs label_smoothing in \(0, 1\)",
        ),
        (
            {"loss_type": "robust", "label_smoothing": 0.5},
            ValueError,
            r"robust needs label_smoothing in \[0, 0.5\)",
        ),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
        (
            {"loss_type": "ipo", "chosen_lengths": None, "rejected_lengths": None},
            ValueError,
            r"\['ipo'\] need the",
        ),
        ({"rejected_lengths": None}, ValueError, "both chosen_lengths and rejected_lengths"),
        ({"beta": -0.1}, ValueError, "beta must be a finite number > 0, got -0.1"),
        ({"beta": 0.0}, ValueError, "beta must be"),
        ({"ref_rejected_logps": None}, ValueError, "both ref_chosen_logps and ref_rejected_logps"),
        ({"ref_chosen_logps": None, "ref_rejected_logps": None}, ValueError, "need the reference log-probs"),
        ({"loss_type": "simpo"}, ValueError, "reference-free"),
        ({"loss_type": ["simpo", "sigmoid"]}, ValueError, "define rewards differently"),
        ({"loss_type": ["simpo", "cpo"]}, ValueError, "define rewards differently"),
        ({"chosen_lengths": torch.zeros(4, dtype=torch.bool)}, TypeError, "token counts"),
        # issue 14: negative counts were accepted
        (
            {"chosen_lengths": torch.tensor([1, -2, 3, 4])},
            ValueError,
            "chosen_lengths must be token counts >= 0, found -2",
        ),
        (
            {"rejected_lengths": torch.tensor([1.0, math.nan, 3.0, 4.0])},
            ValueError,
            "rejected_lengths must be token counts >= 0, found nan",
        ),
        (
            {"chosen_lengths": torch.ones(4, 1)},
            ValueError,
            "chosen_lengths must have the shape of chosen_logps",
        ),
        ({"simpo_gamma": math.inf, "loss_type": "simpo"}, ValueError, "simpo_gamma must be a finite number"),
        ({"backend": "cpp"}, ValueError, "preference_loss has no 'cpp' backend"),
        ({"f_divergence": "kl"}, ValueError, "f_divergence must be one of"),
        (
            {"f_divergence": "js_divergence", "loss_type": "nca_pair"},
            ValueError,
            r"only defined for.*nca_pair",
        ),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, ValueError, "discopop_tau must be > 0"),
        ({"reduction": "batchmean"}, ValueError, "reduction must be one of"),
        ({"chosen_nll": torch.tensor(1.0)}, ValueError, "chosen_nll is used by orpo and cpo only"),
        ({"bco_delta": torch.zeros(3)}, ValueError, "bco_delta must be a float or a 0-dim tensor"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_input(change, error, match):
    kwargs = {**call_kwargs("sigmoid", make_pairs(4)), "label_smoothing": 0.0, **change}
    with pytest.raises(error, match=match):
        preference_loss(**kwargs)


def test_bad_reference_free_input():
    pairs = make_pairs(4)
    no_ref = {k: v for k, v in pairs.items() if not k.startswith("ref_")}
    with pytest.raises(ValueError, match="orpo needs chosen_nll"):
        preference_loss(**no_ref, loss_type="orpo")
    with pytest.raises(ValueError, match=r"chosen_nll must have shape \(\) or \(4,\)"):
        preference_loss(**no_ref, loss_type="orpo", chosen_nll=torch.ones(3))
    with pytest.raises(ValueError, match=r"\['simpo'\] need the completion token counts"):
        preference_loss(no_ref["chosen_logps"], no_ref["rejected_logps"], loss_type="simpo")


# ------------------------------------------------------------------------------- GPU ------


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gpu_matches_reference_at_size(loss_type):
    P = 8192 + 3
    kwargs = call_kwargs(loss_type, make_pairs(P, device="cuda"))
    cpu64 = to64({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    upstream = torch.randn(P, device="cuda")
    for reduction, grad_output in (("none", upstream), ("mean", None)):
        out, grads = run("triton", kwargs, grad_output, reduction=reduction)
        ref, ref_grads = run(
            "torch", cpu64, None if grad_output is None else grad_output.cpu(), reduction=reduction
        )
        assert_close(out.loss.cpu(), ref.loss, 1e-4, "loss")
        for name in grads:
            assert_close(grads[name].cpu(), ref_grads[name], 1e-4, f"grad {name}")
        for name in ref.metrics:
            assert_close(out.metrics[name].cpu(), ref.metrics[name], 1e-4, name)


@pytest.mark.gpu
def test_gpu_no_host_sync_and_cuda_graph():
    """No host synchronization (the token counts' values are checked eagerly, one read: this
    call has none) and a CUDA graph capture, where the value checks are skipped, replays with
    the results of eager calls."""
    pairs = make_pairs(512, device="cuda")
    no_counts = call_kwargs(["sigmoid", "aot"], {k: v for k, v in pairs.items() if "lengths" not in k})
    c = no_counts.pop("chosen_logps").clone().requires_grad_(True)
    preference_loss(c, **no_counts).loss.backward()  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = preference_loss(c, **no_counts)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    kwargs = call_kwargs(["sigmoid", "aot", "sft"], pairs)
    kwargs.pop("chosen_logps")
    graph = torch.cuda.CUDAGraph()
    static = c.detach().clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        preference_loss(static, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        captured = preference_loss(static, **kwargs).loss
    static.copy_(c.detach() - 1.0)
    graph.replay()
    expected = preference_loss(c.detach() - 1.0, **kwargs).loss
    assert torch.equal(captured, expected)
    assert math.isfinite(float(expected))


@pytest.mark.gpu
def test_gpu_one_compiled_kernel_per_set_of_loss_types():
    """Weights and options are run-time values: new values reuse the compiled kernels; only a
    new set of loss types compiles new ones."""
    from dpo_fast.kernels import preference_loss as kernels

    kwargs = call_kwargs(["sigmoid", "bco_pair", "sft"], make_pairs(300, device="cuda"))
    forward, backward = kernels._preference_loss_forward_kernel, kernels._preference_loss_backward_kernel

    def compiled() -> int:
        device = torch.cuda.current_device()
        return len(forward.device_caches[device][0]) + len(backward.device_caches[device][0])

    run("triton", kwargs, loss_weights=[0.8, 0.2, 1.0])
    before = compiled()
    for weights, beta in (([0.1, 0.5, 2.0], 0.1), ([1.0, 1.0, 0.0], 0.7)):
        run("triton", kwargs, loss_weights=weights, beta=beta, bco_delta=0.2)
    assert compiled() == before
    run("triton", {**kwargs, "loss_type": ["sigmoid", "sft"]})
    assert compiled() == before + 2


@pytest.mark.gpu
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_gpu_torch_compile_triton(compiler):
    """Compiled Triton kernels under torch.compile(fullgraph=True): Inductor's generated code
    launches our kernels itself (triton_op), with the results and gradients of eager mode."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    kwargs = call_kwargs(["sigmoid", "aot", "sft", "bco_pair"], make_pairs(777, device="cuda"))
    c = kwargs.pop("chosen_logps").clone().requires_grad_(True)

    def fn(chosen):
        out = preference_loss(chosen, **kwargs, backend="triton")
        return out.loss, out.metrics["rewards/margins"], out.chosen_rewards

    compiled = torch.compile(fn, backend=compiler, fullgraph=True)
    if compiler == "inductor":
        got, code = run_and_get_code(compiled, c)
        assert "_preference_loss_forward_kernel" in "\n".join(code)
    else:
        got = compiled(c)
    expected = fn(c)
    for a, b in zip(got, expected, strict=True):
        assert_close(a.cpu(), b.cpu(), 1e-6)
    assert_close(torch.autograd.grad(got[0], c)[0].cpu(), torch.autograd.grad(expected[0], c)[0].cpu(), 1e-6)
