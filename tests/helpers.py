"""Input builders shared by the test files."""

import torch


def make_labels(shape, vocab_size, ignore_frac=0.25, ignore_index=-100):
    """Random labels in ``[0, vocab_size)`` with about ``ignore_frac`` of them ``ignore_index``."""
    labels = torch.randint(0, vocab_size, shape)
    labels[torch.rand(shape) < ignore_frac] = ignore_index
    return labels
