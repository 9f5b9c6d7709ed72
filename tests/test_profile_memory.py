"""``dpo-fast profile-memory``: the CLI contract, the CPU meter against the process's resident
memory, the estimator against the measurements, out-of-memory handling and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from dpo_fast.app.profile_memory import MODEL_CONFIGS, main
from dpo_fast.app.profile_step import METHODS

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"weights_grads_optimizer", "activations", "head", "mask", "reference", "backward"}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    """The contract run: every method at two lengths on CPU (run once for the module)."""
    out = tmp_path_factory.mktemp("profile")
    argv = ["--model-config", "tiny", "--lengths", "256,512", "--device", "cpu", "--output-dir", str(out)]
    status = main(argv)
    return status, out


def test_contract_writes_json_and_plots(cpu_profile):
    status, out = cpu_profile
    assert status == 0
    (json_path,) = out.glob("*.json")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["profile_memory-tiny-cpu-memory.png", "profile_memory-tiny-cpu-time.png"]
    assert all((out / p).stat().st_size > 10_000 for p in pngs)
    record = json.loads(json_path.read_text())
    assert record["step"] == "policy forward+backward, reference forward, no optimizer step"
    assert record["optimizer_step_included"] is False and record["gradient_checkpointing"] is True
    points = record["points"]
    assert {p["method"] for p in points} == set(METHODS)
    for p in points:
        assert p["status"] == "ok", p
        assert set(p["breakdown"]) == PARTS and p["peak"] >= p["breakdown"]["weights_grads_optimizer"] > 0
        assert p["seconds"] > 0 and p["tokens_per_second"] == pytest.approx(2 * p["length"] / p["seconds"])
    by = {(p["method"], p["length"]): p for p in points}
    for method in METHODS:
        assert by[(method, 512)]["peak"] > by[(method, 256)]["peak"]
    # what the layouts are for: fewer tokens through the backbone, and no [tokens, V] logits
    assert (
        by[("ours-prefix_shared", 512)]["backbone_tokens"]
        == 768
        < by[("ours-padded", 512)]["backbone_tokens"]
    )
    assert by[("ours-padded", 512)]["breakdown"]["head"] < by[("naive", 512)]["breakdown"]["head"]
    assert all(v == 512 for v in record["longest_fit"].values())


def test_estimates_match_measured_cpu_peaks(cpu_profile):
    """Each measured CPU point was estimated first on fake tensors: within 10% (Liger's backward
    reads a value on the host, so it has no estimate)."""
    _, out = cpu_profile
    points = json.loads(next(out.glob("*.json")).read_text())["points"]
    compared = 0
    for p in points:
        if p["method"] == "liger":
            assert p["predicted_peak"] is None
            continue
        assert abs(p["predicted_peak"] / p["peak"] - 1) <= 0.10, p
        compared += 1
    assert compared == 10


RSS_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, torch
    from dpo_fast.app import profile_memory as pm

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    args = pm.parse_args(["--device", "cpu", "--methods", sys.argv[1], "--lengths", sys.argv[2]])
    method = pm.parse_method(sys.argv[1], "cpu", backward=True)
    models = pm.build(pm.model_config("tiny"), method, args, torch.device("cpu"), fake=False)
    pm.measure_point(models, int(sys.argv[2]), args, torch.device("cpu"))  # first touch, libraries
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident set size
    before = status("VmRSS:")
    point = pm.measure_point(models, int(sys.argv[2]), args, torch.device("cpu"))
    baseline = pm._bytes(pm._state_tensors(models.policy, models.reference, models.optimizer, {}))
    print(json.dumps({"rss_growth": status("VmHWM:") - before, "tracked_growth": point.peak - baseline}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_meter_matches_resident_memory():
    """The allocator meter's peak growth over a step equals the growth of the process's peak
    resident set (glibc set to return freed blocks, so that resident memory follows the live
    tensors; the step's tensors are written in full, so all of them are resident)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONPATH=str(ROOT))
    env["DPO_FAST_CPU_BUFFER_CACHE"] = "0"
    command = [sys.executable, "-c", RSS_SCRIPT, "ours-prefix_shared", "2048"]  # a 37.7 MB mask
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    sizes = json.loads(result.stdout.strip().splitlines()[-1])
    assert sizes["tracked_growth"] > 20 * 2**20  # large enough to see
    assert abs(sizes["tracked_growth"] / sizes["rss_growth"] - 1) <= 0.10, sizes


def test_out_of_memory_ends_a_methods_sweep(tmp_path, capsys):
    """A point over the budget ends that method's sweep (predicted: never run; measured: Liger,
    which cannot be estimated); the other methods and the outputs carry on."""
    argv = ["--model-config", "tiny", "--lengths", "256,512,1024", "--device", "cpu"]
    argv += [
        "--methods",
        "ours-prefix_shared,liger",
        "--device-memory",
        "0.0025",
        "--output-dir",
        str(tmp_path),
    ]
    status, out, _ = run(argv, capsys)
    assert status == 0
    points = json.loads(next(tmp_path.glob("*.json")).read_text())["points"]
    statuses = [(p["method"], p["length"], p["status"]) for p in points]
    assert statuses == [("ours-prefix_shared", 256, "oom"), ("liger", 256, "oom")]
    assert "predicted peak" in points[0]["error"] and points[0]["seconds"] is None
    assert "measured peak" in points[1]["error"] and points[1]["predicted_peak"] is None
    assert "out of memory" in out and "ours-prefix_shared:sdpa" in out


def test_estimate_of_a_large_model_needs_no_memory(capsys, tmp_path):
    """Llama-3.2-1B on fake tensors, no memory allocated: weights, reference and gradients add
    up to the parameter count (bf16), and the longest fitting length is printed."""
    argv = ["--estimate", "--model-config", "llama-3.2-1b", "--lengths", "1024,2048", "--device-memory", "80"]
    argv += ["--methods", "naive,ours-prefix_shared", "--output-dir", str(tmp_path)]
    status, out, _ = run(argv, capsys)
    assert status == 0
    config = transformers.AutoConfig.for_model(**MODEL_CONFIGS["llama-3.2-1b"])
    with torch.device("meta"):
        params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    assert 1.2e9 < params < 1.3e9
    record = json.loads((tmp_path / "profile_memory-llama-3.2-1b-cuda-estimate.json").read_text())
    for p in record["points"]:
        # and two fp32 rotary-frequency buffers
        assert p["breakdown"]["weights_grads_optimizer"] == pytest.approx(3 * 2 * params, rel=1e-6)
        assert p["seconds"] is None and p["status"] == "ok"
    assert record["longest_fit"] == {"naive:sdpa": 2048, "ours-prefix_shared:flex_attention": 2048}
    assert "longest length that fits (within 80.000 GiB)" in out
    assert (tmp_path / "profile_memory-llama-3.2-1b-cuda-estimate-memory.png").exists()


def test_local_config_file(tmp_path, capsys):
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    config.save_pretrained(tmp_path / "model")
    argv = ["--estimate", "--model-config", str(tmp_path / "model" / "config.json"), "--lengths", "128"]
    argv += ["--methods", "ours-packed", "--output-dir", str(tmp_path)]
    status, _, _ = run(argv, capsys)
    assert status == 0 and (tmp_path / "profile_memory-config-cuda-estimate.json").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "ours-unpadded"], r"unknown method 'ours-unpadded'; expected one of naive, trl"),
        (["--model-config", "gpt-5"], r"--model-config 'gpt-5' is neither one of tiny, llama-3.2-1b"),
    ],
)
def test_bad_input(argv, message, capsys, tmp_path):
    status, _, err = run([*argv, "--estimate", "--output-dir", str(tmp_path)], capsys)
    assert status == 2
    assert re.search(message, err), err


def test_bad_lengths(capsys):
    with pytest.raises(SystemExit):
        main(["--lengths", "256,x"])
    assert "--lengths must be comma-separated integers, got '256,x'" in capsys.readouterr().err
