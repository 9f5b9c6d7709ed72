"""Argument checks shared by every public function.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (wrong value) with
a message naming the argument, what it got and what it expected, so bad input never
reaches a kernel as a silent wrong answer or a crash.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch._subclasses.fake_tensor import is_fake

from .constants import (
    BLOCK_KEYS,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    LAYOUTS,
    LOSS_TYPES,
    NEEDS_LENGTHS,
    REDUCTIONS,
    REFERENCE_FREE,
    STAT_NAMES,
)

if TYPE_CHECKING:
    from .preference_loss import PreferenceLossInputs

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# per-sequence log-probs may also be float64 (the tests' oracle runs in it)
LOGP_DTYPES = (*FLOAT_DTYPES, torch.float64)


def data_checks_enabled(tensor: torch.Tensor) -> bool:
    """Whether checks that read ``tensor``'s values on the host may run.

    They run eagerly on real tensors only: not while ``torch.compile`` traces, not during CUDA
    graph capture, and not on meta or fake tensors (which have no values), so every public
    function traces and runs under ``FakeTensorMode`` unchanged.
    """
    if torch.compiler.is_compiling() or not has_values(tensor):
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def has_values(tensor: torch.Tensor) -> bool:
    """False for meta and fake tensors, which carry a shape, a dtype and a device but no values."""
    return not (tensor.is_meta or is_fake(tensor))


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
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, torch.SymInt)):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not data_checks_enabled(labels) or labels.numel() == 0:
        return
    out_of_range = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(out_of_range.any()):
        bad = labels[out_of_range][0].item()
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}, found {bad}"
        )


def _is_real(value: object) -> bool:
    """A real number: Python's or numpy's, or a symbolic one while compiling; not a bool."""
    return isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)


def _check_real(name: str, value: object) -> None:
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def check_transform(temperature: float, softcap: float | None, logit_scale: float = 1.0) -> None:
    """``temperature`` finite and > 0, ``softcap`` None or finite and > 0, ``logit_scale`` finite
    and non-zero, and their quotient ``logit_scale / temperature`` (the kernels' scale) finite.

    Non-finite values never reach a kernel: ``softcap=inf`` would compute ``inf * tanh(z / inf)``
    = ``inf * 0`` = NaN everywhere (soft-capping off is ``softcap=None``).
    """
    _check_real("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if softcap is not None:
        _check_real("softcap", softcap)
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be None (no soft-capping) or a finite number > 0, got {softcap}")
    _check_real("logit_scale", logit_scale)
    if not (math.isfinite(logit_scale) and logit_scale != 0):
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale}")
    scale = logit_scale / temperature
    if not (math.isfinite(scale) and scale != 0):
        raise ValueError(
            f"logit_scale / temperature must be finite and non-zero (the logits are multiplied by it), "
            f"got logit_scale={logit_scale} / temperature={temperature} = {scale}"
        )


def check_stats(stats: Iterable[str]) -> tuple[str, ...]:
    """Normalize ``stats`` to a tuple of known statistic names."""
    if isinstance(stats, str):
        stats = (stats,)
    stats = tuple(dict.fromkeys(stats))  # each statistic once, in the caller's order
    unknown = [s for s in stats if s not in STAT_NAMES]
    if unknown:
        raise ValueError(f"stats must be names from {STAT_NAMES}, got unknown {unknown}")
    return stats


def check_segment_ids(
    segment_ids: object, expected_shape: tuple[int, ...], device: torch.device, num_segments: object
) -> None:
    """``segment_ids`` is an integer tensor of the labels' shape on their device (-1 = not
    scored); ``num_segments`` is None or an int >= 0."""
    if not isinstance(segment_ids, torch.Tensor):
        raise TypeError(f"segment_ids must be a torch.Tensor, got {type(segment_ids).__name__}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype.is_complex or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be an integer tensor, got dtype {segment_ids.dtype}")
    if tuple(segment_ids.shape) != tuple(expected_shape):
        raise ValueError(
            f"segment_ids must have the labels' shape {tuple(expected_shape)}, got {tuple(segment_ids.shape)}"
        )
    if segment_ids.device != device:
        raise ValueError(f"segment_ids are on {segment_ids.device} but the labels are on {device}")
    if num_segments is None:
        return
    if isinstance(num_segments, bool) or not isinstance(num_segments, (int, torch.SymInt)):
        raise TypeError(f"num_segments must be None or an int, got {type(num_segments).__name__}")
    if num_segments < 0:
        raise ValueError(f"num_segments must be None or an int >= 0, got {num_segments}")


def check_segment_values(segment_ids: torch.Tensor, scored_ids: torch.Tensor, num_segments: int) -> None:
    """Every id of ``segment_ids`` is >= -1 and every id of ``scored_ids`` (the same ids, -1 at
    unscored positions) is below ``num_segments``: an id outside ``[-1, num_segments)`` would
    drop its tokens from every sum.

    A data check: it reads two values on the host, and runs only where
    :func:`data_checks_enabled`.
    """
    if not data_checks_enabled(segment_ids) or segment_ids.numel() == 0:
        return
    lowest, highest = (int(v) for v in torch.stack((segment_ids.min(), scored_ids.max())).tolist())
    if lowest < -1:
        raise ValueError(f"segment_ids must be >= 0 (a segment) or -1 (not scored), found {lowest}")
    if highest >= num_segments:
        raise ValueError(
            f"num_segments={num_segments} is too small: segment_ids holds segment {highest} at a scored "
            f"position (ids must be < num_segments, or pass num_segments=None to count them)"
        )


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
    # meta tensors have no autocast (and torch.is_autocast_enabled("meta") raises)
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
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


def check_batch(batch: object, layout: str, vocab_size: int | None = None) -> str:
    """A preference batch for ``layout``: TRL's padded format (``input_ids``, ``attention_mask``,
    ``completion_mask`` ``[2B, T]``), or, for ``packed`` / ``prefix_shared``, a block batch of
    ``dpo_fast.collate`` (the :data:`dpo_fast.constants.BLOCK_KEYS` ``[R, L]`` and ``num_pairs``).
    With ``vocab_size``, every token id must be in ``[0, vocab_size)`` (a data check).

    Returns:
        ``"padded"`` or ``"block"``: which of the two formats ``batch`` is.
    """
    check_layout(layout)
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of tensors, got {type(batch).__name__}")
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and not torch.compiler.is_compiling() and not has_values(ids):
        # (torch.compile traces it: the lowering graph-breaks and runs on the real batch)
        raise ValueError(
            f"batch['input_ids'] is a {'meta' if ids.is_meta else 'fake'} tensor: which positions are "
            "scored depends on the batch's values, so a batch must hold real tensors"
        )
    if "sequence_ids" in batch:
        if layout == "padded":
            raise ValueError("layout='padded' got a packed/prefix-shared batch (it has 'sequence_ids')")
        _check_block_batch(batch, layout)
        kind = "block"
    else:
        _check_padded_batch(batch)
        kind = "padded"
    if vocab_size is not None:
        _check_token_ids(batch["input_ids"], vocab_size)
    return kind


def _check_padded_batch(batch: Mapping) -> None:
    ids = _batch_tensor(batch, "input_ids", "padded")
    if ids.dim() != 2 or ids.shape[0] < 2 or ids.shape[0] % 2 or ids.shape[1] < 2:
        raise ValueError(
            f"batch['input_ids'] must be [2B, T] (B >= 1 chosen rows, then B rejected rows, T >= 2), "
            f"got shape {tuple(ids.shape)}"
            + (" (an odd number of rows)" if ids.dim() == 2 and ids.shape[0] % 2 else "")
        )
    for key in ("attention_mask", "completion_mask"):
        mask = _batch_tensor(batch, key, "padded")
        if mask.shape != ids.shape:
            raise ValueError(
                f"batch[{key!r}] must have input_ids' shape {tuple(ids.shape)}, got {tuple(mask.shape)}"
            )


def _check_block_batch(batch: Mapping, layout: str) -> None:
    ids = _batch_tensor(batch, "input_ids", layout)
    if ids.dim() != 2 or ids.shape[0] == 0:
        raise ValueError(
            f"batch['input_ids'] must be [R, L] with R >= 1 for layout={layout!r}, got {tuple(ids.shape)}"
        )
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
    if not data_checks_enabled(ids) or ids.numel() == 0:
        return
    # the ranges outside which tokens would silently go unscored (sequence_ids) or the attention
    # mask be wrong (branch_ids, doc_ids); one read on the host for all three
    ranges = {
        "sequence_ids": (
            -1,
            2 * num_pairs - 1,
            f"-1 (not scored) or in [0, 2 * num_pairs = {2 * num_pairs})",
        ),
        "branch_ids": (0, 2, "0 (prompt), 1 (chosen) or 2 (rejected)"),
        "doc_ids": (-1, None, "-1 (padding) or a block index >= 0"),
    }
    bounds = torch.stack([v.to(torch.int64) for key in ranges for v in batch[key].aminmax()]).tolist()
    for (key, (lowest, highest, allowed)), low, high in zip(
        ranges.items(), bounds[0::2], bounds[1::2], strict=True
    ):
        if low < lowest or (highest is not None and high > highest):
            raise ValueError(
                f"batch[{key!r}] values must be {allowed}, found {low if low < lowest else high}"
            )


def _check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Every token id in ``[0, vocab_size)`` (padding included: it goes through the embedding)."""
    if not data_checks_enabled(ids) or ids.numel() == 0:
        return
    low, high = (int(v) for v in torch.stack(ids.aminmax()).tolist())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"batch['input_ids'] must be token ids in [0, {vocab_size}) (the model's vocabulary, padding "
            f"included), found {low if low < 0 else high}"
        )


