"""``dpo-fast profile-memory``: peak memory and time of one DPO step per method and length.

For each method (:mod:`dpo_fast.app.profile_step`: the naive full-logits path, TRL 1.16's
head, Liger's fused DPO loss, ours in each layout) and each length (prompt + completion tokens
of one sequence, doubling up to ``--max-length`` or the lengths given), one step runs on
random pairs with a random-weight model of the chosen config, and the profile records:

- the peak (CUDA: ``max_memory_allocated``; CPU: the peak of live tensor storage, see
  :mod:`dpo_fast.app.memory_meter`) and where it goes: weights + gradients + optimizer
  state, the activations the policy forward keeps, the head's transient, the attention mask,
  the reference forward's transient, the backbone backward's transient, and the phase the
  peak falls in;
- step time and tokens/s (the 2 x pairs x length tokens of the chosen and rejected sequences);
- the longest length each method fits.

An out-of-memory point (CUDA OOM, or on CPU live storage over ``--device-memory``, by default
a quarter of the available memory) ends that method's sweep; the others continue.

Outputs: ``DIR/profile_memory-<model>-<device>.json``, ``...-memory.png`` and ``...-time.png``
(one line per method), a table on stdout and a progress line per point.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .memory_meter import CudaMeter, MemoryBudgetExceeded, StorageMeter
from .profile_step import (
    METHODS,
    Method,
    batch_tokens,
    build_models,
    collate,
    dpo_step,
    make_optimizer,
    make_pairs,
    parse_method,
)

# Llama-architecture configs (from the models' published config.json files; no download).
MODEL_CONFIGS: dict[str, dict] = {
    "tiny": {
        "model_type": "llama",
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1 << 20,
    },
    "llama-3.2-1b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 131072,
    },
    "llama-3-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    },
}
PHASES = ("forward", "head", "reference", "head_backward", "backward", "optimizer")


@dataclass
class Point:
    """One (method, length) measurement; sizes in bytes."""

    method: str
    attention: str
    length: int
    status: str  # "ok" | "oom"
    peak: int | None = None
    breakdown: dict[str, int] = field(default_factory=dict)
    peak_phase: str | None = None
    seconds: float | None = None
    tokens_per_second: float | None = None
    backbone_tokens: int | None = None
    loss: float | None = None
    error: str | None = None


def model_config(name: str):
    """A transformers config: a name from :data:`MODEL_CONFIGS`, or a local config.json / model dir."""
    import transformers

    if name in MODEL_CONFIGS:
        values = dict(MODEL_CONFIGS[name])
        return transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(name)
    if not path.exists():
        raise ValueError(
            f"--model-config {name!r} is neither one of {', '.join(MODEL_CONFIGS)} nor a local config.json "
            "or model directory"
        )
    return transformers.AutoConfig.from_pretrained(path.parent if path.is_file() else path)


def doubling(min_length: int, max_length: int) -> list[int]:
    lengths = [min_length]
    while lengths[-1] * 2 <= max_length:
        lengths.append(lengths[-1] * 2)
    return lengths


def _available_memory() -> int:
    """Bytes the OS reports as available (Linux), else the total physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _state_tensors(policy, reference, optimizer, batch) -> list[torch.Tensor]:
    tensors = [*policy.parameters(), *policy.buffers(), *reference.parameters(), *reference.buffers()]
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors + [v for v in batch.values() if isinstance(v, torch.Tensor)]


def _bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[id(storage)] = storage.nbytes()
    return sum(seen.values())


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryBudgetExceeded)):
        return True
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in str(error) or "out of memory" in str(error)
    )


def breakdown(meter, static: int, mask: int) -> tuple[dict[str, int], str | None]:
    """Where the peak goes, from the meter's phases (see the module doc)."""

    def transient(name: str) -> int:
        phase = meter.phase(name)
        return 0 if phase is None else phase.peak - phase.start

    forward, head = meter.phase("forward"), meter.phase("head")
    parts = {
        "weights_grads_optimizer": static,
        "activations": (head.start - forward.start) if forward and head else 0,
        "head": max(transient("head"), transient("head_backward")),
        "mask": mask,
        "reference": transient("reference"),
        "backward": transient("backward"),
    }
    busiest = max((p for p in meter.phases if p.name in PHASES), key=lambda p: p.peak, default=None)
    return parts, None if busiest is None else busiest.name


