"""Tensor parallelism of the fused head: an lm_head weight that is a ``DTensor``.

``dpo_fast.linear_token_logprobs`` sends a ``DTensor`` weight (or hidden states) here, before
any kernel runs (the ops take plain tensors). Two layouts of the weight ``(V, H)`` on a
device mesh are supported, each mesh dimension's placement being ``Replicate()`` or
``Shard(0)``:

- **replicated** (every placement ``Replicate()``): each rank holds the whole weight and
  computes locally, on ``weight.to_local()``, with the ordinary fused head; the gradient
  comes back as a replicated ``DTensor``.
- **vocabulary-sharded** (``Shard(0)`` on one mesh dimension, torch's ``ColwiseParallel``
  for an lm_head): rank ``r`` of that dimension holds rows ``[offset_r, offset_r + V_r)``
  (``torch.chunk``'s split) and scores its shard of every token in place, in chunks of
  tokens as the fused head does (a ``(chunk, V_r)`` tile at a time, the PyTorch formulas of
  ``dpo_fast.formulas``). Per token it keeps its local max ``m_r`` and ``s_r = sum exp(z -
  m_r)`` over its shard, and the label's logit if it owns the label; then one ``MAX``
  all-reduce gives the global max ``M`` and one ``SUM`` all-reduce of
  ``s_r * exp(m_r - M)`` (stacked with the label's logit and the statistics' partial sums)
  gives ``log p_y = (z_y - M) - log S``. Collectives move O(tokens) numbers; no rank ever
  holds the full weight or a ``(tokens, V)`` tensor. Backward is local: each rank recomputes
  its tiles, writes ``g * (onehot - softmax)`` with the global log-sum-exp, and gets its own
  shard's weight and bias gradients (a ``Shard(0)`` ``DTensor``); only the hidden states'
  gradient, ``(tokens, H)``, is summed over the shard group, as torch's ``ColwiseParallel``
  does for its replicated input.

The hidden states and labels must be the same on every rank of the weight's mesh (plain
tensors, or ``DTensor`` s with ``Replicate()`` placements), as in tensor parallelism. The
number of scored tokens and a checksum of the labels are compared across the shard group
first (one 4-number all-reduce), so data that differs between ranks (e.g. an FSDP-sharded
weight read outside its module's forward, with each rank holding other data) raises instead
of mixing up the ranks' tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from .checks import check_compute_dtype, check_labels, check_linear_head, check_stats, check_transform
from .formulas import one_minus_exp, transform_derivative, transform_logits
from .logprobs import TokenLogprobs
from .ops.linear_logprobs import accumulate_fp32, chunk_rows, token_chunks, unpack_scored


def is_dtensor(*tensors: torch.Tensor | None) -> bool:
    """Whether any of ``tensors`` is a ``torch.distributed.tensor.DTensor``."""
    return any(isinstance(t, DTensor) for t in tensors)


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's rows of a vocabulary-sharded weight sit.

    ``group`` is the process group of the sharded mesh dimension, ``rank`` / ``size`` this
    rank's coordinate and the number of shards along it, ``offset`` the global index of the
    first local row, ``vocab_size`` the global ``V``.
    """

    group: dist.ProcessGroup
    rank: int
    size: int
    offset: int
    vocab_size: int


def _describe(tensor: DTensor) -> str:
    return f"placements {tuple(tensor.placements)} on a mesh of shape {tuple(tensor.device_mesh.shape)}"


