"""Argument checks shared by every public function.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong value) with
a message naming the argument, what it got and what it expected, so bad input never
reaches a kernel as a silent wrong answer or a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch._subclasses.fake_tensor import is_fake

from .constants import BLOCK_KEYS, LAYOUTS, STAT_NAMES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def data_checks_enabled(tensor: torch.Tensor) -> bool:
    """Whether checks that read ``tensor``'s values on the host may run.

    They run eagerly on real tensors only: not while ``torch.compile`` traces, not during CUDA
    graph capture, and not on meta or fake tensors (which have no values), so every public
    function traces and runs under ``FakeTensorMode`` unchanged.
    """
    if torch.compiler.is_compiling() or tensor.is_meta or is_fake(tensor):
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def check_float_tensor(name: str, tensor: object, min_dim: int) -> None:
    """``tensor`` is a floating tensor of a supported dtype with at least ``min_dim`` dims."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got dtype {tensor.dtype}")
    if tensor.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(tensor.shape)}")


def check_labels(
    labels: object,
    expected_shape: tuple[int, ...],
    vocab_size: int,
    ignore_index: int,
    device: torch.device,
    source: str = "logits",
) -> None:
    """``labels`` is an integer tensor of ``expected_shape`` on ``device`` with values in
    ``[0, vocab_size)`` or equal to ``ignore_index``; ``source`` names the tensor whose
    leading dims the labels follow, for the messages."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(
            f"labels must have shape {tuple(expected_shape)} (the leading dims of {source}), "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but {source} is on {device}")
    if not data_checks_enabled(labels) or labels.numel() == 0:
        return
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(out_of_range.any()):
        bad = labels[out_of_range][0].item()
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}, found {bad}"
        )


def check_transform(temperature: float, softcap: float | None, logit_scale: float = 1.0) -> None:
    """``temperature`` > 0, ``softcap`` None or > 0, ``logit_scale`` finite and non-zero."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if not (logit_scale == logit_scale and abs(logit_scale) not in (0.0, float("inf"))):
        raise ValueError(f"logit_scale must be finite and non-zero, got {logit_scale}")


def check_stats(stats: Iterable[str]) -> tuple[str, ...]:
    """Normalize ``stats`` to a tuple of known statistic names."""
    if isinstance(stats, str):
        stats = (stats,)
    stats = tuple(dict.fromkeys(stats))  # each statistic once, in the caller's order
    unknown = [s for s in stats if s not in STAT_NAMES]
    if unknown:
        raise ValueError(f"stats must be names from {STAT_NAMES}, got unknown {unknown}")
    return stats


def check_segment_ids(segment_ids: object, expected_shape: tuple[int, ...], device: torch.device) -> None:
    """``segment_ids`` is an integer tensor of the labels' shape (-1 = not scored)."""
    if not isinstance(segment_ids, torch.Tensor):
        raise TypeError(f"segment_ids must be a torch.Tensor, got {type(segment_ids).__name__}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor, got dtype {segment_ids.dtype}")
    if tuple(segment_ids.shape) != tuple(expected_shape):
        raise ValueError(
            f"segment_ids must have the labels' shape {tuple(expected_shape)}, got {tuple(segment_ids.shape)}"
        )
    if segment_ids.device != device:
        raise ValueError(f"segment_ids are on {segment_ids.device} but the logits are on {device}")


