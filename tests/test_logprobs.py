"""The core reference suite: dpo_fast.token_logprobs / sequence_logprobs against float64.

Every backend in BACKENDS runs the same suite ("triton" through the interpreter on CPU).
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_labels

import dpo_fast
from dpo_fast.formulas import dense_token_logprobs

BACKENDS = ["torch", "triton", "cpp", "auto"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Tolerances on fp32 results computed from inputs in each dtype (the oracle sees the same
# rounded inputs, so they measure our arithmetic, not the input rounding).
LOGP_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
# Gradients come back in the logits' dtype: one rounding of the result.
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def check_against_reference(logits, labels, backend, atol_scale=1.0, **options):
    """Values and gradients of token_logprobs vs autograd through the float64 oracle."""
    logits = logits.detach().requires_grad_()
    ours = dpo_fast.token_logprobs(logits, labels, backend=backend, **options).logps
    oracle_input = logits.detach().double().requires_grad_()
    oracle = dense_token_logprobs(oracle_input, labels, **options)
    assert ours.dtype == torch.float32
    assert ours.shape == oracle.shape
    torch.testing.assert_close(ours.double(), oracle, atol=LOGP_TOL[logits.dtype] * atol_scale, rtol=1e-5)
    weights = torch.randn_like(oracle)
    (ours * weights.float()).sum().backward()
    (oracle * weights).sum().backward()
    assert logits.grad.dtype == logits.dtype
    assert torch.isfinite(logits.grad).all()
    scale = oracle_input.grad.abs().max().item() + 1e-30
    torch.testing.assert_close(
        logits.grad.double(), oracle_input.grad, atol=GRAD_TOL[logits.dtype] * scale * atol_scale, rtol=0
    )
    return ours, logits.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", [False, True])
def test_matches_reference(backend, dtype, shift, poisoned_outputs):
    vocab_size = 1000  # not a power of two
    logits = (torch.randn(2, 7, vocab_size) * 4).to(dtype)
    labels = make_labels((2, 7), vocab_size)
    check_against_reference(logits, labels, backend, shift=shift)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_larger_than_one_block(backend, poisoned_outputs):
    vocab_size = 50257
    logits = torch.randn(1, 3, vocab_size) * 3
    check_against_reference(logits, make_labels((1, 3), vocab_size, ignore_frac=0.0), backend, shift=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("temperature", "softcap"), [(0.7, None), (1.0, 3.0), (1.5, 30.0)])
def test_temperature_and_softcap(backend, dtype, temperature, softcap):
    vocab_size = 777
    logits = (torch.randn(3, 5, vocab_size) * 8).to(dtype)
    labels = make_labels((3, 5), vocab_size)
    check_against_reference(logits, labels, backend, temperature=temperature, softcap=softcap, shift=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token_and_one_sequence(backend):
    logits = torch.randn(1, 1, 300)
    labels = torch.randint(0, 300, (1, 1))
    check_against_reference(logits, labels, backend)
    # 2-D input: a single sequence without a batch dim
    check_against_reference(torch.randn(4, 300), torch.randint(0, 300, (4,)), backend, shift=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_of_one_token_is_empty(backend):
    logits = torch.randn(2, 1, 50, requires_grad=True)
    out = dpo_fast.token_logprobs(
        logits, torch.zeros(2, 1, dtype=torch.long), shift=True, backend=backend
    ).logps
    assert out.shape == (2, 0)
    out.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_labels_ignored(backend, poisoned_outputs):
    logits = torch.randn(2, 4, 513) * 1e4  # huge logits: an ignored row must still give exact zeros
    labels = torch.full((2, 4), -100)
    labels[1, 2] = 5
    logits.requires_grad_()
    out = dpo_fast.token_logprobs(logits, labels, backend=backend).logps
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros(4))
    assert torch.equal(logits.grad[0], torch.zeros(4, 513))
    assert torch.isfinite(out).all() and torch.isfinite(logits.grad).all()
    logps, counts, _ = dpo_fast.sequence_logprobs(logits.detach(), labels, average=True, backend=backend)
    assert counts.tolist() == [0, 1]
    assert logps[0].item() == 0.0 and torch.isfinite(logps).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    logits = torch.randn(2, 6, 200)
    labels = make_labels((2, 6), 200, ignore_index=0)
    check_against_reference(logits, labels, backend, ignore_index=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits(backend):
    vocab_size = 640
    big = torch.randn(3, 9, vocab_size + 37, dtype=torch.float32)
    logits = big[::2, 1::2, 5 : 5 + vocab_size]  # strided batch, time and a row stride > V
    assert not logits.is_contiguous()
    check_against_reference(logits, make_labels(logits.shape[:-1], vocab_size), backend, shift=True)
    transposed = torch.randn(5, 2, vocab_size).transpose(0, 1)  # batch stride < time stride
    check_against_reference(transposed, make_labels(transposed.shape[:-1], vocab_size), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(backend, dtype):
    vocab_size = 300
    logits = torch.randn(2, 6, vocab_size) * 1e4
    labels = torch.randint(0, vocab_size, (2, 6))
    # -inf everywhere off the label in one row, and scattered -inf in another
    logits[0, 0] = float("-inf")
    logits[0, 0, labels[0, 0]] = 3.0
    logits[1, 3, ::3] = float("-inf")
    logits[1, 3, labels[1, 3]] = -1e4
    logits = logits.to(dtype)
    # fp32 inputs of magnitude 1e4 carry an absolute rounding of ~1e-3 (one ulp); the stored
    # fp32 log-sum-exp has the same, so gradients are exact only to ~|x| * eps relative: the
    # tolerance scales with that (bf16's tolerance already covers its own, coarser rounding)
    atol_scale = 200.0 if dtype == torch.float32 else 1.0
    ours, _ = check_against_reference(logits, labels, backend, atol_scale=atol_scale)
    assert ours[0, 0].item() == 0.0
    assert torch.isfinite(ours).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_gradient_keeps_precision_when_p_near_one(backend):
    """p_y = 1 - 1e-4 in bf16: the target term 1 - p_y must not cancel to 0 or 1e-2 steps."""
    vocab_size = 1000
    logits = torch.zeros(1, 1, vocab_size, dtype=torch.bfloat16)
    # (V - 1) e^0 / e^z = 1e-4  =>  z = log((V - 1) * 1e4)
    logits[0, 0, 17] = torch.tensor(999.0 * 1e4).log()
    labels = torch.tensor([[17]])
    logits.requires_grad_()
    dpo_fast.token_logprobs(logits, labels, backend=backend).logps.sum().backward()
    x64 = logits.detach().double().requires_grad_()
    dense_token_logprobs(x64, labels).sum().backward()
    expected = x64.grad[0, 0, 17].item()
    assert 5e-5 < expected < 2e-4
    assert logits.grad[0, 0, 17].item() == pytest.approx(expected, rel=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_match_reference(backend):
    vocab_size = 1000
    logits = torch.randn(2, 5, vocab_size) * 3
    labels = make_labels((2, 5), vocab_size)
    # a tie for the max before the label (not top-1) and after it (top-1)
    logits[0, 1, :] = -5.0
    logits[0, 1, 10] = logits[0, 1, 20] = 4.0
    labels[0, 1] = 20
    logits[0, 2, :] = -5.0
    logits[0, 2, 10] = logits[0, 2, 20] = 4.0
    labels[0, 2] = 10
    labels[1, 0] = logits[1, 0].argmax()
    _, stats = dpo_fast.token_logprobs(
        logits, labels, stats=dpo_fast.STAT_NAMES, backend=backend, temperature=0.8
    )
    z = logits.double() / 0.8
    log_p = z.log_softmax(-1)
    valid = labels != -100
    zero = torch.zeros(())
    expected = {
        "entropy": torch.where(valid, -(log_p.exp() * log_p).sum(-1), zero),
        "mean_logits": torch.where(valid, z.mean(-1), zero),
        "log_sum_sq_probs": torch.where(valid, (2 * log_p).logsumexp(-1), zero),
    }
    for name, value in expected.items():
        torch.testing.assert_close(stats[name].double(), value, atol=1e-5, rtol=1e-5)
    top1 = stats["is_top1"]
    assert top1.dtype == torch.bool
    assert not top1[0, 1] and top1[0, 2] and top1[1, 0]
    assert torch.equal(top1, valid & (z.argmax(-1) == labels))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_and_ties_across_blocks(backend, dtype):
    """Rows of several kernel blocks (4096 columns), not starting on a 16-byte boundary (odd V,
    shifted view), with the label's max tied in an earlier block, in its own 16-byte vector,
    at a block boundary, at column 0, in the last partial block."""
    vocab_size = 9001
    logits = (torch.randn(1, 12, vocab_size) * 2).to(dtype)
    labels = make_labels((1, 12), vocab_size, ignore_frac=0.0)
    # (earlier column, label) per row: the label is top-1 iff it comes first
    ties = [(100, 5000), (4096, 4095), (4095, 4096), (4093, 4094), (4094, 4093), (3, 0), (8999, 9000)]
    ties += [(9000, 8999), (2000, 2003), (2001, 2007), (2004, 2006)]  # the last: same 16-byte vector
    for row, (earlier, label) in enumerate(ties, start=1):
        logits[0, row - 1, earlier] = logits[0, row - 1, label] = 20.0  # row t scores label t + 1
        labels[0, row] = label
    logp, stats = dpo_fast.token_logprobs(
        logits, labels, stats=dpo_fast.STAT_NAMES, backend=backend, shift=True
    )
    z = logits[:, :-1].double()
    log_p = z.log_softmax(-1)
    target = labels[:, 1:]
    torch.testing.assert_close(
        logp.double(), log_p.gather(-1, target[..., None])[..., 0], atol=2e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        stats["entropy"].double(), -(log_p.exp() * log_p).sum(-1), atol=1e-4, rtol=1e-5
    )
    torch.testing.assert_close(stats["mean_logits"].double(), z.mean(-1), atol=1e-5, rtol=1e-5)
    sum_sq = (2 * log_p).logsumexp(-1)
    torch.testing.assert_close(stats["log_sum_sq_probs"].double(), sum_sq, atol=1e-4, rtol=1e-5)
    assert torch.equal(stats["is_top1"], z.argmax(-1) == target)
    assert stats["is_top1"][0, [1, 4, 5, 7]].all() and not stats["is_top1"][0, [0, 2, 3, 6, 8, 9, 10]].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_handle_infinite_logits(backend):
    logits = torch.randn(1, 3, 100)
    logits[0, :, 50:] = float("-inf")
    labels = torch.tensor([[1, 2, 3]])
    names = ["entropy", "log_sum_sq_probs", "mean_logits"]
    _, stats = dpo_fast.token_logprobs(logits, labels, stats=names, backend=backend)
    log_p = logits[..., :50].double().log_softmax(-1)
    torch.testing.assert_close(
        stats["entropy"].double(), -(log_p.exp() * log_p).sum(-1), atol=1e-5, rtol=1e-5
    )
    assert torch.isfinite(stats["log_sum_sq_probs"]).all()
    assert torch.equal(stats["mean_logits"], logits.mean(-1))  # -inf, as the mean of the logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    logits = torch.randn(3, 20, 2000, dtype=torch.bfloat16)
    labels = make_labels((3, 20), 2000)
    segment_ids = torch.randint(-1, 4, (3, 20))

    def run():
        x = logits.clone().requires_grad_()
        per_token = dpo_fast.token_logprobs(x, labels, backend=backend, shift=True).logps
        sums, _, _ = dpo_fast.sequence_logprobs(x, labels, segment_ids=segment_ids, backend=backend)
        (per_token.sum() + sums.sum()).backward()
        return per_token, sums, x.grad

    for first, second in zip(run(), run(), strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_reuses_logits_storage(backend):
    logits = torch.randn(2, 6, 500)
    labels = make_labels((2, 6), 500)
    expected_input = logits.clone().requires_grad_()
    dpo_fast.token_logprobs(expected_input, labels, shift=True, backend=backend).logps.sum().backward()

    leaf = logits.clone().requires_grad_()
    seen = {}

    def capture(grad):
        seen["ptr"] = grad.data_ptr()
        seen["grad"] = grad.clone()

    work = leaf * 1.0  # a non-leaf whose storage backward may overwrite
    work.register_hook(capture)
    dpo_fast.token_logprobs(
        work, labels, shift=True, inplace_backward=True, backend=backend
    ).logps.sum().backward()
    assert seen["ptr"] == work.data_ptr()
    torch.testing.assert_close(seen["grad"], expected_input.grad, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [False, True])
def test_sequence_logprobs(backend, shift):
    logits = torch.randn(3, 8, 321, requires_grad=True)
    labels = make_labels((3, 8), 321)
    labels[2] = -100
    logps, counts, _ = dpo_fast.sequence_logprobs(logits, labels, shift=shift, backend=backend)
    x64 = logits.detach().double().requires_grad_()
    per_token = dense_token_logprobs(x64, labels, shift=shift)
    scored = (labels[:, 1:] if shift else labels) != -100
    torch.testing.assert_close(logps.double(), per_token.sum(-1), atol=1e-4, rtol=1e-5)
    assert counts.dtype == torch.int64 and torch.equal(counts, scored.sum(-1))
    logps.sum().backward()
    per_token.sum().backward()
    torch.testing.assert_close(logits.grad.double(), x64.grad, atol=1e-5, rtol=0)

    averaged, _, _ = dpo_fast.sequence_logprobs(logits, labels, shift=shift, average=True, backend=backend)
    torch.testing.assert_close(
        averaged.double(), per_token.sum(-1) / scored.sum(-1).clamp(min=1), atol=1e-5, rtol=1e-5
    )
    assert averaged[2].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_sums(backend):
    # one packed row of 4 sequences, plus a second row; -1 marks unscored positions
    logits = torch.randn(2, 12, 100, requires_grad=True)
    labels = make_labels((2, 12), 100, ignore_frac=0.1)
    labels[0, 11] = 7  # segment 3 scores at least one token, so max(segment_ids) + 1 == 4
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, 3, 3], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1]])
    logps, counts, _ = dpo_fast.sequence_logprobs(
        logits, labels, segment_ids=segment_ids, shift=True, backend=backend
    )
    assert logps.shape == (2, 4) and counts.shape == (2, 4)
    per_token = dense_token_logprobs(logits.detach().double(), labels, shift=True)
    seg = segment_ids[:, 1:]
    scored = labels[:, 1:] != -100
    for row in range(2):
        for s in range(4):
            member = (seg[row] == s) & scored[row]
            torch.testing.assert_close(
                logps[row, s].double(), per_token[row][member].sum(), atol=1e-5, rtol=1e-5
            )
            assert counts[row, s].item() == member.sum().item()
    logps[0, 1].backward()
    touched = logits.grad.abs().sum(-1)[0] > 0
    # positions t score label t+1: segment 1 holds labels 3 and 4, so logits rows 2 and 3
    expected = torch.zeros(12, dtype=torch.bool)
    expected[[t - 1 for t in (3, 4) if labels[0, t] != -100]] = True
    assert torch.equal(touched, expected)
    explicit, _, _ = dpo_fast.sequence_logprobs(
        logits, labels, segment_ids=segment_ids, num_segments=6, shift=True, backend=backend
    )
    assert explicit.shape == (2, 6) and torch.equal(explicit[:, :4], logps) and not explicit[:, 4:].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    logits = torch.randn(0, 5, 10, requires_grad=True)
    labels = torch.zeros(0, 5, dtype=torch.long)
    assert dpo_fast.token_logprobs(logits, labels, backend=backend).logps.shape == (0, 5)
    logps, counts, _ = dpo_fast.sequence_logprobs(logits, labels, backend=backend)
    assert logps.shape == (0,) and counts.shape == (0,)
    logps.sum().backward()
    assert logits.grad.shape == logits.shape


def test_env_var_selects_backend(monkeypatch):
    calls = []
    import dpo_fast.ops.logprobs as chunked

    real = chunked.rows_forward  # the torch backend's row math
    monkeypatch.setattr(chunked, "rows_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("DPO_FAST_BACKEND", "torch")
    dpo_fast.token_logprobs(torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long))
    assert calls  # the torch backend ran
    monkeypatch.setenv("DPO_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DPO_FAST_BACKEND"):
        dpo_fast.token_logprobs(torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long))


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        dpo_fast.token_logprobs(torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long), backend="triton")


def _long(*shape):
    return torch.zeros(shape, dtype=torch.long)


BAD_INPUTS = [
    # (logits, labels, options, error, message)
    (torch.randn(2, 3, 10), _long(2, 4), {}, ValueError, "labels must have shape"),
    (torch.randn(2, 3, 10), torch.zeros(2, 3), {}, TypeError, "labels must be an integer"),
    (torch.randn(2, 3, 10), torch.full((2, 3), 10), {}, ValueError, r"in \[0, 10\)"),
    (torch.randn(2, 3, 10), torch.full((2, 3), -1), {}, ValueError, "found -1"),
    (torch.randn(2, 3, 0), _long(2, 3), {}, ValueError, "non-empty vocabulary"),
    (torch.randn(10), _long(), {}, ValueError, "at least 2 dims"),
    (torch.randn(2, 3, 10).double(), _long(2, 3), {}, TypeError, "float16"),
    (torch.randn(3, 10), _long(3), {"temperature": 0.0}, ValueError, "temperature"),
    (torch.randn(3, 10), _long(3), {"softcap": -1.0}, ValueError, "softcap"),
    (torch.randn(3, 10), _long(3), {"stats": ["nope"]}, ValueError, "stats"),
    (torch.randn(3, 10), _long(3), {"backend": "cuda"}, ValueError, "backend"),
    ([[0.0]], _long(1), {}, TypeError, "logits must be a torch.Tensor"),
]


@pytest.mark.parametrize(("logits", "labels", "options", "error", "message"), BAD_INPUTS)
def test_bad_input(logits, labels, options, error, message):
    with pytest.raises(error, match=message):
        dpo_fast.token_logprobs(logits, labels, **options)


def test_bad_segment_ids():
    logits, labels = torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="segment_ids must have"):
        dpo_fast.sequence_logprobs(logits, labels, segment_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="segment_ids must be an integer"):
        dpo_fast.sequence_logprobs(logits, labels, segment_ids=torch.zeros(2, 3))


@pytest.mark.gpu
def test_labels_on_another_device():
    with pytest.raises(ValueError, match="labels are on"):
        dpo_fast.token_logprobs(torch.randn(2, 3, 10, device="cuda"), torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(("tokens", "vocab_size"), [(4096, 128256), (2048, 151936)])
def test_real_sizes_on_gpu(backend, tokens, vocab_size):
    logits = (torch.randn(1, tokens, vocab_size, device="cuda") * 3).to(torch.bfloat16)
    labels = make_labels((1, tokens), vocab_size).cuda()
    check_against_reference(logits, labels, backend, shift=True)


@pytest.mark.gpu
def test_more_than_2_pow_31_elements_on_gpu():
    """A [16400, 131072] bf16 tensor (> 2**31 elements): int64 offsets in both kernels."""
    tokens, vocab_size = 16400, 131072
    assert tokens * vocab_size > 2**31
    logits = torch.randn(tokens, vocab_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab_size, (tokens,), device="cuda")
    out = dpo_fast.token_logprobs(logits, labels, backend="triton").logps
    tail = slice(tokens - 8, tokens)
    expected = dense_token_logprobs(logits[tail].detach().double(), labels[tail])
    torch.testing.assert_close(out[tail].double(), expected, atol=2e-5, rtol=1e-5)
    out.sum().backward()
    grad_tail = logits.grad[tail].double()
    probs = logits[tail].detach().double().softmax(-1)
    expected_grad = torch.nn.functional.one_hot(labels[tail], vocab_size).double() - probs
    torch.testing.assert_close(grad_tail, expected_grad, atol=1e-2 * expected_grad.abs().max().item(), rtol=0)


def test_torch_backend_holds_one_chunk_of_softmax(monkeypatch):
    """The chunked backend never hands the reference math more than CHUNK_ELEMENTS logits."""
    import dpo_fast.ops.logprobs as chunked

    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 4 * 1000)
    seen_rows = []
    for name in ("rows_forward", "rows_backward"):
        real = getattr(chunked, name)

        def spy(*args, _real=real, **kwargs):
            x = args[0] if _real.__name__ == "rows_forward" else args[1]
            seen_rows.append(x.shape[0])
            return _real(*args, **kwargs)

        monkeypatch.setattr(chunked, name, spy)
    logits = torch.randn(3, 10, 1000, requires_grad=True)
    labels = make_labels((3, 10), 1000)
    dpo_fast.token_logprobs(logits, labels, shift=True, backend="torch").logps.sum().backward()
    assert max(seen_rows) == 4
    assert sum(seen_rows) == 2 * 3 * 9  # every row once forward, once backward
