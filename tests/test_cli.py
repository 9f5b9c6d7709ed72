"""The ``dpo-fast`` command and its data layer: reading and checking preference data, the BPE
tokenizer, ``--version``, ``--help``, ``bench`` and ``profile-memory``. Training runs are in
``test_cli_train.py``, user errors in ``test_cli_errors.py``, kills in ``test_cli_kill.py``."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import types

import pytest
from app_helpers import ROOT, assert_one_line_error, conversational, run_cli, short_pairs, write_jsonl

import dpo_fast.app.cli as cli
from dpo_fast.app.options import HELP_ASSET, build_parser, help_text
from dpo_fast.app.pairs import (
    BUNDLED_DATA,
    CHATML_TOKENS,
    DataError,
    load_preference_data,
    load_splits,
    read_pairs,
    split_dialogue,
    train_bpe_tokenizer,
)

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


@pytest.fixture(scope="module")
def bundled():
    return load_preference_data()


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
    splits = load_splits(None)
    assert (len(splits["train"]), len(splits["test"])) == (448, 64)
    assert splits["test"][0] == bundled[448]


def test_split_dialogue():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert split_dialogue(prompt + " like this", prompt + " no") == (prompt, " like this", " no")
    # a completion that itself contains an assistant turn: the split is at the shared one
    assert split_dialogue(prompt + " a\n\nAssistant: b", prompt + " c")[0] == prompt
    with pytest.raises(ValueError, match="share no"):
        split_dialogue("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y")


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json"])
def test_read_every_format(tmp_path, name):
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    implicit = {"chosen": "The sky is blue.", "rejected": "The sky is green."}  # left to TRL
    messages = conversational({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " yes", "rejected": " no"})
    records = [GOOD, hh, implicit]
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as out:
            out.write("".join(json.dumps(r) + "\n\n" for r in records))  # blank lines are skipped
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))  # one JSON array
    else:
        write_jsonl(path, records)
    pairs, skipped = read_pairs(path)
    assert skipped == 0
    assert pairs == [
        GOOD,
        {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"},
        implicit,
    ]
    assert read_pairs(write_jsonl(tmp_path / "m.jsonl", [messages] * 2))[0] == [messages] * 2
    assert load_preference_data(path, limit=1) == pairs[:1]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"prompt": "a", "chosen": "b"', "bad JSON"),
        (b'["a", "b"]', "expected a JSON object"),
        (b'{"prompt": "a", "chosen": "b"}', r"missing field(s) ['rejected']"),
        (b'{"prompt": "a", "chosen": 1, "rejected": "c"}', "must be a string or a list of {role, content}"),
        (b'{"prompt": "a", "chosen": [{"content": "x"}], "rejected": "c"}', "must be a string or a list"),
        (b'{"prompt": "a", "chosen": [{"role": "user", "content": "x"}], "rejected": "c"}', "mix strings"),
        (b'{"prompt": "a", "chosen": "  ", "rejected": "c"}', "empty chosen completion"),
        (b'{"prompt": "a", "chosen": "same", "rejected": "same"}', "identical"),
        (b'{"chosen": "\\n\\nHuman: x\\n\\nAssistant:", "rejected": "\\n\\nHuman: x\\n\\nAssistant: y"}',
         "empty chosen completion"),
        (b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}', "not UTF-8 (byte 16)"),
        (json.dumps(conversational({"prompt": "q", "chosen": "a", "rejected": "b"})).encode(), "one format"),
    ],
)  # fmt: skip
def test_bad_lines_name_file_and_line_or_are_skipped(tmp_path, line, message):
    good = json.dumps(GOOD).encode() + b"\n"
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, line + b"\n", good])
    with pytest.raises(DataError) as error:
        read_pairs(path)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    pairs, skipped = read_pairs(path, skip_invalid=True)
    assert (len(pairs), skipped) == (3, 1)  # one bad line (not UTF-8 included) skips that line only


def test_missing_unreadable_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no preference pairs"):
        read_pairs(write_jsonl(tmp_path / "e.jsonl", ["\n"]))
    with pytest.raises(DataError, match=r"no preference pairs found \(1 invalid\)"):
        read_pairs(write_jsonl(tmp_path / "b.jsonl", ["{\n"]), skip_invalid=True)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot be read"):
        read_pairs(tmp_path / "bad.jsonl.gz")
    (tmp_path / "bad.json").write_bytes(b"[{]")
    with pytest.raises(DataError, match="not a UTF-8 JSON array"):
        read_pairs(tmp_path / "bad.json")


def test_folders_parquet_and_saved_datasets(tmp_path, monkeypatch):
    import datasets.config
    from datasets import Dataset, DatasetDict

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail at once

    pairs = short_pairs(12)
    folder = tmp_path / "folder"
    write_jsonl(folder / "train.jsonl", pairs[:8])
    write_jsonl(folder / "test.jsonl", pairs[8:])
    (folder / "README.md").write_text("not data")
    splits = load_splits(str(folder))
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "test": 4}
    assert splits["test"][0] == pairs[8]

    parquet = tmp_path / "pairs.parquet"
    Dataset.from_list(pairs).to_parquet(str(parquet))
    assert list(load_splits(str(parquet))["train"]) == pairs
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(pairs[:5]), "dev": Dataset.from_list(pairs[5:])}).save_to_disk(
        str(saved)
    )
    assert {k: len(v) for k, v in load_splits(str(saved)).items()} == {"train": 5, "dev": 7}
    # rows of parquet / saved data sets are checked too, named by split and row
    broken = [*pairs[:3], {**pairs[3], "chosen": " "}]
    Dataset.from_list(broken).to_parquet(str(tmp_path / "broken.parquet"))
    with pytest.raises(DataError, match=r"broken.parquet \[train\] row 3: empty chosen completion"):
        load_splits(str(tmp_path / "broken.parquet"))
    assert (
        len(load_splits(str(tmp_path / "broken.parquet"), skip_invalid=True, log=lambda _: None)["train"])
        == 3
    )
    for bad, message in ((tmp_path / "x.csv", "unsupported data file"), (tmp_path / "empty", "no .json")):
        bad.mkdir() if bad.suffix == "" else bad.write_text("a,b\n")
        with pytest.raises(DataError, match=message):
            load_splits(str(bad))
    with pytest.raises(DataError, match="cannot load the data set no-such-org/no-such-data"):
        load_splits("no-such-org/no-such-data")


def test_bpe_tokenizer_has_a_chatml_template(bundled):
    tokenizer = train_bpe_tokenizer(bundled[:64], vocab_size=300)
    assert len(tokenizer) == 300
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokenizer.convert_tokens_to_ids(list(CHATML_TOKENS)) == [2, 3]
    # byte-level: any text round-trips, also characters never seen in training
    for text in (bundled[0]["chosen"], " naïve — 東京 🙂\n\ttabs"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rendered = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(chat, tokenize=False).startswith(
        rendered.removesuffix("assistant\n")
    )
    with pytest.raises(ValueError, match="260"):
        train_bpe_tokenizer(bundled[:4], vocab_size=259)


# --- the command ------------------------------------------------------------------------


def _python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_version_and_help_import_no_torch():
    """--version and train --help answer without importing torch (measured: the import alone
    takes seconds); the help is the real parser's."""
    out = _python(
        "import sys, time, io, contextlib\n"
        "from dpo_fast.app import cli\n"
        "start = time.perf_counter()\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert cli.main(['--version']) == 0 and cli.main(['train', '--help']) == 0\n"
        "print(time.perf_counter() - start, 'torch' in sys.modules)\n"
        "print(out.getvalue())"
    )
    seconds, torch_imported = out.splitlines()[0].split()
    print(f"--version and train --help: {float(seconds):.3f} s")
    assert torch_imported == "False"
    assert out.splitlines()[1].startswith("dpo-fast 0.1.0 (torch ")
    assert "usage: dpo-fast train" in out and "--learning_rate" in out and "--layout" in out


