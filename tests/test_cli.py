"""The `dpo-fast` CLI and what it stands on: data loading, the BPE tokenizer, the training loop.

Training runs use a tiny random Llama, a few pairs and short sequences so each takes seconds.
"""

import gzip
import json
import math
import subprocess
import sys

import pytest
import torch

import dpo_fast.app.cli as cli
import dpo_fast.app.train as train_module
from dpo_fast.app.pairs import (
    BUNDLED_DATA,
    DataError,
    load_preference_data,
    split_dialogue,
    train_bpe_tokenizer,
)

# a short, fast training run; tests add --data, --output-dir and their own flags
FAST = [
    "--model-config", "tiny", "--train-pairs", "16", "--eval-pairs", "8", "--batch-size", "4",
    "--max-length", "64", "--steps", "4", "--no-progress",
]  # fmt: skip


def write_jsonl(path, records, compress=False):
    text = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bundled():
    return load_preference_data()


@pytest.fixture
def data_file(tmp_path, bundled):
    """28 short hh-rlhf records, in hh-rlhf's own {chosen, rejected} dialogue format."""
    short = sorted(bundled, key=lambda p: len(p["prompt"]))[:28]
    records = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in short]
    return write_jsonl(tmp_path / "pairs.jsonl", records)


def run_cli(args, capsys):
    status = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


# --- data -----------------------------------------------------------------------------


def test_bundled_subset_has_licence_and_valid_pairs(bundled):
    assert len(bundled) == 512
    assert all(p["chosen"].strip() and p["rejected"].strip() for p in bundled)
    assert all(p["chosen"] != p["rejected"] for p in bundled)
    assert all(p["prompt"].endswith("\n\nAssistant:") for p in bundled)
    assets = BUNDLED_DATA.parent
    assert "MIT License" in (assets / "LICENSE-hh-rlhf").read_text()
    assert "Anthropic" in (assets / "README.md").read_text()
    assert BUNDLED_DATA.stat().st_size < 300_000


def test_split_dialogue():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert split_dialogue(prompt + " like this", prompt + " no") == (prompt, " like this", " no")
    # a completion that itself contains an assistant turn: the split is at the shared one
    assert split_dialogue(prompt + " a\n\nAssistant: b", prompt + " c")[0] == prompt
    with pytest.raises(ValueError, match="share no"):
        split_dialogue("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y")


