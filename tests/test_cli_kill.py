"""A real ``dpo-fast train`` process killed at random moments, again and again (issue 14).

Each round starts the CLI (resuming from the newest checkpoint when there is one), waits until
training has begun, sleeps a random time, then sends SIGKILL, SIGTERM or SIGINT. After every
kill: each ``checkpoint-N`` folder is complete and loads, and the newest complete checkpoint is
never older than before (nothing good is lost). A resume with a changed setting is refused
with one line. Every chain of kills and resumes ends with bitwise the weights of an
uninterrupted run. ``DPO_FAST_KILL_ROUNDS`` (default 6) sets the number of kills;
``DPO_FAST_KILL_SEED`` replays a run's random moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from app_helpers import CPU, ROOT, cli_process, save_tiny_qwen2, short_pairs, write_jsonl
from safetensors.torch import load_file

from dpo_fast.app.checkpoints import RUN_FILE, complete_checkpoints

ROUNDS = int(os.environ.get("DPO_FAST_KILL_ROUNDS", "6"))
STEPS = 8
MARKER = "training: layout"  # printed just before trainer.train()
SIGNALS = [signal.SIGKILL] * 3 + [signal.SIGTERM, signal.SIGINT]
# killed; stopped by our handler or the CLI's KeyboardInterrupt (128 + n); a SIGINT while Python
# shuts down, after the CLI returned, exits by the signal (-2)
STOPPED = {-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT, 128 + signal.SIGTERM}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    pairs = short_pairs(16)
    model = save_tiny_qwen2(root / "qwen2", pairs, hidden_size=16, layers=1)
    return model, write_jsonl(root / "pairs.jsonl", pairs)


def train_args(inputs, output: Path) -> list:
    model, data = inputs
    return [
        "train", "--model_name_or_path", model, "--dataset_name", data, "--output_dir", output,
        "--max_steps", STEPS, "--per_device_train_batch_size", 2, "--learning_rate", 1e-3, "--max_length", 64,
        "--save_steps", 1, "--save_total_limit", 2, "--logging_steps", 1, *CPU,
    ]  # fmt: skip


def start(args, log: Path):
    with open(log, "wb") as out:
        return cli_process(args, cwd=ROOT, stdout=out, stderr=out)


def wait_for_training(process, log: Path) -> None:
    while MARKER not in log.read_text(errors="replace"):
        assert process.poll() is None, log.read_text(errors="replace")
        time.sleep(0.02)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def newest_step(output: Path) -> int:
    found = complete_checkpoints(output)
    return int(found[-1].name.split("-")[1]) if found else 0


def check_checkpoints(output: Path) -> None:
    """Every visible checkpoint-N is complete and loads."""
    for folder in output.glob("checkpoint-*"):
        assert (folder / RUN_FILE).is_file(), f"torn checkpoint {folder}: {sorted(os.listdir(folder))}"
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["global_step"] == int(folder.name.split("-")[1])
        assert weights(folder) and torch.load(folder / "optimizer.pt", weights_only=True)


def test_random_kills_never_lose_or_corrupt_a_checkpoint(inputs, tmp_path):
    seed = int(os.environ.get("DPO_FAST_KILL_SEED") or random.SystemRandom().randrange(2**31))
    print(f"DPO_FAST_KILL_SEED={seed}")
    rng = random.Random(seed)

    reference = tmp_path / "uninterrupted"
    log = tmp_path / "reference.log"
    process = start(train_args(inputs, reference), log)
    wait_for_training(process, log)
    began = time.perf_counter()
    assert process.wait() == 0, log.read_text()
    seconds = time.perf_counter() - began  # training, saves and the final model
    expected = weights(reference)

    kills, chains, refused = 0, 0, False
    while kills < ROUNDS:
        chains += 1
        output = tmp_path / f"chain-{chains}"
        for attempt in range(4 * ROUNDS):
            step = newest_step(output)
            resume = ["--resume_from_checkpoint", "last"] if step else []
            log = tmp_path / f"chain-{chains}-{attempt}.log"
            process = start(train_args(inputs, output) + resume, log)
            wait_for_training(process, log)
            chosen = None
            if kills < ROUNDS:
                time.sleep(rng.uniform(0, seconds * (STEPS - step + 1) / STEPS))
                chosen = rng.choice(SIGNALS)
                if process.poll() is None:
                    process.send_signal(chosen)
                    kills += 1
            status = process.wait()
            text = log.read_text(errors="replace")
            check_checkpoints(output)
            assert newest_step(output) >= step, f"lost checkpoint-{step}:\n{text}"
            if status == 0:
                break
            assert status in STOPPED, f"exit status {status} after {chosen!r}:\n{text}"
            if status in (128 + signal.SIGINT, 128 + signal.SIGTERM) and "stopped at step" in text:
                stopped = int(text.split("stopped at step ")[1].split(";")[0])
                assert newest_step(output) == stopped, text  # saved where it stopped
            if not refused and newest_step(output):
                refused = True
                before = sorted(p.name for p in output.iterdir())
                log = tmp_path / "refused.log"
                changed = start(
                    [*train_args(inputs, output), "--resume_from_checkpoint", "last", "--beta", "0.2"], log
                )
                assert changed.wait() == 2
                lines = log.read_text().strip().splitlines()
                assert len(lines) == 1 and "beta differs from the run that saved it" in lines[0], lines
                assert sorted(p.name for p in output.iterdir()) == before
        else:
            pytest.fail(f"chain {chains} did not finish")
        final = weights(output)
        assert final.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(final[name], tensor), (
                f"chain {chains}: {name} differs from the uninterrupted run"
            )
    print(f"{kills} kills in {chains} chain(s), every resume matched the uninterrupted run")
