"""DPO in a plain PyTorch loop on dpo_fast's building blocks, no trainer.

    python examples/dpo_plain_loop.py   # CPU: a random tiny Llama on 64 bundled hh-rlhf pairs

``dpo-fast train`` runs TRL's DPOTrainer with the same kernels; start from this file when you
own the training loop. Tested by ``tests/test_app_example.py``.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dpo_fast
from dpo_fast.app.pairs import load_preference_data, train_bpe_tokenizer
from dpo_fast.collate import PreferenceCollator


def train(steps: int = 40, pairs: int = 64, batch_size: int = 8, layout: str = "prefix_shared") -> list[dict]:
    """DPO on ``pairs`` bundled pairs; returns each step's loss and TRL-named metrics."""
    torch.manual_seed(0)
    data = load_preference_data(limit=pairs)  # [{"prompt", "chosen", "rejected"}] strings
    tokenizer = train_bpe_tokenizer(data, vocab_size=300)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    policy = LlamaForCausalLM(config)
    collate = PreferenceCollator(tokenizer, layout=layout, max_length=128, max_prompt_length=64)
    # the reference model is the initial policy: its log-probs once, before training
    reference = dpo_fast.precompute_reference_logps(
        policy, data, layout=layout, batch_size=batch_size, collator=collate, progress=False
    )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    policy.eval()  # dropout off, as TRL does
    history = []
    for _ in range(steps):
        index = torch.randperm(len(data))[:batch_size]
        out = dpo_fast.concatenated_forward(policy, collate([data[i] for i in index]), layout=layout)
        result = dpo_fast.preference_loss(
            out.chosen_logps,
            out.rejected_logps,
            reference.chosen[index],
            reference.rejected[index],
            loss_type="sigmoid",
            beta=0.1,
        )
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({"loss": result.loss.item(), **{k: float(v) for k, v in result.metrics.items()}})
    return history


if __name__ == "__main__":
    for step, metrics in enumerate(train(), start=1):
        if step % 5 == 0:
            print(
                f"step {step:3}: loss {metrics['loss']:.3f}, reward accuracy "
                f"{metrics['rewards/accuracies']:.2f}, margin {metrics['rewards/margins']:.3f}"
            )
