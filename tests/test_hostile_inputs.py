"""The hostile-input table: every public function of dpo_fast against inputs meant to break it.

Each row is one hostile input and the behaviour that is correct for it: either a clear error
whose message names the argument (``TypeError`` / ``ValueError``, ``RuntimeError`` for a double
backward), or a finite result equal to the float64 formulas (``dpo_fast.formulas`` for the
log-probs, ``preference_loss``'s torch backend on float64 inputs for the losses), gradients
included. A row of a function with a ``backend`` argument runs on every backend of its op
(``triton`` under the interpreter on CPU). Shapes are tiny: the table is about behaviour.

After the rows: every loss type and f-divergence at margins of +-1e4 and +-1e6, in fp32 and
bf16, finite (loss and gradients) and equal to the float64 formulas.
"""

from __future__ import annotations

import copy
import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from helpers import TINY_DECODER, make_labels, tiny_llama
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils.data import DataLoader

import dpo_fast
from dpo_fast import registry
from dpo_fast.collate import PreferenceCollator, collate_packed
from dpo_fast.constants import F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, LOSS_TYPES, REFERENCE_FREE
from dpo_fast.formulas import dense_token_logprobs

V, T, B, H = 7, 5, 3, 4  # vocabulary, positions, rows, hidden size: tiny on purpose
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# gradients come back in the input's dtype: tolerance relative to the largest gradient entry
GRAD_TOL = {F32: 1e-5, BF16: 1e-2, F16: 2e-3}
# the linear path also rounds its logits tile (|logits| of a few units) and the logits gradient
# to the compute dtype: absolute on log-probs, relative to the largest entry on gradients
LINEAR_LOGP_TOL = {F32: 2e-5, BF16: 6e-2, F16: 8e-3}
LINEAR_GRAD_TOL = {F32: 2e-5, BF16: 2e-2, F16: 3e-3}


@dataclass(frozen=True)
class Row:
    """One hostile input. ``run(backend)`` calls the function (``backend`` is None when it has
    no backend argument) and asserts a correct result itself; with ``error`` the call must
    raise that exception with a message matching the pattern (which names the argument)."""

    id: str
    op: str | None
    run: Callable[[str | None], object]
    error: tuple[type[Exception], str] | None = None


ROWS: list[Row] = []


def row(id, op, run, error=None):
    ROWS.append(Row(id, op, run, error))


def raises(exception: type[Exception], pattern: str) -> tuple[type[Exception], str]:
    return exception, pattern


# ------------------------------------------------------------------------------ oracles ----


def assert_close(actual, expected, atol=2e-5, rtol=1e-5):
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), f"non-finite result {actual}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def assert_grad_close(grad, expected, dtype, tolerances=GRAD_TOL):
    """Relative to the largest entry, at least 1e-3 (the upstream gradients are of unit scale:
    below that, differences are rounding noise of entries that are all nearly 0)."""
    assert grad.dtype == dtype and torch.isfinite(grad).all(), f"bad gradient {grad}"
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-3)
    torch.testing.assert_close(grad.double(), expected, atol=tolerances[dtype] * scale, rtol=0)


