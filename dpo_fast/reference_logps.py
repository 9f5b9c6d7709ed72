"""Reference-model log-probs computed once, before training, and cached on disk.

DPO's reference model is frozen, so its chosen/rejected log-probs are a fixed function of the
data: computing them once frees the reference model's memory and its forward from every
training step. :func:`precompute_reference_logps` runs the reference model forward-only
through :func:`dpo_fast.concatenated_forward` (``grad=False``: no autograd state) and,
given a ``cache`` path, saves the result with a key of everything the values depend on
(:func:`cache_key`): the model's weights, buffers and dtypes, its configuration (which holds
e.g. ``rope_theta`` and the head's transforms) and adapter state, the collated batches
(token ids and masks: any change of data, tokenizer, truncation, collator settings or batch
size shows), the layout, the backend, device and autocast, and the library versions. A cache
whose key differs is reported, naming what changed, and recomputed: never reused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from . import registry
from .checks import check_layout, has_values
from .collate import PreferenceCollator
from .hf import concatenated_forward
from .hf.model import head_transforms, text_config, unwrap_model

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
# entries of the cache key that are SHA-256 fingerprints (named in a warning, not shown)
FINGERPRINTS = ("model weights and dtypes", "model config", "data")


class ReferenceLogps(NamedTuple):
    """Summed completion log-probs of the reference model, float32 on the CPU, ``(N,)`` each,
    in the order of the data."""

    chosen: torch.Tensor
    rejected: torch.Tensor


def _hash_tensor(digest: hashlib._Hash, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
    # raw bytes of any dtype (numpy has no bfloat16)
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's class and of the names, dtypes, shapes and values of every tensor
    its forward reads: parameters and all buffers (non-persistent ones too, such as the rotary
    embedding's ``inv_freq``, which ``rope_theta`` sets and the state dict leaves out)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        _hash_tensor(digest, name, tensor)
    return digest.hexdigest()


def config_fingerprint(model: nn.Module) -> str:
    """SHA-256 of what configures the model beyond its tensors: every field of its
    transformers config (``rope_theta``, Granite's ``logits_scaling``, soft-capping, ...), its
    attention implementation, the head transforms dpo_fast reads from it, and PEFT adapters'
    configs and state (which adapters are active, or disabled as for a reference pass)."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    parts = [
        config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config),
        repr(getattr(config, "_attn_implementation", None)),
        repr([t.describe() for t in head_transforms(text_config(base))]),
    ]
    for name, adapter in sorted((getattr(model, "peft_config", None) or {}).items()):
        fields = adapter.to_dict() if hasattr(adapter, "to_dict") else vars(adapter)
        parts.append(f"{name}={json.dumps(fields, sort_keys=True, default=repr)}")
    for name, module in model.named_modules():
        if hasattr(module, "disable_adapters") and hasattr(module, "active_adapters"):  # PEFT's tuner layers
            parts.append(f"{name}:{module.disable_adapters}:{module.active_adapters}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cache_key(model: nn.Module, layout: str, backend: str, check: bool) -> dict[str, str]:
    """Everything besides the data that the reference log-probs depend on, by the name a stale
    cache's warning gives it: fingerprints of the model's tensors and configuration, and the
    settings of the pass (whose values differ at the level of rounding, which a cache must not
    hide either)."""
    from . import __version__  # (dpo_fast/__init__.py imports this module)

    device = next(model.parameters()).device
    autocast = (
        str(torch.get_autocast_dtype(device.type)).removeprefix("torch.")
        if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)
        else "off"
    )
    return {
        "model weights and dtypes": model_fingerprint(model),
        "model config": config_fingerprint(model),
        "layout": layout,
        "backend": registry.resolve("linear_logprobs", backend, device.type),
        "device": device.type,
        "autocast": autocast,
        "self-check": "on" if check else "off",
        "library versions": (
            f"dpo_fast {__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
        ),
    }


