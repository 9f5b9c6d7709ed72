"""What the ``dpo-fast`` CLI tests share: a tiny random Qwen2 with a ChatML chat template saved
locally (no Hub), preference data files, and running the CLI in-process or as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dpo_fast.app.cli as cli
from dpo_fast.app.pairs import load_preference_data, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# flags every training test passes: fp32 on CPU, no progress bars
CPU = ["--bf16", "false", "--disable_tqdm", "true", "--report_to", "none"]


def short_pairs(count: int) -> list[dict[str, str]]:
    """``count`` bundled hh-rlhf pairs with the shortest prompts, so short ``--max_length``
    truncates completions, not prompts."""
    return sorted(load_preference_data(), key=lambda pair: len(pair["prompt"]))[:count]


def conversational(pair: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """A string pair as TRL's conversational format (the prompt's last human turn as the user)."""
    question = pair["prompt"].rsplit("\n\nHuman:", 1)[-1].removesuffix("\n\nAssistant:").strip()
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": pair["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": pair["rejected"].strip()}],
    }


def write_jsonl(path: Path, records) -> Path:
    """Records (dicts, or raw lines as ``str``/``bytes``) as a JSON Lines file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for record in records:
            if isinstance(record, bytes):
                out.write(record)
            elif isinstance(record, str):
                out.write(record.encode())
            else:
                out.write((json.dumps(record) + "\n").encode())
    return path


def save_tiny_qwen2(folder: Path, pairs, *, hidden_size: int = 32, layers: int = 2) -> Path:
    """A random Qwen2 and a byte-level BPE with a ChatML chat template, saved to ``folder``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_bpe_tokenizer(pairs, vocab_size=320)
    assert "<|im_start|>" in tokenizer.chat_template
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_cli(args, capsys) -> tuple[int, str, str]:
    """``dpo-fast ARGS`` in this process: ``(status, stdout, stderr)``."""
    status = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def cli_process(args, cwd: Path, **kwargs) -> subprocess.Popen:
    """``python -m dpo_fast.app.cli ARGS`` as a real process, this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "dpo_fast.app.cli", *map(str, args)], cwd=cwd, env=env, **kwargs
    )


def assert_one_line_error(status: int, err: str, message: str) -> None:
    """Exit status 2 and exactly one line on stderr, ``dpo-fast: error: ...message...``."""
    assert status == cli.USER_ERROR, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpo-fast: error: "), err
    assert message in lines[0], err
