"""Packaging: the top-level ``kernels/`` folder never shadows PyPI's ``kernels`` package, and
``dpo_fast.kernels`` always comes from the same checkout as ``dpo_fast``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, pythonpath: list[Path] | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_pypi_kernels_wins_from_the_repository_root(tmp_path):
    # a stand-in for PyPI's package, installed after the current directory on sys.path
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("PYPI = True\n")
    out = _python(
        "import sys; sys.path.insert(0, ''); import kernels; print(getattr(kernels, 'PYPI', False))",
        cwd=ROOT,
        pythonpath=[tmp_path / "site"],
    )
    assert out == "True"


def test_repository_kernels_folder_is_not_a_package_transformers_sees():
    out = _python(
        "import sys; sys.path.insert(0, ''); import importlib.util as u; "
        "spec = u.find_spec('kernels'); print(spec is None or spec.origin is None); "
        "from transformers.utils.import_utils import is_kernels_available; print(is_kernels_available())",
        cwd=ROOT,
    )
    assert out.splitlines() == ["True", "False"]


def test_kernels_come_from_the_checkout_of_dpo_fast(tmp_path):
    # a second checkout on PYTHONPATH, while the first may be installed in editable mode
    other = tmp_path / "other_checkout"
    for folder in ("dpo_fast", "kernels", "csrc"):
        shutil.copytree(ROOT / folder, other / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = _python(
        "import dpo_fast, dpo_fast.kernels.logprobs as k; print(dpo_fast.__file__); print(k.__file__)",
        cwd=tmp_path,
        pythonpath=[other],
    )
    package_file, kernel_file = out.splitlines()
    assert Path(package_file).is_relative_to(other)
    assert Path(kernel_file) == other / "kernels" / "logprobs.py"


def test_wheel_holds_the_kernels_inside_dpo_fast(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path,
            ROOT,
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert kernels, "no kernel modules found"
    for name in kernels:
        assert f"dpo_fast/kernels/{name}" in names
    for source in (ROOT / "csrc").glob("*.cpp"):
        assert f"dpo_fast/csrc/{source.name}" in names
    assert not [n for n in names if n.startswith(("kernels/", "csrc/"))]
    # the installed package's kernels resolve to its own copies
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    out = _python("import dpo_fast.kernels.logprobs as k; print(k.__file__)", cwd=tmp_path, pythonpath=[site])
    assert Path(out) == site / "dpo_fast" / "kernels" / "logprobs.py"
