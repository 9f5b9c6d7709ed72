"""dpo_fast.app.checkpoints on hand-made folders: publishing, recovery after a kill between any
two file operations, rotation, finding the checkpoint to resume, and the run signature."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from dpo_fast.app import checkpoints
from dpo_fast.app.checkpoints import (
    RUN_FILE,
    check_fresh_output,
    check_resume,
    complete_checkpoints,
    model_fingerprint,
    publish,
    recover,
    resolve_resume,
    rotate,
    run_signature,
)
from dpo_fast.app.errors import UserError


def make_checkpoint(folder: Path, content: str = "weights", signature: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text(content)
    (folder / "trainer_state.json").write_text("{}")
    (folder / RUN_FILE).write_text(json.dumps({"signature": signature or {}}))
    return folder


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_publish_then_recover_after_a_kill_between_the_renames(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "checkpoint-4", "old")
    staged = make_checkpoint(tmp_path / ".checkpoint-4.partial" / "checkpoint-4", "new")
    renames = []
    real_rename = Path.rename

    def killed_on_second_rename(self, target):
        renames.append(target)
        if len(renames) == 2:
            raise KeyboardInterrupt  # the process dies here
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        publish(staged, tmp_path / "checkpoint-4")
    monkeypatch.setattr(Path, "rename", real_rename)
    assert "checkpoint-4" not in names(tmp_path)  # the moment a kill would leave
    recover(tmp_path)
    assert names(tmp_path) == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "model.safetensors").read_text() == "old"  # the complete old one

    staged = make_checkpoint(tmp_path / ".checkpoint-4.partial" / "checkpoint-4", "new")
    publish(staged, tmp_path / "checkpoint-4")
    assert (tmp_path / "checkpoint-4" / "model.safetensors").read_text() == "new"
    assert names(tmp_path) == [".checkpoint-4.partial", "checkpoint-4"]  # the empty root: the caller's


def test_recover_never_brings_back_a_half_deleted_checkpoint(tmp_path):
    rotated = tmp_path / ".checkpoint-3.trash"  # rmtree killed half way: no run file left
    rotated.mkdir()
    (rotated / "config.json").write_text("{}")
    make_checkpoint(tmp_path / ".checkpoint-5.partial" / "checkpoint-5")
    (tmp_path / ".final-model.partial").mkdir()
    make_checkpoint(tmp_path / "checkpoint-4")
    make_checkpoint(tmp_path / ".checkpoint-4.replaced", "old")  # its new version made it
    recover(tmp_path)
    assert names(tmp_path) == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "model.safetensors").read_text() == "weights"


def test_rotate_keeps_the_newest_and_the_best(tmp_path):
    for step in (1, 2, 3, 10):
        make_checkpoint(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-11").mkdir()  # incomplete (not ours): neither counted nor deleted
    rotate(tmp_path, 2, best=str(tmp_path / "checkpoint-1"))
    assert names(tmp_path) == ["checkpoint-1", "checkpoint-10", "checkpoint-11", "checkpoint-3"]
    rotate(tmp_path, None, best=None)
    assert len(names(tmp_path)) == 4
    rotate(tmp_path, 1, best=None)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-10"]  # sorted by step, not name


def test_resume_lookup_and_fresh_runs(tmp_path):
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_resume("last", tmp_path)
    check_fresh_output(tmp_path / "new")  # nothing there: fine
    make_checkpoint(tmp_path / "checkpoint-2")
    make_checkpoint(tmp_path / "checkpoint-12")
    (tmp_path / "checkpoint-20").mkdir()  # incomplete
    for value in ("last", "true", "LATEST"):
        assert resolve_resume(value, tmp_path) == tmp_path / "checkpoint-12"
    assert resolve_resume(str(tmp_path / "checkpoint-2"), tmp_path) == tmp_path / "checkpoint-2"
    with pytest.raises(UserError, match="not a complete dpo-fast checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-20"), tmp_path)
    with pytest.raises(UserError, match="already holds checkpoint-12"):
        check_fresh_output(tmp_path)


def options(**changes) -> SimpleNamespace:
    training = {name: 0 for name in checkpoints.SIGNATURE_FIELDS["training"]}
    training.update(loss_type=["sigmoid"], beta=0.1, lr_scheduler_type=SimpleNamespace(value="cosine"))
    app = {"layout": "padded", "skip_invalid": False}
    fields = {"training": training, "model": {"use_peft": False}, "script": {}, "app": app}
    for name, value in changes.items():
        group = next(g for g, n in checkpoints.SIGNATURE_FIELDS.items() if name in n)
        fields[group][name] = value
    return SimpleNamespace(**{group: SimpleNamespace(**values) for group, values in fields.items()})


def test_resume_refuses_any_changed_field_naming_it(tmp_path):
    signature = run_signature(options(), data="d" * 64, model="m" * 64)
    assert signature["lr_scheduler_type"] == "cosine" and signature["loss_type"] == ["sigmoid"]
    saved = make_checkpoint(tmp_path / "checkpoint-3", signature=signature)
    check_resume(saved, run_signature(options(), data="d" * 64, model="m" * 64))
    cases = [
        (
            run_signature(options(layout="packed"), "d" * 64, "m" * 64),
            'layout differs (saved "padded", now "packed")',
        ),
        (run_signature(options(beta=0.2), "d" * 64, "m" * 64), "beta differs (saved 0.1, now 0.2)"),
        (run_signature(options(loss_type=["ipo"]), "d" * 64, "m" * 64), "loss_type differs"),
        (run_signature(options(use_peft=True), "d" * 64, "m" * 64), "use_peft differs"),
        (
            run_signature(options(), "e" * 64, "m" * 64),
            'data differs (saved "dddddddddddd...", now "eeeeeeeeeeee...")',
        ),
        (run_signature(options(), "d" * 64, "n" * 64), "model differs"),
    ]
    for changed, message in cases:
        with pytest.raises(UserError) as error:
            check_resume(saved, changed)
        assert message.replace(" (", " from the run that saved it (", 1) in str(error.value)


def test_model_fingerprint_sees_config_and_weight_changes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "a")
    first = model_fingerprint(str(tmp_path / "a"))
    assert model_fingerprint(str(tmp_path / "a")) == first
    LlamaForCausalLM(config).save_pretrained(tmp_path / "a")  # new random weights
    second = model_fingerprint(str(tmp_path / "a"))
    assert second != first
    config.rope_theta = 1234.0
    config.save_pretrained(tmp_path / "a")
    assert model_fingerprint(str(tmp_path / "a")) != second
    assert model_fingerprint("org/name", "main") == "hub:org/name@main"
