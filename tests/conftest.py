"""Test configuration: Triton runs under its interpreter on machines without CUDA.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at
collection time, before the tests import ``dpo_fast.kernels``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Each test draws fresh random inputs; the seed is printed so a failure can be replayed
    (pytest shows a failing test's captured output; DPO_FAST_TEST_SEED=<seed> replays it)."""
    seed = int(os.environ.get("DPO_FAST_TEST_SEED") or int.from_bytes(os.urandom(4), "little") >> 1)
    print(f"torch seed: {seed}")
    torch.manual_seed(seed)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every buffer allocated with torch.empty/empty_like starts as NaN (or a nonzero integer),
    so an element a kernel forgets to write shows up in the results."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(7)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
