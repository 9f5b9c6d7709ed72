"""Run the peers' own test suites against dpo_fast (``make peer-tests``).

Liger: the sdist of liger-kernel (its tests are not in the wheel) is fetched with
``pip download liger-kernel==LIGER_VERSION --no-binary :all: --no-deps``, and its chunked-loss
tests for DPO, CPO, SimPO and ORPO are copied with one change: the imports of the loss
modules, autograd Functions and functional forms now name ``dpo_fast.integrations.liger``
(:func:`rewrite_liger_imports`). Everything else — the reference implementations, shapes,
tolerances, Liger's ``test.utils`` — is Liger's.

TRL: TRL's sdist ships no tests, so its ``tests/test_dpo_trainer.py`` (with ``testing_utils``
and ``conftest``) is read from a TRL source tree given with ``--trl-source`` (a checkout or a
bare git repository; ``DPO_FAST_TRL_SOURCE`` by default). It runs offline from a folder of
local stand-ins for the hub models and datasets (``standins.py``) once per mode of
``trl_plugin.py``: plain TRL, ``patch()``, and ``FastDPOTrainer`` with each layout. Vision-
language tests are deselected (no stand-ins). The report lists, per mode, the tests that
pass plainly but not in that mode.

Usage::

    python tests/peers/run.py liger [-k EXPR]
    python tests/peers/run.py trl --trl-source ~/src/trl [--modes plain,patch,packed] [-k EXPR]
    python tests/peers/run.py all --trl-source ~/src/trl

Results: ``build/peers/summary.json`` and one JUnit XML file per run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LIGER_VERSION = "0.8.5"
LIGER_TESTS = ("test_dpo_loss.py", "test_cpo_loss.py", "test_simpo_loss.py", "test_orpo_loss.py")
TRL_FILES = ("__init__.py", "conftest.py", "testing_utils.py", "testing_constants.py", "test_dpo_trainer.py")
TRL_MODES = ("plain", "patch", "padded", "packed", "prefix_shared")
# no local stand-ins for vision-language models and their processors
TRL_DESELECT = "not VLM and not Vision and not Slow"
# TRL's Liger tests patch the models' modules with Liger's Triton kernels for the rest of the
# session: without a GPU they fail, and so does every later test
TRL_DESELECT_WITHOUT_GPU = " and not liger"
# the loss classes / Functions / functional forms Liger's tests import
_LIGER_IMPORT = re.compile(
    r"^from liger_kernel\.chunked_loss(?:\.(?:dpo_loss|cpo_loss|simpo_loss|orpo_loss|functional))? import ",
    re.MULTILINE,
)


def rewrite_liger_imports(source: str) -> str:
    """Point the imports of Liger's preference losses at ``dpo_fast.integrations.liger``.

    Only ``from liger_kernel.chunked_loss[.{dpo,cpo,simpo,orpo}_loss|.functional] import ...``
    lines change; any other import (``liger_kernel.utils``, ``test.utils``) stays.
    """
    rewritten, count = _LIGER_IMPORT.subn("from dpo_fast.integrations.liger import ", source)
    if not count:
        raise ValueError("no Liger chunked-loss import found to rewrite: has Liger's test layout changed?")
    return rewritten


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(HERE), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _pytest(cwd: Path, args: list[str], junit: Path, env: dict[str, str], timeout: int) -> dict:
    """Run pytest in a subprocess; the outcome of every test, read from its JUnit report."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    print("$", " ".join(command), f"(in {cwd})", flush=True)
    completed = subprocess.run(command, cwd=cwd, env=_environment(env), timeout=timeout, check=False)
    if not junit.exists():
        raise RuntimeError(f"pytest exited with {completed.returncode} and wrote no report")
    return read_junit(junit)


def read_junit(path: Path) -> dict[str, str]:
    """``{test id: "passed" | "failed" | "skipped" | "error"}`` from a JUnit XML report."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        outcomes[name] = outcome
    return outcomes


def counts(outcomes: dict[str, str]) -> dict[str, int]:
    result = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for outcome in outcomes.values():
        result[outcome] += 1
    return result


# ---------------------------------------------------------------------------------------------- Liger


def fetch_liger(work: Path) -> Path:
    """Liger's sdist, unpacked under ``work``; its root folder."""
    root = work / f"liger_kernel-{LIGER_VERSION}"
    if root.exists():
        return root
    download = work / "download"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            f"liger-kernel=={LIGER_VERSION}",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-d",
            str(download),
        ],
        check=True,
    )
    with tarfile.open(download / f"liger_kernel-{LIGER_VERSION}.tar.gz") as archive:
        archive.extractall(work, filter="data")
    return root


