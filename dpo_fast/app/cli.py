"""The ``dpo-fast`` command: ``train``, ``bench``, ``profile-memory`` and ``--version``.

``dpo-fast train`` runs TRL's ``DPOTrainer`` with dpo_fast's kernels inside, with TRL's flags
(:mod:`dpo_fast.app.train`); with no model or data it runs the demo. Nothing beyond the
standard library is imported before a command needs it, so ``--version`` and ``train --help``
answer at once. Errors a user can fix (:class:`~dpo_fast.app.errors.UserError`, out of GPU
memory) print one line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from .. import __version__
from .errors import UserError

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
USER_ERROR = 2
USAGE = """usage: dpo-fast [--version] {train,bench,profile-memory} ...

  train            DPO with TRL's DPOTrainer and dpo_fast's kernels (TRL's flags; no arguments:
                   the demo on the bundled hh-rlhf pairs). dpo-fast train --help lists the flags.
  bench            run the microbenchmarks in benchmarks/ (a source checkout)
  profile-memory   profile the memory of a training step
"""
OUT_OF_MEMORY = (
    "out of GPU memory: try --layout packed (no padding), a shorter --max_length, a smaller "
    "--per_device_train_batch_size with more --gradient_accumulation_steps, --gradient_checkpointing "
    "or --use_peft"
)


def version() -> str:
    """``dpo-fast X (torch Y, transformers Z, trl W)``, read without importing them."""
    found = []
    for name in ("torch", "transformers", "trl"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return f"dpo-fast {__version__} ({', '.join(found)})"


def _train(argv: Sequence[str]) -> int:
    from .options import INSTALL_TRL, help_text, trl_installed

    if not trl_installed():
        raise UserError(INSTALL_TRL)
    if "-h" in argv or "--help" in argv:
        print(help_text(), end="")
        return 0
    from .train import run

    return run(list(argv))


def _run_scripts(scripts: list[Path], extra: Sequence[str]) -> int:
    extra = list(extra[1:] if extra[:1] == ["--"] else extra)
    status = 0
    for script in scripts:
        print(f"== {script.name} ==", flush=True)
        status = subprocess.call([sys.executable, str(script), *extra], cwd=script.parent.parent) or status
    return status


def _bench(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="dpo-fast bench", description="Run benchmarks/bench_*.py.")
    parser.add_argument("--only", nargs="+", help="run only the scripts whose name contains one of these")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed on to every script")
    args = parser.parse_args(argv)
    scripts = sorted(BENCHMARKS.glob("bench_*.py")) if BENCHMARKS.is_dir() else []
    if args.only:
        scripts = [s for s in scripts if any(name in s.stem for name in args.only)]
    if not scripts:
        raise UserError(
            f"no benchmark scripts found in {BENCHMARKS} (they ship with the source repository, "
            "not with the installed package)"
        )
    return _run_scripts(scripts, args.extra)


def _profile_memory(argv: Sequence[str]) -> int:
    try:  # by its full name: sys.modules decides, not an attribute of this package
        profile_memory = importlib.import_module(f"{__package__}.profile_memory")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.profile_memory":
            raise
        raise UserError(
            "profile-memory is not available in this build (no dpo_fast.app.profile_memory)"
        ) from None
    return profile_memory.main(list(argv))


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": _train,
    "bench": _bench,
    "profile-memory": _profile_memory,
}


def _is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")  # only ever raised once torch is imported
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dpo-fast`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else USER_ERROR
    if argv[0] == "--version":
        print(version())
        return 0
    command = COMMANDS.get(argv[0])
    try:
        if command is None:
            raise UserError(
                f"unknown command {argv[0]!r}: choose one of {', '.join(COMMANDS)} (or --version)"
            )
        return command(argv[1:])
    except UserError as error:
        print(f"dpo-fast: error: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        print("dpo-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not _is_out_of_memory(error):
            raise
        print(f"dpo-fast: error: {OUT_OF_MEMORY}", file=sys.stderr)
    return USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
