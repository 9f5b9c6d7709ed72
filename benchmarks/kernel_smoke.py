"""A small run of every Triton kernel, checked against the PyTorch backend.

Meant to run under ``compute-sanitizer`` (memcheck, racecheck) on a GPU, where each launch
is slow: a few launches per kernel at small sizes, covering what changes the generated code
(bf16/fp32, a vocabulary that is not a multiple of 16, statistics, softcap, a temperature,
in-place backward, the fused linear path's tiles, the preference loss forward and backward).
Exits 1 if a result differs from the PyTorch backend's. On a machine without CUDA it runs
the same calls through Triton's interpreter (set ``TRITON_INTERPRET=1``).

Usage: ``python benchmarks/kernel_smoke.py``.
"""

from __future__ import annotations

import sys

import torch

import dpo_fast
from dpo_fast.constants import STAT_NAMES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIDES = ("chosen", "rejected")


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> list[str]:
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp_min(1.0)
    error = ((got - want).abs().max() / scale).item()
    return [] if error <= tolerance and torch.isfinite(got).all() else [f"{name}: relative error {error:.2e}"]


def core(vocab: int, dtype: torch.dtype, **options) -> list[str]:
    """token_logprobs forward and backward, Triton against the PyTorch backend."""
    logits = (3 * torch.randn(3, 7, vocab, device=DEVICE)).to(dtype)
    labels = torch.randint(0, vocab, (3, 7), device=DEVICE)
    labels[1, :3] = -100
    results = {}
    for backend in ("triton", "torch"):
        x = logits.clone().requires_grad_()
        out = dpo_fast.token_logprobs(x, labels, shift=True, backend=backend, **options)
        grad_out = torch.linspace(-1, 1, out.logps.numel(), device=DEVICE).view_as(out.logps)
        (out.logps * grad_out).sum().backward()
        results[backend] = (out, x.grad)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    label = f"token_logprobs V={vocab} {dtype} {options}"
    problems = _close(f"{label} logps", results["triton"][0].logps, results["torch"][0].logps, tolerance)
    problems += _close(f"{label} grad", results["triton"][1], results["torch"][1], tolerance)
    for name, value in results["triton"][0].stats.items():
        problems += _close(
            f"{label} {name}", value.float(), results["torch"][0].stats[name].float(), tolerance
        )
    return problems


def linear(vocab: int, dtype: torch.dtype) -> list[str]:
    """linear_token_logprobs (chunked): matmul tiles folded by the core kernels."""
    hidden = torch.randn(2, 9, 64, device=DEVICE).to(dtype)
    weight = (torch.randn(vocab, 64, device=DEVICE) / 8).to(dtype)
    labels = torch.randint(0, vocab, (2, 9), device=DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logps = dpo_fast.linear_token_logprobs(h, w, labels, shift=True, backend=backend).logps
        logps.sum().backward()
        results[backend] = (logps, h.grad, w.grad)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    names = ("logps", "grad hidden", "grad weight")
    return [
        problem
        for name, got, want in zip(names, results["triton"], results["torch"], strict=True)
        for problem in _close(f"linear V={vocab} {dtype} {name}", got, want, tolerance)
    ]


def loss(loss_type, **options) -> list[str]:
    """preference_loss forward (loss, rewards, metrics) and backward, Triton against PyTorch."""
    P = 37
    inputs = [-1 - 60 * torch.rand(P, device=DEVICE) for _ in range(4)]
    lengths = {
        f"{side}_lengths": torch.randint(1, 300, (P,), device=DEVICE) for side in ("chosen", "rejected")
    }
    results = {}
    for backend in ("triton", "torch"):
        chosen, rejected = (t.clone().requires_grad_() for t in inputs[:2])
        out = dpo_fast.preference_loss(
            chosen, rejected, *inputs[2:], loss_type=loss_type, backend=backend, **lengths, **options
        )
        out.loss.sum().backward()
        results[backend] = (out, chosen.grad, rejected.grad)
    label = f"preference_loss {loss_type}"
    (ours, *our_grads), (ref, *ref_grads) = results["triton"], results["torch"]
    problems = _close(f"{label} loss", ours.loss, ref.loss, 1e-4)
    for name in ref.metrics:
        problems += _close(f"{label} {name}", ours.metrics[name], ref.metrics[name], 1e-4)
    for got, want in zip(our_grads, ref_grads, strict=True):
        problems += _close(f"{label} grad", got, want, 1e-4)
    return problems


def main() -> int:
    torch.manual_seed(0)
    problems = []
    problems += core(50257, torch.bfloat16)
    problems += core(4096, torch.bfloat16, stats=STAT_NAMES, softcap=30.0)
    problems += core(1000, torch.float32, temperature=0.7, stats=("entropy", "is_top1"))
    problems += core(4099, torch.float16, inplace_backward=True)
    problems += linear(5000, torch.bfloat16)
    problems += loss("sigmoid")
    problems += loss(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    for problem in problems:
        print(f"MISMATCH {problem}")
    print(f"kernel smoke run on {DEVICE}: {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
