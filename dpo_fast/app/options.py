"""``dpo-fast train``'s arguments: TRL's ``trl dpo`` flags plus dpo_fast's own, parsed and checked.

The parser is TRL's ``TrlParser`` over the dataclasses TRL's own ``trl dpo`` script parses
(``ScriptArguments``, ``DPOConfig``, ``ModelConfig``, ``DatasetMixtureConfig``) and
:class:`AppArguments`, so every flag has TRL's name, default and meaning, and ``--config
file.yaml`` sets any of them (the command line wins). Every user error (a bad value, an unknown
flag, a config file that cannot be read, an option TRL would only reject after the data is
tokenized) becomes a one-line :class:`UserError` before any heavy work.

Importing TRL's config classes imports torch (seconds), so ``--help`` prints a copy of the
parser's help generated for the installed TRL and transformers versions
(``assets/train_help.txt``, rewritten by ``python -m dpo_fast.app.options``); with other
versions the real parser prints it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from ..constants import LAYOUTS, LOSS_TYPES
from .errors import UserError, first_line
from .pairs import check_data_source

HELP_ASSET = Path(__file__).parent / "assets" / "train_help.txt"
HELP_WIDTH = 100
PROG = "dpo-fast train"
INSTALL_TRL = "dpo-fast train runs TRL's DPOTrainer, which is not installed: pip install 'dpo-fast[trl]'"
# loss types TRL's DPOTrainer does not have: they are its CPOTrainer's and ORPOTrainer's
NOT_DPO_TRAINER_LOSSES = ("simpo", "cpo", "orpo")


@dataclasses.dataclass
class AppArguments:
    """dpo_fast's own ``dpo-fast train`` options (all others are TRL's)."""

    _argument_group_name = "dpo_fast"

    layout: Literal[LAYOUTS] = dataclasses.field(  # type: ignore[valid-type]
        default="padded",
        metadata={
            "help": "How chosen and rejected run through the model: 'padded' (TRL's batch), 'packed' "
            "(no padding) or 'prefix_shared' (each prompt once per pair)."
        },
    )
    skip_invalid: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Skip invalid preference records (bad JSON, a line that is not UTF-8, a missing or "
            "empty field) and report how many, instead of stopping at the first."
        },
    )


@dataclasses.dataclass
class TrainOptions:
    """The parsed arguments of one ``dpo-fast train`` run."""

    script: Any  # trl.ScriptArguments
    training: Any  # trl.DPOConfig
    model: Any  # trl.ModelConfig
    mixture: Any  # trl.DatasetMixtureConfig
    app: AppArguments
    demo_model: bool  # no --model_name_or_path: the demo's random Llama
    bundled_data: bool  # no --dataset_name / datasets: the bundled hh-rlhf subset


def _versions() -> str:
    return " ".join(f"{name}=={metadata.version(name)}" for name in ("trl", "transformers"))


def trl_installed() -> bool:
    try:
        metadata.version("trl")
    except metadata.PackageNotFoundError:
        return False
    return True


def build_parser():
    """TRL's ``TrlParser`` over TRL's ``dpo`` dataclasses and :class:`AppArguments`; its errors
    raise :class:`UserError` instead of printing usage and exiting."""
    import argparse
    import functools

    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig, ScriptArguments, TrlParser

    class Parser(TrlParser):
        def error(self, message: str):
            raise UserError(message)

    formatter = functools.partial(argparse.ArgumentDefaultsHelpFormatter, width=HELP_WIDTH)
    return Parser(
        (ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig, AppArguments),
        prog=PROG,
        description="DPO with TRL's DPOTrainer and dpo_fast's kernels inside. TRL's `trl dpo` flags, "
        "plus --config file.yaml and dpo_fast's own (last group). With no --model_name_or_path: the "
        "demo's random Llama; with no --dataset_name: the bundled hh-rlhf subset.",
        formatter_class=formatter,
    )


def help_text() -> str:
    """The parser's help: the saved copy when it was made for the installed TRL and transformers
    (no torch import), else the real parser's."""
    if HELP_ASSET.is_file():
        header, _, body = HELP_ASSET.read_text(encoding="utf-8").partition("\n")
        if header == f"# {_versions()}":
            return body
    return build_parser().format_help()


def write_help_asset() -> Path:
    """Save the real parser's help for the installed versions (run after upgrading TRL or
    transformers: ``python -m dpo_fast.app.options``)."""
    HELP_ASSET.write_text(f"# {_versions()}\n{build_parser().format_help()}", encoding="utf-8")
    return HELP_ASSET


