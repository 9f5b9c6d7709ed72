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
import contextlib
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .memory_meter import AllocatorMeter, CudaMeter, MemoryBudgetExceeded, StorageMeter
from .profile_estimate import cuda_emulation, fake_batch, fake_execution, not_estimable
from .profile_step import (
    METHODS,
    OURS,
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
    predicted_peak: int | None = None  # a measured CPU point: what the estimate predicted


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


@dataclass
class Models:
    """A method's policy, reference and optimizer (fake tensors when ``fake_mode`` is set)."""

    method: Method
    policy: torch.nn.Module
    reference: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    fake_mode: object = None


def build(config, method: Method, args: argparse.Namespace, device: torch.device, *, fake: bool) -> Models:
    torch.manual_seed(args.seed)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    policy, reference = build_models(
        config,
        method,
        checkpointing=args.gradient_checkpointing,
        dtype=args.dtype,
        device=torch.device("cpu") if fake else device,
        fake_mode=fake_mode,
    )
    return Models(method, policy, reference, make_optimizer(policy, args.optimizer), fake_mode)


def _host_batch(models: Models, length: int, args: argparse.Namespace) -> dict:
    vocab = models.policy.config.get_text_config().vocab_size
    pairs = make_pairs(args.batch_size, length, vocab, args.prompt_fraction, args.seed, args.prompt_length)
    return collate(pairs, models.method.layout)


def _static_bytes(models: Models, args: argparse.Namespace) -> int:
    """Weights (policy and reference), optimizer state, and the policy's gradients."""
    trainable = [p for p in models.policy.parameters() if p.requires_grad]
    state = _state_tensors(models.policy, models.reference, models.optimizer, {})
    return _bytes(state) + (0 if args.forward_only else _bytes(trainable))


def _point(
    models: Models, length: int, args, meter, loss: float, mask: int, batch: dict, seconds=None
) -> Point:
    parts, peak_phase = breakdown(meter, _static_bytes(models, args), mask)
    return Point(
        models.method.name,
        models.method.attention,
        length,
        "ok",
        peak=meter.peak(),
        breakdown=parts,
        peak_phase=peak_phase,
        seconds=seconds,
        tokens_per_second=None if seconds is None else 2 * args.batch_size * length / seconds,
        backbone_tokens=batch_tokens(batch),
        loss=None if loss != loss else loss,
    )


def measure_point(models: Models, length: int, args: argparse.Namespace, device: torch.device) -> Point:
    """Run ``args.warmup`` steps, then one measured step of the method at ``length``."""
    batch = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in _host_batch(models, length, args).items()
    }
    run = (models.method, models.policy, models.reference, batch, models.optimizer)
    for _ in range(args.warmup):
        dpo_step(*run, _NullMeter(), forward_only=args.forward_only)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        meter = CudaMeter(device)
    else:
        meter = AllocatorMeter(
            baseline=_bytes(_state_tensors(models.policy, models.reference, models.optimizer, batch))
        )
    start = time.perf_counter()
    with meter:
        loss, mask = dpo_step(*run, meter, forward_only=args.forward_only)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return _point(models, length, args, meter, loss, mask, batch, time.perf_counter() - start)


def estimate_point(models: Models, length: int, args: argparse.Namespace, target: torch.device) -> Point:
    """One step of the method at ``length`` on fake tensors (``models`` built fake)."""
    mode = models.fake_mode
    host = _host_batch(models, length, args)
    # our layouts lower the real host batch themselves; the others get fakes
    batch = host if models.method.name in OURS else fake_batch(mode, host)
    meter = StorageMeter()
    meter.adopt(_state_tensors(models.policy, models.reference, models.optimizer, {}))
    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_execution(mode, meter))
        if target.type == "cuda":
            stack.enter_context(cuda_emulation())
        stack.enter_context(mode)
        stack.enter_context(meter)
        loss, mask = dpo_step(
            models.method,
            models.policy,
            models.reference,
            batch,
            models.optimizer,
            meter,
            forward_only=args.forward_only,
        )
    return _point(models, length, args, meter, loss, mask, host)