def leaf(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().clone().requires_grad_()


def leaf64(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().double().requires_grad_()


def oracle_options(options: dict) -> dict:
    """The options that change the math (the oracle has no ``inplace_backward`` or ``stats``)."""
    return {
        k: v
        for k, v in options.items()
        if k in ("ignore_index", "shift", "temperature", "softcap", "logit_scale")
    }


def check_token(backend, logits, labels, view=lambda t: t, **options):
    """token_logprobs of ``view(logits)`` (values and the gradient w.r.t. ``logits``) against
    autograd through the float64 oracle on the same rounded inputs."""
    x, x64 = leaf(logits), leaf64(logits)
    ours = dpo_fast.token_logprobs(view(x), labels, backend=backend, **options).logps
    oracle = dense_token_logprobs(view(x64), labels.long(), **oracle_options(options))
    assert ours.dtype == F32
    assert_close(ours, oracle)
    upstream = torch.randn(oracle.shape, dtype=torch.float64)
    (ours * upstream.float()).sum().backward()
    (oracle * upstream).sum().backward()
    assert_grad_close(x.grad, x64.grad, logits.dtype)


def check_linear(backend, hidden, weight, labels, bias=None, view=lambda t: t, **options):
    """linear_token_logprobs (values, gradients of hidden, weight and bias) against float64."""
    ours_leaves, oracle_leaves = (
        [leaf(t) for t in (hidden, weight, bias)],
        [leaf64(t) for t in (hidden, weight, bias)],
    )
    h, w, b = ours_leaves
    ours = dpo_fast.linear_token_logprobs(view(h), w, labels, bias=b, backend=backend, **options).logps
    h64, w64, b64 = oracle_leaves
    logits64 = view(h64) @ w64.T + (0 if b64 is None else b64)
    oracle = dense_token_logprobs(logits64, labels.long(), **options)
    # plus the fp32 matmul's rounding, relative to the logits (not to the log-probs, their difference)
    largest = float(logits64.detach().abs().max()) if logits64.numel() else 0.0
    atol = LINEAR_LOGP_TOL[weight.dtype] + 1e-6 * largest
    assert_close(ours, oracle, atol=atol, rtol=2e-5)
    upstream = torch.randn(oracle.shape, dtype=torch.float64)
    (ours * upstream.float()).sum().backward()
    (oracle * upstream).sum().backward()
    for ours_leaf, oracle_leaf in zip(ours_leaves, oracle_leaves, strict=True):
        if ours_leaf is not None:
            assert_grad_close(ours_leaf.grad, oracle_leaf.grad, ours_leaf.dtype, LINEAR_GRAD_TOL)


def logits(*shape, dtype=F32, scale=3.0):
    return (torch.randn(*shape) * scale).to(dtype)


def labels(*shape, vocab=V, ignore_frac=0.25):
    return make_labels(shape, vocab, ignore_frac)


def double_backward(make_loss: Callable[[], tuple[torch.Tensor, torch.Tensor]]):
    """A gradient with ``create_graph=True`` (e.g. for a gradient penalty)."""
    loss, wrt = make_loss()
    (grad,) = torch.autograd.grad(loss, wrt, create_graph=True)
    grad.pow(2).sum().backward()


def on_meta(call: Callable[[torch.device, str], tuple[torch.Tensor, ...]], backend: str):
    """``call`` on meta tensors (it asserts the shapes): every output and gradient on meta."""
    outputs = call(torch.device("meta"), backend)
    assert all(t.is_meta for t in outputs)


def under_fake_mode(call: Callable[[torch.device, str], tuple[torch.Tensor, ...]], backend: str):
    """``call`` under ``FakeTensorMode`` (what torch.compile and export trace with): it asserts
    the shapes; every output and gradient is a fake tensor."""
    with FakeTensorMode():
        outputs = call(torch.device("cpu"), backend)
    assert all(isinstance(t, FakeTensor) for t in outputs)


# ------------------------------------------------------------------- token_logprobs ----

TL = dpo_fast.token_logprobs


def _tl(backend, x=None, y=None, **options):
    x = logits(B, T, V) if x is None else x
    return TL(x, labels(*x.shape[:-1]) if y is None else y, backend=backend, **options)


for id, call, error in [
    (
        "logits a list",
        lambda b: TL([[0.0, 1.0]], labels(1), backend=b),
        raises(TypeError, "logits must be a torch.Tensor"),
    ),
    (
        "int64 logits",
        lambda b: _tl(b, torch.ones(B, T, V, dtype=torch.long)),
        raises(TypeError, "logits must be float16, bfloat16 or float32, got dtype torch.int64"),
    ),
    (
        "float64 logits",
        lambda b: _tl(b, logits(B, T, V).double()),
        raises(TypeError, "logits must be float16, bfloat16 or float32"),
    ),
    ("1-D logits", lambda b: _tl(b, logits(V)), raises(ValueError, "logits must have at least 2 dims")),
    (
        "empty vocabulary",
        lambda b: _tl(b, logits(B, T, 0)),
        raises(ValueError, "logits must have a non-empty vocabulary"),
    ),
    (
        "float labels",
        lambda b: _tl(b, y=torch.zeros(B, T)),
        raises(TypeError, "labels must be an integer tensor"),
    ),
    (
        "bool labels",
        lambda b: _tl(b, y=torch.zeros(B, T, dtype=torch.bool)),
        raises(TypeError, "labels must be an integer tensor"),
    ),
    (
        "labels of another shape",
        lambda b: _tl(b, y=labels(B, T + 1)),
        raises(ValueError, r"labels must have shape \(3, 5\)"),
    ),
    (
        "labels on another device",
        lambda b: _tl(b, y=labels(B, T).to("meta")),
        raises(ValueError, "labels are on meta but logits is on cpu"),
    ),
    (
        "label == vocab_size",
        lambda b: _tl(b, y=torch.full((B, T), V)),
        raises(ValueError, r"labels must be in \[0, 7\) .* found 7"),
    ),
    (
        "label -1 (not ignore_index)",
        lambda b: _tl(b, y=torch.full((B, T), -1)),
        raises(ValueError, r"labels must be in \[0, 7\) or equal ignore_index=-100, found -1"),
    ),
    (
        "label int64 max",
        lambda b: _tl(b, y=torch.full((B, T), 2**63 - 1)),
        raises(ValueError, "labels must be in .* found 9223372036854775807"),
    ),
    (
        "ignore_index a float",
        lambda b: _tl(b, ignore_index=-100.0),
        raises(TypeError, "ignore_index must be an int, got float"),
    ),
    (
        "temperature 0",
        lambda b: _tl(b, temperature=0.0),
        raises(ValueError, "temperature must be a finite number > 0, got 0.0"),
    ),
    (
        "temperature -1",
        lambda b: _tl(b, temperature=-1),
        raises(ValueError, "temperature must be a finite number > 0"),
    ),
    (
        "temperature inf",
        lambda b: _tl(b, temperature=math.inf),
        raises(ValueError, "temperature must be a finite number > 0, got inf"),
    ),
    (
        "temperature nan",
        lambda b: _tl(b, temperature=math.nan),
        raises(ValueError, "temperature must be a finite number > 0, got nan"),
    ),
    (
        "temperature a string",
        lambda b: _tl(b, temperature="1.0"),
        raises(TypeError, "temperature must be a real number, got str"),
    ),
    (
        "temperature True",
        lambda b: _tl(b, temperature=True),
        raises(TypeError, "temperature must be a real number, got bool"),
    ),
    (
        "temperature subnormal (1/t overflows)",
        lambda b: _tl(b, temperature=1e-320),
        raises(ValueError, "logit_scale / temperature must be finite"),
    ),
    (
        "softcap inf",
        lambda b: _tl(b, softcap=math.inf),
        raises(ValueError, "softcap must be None .* or a finite number > 0, got inf"),
    ),
    ("softcap 0", lambda b: _tl(b, softcap=0.0), raises(ValueError, "softcap must be None")),
    ("softcap -2", lambda b: _tl(b, softcap=-2.0), raises(ValueError, "softcap must be None")),
    (
        "softcap nan",
        lambda b: _tl(b, softcap=math.nan),
        raises(ValueError, "softcap must be None .* got nan"),
    ),
    ("softcap a string", lambda b: _tl(b, softcap="30"), raises(TypeError, "softcap must be a real number")),
    (
        "unknown statistic",
        lambda b: _tl(b, stats=("perplexity",)),
        raises(ValueError, r"stats must be names from .* got unknown \['perplexity'\]"),
    ),
]:
    row(f"token_logprobs: {id}", "logprobs", call, error)

row(
    "token_logprobs: unknown backend",
    None,
    lambda _: _tl("cuda"),
    raises(ValueError, r"backend must be one of \('auto', 'triton', 'cpp', 'torch'\), got 'cuda'"),
)


def _triton_without_interpreter(_):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")
        _tl("triton")


row(
    "token_logprobs: backend='triton' on CPU tensors without the interpreter",
    None,
    _triton_without_interpreter,
    raises(ValueError, "backend='triton' needs CUDA tensors"),
)


def _tl_double_backward(backend):
    def make():
        x = logits(B, T, V).requires_grad_()
        return TL(x, labels(B, T), backend=backend).logps.sum(), x

    double_backward(make)


row(
    "token_logprobs: double backward (create_graph=True)",
    "logprobs",
    _tl_double_backward,
    raises(RuntimeError, "logprobs op has no double backward.*create_graph=True"),
)


def _nan_logit_poisons_its_row_only(backend, value):
    x, y = logits(B, T, V), labels(B, T, ignore_frac=0.0)
    poisoned = x.clone()
    poisoned[1, 2, (int(y[1, 2]) + 1) % V] = value  # not the label's entry
    out = TL(poisoned, y, backend=backend).logps
    expected = dense_token_logprobs(x.double(), y)
    assert not torch.isfinite(out[1, 2]), "a NaN/inf logit must show in its own row's result"
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 2] = False
    assert_close(out[keep], expected[keep])


def _minus_inf_at_the_label(backend):
    """log p = -inf exactly (the label is impossible); the gradient stays finite: onehot - softmax."""
    x, y = logits(B, T, V), labels(B, T, ignore_frac=0.0)
    x.scatter_(-1, y.unsqueeze(-1), -math.inf)
    x = x.requires_grad_()
    out = TL(x, y, backend=backend).logps
    assert bool((out == -math.inf).all())
    out.backward(torch.ones(B, T))
    expected = torch.nn.functional.one_hot(y, V).double() - torch.softmax(x.detach().double(), -1)
    assert_grad_close(x.grad, expected, F32)


def _masked_vocabulary(backend):
    """-inf logits outside the label (a masked vocabulary) are exact: probability 0, no NaN."""
    x, y = logits(B, T, V), labels(B, T, ignore_frac=0.0)
    mask = torch.rand(B, T, V) < 0.5
    mask.scatter_(-1, y.unsqueeze(-1), False)
    check_token(backend, x.masked_fill(mask, -math.inf), y)


def _all_ignored(backend):
    x = logits(B, T, V).requires_grad_()
    out = TL(x, torch.full((B, T), -100), backend=backend, stats=("entropy", "is_top1"))
    assert bool((out.logps == 0).all()) and bool((out.stats["entropy"] == 0).all())
    assert not out.stats["is_top1"].any()
    out.logps.sum().backward()
    assert bool((x.grad == 0).all())


def _shapes(backend, shape, shift, expected):
    x = logits(*shape).requires_grad_()
    out = TL(x, labels(*shape[:-1]), shift=shift, backend=backend).logps
    assert out.shape == expected and out.dtype == F32
    out.sum().backward()
    assert x.grad.shape == x.shape and bool((x.grad == 0).all())


def _ignore_index_in_vocab(backend):
    y = labels(B, T, ignore_frac=0.0)
    out = TL(logits(B, T, V), y, ignore_index=0, backend=backend).logps
    assert bool((out[y == 0] == 0).all()) and bool((out[y != 0] < 0).all())


def _inplace_on_noncontiguous(backend):
    base = logits(B, V, T)
    check_token(backend, base, labels(B, T), view=lambda t: t.transpose(1, 2), inplace_backward=True)


def _tl_meta(device, backend):
    x = torch.empty(B, T, V, device=device, requires_grad=True)
    out = TL(x, torch.empty(B, T, dtype=torch.long, device=device), stats=("entropy",), backend=backend)
    out.logps.sum().backward()
    assert out.logps.shape == (B, T) and out.stats["entropy"].shape == (B, T) and x.grad.shape == x.shape
    return out.logps, x.grad


for id, call in [
    ("int32 labels", lambda b: check_token(b, logits(B, T, V), labels(B, T).int())),
    (
        "uint8 labels",
        lambda b: check_token(b, logits(B, T, V), labels(B, T, ignore_frac=0.0).to(torch.uint8)),
    ),
    ("int16 labels with shift", lambda b: check_token(b, logits(B, T, V), labels(B, T).short(), shift=True)),
    (
        "non-contiguous logits (vocab stride 2)",
        lambda b: check_token(b, logits(B, T, 2 * V), labels(B, T), view=lambda t: t[..., ::2]),
    ),
    (
        "transposed logits",
        lambda b: check_token(b, logits(T, B, V), labels(B, T), view=lambda t: t.transpose(0, 1)),
    ),
    (
        "zero-stride logits (one row expanded)",
        lambda b: check_token(b, logits(1, 1, V), labels(B, T), view=lambda t: t.expand(B, T, V)),
    ),
    ("zero-stride labels", lambda b: check_token(b, logits(B, T, V), labels(1, T).expand(B, T))),
    ("4-D logits", lambda b: check_token(b, logits(2, B, T, V), labels(2, B, T), shift=True)),
    ("single-token sequences", lambda b: check_token(b, logits(B, 1, V), labels(B, 1, ignore_frac=0.0))),
    ("single-token sequences with shift: no positions", lambda b: _shapes(b, (B, 1, V), True, (B, 0))),
    ("empty batch", lambda b: _shapes(b, (0, T, V), False, (0, T))),
    ("no positions", lambda b: _shapes(b, (B, 0, V), True, (B, 0))),
    ("all-ignored rows: zeros, no gradient", _all_ignored),
    ("ignore_index inside the vocabulary (0)", _ignore_index_in_vocab),
    ("huge logits (+-1e30)", lambda b: check_token(b, logits(B, T, V, scale=1e30), labels(B, T))),
    ("tiny logits (1e-30): uniform", lambda b: check_token(b, logits(B, T, V, scale=1e-30), labels(B, T))),
    ("-inf outside the label (masked vocabulary)", _masked_vocabulary),
    ("-inf at the label: log p = -inf, finite gradient", _minus_inf_at_the_label),
    ("a NaN logit poisons its own row only", lambda b: _nan_logit_poisons_its_row_only(b, math.nan)),
    ("a +inf logit poisons its own row only", lambda b: _nan_logit_poisons_its_row_only(b, math.inf)),
    ("bf16 logits", lambda b: check_token(b, logits(B, T, V, dtype=BF16), labels(B, T))),
    ("fp16 logits", lambda b: check_token(b, logits(B, T, V, dtype=F16), labels(B, T))),
    (
        "fp16 logits near the fp16 max",
        lambda b: check_token(b, logits(B, T, V, scale=2e4).clamp(-6e4, 6e4).half(), labels(B, T)),
    ),
    ("bf16 logits of 1e30", lambda b: check_token(b, logits(B, T, V, dtype=BF16, scale=1e30), labels(B, T))),
    (
        "temperature 0.3 and softcap 0.5",
        lambda b: check_token(b, logits(B, T, V), labels(B, T), temperature=0.3, softcap=0.5),
    ),
    (
        "temperature 1e6 (near-uniform)",
        lambda b: check_token(b, logits(B, T, V), labels(B, T), temperature=1e6),
    ),
    (
        "temperature 1e-30 (near-one-hot)",
        lambda b: check_token(b, logits(B, T, V), labels(B, T), temperature=1e-30),
    ),
    ("softcap 1e-3", lambda b: check_token(b, logits(B, T, V), labels(B, T), softcap=1e-3)),
    ("inplace_backward on non-contiguous logits", _inplace_on_noncontiguous),
    ("meta tensors", lambda b: on_meta(_tl_meta, b)),
    ("FakeTensorMode", lambda b: under_fake_mode(_tl_meta, b)),
]:
    row(f"token_logprobs: {id}", "logprobs", call)


# ------------------------------------------------------------------ sequence_logprobs ----

SL = dpo_fast.sequence_logprobs


def _sl(backend, segment_ids=None, y=None, **options):
    y = labels(B, T) if y is None else y
    return SL(logits(B, T, V), y, segment_ids=segment_ids, backend=backend, **options)


def _segments(*rows):
    return torch.tensor(rows)


SEGMENTS = _segments([0, 0, 1, 1, 2], [0, 1, 1, 2, 2], [2, 2, 2, 0, -1])
for id, call, error in [
    (
        "num_segments -1",
        lambda b: _sl(b, SEGMENTS, num_segments=-1),
        raises(ValueError, "num_segments must be None or an int >= 0, got -1"),
    ),
    (
        "num_segments a float",
        lambda b: _sl(b, SEGMENTS, num_segments=3.0),
        raises(TypeError, "num_segments must be None or an int, got float"),
    ),
    (
        "num_segments True",
        lambda b: _sl(b, SEGMENTS, num_segments=True),
        raises(TypeError, "num_segments must be None or an int, got bool"),
    ),
    (
        "num_segments too small (would drop tokens)",
        lambda b: _sl(b, SEGMENTS, y=labels(B, T, ignore_frac=0.0), num_segments=2),
        raises(ValueError, "num_segments=2 is too small: segment_ids holds segment 2"),
    ),
    (
        "segment id -2",
        lambda b: _sl(b, _segments([0, -2, 1, 1, 2], *SEGMENTS[1:].tolist())),
        raises(ValueError, r"segment_ids must be >= 0 \(a segment\) or -1 \(not scored\), found -2"),
    ),
    (
        "float segment ids",
        lambda b: _sl(b, SEGMENTS.float()),
        raises(TypeError, "segment_ids must be an integer tensor"),
    ),
    (
        "segment ids of another shape",
        lambda b: _sl(b, SEGMENTS[:, :2]),
        raises(ValueError, r"segment_ids must have the labels' shape \(3, 5\)"),
    ),
    (
        "segment ids a list",
        lambda b: _sl(b, SEGMENTS.tolist()),
        raises(TypeError, "segment_ids must be a torch.Tensor"),
    ),
    (
        "meta segment ids without num_segments",
        lambda b: SL(
            torch.empty(B, T, V, device="meta"),
            torch.empty(B, T, dtype=torch.long, device="meta"),
            segment_ids=torch.empty(B, T, dtype=torch.long, device="meta"),
            backend=b,
        ),
        raises(ValueError, "num_segments must be given for meta or fake segment_ids"),
    ),
]:
    row(f"sequence_logprobs: {id}", "logprobs", call, error)


def check_segment_sums(backend, segment_ids, num_segments, y=None, shift=False, average=False):
    """Per-segment sums and counts against the float64 per-token oracle summed by hand."""
    x, y = logits(B, T, V), labels(B, T) if y is None else y
    out = SL(
        x,
        y,
        segment_ids=segment_ids,
        num_segments=num_segments,
        shift=shift,
        average=average,
        backend=backend,
    )
    per_token = dense_token_logprobs(x.double(), y, shift=shift)
    scored = (y[:, 1:] if shift else y) != -100
    ids = segment_ids[:, 1:] if shift else segment_ids
    S = num_segments if num_segments is not None else int(torch.where(scored, ids, -1).max()) + 1
    sums = torch.zeros(B, S, dtype=torch.float64)
    counts = torch.zeros(B, S, dtype=torch.long)
    for b, t in scored.nonzero().tolist():
        if 0 <= ids[b, t] < S:
            sums[b, ids[b, t]] += per_token[b, t]
            counts[b, ids[b, t]] += 1
    assert torch.equal(out.num_tokens, counts)
    assert_close(out.logps, sums / counts.clamp(min=1) if average else sums)


for id, call in [
    ("default num_segments", lambda b: check_segment_sums(b, SEGMENTS, None)),
    ("int32 segment ids with shift", lambda b: check_segment_sums(b, SEGMENTS.int(), 3, shift=True)),
    (
        "num_segments larger than used: zero sums, average 0 not NaN",
        lambda b: check_segment_sums(b, SEGMENTS, 6, average=True),
    ),
    (
        "a segment id beyond num_segments at an ignored position is harmless",
        lambda b: check_segment_sums(
            b,
            _segments([0, 0, 1, 1, 9], *SEGMENTS[1:].tolist()),
            3,
            y=labels(B, T).index_put_((torch.tensor([0]), torch.tensor([4])), torch.tensor(-100)),
        ),
    ),
    (
        "average over all-ignored rows: 0, not NaN",
        lambda b: check_segment_sums(b, SEGMENTS, 3, y=torch.full((B, T), -100), average=True),
    ),
    ("num_segments 0 with nothing scored", lambda b: check_segment_sums(b, torch.full((B, T), -1), 0)),
]:
    row(f"sequence_logprobs: {id}", "logprobs", call)

row(
    "sequence_logprobs: average over all-ignored rows without segments: 0, not NaN",
    "logprobs",
    lambda b: assert_close(
        SL(logits(B, T, V), torch.full((B, T), -100), average=True, backend=b).logps, torch.zeros(B)
    ),
)


# --------------------------------------------------------------- linear_token_logprobs ----

LT = dpo_fast.linear_token_logprobs


def _lt(backend, hidden=None, weight=None, y=None, **options):
    hidden = logits(B, T, H, scale=1.0) if hidden is None else hidden
    weight = logits(V, H, scale=1.0) if weight is None else weight
    return LT(hidden, weight, labels(B, T) if y is None else y, backend=backend, **options)


for id, call, error in [
    (
        "int hidden",
        lambda b: _lt(b, torch.ones(B, T, H, dtype=torch.long)),
        raises(TypeError, "hidden must be float16, bfloat16 or float32"),
    ),
    (
        "1-D weight",
        lambda b: _lt(b, weight=logits(V)),
        raises(ValueError, "weight must have at least 2 dims"),
    ),
    (
        "3-D weight",
        lambda b: _lt(b, weight=logits(2, V, H)),
        raises(ValueError, r"weight must be \(vocab_size, hidden_size\)"),
    ),
    (
        "weight with no rows",
        lambda b: _lt(b, weight=logits(0, H)),
        raises(ValueError, "weight must be .* with vocab_size > 0"),
    ),
    (
        "hidden size mismatch",
        lambda b: _lt(b, weight=logits(V, H + 1)),
        raises(ValueError, "hidden's last dim must equal weight's second dim"),
    ),
    (
        "bias of another size",
        lambda b: _lt(b, bias=logits(V + 1)),
        raises(ValueError, r"bias must have shape \(7,\)"),
    ),
    (
        "weight in another dtype",
        lambda b: _lt(b, weight=logits(V, H, dtype=BF16)),
        raises(TypeError, "weight must have hidden's dtype torch.float32 .* got torch.bfloat16"),
    ),
    (
        "weight on another device",
        lambda b: _lt(b, weight=torch.empty(V, H, device="meta")),
        raises(ValueError, "weight is on meta but hidden is on cpu"),
    ),
    (
        "label == vocab_size",
        lambda b: _lt(b, y=torch.full((B, T), V)),
        raises(ValueError, r"labels must be in \[0, 7\)"),
    ),
    (
        "labels of another shape",
        lambda b: _lt(b, y=labels(B, T - 1)),
        raises(ValueError, r"labels must have shape \(3, 5\) \(the leading dims of hidden\), got \(3, 4\)"),
    ),
    (
        "logit_scale 0",
        lambda b: _lt(b, logit_scale=0.0),
        raises(ValueError, "logit_scale must be a finite non-zero number, got 0.0"),
    ),
    (
        "logit_scale inf",
        lambda b: _lt(b, logit_scale=math.inf),
        raises(ValueError, "logit_scale must be a finite non-zero number, got inf"),
    ),
    (
        "logit_scale nan",
        lambda b: _lt(b, logit_scale=math.nan),
        raises(ValueError, "logit_scale must be a finite non-zero number, got nan"),
    ),
    (
        "logit_scale / temperature overflows",
        lambda b: _lt(b, logit_scale=1e300, temperature=1e-300),
        raises(ValueError, "logit_scale / temperature must be finite"),
    ),
    ("softcap inf", lambda b: _lt(b, softcap=math.inf), raises(ValueError, "softcap must be None")),
]:
    row(f"linear_token_logprobs: {id}", "linear_logprobs", call, error)


def _lt_double_backward(backend):
    def make():
        h = logits(B, T, H).requires_grad_()
        return LT(h, logits(V, H), labels(B, T), backend=backend).logps.sum(), h

    double_backward(make)


row(
    "linear_token_logprobs: double backward (create_graph=True)",
    "linear_logprobs",
    _lt_double_backward,
    raises(RuntimeError, "linear_logprobs op has no double backward"),
)


def _lt_all_ignored(backend):
    h, w, bias = (t.requires_grad_() for t in (logits(B, T, H), logits(V, H), logits(V)))
    out = LT(h, w, torch.full((B, T), -100), bias=bias, backend=backend).logps
    assert bool((out == 0).all())
    out.sum().backward()
    assert all(bool((t.grad == 0).all()) for t in (h, w, bias))


def _lt_autocast(backend):
    """Under CPU autocast the matmuls run in bf16: the oracle rounds the operands the same way."""
    h, w, y = logits(B, T, H, scale=1.0), logits(V, H, scale=1.0), labels(B, T)
    with torch.autocast("cpu", dtype=BF16):
        out = LT(h, w, y, backend=backend).logps
    rounded = (h.to(BF16).double() @ w.to(BF16).double().T).to(BF16).double()
    assert_close(out, dense_token_logprobs(rounded, y), atol=2e-2)


def _lt_meta(device, backend):
    h = torch.empty(B, T, H, device=device, requires_grad=True)
    w = torch.empty(V, H, device=device, requires_grad=True)
    ids = torch.empty(B, T, dtype=torch.long, device=device)
    out = dpo_fast.linear_sequence_logprobs(h, w, ids, segment_ids=ids, num_segments=2, backend=backend)
    out.logps.sum().backward()
    assert out.logps.shape == (B, 2) and h.grad.shape == h.shape and w.grad.shape == w.shape
    return out.logps, h.grad, w.grad


for id, call in [
    (
        "int32 labels, a bias and shift",
        lambda b: check_linear(
            b, logits(B, T, H), logits(V, H), labels(B, T).int(), bias=logits(V), shift=True
        ),
    ),
    (
        "non-contiguous hidden (every other position)",
        lambda b: check_linear(b, logits(B, 2 * T, H), logits(V, H), labels(B, T), view=lambda t: t[:, ::2]),
    ),
    ("transposed weight storage", lambda b: check_linear(b, logits(B, T, H), logits(H, V).T, labels(B, T))),
    (
        "zero-stride hidden (one row expanded)",
        lambda b: check_linear(
            b, logits(1, 1, H), logits(V, H), labels(B, T), view=lambda t: t.expand(B, T, H)
        ),
    ),
    (
        "single-token sequences",
        lambda b: check_linear(b, logits(B, 1, H), logits(V, H), labels(B, 1, ignore_frac=0.0)),
    ),
    ("empty batch", lambda b: check_linear(b, logits(0, T, H), logits(V, H), labels(0, T))),
    ("all-ignored rows: zeros, zero gradients", _lt_all_ignored),
    (
        "huge hidden and weight (logits ~1e30)",
        lambda b: check_linear(b, logits(B, T, H, scale=1e15), logits(V, H, scale=1e15), labels(B, T)),
    ),
    (
        "tiny hidden (1e-30)",
        lambda b: check_linear(b, logits(B, T, H, scale=1e-30), logits(V, H), labels(B, T)),
    ),
    (
        "bf16 operands",
        lambda b: check_linear(
            b, logits(B, T, H, dtype=BF16, scale=1), logits(V, H, dtype=BF16, scale=1), labels(B, T)
        ),
    ),
    (
        "fp16 operands with temperature, softcap and logit_scale",
        lambda b: check_linear(
            b,
            logits(B, T, H, dtype=F16, scale=1),
            logits(V, H, dtype=F16, scale=1),
            labels(B, T),
            temperature=0.7,
            softcap=2.0,
            logit_scale=1.5,
        ),
    ),
    ("fp32 operands under bf16 autocast", _lt_autocast),
    ("meta tensors (per-segment sums, backward)", lambda b: on_meta(_lt_meta, b)),
    ("FakeTensorMode (per-segment sums, backward)", lambda b: under_fake_mode(_lt_meta, b)),
]:
    row(f"linear_token_logprobs: {id}", "linear_logprobs", call)

row(
    "linear_sequence_logprobs: num_segments too small",
    "linear_logprobs",
    lambda b: dpo_fast.linear_sequence_logprobs(
        logits(B, T, H),
        logits(V, H),
        labels(B, T, ignore_frac=0.0),
        segment_ids=SEGMENTS,
        num_segments=1,
        backend=b,
    ),
    raises(ValueError, "num_segments=1 is too small"),
)


# ------------------------------------------------------------------- preference_loss ----

PL = dpo_fast.preference_loss
P = 4


def pairs(dtype=F32, P=P):
    c, r = -1 - 20 * torch.rand(P), -1 - 20 * torch.rand(P)
    return {
        "chosen_logps": c.to(dtype),
        "rejected_logps": r.to(dtype),
        "ref_chosen_logps": (c + torch.randn(P)).to(dtype),
        "ref_rejected_logps": (r + torch.randn(P)).to(dtype),
    }


def _pl(backend, **overrides):
    return PL(**{**pairs(), **overrides}, backend=backend)


LENGTHS = {"chosen_lengths": torch.full((P,), 5), "rejected_lengths": torch.full((P,), 3)}
REF_FREE = {"ref_chosen_logps": None, "ref_rejected_logps": None}
for id, call, error in [
    (
        "int chosen_logps",
        lambda b: _pl(b, chosen_logps=torch.zeros(P, dtype=torch.long)),
        raises(TypeError, "chosen_logps must be float16, bfloat16, float32 or float64"),
    ),
    (
        "chosen_logps a list",
        lambda b: _pl(b, chosen_logps=[0.0] * P),
        raises(TypeError, "chosen_logps must be a torch.Tensor"),
    ),
    (
        "rejected_logps of another shape",
        lambda b: _pl(b, rejected_logps=torch.zeros(P + 1)),
        raises(ValueError, r"rejected_logps must have the shape of chosen_logps \(4,\)"),
    ),
    (
        "no pairs",
        lambda b: _pl(b, **pairs(P=0)),
        raises(ValueError, r"chosen_logps must have shape \(P,\) with P >= 1"),
    ),
    (
        "2-D chosen_logps",
        lambda b: _pl(b, chosen_logps=torch.zeros(P, 1)),
        raises(ValueError, r"chosen_logps must have shape \(P,\)"),
    ),
    (
        "ref_rejected_logps on another device",
        lambda b: _pl(b, ref_rejected_logps=torch.zeros(P, device="meta")),
        raises(ValueError, "ref_rejected_logps is on meta but chosen_logps is on cpu"),
    ),
    ("beta 0", lambda b: _pl(b, beta=0.0), raises(ValueError, "beta must be a finite number > 0")),
    (
        "beta inf",
        lambda b: _pl(b, beta=math.inf),
        raises(ValueError, "beta must be a finite number > 0"),
    ),
    (
        "beta nan",
        lambda b: _pl(b, beta=math.nan),
        raises(ValueError, "beta must be a finite number > 0"),
    ),
    (
        "label_smoothing 2",
        lambda b: _pl(b, label_smoothing=2.0),
        raises(ValueError, r"label_smoothing must be in \[0, 1\], got 2.0"),
    ),
    (
        "label_smoothing nan",
        lambda b: _pl(b, label_smoothing=math.nan),
        raises(ValueError, "label_smoothing must be in"),
    ),
    (
        "unknown loss_type",
        lambda b: _pl(b, loss_type="dpo"),
        raises(ValueError, "unknown loss_type 'dpo'"),
    ),
    (
        "empty loss_type list",
        lambda b: _pl(b, loss_type=[]),
        raises(ValueError, "loss_type must name at least one loss"),
    ),
    (
        "unknown f_divergence",
        lambda b: _pl(b, f_divergence="kl"),
        raises(ValueError, "f_divergence must be one of"),
    ),
    (
        "f_divergence for a loss without one",
        lambda b: _pl(b, loss_type="nca_pair", f_divergence="forward_kl"),
        raises(ValueError, "f_divergence='forward_kl' is only defined for"),
    ),
    (
        "f_alpha inf",
        lambda b: _pl(b, f_divergence="alpha_divergence", f_alpha=math.inf),
        raises(ValueError, "f_alpha must be (a )?finite"),
    ),
    (
        "loss_weights nan",
        lambda b: _pl(b, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, math.nan]),
        raises(ValueError, "loss_weights must be finite"),
    ),
    (
        "loss_weights of another length",
        lambda b: _pl(b, loss_type=["sigmoid", "hinge"], loss_weights=[1.0]),
        raises(ValueError, "loss_weights must have one weight per loss type"),
    ),
    (
        "unknown reduction",
        lambda b: _pl(b, reduction="avg"),
        raises(ValueError, "reduction must be one of"),
    ),
    (
        "one reference only",
        lambda b: _pl(b, ref_rejected_logps=None),
        raises(ValueError, "pass both ref_chosen_logps and ref_rejected_logps"),
    ),
    (
        "no reference for sigmoid",
        lambda b: _pl(b, **REF_FREE),
        raises(ValueError, r"\['sigmoid'\] need the reference log-probs: pass ref_chosen_logps"),
    ),
    (
        "references for simpo",
        lambda b: _pl(b, loss_type="simpo", **LENGTHS),
        raises(ValueError, "reference-free losses: pass ref_chosen_logps=None"),
    ),
    (
        "no lengths for ipo",
        lambda b: _pl(b, loss_type="ipo"),
        raises(ValueError, r"\['ipo'\] need the completion token counts: pass chosen_lengths"),
    ),
    (
        "float chosen_lengths of another shape",
        lambda b: _pl(b, loss_type="ipo", chosen_lengths=torch.ones(P + 1), rejected_lengths=torch.ones(P)),
        raises(ValueError, "chosen_lengths must have the shape of chosen_logps"),
    ),
    (
        "negative chosen_lengths",
        lambda b: _pl(
            b, loss_type="ipo", chosen_lengths=torch.tensor([5, -3, 2, 1]), rejected_lengths=torch.ones(P)
        ),
        raises(ValueError, "chosen_lengths"),
    ),
    (
        "negative rejected_lengths",
        lambda b: _pl(
            b,
            loss_type="simpo",
            **REF_FREE,
            chosen_lengths=torch.ones(P),
            rejected_lengths=torch.tensor([5, -3, 2, 1]),
        ),
        raises(ValueError, "rejected_lengths"),
    ),
    (
        "orpo without chosen_nll",
        lambda b: _pl(b, loss_type="orpo", **REF_FREE, **LENGTHS),
        raises(ValueError, "orpo needs chosen_nll"),
    ),
    (
        "chosen_nll for sigmoid",
        lambda b: _pl(b, chosen_nll=torch.tensor(1.0)),
        raises(ValueError, "chosen_nll is used by orpo and cpo only"),
    ),
    (
        "chosen_nll of another shape",
        lambda b: _pl(b, loss_type="cpo", **REF_FREE, chosen_nll=torch.ones(P + 1)),
        raises(ValueError, r"chosen_nll must have shape \(\) or \(4,\)"),
    ),
    (
        "bco_delta inf",
        lambda b: _pl(b, loss_type="bco_pair", bco_delta=math.inf),
        raises(ValueError, "bco_delta must be (a )?finite"),
    ),
    (
        "bco_delta a vector",
        lambda b: _pl(b, loss_type="bco_pair", bco_delta=torch.zeros(P)),
        raises(ValueError, "bco_delta must be a float or a 0-dim tensor"),
    ),
    (
        "discopop_tau 0",
        lambda b: _pl(b, loss_type="discopop", discopop_tau=0.0),
        raises(ValueError, "discopop_tau must be > 0"),
    ),
]:
    row(f"preference_loss: {id}", "preference_loss", call, error)

