"""One DPO step per layout against the naive full-logits path, on hh-rlhf.

A step is what a DPO trainer does per batch: the policy's forward and backward and the
reference model's forward (no gradient), then the sigmoid DPO loss. Methods:

- ``naive``: TRL's classic path, ``model(input_ids, attention_mask).logits`` ->
  ``log_softmax`` -> ``gather`` -> masked sum, on the padded ``[2B, T]`` batch;
- ``padded`` / ``packed`` / ``prefix_shared``: ``dpo_fast.concatenated_forward`` with that
  layout (fused lm_head on completion tokens only; no ``[tokens, V]`` logits).

Data: the bundled hh-rlhf harmless-base test split (dialogues cut at the last shared
``"\\n\\nAssistant:"``), tokenized with a byte-level BPE learned from it (no hub download).
Model: a random tiny Llama on CPU (fp32), a Llama-3.2-1B-shaped one (vocab 128256, bf16)
on CUDA.

Reported per method: tokens the backbone runs (rows x width, padding included), tokens the
lm_head sees, real tokens, median seconds per step (methods timed round-robin: one call of
each per round, so load from other processes hits all alike), and peak memory: CUDA peak
allocation above the models' own, or on CPU the peak resident-set growth of a fresh worker
process running one step (``VmHWM`` minus ``VmRSS`` before the step, Linux only).

Usage: ``python benchmarks/bench_forward.py [--pairs 8] [--batches 2] [--repeats 3]``.
Writes ``benchmarks/results/bench_forward-<cpu|cuda>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

import dpo_fast
from dpo_fast.app.pairs import BUNDLED_DATA, load_preference_data, train_bpe_tokenizer
from dpo_fast.collate import PreferenceCollator

try:
    from common import median, print_table, synchronize, write_results
except ImportError:  # run as a module: python -m benchmarks.bench_forward
    from .common import median, print_table, synchronize, write_results

# the full split where this project's machines keep it; elsewhere (a lent GPU machine) the
# 512-pair subset bundled with the package
FULL_SPLIT = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
DATA = FULL_SPLIT if FULL_SPLIT.exists() else BUNDLED_DATA
METHODS = ("naive", "padded", "packed", "prefix_shared")
CPU_MODEL = {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4}
CPU_MODEL |= {"num_key_value_heads": 2}
LLAMA_1B = {  # meta-llama/Llama-3.2-1B's shape
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
}


def build_models(device: torch.device, vocab_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Policy and reference (an identical copy), from a fixed seed."""
    torch.manual_seed(0)
    if device.type == "cuda":
        config, dtype = transformers.LlamaConfig(**LLAMA_1B, max_position_embeddings=4096), torch.bfloat16
    else:
        config = transformers.LlamaConfig(**CPU_MODEL, vocab_size=vocab_size, max_position_embeddings=4096)
        dtype = torch.float32
    config._attn_implementation = "sdpa"
    policy = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    return policy, reference


def examples(pairs: int, batches: int, max_length: int, vocab_size: int) -> list[list[dict]]:
    """``batches`` lists of ``pairs`` tokenized hh-rlhf examples."""
    data = load_preference_data(DATA, limit=pairs * batches, skip_invalid=True)
    tokenizer = train_bpe_tokenizer(
        load_preference_data(DATA, limit=2000, skip_invalid=True), vocab_size=vocab_size
    )
    collator = PreferenceCollator(tokenizer, max_length=max_length, max_prompt_length=max_length // 2)
    tokenized = [vars(pair) for pair in collator.pairs(data)]
    return [tokenized[i * pairs : (i + 1) * pairs] for i in range(batches)]


def naive_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    logps = (logp * batch["completion_mask"][:, 1:]).sum(-1)
    return logps.chunk(2)


def step_fn(method: str, policy, reference, batches: list[dict]):
    """One DPO step over each batch; returns the chosen log-probs of the first batch."""

    def step() -> torch.Tensor:
        first = None
        for batch in batches:
            if method == "naive":
                chosen, rejected = naive_logps(policy, batch)
                with torch.no_grad():
                    ref_chosen, ref_rejected = naive_logps(reference, batch)
            else:
                out = dpo_fast.concatenated_forward(policy, batch, layout=method)
                chosen, rejected = out.chosen_logps, out.rejected_logps
                ref = dpo_fast.concatenated_forward(reference, batch, layout=method, grad=False)
                ref_chosen, ref_rejected = ref.chosen_logps, ref.rejected_logps
            dpo_fast.preference_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1).loss.backward()
            first = chosen.detach() if first is None else first
        policy.zero_grad(set_to_none=True)
        return first

    return step


