"""Preference losses: the loss op alone, and the whole fused head.

Part 1, the loss op: ``dpo_fast.preference_loss`` (one Triton launch forward, one backward on
CUDA, plus the torch ops that pack its inputs), with its options as keywords or as a
``PreferenceLossSpec`` built once, against its own PyTorch path and TRL 1.16's
``DPOTrainer._compute_loss`` (the
trainer's loss + metrics code, fed by a stub model whose per-token log-probs sum to the
same values; it reads its metrics on the host, as TRL does every step). Forward and
forward+backward time for 64..8192 pairs, and on CUDA the number of kernel launches.

Part 2, the head: ``dpo_fast.FusedLinearPreferenceLoss`` against Liger's
``LigerFusedLinearDPOLoss`` and a naive head (full logits, ``log_softmax``, gather, sums,
then the loss), sigmoid DPO with a reference head, one pair of T-token responses:
forward+backward time and peak memory.

Usage: ``python benchmarks/bench_loss.py [--pairs 64 8192] [--tokens 1024 4096] [--part loss|head|all]``.
Defaults: small sizes on CPU; pairs {64, 256, 1024, 4096, 8192} and T {1024, 4096, 16384},
H=4096, V=128256 bf16 on CUDA.
"""

from __future__ import annotations

import argparse
import collections
import types
from collections.abc import Callable

import torch

import dpo_fast

try:
    from common import median, peak_memory, print_table, synchronize, time_call, write_results
except ImportError:  # run as a module: python -m benchmarks.bench_loss
    from .common import median, peak_memory, print_table, synchronize, time_call, write_results

