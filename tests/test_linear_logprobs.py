"""dpo_fast.linear_token_logprobs / linear_sequence_logprobs against a float64 oracle that
materializes the logits (``hidden @ weight.T + bias``) and differentiates through them.

Every backend runs the suite (Triton through the interpreter on CPU, so sizes are small).
``small_tiles`` forces several token chunks per call, so chunk boundaries, masks and the fp32
accumulation of the weight gradient across chunks are exercised.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_labels
from torch.utils._python_dispatch import TorchDispatchMode

import dpo_fast
import dpo_fast.ops.linear_logprobs as linear
from dpo_fast.formulas import dense_token_logprobs, rows_forward

PATHS = {
    "torch": {"backend": "torch"},
    "triton": {"backend": "triton"},
    "cpp": {"backend": "cpp"},
}
every_path = pytest.mark.parametrize("path", list(PATHS.values()), ids=list(PATHS))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The oracle sees the same rounded inputs; what remains is the logits tile rounded to the
# compute dtype (|logits| <~ 8) and, for gradients, the logits gradient rounded to it.
LOGP_TOL = {torch.float32: 2e-5, torch.bfloat16: 6e-2, torch.float16: 8e-3}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.fixture
def small_tiles(monkeypatch):
    """Three tokens per logits tile."""
    monkeypatch.setattr(linear, "chunk_rows", lambda *_: 3)


def make_head(shape, hidden_size, vocab_size, dtype=torch.float32, bias=False):
    """Hidden states, lm_head weight (logits of unit scale) and optional bias, as leaves."""
    hidden = torch.randn(*shape, hidden_size).to(dtype).requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size) * 2 / hidden_size**0.5).to(dtype).requires_grad_()
    b = torch.randn(vocab_size).to(dtype).requires_grad_() if bias else None
    return hidden, weight, b


def oracle(hidden, weight, bias, labels, **options):
    """float64 leaves and dense per-token log-probs through materialized logits."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    h, w, b = leaves
    logits = h @ w.T + (b if b is not None else 0.0)
    return leaves, dense_token_logprobs(logits, labels, **options)


def check_against_oracle(hidden, weight, bias, labels, path, tol_scale=1.0, **options):
    """Values and gradients (hidden, weight, bias) vs the float64 oracle; ``path`` holds the
    backend keyword."""
    dtype = weight.dtype
    ours = dpo_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, **path, **options).logps
    leaves, expected = oracle(hidden, weight, bias, labels, **options)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    torch.testing.assert_close(ours.double(), expected, atol=LOGP_TOL[dtype] * tol_scale, rtol=1e-5)
    upstream = torch.randn_like(expected)
    (ours * upstream.float()).sum().backward()
    (expected * upstream).sum().backward()
    for name, ours_leaf, oracle_leaf in zip(
        ("hidden", "weight", "bias"), (hidden, weight, bias), leaves, strict=True
    ):
        if ours_leaf is None:
            continue
        assert ours_leaf.grad is not None, name
        assert ours_leaf.grad.dtype == ours_leaf.dtype, name
        scale = oracle_leaf.grad.abs().max().item() + 1e-30
        torch.testing.assert_close(
            ours_leaf.grad.double(),
            oracle_leaf.grad,
            atol=GRAD_TOL[dtype] * scale * tol_scale,
            rtol=0,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    return ours


TRANSFORMS = {
    "plain": {},
    "shift": {"shift": True},
    "bias+shift": {"shift": True, "bias": True},
    "transforms": {"temperature": 0.7, "softcap": 2.5, "logit_scale": 1.7, "bias": True},
}


@every_path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(TRANSFORMS))
@pytest.mark.usefixtures("small_tiles", "poisoned_outputs")
def test_matches_reference(path, dtype, case):
    options = dict(TRANSFORMS[case])
    hidden, weight, bias = make_head((2, 9), 24, 101, dtype, bias=options.pop("bias", False))
    labels = make_labels((2, 9), 101)
    check_against_oracle(hidden, weight, bias, labels, path, **options)


@every_path
def test_one_tile_per_call_with_default_chunking(path):
    hidden, weight, bias = make_head((3, 7), 16, 333, bias=True)
    labels = make_labels((3, 7), 333)
    check_against_oracle(hidden, weight, bias, labels, path, shift=True)


