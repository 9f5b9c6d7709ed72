"""Checkpoints that survive a kill at any instant, and resumes that refuse a changed run.

transformers writes ``checkpoint-N`` file by file in place and deletes old ones with
``rmtree``: a kill in between leaves a torn checkpoint that a resume loads. Here a checkpoint
is written whole into a hidden ``.checkpoint-N.partial`` folder, every file and folder is
fsynced, and only then renamed to ``checkpoint-N`` (a rename is atomic); older checkpoints are
renamed away (``.checkpoint-K.trash``) before they are deleted, and only after the new one is
in place. So every ``checkpoint-N`` folder is complete, and the newest one is never touched
while a newer one is not complete. Each checkpoint also holds :data:`RUN_FILE`: the
:func:`run_signature` of the run (data and model fingerprints, loss, layout, optimization,
batch and precision settings); a resume whose signature differs is refused with one line
naming the first field that differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .errors import UserError

RUN_FILE = "dpo_fast_run.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
LAST = ("true", "last", "latest")  # --resume_from_checkpoint values meaning "the newest one"

# The settings a resumed run must share with the checkpoint to end where an uninterrupted run
# would (besides "data", "model" and the number of processes); logging, saving and evaluation
# options may change.
SIGNATURE_FIELDS = {
    "training": (
        "loss_type",
        "loss_weights",
        "beta",
        "label_smoothing",
        "f_divergence_type",
        "f_alpha_divergence_coef",
        "ld_alpha",
        "use_weighting",
        "discopop_tau",
        "max_length",
        "truncation_mode",
        "padding_free",
        "pad_to_multiple_of",
        "precompute_ref_log_probs",
        "disable_dropout",
        "sync_ref_model",
        "ref_model_mixup_alpha",
        "ref_model_sync_steps",
        "learning_rate",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "optim",
        "optim_args",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_steps",
        "num_train_epochs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "seed",
        "data_seed",
        "bf16",
        "fp16",
    ),
    "model": (
        "dtype",
        "use_peft",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "lora_target_parameters",
        "lora_modules_to_save",
        "use_rslora",
        "use_dora",
        "load_in_4bit",
        "load_in_8bit",
    ),
    "script": ("dataset_train_split", "dataset_config"),
    "app": ("layout", "skip_invalid"),
}


def model_fingerprint(name_or_path: str, revision: str | None = None) -> str:
    """A cheap identity of a model: SHA-256 of a local folder's ``config.json`` and, per weight
    file, its name, size and first and last MiB; a Hub name and revision otherwise."""
    path = Path(name_or_path)
    if not path.is_dir():
        return f"hub:{name_or_path}@{revision}"
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size};".encode())
        with open(file, "rb") as stream:
            digest.update(stream.read(1 << 20))
            stream.seek(max(0, size - (1 << 20)))
            digest.update(stream.read(1 << 20))
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """JSON's view of a value (enums by value, tuples as lists), so saved and current compare."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))


def run_signature(options, data: str, model: str) -> dict[str, Any]:
    """What a resume must match: ``data`` and ``model`` fingerprints, the number of processes
    and the :data:`SIGNATURE_FIELDS` of ``options`` (a ``TrainOptions``)."""
    signature: dict[str, Any] = {
        "data": data,
        "model": model,
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
    }
    for group, names in SIGNATURE_FIELDS.items():
        source = getattr(options, group)
        signature.update({name: getattr(source, name) for name in names if hasattr(source, name)})
    return _plain(signature)


def _step(path: Path) -> int:
    return int(CHECKPOINT.fullmatch(path.name).group(1))


def is_complete(path: Path) -> bool:
    """A checkpoint this module published (a renamed, fsynced folder holding the run file)."""
    return (path / RUN_FILE).is_file() and (path / "trainer_state.json").is_file()


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders of ``output_dir``, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT.fullmatch(p.name) and is_complete(p)]
    return sorted(found, key=_step)


def recover(output_dir: Path) -> None:
    """Undo what a kill during a save left: unfinished ``.partial`` folders and ``.trash``
    (rotated away, maybe half deleted) are deleted; a ``.replaced`` checkpoint whose new version
    never made it into place (killed between two renames) goes back to its name."""
    if not output_dir.is_dir():
        return
    for path in output_dir.iterdir():
        if not path.name.startswith("."):
            continue
        if path.name.endswith((".partial", ".trash")):  # the final model's staging folder too
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".checkpoint-") and path.name.endswith(".replaced"):
            original = output_dir / path.name[1 : -len(".replaced")]
            if original.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.rename(original)


def resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: a folder, or ``last`` (also ``true``,
    ``latest``) for the newest complete one in ``output_dir``; ``None`` without the flag."""
    if value is None:
        return None
    if value.lower() in LAST:
        found = complete_checkpoints(output_dir)
        if not found:
            raise UserError(f"--resume_from_checkpoint {value}: no complete checkpoint in {output_dir}")
        return found[-1]
    path = Path(value)
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint {value}: no such folder")
    if not is_complete(path):
        raise UserError(
            f"--resume_from_checkpoint {value} is not a complete dpo-fast checkpoint (no {RUN_FILE} or "
            "trainer_state.json)"
        )
    return path


def check_fresh_output(output_dir: Path) -> None:
    """A run that does not resume must not mix its checkpoints with an earlier run's."""
    found = complete_checkpoints(output_dir)
    if found:
        raise UserError(
            f"--output_dir {output_dir} already holds {found[-1].name} from an earlier run: continue it with "
            "--resume_from_checkpoint last, or start over in another --output_dir"
        )


def _short(value: Any) -> str:
    """A value for a one-line message: long strings (fingerprints) cut to 12 characters."""
    return json.dumps(value[:12] + "..." if isinstance(value, str) and len(value) > 20 else value)


def check_resume(checkpoint: Path, signature: dict[str, Any]) -> None:
    """Refuse, naming the field, a resume whose :func:`run_signature` differs from the
    checkpoint's."""
    saved = json.loads((checkpoint / RUN_FILE).read_text())["signature"]
    for name in dict.fromkeys([*saved, *signature]):
        if saved.get(name) != signature.get(name):
            raise UserError(
                f"--resume_from_checkpoint {checkpoint}: {name} differs from the run that saved it "
                f"(saved {_short(saved.get(name))}, now {_short(signature.get(name))}); resume with the "
                "same settings, or start over in another --output_dir"
            )


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (and itself) to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root, name))
        _fsync(Path(root))


def publish(staged: Path, final: Path) -> None:
    """Rename the complete, fsynced ``staged`` folder to ``final`` (replacing an existing one
    only once ``staged`` is in place: a kill in between leaves ``.replaced``, which :func:`recover`
    renames back)."""
    replaced = final.with_name(f".{final.name}.replaced")
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    staged.rename(final)
    _fsync(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def rotate(output_dir: Path, limit: int | None, best: str | None) -> None:
    """Keep the newest ``limit`` complete checkpoints (and the best one); each older one is
    renamed away before it is deleted, so no half-deleted ``checkpoint-N`` is ever seen."""
    if limit is None:
        return
    found = complete_checkpoints(output_dir)
    keep = set(found[-limit:])
    if best:
        keep.add(Path(best))
    for path in found:
        if path not in keep:
            trash = path.with_name(f".{path.name}.trash")
            path.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)


class AtomicCheckpoints:
    """Trainer mixin: ``_save_checkpoint`` writes to a hidden folder, fsyncs, renames it into
    place and rotates (``save_total_limit``) only then; each checkpoint holds :data:`RUN_FILE`.

    Put it before the trainer class: ``class T(AtomicCheckpoints, FastDPOTrainer)``, and set
    ``run_signature`` (a dict) before training.
    """

    run_signature: dict[str, Any] | None = None

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        staging_root = run_dir / f".{name}.partial"
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        limit = self.args.save_total_limit
        # transformers writes into <run_dir>/checkpoint-N: point it at the staging folder, and
        # rotate only after the rename, below
        self._get_output_dir = lambda trial=None: str(staging_root)
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged = staging_root / name
            best = self.state.best_model_checkpoint
            if best is not None and best.startswith(str(staging_root)):
                self.state.best_model_checkpoint = str(run_dir / name)
                self.state.save_to_json(str(staged / "trainer_state.json"))
            run_file = {"step": self.state.global_step, "signature": self.run_signature}
            (staged / RUN_FILE).write_text(json.dumps(run_file, indent=1))
            fsync_tree(staged)
            publish(staged, run_dir / name)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate(run_dir, limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