def check_linear_head(hidden: object, weight: object, bias: object) -> None:
    """``hidden`` ``(..., T, H)``, ``weight`` ``(V, H)`` and ``bias`` ``(V,)`` or None: float
    tensors of matching sizes on one device (dtypes are checked by the caller, which knows
    whether autocast is on)."""
    check_float_tensor("hidden", hidden, min_dim=2)
    check_float_tensor("weight", weight, min_dim=2)
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(
            f"weight must be (vocab_size, hidden_size) with vocab_size > 0, got {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight's second dim (hidden_size): got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if bias is None:
        return
    check_float_tensor("bias", bias, min_dim=1)
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) (weight's vocab dim), got {tuple(bias.shape)}"
        )
    if bias.device != hidden.device:
        raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def check_compute_dtype(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype:
    """The dtype the lm_head's matmuls run in: the autocast dtype when autocast is on; otherwise
    ``hidden``, ``weight`` and ``bias`` must share one dtype, which is returned."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise TypeError(
                f"{name} must have hidden's dtype {hidden.dtype} (outside autocast), got {tensor.dtype}"
            )
    return hidden.dtype


def check_layout(layout: object) -> str:
    """``layout`` is one of :data:`dpo_fast.constants.LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _batch_tensor(batch: Mapping, key: str, layout: str) -> torch.Tensor:
    value = batch.get(key)
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"batch[{key!r}] must be a tensor for layout={layout!r}, got {type(value).__name__}; "
            f"batch keys: {sorted(batch)}"
        )
    if value.dtype.is_floating_point:
        raise TypeError(f"batch[{key!r}] must be an integer tensor, got dtype {value.dtype}")
    return value


def check_batch(batch: object, layout: str) -> str:
    """A preference batch for ``layout``: TRL's padded format (``input_ids``, ``attention_mask``,
    ``completion_mask`` ``[2B, T]``), or, for ``packed`` / ``prefix_shared``, a block batch of
    ``dpo_fast.collate`` (the :data:`dpo_fast.constants.BLOCK_KEYS` ``[R, L]`` and ``num_pairs``).

    Returns:
        ``"padded"`` or ``"block"``: which of the two formats ``batch`` is.
    """
    check_layout(layout)
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of tensors, got {type(batch).__name__}")
    if "sequence_ids" in batch:
        if layout == "padded":
            raise ValueError("layout='padded' got a packed/prefix-shared batch (it has 'sequence_ids')")
        _check_block_batch(batch, layout)
        return "block"
    _check_padded_batch(batch)
    return "padded"


def _check_padded_batch(batch: Mapping) -> None:
    ids = _batch_tensor(batch, "input_ids", "padded")
    if ids.dim() != 2 or ids.shape[0] % 2 or ids.shape[1] < 2:
        raise ValueError(
            f"batch['input_ids'] must be [2B, T] (B chosen rows, then B rejected rows, T >= 2), "
            f"got shape {tuple(ids.shape)}" + (" (an odd number of rows)" if ids.dim() == 2 else "")
        )
    for key in ("attention_mask", "completion_mask"):
        mask = _batch_tensor(batch, key, "padded")
        if mask.shape != ids.shape:
            raise ValueError(
                f"batch[{key!r}] must have input_ids' shape {tuple(ids.shape)}, got {tuple(mask.shape)}"
            )


def _check_block_batch(batch: Mapping, layout: str) -> None:
    ids = _batch_tensor(batch, "input_ids", layout)
    if ids.dim() != 2:
        raise ValueError(f"batch['input_ids'] must be [R, L] for layout={layout!r}, got {tuple(ids.shape)}")
    for key in BLOCK_KEYS[1:]:
        if _batch_tensor(batch, key, layout).shape != ids.shape:
            raise ValueError(
                f"batch[{key!r}] must have input_ids' shape {tuple(ids.shape)}, got {tuple(batch[key].shape)}"
            )
    num_pairs = batch.get("num_pairs")
    if isinstance(num_pairs, torch.Tensor) and num_pairs.numel() == 1:
        num_pairs = int(num_pairs)
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"batch['num_pairs'] must be a positive int (B), got {num_pairs!r}")
    sequence_ids = batch["sequence_ids"]
    if data_checks_enabled(sequence_ids) and sequence_ids.numel():
        low, high = int(sequence_ids.min()), int(sequence_ids.max())
        if low < -1 or high >= 2 * num_pairs:
            raise ValueError(
                f"batch['sequence_ids'] must be -1 (not a completion token) or in [0, 2 * num_pairs = "
                f"{2 * num_pairs}), got values in [{low}, {high}]"
            )