@every_path
@pytest.mark.usefixtures("small_tiles", "poisoned_outputs")
def test_ignored_tokens_anywhere(path):
    hidden, weight, bias = make_head((3, 8), 16, 50, bias=True)
    labels = make_labels((3, 8), 50, ignore_frac=0.4)
    labels[1] = -100  # a whole sequence
    labels[0, -1] = -100  # the last position (what the shift drops anyway)
    out = check_against_oracle(hidden, weight, bias, labels, path, shift=True)
    assert (out[labels[:, 1:] == -100] == 0).all()
    # the ignored sequence's hidden states get exactly zero gradient
    assert (hidden.grad[1] == 0).all()


@every_path
def test_all_tokens_ignored(path):
    hidden, weight, bias = make_head((2, 5), 8, 30, bias=True)
    labels = torch.full((2, 5), -100)
    out = dpo_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, **path).logps
    assert out.shape == (2, 5) and (out == 0).all()
    out.sum().backward()
    for leaf in (hidden, weight, bias):
        assert leaf.grad is not None and (leaf.grad == 0).all()


@every_path
def test_empty_batch_and_shift_of_one_token(path):
    hidden, weight, bias = make_head((0, 5), 8, 30, bias=True)
    logps, counts, _ = dpo_fast.linear_sequence_logprobs(
        hidden, weight, torch.zeros(0, 5, dtype=torch.long), bias=bias, **path
    )
    assert logps.shape == (0,) and counts.shape == (0,)
    logps.sum().backward()
    assert hidden.grad.shape == hidden.shape and (weight.grad == 0).all()
    hidden, weight, _ = make_head((2, 1), 8, 30)
    out = dpo_fast.linear_token_logprobs(
        hidden, weight, torch.ones(2, 1, dtype=torch.long), shift=True, **path
    ).logps
    assert out.shape == (2, 0)


@every_path
def test_one_token_and_custom_ignore_index(path):
    hidden, weight, _ = make_head((1,), 8, 7)  # (T=1, H): no batch dims
    check_against_oracle(hidden, weight, None, torch.tensor([3]), path)
    hidden, weight, _ = make_head((2, 4), 8, 7)
    labels = torch.tensor([[0, -1, 6, 1], [-1, -1, 2, 5]])
    check_against_oracle(hidden, weight, None, labels, path, ignore_index=-1)


@every_path
def test_non_contiguous_hidden(path, small_tiles):
    hidden_full, weight, _ = make_head((2, 10), 16, 64)
    labels = make_labels((2, 9), 64)
    sliced = hidden_full[:, :-1]  # what an HF model's last hidden state looks like after a shift
    assert not sliced.is_contiguous()
    sliced.retain_grad()
    check_against_oracle(sliced, weight, None, labels, path)
    # time-major layout viewed as batch-major, with extra leading dims
    hidden_tm = torch.randn(6, 2, 3, 16).requires_grad_()
    hidden = hidden_tm.permute(1, 2, 0, 3)  # (2, 3, T=6, H)
    labels = make_labels((2, 3, 6), 64)
    weight.grad = None
    out = dpo_fast.linear_token_logprobs(hidden, weight, labels, shift=True, **path).logps
    _, expected = oracle(hidden, weight, None, labels, shift=True)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