def prepare_liger(work: Path) -> Path:
    """A folder holding Liger's ``test`` package: its utils and the four rewritten test files."""
    source = fetch_liger(work)
    suite = work / "suite"
    shutil.rmtree(suite, ignore_errors=True)
    (suite / "test" / "chunked_loss").mkdir(parents=True)
    for name in ("__init__.py", "utils.py", "conftest.py"):
        shutil.copy(source / "test" / name, suite / "test" / name)
    shutil.copy(source / "test" / "chunked_loss" / "__init__.py", suite / "test" / "chunked_loss")
    for name in LIGER_TESTS:
        text = (source / "test" / "chunked_loss" / name).read_text()
        (suite / "test" / "chunked_loss" / name).write_text(rewrite_liger_imports(text))
    (suite / "pytest.ini").write_text("[pytest]\n")
    return suite


def run_liger(work: Path, keyword: str | None, timeout: int) -> dict:
    suite = prepare_liger(work / "liger")
    args = [f"test/chunked_loss/{name}" for name in LIGER_TESTS]
    if keyword:
        args += ["-k", keyword]
    outcomes = _pytest(suite, args, work / "liger.xml", {}, timeout)
    return {"counts": counts(outcomes), "not_passed": sorted(k for k, v in outcomes.items() if v != "passed")}


# ---------------------------------------------------------------------------------------------- TRL


def _read_trl_file(source: Path, name: str) -> str:
    checkout = source / "tests" / name
    if checkout.exists():
        return checkout.read_text()
    # a bare repository (or a .git folder): the newest commit's file
    shown = subprocess.run(
        ["git", f"--git-dir={source}", "show", f"HEAD:tests/{name}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if shown.returncode:
        raise FileNotFoundError(f"{source}: no tests/{name} (a TRL checkout or git repository is expected)")
    return shown.stdout


def prepare_trl(work: Path, source: Path) -> Path:
    """TRL's test files next to the model/dataset stand-ins, ready to run offline."""
    sys.path.insert(0, str(HERE))
    import standins

    suite = work / "suite"
    (suite / "tests").mkdir(parents=True, exist_ok=True)
    for name in TRL_FILES:
        try:
            (suite / "tests" / name).write_text(_read_trl_file(source, name))
        except FileNotFoundError:
            if name != "testing_constants.py":  # absent in some releases
                raise
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: TRL's slow tests\n")
    standins.build(suite)
    return suite


def run_trl(work: Path, source: Path, modes: list[str], keyword: str | None, timeout: int) -> dict:
    suite = prepare_trl(work / "trl", source)
    select = TRL_DESELECT + ("" if _has_cuda() else TRL_DESELECT_WITHOUT_GPU)
    select += f" and ({keyword})" if keyword else ""
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results, outcomes = {}, {}
    for mode in modes:
        env = {**offline, "DPO_FAST_PEER_MODE": mode}
        args = ["tests/test_dpo_trainer.py", "-p", "trl_plugin", "-k", select]
        outcomes[mode] = _pytest(suite, args, work / f"trl-{mode}.xml", env, timeout)
        results[mode] = {"counts": counts(outcomes[mode])}
    if "plain" in outcomes:
        passing = {k for k, v in outcomes["plain"].items() if v == "passed"}
        for mode in modes:
            results[mode]["fail_where_plain_passes"] = sorted(
                k for k in passing if outcomes[mode].get(k) != "passed"
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=("liger", "trl", "all"))
    parser.add_argument("--work", type=Path, default=REPO / "build" / "peers")
    parser.add_argument("--trl-source", type=Path, default=os.environ.get("DPO_FAST_TRL_SOURCE"))
    parser.add_argument("--modes", default=",".join(TRL_MODES), help=f"TRL modes, from {TRL_MODES}")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression for both suites")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    summary = {}
    if args.suite in ("liger", "all"):
        summary["liger"] = run_liger(args.work, args.keyword, args.timeout)
    if args.suite in ("trl", "all"):
        if args.trl_source is None:
            parser.error("TRL's tests are not on PyPI: pass --trl-source (a TRL checkout or git repository)")
        modes = args.modes.split(",")
        unknown = sorted(set(modes) - set(TRL_MODES))
        if unknown:
            parser.error(f"--modes: unknown {unknown}; choose from {TRL_MODES}")
        summary["trl"] = run_trl(args.work, args.trl_source.expanduser(), modes, args.keyword, args.timeout)
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    failed = summary.get("liger", {}).get("not_passed") or any(
        r.get("fail_where_plain_passes") for r in summary.get("trl", {}).values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