class _NullMeter:
    def mark(self, name: str) -> None:
        pass


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _over_budget(point: Point, budget: int | None, predicted: bool) -> Point:
    if budget is not None and point.peak is not None and point.peak > budget:
        point.status = "oom"
        point.error = (
            f"{'predicted' if predicted else 'measured'} peak {_gib(point.peak)} GiB over {_gib(budget)} GiB"
        )
    return point


def _failed(method: Method, length: int, status: str, error: BaseException) -> Point:
    return Point(method.name, method.attention, length, status, error=str(error).splitlines()[0][:200])


def run_point(fake: Models | None, real: Models | None, length: int, args, device: torch.device) -> Point:
    """The estimate (``fake``), then unless only estimating or it predicts out of memory, the
    measurement (``real``)."""
    if fake is not None:
        try:
            predicted = _over_budget(estimate_point(fake, length, args, device), args.budget, True)
        except Exception as error:
            if not not_estimable(error):
                raise
            predicted = _failed(fake.method, length, "not estimable", error)
        if real is None or predicted.status == "oom":
            return predicted
    try:
        point = _over_budget(measure_point(real, length, args, device), args.budget, False)
        point.predicted_peak = None if fake is None else predicted.peak
        return point
    except Exception as error:
        if not _is_oom(error):
            raise
        real.policy.zero_grad(set_to_none=True)
        return _failed(real.method, length, "oom", error)


def sweep(args: argparse.Namespace, log=print) -> list[Point]:
    """Every method over the lengths.

    Measured: a point out of memory (CUDA OOM; on CPU, a peak over the budget, or one the
    estimate predicts over it, which is then not run) ends that method's sweep. Estimated:
    every length, each marked as fitting ``--device-memory`` or not.
    """
    device = torch.device(args.device)
    config = model_config(args.model_config)
    # estimates run on fake CPU tensors, where flash-attn cannot run: FlexAttention keeps the same
    methods = [
        parse_method(m, device.type, backward=not args.forward_only, flash=False if args.estimate else None)
        for m in args.methods
    ]
    points: list[Point] = []
    total, done = len(methods) * len(args.lengths), 0
    for method in methods:
        # on CPU the estimate is a pre-check: a point predicted over the budget is not run
        fake = (
            build(config, method, args, device, fake=True) if args.estimate or device.type == "cpu" else None
        )
        real = None if args.estimate else build(config, method, args, device, fake=False)
        for i, length in enumerate(args.lengths):
            done += 1
            point = run_point(fake, real, length, args, device)
            points.append(point)
            log(_progress(done, total, point))
            _free(device)
            if point.status != "ok" and (real is not None or point.status == "not estimable"):
                done += len(args.lengths) - i - 1
                break
        del fake, real
        _free(device)
    return points


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def _progress(done: int, total: int, p: Point) -> str:
    head = f"[{done}/{total}] {p.method:<20} ({p.attention}) L={p.length:<7}"
    if p.status == "not estimable":
        return f"{head} not estimable: {p.error}"
    if p.peak is None:
        return f"{head} out of memory: {p.error}"
    line = f"{head} peak {_gib(p.peak)} GiB ({p.peak_phase})"
    if p.seconds is not None:
        line += f", {p.seconds:.2f} s, {p.tokens_per_second:,.0f} tok/s"
    return line + ("" if p.status == "ok" else f"; out of memory: {p.error}")


def longest_fit(points: list[Point]) -> dict[str, int | None]:
    """The longest length each method (``name:attention``) fits: measured, it ran within the
    budget; estimated, it is predicted within ``--device-memory``."""
    best: dict[str, int | None] = {}
    for p in points:
        key = f"{p.method}:{p.attention}"
        best.setdefault(key, None)
        if p.status == "ok":
            best[key] = max(best[key] or 0, p.length)
    return best


