"""Tests of ``dpo_fast.FusedLinearPreferenceLoss``: against Liger's fused-linear preference
modules (the same call, the loss types both support) and against a dense float64 oracle
(materialized logits -> log_softmax -> sums -> the float64 reference of
``preference_loss``), with gradients for the hidden states, the weight and the bias.

Liger's convention, which the module keeps by default: no label shift (``hidden[:, t]``
scores ``labels[:, t]``), chosen rows first, ``ignore_index`` marks prompt and padding.
"""

from __future__ import annotations

import pytest
import torch

from dpo_fast import FusedLinearPreferenceLoss, preference_loss
from dpo_fast.formulas import dense_token_logprobs

LIGER_DPO_TYPES = [
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
]
SMOOTHING = {"exo_pair": 0.05, "robust": 0.2}


def make_head(P=3, T=7, H=16, V=37, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Hidden states of P pairs (chosen rows first), a vocabulary that is not a power of two,
    prompts and padding marked -100, one completion of a single token."""
    labels = torch.randint(0, V, (2 * P, T))
    labels[:, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    labels[P, :-1] = -100  # a one-token completion
    head = {
        "lin_weight": 0.3 * torch.randn(V, H),
        "hidden": torch.randn(2 * P, T, H),
        "labels": labels,
        "bias": torch.randn(V),
        "ref_hidden": torch.randn(2 * P, T, H),
        "ref_weight": 0.3 * torch.randn(V, H),
        "ref_bias": torch.randn(V),
    }
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in head.items()}


def forward_and_grads(module, head: dict, **extra):
    """``(loss, aux, grads of hidden, weight, bias)`` of one module call."""
    leaves = {k: head[k].detach().clone().requires_grad_(True) for k in ("hidden", "lin_weight", "bias")}
    args = {**head, **leaves}
    positional = [args["lin_weight"], args["hidden"], args["labels"], args["bias"]]
    if "ref_hidden" in args:  # Liger's reference-free modules take four arguments
        positional += [args["ref_hidden"], args["ref_weight"], args["ref_bias"]]
    loss, aux = module(*positional, **extra)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), aux, grads


def assert_close(actual, expected, rtol=1e-5, name=""):
    expected = torch.as_tensor(expected).detach().double()
    actual = torch.as_tensor(actual).detach().double()
    atol = rtol * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def compare(ours, theirs, rtol=1e-5, nll=True):
    (loss, aux, grads), (ref_loss, ref_aux, ref_grads) = ours, theirs
    assert_close(loss, ref_loss, rtol, "loss")
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(got, want, rtol, f"grad {name}")
    # Liger's aux: chosen/rejected logps, logits means, nll (0 unless computed), rewards
    for index in (0, 1, 4, 5, 6) if nll else (0, 1, 5, 6):
        assert_close(aux[index], ref_aux[index], rtol, f"aux[{index}]")


@pytest.mark.parametrize("loss_type", LIGER_DPO_TYPES)
def test_matches_liger_dpo(loss_type):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    head = make_head()
    nll = loss_type in ("sigmoid", "bco_pair", "discopop")
    options = dict(beta=0.2, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0))
    options.update(compute_nll_loss=nll, alpha=0.7)
    theirs = forward_and_grads(LigerFusedLinearDPOLoss(compiled=False, **options), head)
    for backend in ("torch", "triton") if loss_type == "sigmoid" else ("torch",):
        compare(
            forward_and_grads(FusedLinearPreferenceLoss(backend=backend, **options), head), theirs, nll=nll
        )


@pytest.mark.parametrize("variant", ["no_ref_model", "average_log_prob"])
def test_matches_liger_options(variant):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    head = make_head()
    if variant == "no_ref_model":
        options = {"use_ref_model": False}
        head = {k: v for k, v in head.items() if not k.startswith("ref_")}
    else:
        options = {"average_log_prob": True}
    ours = forward_and_grads(FusedLinearPreferenceLoss(beta=0.3, **options), head)
    compare(
        ours, forward_and_grads(LigerFusedLinearDPOLoss(beta=0.3, compiled=False, **options), head), nll=False
    )


@pytest.mark.parametrize("loss_type", ["cpo", "simpo", "orpo"])
def test_matches_liger_reference_free(loss_type):
    from liger_kernel.chunked_loss import (
        LigerFusedLinearCPOLoss,
        LigerFusedLinearORPOLoss,
        LigerFusedLinearSimPOLoss,
    )

    head = {k: v for k, v in make_head().items() if not k.startswith("ref_")}
    if loss_type == "cpo":
        liger = LigerFusedLinearCPOLoss(beta=0.2, alpha=0.6, label_smoothing=0.1, compiled=False)
        options = dict(alpha=0.6, label_smoothing=0.1, compute_nll_loss=True)
    elif loss_type == "simpo":
        liger = LigerFusedLinearSimPOLoss(beta=0.2, alpha=0.6, gamma=0.3, compiled=False)
        options = dict(alpha=0.6, simpo_gamma=0.3, compute_nll_loss=True)
    else:
        liger = LigerFusedLinearORPOLoss(beta=0.2, compiled=False)
        options = {}
    ours = forward_and_grads(FusedLinearPreferenceLoss(beta=0.2, loss_type=loss_type, **options), head)
    theirs = forward_and_grads(liger, head)
    assert_close(ours[0], theirs[0], 1e-5, "loss")
    for got, want in zip(ours[2], theirs[2], strict=True):
        assert_close(got, want, 1e-5, "grads")


def dense_oracle(head: dict, *, shift: bool, loss_kwargs: dict, precomputed: bool):
    """Loss and gradients from materialized float64 logits and the float64 loss reference."""
    h = head["hidden"].double().requires_grad_(True)
    w = head["lin_weight"].double().requires_grad_(True)
    b = head["bias"].double().requires_grad_(True)
    labels = head["labels"]
    P = labels.shape[0] // 2

    def sums(hidden, weight, bias):
        per_token = dense_token_logprobs(hidden @ weight.T + bias, labels, shift=shift)
        scored = (labels[:, 1:] if shift else labels) != -100
        return per_token.sum(-1), scored.sum(-1)

    logps, counts = sums(h, w, b)
    kwargs = dict(loss_kwargs)
    if precomputed:
        kwargs["ref_chosen_logps"], kwargs["ref_rejected_logps"] = (
            head["ref_chosen_logps"].double(),
            head["ref_rejected_logps"].double(),
        )
    elif "ref_hidden" in head:
        with torch.no_grad():
            ref, _ = sums(head["ref_hidden"].double(), head["ref_weight"].double(), head["ref_bias"].double())
        kwargs["ref_chosen_logps"], kwargs["ref_rejected_logps"] = ref[:P], ref[P:]
    if "orpo" in kwargs["loss_type"]:
        kwargs["chosen_nll"] = -logps[:P].sum() / counts[:P].sum()
    out = preference_loss(
        logps[:P],
        logps[P:],
        chosen_lengths=counts[:P],
        rejected_lengths=counts[P:],
        backend="torch",
        **kwargs,
    )
    grads = torch.autograd.grad(out.loss, [h, w, b])
    return out.loss.detach(), out, grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "loss_kwargs,shift,precomputed",
    [
        ({"loss_type": "ipo", "beta": 0.5}, False, False),
        ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, True, False),
        ({"loss_type": "sigmoid_norm", "f_divergence": "js_divergence"}, False, True),
        ({"loss_type": "simpo", "simpo_gamma": 0.4}, True, False),
        ({"loss_type": "orpo"}, False, False),
        ({"loss_type": "aot", "label_smoothing": 0.1}, False, True),
    ],
)
def test_matches_dense_float64_oracle(loss_kwargs, shift, precomputed, backend):
    head = make_head(P=4)
    names = (
        loss_kwargs["loss_type"] if isinstance(loss_kwargs["loss_type"], list) else [loss_kwargs["loss_type"]]
    )
    if set(names) <= {"simpo", "orpo"}:
        head = {k: v for k, v in head.items() if not k.startswith("ref_")}
    extra = {}
    if precomputed:
        head.pop("ref_hidden")
        extra = {"ref_chosen_logps": -40 * torch.rand(4), "ref_rejected_logps": -40 * torch.rand(4)}
        head.update(extra)
    ref_loss, ref_out, ref_grads = dense_oracle(
        head, shift=shift, loss_kwargs=loss_kwargs, precomputed=precomputed
    )
    module = FusedLinearPreferenceLoss(shift=shift, backend=backend, **loss_kwargs)
    call_head = {k: v for k, v in head.items() if k not in extra}
    loss, aux, grads = forward_and_grads(module, call_head, **extra)
    assert_close(loss, ref_loss, 2e-5, "loss")
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(got, want, 2e-5, f"grad {name}")
    assert_close(aux.chosen_rewards, ref_out.chosen_rewards, 2e-5, "rewards")
    for name, value in ref_out.metrics.items():
        assert_close(aux.metrics[name], value, 2e-5, name)


def test_reference_defaults_to_the_policy_head_and_precomputed_matches():
    head = make_head()
    module = FusedLinearPreferenceLoss(beta=0.2)
    shared = {**head, "ref_weight": None, "ref_bias": None}
    loss, aux, _ = forward_and_grads(module, shared)
    again, _, _ = forward_and_grads(
        module,
        {k: v for k, v in head.items() if not k.startswith("ref_")},
        ref_chosen_logps=aux.ref_chosen_logps,
        ref_rejected_logps=aux.ref_rejected_logps,
    )
    assert torch.equal(loss, again)
    # the reference was the policy head on ref_hidden: different hidden, different log-probs
    assert not torch.equal(aux.ref_chosen_logps, aux.chosen_logps)


def test_metrics_and_logit_means():
    head = make_head()
    loss, aux, _ = forward_and_grads(FusedLinearPreferenceLoss(), head)
    logits = head["hidden"] @ head["lin_weight"].T + head["bias"]
    scored = head["labels"] != -100
    P = head["labels"].shape[0] // 2
    assert_close(aux.chosen_logits_mean, logits[:P][scored[:P]].mean(), 1e-5)
    assert_close(aux.metrics["logits/rejected"], logits[P:][scored[P:]].mean(), 1e-5)
    expected = {"rewards/chosen", "rewards/accuracies", "logps/chosen", "nll_loss", "logits/chosen"}
    assert expected <= aux.metrics.keys()
    assert not aux.chosen_logps.requires_grad and torch.isfinite(loss)


def test_bad_input():
    head = make_head()
    module = FusedLinearPreferenceLoss()
    with pytest.raises(ValueError, match="hidden must be"):
        module(head["lin_weight"], head["hidden"][:5], head["labels"][:5])
    with pytest.raises(ValueError, match="need reference log-probs"):
        module(head["lin_weight"], head["hidden"], head["labels"])
    with pytest.raises(ValueError, match="not both"):
        module(
            head["lin_weight"],
            head["hidden"],
            head["labels"],
            ref_hidden=head["ref_hidden"],
            ref_chosen_logps=torch.zeros(3),
            ref_rejected_logps=torch.zeros(3),
        )
    with pytest.raises(ValueError, match="unknown loss_type"):
        FusedLinearPreferenceLoss(loss_type="kto")
    with pytest.raises(ValueError, match="labels must have shape"):
        module(head["lin_weight"], head["hidden"], head["labels"][:, 1:], ref_hidden=head["ref_hidden"])


@pytest.mark.gpu
def test_gpu_matches_liger_bf16():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    head = {k: v.cuda() for k, v in make_head(P=2, T=256, H=256, V=32003, dtype=torch.bfloat16).items()}
    options = dict(beta=0.1, loss_type="sigmoid")
    ours = forward_and_grads(FusedLinearPreferenceLoss(**options), head)
    theirs = forward_and_grads(LigerFusedLinearDPOLoss(**options), head)
    assert_close(ours[0], theirs[0], 2e-2, "loss")
    for got, want in zip(ours[2], theirs[2], strict=True):
        assert_close(got.float(), want.float(), 5e-2, "grads")


def test_no_ref_model_ignores_reference_inputs():
    """use_ref_model=False scores against a reference of 0 even when reference inputs are
    passed (Liger's convention), instead of using them."""
    head = make_head()
    without = {k: v for k, v in head.items() if not k.startswith("ref_")}
    module = FusedLinearPreferenceLoss(beta=0.3, use_ref_model=False)
    compare(forward_and_grads(module, head), forward_and_grads(module, without))
    with_reference = forward_and_grads(FusedLinearPreferenceLoss(beta=0.3), head)
    assert not torch.isclose(with_reference[0], forward_and_grads(module, head)[0]), "reference was used"
    P = head["hidden"].shape[0] // 2
    with pytest.raises(ValueError, match="use_ref_model=False"):
        module(
            head["lin_weight"],
            head["hidden"],
            head["labels"],
            ref_chosen_logps=torch.zeros(P),
            ref_rejected_logps=torch.zeros(P),
        )