def _replicated_local(name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A plain tensor as it is; a ``DTensor`` replicated over its mesh as its local tensor
    (its gradient comes back replicated)."""
    if not isinstance(tensor, DTensor):
        return tensor
    if not all(isinstance(p, Replicate) for p in tensor.placements):
        raise ValueError(
            f"{name} must be replicated on every rank of the lm_head's mesh (Replicate() placements), "
            f"got a DTensor with {_describe(tensor)}; redistribute it to Replicate() first"
        )
    return tensor.to_local()


def vocab_shard(weight: DTensor) -> VocabShard | None:
    """The vocabulary shard ``weight`` holds on this rank, None when it is replicated.

    Raises:
        ValueError: a placement other than ``Replicate()`` / ``Shard(0)``, or ``Shard(0)`` on
            more than one mesh dimension.
    """
    sharded = [dim for dim, p in enumerate(weight.placements) if not isinstance(p, Replicate)]
    if any(
        not isinstance(weight.placements[dim], Shard) or weight.placements[dim].dim != 0 for dim in sharded
    ):
        raise ValueError(
            "a DTensor lm_head weight must be Replicate() or Shard(0) (vocabulary) on each mesh dimension, "
            f"got {_describe(weight)}"
        )
    if not sharded:
        return None
    if len(sharded) > 1:
        raise ValueError(
            f"a DTensor lm_head weight may be Shard(0) on one mesh dimension only, got {_describe(weight)}"
        )
    mesh, dim = weight.device_mesh, sharded[0]
    size, rank, vocab_size = mesh.size(dim), mesh.get_local_rank(dim), weight.shape[0]
    # Shard(0) splits as torch.chunk: ceil(V / size) rows per rank, the last ranks may get fewer
    chunk = math.ceil(vocab_size / size)
    offset = min(rank * chunk, vocab_size)
    local_rows = weight.to_local().shape[0]
    if local_rows != min(chunk, vocab_size - offset):
        raise ValueError(
            f"rank {rank} of the lm_head's mesh dimension {dim} holds {local_rows} vocabulary rows, "
            f"expected {min(chunk, vocab_size - offset)} (torch.chunk's split of {vocab_size} over {size})"
        )
    return VocabShard(mesh.get_group(dim), rank, size, offset, vocab_size)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    stats: Sequence[str] = (),
    backend: str = "auto",
) -> TokenLogprobs:
    """``dpo_fast.linear_token_logprobs`` for a ``DTensor`` weight (or hidden states / bias).

    Same arguments, shapes and results as the public function (see the module doc for the
    placements). A replicated weight runs the public function on the local tensors, with
    ``backend``; a vocabulary-sharded one runs the PyTorch formulas on its shard (``backend``
    is not used) and needs ``bias``, if any, sharded like ``weight``.
    """
    # imported here: the public module imports this one for its dispatch
    from .linear_logprobs import linear_token_logprobs as local_token_logprobs

    hidden, labels = _replicated_local("hidden", hidden), _replicated_local("labels", labels)
    shard = vocab_shard(weight) if isinstance(weight, DTensor) else None
    transform = {"temperature": temperature, "softcap": softcap, "logit_scale": logit_scale}
    if shard is None:
        weight, bias = _replicated_local("weight", weight), _replicated_local("bias", bias)
        return local_token_logprobs(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, shift=shift, stats=stats,
            backend=backend, **transform,
        )  # fmt: skip
    if bias is not None and (
        not isinstance(bias, DTensor)
        or bias.device_mesh != weight.device_mesh
        or bias.placements != weight.placements
    ):
        raise ValueError(
            f"bias must be sharded like the lm_head weight ({_describe(weight)}), got "
            + (_describe(bias) if isinstance(bias, DTensor) else f"a plain {type(bias).__name__}")
        )
    check_linear_head(hidden, weight, bias)
    check_labels(labels, tuple(hidden.shape[:-1]), shard.vocab_size, ignore_index, hidden.device, "hidden")
    check_transform(temperature, softcap, logit_scale)
    stats = check_stats(stats)
    local_weight = weight.to_local()
    local_bias = None if bias is None else bias.to_local()
    compute_dtype = check_compute_dtype(hidden, local_weight, local_bias)
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    scored = labels != ignore_index
    rows, row_labels = hidden[scored], labels[scored].to(torch.int64)
    _check_replicated(row_labels, shard)
    options = {"scale": logit_scale / temperature, "softcap": softcap}
    args = (rows, local_weight, local_bias, row_labels, compute_dtype, shard, options, stats)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:3]):
        logp, *stat_values = _VocabParallelLogprobs.apply(*args)
        stat_dict = dict(zip(stats, stat_values, strict=True))
    else:
        logp, _, stat_dict = _sharded_forward(*args)
    return TokenLogprobs(
        unpack_scored(logp, scored), {name: unpack_scored(value, scored) for name, value in stat_dict.items()}
    )


def _check_replicated(labels: torch.Tensor, shard: VocabShard) -> None:
    """Raise unless every rank of the shard group scores the same number of tokens with the
    same labels (a checksum): the collectives below pair up token ``i`` across ranks."""
    n, checksum = labels.numel(), int(labels.sum()) if labels.numel() else 0
    mine = torch.tensor([n, -n, checksum, -checksum], dtype=torch.int64, device=labels.device)
    seen = mine.clone()
    dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=shard.group)
    if not torch.equal(seen, mine):
        high_n, low_n = int(seen[0]), -int(seen[1])
        raise ValueError(
            "a vocabulary-sharded lm_head needs the same hidden states and labels on every rank of its "
            f"mesh dimension; rank {shard.rank} scores {n} tokens (labels summing to {checksum}), the "
            f"group between {low_n} and {high_n} tokens with other labels. Data-parallel inputs need "
            "DDP / FSDP (whose lm_head weight is not a DTensor inside the module's forward)."
        )


def _tile(rows, weight, bias) -> torch.Tensor:
    """``rows @ weight.T + bias``: a ``(chunk, V_r)`` logits tile in the compute dtype."""
    return torch.mm(rows, weight.t()) if bias is None else torch.addmm(bias, rows, weight.t())


def _local_labels(
    labels: torch.Tensor, shard: VocabShard, local_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(owned, index)``: which labels fall in this rank's rows, and their local index (0
    where not owned, so it can be gathered)."""
    index = labels - shard.offset
    owned = (index >= 0) & (index < local_size)
    return owned, torch.where(owned, index, 0)


def _sharded_forward(rows, weight, bias, labels, compute_dtype, shard, options, stats):
    """Per-token ``logp``, global ``lse`` (fp32 ``(n,)``) and the statistics of a vocabulary-
    sharded head: local partial sums per chunk of tokens, then two all-reduces (MAX, SUM)."""
    n, local_size = rows.shape[0], weight.shape[0]
    scale, softcap = options["scale"], options["softcap"]
    owned, index = _local_labels(labels, shard, local_size)
    # per token, over this rank's shard: max, sum exp(z - max), label logit, and the statistics'
    # sums: sum exp(z - max) * z (entropy), sum exp(2 (z - max)) (log_sum_sq_probs), sum z (mean)
    local_max = torch.empty(n, device=rows.device, dtype=torch.float32)
    partial = torch.zeros(6, n, device=rows.device, dtype=torch.float32)
    top1 = torch.zeros(n, device=rows.device, dtype=torch.bool)
    with torch.autocast(rows.device.type, enabled=False):
        rows_c = rows.to(compute_dtype)
        weight_c = weight.to(compute_dtype)
        bias_c = None if bias is None else bias.to(compute_dtype)
        for start, end in token_chunks(n, chunk_rows(local_size, torch.float32, rows.device.type)):
            z = transform_logits(_tile(rows_c[start:end], weight_c, bias_c).float(), scale, softcap)
            m = z.amax(-1)
            local_max[start:end] = m
            # a shard whose logits are all -inf contributes 0 (not exp(-inf + inf) = nan)
            e = torch.exp(z - torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1))
            partial[0, start:end] = e.sum(-1)
            partial[1, start:end] = z.gather(-1, index[start:end].unsqueeze(-1)).squeeze(-1)
            if "entropy" in stats:
                partial[2, start:end] = torch.where(e > 0, e * z, 0.0).sum(-1)
            if "log_sum_sq_probs" in stats:
                partial[3, start:end] = (e * e).sum(-1)
            if "mean_logits" in stats:
                partial[4, start:end] = z.sum(-1)
            if "is_top1" in stats:
                top1[start:end] = z.argmax(-1) == index[start:end]
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=shard.group)
    shift = torch.where(torch.isfinite(global_max), global_max, 0.0)
    factor = torch.where(torch.isfinite(local_max), torch.exp(local_max - shift), 0.0)
    partial[0] *= factor
    partial[1] = torch.where(owned, partial[1], 0.0)
    partial[2] *= factor
    partial[3] *= factor * factor
    if "is_top1" in stats:
        # torch.argmax's rule over the whole vocabulary: the label is the first maximal index,
        # so its rank holds the max there and no lower rank (lower indices) reaches it
        owner = torch.div(labels, math.ceil(shard.vocab_size / shard.size), rounding_mode="floor")
        reaches_max = local_max == global_max
        partial[5] = (owned & top1 & reaches_max).float() - (reaches_max & (shard.rank < owner)).float()
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=shard.group)
    log_sum = partial[0].log()
    logp = (partial[1] - shift) - log_sum
    lse = shift + log_sum
    out = {}
    if "entropy" in stats:
        out["entropy"] = lse - partial[2] / partial[0]
    if "mean_logits" in stats:
        out["mean_logits"] = partial[4] / shard.vocab_size
    if "is_top1" in stats:
        out["is_top1"] = partial[5] == 1.0
    if "log_sum_sq_probs" in stats:
        out["log_sum_sq_probs"] = partial[3].log() - 2.0 * log_sum
    return logp, lse, {name: out[name] for name in stats}


