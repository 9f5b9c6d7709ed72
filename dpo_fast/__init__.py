"""dpo_fast: fused kernels for preference-optimization training of language models."""

from .constants import LOSS_TYPES, STAT_NAMES
from .fused_linear_loss import FusedLinearPreferenceAux, FusedLinearPreferenceLoss
from .hf import ConcatenatedOutput, concatenated_forward
from .linear_logprobs import linear_sequence_logprobs, linear_token_logprobs
from .logprobs import SequenceLogprobs, TokenLogprobs, sequence_logprobs, token_logprobs
from .preference_loss import PreferenceLossOutput, PreferenceLossSpec, preference_loss
from .reference_logps import ReferenceLogps, precompute_reference_logps

__all__ = [
    "LOSS_TYPES",
    "STAT_NAMES",
    "ConcatenatedOutput",
    "FusedLinearPreferenceAux",
    "FusedLinearPreferenceLoss",
    "PreferenceLossOutput",
    "PreferenceLossSpec",
    "ReferenceLogps",
    "SequenceLogprobs",
    "TokenLogprobs",
    "concatenated_forward",
    "linear_sequence_logprobs",
    "linear_token_logprobs",
    "precompute_reference_logps",
    "preference_loss",
    "sequence_logprobs",
    "token_logprobs",
]
__version__ = "0.1.0"
