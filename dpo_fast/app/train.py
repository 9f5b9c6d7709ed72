"""``dpo-fast train``: TRL's ``DPOTrainer`` with dpo_fast's fused head inside, as ``trl dpo`` runs it.

Order of work, cheapest checks first so a user error costs seconds: arguments
(:mod:`dpo_fast.app.options`) -> the output folder (an interrupted save undone, a resume's
checkpoint found and its run signature compared, :mod:`dpo_fast.app.checkpoints`) -> the data
(:mod:`dpo_fast.app.pairs`: local files read and checked line by line) -> the demo's random
model (:mod:`dpo_fast.app.demo`) or the user's tokenizer -> TRL's trainer
(:class:`dpo_fast.integrations.trl.FastDPOTrainer` at ``--layout``, with atomic checkpoints)
-> training -> the final model, written whole into ``--output_dir`` -> a summary.

Everything else (chat templates, LoRA, accumulation, precision, evaluation, logging
integrations, multi-GPU through accelerate) is TRL's and transformers'.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoints import (
    AtomicCheckpoints,
    check_fresh_output,
    check_resume,
    complete_checkpoints,
    fsync_tree,
    model_fingerprint,
    recover,
    resolve_resume,
    run_signature,
)
from .demo import CPU_TRAIN_PAIRS, DEMO_MODEL_DIR, build_demo_model, demo_size
from .errors import UserError, first_line
from .options import TrainOptions, parse_train_args
from .pairs import check_dataset, data_fingerprint, load_splits


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value))


def _data_fingerprint(options: TrainOptions) -> str:
    if options.mixture.datasets:
        import hashlib

        parts = [json.dumps(options.mixture.__dict__, default=lambda v: v.__dict__, sort_keys=True)]
        parts += [data_fingerprint(d.path, d.name) for d in options.mixture.datasets]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return data_fingerprint(options.script.dataset_name, options.script.dataset_config)


def _load_data(options: TrainOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """``{split: Dataset}`` of checked pairs, from ``--dataset_name``, the config's ``datasets``
    mixture, or the bundled subset."""
    if not options.mixture.datasets:
        s = options.script
        return load_splits(
            s.dataset_name,
            config_name=s.dataset_config,
            streaming=s.dataset_streaming,
            skip_invalid=options.app.skip_invalid,
            log=log,
        )
    from trl import get_dataset

    try:
        loaded = get_dataset(options.mixture)
    except Exception as error:  # datasets raises many types; all mean "cannot load"
        raise UserError(f"datasets (config file): cannot load: {first_line(error)}") from None
    return {
        str(k): check_dataset(v, f"datasets [{k}]", options.app.skip_invalid, log) for k, v in loaded.items()
    }


def _pick_splits(options: TrainOptions, splits: dict[str, Any]) -> tuple[Any, Any]:
    script, training = options.script, options.training
    source = script.dataset_name or (
        "the config's datasets" if options.mixture.datasets else "the bundled data"
    )
    if script.dataset_train_split not in splits:
        raise UserError(
            f"--dataset_train_split {script.dataset_train_split}: {source} has no such split "
            f"(it has {', '.join(splits)})"
        )
    train = splits[script.dataset_train_split]
    if options.demo_model and options.bundled_data and demo_size() == "tiny":
        train = train.select(range(min(CPU_TRAIN_PAIRS, len(train))))
    if _enum_value(training.eval_strategy) == "no":
        return train, None
    if script.dataset_test_split not in splits:
        raise UserError(
            f"--eval_strategy {_enum_value(training.eval_strategy)} needs evaluation data: {source} has no "
            f"{script.dataset_test_split!r} split (it has {', '.join(splits)}); name one with "
            "--dataset_test_split, or put e.g. train.jsonl and test.jsonl in one folder"
        )
    return train, splits[script.dataset_test_split]


def _check_tokenizer(options: TrainOptions, model_path: str, first_row: dict[str, Any]) -> None:
    """The tokenizer loads, and has a chat template when the data is conversational."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path,
            revision=options.model.model_revision,
            trust_remote_code=options.training.trust_remote_code,
        )
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a tokenizer from {model_path}: {first_line(error)}") from None
    if not isinstance(first_row["chosen"], str) and not tokenizer.chat_template:
        raise UserError(
            f"the data is conversational (message lists) but the tokenizer in {model_path} has no chat "
            "template; set one (tokenizer.chat_template) or use string prompts"
        )


