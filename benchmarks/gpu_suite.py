"""The GPU suite: everything a lent GPU should run, in one command, results in one folder.

Steps, in order (``--only`` / ``--skip`` pick some):

* ``peers``: install the carried peer wheels (``.whl/``, see ``benchmarks/peer_wheels.py``)
  into a scratch folder put on ``PYTHONPATH`` for every later step; report what imports;
* ``environment``: device, driver, CUDA, runtime, package versions, git commit;
* ``ceilings``: device copy bandwidth (bytes read + written) and bf16 matmul TFLOP/s on
  random data, the two numbers every fraction below is taken of;
* ``tests``: the GPU-marked tests (``pytest -m gpu``);
* ``sanitizers``: ``compute-sanitizer`` memcheck and racecheck over ``kernel_smoke.py``
  (a small run of every kernel, checked against the PyTorch backend);
* ``benchmarks``: every ``benchmarks/bench_*.py`` but the CPU one, each against the peers,
  torch eager and compiled where it has them;
* ``memory``: the memory sweep ``benchmarks/profile_memory.py`` (Llama-3.2-1B-shaped);
* ``predictions``: the cost model (``benchmarks/cost_model.py``) with the measured ceilings,
  beside each measurement it predicts.

Results: ``benchmarks/results/<device>-<date>/`` (or ``--out``): one log per step, the
benchmarks' JSON, ``environment.json``, ``ceilings.json``, ``predictions.json`` and
``summary.json`` (each step's status and seconds, merged across runs into the same folder).
``--archive FILE.tgz`` packs the folder (the device tool brings back at most 8 files).

The whole suite is sized for 25 minutes on an H100; a device call lasts at most 10, so split
it, e.g. ``--only peers environment ceilings tests sanitizers`` then ``--only peers
environment ceilings benchmarks memory predictions``, each with ``--out $OUT/suite
--archive $OUT/partN.tgz``. ``--quick`` runs the benchmarks at issue 20's target shapes only
and memcheck without racecheck. ``--budget-min`` stops starting steps once it is spent.

``--dry-run`` runs every step on CPU at toy sizes, kernels under Triton's interpreter
(what CI does, ``tests/test_gpu_suite.py``). ``make gpu-suite [DRY_RUN=1]`` wraps it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
WHEELS = ROOT / ".whl"
PEER_SITE = Path("/tmp/dpo_fast_peers")
PEER_MODULES = {"trl": "trl", "liger-kernel": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy"}
PEER_MODULES |= {"datasets": "datasets"}

# Benchmark arguments: full suite on a GPU (default: the script's own), --quick (issue 20's
# target shapes), --dry-run (toy sizes; a script missing here only shows its --help).
GPU_ARGS = {
    "bench_linear_logprobs.py": "--tokens 4096 8192 16384 --vocab 131072 151936",
    # issue 20's model: the longest pair each method fits
    "profile_memory.py": "--model-config llama-3.2-1b",
}
QUICK_ARGS = {
    "bench_logprobs.py": "--tokens 16384 --vocab 128256",
    "bench_linear_logprobs.py": "--tokens 8192 --vocab 131072",
    "bench_loss.py": "--pairs 8192 --tokens 4096",
    "bench_forward.py": "--batches 1 --repeats 2",
    "profile_memory.py": "--model-config llama-3.2-1b --min-length 4096 --max-length 32768",
}
TOY_ARGS = {
    "bench_logprobs.py": "--tokens 24 --vocab 300 --repeats 1 --no-compile",
    "bench_linear_logprobs.py": "--tokens 24 --hidden 16 --vocab 300 --repeats 1 --no-cpu-memory",
    "bench_loss.py": "--pairs 16 --tokens 16 --hidden 16 --vocab 128 --repeats 1",
    "bench_forward.py": "--pairs 2 --batches 1 --repeats 1 --max-length 48 --vocab 300 --no-cpu-memory",
    "profile_memory.py": "--model-config tiny --lengths 32 --device cpu",
}
# CPU-only benchmarks (the C++ kernels; issue 16's CPU and fake-tensor targets): not part of a GPU run
CPU_ONLY = {"bench_cpu.py", "bench_long_context.py"}
# Seconds each step may take on a GPU (the dry run has its own, shorter limits).
LIMITS = {
    "peers": 120,
    "environment": 60,
    "ceilings": 120,
    "tests": 480,
    "sanitizers": 420,
    "benchmarks": 900,
    "memory": 300,
    "predictions": 60,
}
DRY_LIMIT = 300


@dataclass
class Suite:
    """One run: where results go, the environment every subprocess gets, the time budget."""

    out: Path
    dry_run: bool
    quick: bool
    deadline: float
    env: dict[str, str] = field(default_factory=dict)
    steps: dict[str, dict] = field(default_factory=dict)

    def limit(self, step: str) -> float:
        wanted = DRY_LIMIT if self.dry_run else LIMITS[step]
        return min(wanted, self.deadline - time.monotonic())

    def run(self, name: str, command: list[str], timeout: float) -> dict:
        """Run ``command`` with the suite's environment, its output in ``<out>/<name>.log``."""
        log = self.out / f"{name}.log"
        started = time.monotonic()
        with log.open("w") as f:
            f.write(f"$ {' '.join(command)}\n")
            f.flush()
            try:
                code = subprocess.run(
                    command,
                    cwd=ROOT,
                    env=self.env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    timeout=max(timeout, 1),
                ).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        result = {"command": command, "returncode": code, "seconds": round(time.monotonic() - started, 1)}
        result["log"] = log.name
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"  {name}: exit {code} in {result['seconds']} s")
        if code != 0:
            print("\n".join(f"    | {line}" for line in tail))
        return result