row(
    "preference_loss: backend='cpp' (it has none)",
    None,
    lambda _: _pl("cpp"),
    raises(ValueError, "preference_loss has no 'cpp' backend"),
)


def check_loss(backend, kwargs, reduction="none", rtol=2e-5):
    """Loss and gradients (chosen, rejected, chosen_nll) against the float64 formulas."""
    differentiable = [
        k for k in ("chosen_logps", "rejected_logps", "chosen_nll") if kwargs.get(k) is not None
    ]
    ours_in = {k: leaf(v) if k in differentiable else v for k, v in kwargs.items()}
    ref_in = {
        k: (
            leaf64(v)
            if k in differentiable
            else v.double()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v
        )
        for k, v in kwargs.items()
    }
    ours = PL(**ours_in, reduction=reduction, backend=backend)
    ref = PL(**ref_in, reduction=reduction, backend="torch")
    atol = rtol * max(1.0, float(ref.loss.detach().abs().max()))
    assert_close(ours.loss, ref.loss, atol=atol, rtol=rtol)
    upstream = torch.randn(ref.loss.shape, dtype=torch.float64)
    (ours.loss * upstream.float()).sum().backward()
    (ref.loss * upstream).sum().backward()
    for name in differentiable:
        ours_grad, ref_grad = ours_in[name].grad, ref_in[name].grad
        ours_grad = torch.zeros_like(ours_in[name]) if ours_grad is None else ours_grad
        ref_grad = torch.zeros_like(ref_in[name]) if ref_grad is None else ref_grad
        grad_rtol = max(rtol, torch.finfo(ours_grad.dtype).eps)
        assert torch.isfinite(ours_grad).all(), f"non-finite gradient of {name}: {ours_grad}"
        scale = max(1e-30, float(ref_grad.abs().max()))
        torch.testing.assert_close(ours_grad.double(), ref_grad, atol=grad_rtol * scale, rtol=grad_rtol)