class _VocabParallelLogprobs(torch.autograd.Function):
    """Label log-probs under a vocabulary-sharded head; differentiable w.r.t. ``rows``
    (gradient summed over the shard group) and the local ``weight`` / ``bias`` shards."""

    @staticmethod
    def forward(ctx, rows, weight, bias, labels, compute_dtype, shard, options, stats):
        logp, lse, stat_values = _sharded_forward(
            rows, weight, bias, labels, compute_dtype, shard, options, stats
        )
        ctx.save_for_backward(rows, weight, bias, labels, logp, lse)
        ctx.compute_dtype, ctx.shard, ctx.options = compute_dtype, shard, options
        ctx.mark_non_differentiable(*stat_values.values())
        return (logp, *stat_values.values())

    @staticmethod
    def backward(ctx, grad_logp, *_):
        rows, weight, bias, labels, logp, lse = ctx.saved_tensors
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype, shard, options = ctx.compute_dtype, ctx.shard, ctx.options
        scale, softcap = options["scale"], options["softcap"]
        n, local_size = rows.shape[0], weight.shape[0]
        owned, index = _local_labels(labels, shard, local_size)
        g = grad_logp.float()
        with torch.autocast(rows.device.type, enabled=False):
            rows_c = rows.to(dtype)
            weight_c = weight.to(dtype)
            bias_c = None if bias is None else bias.to(dtype)
            grad_rows = torch.empty(rows.shape, device=rows.device, dtype=dtype)
            grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
            grad_bias = torch.zeros(local_size, device=weight.device, dtype=torch.float32)
            for start, end in token_chunks(n, chunk_rows(local_size, torch.float32, rows.device.type)):
                x = _tile(rows_c[start:end], weight_c, bias_c).float()
                z = transform_logits(x, scale, softcap)
                g_c = g[start:end].unsqueeze(-1)
                grad = -g_c * torch.exp(z - lse[start:end].unsqueeze(-1))
                # the label's column: g * (1 - p_y), with 1 - p_y = -expm1(log p_y) (no cancellation)
                column = index[start:end].unsqueeze(-1)
                target = g_c * one_minus_exp(logp[start:end]).unsqueeze(-1)
                grad.scatter_(
                    -1, column, torch.where(owned[start:end].unsqueeze(-1), target, grad.gather(-1, column))
                )
                grad = (grad * transform_derivative(x, scale, softcap)).to(dtype)
                # as the unsharded head: products in the compute dtype, weight and bias sums in fp32
                if need_rows:
                    grad_rows[start:end] = grad @ weight_c
                if need_weight:
                    accumulate_fp32(grad_weight, grad.t(), rows_c[start:end])
                if need_bias:
                    grad_bias += grad.sum(0, dtype=torch.float32)
        if need_rows:
            # every rank's shard contributes to each hidden state's gradient
            dist.all_reduce(grad_rows, op=dist.ReduceOp.SUM, group=shard.group)
        grads = (
            grad_rows.to(rows.dtype) if need_rows else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
        )
        return (*grads, *([None] * 5))