@pytest.mark.parametrize("compress", [False, True], ids=["jsonl", "jsonl.gz"])
def test_load_both_formats(tmp_path, compress):
    name = "d.jsonl.gz" if compress else "d.jsonl"
    records = [
        {"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"},
        "\n",  # blank lines are skipped
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    ]
    pairs = load_preference_data(write_jsonl(tmp_path / name, records, compress))
    assert pairs == [
        {"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"},
        {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"},
    ]
    assert load_preference_data(tmp_path / name, limit=1) == pairs[:1]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "chosen": "b"', "bad JSON"),
        ('["a", "b"]', "expected a JSON object"),
        ('{"prompt": "a", "chosen": "b"}', r"missing field\(s\) \['rejected'\]"),
        ('{"prompt": "a", "chosen": 1, "rejected": "c"}', "must be strings"),
        ('{"prompt": "a", "chosen": "  ", "rejected": "c"}', "empty chosen completion"),
        ('{"chosen": "\\n\\nHuman: x\\n\\nAssistant:", "rejected": "\\n\\nHuman: x\\n\\nAssistant: y"}',
         "empty chosen completion"),
        ('{"chosen": "no turns", "rejected": "at all"}', "share no"),
    ],
)  # fmt: skip
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path = write_jsonl(tmp_path / "d.jsonl", [good + "\n", good + "\n", line + "\n", good + "\n"])
    with pytest.raises(DataError, match=message) as error:
        load_preference_data(path)
    assert str(error.value).startswith(f"{path}:3: ")
    assert len(load_preference_data(path, skip_invalid=True)) == 3


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_preference_data(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no preference pairs"):
        load_preference_data(write_jsonl(tmp_path / "e.jsonl", ["\n"]))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot be read"):
        load_preference_data(tmp_path / "bad.jsonl.gz")


def test_bpe_tokenizer(bundled):
    tokenizer = train_bpe_tokenizer(bundled[:64], vocab_size=300)
    assert len(tokenizer) == 300
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    # byte-level: any text round-trips, also characters never seen in training
    for text in (bundled[0]["chosen"], " naïve — 東京 🙂\n\ttabs"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    with pytest.raises(ValueError, match="258"):
        train_bpe_tokenizer(bundled[:4], vocab_size=100)


# --- one-line user errors -------------------------------------------------------------


def assert_one_line_error(status, err, message):
    assert status == cli.USER_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpo-fast: error: "), err
    assert message in lines[0], err


def test_error_missing_data_file(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    status, _, err = run_cli(["train", "--data", missing, "--output-dir", tmp_path], capsys)
    assert_one_line_error(status, err, "data file not found")


def test_error_bad_json_line(tmp_path, capsys, data_file):
    lines = data_file.read_text().splitlines()
    lines[5] = lines[5][:-3]
    data_file.write_text("\n".join(lines) + "\n")
    status, _, err = run_cli(["train", "--data", data_file, "--output-dir", tmp_path / "o", *FAST], capsys)
    assert_one_line_error(status, err, f"{data_file}:6: bad JSON")


def test_error_empty_completion(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c", "rejected": ""}])
    status, _, err = run_cli(["train", "--data", path, "--output-dir", tmp_path / "o", *FAST], capsys)
    assert_one_line_error(status, err, f"{path}:1: empty rejected completion")


def test_error_model_directory_not_a_causal_lm(tmp_path, capsys, data_file):
    from transformers import ViTConfig

    not_causal = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(not_causal)
    args = ["train", "--data", data_file, "--output-dir", tmp_path / "o", *FAST]
    status, _, err = run_cli([*args, "--model", not_causal, "--tokenizer", "org/missing"], capsys)
    assert_one_line_error(status, err, "is not a directory")
    status, _, err = run_cli([*args, "--model", not_causal], capsys)
    assert_one_line_error(status, err, "cannot load a tokenizer")  # the model directory has none
    empty = tmp_path / "empty"
    empty.mkdir()
    tokenizer_dir = tmp_path / "tok"
    train_bpe_tokenizer(load_preference_data(data_file), vocab_size=300).save_pretrained(tokenizer_dir)
    status, _, err = run_cli([*args, "--model", empty, "--tokenizer", tokenizer_dir], capsys)
    assert_one_line_error(status, err, "is not a Hugging Face model directory")
    status, _, err = run_cli([*args, "--model", not_causal, "--tokenizer", tokenizer_dir], capsys)
    assert_one_line_error(status, err, "is not a causal LM")


def test_error_out_of_memory_suggests_packed(monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "train", out_of_memory)
    status, _, err = run_cli(["train"], capsys)
    assert_one_line_error(status, err, "out of GPU memory")
    assert "--layout packed" in err and "--max-length" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--loss-type", "sigmoid,dpop"], "--loss-type must be names from"),
        (["--loss-type", "sigmoid,ipo", "--loss-weights", "1"], "one weight per loss type"),
        (["--loss-weights", "a"], "comma-separated numbers"),
        (["--max-length", "64", "--max-prompt-length", "64"], "must leave room"),
        (["--resume"], "no checkpoint to resume from"),
        (["--lr", "0"], "must be > 0"),
    ],
)
def test_error_bad_options(tmp_path, capsys, flags, message):
    status, _, err = run_cli(["train", "--output-dir", tmp_path, *flags], capsys)
    assert_one_line_error(status, err, message)


def test_console_entry_point_prints_no_traceback(tmp_path):
    """The real process: exit status 2 and one line on stderr, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "dpo_fast.app.cli", "train", "--data", str(tmp_path / "x.jsonl")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"dpo-fast: error: data file not found: {tmp_path / 'x.jsonl'}"


# --- training runs --------------------------------------------------------------------


def read_metrics(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_metrics_checkpoint_summary_and_resumes(tmp_path, capsys, monkeypatch, data_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    once = tmp_path / "once"
    args = ["train", "--data", data_file, *FAST, "--steps", "6"]
    status, out, _ = run_cli([*args, "--output-dir", once], capsys)
    assert status == 0
    assert "training pairs:" in out and "held-out pairs:" in out and "tokens/s" in out
    metrics = read_metrics(once)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for m in metrics:
        assert all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen"))
    # step 1: the policy is the reference, so the sigmoid loss is log 2 and every reward 0
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    summary = json.loads((once / "summary.json").read_text())
    assert summary["train_pairs"]["rewards/accuracies"] >= 0 and "held_out_pairs" in summary
    model = AutoModelForCausalLM.from_pretrained(once / "checkpoint")
    assert len(AutoTokenizer.from_pretrained(once / "checkpoint")) == model.config.vocab_size
    # the reference log-probs are cached next to the user's data
    assert data_file.with_name(data_file.name + ".ref-logps.pt").is_file()

    # interrupted after step 5 with a checkpoint at step 4, then --resume: the same 6 steps
    twice = tmp_path / "twice"
    step = train_module._step

    def interrupted(run, index, *rest):
        if index == 5:
            raise KeyboardInterrupt
        return step(run, index, *rest)

    monkeypatch.setattr(train_module, "_step", interrupted)
    assert run_cli([*args, "--save-every", "4", "--output-dir", twice], capsys)[0] == 130
    assert [m["step"] for m in read_metrics(twice)] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(train_module, "_step", step)
    status, out, _ = run_cli([*args, "--resume", "--output-dir", twice], capsys)
    assert status == 0 and "resumed from" in out
    resumed = read_metrics(twice)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, metrics, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4, abs=1e-6)


def test_layouts_give_the_same_first_step(tmp_path, capsys, data_file):
    """Same init, same batch: the first step's metrics agree across layouts."""
    first = {}
    for layout in ("padded", "packed", "prefix_shared"):
        out = tmp_path / layout
        flags = [*FAST, "--steps", "2", "--eval-pairs", "0", "--loss-type", "ipo", "--layout", layout]
        assert run_cli(["train", "--data", data_file, *flags, "--output-dir", out], capsys)[0] == 0
        first[layout] = read_metrics(out)
    for layout in ("packed", "prefix_shared"):
        for step in range(2):
            for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
                expected = first["padded"][step][key]
                assert first[layout][step][key] == pytest.approx(expected, rel=1e-4), (layout, step, key)


def test_dpo_learns_the_training_pairs(tmp_path, capsys, data_file):
    """A short run raises the reward accuracy on the training pairs well above chance."""
    flags = [*FAST, "--steps", "16", "--lr", "3e-3", "--eval-pairs", "0", "--loss-type", "sigmoid,bco_pair"]
    assert run_cli(["train", "--data", data_file, *flags, "--output-dir", tmp_path], capsys)[0] == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train_pairs"]["rewards/accuracies"] >= 0.8
    assert summary["train_pairs"]["rewards/margins"] > 0.1
    metrics = read_metrics(tmp_path)
    assert sum(m["loss"] for m in metrics[-4:]) < sum(m["loss"] for m in metrics[:4])


# --- bench / profile-memory ------------------------------------------------------------


def test_bench_runs_the_scripts(tmp_path, monkeypatch, capfd):
    benchmarks = tmp_path / "benchmarks"
    benchmarks.mkdir()
    (benchmarks / "bench_alpha.py").write_text("import sys; print('alpha ran', sys.argv[1:])")
    (benchmarks / "bench_beta.py").write_text("print('beta ran')")
    monkeypatch.setattr(cli, "BENCHMARKS", benchmarks)
    assert cli.main(["bench", "--only", "alpha", "--", "--repeats", "1"]) == 0
    out = capfd.readouterr().out
    assert "alpha ran ['--repeats', '1']" in out and "beta ran" not in out
    status, _, err = run_cli(["profile-memory"], capfd)
    assert_one_line_error(status, err, "not available")
    (benchmarks / "profile_memory.py").write_text("raise SystemExit(3)")
    assert cli.main(["profile-memory"]) == 3
    monkeypatch.setattr(cli, "BENCHMARKS", tmp_path / "none")
    status, _, err = run_cli(["bench"], capfd)
    assert_one_line_error(status, err, "no benchmark scripts")