# ----------------------------------------------------------------------------------------------
# Preference losses: the options (checked once, when a PreferenceLossSpec is built) and the
# per-call tensors.
# ----------------------------------------------------------------------------------------------


def check_loss_types(loss_type: object, loss_weights: object) -> dict[str, float]:
    """``loss_type`` (a name of :data:`LOSS_TYPES` or a list of them) and its ``loss_weights``
    (one finite number per entry, default 1 each) as ``{loss type: weight}``; a type listed
    twice gets the sum of its weights."""
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    if not isinstance(types, Sequence):
        raise TypeError(f"loss_type must be a loss name or a list of them, got {type(loss_type).__name__}")
    types = list(types)
    if not types:
        raise ValueError(f"loss_type must name at least one loss from {LOSS_TYPES}, got an empty list")
    unknown = [t for t in types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown[0]!r}; valid loss types are {LOSS_TYPES}")
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(
            f"loss_weights must have one weight per loss type ({len(types)} for {types}), got {len(weights)}"
        )
    if not all(_is_real(w) and math.isfinite(w) for w in weights):
        raise ValueError(f"loss_weights must be finite numbers, got {weights}")
    summed: dict[str, float] = {}
    for name, w in zip(types, weights, strict=True):
        summed[name] = summed.get(name, 0.0) + float(w)
    return summed