def _parse(parser, argv: Sequence[str]) -> tuple:
    try:
        return parser.parse_args_and_config(list(argv))
    except UserError:
        raise
    except FileNotFoundError as error:
        raise UserError(f"--config: file not found: {error.filename}") from None
    except OSError as error:
        raise UserError(f"--config: cannot read {error.filename}: {error.strerror}") from None
    except IndexError:
        raise UserError("--config needs a file name") from None
    except ValueError as error:  # unknown flags or config keys, and TRL's / transformers' own checks
        raise UserError(first_line(error)) from None
    except Exception as error:
        import yaml

        if isinstance(error, yaml.YAMLError):
            raise UserError(f"--config: not valid YAML ({first_line(error)})") from None
        raise


def _given(argv: Sequence[str], name: str) -> bool:
    """Whether the command line or the ``--config`` file sets ``name`` (read before parsing:
    TRL's dataclasses check their values while they are built, so defaults go in first)."""
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    if any(arg.split("=", 1)[0] in flags for arg in argv):
        return True
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return False
    import yaml

    try:
        config = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the parser reports it
    return isinstance(config, dict) and name in config


def parse_train_args(argv: Sequence[str]) -> TrainOptions:
    """Parse and check ``dpo-fast train``'s arguments (see :func:`check_options`).

    Without ``--model_name_or_path`` the run trains the demo's random model, and the demo's
    training defaults (:func:`dpo_fast.app.demo.demo_defaults`: its learning rate, steps, ...)
    replace TRL's, below the config file and the command line. A user's model gets TRL's.

    Raises:
        UserError: a bad flag, value, config file, model or output folder (one line).
    """
    parser = build_parser()
    if not _given(argv, "model_name_or_path"):
        from .demo import demo_defaults

        user_data = _given(argv, "dataset_name") or _given(argv, "datasets")
        parser.set_defaults(**demo_defaults(bundled_data=not user_data))
    script, training, model, mixture, app = _parse(parser, argv)
    options = TrainOptions(
        script,
        training,
        model,
        mixture,
        app,
        demo_model=model.model_name_or_path is None,
        bundled_data=script.dataset_name is None and not mixture.datasets,
    )
    check_options(options)
    return options


def _require(ok: bool, flag: str, got: object, expected: str) -> None:
    if not ok:
        raise UserError(f"--{flag} must be {expected}, got {got!r}")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_loss_options(training) -> None:
    """The loss options, checked by dpo_fast's own ``PreferenceLossSpec`` (one source of truth),
    plus what TRL's DPOTrainer alone rejects."""
    from ..preference_loss import PreferenceLossSpec

    dpo_losses = [name for name in LOSS_TYPES if name not in NOT_DPO_TRAINER_LOSSES]
    unknown = [name for name in training.loss_type if name not in LOSS_TYPES]
    _require(not unknown, "loss_type", " ".join(unknown), f"among TRL's DPO losses: {', '.join(dpo_losses)}")
    other_trainer = [t for t in training.loss_type if t in NOT_DPO_TRAINER_LOSSES]
    if other_trainer:
        raise UserError(
            f"--loss_type {', '.join(other_trainer)} is not a loss of TRL's DPOTrainer (it is its CPO/ORPO "
            "trainer's); dpo_fast.preference_loss computes it in your own loop"
        )
    try:
        PreferenceLossSpec(
            loss_type=list(training.loss_type),
            loss_weights=training.loss_weights,
            beta=training.beta,
            label_smoothing=training.label_smoothing,
            f_divergence=training.f_divergence_type,
            f_alpha=training.f_alpha_divergence_coef,
            discopop_tau=training.discopop_tau,
        )
    except (ValueError, TypeError) as error:
        message = first_line(error)
        for ours, theirs in (("f_divergence", "f_divergence_type"), ("f_alpha", "f_alpha_divergence_coef")):
            message = message.replace(f"{ours} ", f"{theirs} ").replace(f"{ours}=", f"{theirs}=")
        raise UserError(f"loss options: {message}") from None
    if training.use_weighting and {"aot", "aot_unpaired"} & set(training.loss_type):
        raise UserError(
            "--use_weighting does not apply to the aot and aot_unpaired loss types (TRL refuses it)"
        )
    ld_alpha = training.ld_alpha
    _require(
        ld_alpha is None or (_finite(ld_alpha) and 0 <= ld_alpha <= 1), "ld_alpha", ld_alpha, "in [0, 1]"
    )