# ---------------------------------------------------------------------------------------
# Steps: each returns a dict with at least "status" ("ok", "failed", "skipped").


def step_peers(suite: Suite) -> dict:
    wheels = sorted(WHEELS.glob("*.whl"))
    result: dict = {"wheels": [w.name for w in wheels]}
    if wheels and not suite.dry_run:
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        command += ["--upgrade", "--target", str(PEER_SITE), *map(str, wheels)]
        result["install"] = suite.run("peers-install", command, suite.limit("peers"))
        suite.env["PYTHONPATH"] = os.pathsep.join([str(PEER_SITE), suite.env["PYTHONPATH"]])
    elif suite.dry_run:
        result["note"] = "dry run: the installed packages stand in for the carried wheels"
    result["imports"] = _peer_versions(suite)
    for name, version in result["imports"].items():
        print(f"  {name}: {version}")
    failed = "install" in result and result["install"]["returncode"] != 0
    return {"status": "failed" if failed else "ok", **result}


def _peer_versions(suite: Suite) -> dict[str, str]:
    """Each peer's version as its import reports it (the dry run reads the metadata only:
    importing TRL takes seconds)."""
    from importlib import metadata

    if suite.dry_run:
        found = {}
        for name in PEER_MODULES:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                found[name] = "not installed"
        return found
    probe = "import importlib, json\nfound = {}\n"
    probe += f"for name, module in {PEER_MODULES!r}.items():\n"
    probe += "    try:\n        found[name] = getattr(importlib.import_module(module), '__version__', 'ok')\n"
    probe += "    except Exception as e:\n        found[name] = f'ERROR {type(e).__name__}: {e}'\n"
    probe += "print(json.dumps(found))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=suite.env, capture_output=True, text=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"probe": out.stderr}