def _nan_pair_poisons_itself_only(backend):
    kwargs = pairs()
    kwargs["chosen_logps"][1] = math.nan
    out = PL(**kwargs, reduction="none", backend=backend)
    assert torch.isnan(out.loss[1]) and torch.isfinite(out.loss[[0, 2, 3]]).all()
    kwargs["chosen_logps"][1] = -3.0
    check_loss(backend, kwargs)


def _orpo(chosen, rejected=None, dtype=F32):
    chosen = torch.as_tensor(chosen, dtype=dtype)
    rejected = torch.full_like(chosen, -2.0) if rejected is None else rejected
    ones = torch.ones_like(chosen)
    return {
        "chosen_logps": chosen,
        "rejected_logps": rejected,
        "chosen_lengths": ones,
        "rejected_lengths": ones,
        "chosen_nll": torch.tensor(0.5),
        "loss_type": "orpo",
        "beta": 0.2,
    }


def _orpo_at_zero(backend):
    """chosen log-prob 0 (certain): the log-odds are +inf and the loss is its finite limit, the
    NLL; d loss / d chosen is the limit -beta * e^r / (1 - e^r)."""
    kwargs = _orpo([0.0, 0.0], rejected=torch.tensor([-2.0, -0.5]))
    c = leaf(kwargs.pop("chosen_logps"))
    out = PL(c, **kwargs, reduction="none", backend=backend)
    out.loss.sum().backward()
    r = kwargs["rejected_logps"].double()
    assert_close(out.loss, torch.full((2,), 0.5))
    assert_close(c.grad, -0.2 * r.exp() / (1 - r.exp()), rtol=1e-4)