@every_path
def test_tied_embedding_and_head(path, small_tiles):
    """The lm_head weight is the embedding matrix: its gradient is the sum of both uses."""
    vocab_size, hidden_size = 40, 16
    embedding = torch.nn.Embedding(vocab_size, hidden_size)
    ids = torch.randint(0, vocab_size, (2, 7))
    labels = make_labels((2, 7), vocab_size)
    mix = torch.randn(hidden_size, hidden_size) / hidden_size**0.5

    def ours(embed_weight, head_weight):
        hidden = torch.tanh(torch.nn.functional.embedding(ids, embed_weight) @ mix)
        return dpo_fast.linear_token_logprobs(hidden, head_weight, labels, shift=True, **path).logps

    def grad_of(embed_weight, head_weight, leaf):
        ours(embed_weight, head_weight).sum().backward()
        grad, leaf.grad = leaf.grad, None
        return grad

    tied = embedding.weight
    total = grad_of(tied, tied, tied)
    head_only = grad_of(tied.detach(), tied, tied)
    embedding_only = grad_of(tied, tied.detach(), tied)
    assert head_only.abs().max() > 0 and embedding_only.abs().max() > 0
    torch.testing.assert_close(total, head_only + embedding_only, atol=1e-6, rtol=1e-5)
    # and the total is the float64 oracle's
    w64 = tied.detach().double().requires_grad_()
    hidden64 = torch.tanh(torch.nn.functional.embedding(ids, w64) @ mix.double())
    dense_token_logprobs(hidden64 @ w64.T, labels, shift=True).sum().backward()
    torch.testing.assert_close(total.double(), w64.grad, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("path", [PATHS["torch"]], ids=["torch"])
def test_autocast_mixed_dtypes(path):
    """Under autocast the matmuls run in the autocast dtype, whatever the operands' dtypes;
    gradients come back in each operand's own dtype."""
    hidden, weight, bias = make_head((2, 6), 32, 90, bias=True)
    hidden_bf16 = hidden.detach().bfloat16().requires_grad_()
    labels = make_labels((2, 6), 90)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dpo_fast.linear_token_logprobs(hidden_bf16, weight, labels, bias=bias, **path).logps
    assert out.dtype == torch.float32
    out.sum().backward()
    assert hidden_bf16.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    assert bias.grad.dtype == torch.float32
    # the oracle sees the operands rounded to bf16, as the matmul does
    rounded = [t.detach().bfloat16() for t in (hidden_bf16, weight, bias)]
    leaves, expected = oracle(*rounded, labels)
    expected.sum().backward()
    torch.testing.assert_close(out.double(), expected, atol=LOGP_TOL[torch.bfloat16], rtol=1e-5)
    for ours, ref in zip((hidden_bf16, weight, bias), leaves, strict=True):
        scale = ref.grad.abs().max().item()
        torch.testing.assert_close(
            ours.grad.double(), ref.grad, atol=GRAD_TOL[torch.bfloat16] * scale, rtol=0
        )


@every_path
def test_stats_match_materialized_logits(path, small_tiles):
    hidden, weight, bias = make_head((2, 8), 16, 77, bias=True)
    labels = make_labels((2, 8), 77)
    options = {"temperature": 0.9, "softcap": 4.0, "logit_scale": 1.2}
    logp, stats = dpo_fast.linear_token_logprobs(
        hidden, weight, labels, bias=bias, stats=dpo_fast.STAT_NAMES, shift=True, **path, **options
    )
    # the same statistics from the reference math on materialized fp32 logits
    logits = (hidden @ weight.T + bias).detach()[:, :-1].reshape(-1, 77)
    scale = options["logit_scale"] / options["temperature"]
    _, _, expected = rows_forward(
        logits,
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        scale=scale,
        softcap=4.0,
        stats=dpo_fast.STAT_NAMES,
    )
    for name in dpo_fast.STAT_NAMES:
        assert stats[name].shape == (2, 7)
        if name == "is_top1":
            assert stats[name].dtype == torch.bool
            assert torch.equal(stats[name].reshape(-1), expected[name])
        else:
            torch.testing.assert_close(stats[name].reshape(-1), expected[name], atol=1e-5, rtol=1e-5)
    # statistics carry no gradient; log-probs still do
    assert not any(value.requires_grad for value in stats.values()) and logp.requires_grad


@every_path
def test_is_top1_ties_go_to_the_first_index(path, small_tiles):
    """Exact small-integer logits with many tied maxima (an identity head): a label at a
    maximal index is top-1 only at the first one, as torch.argmax."""
    vocab_size = 40
    hidden = torch.randint(0, 3, (2, 12, vocab_size)).float()
    is_max = hidden == hidden.amax(-1, keepdim=True)
    first = is_max.int().argmax(-1)
    last = vocab_size - 1 - is_max.flip(-1).int().argmax(-1)
    labels = torch.where(torch.rand(2, 12) < 0.5, first, last)
    _, stats = dpo_fast.linear_token_logprobs(
        hidden, torch.eye(vocab_size), labels, stats=["is_top1"], **path
    )
    expected = labels == first
    assert expected.any() and not expected.all()
    assert torch.equal(stats["is_top1"], expected)


@every_path
def test_sequence_logprobs(path, small_tiles):
    hidden, weight, bias = make_head((3, 8), 16, 60, bias=True)
    labels = make_labels((3, 8), 60)
    labels[2] = -100
    logps, counts, _ = dpo_fast.linear_sequence_logprobs(
        hidden, weight, labels, bias=bias, shift=True, **path
    )
    leaves, per_token = oracle(hidden, weight, bias, labels, shift=True)
    scored = labels[:, 1:] != -100
    torch.testing.assert_close(logps.double(), per_token.sum(-1), atol=1e-4, rtol=1e-5)
    assert counts.dtype == torch.int64 and torch.equal(counts, scored.sum(-1))
    logps.sum().backward()
    per_token.sum().backward()
    torch.testing.assert_close(weight.grad.double(), leaves[1].grad, atol=1e-5, rtol=1e-5)

    averaged, _, stats = dpo_fast.linear_sequence_logprobs(
        hidden, weight, labels, bias=bias, shift=True, average=True, stats=["entropy"], **path
    )
    torch.testing.assert_close(
        averaged.double(), per_token.sum(-1) / scored.sum(-1).clamp(min=1), atol=1e-5, rtol=1e-5
    )
    assert averaged[2].item() == 0.0 and stats["entropy"].shape == (3, 7)


@every_path
def test_segment_sums(path):
    hidden, weight, _ = make_head((2, 12), 16, 50)
    labels = make_labels((2, 12), 50, ignore_frac=0.1)
    labels[0, 11] = 7  # segment 3 scores at least one token, so max(segment_ids) + 1 == 4
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, 3, 3], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1]])
    logps, counts, _ = dpo_fast.linear_sequence_logprobs(
        hidden, weight, labels, segment_ids=segment_ids, shift=True, **path
    )
    # the same sums as the logits API on materialized logits: the code path is shared
    logits = (hidden @ weight.T).detach()
    expected, expected_counts, _ = dpo_fast.sequence_logprobs(
        logits, labels, segment_ids=segment_ids, shift=True, backend=path["backend"]
    )
    assert logps.shape == (2, 4)
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(counts, expected_counts)


