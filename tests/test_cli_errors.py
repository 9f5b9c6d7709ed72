"""``dpo-fast train``'s hostile-input table: every user error prints one line naming the flag,
file or field and exits with status 2, before the work it would waste.

Each case says how far the run may get: "options" errors come before the data is read,
"data" errors before a model is built or a tokenizer trained. The test fails if the run gets
further (the later stages are replaced by tripwires).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from app_helpers import (
    ROOT,
    assert_one_line_error,
    conversational,
    run_cli,
    save_tiny_qwen2,
    short_pairs,
    write_jsonl,
)

import dpo_fast.app.train as train_module


class Tripwire(Exception):
    """A stage the failing run must not reach."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the cases refer to as {name}."""
    root = tmp_path_factory.mktemp("hostile")
    pairs = short_pairs(16)
    good = json.dumps(pairs[0]).encode() + b"\n"
    model = save_tiny_qwen2(root / "qwen2", pairs)
    no_template = root / "qwen2-no-template"
    shutil.copytree(model, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(root / "vit")
    (root / "empty").mkdir()
    (root / "a_file").write_text("x")
    (root / "bad.yaml").write_text("beta: [1\n")
    (root / "list.yaml").write_text("- beta\n")
    (root / "unknown.yaml").write_text("betta: 0.2\n")
    (root / "incomplete" / "checkpoint-3").mkdir(parents=True)
    (root / "used" / "checkpoint-2").mkdir(parents=True)
    for name in ("dpo_fast_run.json", "trainer_state.json"):
        (root / "used" / "checkpoint-2" / name).write_text("{}")
    return {
        "tmp": root,
        "model": model,
        "no_template": no_template,
        "vit": root / "vit",
        "empty": root / "empty",
        "a_file": root / "a_file",
        "bad_yaml": root / "bad.yaml",
        "list_yaml": root / "list.yaml",
        "unknown_yaml": root / "unknown.yaml",
        "incomplete": root / "incomplete" / "checkpoint-3",
        "used": root / "used",
        "data": write_jsonl(root / "pairs.jsonl", pairs),
        "messages": write_jsonl(root / "messages.jsonl", [conversational(p) for p in pairs]),
        "bad_json": write_jsonl(root / "bad_json.jsonl", [good, good, b'{"prompt": "a"\n']),
        "not_utf8": write_jsonl(
            root / "not_utf8.jsonl", [good, b'{"prompt": "caf\xe9", "chosen": "b"}\n', good]
        ),
        "empty_completion": write_jsonl(
            root / "empty.jsonl", [{"prompt": "p", "chosen": "c", "rejected": ""}]
        ),
        "numbers": write_jsonl(root / "numbers.jsonl", [{"prompt": "p", "chosen": 1, "rejected": "r"}]),
    }


OPTIONS, DATA = "options", "data"
CASES = [
    # (id, stage, arguments, expected text in the one line)
    ("beta-inf", OPTIONS, ["--beta", "inf"], "beta must be a finite number > 0, got inf"),
    ("beta-not-a-number", OPTIONS, ["--beta", "x"], "argument --beta: invalid float value: 'x'"),
    ("label-smoothing-2", OPTIONS, ["--label_smoothing", "2"], "label_smoothing must be in [0, 1], got 2"),
    ("robust-label-smoothing", OPTIONS, ["--loss_type", "robust", "--label_smoothing", "0.5"], "robust"),
    ("unknown-loss", OPTIONS, ["--loss_type", "dpop"], "--loss_type must be among TRL's DPO losses"),
    ("orpo-not-dpo-trainer", OPTIONS, ["--loss_type", "orpo"], "not a loss of TRL's DPOTrainer"),
    ("loss-weights-count", OPTIONS, ["--loss_type", "sigmoid", "ipo", "--loss_weights", "1"], "loss_weights"),
    ("loss-weight-inf", OPTIONS, ["--loss_type", "sigmoid", "--loss_weights", "inf"], "must be finite"),
    ("f-divergence-loss", OPTIONS, ["--f_divergence_type", "forward_kl", "--loss_type", "bco_pair"],
     "f_divergence_type='forward_kl' is only defined for"),
    ("f-divergence-unknown", OPTIONS, ["--f_divergence_type", "kl"], "f_divergence_type must be one of"),
    ("ld-alpha", OPTIONS, ["--ld_alpha", "2"], "--ld_alpha must be in [0, 1], got 2.0"),
    ("weighting-aot", OPTIONS, ["--use_weighting", "--loss_type", "aot"], "--use_weighting does not apply"),
    ("learning-rate-0", OPTIONS, ["--learning_rate", "0"], "--learning_rate must be > 0, got 0.0"),
    ("learning-rate-nan", OPTIONS, ["--learning_rate", "nan"], "--learning_rate must be > 0, got nan"),
    ("batch-0", OPTIONS, ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be an"),
    ("accumulation-0", OPTIONS, ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    ("max-steps-0", OPTIONS, ["--max_steps", "0"], "--max_steps must be >= 1"),
    ("epochs-0", OPTIONS, ["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs must be > 0"),
    ("max-length-1", OPTIONS, ["--max_length", "1"], "--max_length must be >= 2, got 1"),
    ("save-steps-0", OPTIONS, ["--save_steps", "0"], "--save_steps must be > 0"),
    ("eval-steps-negative", OPTIONS, ["--eval_steps", "-1"], "--eval_steps must be > 0"),
    ("save-total-limit-0", OPTIONS, ["--save_total_limit", "0"], "--save_total_limit must be >= 1"),
    ("layout-unknown", OPTIONS, ["--layout", "ragged"], "argument --layout: invalid choice: 'ragged'"),
    ("push-to-hub", OPTIONS, ["--push_to_hub", "true"], "--push_to_hub is not supported"),
    ("layout-and-padding-free", OPTIONS, ["--layout", "packed", "--padding_free", "true"], "pick one"),
    ("lora-r-0", OPTIONS, ["--use_peft", "--lora_r", "0"], "--lora_r must be >= 1, got 0"),
    ("unknown-flag", OPTIONS, ["--no_such_flag", "1"], "['--no_such_flag', '1']"),
    ("report-to-unknown", OPTIONS, ["--report_to", "nosuch"], "--report_to must be among"),
    ("config-missing", OPTIONS, ["--config", "{tmp}/none.yaml"], "--config: file not found"),
    ("config-no-file-name", OPTIONS, ["--config"], "--config needs a file name"),
    ("config-bad-yaml", OPTIONS, ["--config", "{bad_yaml}"], "--config: not valid YAML"),
    ("config-not-a-mapping", OPTIONS, ["--config", "{list_yaml}"], "must contain a YAML mapping"),
    ("config-unknown-key", OPTIONS, ["--config", "{unknown_yaml}"], "Unknown arguments from config file"),
    ("output-dir-is-a-file", OPTIONS, ["--output_dir", "{a_file}"], "is a file, not a folder"),
    ("output-dir-under-a-file", OPTIONS, ["--output_dir", "{a_file}/run"], "is not a writable folder"),
    ("model-missing", OPTIONS, ["--model_name_or_path", "{tmp}/nope"], "no such folder"),
    ("model-no-config", OPTIONS, ["--model_name_or_path", "{empty}"], "no config.json"),
    ("model-not-causal", OPTIONS, ["--model_name_or_path", "{vit}"], "is a 'vit' model, not a causal LM"),
    ("resume-missing", OPTIONS, ["--resume_from_checkpoint", "{tmp}/nope"], "no such folder"),
    ("resume-last-none", OPTIONS, ["--resume_from_checkpoint", "last"], "no complete checkpoint in"),
    ("resume-incomplete", OPTIONS, ["--resume_from_checkpoint", "{incomplete}"], "not a complete dpo-fast"),
    ("fresh-run-over-checkpoints", OPTIONS, ["--output_dir", "{used}"], "already holds checkpoint-2"),
    ("data-missing", OPTIONS, ["--dataset_name", "{tmp}/missing.jsonl"], "data file or folder not found"),
    ("data-bad-json", DATA, ["--dataset_name", "{bad_json}"], "bad_json.jsonl:3: bad JSON"),
    ("data-not-utf8", DATA, ["--dataset_name", "{not_utf8}"], "not_utf8.jsonl:2: not UTF-8 (byte 16)"),
    ("data-empty-completion", DATA, ["--dataset_name", "{empty_completion}"], ".jsonl:1: empty rejected"),
    ("data-not-text", DATA, ["--dataset_name", "{numbers}"], "numbers.jsonl:1: field(s) ['chosen']"),
    ("no-eval-split", DATA, ["--dataset_name", "{data}", "--eval_strategy", "steps"], "needs evaluation"),
    ("no-train-split", DATA, ["--dataset_train_split", "dev"], "--dataset_train_split dev: the bundled"),
    ("messages-without-template", DATA,
     ["--dataset_name", "{messages}", "--model_name_or_path", "{no_template}"], "has no chat template"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "args", "message"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_user_error_is_one_line_before_heavy_work(files, tmp_path, monkeypatch, capsys, stage, args, message):
    def tripwire(name):
        def stop(*args, **kwargs):
            raise Tripwire(name)

        return stop

    if stage == OPTIONS:
        monkeypatch.setattr(train_module, "_load_data", tripwire("the data were read"))
    monkeypatch.setattr(train_module, "build_demo_model", tripwire("the demo model was built"))
    monkeypatch.setattr(train_module, "_make_trainer", tripwire("the trainer was built"))
    args = [arg.format(**files) for arg in args]
    if "--output_dir" not in args:
        args = ["--output_dir", str(tmp_path / "run"), *args]
    if "--model_name_or_path" in args:
        args = ["--bf16", "false", *args]  # TRL's default, bf16, needs a GPU
    status, _, err = run_cli(["train", *args], capsys)
    assert_one_line_error(status, err, message)


def test_skip_invalid_skips_the_bad_lines_and_goes_on(files, tmp_path, monkeypatch, capsys):
    """--skip_invalid: the non-UTF-8 line (issue 14) and a bad JSON line are skipped, counted,
    and the run goes on to build the trainer."""
    monkeypatch.setattr(train_module, "build_demo_model", lambda *a, **k: None)
    monkeypatch.setattr(train_module, "_check_tokenizer", lambda *a, **k: None)

    def built(options, model_path, train, evaluation, callbacks):
        raise Tripwire(len(train))

    monkeypatch.setattr(train_module, "_make_trainer", built)
    for name in ("not_utf8", "bad_json"):
        args = ["train", "--dataset_name", files[name], "--skip-invalid", "--output_dir", tmp_path / name]
        with pytest.raises(Tripwire) as reached:
            print(run_cli(args, capsys))
        assert reached.value.args == (2,)
        assert f"data: skipped 1 invalid line(s) in {files[name]}" in capsys.readouterr().out


def test_unsupported_trl_version_is_one_line(tmp_path, monkeypatch, capsys):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    monkeypatch.setattr(train_module, "_load_data", lambda *a, **k: pytest.fail("the data were read"))
    status, _, err = run_cli(["train", "--output_dir", tmp_path], capsys)
    assert_one_line_error(status, err, "found trl 1.17.0: install a supported TRL")


def test_real_process_prints_one_line_and_no_traceback(files, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dpo_fast.app.cli", "train", "--beta", "inf", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dpo-fast: error: loss options: beta must be a finite number > 0, got inf"
    ), result.stderr
