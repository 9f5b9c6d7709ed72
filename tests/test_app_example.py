"""examples/dpo_plain_loop.py, the library in a plain PyTorch loop, still runs and learns."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dpo_plain_loop.py"


def test_plain_loop_example_learns_its_pairs():
    spec = importlib.util.spec_from_file_location("dpo_plain_loop", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.train(steps=12, pairs=16, batch_size=8)
    # step 1: the policy is the reference, so the sigmoid loss is log 2 and the margin 0
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    late = history[-4:]
    assert sum(m["loss"] for m in late) / 4 < math.log(2) - 0.05
    assert sum(m["rewards/accuracies"] for m in late) / 4 > 0.7