@every_path
def test_no_grad_and_frozen_weight(path):
    hidden, weight, bias = make_head((2, 5), 8, 30, bias=True)
    labels = make_labels((2, 5), 30)
    with torch.no_grad():
        out = dpo_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, **path).logps
    assert not out.requires_grad
    frozen = weight.detach()
    with_grad = dpo_fast.linear_token_logprobs(hidden, frozen, labels, bias=bias.detach(), **path).logps
    torch.testing.assert_close(out, with_grad, atol=0, rtol=0)
    with_grad.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    # only the bias trains: its gradient alone, still the oracle's
    dpo_fast.linear_token_logprobs(hidden.detach(), frozen, labels, bias=bias, **path).logps.sum().backward()
    leaves, expected = oracle(hidden, weight, bias, labels)
    expected.sum().backward()
    torch.testing.assert_close(bias.grad.double(), leaves[2].grad, atol=2e-5, rtol=1e-5)


@every_path
def test_extreme_logits(path):
    hidden, weight, bias = make_head((2, 6), 16, 40, bias=True)
    labels = make_labels((2, 6), 40)
    with torch.no_grad():
        # logits in the thousands (softmax is one-hot or nearly), made of small integers so the
        # fp32 matmul is exact: a rounded logit would move a near-tie's gradient by more than
        # the tolerance, which measures the kernel, not the matmul's conditioning
        hidden.copy_(torch.randint(-3, 4, hidden.shape))
        weight.copy_(torch.randint(-3, 4, weight.shape) * 40.0)
        bias.copy_(torch.randint(-3, 4, bias.shape) * 40.0)
        largest_logit = (hidden @ weight.T + bias).abs().max().item()
    # the log-sum-exp is kept as one fp32 value, rounded to ~|logit| * eps: the softmax in
    # backward, and so the gradients, are exact only to that relative error
    tol_scale = max(1.0, largest_logit * torch.finfo(torch.float32).eps / GRAD_TOL[torch.float32])
    check_against_oracle(hidden, weight, bias, labels, path, tol_scale=tol_scale)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_backward_reuses_the_last_forward_tile(backend, small_tiles, monkeypatch):
    """Chunked backward recomputes every tile but the last, whose logits forward left in the
    buffer; a second backward (retain_graph) has no such tile and recomputes all, with the
    same result."""
    projections = []
    real_project = linear._project
    monkeypatch.setattr(linear, "_project", lambda *a: projections.append(1) or real_project(*a))
    hidden, weight, bias = make_head((2, 7), 8, 50, bias=True)
    labels = make_labels((2, 7), 50, ignore_frac=0.0)  # 14 scored tokens: 5 chunks of <= 3
    out = dpo_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend).logps
    assert len(projections) == 5
    upstream = torch.randn_like(out)
    grads = []
    for expected_projections in (4, 5):
        projections.clear()
        (out * upstream).sum().backward(retain_graph=True)
        assert len(projections) == expected_projections
        grads.append([leaf.grad for leaf in (hidden, weight, bias)])
        for leaf in (hidden, weight, bias):
            leaf.grad = None
    leaves, expected = oracle(hidden, weight, bias, labels)
    (expected * upstream.double()).sum().backward()
    for first, second, oracle_leaf in zip(*grads, leaves, strict=True):
        assert torch.equal(first, second)
        torch.testing.assert_close(first.double(), oracle_leaf.grad, rtol=0, atol=1e-4)