def layout_batches(method: str, tokenized: list[list[dict]], device: torch.device) -> list[dict]:
    collator = PreferenceCollator(layout="padded" if method == "naive" else method)
    return [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collator(pairs).items()}
        for pairs in tokenized
    ]


def token_counts(method: str, batches: list[dict]) -> dict[str, int]:
    backbone = sum(b["input_ids"].numel() for b in batches)
    if "sequence_ids" in batches[0]:
        real = sum(int((b["doc_ids"] >= 0).sum()) for b in batches)
        head = sum(int((b["sequence_ids"] >= 0).sum()) for b in batches)
    else:
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        head = backbone if method == "naive" else sum(int(b["completion_mask"].sum()) for b in batches)
    return {"backbone_tokens": backbone, "head_tokens": head, "real_tokens": real}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # reported in kB


def worker(args: argparse.Namespace) -> None:
    """Fresh process: one step of ``args.worker``; prints the peak RSS growth in bytes.

    A one-pair step first pages in the code and kernels the step runs (libtorch's pages
    count in RSS too). Then the peak-RSS mark is reset to the current RSS (``clear_refs``
    5; ``getrusage``'s maxrss would also carry the parent's RSS over the fork), so the growth
    measured is the real step's own memory."""
    tokenized = torch.load(args.data)
    policy, reference = build_models(torch.device("cpu"), args.vocab)
    cpu = torch.device("cpu")
    step_fn(args.worker, policy, reference, layout_batches(args.worker, [tokenized[0][:1]], cpu))()
    step = step_fn(args.worker, policy, reference, layout_batches(args.worker, tokenized, cpu))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    step()
    print(json.dumps({"peak_bytes": _status_bytes("VmHWM") - before}))


def cpu_peak(method: str, data_path: Path, vocab: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, "--data", str(data_path), "--vocab", str(vocab)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def cuda_peak(step, device: torch.device) -> int:
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per batch")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=None, help="default 512 on CPU, 1024 on CUDA")
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary (the CPU model's too)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--no-cpu-memory", action="store_true", help="skip the fresh-process CPU peaks")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    max_length = args.max_length or (1024 if device.type == "cuda" else 512)
    tokenized = examples(args.pairs, args.batches, max_length, args.vocab)
    policy, reference = build_models(device, args.vocab)
    batches = {m: layout_batches(m, tokenized, device) for m in METHODS}
    steps = {m: step_fn(m, policy, reference, batches[m]) for m in METHODS}

    # every layout must give the naive path's log-probs before any timing means anything
    first = {m: steps[m]() for m in METHODS}
    agreement = {m: float((first[m] - first["naive"]).abs().max()) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:
            synchronize(device)
            start = time.perf_counter()
            steps[method]()
            synchronize(device)
            times[method].append(time.perf_counter() - start)

    if args.no_cpu_memory:
        peaks = dict.fromkeys(METHODS)
    elif device.type == "cpu":
        data_path = Path(__file__).resolve().parent / "results" / ".bench_forward_data.pt"
        data_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tokenized, data_path)
        peaks = {m: cpu_peak(m, data_path, args.vocab) for m in METHODS}
        data_path.unlink()
    else:
        peaks = {m: cuda_peak(steps[m], device) for m in METHODS}

    naive_time = median(times["naive"])
    rows = []
    for method in METHODS:
        seconds = median(times[method])
        rows.append(
            {
                "method": method,
                **token_counts(method, batches[method]),
                "seconds": seconds,
                "speedup": naive_time / seconds,
                "peak_mib": None if peaks[method] is None else peaks[method] / 2**20,
                "max_abs_diff_vs_naive": agreement[method],
                "times": times[method],
            }
        )
    columns = ["method", "backbone_tokens", "head_tokens", "real_tokens", "seconds", "speedup", "peak_mib"]
    print_table(rows, [*columns, "max_abs_diff_vs_naive"])
    config = {
        "pairs": args.pairs,
        "batches": args.batches,
        "repeats": args.repeats,
        "max_length": max_length,
        "bpe_vocab": args.vocab,
        "model": LLAMA_1B if device.type == "cuda" else {**CPU_MODEL, "vocab_size": args.vocab},
        "dtype": str(next(policy.parameters()).dtype),
        "attn_implementation": "sdpa",
        "step": "policy forward+backward, reference forward, sigmoid DPO loss; seconds for all batches",
        "peak": "CUDA max allocated above the models"
        if device.type == "cuda"
        else "RSS growth in a fresh process",
    }
    print(f"wrote {write_results('bench_forward', device, config, rows)}")


if __name__ == "__main__":
    main()
