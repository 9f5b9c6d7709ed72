"""Download the peers' wheels for the GPU machine, ready to carry there.

The lent GPU machines run this workplace's CUDA image (Python 3.12, x86-64, torch 2.11,
Triton 3.6, transformers 5.17) and reach no package registry, so the peers the benchmarks
compare against travel as wheels: TRL 1.16, Liger Kernel 0.8.5 and Cut Cross-Entropy 25.1,
plus the pure-Python requirements the image lacks (``datasets`` and its ``dill`` and
``multiprocess``, for TRL). Everything else they require is on the image
(:data:`ON_DEVICE_IMAGE`); the script checks each wheel's requirements against both lists.

The wheels land in ``.whl/`` at the repository root (ignored by git). On the GPU machine,
``benchmarks/gpu_suite.py`` installs them with ``pip install --no-index --no-deps --target``
into a scratch folder and puts it on ``PYTHONPATH``; pass ``carry: [".whl"]`` to the device
tool. Usage: ``python benchmarks/peer_wheels.py [--dest .whl]``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = ROOT / ".whl"

PEERS = {"trl": "1.16.0", "liger-kernel": "0.8.5", "cut-cross-entropy": "25.1.1"}
# Required by the peers, missing from the GPU image. datasets 4.7.0 is the oldest TRL 1.16
# accepts and asks least of the image's pyarrow (>= 21).
MISSING_ON_IMAGE = {"datasets": "4.7.0", "dill": "0.4.0", "multiprocess": "0.70.18"}
# What the wheels above require that the image already holds (KINDS.md's package list).
ON_DEVICE_IMAGE = frozenset(
    {
        "accelerate",
        "filelock",
        "fsspec",
        "httpx",
        "huggingface-hub",
        "jinja2",
        "numpy",
        "packaging",
        "pandas",
        "psutil",
        "pyarrow",
        "pyyaml",
        "requests",
        "torch",
        "transformers",
        "tqdm",
        "triton",
        "xxhash",
    }
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(dest: Path) -> list[Path]:
    """``pip download`` every pinned wheel (no dependencies) for CPython 3.12 on x86-64 Linux."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    command += [f"{name}=={version}" for name, version in {**PEERS, **MISSING_ON_IMAGE}.items()]
    subprocess.run(command, check=True)
    return sorted(dest.glob("*.whl"))


def requirements(wheel: Path) -> list[str]:
    """Names a wheel requires on Linux / CPython 3.12, extras left out."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    names = []
    for line in lines:
        if not line.startswith("Requires-Dist:") or "extra ==" in line:
            continue
        spec, _, marker = line.removeprefix("Requires-Dist:").partition(";")
        if "platform_system" in marker and "Linux" not in marker:
            continue
        names.append(_normalize(re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0]))
    return names


def unmet(wheels: list[Path]) -> dict[str, list[str]]:
    """Per wheel, requirements that neither travel with it nor are on the image."""
    carried = {_normalize(w.name.split("-")[0]) for w in wheels}
    found = {}
    for wheel in wheels:
        missing = [r for r in requirements(wheel) if r not in carried and r not in ON_DEVICE_IMAGE]
        if missing:
            found[wheel.name] = missing
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST)
    args = parser.parse_args(argv)
    wheels = download(args.dest)
    wanted = {_normalize(n) for n in {**PEERS, **MISSING_ON_IMAGE}}
    stale = [w for w in wheels if _normalize(w.name.split("-")[0]) not in wanted]
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.dest}")
    for wheel, names in unmet(wheels).items():
        print(f"UNMET: {wheel} requires {', '.join(names)}")
    for wheel in stale:
        print(f"STALE: {wheel.name} is not pinned here; remove it (two versions stop the install)")
    return 1 if unmet(wheels) or stale else 0


if __name__ == "__main__":
    sys.exit(main())
