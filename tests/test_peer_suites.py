"""CI subset of the peers' own test suites (``make peer-tests`` runs them whole).

Liger: a subset of Liger 0.8.5's chunked-loss tests (fetched from PyPI, imports rewritten to
``dpo_fast.integrations.liger``). TRL: its test file is not on PyPI, so CI trains the local
stand-ins of the hub models TRL's tests use through ``FastDPOTrainer`` in each layout (the
architectures the layouts once failed on); with ``DPO_FAST_TRL_SOURCE`` pointing at a TRL
checkout, a subset of TRL's own file also runs, plainly and in the packed layout.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

PEERS = Path(__file__).resolve().parent / "peers"
sys.path.insert(0, str(PEERS))

import run as peer_run  # noqa: E402
import standins  # noqa: E402

LIGER_SUBSET = (
    "(test_correctness_functional and 47 and not bfloat16) or invalid or validation or alpha "
    "or positional or frozen or mixed"
)


def test_rewrite_changes_only_the_loss_imports():
    source = (
        "from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss\n"
        "from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction\n"
        "from liger_kernel.chunked_loss.functional import liger_fused_linear_dpo\n"
        "from liger_kernel.utils import infer_device\n"
        "from test.utils import set_seed\n"
        "x = 'from liger_kernel.chunked_loss import y'\n"
    )
    lines = peer_run.rewrite_liger_imports(source).splitlines()
    assert lines[:3] == [
        "from dpo_fast.integrations.liger import LigerFusedLinearDPOLoss",
        "from dpo_fast.integrations.liger import LigerFusedLinearDPOFunction",
        "from dpo_fast.integrations.liger import liger_fused_linear_dpo",
    ]
    assert lines[3:] == source.splitlines()[3:]
    with pytest.raises(ValueError, match="no Liger chunked-loss import"):
        peer_run.rewrite_liger_imports("import torch\n")


def _run(args: list[str], work: Path) -> dict:
    completed = subprocess.run(
        [sys.executable, str(PEERS / "run.py"), *args, "--work", str(work)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    summary = work / "summary.json"
    if not summary.exists():
        if "pip download" in completed.stdout + completed.stderr or "Could not" in completed.stderr:
            pytest.skip(f"could not fetch the peer's sources: {completed.stderr[-300:]}")
        raise AssertionError(completed.stdout[-3000:] + completed.stderr[-3000:])
    return json.loads(summary.read_text())


def test_liger_suite_subset(tmp_path):
    summary = _run(["liger", "-k", LIGER_SUBSET], tmp_path)["liger"]
    assert summary["counts"]["passed"] >= 20, summary
    assert summary["not_passed"] == []


@pytest.mark.skipif(
    not os.environ.get("DPO_FAST_TRL_SOURCE"), reason="DPO_FAST_TRL_SOURCE (a TRL checkout) not set"
)
def test_trl_suite_subset(tmp_path):
    keyword = "test_train_model_dtype or (test_train and (Qwen3Moe or Lfm2))"
    summary = _run(["trl", "--modes", "plain,packed", "-k", keyword], tmp_path)["trl"]
    assert summary["plain"]["counts"]["passed"] >= 3, summary
    assert summary["packed"]["fail_where_plain_passes"] == []


@pytest.fixture(scope="module")
def standin_root(tmp_path_factory):
    return standins.build(tmp_path_factory.mktemp("standins"))


def train(root: Path, model_id: str, layout: str, tmp_path: Path, dtype: torch.dtype):
    from datasets import load_dataset
    from trl import DPOConfig

    from dpo_fast.integrations.trl import FastDPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=0.1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        model_init_kwargs={"dtype": dtype},
    )
    trainer = FastDPOTrainer(
        model=str(root / model_id),
        args=args,
        train_dataset=load_dataset(str(root / "zen"), "standard_preference", split="train"),
        layout=layout,
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
@pytest.mark.parametrize(
    "model_id, dtype",
    [
        ("tiny-Qwen2ForCausalLM-2.5", torch.float16),
        ("tiny-Qwen2ForCausalLM-2.5", torch.bfloat16),
        ("tiny-Qwen3MoeForCausalLM", torch.float32),
    ],
)
def test_standins_train_in_each_layout(standin_root, tmp_path, layout, model_id, dtype):
    trainer = train(standin_root, model_id, layout, tmp_path, dtype)
    assert not torch.is_autocast_enabled("cpu")
    last = trainer.state.log_history[-1]
    assert last["train_loss"] is not None
    if trainer.aux_loss_enabled:
        logged = [log["aux_loss"] for log in trainer.state.log_history if "aux_loss" in log]
        assert logged and all(value > 0 for value in logged)


def test_standin_a_layout_cannot_serve_falls_back(standin_root, tmp_path):
    import dpo_fast.integrations.trl as fast_trl

    fast_trl._fallbacks_warned.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = train(standin_root, "tiny-NemotronHForCausalLM-nano", "packed", tmp_path, torch.float32)
    messages = [str(w.message) for w in seen if "cannot serve" in str(w.message)]
    assert len(messages) == 1 and "layout='packed'" in messages[0] and "NemotronH" in messages[0]
    assert trainer.state.log_history[-1]["train_loss"] is not None
