"""Every Triton kernel compiles for sm_90 (H100/H200), without spills, in every configuration
the library launches: no GPU needed, only the ptxas bundled in Triton's wheel.

``benchmarks/sm90_report.py`` does the work in a subprocess (the kernels must be defined
without ``TRITON_INTERPRET``, which conftest sets for this process) and writes its report;
these tests read it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import sm90_report  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sm90") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sm90_report.py"), "--out", str(out), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if run.returncode == 2:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(out.read_text())


def test_every_kernel_is_launched_and_compiled(report):
    assert report["target"] == "sm_90a"
    assert report["uncovered_kernels"] == [], "kernels that no scenario of sm90_report.py launches"
    compiled = {e["kernel"] for e in report["configurations"]}
    assert set(sm90_report.LOOP_ELEMENTS) <= compiled


def test_core_configurations_cover_dtypes_vocabularies_and_options(report):
    variants = {(e["kernel"], e["variant"]) for e in report["configurations"]}
    for dtype in ("bf16", "fp16", "fp32"):
        for vocab in ("V%16==0", "V%16!=0"):  # 32000, 128256, 151936 / 50257
            for options in ("", "HAS_SOFTCAP "):
                assert ("_logprobs_backward_kernel", f"{dtype} {options}{vocab}") in variants
                for stats in ("", "WANT_ENTROPY WANT_MEAN WANT_TOP1 WANT_SUMSQ "):
                    assert ("_logprobs_forward_kernel", f"{dtype} {options}{stats}{vocab}") in variants
    scenarios = {s for e in report["configurations"] for s in e["scenarios"]}
    for vocab in sm90_report.VOCABS:
        assert any(f"V={vocab} " in s for s in scenarios)


def test_no_configuration_spills(report):
    spilling = [
        f"{e['kernel']} [{e['variant']}]: {e['spill_instructions']} LDL/STL, {e['stack_bytes']} B stack"
        for e in report["configurations"]
        if e["spill_instructions"] or e["stack_bytes"] or e["local_bytes"]
    ]
    assert spilling == []


def test_core_loops_read_128_bit_vectors_when_the_vocabulary_allows(report):
    for e in report["configurations"]:
        if e["kernel"] in sm90_report.LOOP_ELEMENTS and e["variant"].endswith("V%16==0"):
            if "strided" in e["variant"]:
                continue
            main_loop = max(e["loops"], key=lambda loop: loop["instructions"])
            loads = main_loop["global_accesses"]
            assert set(loads) <= {"LDG.128", "STG.128", "STG.64"}, (e["variant"], loads)
