"""The ``dpo-fast`` command: ``train`` (a DPO run), ``bench`` and ``profile-memory``.

Errors a user can fix (a missing or malformed data file, a model directory that is not a
causal LM, out of GPU memory) print one line and exit with status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ..constants import LAYOUTS
from .pairs import DataError
from .train import MODEL_CONFIGS, SetupError, TrainConfig, train

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
USER_ERROR = 2


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    auto = "(default: picked for the device: CPU demo or GPU)"
    data = parser.add_argument_group("data and model")
    data.add_argument(
        "--data",
        help="JSONL/JSONL.gz of {prompt, chosen, rejected} or hh-rlhf {chosen, rejected} "
        "dialogues (default: the bundled hh-rlhf subset)",
    )
    data.add_argument("--skip-invalid", action="store_true", help="skip invalid pairs instead of stopping")
    data.add_argument("--train-pairs", type=int, help="train on the first N pairs " + auto)
    data.add_argument("--eval-pairs", type=int, default=64, help="hold out the next N pairs (default: 64)")
    data.add_argument("--model", help="a local Hugging Face causal LM directory (default: random init)")
    data.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), help="random-init Llama size " + auto)
    data.add_argument(
        "--tokenizer",
        help="a local tokenizer directory (default: the model's, or a BPE learned from the data)",
    )
    data.add_argument("--vocab-size", type=int, help="size of the learned BPE " + auto)
    loss = parser.add_argument_group("loss")
    loss.add_argument(
        "--loss-type",
        default="sigmoid",
        help="a loss type, or several joined by commas (e.g. sigmoid,bco_pair); default: sigmoid",
    )
    loss.add_argument("--loss-weights", help="comma-separated weights, one per loss type")
    loss.add_argument("--beta", type=float, default=0.1, help="default: 0.1")
    loss.add_argument("--label-smoothing", type=float, default=0.0)
    run = parser.add_argument_group("training")
    run.add_argument("--layout", choices=LAYOUTS, default="padded", help="batch layout (default: padded)")
    run.add_argument("--steps", type=int, help="optimizer steps " + auto)
    run.add_argument("--batch-size", type=int, help="pairs per step " + auto)
    run.add_argument("--max-length", type=int, help="tokens per prompt + completion " + auto)
    run.add_argument(
        "--max-prompt-length",
        type=int,
        help="keep the prompt's last N tokens (default: half of --max-length)",
    )
    run.add_argument("--lr", type=float, help="peak learning rate " + auto)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--backend",
        choices=("auto", "triton", "cpp", "torch"),
        default="auto",
        help="kernel backend (default: auto)",
    )
    run.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output-dir",
        default="dpo_fast_run",
        help="checkpoint, metrics.jsonl, summary.json (default: ./dpo_fast_run)",
    )
    out.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    out.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace) -> TrainConfig:
    loss_types = tuple(t.strip() for t in args.loss_type.split(",") if t.strip())
    weights = None
    if args.loss_weights:
        try:
            weights = [float(w) for w in args.loss_weights.split(",")]
        except ValueError:
            raise SetupError(
                f"--loss-weights must be comma-separated numbers, got {args.loss_weights!r}"
            ) from None
    return TrainConfig(
        data=args.data,
        model=args.model,
        model_config=args.model_config,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        loss_type=loss_types,
        loss_weights=weights,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        layout=args.layout,
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        lr=args.lr,
        train_pairs=args.train_pairs,
        eval_pairs=args.eval_pairs,
        skip_invalid=args.skip_invalid,
        output_dir=args.output_dir,
        save_every=args.save_every,
        resume=args.resume,
        seed=args.seed,
        backend=args.backend,
        device=args.device,
        progress=not args.no_progress,
    )


def _progression(metrics_file: Path, rows: int = 6) -> list[str]:
    """Reward accuracy and margin averaged over ``rows`` equal windows of the steps."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not records:
        return []
    size = max(1, len(records) // rows)
    lines = ["  steps       loss   reward acc   margin"]
    for start in range(0, len(records) - size + 1, size):
        window = records[start : start + size]

        def mean(key: str, window: list[dict] = window) -> float:
            return sum(r[key] for r in window) / len(window)

        first, end = window[0]["step"], window[-1]["step"]
        lines.append(
            f"  {first:>4}-{end:<4}  {mean('loss'):7.3f}   {mean('rewards/accuracies'):8.2f}   "
            f"{mean('rewards/margins'):7.3f}"
        )
    return lines


def _print_summary(summary: dict, output_dir: str) -> None:
    print("\nreward accuracy and margin on the training batches (metrics.jsonl):")
    for line in _progression(Path(output_dir) / "metrics.jsonl"):
        print(line)
    memory_key = next(k for k in summary if k.startswith("peak"))
    if summary["seconds_per_step"] is not None:
        print(
            f"\n{summary['steps_this_run']} steps: {summary['seconds_per_step']:.3f} s/step (median), "
            f"{summary['tokens_per_second']:,.0f} tokens/s, "
            f"{memory_key} {summary[memory_key] / 2**20:,.0f} MiB"
        )
    for name, key in (("training pairs", "train_pairs"), ("held-out pairs", "held_out_pairs")):
        if key in summary:
            m = summary[key]
            print(
                f"{name + ':':16} loss {m['loss']:.3f}, reward accuracy {m['rewards/accuracies']:.2f}, "
                f"margin {m['rewards/margins']:.3f}"
            )
    print(f"outputs in {output_dir}/: checkpoint/, metrics.jsonl, summary.json")


def _train(args: argparse.Namespace) -> int:
    summary = train(_config(args), log=print)
    _print_summary(summary, args.output_dir)
    return 0


def _run_scripts(scripts: list[Path], extra: Sequence[str]) -> int:
    extra = list(extra[1:] if extra[:1] == ["--"] else extra)
    status = 0
    for script in scripts:
        print(f"== {script.name} ==", flush=True)
        status = subprocess.call([sys.executable, str(script), *extra], cwd=script.parent.parent) or status
    return status


def _bench(args: argparse.Namespace) -> int:
    scripts = sorted(BENCHMARKS.glob("bench_*.py")) if BENCHMARKS.is_dir() else []
    if args.only:
        scripts = [s for s in scripts if any(name in s.stem for name in args.only)]
    if not scripts:
        raise SetupError(
            f"no benchmark scripts found in {BENCHMARKS} (they ship with the source repository, "
            "not with the installed package)"
        )
    return _run_scripts(scripts, args.extra)


def _profile_memory(args: argparse.Namespace) -> int:
    script = BENCHMARKS / "profile_memory.py"
    if not script.is_file():
        raise SetupError(f"the memory profile is not available: {script} does not exist (yet)")
    return _run_scripts([script], args.extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-fast", description="Fused kernels for DPO-family training.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser(
        "train",
        help="train a model with DPO on preference data (no arguments: the CPU/GPU demo)",
        description="DPO in a plain PyTorch loop on dpo_fast's kernels. With no arguments: a small random "
        "Llama on the bundled hh-rlhf subset.",
    )
    _add_train_arguments(train_parser)
    train_parser.set_defaults(func=_train)
    bench = commands.add_parser("bench", help="run the microbenchmarks in benchmarks/")
    bench.add_argument("--only", nargs="+", help="run only the scripts whose name contains one of these")
    bench.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed on to every script")
    bench.set_defaults(func=_bench)
    profile = commands.add_parser(
        "profile-memory", help="run the memory profile (benchmarks/profile_memory.py)"
    )
    profile.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed on to the script")
    profile.set_defaults(func=_profile_memory)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dpo-fast`` console script; returns the exit status."""
    import torch

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, SetupError) as error:
        print(f"dpo-fast: error: {error}", file=sys.stderr)
    except torch.cuda.OutOfMemoryError:
        print(
            "dpo-fast: error: out of GPU memory: try --layout packed (no padding), a shorter --max-length "
            "or a smaller --batch-size",
            file=sys.stderr,
        )
    except KeyboardInterrupt:
        print("dpo-fast: interrupted", file=sys.stderr)
        return 130
    return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
