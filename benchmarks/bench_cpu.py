"""CPU: the C++ kernels (backend="cpp") against PyTorch and TRL, forward+backward, fp32.

Two measurements, each method timed round-robin in the same run (one call of each per round,
so load from other processes on a shared machine hits every method alike):

1. label log-probs from logits ``(tokens, V)`` (or ``(tokens // seq, seq, V)`` with ``--seq``),
   gradient w.r.t. the logits: dpo_fast (cpp), dpo_fast (torch backend), ``log_softmax`` +
   ``gather``, and TRL's ``selective_log_softmax`` (which loops over the first dim). Plus
   "cpp kernels only": the two operators with a preallocated gradient, no autograd: the
   difference to the full step is mostly first-touch page faults of the fresh gradient;
2. the fused linear path from hidden states ``(N, H)`` and an lm_head ``(V, H)``, gradient
   w.r.t. both: dpo_fast ``linear_token_logprobs`` (cpp, torch), the naive matmul +
   ``log_softmax`` + ``gather``, and TRL's ``ChunkedLogProbFunction`` (its CPU path folds
   the tiles in torch). Twice: with every token scored, and with half of them ignored as
   DPO's prompt tokens are (the first half of each 512-token sequence); only dpo_fast skips
   unscored tokens before the matmul.

Prints a table with each method's median and its ratio to dpo_fast (cpp), and writes
``benchmarks/results/bench_cpu-cpu.json``.

Usage: ``python benchmarks/bench_cpu.py [--repeats 5] [--seq 256] [--threads N] [--skip-linear]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import dpo_fast
from dpo_fast.ops import cpp

try:
    from common import median, print_table, write_results
except ImportError:  # run as a module: python -m benchmarks.bench_cpu
    from .common import median, print_table, write_results

LOGITS_SIZES = [(2048, 32000), (512, 128256)]  # (tokens, V)
LINEAR_SIZE = (2048, 512, 32000)  # (N, H, V)
LINEAR_SCORED_FRACTIONS = (1.0, 0.5)
PROMPT_SEQUENCE = 512  # tokens per sequence when half are ignored: the first half is "prompt"
OURS = "dpo_fast (cpp)"


def log_softmax_gather(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch way; 0 where ``labels == -100``."""
    scored = labels != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, logp, 0.0)


def logits_methods() -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    found: dict[str, Callable] = {
        OURS: lambda x, y: dpo_fast.token_logprobs(x, y, backend="cpp").logps,
        "dpo_fast (torch)": lambda x, y: dpo_fast.token_logprobs(x, y, backend="torch").logps,
        "log_softmax+gather": log_softmax_gather,
    }
    try:
        from trl.trainer.utils import selective_log_softmax

        found["trl selective_log_softmax"] = selective_log_softmax
    except ImportError:
        pass
    return found


def linear_methods() -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
    found: dict[str, Callable] = {
        OURS: lambda h, w, y: dpo_fast.linear_token_logprobs(h, w, y, backend="cpp").logps,
        "dpo_fast (torch)": lambda h, w, y: dpo_fast.linear_token_logprobs(h, w, y, backend="torch").logps,
        "matmul+log_softmax+gather": lambda h, w, y: log_softmax_gather(h @ w.t(), y),
    }
    try:
        from trl.kernels import ChunkedLogProbFunction

        def trl_chunked(h, w, y):
            # TRL's defaults: 32k-wide vocabulary tiles, log-probs only
            # it scores every row: ignored labels are clamped in, then masked out
            logp = ChunkedLogProbFunction.apply(h, w, None, y.clamp(min=0), 1.0, 32768, None, 1.0, ())[0]
            return torch.where(y != -100, logp, 0.0)

        found["trl ChunkedLogProbFunction"] = trl_chunked
    except ImportError:
        pass
    return found


def round_robin(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each step: one warm-up each, then ``repeats`` rounds of one call each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def logits_step(fn, logits: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step():
        fn(logits, labels).sum().backward()
        # each method frees its own gradient, as a training step does (freeing a large
        # block costs milliseconds; it must not land in the next method's time)
        logits.grad = None

    return step


def kernels_step(logits: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    x = logits.reshape(1, -1, logits.shape[-1])
    labels = labels.reshape(1, -1)
    grad = torch.empty_like(x)
    grad_logp = torch.ones(labels.shape)
    options = {"ignore_index": -100, "scale": 1.0, "softcap": None}

    def step():
        logp, lse, _ = cpp.logprobs_forward(x, labels, **options)
        cpp.logprobs_backward(grad_logp, x, labels, logp, lse, grad, **options)

    return step


def linear_step(fn, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step():
        fn(hidden, weight, labels).sum().backward()
        hidden.grad = weight.grad = None

    return step


def summarize(times: dict[str, list[float]], config: dict) -> list[dict]:
    ours = median(times[OURS])
    rows = []
    for name, values in times.items():
        rows.append(
            {
                **config,
                "method": name,
                "median_s": median(values),
                "min_s": min(values),
                "slowdown_vs_cpp": median(values) / ours,
                "times_s": values,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq", type=int, default=0, help="batch the tokens as (tokens // seq, seq, V)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--skip-linear", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if not cpp.available():
        raise SystemExit("the C++ kernels could not be built: nothing to benchmark")
    torch.manual_seed(0)
    rows: list[dict] = []

    for tokens, vocab in LOGITS_SIZES:
        shape = (tokens // args.seq, args.seq) if args.seq else (tokens,)
        logits = torch.randn(*shape, vocab).requires_grad_()
        labels = torch.randint(0, vocab, shape)
        steps = {name: logits_step(fn, logits, labels) for name, fn in logits_methods().items()}
        steps["cpp kernels only"] = kernels_step(logits.detach(), labels)
        config = {"case": "logits", "tokens": tokens, "vocab": vocab, "shape": list(logits.shape)}
        rows += summarize(round_robin(steps, args.repeats), config)
        del logits, steps

    if not args.skip_linear:
        n, hidden_size, vocab = LINEAR_SIZE
        hidden = (torch.randn(n, hidden_size) / hidden_size**0.25).requires_grad_()
        weight = (torch.randn(vocab, hidden_size) / hidden_size**0.25).requires_grad_()
        for scored_fraction in LINEAR_SCORED_FRACTIONS:
            labels = torch.randint(0, vocab, (n,))
            if scored_fraction < 1.0:
                prompt = round(PROMPT_SEQUENCE * (1.0 - scored_fraction))
                labels.view(-1, PROMPT_SEQUENCE)[:, :prompt] = -100
            steps = {name: linear_step(fn, hidden, weight, labels) for name, fn in linear_methods().items()}
            config = {
                "case": "linear",
                "tokens": n,
                "hidden": hidden_size,
                "vocab": vocab,
                "scored": scored_fraction,
            }
            rows += summarize(round_robin(steps, args.repeats), config)

    print(f"forward+backward, fp32, {torch.get_num_threads()} threads, median of {args.repeats} (seconds)")
    print_table(rows, ["case", "tokens", "vocab", "scored", "method", "median_s", "min_s", "slowdown_vs_cpp"])
    path = write_results(
        "bench_cpu",
        device,
        {"repeats": args.repeats, "seq": args.seq, "threads": torch.get_num_threads()},
        rows,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
