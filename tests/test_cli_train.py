"""``dpo-fast train`` runs on CPU: TRL's DPOTrainer with dpo_fast's head, on a tiny random Qwen2
with a ChatML template (conversational data, LoRA, ``--layout packed``, a YAML config,
evaluation, TensorBoard, the PNG, numbered checkpoints, resume) and the demo with no model or
data arguments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from app_helpers import (
    CPU,
    assert_one_line_error,
    conversational,
    run_cli,
    save_tiny_qwen2,
    short_pairs,
    write_jsonl,
)

import dpo_fast.integrations.trl as fast_trl
from dpo_fast.app.callbacks import CURVES_FILE, TrainingCurves, write_curves
from dpo_fast.app.checkpoints import RUN_FILE
from dpo_fast.app.options import parse_train_args

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("model") / "qwen2", short_pairs(64))


@pytest.fixture(scope="module")
def messages(tmp_path_factory):
    """A folder of conversational pairs: train.jsonl (16) and test.jsonl (8)."""
    folder = tmp_path_factory.mktemp("messages")
    pairs = [conversational(p) for p in short_pairs(24)]
    write_jsonl(folder / "train.jsonl", pairs[:16])
    write_jsonl(folder / "test.jsonl", pairs[16:])
    return folder


def yaml_config(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    return path


def adapter(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(checkpoint / "adapter_model.safetensors")


def test_conversational_lora_packed_from_yaml_then_resume(tmp_path, qwen2, messages, capsys, monkeypatch):
    relaid = []
    original = fast_trl._relaid_rows
    monkeypatch.setattr(fast_trl, "_relaid_rows", lambda *a, **k: relaid.append(a[1]) or original(*a, **k))
    first = tmp_path / "first"
    config = yaml_config(
        tmp_path / "run.yaml",
        model_name_or_path=qwen2,
        dataset_name=messages,
        output_dir=first,
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
        layout="packed",
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        max_length=96,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=1,
        bf16=False,
        disable_tqdm=True,
        report_to=["tensorboard"],
        precompute_ref_log_probs=True,
    )
    status, out, err = run_cli(["train", "--config", config], capsys)
    assert status == 0, err
    assert set(relaid) == {"packed"}  # every forward went through the packed re-layout
    assert "evaluation data: loss" in out and f"outputs in {first}/" in out

    # numbered checkpoints (complete, with the run signature) that PEFT loads
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoints = sorted(p.name for p in first.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    signature = json.loads((first / "checkpoint-4" / RUN_FILE).read_text())["signature"]
    assert (signature["layout"], signature["use_peft"], signature["lora_r"]) == ("packed", True, 4)
    base = AutoModelForCausalLM.from_pretrained(qwen2)
    model = PeftModel.from_pretrained(base, first / "checkpoint-4")
    lora_b = [w for name, w in adapter(first / "checkpoint-4").items() if "lora_B" in name]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)  # trained: LoRA's B starts at zero
    tokenizer = AutoTokenizer.from_pretrained(first / "checkpoint-4")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert model(**tokenizer(chat, return_tensors="pt")).logits.isfinite().all()
    final = adapter(first)  # the final model, in --output_dir itself
    assert all(torch.equal(final[name], w) for name, w in adapter(first / "checkpoint-4").items())

    # TensorBoard's real event files, with the training and evaluation scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (first / "runs").rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/rewards/accuracies", "eval/loss", "eval/rewards/margins"} <= set(scalars)
    assert (first / CURVES_FILE).read_bytes().startswith(PNG)
    assert sorted(p.name for p in messages.iterdir()) == ["test.jsonl", "train.jsonl"]  # no cache there

    # resume from the step-2 checkpoint in another folder: steps 3 and 4 again, same adapter
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(first / "checkpoint-2", second / "checkpoint-2")
    resume = ["train", "--config", config, "--output_dir", second, "--resume_from_checkpoint", "last"]
    capsys.readouterr()
    status, _, err = run_cli([*resume, "--beta", "0.2"], capsys)
    assert_one_line_error(status, err, "beta differs from the run that saved it (saved 0.1, now 0.2)")
    status, out, err = run_cli(resume, capsys)
    assert status == 0, err
    state = json.loads((second / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [r["step"] for r in state["log_history"] if "loss" in r] == [1, 2, 3, 4]
    for name, weight in adapter(first / "checkpoint-4").items():
        assert torch.equal(adapter(second / "checkpoint-4")[name], weight), name


def test_demo_runs_without_model_or_data(tmp_path, monkeypatch, capsys):
    """No --model_name_or_path, no --dataset_name: the bundled pairs, the random Llama and the
    demo's defaults (its learning rate); --max_steps shortens it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    status, out, err = run_cli(["train", "--max_steps", "3", "--disable_tqdm", "true"], capsys)
    assert status == 0, err
    output = tmp_path / "dpo_fast_demo"
    assert "data: 192 training pairs, 64 evaluation pairs, from the bundled hh-rlhf subset" in out
    assert "reward accuracy and margin on the training batches" in out and "evaluation data: loss" in out
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.model_type == "llama" and model.config.hidden_size == 64
    assert AutoTokenizer.from_pretrained(output).chat_template
    assert AutoModelForCausalLM.from_pretrained(output / "checkpoint-3").config.hidden_size == 64
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert json.loads((output / "checkpoint-3" / RUN_FILE).read_text())["signature"]["learning_rate"] == 2e-3
    assert (output / CURVES_FILE).read_bytes().startswith(PNG)