def _pl_double_backward(backend):
    """The torch backend differentiates its formulas twice (exact Hessian of DPO's sigmoid loss);
    a kernel backend refuses create_graph=True rather than return a gradient with no graph."""
    kwargs = pairs()
    c = leaf(kwargs.pop("chosen_logps"))
    loss = PL(c, **kwargs, beta=0.5, backend=backend).loss
    (grad,) = torch.autograd.grad(loss, c, create_graph=True)
    (hessian_diagonal,) = torch.autograd.grad(grad.sum(), c)
    z = (
        0.5
        * ((c - kwargs["ref_chosen_logps"]) - (kwargs["rejected_logps"] - kwargs["ref_rejected_logps"]))
        .detach()
        .double()
    )
    assert_close(hessian_diagonal, 0.25 * torch.sigmoid(z) * torch.sigmoid(-z) / P, rtol=1e-4)


def _pl_meta(device, backend):
    c = torch.empty(P, device=device, requires_grad=True)
    others = [torch.empty(P, device=device) for _ in range(3)]
    out = PL(c, *others, backend=backend)
    out.loss.backward()
    assert out.loss.shape == () and c.grad.shape == (P,) and out.chosen_rewards.shape == (P,)
    return out.loss, c.grad


for id, call in [
    ("bf16 log-probs", lambda b: check_loss(b, pairs(BF16), rtol=1e-4)),
    ("fp16 log-probs", lambda b: check_loss(b, pairs(F16), rtol=1e-3)),
    ("one pair", lambda b: check_loss(b, pairs(P=1), reduction="mean")),
    (
        "zero-stride chosen_logps (expanded)",
        lambda b: check_loss(b, {**pairs(), "chosen_logps": torch.tensor([-3.0]).expand(P)}),
    ),
    (
        "strided log-probs",
        lambda b: check_loss(b, {k: torch.stack([v, v], 1)[:, 0] for k, v in pairs().items()}),
    ),
    (
        "zero log-ratios (policy == reference)",
        lambda b: check_loss(
            b, {**pairs(), "ref_chosen_logps": pairs()["chosen_logps"] * 0}, reduction="sum"
        ),
    ),
    (
        "chosen_nll a 0-dim tensor broadcast to the pairs (cpo)",
        lambda b: check_loss(b, {**pairs(), **REF_FREE, "loss_type": "cpo", "chosen_nll": torch.tensor(0.7)}),
    ),
    ("a NaN pair poisons itself only", _nan_pair_poisons_itself_only),
    (
        "zero lengths clamp to 1 (simpo)",
        lambda b: check_loss(
            b,
            {
                **pairs(),
                **REF_FREE,
                "loss_type": "simpo",
                "chosen_lengths": torch.zeros(P),
                "rejected_lengths": torch.arange(P),
            },
        ),
    ),
    (
        "orpo, confident chosen (log-prob -2.75e-11)",
        lambda b: check_loss(b, _orpo([-2.75e-11, -1e-6, -0.5, -3.0]), rtol=1e-4),
    ),
    ("orpo at log-prob 0: the finite limit", _orpo_at_zero),
    ("meta tensors", lambda b: on_meta(_pl_meta, b)),
    ("FakeTensorMode", lambda b: under_fake_mode(_pl_meta, b)),
]:
    row(f"preference_loss: {id}", "preference_loss", call)