def _batches(
    data: DataLoader | Sequence[Mapping[str, Any]],
    collate: Callable | None,
    layout: str,
    batch_size: int,
) -> Callable[[], Iterable[Mapping[str, Any]]]:
    """A function returning a fresh iterator over the collated batches, in data order."""
    if isinstance(data, DataLoader):
        if collate is not None:
            raise ValueError(
                "pass collator only with a sequence of examples; a DataLoader has its own collate_fn"
            )
        if not isinstance(data.dataset, IterableDataset) and not isinstance(data.sampler, SequentialSampler):
            raise ValueError(
                "data is a DataLoader that does not read the examples in order (shuffle=True or a custom "
                "sampler): the reference log-probs would not line up with the examples; use shuffle=False"
            )
        return lambda: iter(data)
    if not isinstance(data, Sequence) and not hasattr(data, "__getitem__"):
        raise TypeError(
            f"data must be a torch DataLoader or a sequence of examples (list, datasets.Dataset), "
            f"got {type(data).__name__}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    collate = collate if collate is not None else PreferenceCollator(layout=layout)
    return lambda: (
        collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        for start in range(0, len(data), batch_size)
    )


def data_fingerprint(batches: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 of every tensor (and int) of the collated batches, in order."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                _hash_tensor(digest, key, value)
            else:
                digest.update(f"{key}={value!r};".encode())
        digest.update(b"|")
    return digest.hexdigest()


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _stale_fields(saved: object, key: dict[str, str]) -> list[str]:
    """What differs between a loaded cache and ``key`` (the data fingerprint included)."""
    if not isinstance(saved, dict) or saved.get("format") != CACHE_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        return [f"file format {found!r} -> {CACHE_FORMAT}"]
    stale = []
    saved_key = saved.get("key", {})
    for name, value in key.items():
        before = saved_key.get(name)
        if before != value:
            stale.append(name if name in FINGERPRINTS else f"{name} {before!r} -> {value!r}")
    return stale


def _load_cache(path: Path, key: dict[str, str]) -> ReferenceLogps | None:
    """The cached result when its key equals ``key``; None (with a warning naming what
    changed) otherwise."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        stale = _stale_fields(saved, key)
    except Exception as error:  # a truncated or foreign file is as good as no cache
        stale = [f"unreadable ({type(error).__name__}: {error})"]
    if stale:
        warnings.warn(
            f"reference log-prob cache {path} is stale ({'; '.join(stale)} changed): recomputing it",
            stacklevel=3,
        )
        return None
    return ReferenceLogps(saved["chosen"], saved["rejected"])


def precompute_reference_logps(
    model: nn.Module,
    data: DataLoader | Sequence[Mapping[str, Any]],
    *,
    layout: str = "padded",
    batch_size: int = 8,
    collator: Callable | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    check: bool = True,
    backend: str = "auto",
) -> ReferenceLogps:
    """Chosen/rejected log-probs of the frozen reference ``model`` over ``data``, optionally cached.

    Args:
        model: the reference causal LM (any ``concatenated_forward`` takes), on the device to
            run on. It runs in eval mode (dropout off; its mode is restored after).
        data: a ``DataLoader`` of collated batches that reads the examples in order, or a
            sequence of examples (list, ``datasets.Dataset``) batched here by ``batch_size``
            with ``collator`` (default ``PreferenceCollator(layout=layout)``, which takes
            tokenized ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` examples).
        layout: ``"padded"``, ``"packed"`` or ``"prefix_shared"`` (the collated batches' layout).
        batch_size: pairs per forward when ``data`` is a sequence.
        collator: turns a list of examples into a batch (e.g. a ``PreferenceCollator`` with a
            tokenizer for string examples).
        cache: a file to save the result to and load it from. It is reused only when
            everything the values depend on is identical (:func:`cache_key` and the collated
            data, SHA-256 fingerprints); otherwise a warning names what changed and the result
            is recomputed and saved.
        progress: show a progress bar.
        check, backend: as :func:`dpo_fast.concatenated_forward`.

    Returns:
        :class:`ReferenceLogps` ``(chosen, rejected)``: float32 CPU tensors ``(N,)``, N pairs.
    """
    check_layout(layout)
    device = next(model.parameters()).device
    if not has_values(next(model.parameters())):
        raise ValueError(f"model's parameters are on the {device} device: load its weights first")
    batches = _batches(data, collator, layout, batch_size)
    if cache is not None:
        cache = Path(cache)
        if cache.is_dir():  # refused now, not when saving after the whole pass
            raise ValueError(f"cache must be a file path, got the directory {cache}")
        key = {**cache_key(model, layout, backend, check), "data": data_fingerprint(batches())}
        if cache.is_file():
            cached = _load_cache(cache, key)
            if cached is not None:
                logger.info("reference log-probs loaded from %s", cache)
                return cached

    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        total = -(-len(data) // batch_size) if not isinstance(data, DataLoader) else None
        for batch in tqdm(batches(), total=total, desc="reference log-probs", disable=not progress):
            out = concatenated_forward(
                model, to_device(batch, device), layout=layout, grad=False, check=check, backend=backend
            )
            chosen.append(out.chosen_logps.float().cpu())
            rejected.append(out.rejected_logps.float().cpu())
    finally:
        model.train(was_training)
    if not chosen:
        raise ValueError("data holds no examples")
    result = ReferenceLogps(torch.cat(chosen), torch.cat(rejected))

    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save(
            {"format": CACHE_FORMAT, "key": key, **result._asdict()},
            tmp,
        )
        tmp.replace(cache)  # atomic: an interrupted save never leaves a half-written cache
    return result
