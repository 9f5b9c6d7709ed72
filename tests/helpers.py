"""Input builders and probes shared by the test files."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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