def profile_point(
    method: Method,
    policy,
    reference,
    optimizer,
    length: int,
    args: argparse.Namespace,
    device: torch.device,
) -> Point:
    """Run ``args.warmup`` steps, then one measured step of ``method`` at ``length``."""
    vocab = policy.config.get_text_config().vocab_size
    pairs = make_pairs(args.batch_size, length, vocab, args.prompt_fraction, args.seed)
    batch = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in collate(pairs, method.layout).items()
    }
    step = {"forward_only": args.forward_only}
    for _ in range(args.warmup):
        dpo_step(method, policy, reference, batch, optimizer, _NullMeter(), **step)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        meter = CudaMeter(device)
    else:
        meter = StorageMeter(budget=args.budget)
        meter.adopt(_state_tensors(policy, reference, optimizer, batch))
    start = time.perf_counter()
    with meter:
        loss, mask = dpo_step(method, policy, reference, batch, optimizer, meter, **step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    trainable = [p for p in policy.parameters() if p.requires_grad]
    static = _bytes(_state_tensors(policy, reference, optimizer, {})) + (
        0 if args.forward_only else _bytes(trainable)
    )
    parts, peak_phase = breakdown(meter, static, mask)
    pair_tokens = 2 * args.batch_size * length
    return Point(
        method.name,
        method.attention,
        length,
        "ok",
        peak=meter.peak(),
        breakdown=parts,
        peak_phase=peak_phase,
        seconds=seconds,
        tokens_per_second=pair_tokens / seconds,
        backbone_tokens=batch_tokens(batch),
        loss=None if loss != loss else loss,
    )


class _NullMeter:
    def mark(self, name: str) -> None:
        pass


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sweep(args: argparse.Namespace, log=print) -> list[Point]:
    """Every method over the lengths; an out-of-memory point ends that method's sweep."""
    device = torch.device(args.device)
    config = model_config(args.model_config)
    methods = [parse_method(m, device.type, backward=not args.forward_only) for m in args.methods]
    points: list[Point] = []
    total, done = len(methods) * len(args.lengths), 0
    for method in methods:
        torch.manual_seed(args.seed)
        policy, reference = build_models(
            config, method, checkpointing=args.gradient_checkpointing, dtype=args.dtype, device=device
        )
        optimizer = make_optimizer(policy, args.optimizer)
        for i, length in enumerate(args.lengths):
            done += 1
            try:
                point = profile_point(method, policy, reference, optimizer, length, args, device)
            except Exception as error:
                if not _is_oom(error):
                    raise
                point = Point(
                    method.name, method.attention, length, "oom", error=str(error).splitlines()[0][:200]
                )
                policy.zero_grad(set_to_none=True)
            points.append(point)
            log(_progress(done, total, point))
            _free(device)
            if point.status == "oom":
                done += len(args.lengths) - i - 1
                break
        del policy, reference, optimizer
        _free(device)
    return points


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def _progress(done: int, total: int, p: Point) -> str:
    head = f"[{done}/{total}] {p.method:<20} ({p.attention}) L={p.length:<7}"
    if p.status != "ok":
        return f"{head} out of memory: {p.error}"
    speed = f"{p.seconds:.2f} s, {p.tokens_per_second:,.0f} tok/s"
    return f"{head} peak {_gib(p.peak)} GiB ({p.peak_phase}), {speed}"


def longest_fit(points: list[Point]) -> dict[str, int | None]:
    """The longest length each method ran (before its first out-of-memory point)."""
    best: dict[str, int | None] = {}
    for p in points:
        best.setdefault(p.method, None)
        if p.status == "ok":
            best[p.method] = max(best[p.method] or 0, p.length)
    return best


def table(points: list[Point]) -> str:
    columns = [
        "method",
        "attention",
        "length",
        "peak GiB",
        "weights+",
        "activ.",
        "head",
        "mask",
        "ref",
        "bwd",
    ]
    columns += ["peak in", "s/step", "tok/s"]
    rows = [columns]
    for p in points:
        b = p.breakdown
        rows.append(
            [p.method, p.attention, str(p.length)]
            + (
                [_gib(p.peak)]
                + [
                    _gib(b.get(k))
                    for k in ("weights_grads_optimizer", "activations", "head", "mask", "reference")
                ]
                + [
                    _gib(b.get("backward")),
                    p.peak_phase or "-",
                    f"{p.seconds:.3f}",
                    f"{p.tokens_per_second:,.0f}",
                ]
                if p.status == "ok"
                else ["OOM"] + ["-"] * 9
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def plot(points: list[Point], path_stem: Path, title: str) -> list[Path]:
    """Memory vs length and time vs length, one line per method (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, suffix in (
        (lambda p: p.peak / 2**30, "peak memory (GiB)", "memory"),
        (lambda p: p.seconds, "step time (s)", "time"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in dict.fromkeys(p.method for p in points):
            ok = [p for p in points if p.method == name and p.status == "ok" and key(p) is not None]
            if ok:
                ax.plot(
                    [p.length for p in ok],
                    [key(p) for p in ok],
                    marker="o",
                    label=f"{name} ({ok[0].attention})",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (prompt + completion tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = path_stem.with_name(f"{path_stem.name}-{suffix}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _environment(args: argparse.Namespace) -> dict:
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": args.device,
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return env


def write_results(points: list[Point], args: argparse.Namespace) -> list[Path]:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.model_config).stem if args.model_config not in MODEL_CONFIGS else args.model_config
    stem = out / f"profile_memory-{name}-{torch.device(args.device).type}"
    fits = longest_fit(points)
    step = (
        "reference forward only"
        if args.forward_only
        else (
            "policy forward+backward, reference forward"
            + (f", {args.optimizer} step" if args.optimizer != "none" else "")
        )
    )
    record = {
        "model_config": args.model_config,
        "step": step,
        "optimizer_step_included": args.optimizer != "none" and not args.forward_only,
        "gradient_checkpointing": args.gradient_checkpointing,
        "dtype": str(args.dtype).removeprefix("torch."),
        "batch_pairs": args.batch_size,
        "prompt_fraction": args.prompt_fraction,
        "memory_measure": "max_memory_allocated"
        if args.device.startswith("cuda")
        else "peak live tensor storage",
        "budget_bytes": args.budget,
        "environment": _environment(args),
        "longest_fit": fits,
        "points": [p.__dict__ for p in points],
    }
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    title = f"{name}, {step}, {record['dtype']}" + (", checkpointing" if args.gradient_checkpointing else "")
    return [json_path, *plot(points, stem, title)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dpo-fast profile-memory",
        description="Peak memory and time of one DPO step per method and sequence length.",
    )
    parser.add_argument(
        "--model-config", default="tiny", help=f"{', '.join(MODEL_CONFIGS)}, or a local config.json"
    )
    parser.add_argument("--lengths", help="comma-separated lengths (default: doubling from --min-length)")
    parser.add_argument("--min-length", type=int, default=256)
    parser.add_argument("--max-length", type=int, help="default: 65536 on CUDA, 4096 on CPU")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated; name[:attention] (default: all)"
    )
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="default: bf16 CUDA, fp32 CPU"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="pairs per step (default: 1)")
    parser.add_argument("--prompt-fraction", type=float, default=0.5, help="prompt share of a sequence (0.5)")
    parser.add_argument(
        "--optimizer",
        choices=("none", "sgd", "adamw"),
        default="none",
        help="include an optimizer step (none)",
    )
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--forward-only", action="store_true", help="profile the reference forward alone")
    parser.add_argument(
        "--device-memory", type=float, help="GiB: CPU budget (default: a quarter of the available memory)"
    )
    parser.add_argument(
        "--warmup", type=int, help="unmeasured steps per point (default: 1 on CUDA, 0 on CPU)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="profile_memory", help="where the JSON and PNGs go")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if args.lengths:
        try:
            args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    else:
        args.lengths = doubling(args.min_length, args.max_length or (65536 if cuda else 4096))
    if not args.lengths or min(args.lengths) < 2:
        parser.error(f"--lengths must be integers >= 2, got {args.lengths}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not 0 < args.prompt_fraction < 1:
        parser.error(f"--prompt-fraction must be in (0, 1), got {args.prompt_fraction}")
    args.budget = None
    if not cuda:
        gib = args.device_memory
        args.budget = int(gib * 2**30) if gib else _available_memory() // 4
    if args.warmup is None:
        args.warmup = 1 if cuda else 0
    return args


def main(argv: list[str]) -> int:
    """Entry point of ``dpo-fast profile-memory`` and ``benchmarks/profile_memory.py``: the exit status."""
    args = parse_args(argv)
    # the CPU buffer cache keeps freed [tokens, V] blocks mapped: not tensor storage, so not counted
    os.environ.setdefault("DPO_FAST_CPU_BUFFER_CACHE", "0")
    try:
        for spec in args.methods:
            parse_method(spec, torch.device(args.device).type, backward=not args.forward_only)
        model_config(args.model_config)
    except ValueError as error:
        print(f"dpo-fast profile-memory: error: {error}", file=sys.stderr)
        return 2
    print(
        f"profiling {len(args.methods)} methods x {len(args.lengths)} lengths on {args.device} "
        f"({args.model_config}, {str(args.dtype).removeprefix('torch.')})",
        flush=True,
    )
    points = sweep(args, log=lambda line: print(line, flush=True))
    print()
    print(table(points))
    print("\nlongest length that fits:")
    for name, length in longest_fit(points).items():
        print(f"  {name:<20} {length if length is not None else 'none'}")
    for path in write_results(points, args):
        print(f"wrote {path}")
    return 0