def test_help_is_the_parsers_own():
    """The saved help is the real TrlParser's for the installed TRL and transformers; after an
    upgrade the real parser answers (slowly) until `python -m dpo_fast.app.options` rewrites it."""
    real = build_parser().format_help()
    assert help_text() == real, "stale assets/train_help.txt: run python -m dpo_fast.app.options"
    for flag in (
        "--model_name_or_path",
        "--dataset_name",
        "--use_peft",
        "--lora_r",
        "--save_total_limit",
        "--resume_from_checkpoint",
        "--report_to",
        "--gradient_accumulation_steps",
        "--skip_invalid",
    ):
        assert flag in real, flag  # fmt: skip
    assert HELP_ASSET.read_text().startswith("# trl==")


def test_usage_version_and_unknown_command(capsys):
    status, out, err = run_cli(["--help"], capsys)
    assert status == 0 and "train" in out and "profile-memory" in out
    status, out, err = run_cli([], capsys)
    assert status == 2 and "usage: dpo-fast" in err
    status, out, _ = run_cli(["--version"], capsys)
    assert status == 0 and out.startswith("dpo-fast ")
    status, _, err = run_cli(["trian"], capsys)
    assert_one_line_error(status, err, "unknown command 'trian'")


def test_train_without_trl_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr("dpo_fast.app.options.trl_installed", lambda: False)
    status, _, err = run_cli(["train", "--help"], capsys)
    assert_one_line_error(status, err, "pip install 'dpo-fast[trl]'")


def test_profile_memory_is_wired_lazily(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "dpo_fast.app.profile_memory", raising=False)
    calls = []
    module = types.ModuleType("dpo_fast.app.profile_memory")
    module.main = lambda argv: calls.append(argv) or 7
    monkeypatch.setitem(sys.modules, "dpo_fast.app.profile_memory", module)
    assert cli.main(["profile-memory", "--steps", "2", "--layout", "packed"]) == 7
    assert calls == [["--steps", "2", "--layout", "packed"]]
    # a build without the module: one line, status 2
    monkeypatch.setitem(sys.modules, "dpo_fast.app.profile_memory", None)
    status, _, err = run_cli(["profile-memory"], capsys)
    assert_one_line_error(status, err, "not available in this build")


def test_out_of_memory_is_one_line_with_a_hint(monkeypatch, capsys):
    import torch

    import dpo_fast.app.train as train_module

    def out_of_memory(argv):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_module, "run", out_of_memory)
    status, _, err = run_cli(["train"], capsys)
    assert_one_line_error(status, err, "out of GPU memory: try --layout packed")
    assert "--gradient_accumulation_steps" in err and "--use_peft" in err


def test_bench_runs_the_scripts(tmp_path, monkeypatch, capfd):
    benchmarks = tmp_path / "benchmarks"
    benchmarks.mkdir()
    (benchmarks / "bench_alpha.py").write_text("import sys; print('alpha ran', sys.argv[1:])")
    (benchmarks / "bench_beta.py").write_text("print('beta ran')")
    monkeypatch.setattr(cli, "BENCHMARKS", benchmarks)
    assert cli.main(["bench", "--only", "alpha", "--", "--repeats", "1"]) == 0
    out = capfd.readouterr().out
    assert "alpha ran ['--repeats', '1']" in out and "beta ran" not in out
    monkeypatch.setattr(cli, "BENCHMARKS", tmp_path / "none")
    status, _, err = run_cli(["bench"], capfd)
    assert_one_line_error(status, err, "no benchmark scripts")