row(
    "preference_loss: double backward (create_graph=True): exact on torch",
    None,
    lambda _: _pl_double_backward("torch"),
)
row(
    "preference_loss: double backward (create_graph=True) refused by the Triton kernels",
    None,
    lambda _: _pl_double_backward("triton"),
    raises(RuntimeError, "preference_loss op has no double backward"),
)


# --------------------------------------------------------- FusedLinearPreferenceLoss ----

FL = dpo_fast.FusedLinearPreferenceLoss


def head(P=2, dtype=F32):
    return {
        "lin_weight": logits(V, H, dtype=dtype, scale=1.0),
        "hidden": logits(2 * P, T, H, dtype=dtype, scale=1.0),
        "labels": labels(2 * P, T),
    }


def _fl(backend, module_options=None, **overrides):
    inputs = {**head(), "ref_chosen_logps": torch.zeros(2), "ref_rejected_logps": torch.zeros(2), **overrides}
    return FL(backend=backend, **(module_options or {}))(**inputs)


for id, call, error in [
    (
        "2-D hidden",
        lambda b: _fl(b, hidden=logits(4, H)),
        raises(ValueError, r"hidden must be \(2P, T, H\) .* got \(4, 4\)"),
    ),
    (
        "odd number of rows",
        lambda b: _fl(b, hidden=logits(3, T, H)),
        raises(
            ValueError, r"hidden must be \(2P, T, H\) with chosen rows then rejected rows, got \(3, 5, 4\)"
        ),
    ),
    ("no rows", lambda b: _fl(b, hidden=logits(0, T, H)), raises(ValueError, r"hidden must be \(2P, T, H\)")),
    (
        "labels of another shape",
        lambda b: _fl(b, labels=labels(4, T + 1)),
        raises(ValueError, "labels must have shape"),
    ),
    (
        "ref_hidden of another shape",
        lambda b: _fl(b, ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden=logits(4, T - 1, H)),
        raises(ValueError, r"ref_hidden must have the leading dims of hidden \(4, 5\)"),
    ),
    (
        "ref_weight of another vocabulary",
        lambda b: _fl(
            b,
            ref_chosen_logps=None,
            ref_rejected_logps=None,
            ref_hidden=logits(4, T, 2),
            ref_weight=logits(V - 1, 2),
        ),
        raises(ValueError, r"ref_weight must have the leading dims of lin_weight \(7,\)"),
    ),
    (
        "no reference",
        lambda b: _fl(b, ref_chosen_logps=None, ref_rejected_logps=None),
        raises(ValueError, "need reference log-probs: pass ref_hidden"),
    ),
    ("softcap inf", lambda b: _fl(b, {"softcap": math.inf}), raises(ValueError, "softcap must be None")),
    (
        "unknown loss_type",
        lambda b: _fl(b, {"loss_type": "dpo"}),
        raises(ValueError, "unknown loss_type 'dpo'"),
    ),
]:
    row(f"FusedLinearPreferenceLoss: {id}", "preference_loss", call, error)

row(
    "FusedLinearPreferenceLoss: backend='cpp' (the loss has none)",
    None,
    lambda _: FL(backend="cpp"),
    raises(ValueError, r"backend must be one of \('auto', 'triton', 'torch'\), got 'cpp'"),
)


def check_fused(backend, inputs, view=lambda t: t, **options):
    """Loss and gradients of the module against linear log-probs + preference_loss in float64."""
    names = ("lin_weight", "hidden", "bias")
    ours_in = {k: leaf(v) if k in names else v for k, v in inputs.items()}
    loss, _ = FL(backend=backend, **options)(**{**ours_in, "hidden": view(ours_in["hidden"])})
    ref_in = {k: leaf64(v) if k in names else v for k, v in inputs.items()}
    logits64 = view(ref_in["hidden"]) @ ref_in["lin_weight"].T + (
        0 if ref_in.get("bias") is None else ref_in["bias"]
    )
    per_token = dense_token_logprobs(logits64, inputs["labels"])
    sums = per_token.sum(-1)
    half = sums.shape[0] // 2
    ref_c, ref_r = (inputs[k].double() for k in ("ref_chosen_logps", "ref_rejected_logps"))
    expected = PL(sums[:half], sums[half:], ref_c, ref_r, backend="torch", beta=options.get("beta", 0.1)).loss
    assert_close(loss, expected, atol=1e-5)
    loss.backward()
    expected.backward()
    for name in names:
        if ours_in.get(name) is not None:
            assert_grad_close(ours_in[name].grad, ref_in[name].grad, ours_in[name].dtype)


def _fl_meta(device, backend):
    w = torch.empty(V, H, device=device, requires_grad=True)
    h = torch.empty(4, T, H, device=device, requires_grad=True)
    y = torch.empty(4, T, dtype=torch.long, device=device)
    loss, aux = FL(use_ref_model=False, backend=backend)(w, h, y)
    loss.backward()
    assert loss.shape == () and h.grad.shape == h.shape and aux.chosen_logps.shape == (2,)
    return loss, h.grad, w.grad


REFS = {"ref_chosen_logps": torch.tensor([-9.0, -7.0]), "ref_rejected_logps": torch.tensor([-8.0, -10.0])}
for id, call in [
    (
        "all labels ignored: finite, equal to the formulas",
        lambda b: check_fused(b, {**head(), "labels": torch.full((4, T), -100), **REFS}),
    ),
    (
        "strided hidden and a bias",
        lambda b: check_fused(
            b, {**head(), "hidden": logits(4, 2 * T, H), "bias": logits(V), **REFS}, view=lambda t: t[:, ::2]
        ),
    ),
    ("beta 1e3 (saturated sigmoid)", lambda b: check_fused(b, {**head(), **REFS}, beta=1e3)),
    ("meta tensors", lambda b: on_meta(_fl_meta, b)),
    ("FakeTensorMode", lambda b: under_fake_mode(_fl_meta, b)),
]:
    row(f"FusedLinearPreferenceLoss: {id}", "preference_loss", call)


def _fl_double_backward(backend):
    def make():
        inputs = {**head(), **REFS}
        hidden = inputs["hidden"].requires_grad_()
        return FL(backend=backend)(**inputs)[0], hidden

    double_backward(make)


row(
    "FusedLinearPreferenceLoss: double backward (create_graph=True)",
    "preference_loss",
    _fl_double_backward,
    raises(RuntimeError, "(linear_logprobs|preference_loss) op has no double backward"),
)


# ------------------------------------------------------------- concatenated_forward ----

MODEL_VOCAB = TINY_DECODER["vocab_size"]


@cache
def shared_llama():
    return tiny_llama()


EXAMPLES = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 10, 11]},
]


def batch(layout="padded", examples=EXAMPLES):
    return PreferenceCollator(layout=layout)(examples)