def _make_trainer(options: TrainOptions, model_path: str, train, evaluation, callbacks: list):
    from transformers import ProgressCallback
    from trl import get_peft_config, get_quantization_config

    from ..integrations.trl import FastDPOTrainer
    from .callbacks import MetricsProgress

    class Trainer(AtomicCheckpoints, FastDPOTrainer):
        """TRL's DPOTrainer on dpo_fast's head, with atomic checkpoints."""

    training, model = options.training, options.model
    # as TRL's `trl dpo` script builds them
    init_kwargs = {
        "revision": model.model_revision,
        "trust_remote_code": training.trust_remote_code,
        "attn_implementation": model.attn_implementation,
        "dtype": model.dtype,
        **(training.model_init_kwargs or {}),
    }
    training.model_init_kwargs = init_kwargs
    trainer = Trainer(
        model=model_path,
        args=training,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=get_peft_config(model),
        quantization_config=get_quantization_config(model),
        callbacks=callbacks,
        layout=options.app.layout,
    )
    if not training.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(MetricsProgress())
    return trainer


def save_final_model(trainer, output_dir: Path) -> None:
    """``trainer.save_model`` into ``output_dir`` (what ``from_pretrained(output_dir)`` loads):
    written to a hidden folder, fsynced, then each file renamed into place."""
    staging = output_dir / ".final-model.partial"
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # every process: sharded models gather
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        fsync_tree(staging)
        for file in sorted(staging.iterdir()):
            os.replace(file, output_dir / file.name)
        shutil.rmtree(staging, ignore_errors=True)


def _progression(log_history: list[dict], rows: int = 6) -> list[str]:
    """Loss, reward accuracy and margin averaged over ``rows`` equal windows of the logged steps."""
    records = [r for r in log_history if "loss" in r and "rewards/accuracies" in r]
    if not records:
        return []
    size = max(1, len(records) // rows)
    lines = ["  steps       loss   reward acc   margin"]
    for start in range(0, len(records) - size + 1, size):
        window = records[start : start + size]

        def mean(key: str, window: list[dict] = window) -> float:
            return sum(r[key] for r in window) / len(window)

        first, end = window[0]["step"], window[-1]["step"]
        lines.append(
            f"  {first:>4}-{end:<4}  {mean('loss'):7.3f}   {mean('rewards/accuracies'):8.2f}   "
            f"{mean('rewards/margins'):7.3f}"
        )
    return lines


def _peak_memory() -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20:,.0f} MiB"


def summary(log_history: list[dict], evaluation: dict[str, float] | None, output_dir: Path) -> list[str]:
    """The lines printed after training."""
    progression = _progression(log_history)
    lines = [""] + ["reward accuracy and margin on the training batches:", *progression] * bool(progression)
    end = next((r for r in reversed(log_history) if "train_runtime" in r), None)
    if end is not None and end.get("train_steps_per_second"):
        seconds_per_step = 1 / end["train_steps_per_second"]
        lines.append(
            f"{end['train_runtime']:.0f} s this run, {seconds_per_step:.3f} s/step, {_peak_memory()}"
        )
    if evaluation:
        lines.append(
            f"evaluation data: loss {evaluation['eval_loss']:.3f}, reward accuracy "
            f"{evaluation.get('eval_rewards/accuracies', float('nan')):.2f}, "
            f"margin {evaluation.get('eval_rewards/margins', float('nan')):.3f}"
        )
    outputs = ["the final model"] + [
        name
        for name in ("training_curves.png", "runs/ (TensorBoard)")
        if (output_dir / name.split()[0]).exists()
    ]
    checkpoints = complete_checkpoints(output_dir)
    if checkpoints:
        outputs.insert(1, f"{len(checkpoints)} checkpoint(s) up to {checkpoints[-1].name}")
    lines.append(f"outputs in {output_dir}/: {', '.join(outputs)}")
    return lines