LOSSES = {
    "sigmoid": ("sigmoid", None),
    "ipo": ("ipo", None),
    "mpo": (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
}


def count_kernels(fn: Callable[[], object], device: torch.device) -> int | None:
    """CUDA kernels launched by ``fn()`` (None off CUDA)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


# ------------------------------------------------------------------------------ part 1 ----


def make_pairs(P: int, device: torch.device) -> dict[str, torch.Tensor]:
    c = -1 - 100 * torch.rand(P, device=device)
    r = -1 - 100 * torch.rand(P, device=device)
    return {
        "chosen_logps": c,
        "rejected_logps": r,
        "ref_chosen_logps": c + torch.randn(P, device=device),
        "ref_rejected_logps": r + torch.randn(P, device=device),
        "chosen_lengths": torch.randint(1, 512, (P,), device=device),
        "rejected_lengths": torch.randint(1, 512, (P,), device=device),
    }


class _StubLM(torch.nn.Module):
    """Per-token log-probs in the shape of TRL's fused LM head output."""

    def __init__(self, per_token: torch.Tensor):
        super().__init__()
        self.per_token = per_token

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, use_cache=False):
        zeros = torch.zeros_like(self.per_token)
        return types.SimpleNamespace(
            log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def trl_step(pairs: dict, loss_type, weights) -> Callable[[bool], None] | None:
    """TRL 1.16's DPOTrainer loss + metrics on a ``__new__`` trainer (see tests/test_preference_loss.py)."""
    try:
        from trl import DPOTrainer
    except ImportError:
        return None
    c, r = pairs["chosen_logps"], pairs["rejected_logps"]
    P, device = c.shape[0], c.device
    # one completion token per row carrying the whole sum; the counts only feed ipo's normalization
    per_token = torch.stack([torch.cat([c, r]), torch.zeros(2 * P, device=device)], dim=1)
    mask = torch.ones(2 * P, 3, dtype=torch.long, device=device)
    mask[:, 0] = 0
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.accelerator = types.SimpleNamespace(
        device=device, gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    trainer.args = types.SimpleNamespace(discopop_tau=0.05)
    trainer.loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer.loss_weights = weights or [1.0] * len(trainer.loss_types)
    trainer.beta, trainer.label_smoothing = 0.1, 0.0
    trainer.f_divergence_type, trainer.f_alpha_divergence_coef = "reverse_kl", 0.5
    trainer.aux_loss_enabled, trainer.ld_alpha, trainer.use_weighting = False, None, False
    trainer.precompute_ref_logps = True
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    inputs = {
        "input_ids": torch.zeros(2 * P, 3, dtype=torch.long, device=device),
        "attention_mask": torch.ones(2 * P, 3, dtype=torch.long, device=device),
        "completion_mask": mask,
        "ref_chosen_logps": pairs["ref_chosen_logps"],
        "ref_rejected_logps": pairs["ref_rejected_logps"],
    }

    def step(backward: bool) -> None:
        leaf = per_token.detach().requires_grad_(backward)
        trainer.model = _StubLM(leaf).train()
        trainer._metrics = {"train": collections.defaultdict(list)}
        loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        if backward:
            loss.backward()

    return step


def ours_step(pairs: dict, loss_type, weights, backend: str, use_spec: bool) -> Callable[[bool], None]:
    """One call of ``dpo_fast.preference_loss``: options as keywords (validated every call) or
    as a ``PreferenceLossSpec`` built once, outside the step, as a training loop would."""
    options = {"loss_type": loss_type, "loss_weights": weights}
    if use_spec:
        options = {"spec": dpo_fast.PreferenceLossSpec(**options)}

    def step(backward: bool) -> None:
        c = pairs["chosen_logps"].detach().requires_grad_(backward)
        r = pairs["rejected_logps"].detach().requires_grad_(backward)
        rest = {k: v for k, v in pairs.items() if k not in ("chosen_logps", "rejected_logps")}
        out = dpo_fast.preference_loss(c, r, **rest, **options, backend=backend)
        if backward:
            out.loss.backward()

    return step


def bench_loss_op(pair_counts: list[int], device: torch.device, repeats: int) -> list[dict]:
    rows = []
    backends = ["triton", "torch"] if device.type == "cuda" else ["torch"]
    for P in pair_counts:
        pairs = make_pairs(P, device)
        for name, (loss_type, weights) in LOSSES.items():
            methods = {}
            for b in backends:
                methods[f"dpo_fast ({b})"] = ours_step(pairs, loss_type, weights, b, use_spec=False)
                methods[f"dpo_fast ({b}, spec)"] = ours_step(pairs, loss_type, weights, b, use_spec=True)
            trl = trl_step(pairs, loss_type, weights)
            if trl is not None:
                methods["trl DPOTrainer._compute_loss"] = trl
            for method, step in methods.items():
                fwd = time_call(lambda step=step: step(False), device, repeats=repeats)
                fwd_bwd = time_call(lambda step=step: step(True), device, repeats=repeats)
                rows.append(
                    {
                        "part": "loss",
                        "method": method,
                        "loss": name,
                        "pairs": P,
                        "fwd_ms": 1e3 * median(fwd),
                        "fwd_bwd_ms": 1e3 * median(fwd_bwd),
                        "kernels_fwd": count_kernels(lambda step=step: step(False), device),
                        "kernels_fwd_bwd": count_kernels(lambda step=step: step(True), device),
                        "fwd_times_s": fwd,
                        "fwd_bwd_times_s": fwd_bwd,
                    }
                )
    return rows


# ------------------------------------------------------------------------------ part 2 ----


def naive_head(weight, hidden, labels, ref_hidden, ref_weight):
    """Materialized logits and fp32 log-softmax for the policy and the reference."""

    def sums(h, w):
        logp = torch.log_softmax((h @ w.T).float(), dim=-1)
        scored = labels != -100
        per_token = logp.gather(-1, torch.where(scored, labels, 0).unsqueeze(-1)).squeeze(-1)
        return (per_token * scored).sum(-1)

    P = hidden.shape[0] // 2
    logps = sums(hidden, weight)
    with torch.no_grad():
        ref = sums(ref_hidden, ref_weight)
    return dpo_fast.preference_loss(logps[:P], logps[P:], ref[:P], ref[P:], backend="torch").loss


def head_methods(device: torch.device) -> dict[str, Callable]:
    found: dict[str, Callable] = {}
    ours = dpo_fast.FusedLinearPreferenceLoss(beta=0.1)
    found["dpo_fast FusedLinearPreferenceLoss"] = lambda w, h, y, rh, rw: ours(w, h, y, None, rh, rw)[0]
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        # Liger's default compiles its chunk step; torch.compile on CPU only adds minutes here
        liger = LigerFusedLinearDPOLoss(beta=0.1, compiled=device.type == "cuda")
        found["liger LigerFusedLinearDPOLoss"] = lambda w, h, y, rh, rw: liger(w, h, y, None, rh, rw)[0]
    except ImportError:
        pass
    found["naive (full logits)"] = naive_head
    return found


def bench_head(token_counts: list[int], hidden_size: int, vocab: int, dtype, device, repeats) -> list[dict]:
    rows = []
    for T in token_counts:
        weight = (0.02 * torch.randn(vocab, hidden_size, device=device)).to(dtype).requires_grad_(True)
        ref_weight = weight.detach().clone()
        hidden = torch.randn(2, T, hidden_size, device=device, dtype=dtype).requires_grad_(True)
        ref_hidden = torch.randn(2, T, hidden_size, device=device, dtype=dtype)
        labels = torch.randint(0, vocab, (2, T), device=device)
        for method, fn in head_methods(device).items():
            row = {
                "part": "head",
                "method": method,
                "T": T,
                "H": hidden_size,
                "V": vocab,
                "dtype": str(dtype)[6:],
            }

            def step(fn=fn, args=(weight, hidden, labels, ref_hidden, ref_weight)) -> None:
                args[0].grad = args[1].grad = None
                fn(*args).backward()

            try:
                times = time_call(step, device, warmup=1, repeats=repeats)
                row.update(fwd_bwd_ms=1e3 * median(times), fwd_bwd_times_s=times)
                peak = peak_memory(step, device)
                row["peak_mem_gib"] = None if peak is None else peak / 2**30
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            weight.grad = hidden.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
    return rows


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["loss", "head", "all"], default="all")
    parser.add_argument(
        "--pairs", type=int, nargs="+", default=[64, 256, 1024, 4096, 8192] if cuda else [64, 1024, 8192]
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384] if cuda else [128, 512])
    parser.add_argument("--hidden", type=int, default=4096 if cuda else 256)
    parser.add_argument("--vocab", type=int, default=128256 if cuda else 8192)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32")
    parser.add_argument("--repeats", type=int, default=10 if cuda else 5)
    # On a shared CPU, OpenMP fan-out of ops on a few thousand elements costs milliseconds of
    # thread wake-ups that swamp the math (for every method alike); the loss op is timed on one.
    parser.add_argument("--loss-threads", type=int, default=None if cuda else 1)
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    rows: list[dict] = []
    if args.part in ("loss", "all"):
        threads = torch.get_num_threads()
        torch.set_num_threads(args.loss_threads or threads)
        loss_rows = bench_loss_op(args.pairs, device, args.repeats)
        torch.set_num_threads(threads)
        print("Loss op alone (ms; kernels = CUDA launches)")
        columns = ["method", "loss", "pairs", "fwd_ms", "fwd_bwd_ms", "kernels_fwd", "kernels_fwd_bwd"]
        print_table(loss_rows, columns)
        rows += loss_rows
    if args.part in ("head", "all"):
        head_rows = bench_head(args.tokens, args.hidden, args.vocab, dtype, device, max(2, args.repeats // 3))
        print(f"\nWhole head, one pair, sigmoid DPO with a reference head (H={args.hidden}, V={args.vocab})")
        print_table(head_rows, ["method", "T", "dtype", "fwd_bwd_ms", "peak_mem_gib", "error"])
        rows += head_rows
    config = vars(args) | {"device": str(device)}
    print(f"\nwrote {write_results('bench_loss', device, config, rows)}")


if __name__ == "__main__":
    main()
