"""Hugging Face gradient checkpointing stays in effect on our forward paths.

transformers checkpoints a layer only in training mode with gradients enabled. Our paths
(``concatenated_forward``, and the TRL drop-in's layouts) run the backbone in whatever mode
the model is in, and the self-check's eval-mode forward restores each module's mode; a
model in train mode with dropout disabled (what TRL's DPOTrainer does) must therefore keep
fewer activations with checkpointing on, and give the same gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from test_hf_forward import random_examples

from dpo_fast import concatenated_forward
from dpo_fast.app.memory_meter import StorageMeter
from dpo_fast.collate import PreferenceCollator
from dpo_fast.integrations.trl import add_fused_lm_head

LAYOUTS = ("padded", "packed", "prefix_shared")


def trainable_llama(layers: int = 6) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=0.0,  # dropout off, as TRL's disable_dropout does
    )
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).train()


def enable_checkpointing(model: torch.nn.Module, reentrant: bool) -> None:
    # activation_checkpointing_enable in transformers >= 5.24, gradient_checkpointing_enable before
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})


def kept_and_grads(model, forward) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes the forward leaves alive for backward (its outputs included), and the gradients."""
    meter = StorageMeter()
    meter.adopt([*model.parameters(), *model.buffers()])
    with meter:
        before = meter.live
        loss = forward(model)
        kept = meter.live - before
    loss.backward()
    return kept, {name: p.grad.clone() for name, p in model.named_parameters()}


def compare(forward, reentrant: bool) -> None:
    plain = trainable_llama()
    checkpointed = copy.deepcopy(plain)
    enable_checkpointing(checkpointed, reentrant)
    kept_plain, grads_plain = kept_and_grads(plain, forward)
    # the first call on this model also runs the (eval-mode) self-check
    kept_checkpointed, grads_checkpointed = kept_and_grads(checkpointed, forward)
    assert checkpointed.training and all(m.training for m in checkpointed.modules())
    assert kept_checkpointed < 0.4 * kept_plain, (kept_checkpointed, kept_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("layout", "reentrant"),
    [("padded", False), ("packed", False), ("prefix_shared", False), ("prefix_shared", True)],
)
def test_concatenated_forward_keeps_checkpointing(layout, reentrant):
    examples = random_examples(4, prompt=(20, 40), completion=(10, 20))
    batch = PreferenceCollator(layout=layout)(examples)
    weights = torch.randn(8)

    def forward(model):
        out = concatenated_forward(model, batch, layout=layout, backend="torch")
        return (torch.cat([out.chosen_logps, out.rejected_logps]) * weights).sum()

    compare(forward, reentrant)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_trl_head_keeps_checkpointing(layout):
    """The TRL drop-in (what DPOTrainer calls: model(..., fused_lm_head=True)) in each layout,
    with TRL's default of reentrant checkpointing."""
    batch = PreferenceCollator()(random_examples(4, prompt=(20, 40), completion=(10, 20)))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)

    def forward(model):
        if not hasattr(model, "_fused"):
            add_fused_lm_head(model, layout=layout)
            model._fused = True
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=labels,
            fused_lm_head=True,
        )
        return out.log_probs.sum()

    compare(forward, reentrant=True)


def test_eval_mode_with_checkpointing_warns():
    """The bug this file guards against: a model trained in eval() keeps every activation."""
    model = trainable_llama(2).eval()
    enable_checkpointing(model, reentrant=False)
    batch = PreferenceCollator()(random_examples(2))
    with pytest.warns(
        UserWarning, match=r"gradient checkpointing is enabled on LlamaForCausalLM but inactive"
    ):
        concatenated_forward(model, batch, backend="torch")
    model.train()
    with torch.no_grad():  # no gradients: checkpointing has nothing to do, nothing to warn about
        model.eval()
        concatenated_forward(model, batch, grad=False, backend="torch")
