"""Shared helpers for the benchmark scripts: timing, peak memory, environment, results.

Every script prints a table and writes its raw figures (device, versions, shapes, every
timing) as JSON under ``benchmarks/results/``, or under ``$DPO_FAST_RESULTS_DIR`` when set
(the GPU suite collects one run's results in one folder).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(os.environ.get("DPO_FAST_RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a benchmark may compare against."""
    names = ["torch", "triton", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "dpo-fast"]
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, repeats: int = 5
) -> list[float]:
    """Wall-clock seconds of ``fn()`` for each of ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated by ``fn()`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def median(times: list[float]) -> float:
    return statistics.median(times)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Print ``rows`` as an aligned text table with the given columns."""
    cells = [[_fmt(row.get(col)) for col in columns] for row in rows]
    widths = [max(len(col), *(len(c[i]) for c in cells)) for i, col in enumerate(columns)]
    print("  ".join(col.rjust(w) for col, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(
    name: str, device: torch.device, config: dict[str, Any], rows: list[dict[str, Any]]
) -> Path:
    """Write ``<RESULTS_DIR>/<name>-<device kind>.json`` and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    kind = "cuda" if device.type == "cuda" else "cpu"
    path = RESULTS_DIR / f"{name}-{kind}.json"
    payload = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "versions": versions(),
        "config": config,
        "results": rows,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
