"""Fused linear log-probs (hidden states + lm_head -> per-token label log-probs).

dpo_fast.linear_token_logprobs (design (a), the default "chunked" method; on CUDA also design
(b), method="fused", exact and with gradient filtering at eps = 2^-12) against: naive (matmul
+ log_softmax + gather, materializing the logits), TRL's chunked log-prob function
(trl.kernels.ChunkedLogProbFunction), Liger's fused linear cross-entropy with
reduction="none" and Cut Cross-Entropy's linear_cross_entropy(..., reduction="none"), each
when installed and able to run on the device. Every label is scored, so every method does the
same work (the FLOP count below is design (a)'s; (b) runs 10*N*H*V, the filter skips some).

Reported per method: forward time (no grad, as for a reference model), forward+backward
time (gradients to hidden and weight), TFLOP/s and peak memory. FLOPs are counted as
2*N*H*V for the forward and 8*N*H*V for forward+backward (forward projection, its
recomputation in backward, and the two gradient matmuls), whatever a method actually runs,
so the figures compare wall time. Peak memory is the most bytes held above the inputs: on
CUDA from torch.cuda.max_memory_allocated, on CPU the peak resident set of a fresh process
(spawned per method and shape) minus its resident set before the call.

Usage: ``python benchmarks/bench_linear_logprobs.py [--tokens 4096 8192] [--vocab 128256]``.
Defaults: N in {4096, 8192, 16384}, H = 4096, V in {128256, 151936}, bf16 on CUDA;
N = 2048, H = 512, V = 32000 fp32 (the CPU target) on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import resource
from collections.abc import Callable

import torch

import dpo_fast

try:
    from common import median, peak_memory, print_table, time_call, write_results
except ImportError:  # run as a module: python -m benchmarks.bench_linear_logprobs
    from .common import median, peak_memory, print_table, time_call, write_results

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def naive(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def methods(device: torch.device) -> dict[str, Method]:
    """Every method installed and able to run on ``device``."""
    found: dict[str, Method] = {
        "dpo_fast": lambda h, w, y: dpo_fast.linear_token_logprobs(h, w, y).logps,
        "naive": naive,
    }
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        # TRL's own vocabulary tile width; no optional outputs (entropy etc.), as for the others
        found["trl chunked"] = lambda h, w, y: ChunkedLogProbFunction.apply(
            h, w, None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ()
        )[0]
    except ImportError:
        pass
    if device.type == "cuda":  # design (b), Liger and CCE are Triton/CUDA-only
        found["dpo_fast fused (b)"] = lambda h, w, y: (
            dpo_fast.linear_token_logprobs(h, w, y, method="fused").logps
        )
        found["fused + filter 2^-12"] = lambda h, w, y: (
            dpo_fast.linear_token_logprobs(h, w, y, method="fused", grad_filter_eps=2.0**-12).logps
        )
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            found["liger flce"] = lambda h, w, y: -liger_fused_linear_cross_entropy(h, w, y, reduction="none")
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy

            found["cce"] = lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none")
        except ImportError:
            pass
    return found


def make_inputs(tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype, device: torch.device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(device, dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size**0.5).to(device, dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def _step(fn: Method, hidden, weight, labels) -> Callable[[], None]:
    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, labels).sum().backward()

    return step


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _cpu_peak_child(name: str, shape: tuple[int, int, int], dtype_name: str, forward_only: bool) -> int:
    """In a fresh process: the peak resident bytes one call adds above the inputs."""
    device = torch.device("cpu")
    fn = methods(device)[name]
    hidden, weight, labels = make_inputs(*shape, DTYPES[dtype_name], device)
    call = (lambda: fn(hidden, weight, labels)) if forward_only else _step(fn, hidden, weight, labels)
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        call()  # the first call loads libraries (C++ kernels, ...): measure the second one
        hidden.grad = weight.grad = None
        dpo_fast.ops.cpp.empty_cache()  # the cached tile buffer counts in the peak, not in "before"
        before = _current_rss()
        call()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def cpu_peak(name: str, shape: tuple[int, int, int], dtype_name: str, forward_only: bool) -> int:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_cpu_peak_child, (name, shape, dtype_name, forward_only))


def measure(name, fn, shape, dtype_name, device, repeats, cpu_memory=True) -> dict:
    tokens, hidden_size, vocab = shape
    hidden, weight, labels = make_inputs(*shape, DTYPES[dtype_name], device)
    flops = 2 * tokens * hidden_size * vocab
    row = {"method": name, "N": tokens, "H": hidden_size, "V": vocab, "dtype": dtype_name}
    try:
        with torch.no_grad():
            forward_times = time_call(lambda: fn(hidden, weight, labels), device, warmup=1, repeats=repeats)
        step = _step(fn, hidden, weight, labels)
        step_times = time_call(step, device, warmup=1, repeats=repeats)
        if device.type == "cuda":
            with torch.no_grad():
                forward_peak = peak_memory(lambda: fn(hidden, weight, labels), device)
            step_peak = peak_memory(step, device)
        elif cpu_memory:
            del hidden, weight, labels
            forward_peak = cpu_peak(name, shape, dtype_name, forward_only=True)
            step_peak = cpu_peak(name, shape, dtype_name, forward_only=False)
        else:
            forward_peak = step_peak = None
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        return row
    row.update(
        forward_ms=1e3 * median(forward_times),
        fwd_bwd_ms=1e3 * median(step_times),
        forward_TFLOPs=flops / median(forward_times) / 1e12,
        fwd_bwd_TFLOPs=4 * flops / median(step_times) / 1e12,
        forward_peak_MiB=None if forward_peak is None else forward_peak / 2**20,
        fwd_bwd_peak_MiB=None if step_peak is None else step_peak / 2**20,
        forward_times_s=forward_times,
        fwd_bwd_times_s=step_times,
    )
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384] if cuda else [2048])
    parser.add_argument("--hidden", type=int, default=4096 if cuda else 512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256, 151936] if cuda else [32000])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16" if cuda else "fp32")
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--methods", nargs="+", help="subset of the methods to run (default: all found)")
    parser.add_argument("--no-cpu-memory", action="store_true", help="skip the fresh-process CPU peaks")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    found = methods(device)
    selected = {name: fn for name, fn in found.items() if not args.methods or name in args.methods}
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            shape = (tokens, args.hidden, vocab)
            baseline = None
            for name, fn in selected.items():
                row = measure(name, fn, shape, args.dtype, device, args.repeats, not args.no_cpu_memory)
                if "error" not in row:
                    baseline = baseline or row
                    # > 1: dpo_fast's forward+backward is that many times faster than this method's
                    row["vs_dpo_fast"] = row["fwd_bwd_ms"] / baseline["fwd_bwd_ms"]
                rows.append(row)
                print(f"  measured {name} at N={tokens} H={args.hidden} V={vocab}", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    columns = ["method", "N", "H", "V", "dtype", "forward_ms", "fwd_bwd_ms", "forward_TFLOPs"]
    columns += ["fwd_bwd_TFLOPs", "forward_peak_MiB", "fwd_bwd_peak_MiB", "vs_dpo_fast", "error"]
    print_table(rows, columns)
    config = {**vars(args), "methods_found": list(found), "flops_fwd_bwd": "8*N*H*V", "flops_fwd": "2*N*H*V"}
    path = write_results("bench_linear_logprobs", device, config, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
