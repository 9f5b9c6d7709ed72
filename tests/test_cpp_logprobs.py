"""The C++ CPU backend beyond the core reference suite (which runs it as backend="cpp"):
thread-count independence, the build fallback, the custom-operator registration, and the
code paths the public API does not reach (strided vocabulary, strided or aliased gradients,
chunk boundaries)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import OpRecorder, make_labels

import dpo_fast
from dpo_fast import registry
from dpo_fast.constants import STAT_NAMES
from dpo_fast.formulas import dense_token_logprobs
from dpo_fast.ops import cpp
from dpo_fast.ops.library import stat_mask, stat_names

# Logits per chunk in csrc/logprobs_cpu.cpp: vocabularies around it cross chunk boundaries.
CHUNK = 2048


@pytest.fixture(scope="module")
def cpp_built():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler (the fallback test covers this machine)")
    # where a compiler exists the kernels must build: a silent fallback would let the
    # backend="cpp" reference suite test the torch backend instead
    assert registry.load("logprobs", "cpp"), registry.unavailable_reason("cpp")


needs_cpp = pytest.mark.usefixtures("cpp_built")


def _forward(x, labels, backend="cpp", ignore_index=-100, scale=1.0, softcap=None, stats=STAT_NAMES):
    """The backend's forward operator, statistics by name."""
    registry.load("logprobs", backend)
    mask = stat_mask(stats)
    logp, lse, values = registry.operator("logprobs", "forward", backend)(
        x, labels, ignore_index, scale, softcap, mask, False
    )
    return logp, lse, dict(zip(stat_names(mask), values, strict=True))


def _backward(x, labels, logp, lse, grad_x, grad_logp, ignore_index=-100, scale=1.0, softcap=None):
    torch.ops.dpo_fast.logprobs_backward_cpp(
        grad_logp, x, labels, logp, lse, grad_x, ignore_index, scale, softcap
    )
    return grad_x


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_results_do_not_depend_on_thread_count(dtype, softcap):
    # enough rows that two threads each get some (a thread's grain is 32k logits)
    vocab_size = 3001
    x = (torch.randn(4, 60, vocab_size) * 5).to(dtype)
    labels = make_labels((4, 60), vocab_size)
    grad_logp = torch.randn(4, 60)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            logp, lse, stats = _forward(x, labels, scale=0.9, softcap=softcap)
            grad = _backward(x, labels, logp, lse, torch.empty_like(x), grad_logp, scale=0.9, softcap=softcap)
            results.append((logp, lse, *stats.values(), grad))
    finally:
        torch.set_num_threads(threads)
    for one_thread, two_threads in zip(*results, strict=True):
        assert torch.equal(one_thread, two_threads)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunk_boundaries_and_stats(dtype):
    """Vocabularies that end mid-chunk and mid-vector, labels and arg-max ties on both sides
    of a chunk boundary: against the torch backend and the float64 oracle."""
    vocab_size = 2 * CHUNK + 21
    x = (torch.randn(2, 8, vocab_size) * 3).to(dtype)
    labels = make_labels((2, 8), vocab_size, ignore_frac=0.1)
    # a tie across a chunk boundary: label after the first maximal index -> not top-1
    x[0, 0] = -4.0
    x[0, 0, CHUNK - 1] = x[0, 0, CHUNK + 3] = 6.0
    labels[0, 0] = CHUNK + 3
    # the same tie, label at the first index -> top-1
    x[0, 1] = x[0, 0]
    labels[0, 1] = CHUNK - 1
    # the maximum in the last, partial chunk: the running max rescales the sums
    x[0, 2, -1] = 40.0
    labels[0, 2] = vocab_size - 1
    logp, lse, stats = _forward(x, labels, scale=1.3)
    ref_logp, ref_lse, ref_stats = _forward(x, labels, backend="torch", scale=1.3)
    torch.testing.assert_close(logp, ref_logp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    for name in ("entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(stats[name], ref_stats[name], atol=5e-5, rtol=1e-5)
    assert torch.equal(stats["is_top1"], ref_stats["is_top1"])
    assert not stats["is_top1"][0, 0] and stats["is_top1"][0, 1] and stats["is_top1"][0, 2]
    oracle = dense_token_logprobs(x.double(), labels, logit_scale=1.3)
    torch.testing.assert_close(logp.double(), oracle, atol=2e-5, rtol=1e-5)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 10.0])
def test_strided_vocabulary_and_gradient(dtype, softcap):
    """Logits and gradient with a vocabulary stride != 1 (the gather/scatter paths)."""
    vocab_size = 700
    x = (torch.randn(2, 5, 2 * vocab_size) * 4).to(dtype)[..., ::2]
    labels = make_labels((2, 5), vocab_size)
    grad_logp = torch.randn(2, 5)
    logp, lse, _ = _forward(x, labels, softcap=softcap, stats=())
    grad_storage = torch.full((2, 5, vocab_size, 3), float("nan"), dtype=dtype)
    grad = _backward(x, labels, logp, lse, grad_storage[..., 1], grad_logp, softcap=softcap)
    contiguous = x.contiguous()
    expected_logp, expected_lse, _ = _forward(contiguous, labels, softcap=softcap, stats=())
    expected = _backward(
        contiguous, labels, logp, lse, torch.empty_like(contiguous), grad_logp, softcap=softcap
    )
    assert torch.equal(logp, expected_logp) and torch.equal(lse, expected_lse)
    assert torch.equal(grad, expected)
    # the neighbours of the strided gradient are untouched
    assert grad_storage[..., 0].isnan().all() and grad_storage[..., 2].isnan().all()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 10.0])