def _command_output(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def step_environment(suite: Suite) -> dict:
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from common import versions

    found: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "versions": versions(),
        "torch_cuda": torch.version.cuda,
        "git_commit": _command_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
        "nvidia_smi": _command_output(["nvidia-smi"]),
        "driver": _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "dry_run": suite.dry_run,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found["device"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": props.total_memory / 2**30,
            "l2_bytes": getattr(props, "L2_cache_size", None),
        }
    else:
        found["device"] = {"name": f"{platform.machine()} CPU", "multiprocessors": os.cpu_count()}
    (suite.out / "environment.json").write_text(json.dumps(found, indent=1) + "\n")
    print(
        f"  {found['device']['name']}, torch {found['versions']['torch']}, "
        f"triton {found['versions']['triton']}"
    )
    return {"status": "ok", "device": found["device"]["name"]}


def _median_seconds(fn: Callable[[], object], device, repeats: int) -> float:
    """Median seconds of ``fn()`` after warm-up: CUDA events on a GPU, the host clock on CPU."""
    import statistics

    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_ceilings(dry_run: bool) -> dict:
    """Device copy bandwidth (bytes read + written per second) and bf16 matmul FLOP/s."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    copy_bytes = (4 << 30) if device.type == "cuda" and not dry_run else (64 << 20)
    buffers = torch.randn(2, copy_bytes // 4, device=device)
    source, target = buffers
    copy_s = _median_seconds(lambda: target.copy_(source), device, 20 if device.type == "cuda" else 3)
    buffers = source = target = None  # free the copy buffers before the matmul's
    n = 8192 if device.type == "cuda" and not dry_run else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_s = _median_seconds(lambda: a @ b, device, 20 if device.type == "cuda" else 3)
    return {
        "copy_bytes_per_s": 2 * copy_bytes / copy_s,
        "copy_bytes": 2 * copy_bytes,
        "bf16_flops": 2 * n**3 / matmul_s,
        "matmul_size": n,
        "method": "median of CUDA-event-timed runs after 3 warm-ups; random data",
    }


def step_ceilings(suite: Suite) -> dict:
    found = measure_ceilings(suite.dry_run)
    (suite.out / "ceilings.json").write_text(json.dumps(found, indent=1) + "\n")
    print(
        f"  copy {found['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {found['bf16_flops'] / 1e12:.0f} TFLOP/s"
    )
    return {"status": "ok", **found}


def _status(*results: dict) -> str:
    return "ok" if all(r["returncode"] == 0 for r in results) else "failed"


def step_tests(suite: Suite) -> dict:
    # the dry run collects only the files that hold GPU tests (all skipped on CPU)
    files = [str(p) for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text()]
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", *(files if suite.dry_run else ["tests"])]
    command += ["-p", "no:cacheprovider"]
    command += ["--junitxml", str(suite.out / "tests.xml")]
    result = suite.run("tests", command, suite.limit("tests"))
    summary = re.findall(r"^=+ (.*) =+$", (suite.out / "tests.log").read_text(), re.MULTILINE)
    # exit 5: nothing collected (e.g. every GPU test deselected); the dry run skips them all
    ok = result["returncode"] == 0 or (suite.dry_run and result["returncode"] == 5)
    return {"status": "ok" if ok else "failed", "summary": summary[-1] if summary else None, **result}


def _sanitizer() -> str | None:
    for candidate in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def step_sanitizers(suite: Suite) -> dict:
    smoke = [sys.executable, str(BENCHMARKS / "kernel_smoke.py")]
    sanitizer = _sanitizer()
    if suite.dry_run or sanitizer is None:
        result = suite.run("kernel-smoke", smoke, suite.limit("sanitizers"))
        note = "dry run" if suite.dry_run else "compute-sanitizer not found"
        return {"status": _status(result), "note": f"{note}: kernel smoke run without a sanitizer", **result}
    tools = ("memcheck",) if suite.quick else ("memcheck", "racecheck")
    results = {}
    for tool in tools:
        command = [sanitizer, "--tool", tool, "--error-exitcode", "99", "--target-processes", "all", *smoke]
        results[tool] = suite.run(f"sanitizer-{tool}", command, suite.limit("sanitizers") / len(tools))
    log = "".join((suite.out / f"sanitizer-{tool}.log").read_text() for tool in tools)
    if "Device not supported" in log or "not supported on this" in log:
        return {
            "status": "skipped",
            "note": "compute-sanitizer does not support this device/runtime",
            **results,
        }
    return {"status": _status(*results.values()), **results}


def _benchmark_args(script: str, suite: Suite) -> list[str]:
    """Arguments for one benchmark script (``--help`` in a dry run when no toy sizes are known)."""
    if suite.dry_run:
        return TOY_ARGS.get(script, "--help").split()
    return (QUICK_ARGS if suite.quick else GPU_ARGS).get(script, "").split()


def step_benchmarks(suite: Suite) -> dict:
    scripts = sorted(p.name for p in BENCHMARKS.glob("bench_*.py") if p.name not in CPU_ONLY)
    results = {}
    for script in scripts:
        remaining = suite.limit("benchmarks")
        if remaining < 30:
            results[script] = {"returncode": "not run: time budget spent"}
            continue
        command = [sys.executable, str(BENCHMARKS / script), *_benchmark_args(script, suite)]
        results[script] = suite.run(Path(script).stem, command, remaining)
    return {"status": _status(*results.values()), "scripts": results}


def step_memory(suite: Suite) -> dict:
    script = BENCHMARKS / "profile_memory.py"
    if not script.exists():
        return {"status": "skipped", "note": "benchmarks/profile_memory.py does not exist yet"}
    command = [
        sys.executable,
        str(script),
        *_benchmark_args(script.name, suite),
        "--output-dir",
        str(suite.out),
    ]
    result = suite.run("profile_memory", command, suite.limit("memory"))
    return {"status": _status(result), **result}


def step_predictions(suite: Suite) -> dict:
    sys.path.insert(0, str(BENCHMARKS))
    import cost_model
    import triton

    ceilings_file = suite.out / "ceilings.json"
    ceilings = (
        json.loads(ceilings_file.read_text()) if ceilings_file.exists() else measure_ceilings(suite.dry_run)
    )
    environment = json.loads((suite.out / "environment.json").read_text())
    planning = cost_model.DEVICES["h200" if "H200" in environment["device"]["name"] else "h100"]
    device = cost_model.with_ceilings(planning, ceilings["copy_bytes_per_s"], ceilings["bf16_flops"])
    report = cost_model.static_report(triton_version=triton.__version__)
    rows = compare(suite.out, device, report, any_dtype=suite.dry_run)
    print(f"  cost model on {device.name}; compile report of Triton {report.get('triton')}")
    print(f"  {'prediction':44} {'measured':>10} {'predicted':>17} {'ratio':>6}")
    for row in rows:
        band = f"{row['predicted_ms']:.3g}-{row['predicted_ms_slow']:.3g}"
        print(f"  {row['what'][:44]:44} {row['measured_ms']:10.3g} {band:>17} {row['ratio']:6.2f}")
    targets = [cost_model.as_dict(p) for p in cost_model.predictions(device, report)]
    payload = {"device": device.name, "compile_report_triton": report.get("triton"), "rows": rows}
    payload["at_target_shapes"] = targets
    (suite.out / "predictions.json").write_text(json.dumps(payload, indent=1) + "\n")
    return {"status": "ok", "compared": len(rows)}


def _results(out: Path, name: str) -> list[dict]:
    found = sorted(out.glob(f"{name}-*.json"))
    return json.loads(found[0].read_text())["results"] if found else []


def compare(out: Path, device, report: dict, any_dtype: bool = False) -> list[dict]:
    """Each measured bf16 row of the benchmarks that the cost model predicts, at the row's
    shape (rows of any dtype with ``any_dtype``: the dry run's fp32 CPU rows exercise it)."""
    import cost_model

    rows = []

    def add(what: str, measured_ms: float | None, prediction) -> None:
        if measured_ms:
            rows.append(
                {
                    "what": what,
                    "measured_ms": measured_ms,
                    "predicted_ms": 1e3 * prediction.seconds,
                    "predicted_ms_slow": 1e3 * prediction.seconds_slow,
                    "ratio": measured_ms / (1e3 * prediction.seconds),
                }
            )

    for row in _results(out, "bench_logprobs"):
        if row["method"] == "dpo_fast" and (any_dtype or row["dtype"] == "bfloat16"):
            n, v = row["tokens"], row["vocab"]
            add(f"core forward {n}x{v}", row.get("forward_ms"), cost_model.core_forward(n, v, device, report))
            add(f"core fwd+bwd {n}x{v}", row.get("fwd_bwd_ms"), cost_model.core_step(n, v, device, report))
    for row in _results(out, "bench_linear_logprobs"):
        if row["method"] == "dpo_fast" and (any_dtype or row["dtype"] == "bf16"):
            n, h, v = row["N"], row["H"], row["V"]
            prediction = cost_model.linear_chunked(n, h, v, device, report)
            add(f"linear chunked fwd+bwd N={n} V={v}", row.get("fwd_bwd_ms"), prediction)
    for row in _results(out, "bench_loss"):
        if row.get("part") == "head" and (any_dtype or row["dtype"] == "bfloat16"):
            ours, liger = cost_model.preference_head(row["T"], row["H"], row["V"], device, report)
            prediction = ours if row["method"].startswith("dpo_fast") else liger
            if row["method"].startswith(("dpo_fast", "liger")):
                add(f"{row['method'][:18]} T={row['T']}", row.get("fwd_bwd_ms"), prediction)
    return rows


STEPS: dict[str, Callable[[Suite], dict]] = {
    "peers": step_peers,
    "environment": step_environment,
    "ceilings": step_ceilings,
    "tests": step_tests,
    "sanitizers": step_sanitizers,
    "benchmarks": step_benchmarks,
    "memory": step_memory,
    "predictions": step_predictions,
}


def default_out(dry_run: bool) -> Path:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    suffix = "-dry-run" if dry_run else ""
    return BENCHMARKS / "results" / f"{slug}{suffix}-{datetime.date.today().isoformat()}"


def suite_environment(dry_run: bool, out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["DPO_FAST_RESULTS_DIR"] = str(out)
    if dry_run:
        # the smoke run calls the Triton kernels through the interpreter; the benchmarks only
        # need to run through, on the PyTorch backend (the interpreter would take minutes)
        env["TRITON_INTERPRET"] = "1"
        env["DPO_FAST_BACKEND"] = "torch"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every step on CPU at toy sizes")
    parser.add_argument(
        "--quick", action="store_true", help="benchmarks at the target shapes only; no racecheck"
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (default benchmarks/results/<device>-<date>)"
    )
    parser.add_argument("--only", nargs="+", choices=STEPS, help="run these steps only")
    parser.add_argument("--skip", nargs="+", choices=STEPS, default=[], help="leave these steps out")
    parser.add_argument(
        "--budget-min", type=float, default=25.0, help="start no step after this many minutes"
    )
    parser.add_argument("--archive", type=Path, help="also pack the results folder into this .tgz")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    out = (args.out or default_out(args.dry_run)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    suite = Suite(out, args.dry_run, args.quick, time.monotonic() + 60 * args.budget_min)
    suite.env = suite_environment(args.dry_run, out)
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"steps": {}}
    for name, step in STEPS.items():
        if (args.only and name not in args.only) or name in args.skip:
            continue
        print(f"[{name}]", flush=True)
        started = time.monotonic()
        if suite.deadline - started < 30:
            outcome = {"status": "skipped", "note": "time budget spent"}
        else:
            try:
                outcome = step(suite)
            except Exception as error:  # one broken step must not lose the others' results
                outcome = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
                print(f"  failed: {outcome['error']}")
        outcome["seconds"] = round(time.monotonic() - started, 1)
        summary["steps"][name] = outcome
        summary_file.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"{'step':12} {'status':8} {'seconds':>8}")
    for name, outcome in summary["steps"].items():
        print(f"{name:12} {outcome['status']:8} {outcome['seconds']:8.1f}  {outcome.get('note', '')}")
    if args.archive:
        with tarfile.open(args.archive, "w:gz") as archive:
            archive.add(out, arcname=out.name)
        print(f"packed {args.archive}")
    print(f"results: {out}")
    return 1 if any(o["status"] == "failed" for o in summary["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