def _check_training(training, app: AppArguments) -> None:
    t = training
    _require(_finite(t.learning_rate) and t.learning_rate > 0, "learning_rate", t.learning_rate, "> 0")
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(t, flag)
        _require(isinstance(value, int) and value >= 1, flag, value, "an integer >= 1")
    _require(
        t.max_steps == -1 or t.max_steps >= 1,
        "max_steps",
        t.max_steps,
        ">= 1 (or -1: use --num_train_epochs)",
    )
    if t.max_steps == -1:
        _require(
            _finite(t.num_train_epochs) and t.num_train_epochs > 0,
            "num_train_epochs",
            t.num_train_epochs,
            "> 0",
        )
    _require(t.max_length is None or t.max_length >= 2, "max_length", t.max_length, ">= 2")
    for flag in ("save_steps", "logging_steps", "eval_steps"):
        value = getattr(t, flag)
        _require(value is None or (_finite(value) and value > 0), flag, value, "> 0")
    _require(_finite(t.max_grad_norm) and t.max_grad_norm >= 0, "max_grad_norm", t.max_grad_norm, ">= 0")
    _require(
        t.save_total_limit is None or t.save_total_limit >= 1, "save_total_limit", t.save_total_limit, ">= 1"
    )
    if t.push_to_hub:
        # transformers would upload from the hidden folder a checkpoint is written to, before
        # it is renamed into place
        raise UserError("--push_to_hub is not supported: upload the --output_dir after training (hf upload)")
    if app.layout != "padded" and t.padding_free:
        raise UserError(f"--layout {app.layout} and --padding_free both re-lay the batch out: pick one")
    if t.report_to not in (None, "none", "all", ["none"]):
        from transformers.integrations import get_available_reporting_integrations
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        requested = [name for name in t.report_to if name != "none"]
        unknown = [name for name in requested if name not in INTEGRATION_TO_CALLBACK]
        _require(not unknown, "report_to", " ".join(unknown), f"among {', '.join(INTEGRATION_TO_CALLBACK)}")
        available = get_available_reporting_integrations()
        missing = [name for name in requested if name not in available]
        if missing:
            raise UserError(
                f"--report_to {' '.join(missing)}: not installed (pip install {' '.join(missing)})"
            )


def check_output_dir(path: str) -> None:
    """``path`` is, or can become, a writable folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output_dir {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".dpo_fast-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"--output_dir {folder} is not a writable folder: {error.strerror or error}"
        ) from None


def check_model(name_or_path: str, revision: str | None, trust_remote_code: bool) -> None:
    """A local model folder or Hub name whose configuration is a causal LM's."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(name_or_path).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(f"--model_name_or_path {path} is not a Hugging Face model folder (no config.json)")
    if not path.exists() and name_or_path.startswith((".", "/", "~")):
        raise UserError(f"--model_name_or_path {name_or_path}: no such folder")
    try:
        config = AutoConfig.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as error:
        raise UserError(
            f"--model_name_or_path {name_or_path}: cannot load its config: {first_line(error)}"
        ) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise UserError(
            f"--model_name_or_path {name_or_path} is a {config.model_type!r} model, not a causal LM "
            "that transformers can train with DPO"
        )


def check_options(options: TrainOptions) -> None:
    """Every check that needs no data and no weights: values in range, the loss options, the
    output folder, the model's configuration (see the module docstring)."""
    try:
        from ..integrations.trl import check_trl_version

        check_trl_version()
    except (ImportError, RuntimeError) as error:  # a TRL whose fused-head protocol we do not know
        raise UserError(first_line(error)) from None
    _check_training(options.training, options.app)
    check_loss_options(options.training)
    check_output_dir(options.training.output_dir)
    check_data_source(options.script.dataset_name)
    if options.demo_model and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("the demo runs in one process: pass --model_name_or_path for a multi-process run")
    if not options.demo_model:
        m = options.model
        check_model(m.model_name_or_path, m.model_revision, options.training.trust_remote_code)
    if options.model.use_peft:
        _require(options.model.lora_r >= 1, "lora_r", options.model.lora_r, ">= 1")


if __name__ == "__main__":
    print(f"wrote {write_help_asset()}", file=sys.stderr)