def _silent(line: str) -> None:
    pass


def _open_output(options: TrainOptions, main_process: bool) -> tuple[Path, Path | None]:
    """``(output_dir, checkpoint to resume or None)``: an interrupted save undone, and a run
    that does not resume kept from writing over an earlier run's checkpoints."""
    output_dir = Path(options.training.output_dir)
    if main_process:
        recover(output_dir)
    resume = resolve_resume(options.training.resume_from_checkpoint, output_dir)
    if resume is None:
        check_fresh_output(output_dir)
    return output_dir, resume


def _describe(dataset) -> str:
    return f"{len(dataset)}" if hasattr(dataset, "__len__") else "streamed"


def _final_evaluation(trainer, evaluation) -> dict[str, float] | None:
    """The evaluation metrics at the last step: logged there already, or computed now."""
    if evaluation is None:
        return None
    last = next((r for r in reversed(trainer.state.log_history) if "eval_loss" in r), None)
    if last is not None and last["step"] == trainer.state.global_step:
        return last
    return trainer.evaluate()


def run(argv: list[str], log: Callable[[str], None] = print) -> int:
    """``dpo-fast train ARGV``; returns the exit status (128 + the signal when SIGINT or SIGTERM
    stopped it after saving a checkpoint).

    Raises:
        UserError: one line, before the data is tokenized or any model is loaded.
    """
    main_process = int(os.environ.get("RANK", "0")) == 0
    log = log if main_process else _silent  # one process reports
    # transformers renamed gradient checkpointing and warns whenever TRL reads or sets the old
    # name (its default), not only when the user passes it: noise on every run
    warnings.filterwarnings("ignore", r"`\w*gradient_checkpointing\w*` is deprecated", FutureWarning)
    options = parse_train_args(argv)
    output_dir, resume = _open_output(options, main_process)
    model_path = str(output_dir / DEMO_MODEL_DIR) if options.demo_model else options.model.model_name_or_path
    data_print = _data_fingerprint(options)
    if resume is not None:
        if options.demo_model and not Path(model_path).is_dir():
            raise UserError(f"--resume_from_checkpoint: the demo's model {model_path} is missing")
        check_resume(resume, run_signature(options, data_print, model_fingerprint(model_path)))

    train, evaluation = _pick_splits(options, _load_data(options, log))
    source = options.script.dataset_name or "the bundled hh-rlhf subset"
    evaluated = f", {_describe(evaluation)} evaluation pairs" if evaluation is not None else ""
    log(f"data: {_describe(train)} training pairs{evaluated}, from {source}")
    if options.demo_model and resume is None:
        build_demo_model(Path(model_path), list(train), demo_size(), options.training.seed)
        log(f"model: the demo's random Llama ({demo_size()}), saved to {model_path}")
    _check_tokenizer(options, model_path, next(iter(train)))

    from .callbacks import CURVES_FILE, SaveOnSignal, TrainingCurves

    stopper = SaveOnSignal()
    callbacks = [stopper]
    if importlib.util.find_spec("matplotlib") is None:
        log(f"no {CURVES_FILE}: matplotlib is not installed (pip install 'dpo-fast[trl]')")
    else:
        callbacks.append(TrainingCurves())
    trainer = _make_trainer(options, model_path, train, evaluation, callbacks)
    trainer.run_signature = run_signature(options, data_print, model_fingerprint(model_path))
    resuming = f", resuming from {resume}" if resume else ""
    log(f"training: layout {options.app.layout}, dpo_fast's fused head in TRL's DPOTrainer{resuming}")
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    if stopper.received is not None:
        saved = complete_checkpoints(output_dir)[-1]
        print(
            f"dpo-fast: stopped at step {trainer.state.global_step}; {saved} saved: continue with "
            "--resume_from_checkpoint last",
            file=sys.stderr,
        )
        return 128 + stopper.received
    metrics = _final_evaluation(trainer, evaluation)
    save_final_model(trainer, output_dir)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the logging integrations
        trainer.end()
    for line in summary(trainer.state.log_history, metrics, output_dir):
        log(line)
    return 0