def _cf(backend, batch_=None, layout="padded", **options):
    return dpo_fast.concatenated_forward(
        shared_llama(), batch(layout) if batch_ is None else batch_, layout=layout, backend=backend, **options
    )


def _replace(layout, **values):
    return {**batch(layout), **values}


def _unscored_as(value):
    sequence_ids = batch("packed")["sequence_ids"]
    return sequence_ids.masked_fill(sequence_ids < 0, value)


for id, call, error in [
    (
        "unknown layout",
        lambda b: _cf(b, layout="ragged"),
        raises(ValueError, "layout must be one of .* got 'ragged'"),
    ),
    (
        "batch a list",
        lambda b: _cf(b, [batch()]),
        raises(TypeError, "batch must be a mapping of tensors, got list"),
    ),
    (
        "odd number of rows",
        lambda b: _cf(b, {k: v[:3] for k, v in batch().items()}),
        raises(ValueError, r"batch\['input_ids'\] must be \[2B, T\] .* \(an odd number of rows\)"),
    ),
    (
        "empty batch",
        lambda b: _cf(b, {k: v[:0] for k, v in batch().items()}),
        raises(ValueError, r"batch\['input_ids'\] must be \[2B, T\] \(B >= 1"),
    ),
    (
        "one position",
        lambda b: _cf(b, {k: v[:, :1] for k, v in batch().items()}),
        raises(ValueError, r"batch\['input_ids'\] must be \[2B, T\] .* T >= 2\), got shape \(4, 1\)$"),
    ),
    (
        "no completion_mask",
        lambda b: _cf(b, {k: v for k, v in batch().items() if k != "completion_mask"}),
        raises(ValueError, r"batch\['completion_mask'\] must be a tensor"),
    ),
    (
        "float attention_mask",
        lambda b: _cf(b, _replace("padded", attention_mask=batch()["attention_mask"].float())),
        raises(TypeError, r"batch\['attention_mask'\] must be an integer tensor"),
    ),
    (
        "token id >= the vocabulary",
        lambda b: _cf(
            b,
            _replace("padded", input_ids=batch()["input_ids"].index_fill(1, torch.tensor([3]), MODEL_VOCAB)),
        ),
        raises(ValueError, r"batch\['input_ids'\] must be token ids in \[0, 97\) .* found 97"),
    ),
    (
        "negative token id",
        lambda b: _cf(b, _replace("packed", input_ids=-batch("packed")["input_ids"]), layout="packed"),
        raises(ValueError, r"batch\['input_ids'\] must be token ids in \[0, 97\)"),
    ),
    (
        "meta batch",
        lambda b: _cf(b, {k: v.to("meta") for k, v in batch().items()}),
        raises(ValueError, r"batch\['input_ids'\] is a meta tensor"),
    ),
    (
        "a packed batch for layout='padded'",
        lambda b: _cf(b, batch("packed")),
        raises(ValueError, "layout='padded' got a packed/prefix-shared batch"),
    ),
    (
        "num_pairs 0",
        lambda b: _cf(b, _replace("packed", num_pairs=0), layout="packed"),
        raises(ValueError, r"batch\['num_pairs'\] must be a positive int"),
    ),
    (
        "sequence id >= 2 * num_pairs",
        lambda b: _cf(b, _replace("packed", num_pairs=1), layout="packed"),
        raises(ValueError, r"batch\['sequence_ids'\] values must be .* 2 \* num_pairs = 2\), found 3"),
    ),
    (
        "sequence id -5",
        lambda b: _cf(b, _replace("packed", sequence_ids=_unscored_as(-5)), layout="packed"),
        raises(ValueError, r"batch\['sequence_ids'\] values must be -1 \(not scored\) .* found -5"),
    ),
    (
        "branch id 3",
        lambda b: _cf(
            b,
            _replace("prefix_shared", branch_ids=batch("prefix_shared")["branch_ids"] + 1),
            layout="prefix_shared",
        ),
        raises(
            ValueError,
            r"batch\['branch_ids'\] values must be 0 \(prompt\), 1 \(chosen\) or 2 \(rejected\), found 3",
        ),
    ),
    (
        "unknown statistic",
        lambda b: _cf(b, stats=("perplexity",)),
        raises(ValueError, "stats must be names from"),
    ),
]:
    row(f"concatenated_forward: {id}", "linear_logprobs", call, error)

row(
    "concatenated_forward: a model without an output embedding",
    None,
    lambda _: dpo_fast.concatenated_forward(shared_llama().model, batch()),
    raises(ValueError, "LlamaModel has no output embedding"),
)


@cache
def model64():
    return copy.deepcopy(shared_llama()).double()


