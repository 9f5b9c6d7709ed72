"""Input builders and probes shared by the test files."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# A tiny decoder (tests build random models locally: nothing is downloaded); vocabulary 97,
# not a power of two.
TINY_DECODER = {
    "vocab_size": 97,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def tiny_llama(**overrides):
    """A random fp32 ``LlamaForCausalLM`` of :data:`TINY_DECODER`'s sizes, with ``overrides``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**TINY_DECODER, **overrides})).float()


def make_labels(shape, vocab_size, ignore_frac=0.25, ignore_index=-100):
    """Random labels in ``[0, vocab_size)`` with about ``ignore_frac`` of them ``ignore_index``."""
    labels = torch.randint(0, vocab_size, shape)
    labels[torch.rand(shape) < ignore_frac] = ignore_index
    return labels


class OpRecorder(TorchDispatchMode):
    """Records the names of the dpo_fast operators that run while active (``names``)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dpo_fast":
            self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))