@every_path
def test_deterministic(path, small_tiles):
    hidden, weight, bias = make_head((3, 9), 16, 70, dtype=torch.bfloat16, bias=True)
    labels = make_labels((3, 9), 70)

    def run():
        for leaf in (hidden, weight, bias):
            leaf.grad = None
        out = dpo_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, shift=True, **path).logps
        (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
        return out, hidden.grad, weight.grad, bias.grad

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


def test_chunk_rows_respects_the_budget():
    for vocab_size in (7, 32000, 128256, 10**9):
        for dtype in (torch.float32, torch.bfloat16):
            rows = linear.chunk_rows(vocab_size, dtype, "cpu")
            assert rows >= 1
            assert rows == 1 or rows * vocab_size * dtype.itemsize <= linear.DEFAULT_TILE_BYTES
    assert linear.chunk_rows(128256, torch.bfloat16, "cuda") % 64 == 0


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_no_tokens_by_vocab_tensor(backend, monkeypatch):
    """No tensor of tokens x V elements exists in forward or backward: every op's output is
    at most one tile (chunk x V, chunk from the tile budget), the weight, or the hidden."""
    monkeypatch.setattr(linear, "DEFAULT_TILE_BYTES", 2 << 20)
    tokens, hidden_size, vocab_size = 2048, 16, 4096
    hidden, weight, bias = make_head((2, tokens // 2), hidden_size, vocab_size, bias=True)
    labels = make_labels((2, tokens // 2), vocab_size, ignore_frac=0.0)
    chunk = linear.chunk_rows(vocab_size, torch.float32, "cpu")
    assert 4 * chunk <= tokens
    with LargestTensor() as monitor:
        out = dpo_fast.linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend).logps
        out.sum().backward()
    assert monitor.largest == chunk * vocab_size  # the monitor saw the tiles
    assert monitor.largest * 4 <= tokens * vocab_size
    # the naive path materializes tokens x V, and the monitor sees it
    with LargestTensor() as monitor, torch.no_grad():
        torch.log_softmax(hidden @ weight.T, -1)
    assert monitor.largest >= tokens * vocab_size


def _long(*shape):
    return torch.zeros(shape, dtype=torch.long)


BAD_INPUTS = [
    # (hidden, weight, labels, options, error, message)
    (torch.randn(2, 3, 8), torch.randn(10, 9), _long(2, 3), {}, ValueError, "hidden's last dim"),
    (
        torch.randn(2, 3, 8),
        torch.randn(10, 8),
        _long(2, 3),
        {"bias": torch.randn(9)},
        ValueError,
        "bias must",
    ),
    (
        torch.randn(2, 3, 8),
        torch.randn(10, 8),
        _long(2, 3),
        {"bias": torch.randn(10, 1)},
        ValueError,
        "bias must",
    ),
    (
        torch.randn(2, 3, 8).bfloat16(),
        torch.randn(10, 8),
        _long(2, 3),
        {},
        TypeError,
        "weight must have hidden's",
    ),
    (
        torch.randn(2, 3, 8),
        torch.randn(10, 8),
        _long(2, 3),
        {"bias": torch.randn(10).half()},
        TypeError,
        "bias",
    ),
    (torch.randn(2, 3, 8), torch.randn(10, 8), _long(2, 4), {}, ValueError, "labels must have shape"),
    (torch.randn(2, 3, 8), torch.randn(10, 8), _long(3), {}, ValueError, "labels must have shape"),
    (torch.randn(2, 3, 8), torch.randn(10, 8), torch.full((2, 3), 10), {}, ValueError, r"in \[0, 10\)"),
    (torch.randn(2, 3, 8), torch.randn(10, 8), torch.zeros(2, 3), {}, TypeError, "labels must be an integer"),
    (torch.randn(2, 3, 8), torch.randn(10, 8, 1), _long(2, 3), {}, ValueError, "weight must be"),
    (torch.randn(2, 3, 8), torch.randn(0, 8), _long(2, 3), {}, ValueError, "vocab_size > 0"),
    (torch.randn(8), torch.randn(10, 8), _long(), {}, ValueError, "hidden must have at least 2 dims"),
    (
        torch.randn(2, 3, 8).double(),
        torch.randn(10, 8).double(),
        _long(2, 3),
        {},
        TypeError,
        "hidden must be",
    ),
    (torch.randn(2, 3, 8), [[0.0] * 8] * 10, _long(2, 3), {}, TypeError, "weight must be a torch.Tensor"),
    (torch.randn(2, 3, 8), torch.randn(10, 8), _long(2, 3), {"temperature": 0.0}, ValueError, "temperature"),
    (torch.randn(2, 3, 8), torch.randn(10, 8), _long(2, 3), {"softcap": -1.0}, ValueError, "softcap"),
    (torch.randn(2, 3, 8), torch.randn(10, 8), _long(2, 3), {"logit_scale": 0.0}, ValueError, "logit_scale"),
    (torch.randn(2, 3, 8), torch.randn(10, 8), _long(2, 3), {"stats": ["nope"]}, ValueError, "stats"),
    (torch.randn(2, 3, 8), torch.randn(10, 8), _long(2, 3), {"backend": "cuda"}, ValueError, "backend"),
]


@pytest.mark.parametrize(("hidden", "weight", "labels", "options", "error", "message"), BAD_INPUTS)
def test_bad_input(hidden, weight, labels, options, error, message):
    with pytest.raises(error, match=message):
        dpo_fast.linear_token_logprobs(hidden, weight, labels, **options)


def test_bad_segment_ids():
    hidden, weight, labels = torch.randn(2, 3, 8), torch.randn(10, 8), _long(2, 3)
    with pytest.raises(ValueError, match="segment_ids must have"):
        dpo_fast.linear_sequence_logprobs(hidden, weight, labels, segment_ids=_long(2, 4))


@pytest.mark.gpu
def test_operands_on_different_devices():
    hidden, weight, labels = torch.randn(2, 3, 8, device="cuda"), torch.randn(10, 8), _long(2, 3).cuda()
    with pytest.raises(ValueError, match="weight is on"):
        dpo_fast.linear_token_logprobs(hidden, weight, labels)
    with pytest.raises(ValueError, match="labels are on"):
        dpo_fast.linear_token_logprobs(hidden, weight.cuda(), labels.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_real_sizes_on_gpu(backend):
    """Llama-3-like head at 8k tokens, bf16: values vs an fp32 materialized reference, and
    peak memory far below one [tokens, V] bf16 logits tensor."""
    tokens, hidden_size, vocab_size = 8192, 4096, 128256
    device = "cuda"
    hidden = (torch.randn(tokens, hidden_size, device=device) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(vocab_size, hidden_size, device=device) * 0.02).bfloat16().requires_grad_()
    labels = make_labels((tokens,), vocab_size).to(device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = dpo_fast.linear_token_logprobs(hidden, weight, labels, backend=backend).logps
    out.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = tokens * vocab_size * 2
    # beyond the weight gradient (fp32 accumulator + bf16 result): one 512 MiB tile and O(tokens x H)
    assert extra - weight.numel() * 6 < logits_bytes // 2
    sample = slice(0, 256)
    with torch.no_grad():
        logits = hidden[sample].float() @ weight.float().T
        expected = dense_token_logprobs(logits, labels[sample])
        one_hot = torch.nn.functional.one_hot(labels[sample], vocab_size).float()
        expected_grad = (one_hot - logits.softmax(-1)) @ weight.float()
    torch.testing.assert_close(out[sample], expected, atol=5e-2, rtol=0)
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(hidden.grad[sample].float(), expected_grad, atol=2e-2 * scale, rtol=0)