def naive_logps(examples):
    """float64: each sequence alone through the model's own logits."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for e in examples:
            ids = torch.tensor([e["prompt_ids"] + e[key]])
            with torch.no_grad():
                logp = model64()(input_ids=ids).logits[0, len(e["prompt_ids"]) - 1 : -1].log_softmax(-1)
            out.append(logp.gather(-1, torch.tensor(e[key])[:, None]).sum())
    return torch.stack(out)


def check_forward(backend, layout, examples=EXAMPLES, cast=lambda t: t):
    collated = {k: cast(v) if isinstance(v, torch.Tensor) else v for k, v in batch(layout, examples).items()}
    out = dpo_fast.concatenated_forward(shared_llama(), collated, layout=layout, backend=backend)
    assert_close(torch.cat([out.chosen_logps, out.rejected_logps]), naive_logps(examples), atol=1e-5)


def _empty_completion(backend):
    """A pair whose completion mask is all zero scores 0.0 over 0 tokens, and the other pairs are exact."""
    collated = batch()
    collated["completion_mask"][[0, 2]] = 0
    out = dpo_fast.concatenated_forward(shared_llama(), collated, backend=backend)
    assert out.chosen_tokens.tolist() == [0, 1] and out.rejected_tokens.tolist() == [0, 3]
    expected = naive_logps(EXAMPLES[1:])
    assert_close(torch.stack([out.chosen_logps[0], out.rejected_logps[0]]), torch.zeros(2))
    assert_close(torch.stack([out.chosen_logps[1], out.rejected_logps[1]]), expected)


def _cf_double_backward(backend):
    def make():
        llama = shared_llama()
        out = dpo_fast.concatenated_forward(llama, batch(), backend=backend)
        return out.chosen_logps.sum(), llama.lm_head.weight

    double_backward(make)


SINGLE_TOKENS = [{"prompt_ids": [5], "chosen_ids": [6], "rejected_ids": [7]}] * 2
for id, call in [
    ("single-token prompts and completions, padded", lambda b: check_forward(b, "padded", SINGLE_TOKENS)),
    (
        "single-token prompts and completions, prefix_shared",
        lambda b: check_forward(b, "prefix_shared", SINGLE_TOKENS),
    ),
    ("int32 batch tensors", lambda b: check_forward(b, "packed", cast=lambda t: t.int())),
    (
        "non-contiguous batch tensors",
        lambda b: check_forward(b, "padded", cast=lambda t: torch.stack([t, t], -1)[..., 0]),
    ),
    ("a completion with no scored token", _empty_completion),
]:
    row(f"concatenated_forward: {id}", "linear_logprobs", call)

row(
    "concatenated_forward: double backward (create_graph=True)",
    "linear_logprobs",
    _cf_double_backward,
    raises(RuntimeError, "linear_logprobs op has no double backward"),
)


# ----------------------------------------------------------- PreferenceCollator et al. ----

PC = PreferenceCollator
EX = EXAMPLES[0]
for id, call, error in [
    ("unknown layout", lambda _: PC(layout="ragged"), raises(ValueError, "layout must be one of")),
    (
        "max_length 0",
        lambda _: PC(max_length=0),
        raises(ValueError, "max_length must be None or a positive int, got 0"),
    ),
    (
        "max_length True",
        lambda _: PC(max_length=True),
        raises(ValueError, "max_length must be None or a positive int, got True"),
    ),
    (
        "pack_length -1",
        lambda _: PC(pack_length=-1),
        raises(ValueError, "pack_length must be None or a positive int"),
    ),
    (
        "pad_token_id -1",
        lambda _: PC(pad_token_id=-1),
        raises(ValueError, "pad_token_id must be None or a token id >= 0, got -1"),
    ),
    ("no examples", lambda _: PC()([]), raises(ValueError, "cannot collate an empty list of examples")),
    (
        "an example that is not a mapping",
        lambda _: PC()([[1, 2, 3]]),
        raises(TypeError, "an example must be a mapping, got list"),
    ),
    ("missing keys", lambda _: PC()([{"prompt_ids": [1]}]), raises(ValueError, "an example must have keys")),
    (
        "strings without a tokenizer",
        lambda _: PC()([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        raises(ValueError, "need a tokenizer"),
    ),
    (
        "an empty completion",
        lambda _: PC()([{**EX, "rejected_ids": []}]),
        raises(ValueError, "example 0: the rejected completion is empty"),
    ),
    (
        "a prompt that leaves no room",
        lambda _: PC(max_length=3)([EX]),
        raises(ValueError, "example 0: the prompt .* leaves no room .* max_length=3"),
    ),
    (
        "float token ids",
        lambda _: PC()([{**EX, "chosen_ids": [4, 5.0]}]),
        raises(TypeError, "chosen_ids must be a list of int token ids, got an element 5.0"),
    ),
    (
        "bool token ids",
        lambda _: PC()([{**EX, "prompt_ids": [True]}]),
        raises(TypeError, "prompt_ids must be a list of int token ids, got an element True"),
    ),
    (
        "a string of token ids",
        lambda _: PC()([{**EX, "chosen_ids": "45"}]),
        raises(TypeError, "chosen_ids must be a list of int token ids, got str"),
    ),
    (
        "a float tensor of token ids",
        lambda _: PC()([{**EX, "chosen_ids": torch.tensor([4.0])}]),
        raises(ValueError, "chosen_ids must be a 1-D integer tensor"),
    ),
    (
        "a sequence longer than pack_length",
        lambda _: PC(layout="packed", pack_length=3)([EX]),
        raises(ValueError, "does not fit pack_length=3"),
    ),
    (
        "a NaN reference log-prob",
        lambda _: PC()([{**EX, "ref_chosen_logps": math.nan, "ref_rejected_logps": -1.0}]),
        raises(ValueError, "example 0: ref_chosen_logps must be finite, got nan"),
    ),
    (
        "a reference log-prob that is not a number",
        lambda _: PC()([{**EX, "ref_chosen_logps": -1.0, "ref_rejected_logps": "x"}]),
        raises(TypeError, "example 0: ref_rejected_logps must be a number, got 'x'"),
    ),
    (
        "collate_packed of an odd number of sequences",
        lambda _: collate_packed([([1], [2])] * 3, pad_token_id=0),
        raises(ValueError, "packed needs 2B sequences"),
    ),
]:
    row(f"PreferenceCollator: {id}", None, call, error)


def _same_tokens_every_layout(_):
    """Every layout holds the same scored tokens: the completions, each once, in pair order."""
    examples = [*EXAMPLES, {"prompt_ids": [12], "chosen_ids": [13, 14, 15, 16], "rejected_ids": [17]}]
    for layout in ("padded", "packed", "prefix_shared"):
        collated = PC(layout=layout, pack_length=12)(examples)
        if layout == "padded":
            scored = collated["input_ids"][collated["completion_mask"].bool()]
            assert scored.tolist() == [4, 5, 8, 13, 14, 15, 16, 6, 9, 10, 11, 17]
        else:
            ids, seq = collated["input_ids"], collated["sequence_ids"]
            tokens = [ids[seq == s].tolist() for s in range(6)]
            assert tokens == [[4, 5], [8], [13, 14, 15, 16], [6], [9, 10, 11], [17]], layout


row("PreferenceCollator: each layout scores the same tokens", None, _same_tokens_every_layout)


# ------------------------------------------------------- precompute_reference_logps ----

PR = dpo_fast.precompute_reference_logps


def _meta_model(_):
    with torch.device("meta"):
        meta_llama = tiny_llama()
    PR(meta_llama, EXAMPLES, progress=False)


for id, call, error in [
    (
        "unknown layout",
        lambda b: PR(shared_llama(), EXAMPLES, layout="ragged", backend=b),
        raises(ValueError, "layout must be one of"),
    ),
    (
        "batch_size 0",
        lambda b: PR(shared_llama(), EXAMPLES, batch_size=0, backend=b),
        raises(ValueError, "batch_size must be a positive int, got 0"),
    ),
    (
        "data an iterator",
        lambda b: PR(shared_llama(), iter(EXAMPLES), backend=b),
        raises(TypeError, "data must be a torch DataLoader or a sequence of examples"),
    ),
    (
        "no examples",
        lambda b: PR(shared_llama(), [], progress=False, backend=b),
        raises(ValueError, "data holds no examples"),
    ),
    (
        "a shuffled DataLoader",
        lambda b: PR(shared_llama(), DataLoader(EXAMPLES, shuffle=True, collate_fn=PC()), backend=b),
        raises(ValueError, "data is a DataLoader that does not read the examples in order"),
    ),
    (
        "an example with an empty completion",
        lambda b: PR(shared_llama(), [{**EX, "chosen_ids": []}], progress=False, backend=b),
        raises(ValueError, "example 0: the chosen completion is empty"),
    ),
    (
        "a token id beyond the model's vocabulary",
        lambda b: PR(shared_llama(), [{**EX, "chosen_ids": [MODEL_VOCAB + 3]}], progress=False, backend=b),
        raises(ValueError, r"batch\['input_ids'\] must be token ids in \[0, 97\)"),
    ),
]:
    row(f"precompute_reference_logps: {id}", "linear_logprobs", call, error)

row(
    "precompute_reference_logps: a meta model",
    None,
    _meta_model,
    raises(ValueError, "model's parameters are on the meta device"),
)


def _cache_is_a_directory(_):
    with tempfile.TemporaryDirectory() as folder:
        PR(shared_llama(), EXAMPLES, cache=folder, progress=False)


row(
    "precompute_reference_logps: cache is a directory (refused before any work)",
    None,
    _cache_is_a_directory,
    raises(ValueError, "cache must be a file path, got the directory"),
)


def _precompute_single_tokens(backend):
    out = PR(shared_llama(), SINGLE_TOKENS, layout="prefix_shared", progress=False, backend=backend)
    assert_close(torch.cat([out.chosen, out.rejected]), naive_logps(SINGLE_TOKENS), atol=1e-5)


row("precompute_reference_logps: single-token completions", "linear_logprobs", _precompute_single_tokens)


# ------------------------------------------------------------------------- the table ----


def _params():
    params = []
    for r in ROWS:
        backends = registry.backends(r.op) if r.op else (None,)
        for backend in backends:
            test_id = r.id if backend is None else f"{r.id} [{backend}]"
            params.append(pytest.param(r, backend, id=test_id))
    return params


@pytest.mark.parametrize("case, backend", _params())
def test_hostile_input(case: Row, backend: str | None):
    if case.error is None:
        case.run(backend)
        return
    exception, pattern = case.error
    with pytest.raises(exception, match=pattern):
        case.run(backend)


def test_the_table_covers_every_public_function():
    covered = {r.id.split(":")[0] for r in ROWS}
    public = {
        "token_logprobs",
        "sequence_logprobs",
        "linear_token_logprobs",
        "linear_sequence_logprobs",
        "preference_loss",
        "FusedLinearPreferenceLoss",
        "concatenated_forward",
        "PreferenceCollator",
        "precompute_reference_logps",
    }
    assert public <= covered, public - covered
    assert len(ROWS) >= 60
    assert all(re.search(r"\w", r.id) for r in ROWS)
    assert len({r.id for r in ROWS}) == len(ROWS), "row ids must be unique"


# ------------------------------------------------------- losses at extreme margins ----

MARGINS = (1e4, -1e4, 1e6, -1e6)
LOSS_CASES = [(t, "reverse_kl") for t in LOSS_TYPES] + [
    (t, f) for f in F_DIVERGENCES if f != "reverse_kl" for t in sorted(F_DIVERGENCE_LOSS_TYPES)
]


def extreme_pairs(loss_type: str, dtype: torch.dtype) -> dict:
    """One pair per margin (chosen minus rejected log-ratio = +-1e4, +-1e6), log-probs <= -1."""
    margins = torch.tensor(MARGINS, dtype=torch.float64)
    chosen = torch.where(margins > 0, -1.0, -1.0 + margins)
    rejected = torch.where(margins > 0, -1.0 - margins, -1.0)
    kwargs = {
        "chosen_logps": chosen.to(dtype),
        "rejected_logps": rejected.to(dtype),
        "ref_chosen_logps": torch.full((4,), -2.0, dtype=dtype),
        "ref_rejected_logps": torch.full((4,), -3.0, dtype=dtype),
        "chosen_lengths": torch.tensor([3, 7, 1, 200]),
        "rejected_lengths": torch.tensor([5, 2, 9, 1]),
        "loss_type": loss_type,
    }
    if loss_type in REFERENCE_FREE and loss_type != "sft":
        kwargs.update(REF_FREE)
    if loss_type in ("orpo", "cpo"):
        kwargs["chosen_nll"] = torch.tensor(0.5)
    if loss_type in ("exo_pair", "robust"):
        kwargs["label_smoothing"] = 0.1
    return kwargs


@pytest.mark.parametrize("backend", registry.backends("preference_loss"))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_type, f_divergence", LOSS_CASES)
def test_every_loss_finite_at_extreme_margins(loss_type, f_divergence, dtype, backend):
    kwargs = extreme_pairs(loss_type, dtype)
    kwargs["f_divergence"] = f_divergence
    check_loss(backend, kwargs, rtol=1e-4)