def test_learning_rate_is_trls_for_a_users_model(tmp_path, qwen2):
    from trl import DPOConfig

    common = ["--output_dir", str(tmp_path), *CPU]
    assert parse_train_args(common).training.learning_rate == 2e-3  # the demo's random model
    user = parse_train_args([*common, "--model_name_or_path", str(qwen2)])
    assert user.training.learning_rate == DPOConfig.__dataclass_fields__["learning_rate"].default == 1e-6
    assert user.training.max_steps == -1 and not user.demo_model
    config = yaml_config(tmp_path / "c.yaml", model_name_or_path=qwen2, learning_rate=5e-7, beta=0.3)
    from_file = parse_train_args([*common, "--config", str(config)])
    assert (from_file.training.learning_rate, from_file.training.beta) == (5e-7, 0.3)
    assert parse_train_args([*common, "--config", str(config), "--beta", "0.5"]).training.beta == 0.5


def test_curves_png_at_each_save(tmp_path):
    logs = [
        {"step": 1, "loss": 0.69, "rewards/accuracies": 0.0, "rewards/margins": 0.0},
        {"step": 2, "loss": 0.6, "rewards/accuracies": 0.5, "rewards/margins": 0.2},
        {"step": 2, "eval_loss": 0.65, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.1},
    ]
    assert not write_curves([], tmp_path / "none.png") and not (tmp_path / "none.png").exists()

    class State:
        is_world_process_zero = True
        log_history = logs[:1]

    class Args:
        output_dir = str(tmp_path)

    callback = TrainingCurves()
    callback.on_save(Args, State, None)
    first = (tmp_path / CURVES_FILE).read_bytes()
    State.log_history = logs
    callback.on_save(Args, State, None)
    second = (tmp_path / CURVES_FILE).read_bytes()
    assert first.startswith(PNG) and second.startswith(PNG) and first != second
    assert [p.name for p in tmp_path.iterdir()] == [CURVES_FILE]  # no temporary file left


def test_sigint_saves_the_step_and_resume_matches(tmp_path, qwen2, messages, capsys, monkeypatch):
    """SIGINT during training: the step finishes, checkpoint-2 is saved, exit 130; resuming ends
    with the uninterrupted run's weights. A second SIGINT stops at once, every checkpoint whole."""
    import os
    import signal

    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import dpo_fast.app.train as train_module

    def run(output: Path, signals_at_step_2: int = 0, resume: bool = False):
        class Interrupt(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == 1:  # during step 2
                    for _ in range(signals_at_step_2):
                        os.kill(os.getpid(), signal.SIGINT)

        make = train_module._make_trainer
        monkeypatch.setattr(
            train_module,
            "_make_trainer",
            lambda o, m, t, e, callbacks: make(o, m, t, e, [*callbacks, Interrupt()]),
        )
        args = ["train", "--model_name_or_path", qwen2, "--dataset_name", messages / "train.jsonl", *CPU]
        args += [
            "--output_dir",
            output,
            "--max_steps",
            4,
            "--per_device_train_batch_size",
            2,
            "--save_steps",
            3,
        ]
        args += ["--learning_rate", 1e-3, "--max_length", 64] + ["--resume_from_checkpoint", "last"] * resume
        return run_cli(args, capsys)

    status, _, err = run(tmp_path / "whole")
    assert status == 0, err
    status, _, err = run(tmp_path / "stopped", signals_at_step_2=1)
    assert status == 130 and "stopped at step 2" in err, err
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-2"]
    status, _, err = run(tmp_path / "stopped", resume=True)
    assert status == 0, err
    expected = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "stopped" / "model.safetensors")
    assert all(torch.equal(resumed[name], weight) for name, weight in expected.items())

    status, _, err = run(tmp_path / "twice", signals_at_step_2=2)
    assert status == 130 and err.strip().endswith("dpo-fast: interrupted"), err
    assert not list((tmp_path / "twice").glob("checkpoint-*"))  # stopped before any save


def test_two_processes_train_like_one(tmp_path, qwen2, messages):
    """torchrun with 2 CPU processes (gloo DDP), 2 pairs each: rank 0 publishes complete
    checkpoints between barriers, and the weights match one process with 4 pairs per step."""
    import subprocess
    import sys

    from app_helpers import ROOT
    from safetensors.torch import load_file

    def train(output: Path, processes: int) -> dict[str, torch.Tensor]:
        args = [
            "--model_name_or_path",
            qwen2,
            "--dataset_name",
            messages / "train.jsonl",
            "--output_dir",
            output,
        ]
        args += ["--max_steps", 4, "--save_steps", 2, "--learning_rate", 1e-3, "--max_length", 64, *CPU]
        args += ["--per_device_train_batch_size", 4 // processes, "--use_cpu", "true"]
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
        ]
        command = [*launcher, "-m", "dpo_fast.app.cli", "train", *map(str, args)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert result.stdout.count("training: layout") == 1  # one process reports
        assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
        assert all((p / RUN_FILE).is_file() for p in output.glob("checkpoint-*"))
        return load_file(output / "model.safetensors")

    initial = load_file(qwen2 / "model.safetensors")
    one, two = train(tmp_path / "one", 1), train(tmp_path / "two", 2)
    for name, weight in one.items():
        moved = (weight - initial[name]).abs().max()
        assert (two[name] - weight).abs().max() <= 1e-4 * moved + 1e-7, name
