"""The GPU suite's dry run (``make gpu-suite DRY_RUN=1``): every step on CPU at toy sizes.

A GPU is lent only now and then; this keeps the suite runnable in between, so the device
minutes go to measuring, not to fixing the script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def test_dry_run_runs_every_step_and_writes_its_results(tmp_path):
    out = tmp_path / "results"
    archive = tmp_path / "results.tgz"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPO_FAST_", "TRITON_INTERPRET"))}
    run = subprocess.run(
        [
            sys.executable,
            "benchmarks/gpu_suite.py",
            "--dry-run",
            "--out",
            str(out),
            "--archive",
            str(archive),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert list(steps) == [
        "peers",
        "environment",
        "ceilings",
        "tests",
        "sanitizers",
        "benchmarks",
        "memory",
        "predictions",
    ]
    expected_skips = {"memory"} if not (ROOT / "benchmarks" / "profile_memory.py").exists() else set()
    for name, outcome in steps.items():
        assert outcome["status"] == ("skipped" if name in expected_skips else "ok"), (name, outcome)

    environment = json.loads((out / "environment.json").read_text())
    assert environment["dry_run"] and environment["versions"]["torch"]
    ceilings = json.loads((out / "ceilings.json").read_text())
    assert ceilings["copy_bytes_per_s"] > 0 and ceilings["bf16_flops"] > 0
    assert "kernel smoke run on cpu: ok" in (out / "kernel-smoke.log").read_text()
    scripts = sorted(
        p.stem for p in (ROOT / "benchmarks").glob("bench_*.py") if p.name not in gpu_suite.CPU_ONLY
    )
    for script in scripts:
        payload = json.loads((out / f"{script}-cpu.json").read_text())
        assert payload["results"], script
    if "memory" not in expected_skips:
        assert list(out.glob("profile_memory-*.json")), "the memory sweep wrote no results"
    predictions = json.loads((out / "predictions.json").read_text())
    assert {row["what"].split()[0] for row in predictions["rows"]} >= {"core", "linear"}
    assert all(row["measured_ms"] > 0 and row["predicted_ms"] > 0 for row in predictions["rows"])
    assert len(predictions["at_target_shapes"]) >= 8
    with tarfile.open(archive) as packed:
        assert f"{out.name}/summary.json" in packed.getnames()
