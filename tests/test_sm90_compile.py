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
    variants = [(e["kernel"], set(e["variant"].split())) for e in report["configurations"]]

    def compiled(kernel: str, *words: str, absent: tuple[str, ...] = ()) -> bool:
        return any(k == kernel and set(words) <= v and not set(absent) & v for k, v in variants)

    for dtype in ("bf16", "fp16", "fp32"):
        for vocab in ("V%16==0", "V%16!=0"):  # 32000, 128256, 151936 / 50257
            for softcap in (True, False):
                options = ("HAS_SOFTCAP",) if softcap else ()
                absent = () if softcap else ("HAS_SOFTCAP",)
                assert compiled("_logprobs_backward_kernel", dtype, vocab, *options, absent=absent)
                assert compiled(
                    "_logprobs_forward_kernel", dtype, vocab, *options, absent=(*absent, "STATS=15")
                )
                assert compiled("_logprobs_forward_kernel", dtype, vocab, *options, "STATS=15", absent=absent)
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


def test_core_loops_read_128_bit_vectors_whatever_the_vocabulary(report):
    """Rows start their blocks on a 16-byte boundary (ALIGN, a contiguous vocabulary), so the
    streaming loops move whole vectors even when V is odd (50257)."""
    for e in report["configurations"]:
        if e["kernel"] in sm90_report.LOOP_ELEMENTS and "ALIGN" in e["variant"].split():
            main_loop = max(e["loops"], key=lambda loop: loop["instructions"])
            assert set(main_loop["global_accesses"]) <= {"LDG.128", "STG.128"}, e["variant"]


def test_core_loops_meet_the_instruction_budgets(report):
    """Issue 19's budgets for the streaming loops (bf16, no statistics, no softcap): at most
    10 SASS instructions per element forward and 12 backward, at an odd vocabulary too."""
    for target in report["targets"]:
        assert target["met"], target
    for e in report["configurations"]:
        limit, plain = sm90_report.TARGETS.get(e["kernel"], (None, None))
        if e["variant"] == (plain or "").replace("V%16==0", "V%16!=0"):
            assert e["instructions_per_element"] <= limit, e["variant"]
