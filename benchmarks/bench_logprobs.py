"""Label log-probs from logits: dpo_fast against PyTorch eager, torch.compile and TRL.

Measures forward and forward+backward time, achieved bandwidth and (on CUDA) peak memory.

Bytes counted as the minimum that must move:
- forward: read the logits once, read the labels, write one fp32 log-prob per token;
- forward+backward: read the logits twice (forward, backward) and write the gradient once
  (three passes over ``[tokens, V]``), plus the per-token vectors.

Usage: ``python benchmarks/bench_logprobs.py [--tokens 4096 16384] [--vocab 32000 128256]``.
Defaults: small sizes on CPU; tokens {4096, 16384} x vocab {32000, 128256, 151936} bf16 on CUDA.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import dpo_fast

try:
    from common import median, peak_memory, print_table, time_call, write_results
except ImportError:  # run as a module: python -m benchmarks.bench_logprobs
    from .common import median, peak_memory, print_table, time_call, write_results

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def methods(compile_eager: bool) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    found: dict[str, Callable] = {
        "dpo_fast": lambda x, y: dpo_fast.token_logprobs(x, y).logps,
        "torch eager": eager_logprobs,
    }
    if compile_eager:
        found["torch.compile"] = torch.compile(eager_logprobs, dynamic=False)
    try:
        from trl.trainer.utils import selective_log_softmax

        found["trl selective_log_softmax"] = selective_log_softmax
    except ImportError:
        pass
    return found


def measure(name, fn, logits, labels, device, repeats) -> dict:
    tokens, vocab = logits.shape
    elem = logits.element_size()
    row = {
        "method": name,
        "tokens": tokens,
        "vocab": vocab,
        "dtype": str(logits.dtype).removeprefix("torch."),
    }
    with torch.no_grad():
        forward_times = time_call(lambda: fn(logits, labels), device, repeats=repeats)
    x = logits.clone().requires_grad_()

    def step():
        x.grad = None
        fn(x, labels).sum().backward()

    step_times = time_call(step, device, repeats=repeats)
    forward_bytes = tokens * vocab * elem + tokens * (8 + 4)
    step_bytes = 3 * tokens * vocab * elem + tokens * (8 + 4 + 4 + 4)
    row.update(
        forward_ms=1e3 * median(forward_times),
        fwd_bwd_ms=1e3 * median(step_times),
        forward_GBps=forward_bytes / median(forward_times) / 1e9,
        fwd_bwd_GBps=step_bytes / median(step_times) / 1e9,
        forward_times_s=forward_times,
        fwd_bwd_times_s=step_times,
    )
    with torch.no_grad():
        row["forward_peak_MiB"] = _mib(peak_memory(lambda: fn(logits, labels), device))
    row["fwd_bwd_peak_MiB"] = _mib(peak_memory(step, device))
    return row


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384] if cuda else [512, 2048])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 151936] if cuda else [32000])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16" if cuda else "fp32")
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if cuda else "cpu")
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            logits = (torch.randn(tokens, vocab, device=device) * 2).to(DTYPES[args.dtype])
            labels = torch.randint(0, vocab, (tokens,), device=device)
            baseline = None
            for name, fn in methods(not args.no_compile).items():
                row = measure(name, fn, logits, labels, device, args.repeats)
                baseline = baseline or row
                # how many times faster dpo_fast's forward+backward is than this method's
                row["dpo_fast_speedup"] = row["fwd_bwd_ms"] / baseline["fwd_bwd_ms"]
                rows.append(row)
                print(f"  measured {name} at tokens={tokens} vocab={vocab}", flush=True)
            del logits, labels
    columns = ["method", "tokens", "vocab", "forward_ms", "fwd_bwd_ms", "forward_GBps", "fwd_bwd_GBps"]
    columns += ["dpo_fast_speedup"]
    if cuda:
        columns += ["forward_peak_MiB", "fwd_bwd_peak_MiB"]
    print_table(rows, columns)
    path = write_results("bench_logprobs", device, vars(args), rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
