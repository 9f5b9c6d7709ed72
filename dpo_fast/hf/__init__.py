"""Hugging Face causal LMs: chosen and rejected log-probs in one forward through the fused head.

``model`` finds the backbone, the head and its logit transforms; ``masks`` builds the
packed / prefix-shared attention masks; ``forward`` lowers a batch and runs it; ``check``
compares the result with the model's own logits once per model and layout.
"""

from .forward import ConcatenatedOutput, concatenated_forward

__all__ = ["ConcatenatedOutput", "concatenated_forward"]
