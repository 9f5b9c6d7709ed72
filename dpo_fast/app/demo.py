"""The demo ``dpo-fast train`` runs without ``--model_name_or_path``: a random Llama.

On CPU: the "tiny" Llama (0.16M parameters, a 512-token BPE learned from the data) trains 60
steps on 192 of the bundled hh-rlhf pairs in a minute or two; on a GPU the "small" one (~30M
parameters, 8k BPE) trains 300 steps on all of them. Its tokenizer has a ChatML template, so
conversational data works too. The model and tokenizer are saved to ``<output_dir>/demo-model``
and from then on the run is an ordinary TRL run from a local model folder (resume rebuilds
nothing). Its training defaults (:func:`demo_defaults`, a high learning rate above all) are
for this random model only: a user's model gets TRL's.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .pairs import train_bpe_tokenizer

DEMO_MODEL_DIR = "demo-model"
CPU_TRAIN_PAIRS = 192  # the CPU demo trains on the first pairs of the bundled train split

# Random-init Llama shapes: "tiny" trains in a minute on a laptop CPU, "small" is the GPU size.
MODEL_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
}
BPE_VOCAB = {"tiny": 512, "small": 8192}


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def demo_size() -> str:
    """The demo model's size: "small" on a machine with a GPU, else "tiny"."""
    return "small" if on_gpu() else "tiny"


def demo_defaults(bundled_data: bool) -> dict[str, Any]:
    """TRL flag defaults for the demo's random model (the config file and the command line
    override them); on the bundled data it also evaluates on the held-out split."""
    gpu = on_gpu()
    steps = 300 if gpu else 60
    evaluation = {"eval_strategy": "steps", "eval_steps": steps // 3} if bundled_data else {}
    return {
        **evaluation,
        "learning_rate": 3e-4 if gpu else 2e-3,
        "max_steps": steps,
        "per_device_train_batch_size": 32 if gpu else 16,
        "per_device_eval_batch_size": 32,
        "max_length": 512 if gpu else 160,
        "bf16": gpu,  # bf16 matmuls are slow on CPUs
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "warmup_steps": max(1, steps // 20),
        "logging_steps": 1,
        "save_steps": steps // 3,
        # the reference model is the frozen initial one: its log-probs once, before training
        "precompute_ref_log_probs": True,
        "output_dir": "dpo_fast_demo",
        "dataloader_pin_memory": gpu,
    }


def build_demo_model(folder: Path, train_pairs: Sequence[Mapping[str, Any]], size: str, seed: int) -> Path:
    """A random Llama of ``size`` and a BPE tokenizer learned from ``train_pairs``, saved to
    ``folder`` (written next to it, then renamed into place)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_bpe_tokenizer(train_pairs, vocab_size=BPE_VOCAB[size])
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **MODEL_CONFIGS[size],
    )
    model = LlamaForCausalLM(config)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder
