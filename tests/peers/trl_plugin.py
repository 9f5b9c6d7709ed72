"""pytest plugin that runs TRL's own DPO trainer tests against dpo_fast (``-p trl_plugin``).

``DPO_FAST_PEER_MODE`` selects what TRL's tests exercise, without editing them:

- ``plain``: TRL as installed (the baseline);
- ``patch``: ``dpo_fast.integrations.trl.patch()`` before each test, so every ``DPOTrainer``
  the test builds gets our fused head;
- ``padded`` / ``packed`` / ``prefix_shared``: the test module's ``DPOTrainer`` is replaced by
  ``FastDPOTrainer`` with that layout.

In every mode but ``plain`` a test fails if TRL's own head was installed on a model (our
integration did not take over), and the head installs are counted in the JUnit report's
properties.
"""

from __future__ import annotations

import os

import pytest

MODE = os.environ.get("DPO_FAST_PEER_MODE", "plain")
MODES = ("plain", "patch", "padded", "packed", "prefix_shared")
if MODE not in MODES:
    raise ValueError(f"DPO_FAST_PEER_MODE must be one of {MODES}, got {MODE!r}")


def pytest_configure(config):
    """The newest TRL test utilities probe ``trl.import_utils.is_joblib_available``, which some
    TRL releases lack: supply the same probe so they import."""
    import importlib
    import importlib.util

    import_utils = importlib.import_module("trl.import_utils")
    if not hasattr(import_utils, "is_joblib_available"):
        import_utils.is_joblib_available = lambda: importlib.util.find_spec("joblib") is not None


def _layout_trainer(layout: str):
    from dpo_fast.integrations.trl import FastDPOTrainer

    class LayoutDPOTrainer(FastDPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, layout=layout, **kwargs)

    LayoutDPOTrainer.__name__ = LayoutDPOTrainer.__qualname__ = "DPOTrainer"
    return LayoutDPOTrainer


@pytest.fixture(autouse=True)
def dpo_fast_mode(request, monkeypatch, record_property):
    """Install the mode's trainer / patch and check afterwards that TRL's head never ran."""
    if MODE == "plain":
        yield
        return
    import trl.trainer.dpo_trainer as dpo_module

    import dpo_fast.integrations.trl as fast_trl

    trl_installs, our_installs = [], []
    trl_head, our_head = dpo_module.add_fused_lm_head, fast_trl.add_fused_lm_head

    def counting_trl_head(model, *args, **kwargs):
        trl_installs.append(type(model).__name__)
        return trl_head(model, *args, **kwargs)

    def counting_our_head(model, *args, **kwargs):
        our_installs.append(type(model).__name__)
        return our_head(model, *args, **kwargs)

    monkeypatch.setattr(dpo_module, "add_fused_lm_head", counting_trl_head)
    # patch() saves whatever the module holds as "TRL's head": the counting wrapper
    monkeypatch.setattr(fast_trl, "add_fused_lm_head", counting_our_head)
    if MODE == "patch":
        fast_trl.patch()
    elif hasattr(request.module, "DPOTrainer"):
        monkeypatch.setattr(request.module, "DPOTrainer", _layout_trainer(MODE))
    try:
        yield
    finally:
        fast_trl.unpatch()
    record_property("dpo_fast_head_installs", len(our_installs))
    assert not trl_installs, f"TRL's own fused head was installed on {trl_installs} in mode {MODE!r}"