COLUMNS = ("method", "attention", "length", "peak GiB", "weights+", "activ.", "head", "mask", "ref", "bwd")
PARTS = ("weights_grads_optimizer", "activations", "head", "mask", "reference", "backward")


def table(points: list[Point]) -> str:
    """One row per point: the peak, where it goes (GiB), the phase it falls in, time."""
    rows = [[*COLUMNS, "peak in", "s/step", "tok/s", "status"]]
    for p in points:
        row = [p.method, p.attention, str(p.length), _gib(p.peak)]
        row += [_gib(p.breakdown.get(k)) for k in PARTS] + [p.peak_phase or "-"]
        row += ["-", "-"] if p.seconds is None else [f"{p.seconds:.3f}", f"{p.tokens_per_second:,.0f}"]
        rows.append([*row, p.status])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def plot(points: list[Point], path_stem: Path, title: str, budget: int | None) -> list[Path]:
    """Memory vs length and (when timed) time vs length, one line per method (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, suffix in (
        (lambda p: None if p.peak is None else p.peak / 2**30, "peak memory (GiB)", "memory"),
        (lambda p: p.seconds, "step time (s)", "time"),
    ):
        lines = {}
        for p in points:
            if key(p) is not None:
                lines.setdefault((p.method, p.attention), []).append((p.length, key(p)))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (name, attention), xy in lines.items():
            ax.plot(*zip(*xy, strict=True), marker="o", label=f"{name} ({attention})")
        if suffix == "memory" and budget is not None:
            ax.axhline(budget / 2**30, color="gray", linestyle="--", label="device memory / budget")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (prompt + completion tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
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
    if args.device.startswith("cuda") and torch.cuda.is_available() and not args.estimate:
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return env


def _step_description(args: argparse.Namespace) -> str:
    if args.forward_only:
        return "reference forward only"
    optimizer = f", {args.optimizer} step" if args.optimizer != "none" else ", no optimizer step"
    return "policy forward+backward, reference forward" + optimizer


def write_results(points: list[Point], args: argparse.Namespace) -> list[Path]:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.model_config).stem if args.model_config not in MODEL_CONFIGS else args.model_config
    kind = "-estimate" if args.estimate else ""
    stem = out / f"profile_memory-{name}-{torch.device(args.device).type}{kind}"
    if args.estimate:
        measure = "predicted: peak live tensor storage on fake tensors"
    else:
        measure = "max_memory_allocated" if args.device.startswith("cuda") else "peak live tensor storage"
    record = {
        "model_config": args.model_config,
        "step": _step_description(args),
        "optimizer_step_included": args.optimizer != "none" and not args.forward_only,
        "gradient_checkpointing": args.gradient_checkpointing,
        "dtype": str(args.dtype).removeprefix("torch."),
        "batch_pairs": args.batch_size,
        "prompt_fraction": args.prompt_fraction,
        "prompt_length": args.prompt_length,
        "memory_measure": measure,
        "budget_bytes": args.budget,
        "environment": _environment(args),
        "longest_fit": longest_fit(points),
        "points": [p.__dict__ for p in points],
    }
    json_path = stem.with_name(stem.name + ".json")
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    title = f"{name}{' (estimate)' if args.estimate else ''}, {record['step']}, {record['dtype']}"
    title += ", checkpointing" if args.gradient_checkpointing else ""
    return [json_path, *plot(points, stem, title, args.budget)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dpo-fast profile-memory",
        description="Peak memory and time of one DPO step per method and sequence length, measured or "
        "(--estimate) predicted on fake tensors.",
    )
    add = parser.add_argument
    add("--model-config", default="tiny", help=f"{', '.join(MODEL_CONFIGS)}, or a local config.json")
    add("--lengths", help="comma-separated lengths (default: doubling from --min-length)")
    add("--min-length", type=int, default=256)
    add("--max-length", type=int, help="default: 65536 on CUDA and for estimates, 4096 on CPU")
    add("--methods", default=",".join(METHODS), help="comma-separated name[:attention] (default: all)")
    add("--device", help="cpu or cuda[:N]: where to run, or the target of --estimate (default: cuda if any)")
    add("--estimate", action="store_true", help="predict on fake tensors: no device, no allocation")
    add("--device-memory", type=float, help="GiB: what fits (estimate: default 80; CPU: a quarter of RAM)")
    add("--dtype", choices=("float32", "bfloat16", "float16"), help="default: fp32 on a CPU run, else bf16")
    add("--batch-size", type=int, default=1, help="pairs per step (default: 1)")
    add("--prompt-fraction", type=float, default=0.5, help="prompt share of a sequence (default: 0.5)")
    add(
        "--prompt-length",
        type=int,
        help="prompt tokens per pair, whatever the length (overrides the fraction)",
    )
    add("--optimizer", choices=("none", "sgd", "adamw"), default="none", help="add an optimizer step")
    add("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    add("--forward-only", action="store_true", help="profile the reference forward alone")
    add("--warmup", type=int, help="unmeasured steps per point (default: 1 on CUDA, 0 on CPU)")
    add("--seed", type=int, default=0)
    add("--output-dir", default="profile_memory", help="where the JSON and PNGs go")
    args = parser.parse_args(argv)
    cuda_here = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda_here or args.estimate else "cpu")
    cuda = args.device.startswith("cuda")
    if cuda and not cuda_here and not args.estimate:
        parser.error("--device cuda: no CUDA device is available (--estimate predicts without one)")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda or args.estimate else "float32"))
    if args.lengths:
        try:
            args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    else:
        args.lengths = doubling(
            args.min_length, args.max_length or (65536 if cuda or args.estimate else 4096)
        )
    if not args.lengths or min(args.lengths) < 2:
        parser.error(f"--lengths must be integers >= 2, got {args.lengths}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not 0 < args.prompt_fraction < 1:
        parser.error(f"--prompt-fraction must be in (0, 1), got {args.prompt_fraction}")
    if args.device_memory is not None and not args.device_memory > 0:
        parser.error(f"--device-memory must be > 0 GiB, got {args.device_memory}")
    if args.estimate:
        args.budget = int((args.device_memory or 80) * 2**30)
    elif cuda:
        args.budget = None if args.device_memory is None else int(args.device_memory * 2**30)
    else:
        args.budget = int(args.device_memory * 2**30) if args.device_memory else _available_memory() // 4
    if args.warmup is None:
        args.warmup = 1 if cuda else 0
    return args


def main(argv: list[str]) -> int:
    """Entry point of ``dpo-fast profile-memory`` and ``benchmarks/profile_memory.py``: the exit status."""
    args = parse_args(argv)
    # the CPU buffer cache keeps freed [tokens, V] blocks outside the allocator the meter reads
    os.environ.setdefault("DPO_FAST_CPU_BUFFER_CACHE", "0")
    try:
        for spec in args.methods:
            parse_method(spec, torch.device(args.device).type, backward=not args.forward_only)
        model_config(args.model_config)
    except ValueError as error:
        print(f"dpo-fast profile-memory: error: {error}", file=sys.stderr)
        return 2
    what = "estimating" if args.estimate else "profiling"
    print(
        f"{what} {len(args.methods)} methods x {len(args.lengths)} lengths, {args.model_config} on "
        f"{args.device} ({str(args.dtype).removeprefix('torch.')}; {_step_description(args)})",
        flush=True,
    )
    points = sweep(args, log=lambda line: print(line, flush=True))
    print()
    print(table(points))
    budget = "" if args.budget is None else f" (within {_gib(args.budget)} GiB)"
    print(f"\nlongest length that fits{budget}:")
    for name, length in longest_fit(points).items():
        print(f"  {name:<36} {length if length is not None else 'none'}")
    for path in write_results(points, args):
        print(f"wrote {path}")
    return 0
