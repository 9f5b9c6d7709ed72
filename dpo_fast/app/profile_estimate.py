"""``dpo-fast profile-memory --estimate``: the profiler's step on fake tensors.

The same :func:`dpo_fast.app.profile_step.dpo_step` runs under a ``FakeTensorMode``: weights,
activations and gradients have shapes, dtypes and lifetimes but no memory, and a
:class:`~dpo_fast.app.memory_meter.StorageMeter` adds up their storage. The fakes are CPU
tensors (a CPU-only PyTorch cannot make fake CUDA tensors run); for a CUDA target the few
places where the step's memory depends on the device take the CUDA branch
(:func:`cuda_emulation`). Nothing is allocated and no device is needed: Llama-3-8B at 64k
tokens estimates in seconds.

What the fakes cannot do, and how the estimate does it instead:

- lowering a packed / prefix-shared batch reads token values (which positions are scored):
  it runs on the real host batch (what a data loader does), and only its attention mask is
  built on fake tensors, so the mask is counted;
- transformers checks whether a padding mask is all ones (then sdpa runs without one) and,
  without a mask, whether ``position_ids`` restart (packed rows): the estimate reads the real
  batch and passes no mask when it is all ones, and tells transformers that the fake
  ``position_ids`` of a padded batch hold one sequence per row (they do);
- FlexAttention runs through ``torch.compile``, which does not trace under a dispatch mode:
  it is estimated as a fused attention kernel that keeps the same tensors for backward (q, k,
  v, the output and its log-sum-exp; sdpa's flash kernel), with the block mask counted;
- TRL's head on a Triton device scores only the labelled positions, picked by a boolean
  index (whose size a fake cannot know): the estimate scores every position, as TRL does on
  other devices, which overestimates its ``O(tokens x hidden)`` buffers;
- our fused head keeps its last logits tile for backward in eager mode but not on fake
  tensors (a traced graph cannot carry it, ``dpo_fast/ops/linear_logprobs.py``): the estimate
  runs eagerly, so it lets the fakes keep it too;
- a method whose code reads a value on the host fails with ``DataDependentOutputException``
  and is reported as not estimable (Liger's backward compares ``grad_output`` with 1.0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes

from ..hf import forward as hf_forward
from ..hf import plan as hf_plan
from .memory_meter import StorageMeter


@contextlib.contextmanager
def patched(target: Any, name: str, value: Any) -> Iterator[None]:
    """``target.name = value`` for the duration of the block."""
    old = getattr(target, name)
    setattr(target, name, value)
    try:
        yield
    finally:
        setattr(target, name, old)


def fake_copy(fake_mode: FakeTensorMode, value):
    """A fake tensor with ``value``'s metadata (values are not kept); other objects unchanged."""
    if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
        return fake_mode.from_tensor(value)
    return value


def fake_batch(fake_mode: FakeTensorMode, batch: dict) -> dict:
    """The batch as fake tensors; an all-ones padding mask is dropped, as transformers' sdpa
    path drops it (it reads the mask, which a fake cannot show it)."""
    out = {key: fake_copy(fake_mode, value) for key, value in batch.items()}
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        with _disable_current_modes():
            if bool(mask.all()):
                out["attention_mask"] = None
    return out


def _flex_stand_in(query, key, value, training=False, scale=None, enable_gqa=False, **kwargs):
    """FlexAttention's memory: its output, with q, k, v and the log-sum-exp kept for backward,
    as sdpa's fused kernel keeps them (the mask is applied by the block mask's tables, which
    the estimate counts separately)."""
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
    )


@contextlib.contextmanager
def fake_execution(fake_mode: FakeTensorMode, meter: StorageMeter) -> Iterator[None]:
    """Patches that let our layouts' step run on fake tensors (see the module doc)."""
    from transformers import masking_utils
    from transformers.integrations import flex_attention as hf_flex

    lower_batch = hf_forward.lower_batch
    builders = {name: getattr(hf_plan, name) for name in ("dense_attention_mask", "flex_block_mask")}

    def build_on_fakes(builder):
        def build(config, *ids, **kwargs):
            with fake_mode, meter:
                return builder(config, *(fake_copy(fake_mode, t) for t in ids), **kwargs)

        return build

    def lower(batch, layout, config, dtype):
        with _disable_current_modes():  # token values on the host, as a data loader has them
            plan = lower_batch(batch, layout, config, dtype)
        inputs = fake_batch(fake_mode, plan.inputs)
        plan.inputs = {key: value for key, value in inputs.items() if value is not None}
        for name in ("source", "labels", "sequence"):
            setattr(plan, name, fake_copy(fake_mode, getattr(plan, name)))
        return plan

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(hf_forward, "lower_batch", lower))
        for name, builder in builders.items():
            stack.enter_context(patched(hf_plan, name, build_on_fakes(builder)))
        stack.enter_context(patched(hf_plan, "flex_supports_backward", lambda device: True))
        stack.enter_context(patched(hf_flex, "compile_friendly_flex_attention", _flex_stand_in))
        # only padded batches reach transformers without a 4D mask: one sequence per row
        stack.enter_context(patched(masking_utils, "find_packed_sequence_indices", lambda position_ids: None))
        yield


class _NoLaunch:
    """A Triton kernel that writes in place: launching it allocates nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _addmm_fp32_out(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


@contextlib.contextmanager
def cuda_emulation() -> Iterator[None]:
    """The CUDA branches where memory depends on the device, taken on fake CPU tensors:
    our head's tile budget and fp32-output matmuls, TRL's Triton fold (in place, so it is not
    launched) and its fp32-output matmuls."""
    from ..ops import linear_logprobs as linear_op

    tiles = dict(linear_op.TILE_BYTES, cpu=linear_op.TILE_BYTES["cuda"])
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(linear_op, "TILE_BYTES", tiles))
        stack.enter_context(patched(linear_op, "_mm_out_dtype_supported", lambda device: True))
        try:
            from trl.kernels import chunked_logprob
        except ImportError:
            chunked_logprob = None
        if chunked_logprob is not None:
            stack.enter_context(patched(chunked_logprob, "_use_triton", lambda device: True))
            for name in ("_forward_kernel", "_backward_kernel"):
                stack.enter_context(patched(chunked_logprob, name, _NoLaunch()))
            stack.enter_context(patched(chunked_logprob, "_addmm_fp32", _addmm_fp32_out))
        yield


def not_estimable(error: BaseException) -> bool:
    """Whether ``error`` says the step read a value on the host (a fake has none)."""
    return isinstance(error, DataDependentOutputException)
