"""dpo_fast: fused kernels for preference-optimization training of language models.

The public names are imported on first use (PEP 562), so ``import dpo_fast`` and the
``dpo-fast`` command's ``--help`` / ``--version`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "LOSS_TYPES": "constants",
    "STAT_NAMES": "constants",
    "FusedLinearPreferenceAux": "fused_linear_loss",
    "FusedLinearPreferenceLoss": "fused_linear_loss",
    "ConcatenatedOutput": "hf",
    "concatenated_forward": "hf",
    "linear_sequence_logprobs": "linear_logprobs",
    "linear_token_logprobs": "linear_logprobs",
    "SequenceLogprobs": "logprobs",
    "TokenLogprobs": "logprobs",
    "sequence_logprobs": "logprobs",
    "token_logprobs": "logprobs",
    "PreferenceLossOutput": "preference_loss",
    "PreferenceLossSpec": "preference_loss",
    "preference_loss": "preference_loss",
    "ReferenceLogps": "reference_logps",
    "precompute_reference_logps": "reference_logps",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: object) -> None:
        # Importing the submodule dpo_fast.preference_loss sets the package attribute of that
        # name to the module; the public name is the function it defines.
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
