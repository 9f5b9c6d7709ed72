"""Every operator of the ``dpo_fast`` namespace passes ``torch.library.opcheck``: schema, fake
(meta) implementation, autograd registration and AOT dispatch with dynamic shapes.

The test enumerates the namespace after loading every (op, backend) of the registry that this
machine can run (Triton through the interpreter on CPU), so an operator without sample
inputs here fails the test instead of skipping the check.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_labels

from dpo_fast import registry
from dpo_fast.constants import STAT_NAMES
from dpo_fast.ops.library import stat_mask

ALL_STATS = stat_mask(STAT_NAMES)
# opcheck's checks for operators whose results are arbitrary bits (uninitialized memory)
SCHEMA_AND_FAKE = ("test_schema", "test_faketensor")
# keep_tile=True hands the forward's logits tile to the first backward, which overwrites it: an
# eager-only optimisation (a traced graph recomputes the tile), so eager and AOT results differ
# in that output after backward by design
EAGER_ONLY = ("test_schema", "test_autograd_registration", "test_faketensor")


def _load_everything() -> None:
    for op in registry.OPS:
        for backend in registry.backends(op):
            if registry._runs_on(backend, "cpu"):
                registry.load(op, backend)


def _registered() -> set[str]:
    return {
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("dpo_fast::")
    }


def _logprobs_samples():
    logits = (torch.randn(2, 5, 37) * 3).requires_grad_()
    labels = make_labels((2, 4), 37)  # a shifted batch: T' = T - 1
    forward = [
        (logits, labels, -100, 0.7, 3.0, ALL_STATS, False),
        (logits, make_labels((2, 5), 37, ignore_index=5), 5, 1.0, None, 0, True),
    ]
    logp = torch.randn(2, 4)
    lse = torch.randn(2, 4).abs() + 4.0
    backward = [
        (torch.randn(2, 4), logits.detach(), labels, logp, lse, torch.empty(2, 5, 37), -100, 0.7, 3.0)
    ]
    return forward, backward


def _linear_samples():
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = (torch.randn(37, 8) * 0.5).requires_grad_()
    bias = torch.randn(37, requires_grad=True)
    labels = make_labels((2, 4), 37)
    forward = [
        (hidden, weight, bias, labels, -100, 0.7, 3.0, ALL_STATS, torch.float32, False),
        (hidden, weight, None, make_labels((2, 5), 37), -100, 1.0, None, 0, torch.float32, True),
    ]
    # a backward that starts from a kept tile needs the tile its forward left: run that forward
    registry.load("linear_logprobs", "torch")
    with torch.no_grad():
        logp, lse, _, tile = torch.ops.dpo_fast.linear_logprobs_forward_torch(
            hidden, weight, bias, labels, -100, 0.7, None, 0, torch.float32, True
        )
    args = (hidden.detach(), weight.detach(), bias.detach(), labels, logp, lse)
    backward = [
        (torch.randn(2, 4), *args, torch.empty(0, 37), -100, 0.7, 3.0, torch.float32, [True, True, True]),
        (torch.randn(2, 4), *args, tile, -100, 0.7, None, torch.float32, [False, True, False]),
    ]
    return forward, backward


def _preference_loss_samples():
    """The Triton loss operators' arguments as real calls build them (``forward_arguments``)."""
    registry.load("preference_loss", "triton")
    from dpo_fast import PreferenceLossSpec
    from dpo_fast.ops.preference_loss import forward_arguments
    from dpo_fast.preference_loss import PreferenceLossInputs

    P = 7
    c, r, rc, rr = (-1 - 20 * torch.rand(P) for _ in range(4))
    lengths = torch.randint(1, 9, (P,))
    calls = [
        (
            PreferenceLossInputs(c, r, rc, rr, lengths, lengths + 1, None, torch.tensor(0.2)),
            "mean",
            "sigmoid",
        ),
        (PreferenceLossInputs(c, r, None, None, lengths, lengths, torch.rand(P), 0.0), "none", "orpo"),
    ]
    forward, backward = [], []
    for inputs, reduction, loss_type in calls:
        types = [loss_type, "sft", "aot", "sigmoid"] if loss_type == "ipo" else [loss_type]
        spec = PreferenceLossSpec(loss_type=types, reduction=reduction)
        x, params, *options = forward_arguments(inputs, spec)
        forward.append((x.requires_grad_(True), params, *options))
        grad = torch.randn(P) if reduction == "none" else torch.randn(())
        loss_mask, rows_present, f_divergence, _, reduction_index = options
        backward.append((grad, x.detach(), params, loss_mask, rows_present, f_divergence, reduction_index))
    return forward, backward


Sample = tuple[tuple, tuple[str, ...] | None]  # (arguments, the opcheck tests to run; None: all)


def _samples() -> dict[str, list[Sample]]:
    """Operator name -> its samples."""
    samples: dict[str, list[Sample]] = {}
    for op, make in (("logprobs", _logprobs_samples), ("linear_logprobs", _linear_samples)):
        forward, backward = make()
        for backend in registry.backends(op):
            samples[f"{op}_forward_{backend}"] = [
                (args, EAGER_ONLY if op == "linear_logprobs" and args[-1] else None) for args in forward
            ]
            samples[f"{op}_backward_{backend}"] = [(args, None) for args in backward]
    forward, backward = _preference_loss_samples()
    samples["preference_loss_forward_triton"] = [(args, None) for args in forward]
    samples["preference_loss_backward_triton"] = [(args, None) for args in backward]
    samples["cached_empty_cpu"] = [(([3, 4], torch.float16), SCHEMA_AND_FAKE)]
    samples["empty_cache_cpu"] = [((), ("test_schema",))]
    return samples


def test_every_operator_has_samples():
    _load_everything()
    missing = _registered() - set(_samples())
    assert not missing, f"operators without opcheck samples in tests/test_ops.py: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(_samples()))
def test_opcheck(name):
    _load_everything()
    if name not in _registered():
        pytest.skip(f"dpo_fast::{name} is not registered on this machine (its backend cannot run here)")
    operator = getattr(torch.ops.dpo_fast, name)
    for args, tests in _samples()[name]:
        kwargs = {} if tests is None else {"test_utils": tests}
        torch.library.opcheck(operator, args, **kwargs)
