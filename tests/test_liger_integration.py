"""dpo_fast.integrations.liger against liger_kernel itself (its pure-PyTorch path on CPU).

Liger's own test files run against this module in ``tests/test_peer_suites.py`` and
``make peer-tests``; here: what those files do not cover (float64 inputs, bias on the
logits-means identity, the structure of the aux outputs, gradients scaled by backward).
"""

import pytest
import torch

liger_chunked = pytest.importorskip("liger_kernel.chunked_loss")

import dpo_fast.integrations.liger as ours  # noqa: E402

NAMES = ("DPO", "CPO", "SimPO", "ORPO")


def inputs(P=2, T=9, H=12, V=29, dtype=torch.float32, bias=True):
    target = torch.randint(0, V, (2 * P, T))
    target[:, :3] = -100  # prompt
    target[1, 6:] = -100  # padding
    return {
        "_input": torch.randn(2 * P, T, H, dtype=dtype),
        "weight": 0.5 * torch.randn(V, H, dtype=dtype),
        "target": target,
        "bias": torch.randn(V, dtype=dtype) if bias else None,
        "ref_input": torch.randn(2 * P, T, H, dtype=dtype),
        "ref_weight": 0.5 * torch.randn(V, H, dtype=dtype),
    }


def call(module, x, grad_scale=1.0):
    leaves = {
        k: x[k].detach().clone().requires_grad_(True)
        for k in ("_input", "weight", "bias")
        if x[k] is not None
    }
    args = [leaves["weight"], leaves["_input"], x["target"], leaves.get("bias")]
    if isinstance(module, (ours.LigerFusedLinearDPOLoss, liger_chunked.LigerFusedLinearDPOLoss)):
        args += [x["ref_input"], x["ref_weight"], None]
    loss, aux = module(*args)
    (grad_scale * loss).backward()
    return loss, aux, [leaf.grad for leaf in leaves.values()]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compute_nll_loss", [True, False])
def test_matches_liger(name, dtype, compute_nll_loss):
    x = inputs(dtype=dtype)
    theirs_cls = getattr(liger_chunked, f"LigerFusedLinear{name}Loss")
    ours_cls = getattr(ours, f"LigerFusedLinear{name}Loss")
    loss, aux, grads = call(ours_cls(beta=0.3, compute_nll_loss=compute_nll_loss), x, grad_scale=2.5)
    ref_loss, ref_aux, ref_grads = call(
        theirs_cls(beta=0.3, compute_nll_loss=compute_nll_loss, compiled=False), x, grad_scale=2.5
    )
    assert len(aux) == len(ref_aux) == (9 if name == "ORPO" else 7)
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=1e-4, atol=1e-5)
    for i, (a, b) in enumerate(zip(aux, ref_aux, strict=True)):
        b = torch.as_tensor(b, dtype=torch.float64)
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"aux[{i}]: {m}")
    if not compute_nll_loss:
        assert float(aux[4]) == 0.0
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)


def test_logits_mean_without_logits_matches_materialized():
    x = inputs(P=3, T=5, H=7, V=41, dtype=torch.float64)
    _, aux = ours.liger_fused_linear_dpo(
        x["_input"], x["weight"], x["target"], x["bias"], None, None, None, -100, 0.1, False, False, False
    )
    logits = x["_input"] @ x["weight"].T + x["bias"]
    torch.testing.assert_close(aux[2].double(), logits[:3].mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux[3].double(), logits[3:].mean(), rtol=1e-5, atol=1e-6)


def test_construction_checks_and_bad_input():
    with pytest.raises(ValueError, match="Unsupported loss_type"):
        ours.LigerFusedLinearDPOLoss(loss_type="ipo")
    with pytest.raises(ValueError, match="exo_pair"):
        ours.LigerFusedLinearDPOLoss(loss_type="exo_pair")
    x = inputs()
    with pytest.raises(ValueError, match="ref_input"):
        ours.LigerFusedLinearDPOLoss()(x["weight"], x["_input"], x["target"])
    with pytest.raises(ValueError, match=r"_input must be \(2B, T, H\)"):
        ours.LigerFusedLinearCPOLoss()(x["weight"], x["_input"][:3], x["target"][:3])