def _check_finite(name: str, value: object) -> None:
    if not (_is_real(value) and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_loss_options(
    loss_types: Collection[str],
    *,
    beta: object,
    label_smoothing: object,
    f_divergence: object,
    f_alpha: object,
    discopop_tau: object,
    simpo_gamma: object,
    reduction: object,
    bco_delta: object,
) -> None:
    """The scalar options of ``dpo_fast.preference_loss`` for the loss types ``loss_types``."""
    if not (_is_real(beta) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    eps = label_smoothing
    if not (_is_real(eps) and 0.0 <= eps <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {eps!r}")
    if "exo_pair" in loss_types and not 0.0 < eps < 1.0:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1) (the EXO paper uses 1e-3), got {eps}")
    if "robust" in loss_types and not eps < 0.5:
        raise ValueError(f"robust needs label_smoothing in [0, 0.5), got {eps}")
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {f_divergence!r}")
    unsupported = sorted(set(loss_types) - F_DIVERGENCE_LOSS_TYPES)
    if f_divergence != "reverse_kl" and unsupported:
        raise ValueError(
            f"f_divergence={f_divergence!r} is only defined for {sorted(F_DIVERGENCE_LOSS_TYPES)}; "
            f"got loss types {unsupported}"
        )
    _check_finite("f_alpha", f_alpha)
    if not (_is_real(discopop_tau) and math.isfinite(discopop_tau) and discopop_tau > 0):
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau!r}")
    _check_finite("simpo_gamma", simpo_gamma)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(bco_delta, torch.Tensor):
        raise TypeError(
            "bco_delta of a PreferenceLossSpec must be a float; pass a 0-dim tensor as "
            "preference_loss(..., bco_delta=tensor) instead"
        )
    _check_finite("bco_delta", bco_delta)


def check_reward_kind(loss_types: Collection[str]) -> str:
    """How rewards are defined for ``loss_types`` (an entry of ``REWARD_KINDS``): reference
    log-ratios (the DPO family), summed policy log-probs (``cpo``) or mean token log-probs
    (``simpo``, ``orpo``); a list must agree on one (``sft`` goes with any)."""
    kinds = set()
    for name in loss_types:
        if name in ("simpo", "orpo"):
            kinds.add("policy_mean")
        elif name == "cpo":
            kinds.add("policy_sum")
        elif name != "sft":
            kinds.add("log_ratio")
    if len(kinds) > 1:
        raise ValueError(
            f"loss types {sorted(loss_types)} define rewards differently (reference log-ratios for the DPO "
            "family, summed policy log-probs for cpo, mean token log-probs for simpo and orpo); "
            "combine only losses of one kind"
        )
    return kinds.pop() if kinds else "log_ratio"


def check_float_pairs(name: str, tensor: object, like: torch.Tensor | None) -> None:
    """A float ``(P,)`` tensor (``P >= 1``) of :data:`LOGP_DTYPES`; with ``like``, of its shape
    and device."""
    _check_logp_dtype(name, tensor)
    _check_like(name, tensor, like)


def _check_logp_dtype(name: str, tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in LOGP_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {tensor.dtype}")


def _check_like(name: str, tensor: torch.Tensor, like: torch.Tensor | None) -> None:
    if like is None:
        if tensor.dim() != 1 or tensor.shape[0] == 0:
            raise ValueError(f"{name} must have shape (P,) with P >= 1 pairs, got {tuple(tensor.shape)}")
        return
    if tensor.shape != like.shape:
        raise ValueError(
            f"{name} must have the shape of chosen_logps {tuple(like.shape)}, got {tuple(tensor.shape)}"
        )
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device} but chosen_logps is on {like.device}")


def check_token_counts(name: str, tensor: object, like: torch.Tensor) -> None:
    """``(P,)`` completion token counts like ``like``: integer or float, finite and >= 0.

    The values are read on the host (one synchronization on CUDA) where
    :func:`data_checks_enabled`; not while tracing or capturing a CUDA graph.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype == torch.bool or tensor.dtype.is_complex:
        raise TypeError(
            f"{name} must be an integer or float tensor of token counts, got dtype {tensor.dtype}"
        )
    _check_like(name, tensor, like)
    if not data_checks_enabled(tensor):
        return
    bad = ~torch.isfinite(tensor) | (tensor < 0) if tensor.is_floating_point() else tensor < 0
    if bool(bad.any()):
        raise ValueError(f"{name} must be token counts >= 0, found {tensor[bad][0].item()}")


def check_preference_inputs(x: PreferenceLossInputs, loss_types: Collection[str], rewards: str) -> None:
    """The tensors of one ``dpo_fast.preference_loss`` call (``bco_delta`` a float or a tensor,
    ``chosen_nll`` as given), for its loss types and reward kind (``PreferenceLossSpec``'s
    ``loss_type`` and ``rewards``). Messages name the arguments of ``preference_loss``."""
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = x[:4]
    chosen_lengths, rejected_lengths, chosen_nll, bco_delta = x[4:]
    check_float_pairs("chosen_logps", chosen_logps, None)
    check_float_pairs("rejected_logps", rejected_logps, chosen_logps)
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_chosen_logps is not None:
        if rewards != "log_ratio":
            raise ValueError(
                f"{sorted(loss_types)} are reference-free losses: "
                "pass ref_chosen_logps=None and ref_rejected_logps=None"
            )
        check_float_pairs("ref_chosen_logps", ref_chosen_logps, chosen_logps)
        check_float_pairs("ref_rejected_logps", ref_rejected_logps, chosen_logps)
    else:
        needs_ref = sorted(set(loss_types) - REFERENCE_FREE)
        if needs_ref:
            raise ValueError(
                f"{needs_ref} need the reference log-probs: pass ref_chosen_logps and ref_rejected_logps"
            )
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is None:
        missing = sorted(set(loss_types) & NEEDS_LENGTHS)
        if missing:
            raise ValueError(
                f"{missing} need the completion token counts: pass chosen_lengths and rejected_lengths"
            )
    else:
        check_token_counts("chosen_lengths", chosen_lengths, chosen_logps)
        check_token_counts("rejected_lengths", rejected_lengths, chosen_logps)
    if chosen_nll is not None:
        if not set(loss_types) & {"orpo", "cpo"}:
            raise ValueError(f"chosen_nll is used by orpo and cpo only, got loss types {sorted(loss_types)}")
        _check_logp_dtype("chosen_nll", chosen_nll)
        if chosen_nll.shape not in ((), chosen_logps.shape):
            raise ValueError(
                f"chosen_nll must have shape () or {tuple(chosen_logps.shape)}, got {tuple(chosen_nll.shape)}"
            )
        if chosen_nll.device != chosen_logps.device:
            raise ValueError(
                f"chosen_nll is on {chosen_nll.device} but chosen_logps is on {chosen_logps.device}"
            )
    elif "orpo" in loss_types:
        raise ValueError("orpo needs chosen_nll, the NLL of the chosen completions")
    if isinstance(bco_delta, torch.Tensor):
        _check_logp_dtype("bco_delta", bco_delta)
        if bco_delta.shape != () or bco_delta.device != chosen_logps.device:
            raise ValueError(
                f"bco_delta must be a float or a 0-dim tensor on {chosen_logps.device}, "
                f"got shape {tuple(bco_delta.shape)} on {bco_delta.device}"
            )