def test_inplace_backward_equals_out_of_place(dtype, softcap):
    vocab_size = CHUNK + 77
    x = (torch.randn(3, 4, vocab_size) * 4).to(dtype)
    labels = make_labels((3, 4), vocab_size)
    grad_logp = torch.randn(3, 4)
    logp, lse, _ = _forward(x, labels, scale=0.7, softcap=softcap, stats=())
    expected = _backward(x, labels, logp, lse, torch.empty_like(x), grad_logp, scale=0.7, softcap=softcap)
    work = x.clone()
    _backward(work, labels, logp, lse, work, grad_logp, scale=0.7, softcap=softcap)
    assert torch.equal(work, expected)


@needs_cpp
def test_nan_logit_gives_nan():
    x = torch.randn(1, 3, 5000)
    x[0, 1, 4000] = float("nan")
    logp, _, stats = _forward(x, torch.tensor([[1, 2, 3]]), stats=("entropy",))
    assert torch.isfinite(logp[0, [0, 2]]).all()
    assert logp[0, 1].isnan() and stats["entropy"][0, 1].isnan()


@needs_cpp
def test_operator_checks_its_arguments():
    x = torch.randn(2, 3, 10)
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 10\)"):
        _forward(x, torch.full((2, 3), 10))
    with pytest.raises(RuntimeError, match="labels must be a contiguous CPU Long"):
        _forward(x, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"shape \(B, T, V\)"):
        _forward(x[0], torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        _forward(x.double(), torch.zeros(2, 3, dtype=torch.long))
    logp, lse, _ = _forward(x, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="grad_x must match"):
        _backward(x, torch.zeros(2, 3, dtype=torch.long), logp, lse, torch.empty(2, 3, 11), torch.ones(2, 3))


@needs_cpp
def test_registered_as_custom_operators():
    x = torch.randn(2, 5, 300)
    labels = make_labels((2, 5), 300)
    ops = torch.ops.dpo_fast
    logp, lse, stats = ops.logprobs_forward_cpp(
        x, labels, -100, 1.0, None, stat_mask(["is_top1", "entropy"]), False
    )
    assert stats[0].dtype == torch.float32 and stats[1].dtype == torch.bool  # STAT_NAMES order
    grad = torch.empty_like(x)
    torch.library.opcheck(ops.logprobs_forward_cpp, (x, labels, -100, 0.5, 3.0, stat_mask(STAT_NAMES), False))
    torch.library.opcheck(
        ops.logprobs_backward_cpp, (torch.randn(2, 5), x, labels, logp, lse, grad, -100, 0.5, 3.0)
    )

    @torch.compile(backend="eager", fullgraph=True)
    def traced(x, labels):
        return ops.logprobs_forward_cpp(x, labels, -100, 1.0, None, 0, False)[0]

    assert torch.equal(traced(x, labels), logp)


@needs_cpp
def test_buffer_cache_reuses_freed_blocks_that_fit():
    cpp.empty_cache()
    block = cpp.empty((1000, 250), torch.float32)  # 1 MB
    address = block.data_ptr()
    del block
    # a request that would waste more than half of the idle block gets a block of its own
    small = cpp.empty((100, 250), torch.float32)
    assert small.data_ptr() != address
    reused = cpp.empty((1200, 250), torch.bfloat16)  # 600 kB
    assert reused.data_ptr() == address and reused.shape == (1200, 250) and reused.is_contiguous()
    # like torch.empty its values are arbitrary: check the schema and the fake, not the bits
    torch.library.opcheck(
        torch.ops.dpo_fast.cached_empty_cpu,
        ([3, 4], torch.float16),
        test_utils=("test_schema", "test_faketensor"),
    )


@needs_cpp
@pytest.mark.parametrize("shift", [False, True])
def test_gradient_in_a_reused_poisoned_block(shift):
    """The gradient buffer comes from the cache uninitialized: every element, including the
    unscored last position of a shifted batch, must be written."""
    cpp.empty_cache()
    x = (torch.randn(3, 7, 301) * 4).requires_grad_()
    labels = make_labels((3, 7), 301)
    cpp.empty(x.shape, x.dtype).fill_(float("nan"))  # freed at once: the next same-size request gets it
    grad_logp = torch.randn(3, 6 if shift else 7)
    (dpo_fast.token_logprobs(x, labels, shift=shift, backend="cpp").logps * grad_logp).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (dense_token_logprobs(x64, labels, shift=shift) * grad_logp.double()).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-6)


@needs_cpp
def test_auto_picks_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv("DPO_FAST_BACKEND", raising=False)
    with OpRecorder() as ran:
        dpo_fast.token_logprobs(torch.randn(2, 3, 10), torch.zeros(2, 3, dtype=torch.long))
    assert ran.names == ["dpo_fast::logprobs_forward_cpp"]


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import warnings
    import torch
    import dpo_fast
    from dpo_fast.formulas import dense_token_logprobs

    logits = torch.randn(2, 3, 50, requires_grad=True)
    labels = torch.randint(0, 50, (2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = dpo_fast.token_logprobs(logits, labels).logps
        forced = dpo_fast.token_logprobs(logits, labels, backend="cpp").logps
        (auto.sum() + forced.sum()).backward()
    messages = [str(w.message) for w in caught if "C++ CPU kernels" in str(w.message)]
    assert len(messages) == 1, messages
    assert "using the PyTorch backend" in messages[0]
    expected = dense_token_logprobs(logits.detach().double(), labels).float()
    torch.testing.assert_close(auto, expected)
    torch.testing.assert_close(forced, expected)
    print("fell back once")
    """
)


def test_without_a_compiler_falls_back_with_one_warning(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path))
    env.pop("DPO_FAST_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "fell back once" in result.stdout
