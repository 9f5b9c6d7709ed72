"""``torch.compile(fullgraph=True)`` of every public function: no graph break, and the
results and gradients of eager mode.

``backend="eager"`` (Dynamo only) runs every case on every dpo_fast backend; ``"aot_eager"``
adds AOTAutograd (the fakes, functionalization, the autograd formulas traced) and
``"inductor"`` the full compiler, on the default CPU backend (its C++ compile is the slow part).
The Triton kernels compiled by Inductor are checked by the GPU-marked test.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_labels

import dpo_fast

CPU_BACKENDS = ["torch", "cpp", "triton"]


def _compiled(fn, compiler):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=compiler)


def _assert_same(eager, compiled):
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _run_with_grads(fn, leaves, *args):
    for leaf in leaves:
        leaf.grad = None
    out = fn(*leaves, *args)
    out.sum().backward()
    return [out.detach(), *(leaf.grad for leaf in leaves)]


@pytest.mark.parametrize(
    ("backend", "compiler"),
    [(b, "eager") for b in CPU_BACKENDS] + [("cpp", "aot_eager"), ("cpp", "inductor")],
)
def test_token_and_sequence_logprobs(backend, compiler):
    logits = (torch.randn(2, 6, 41) * 3).requires_grad_()
    labels = make_labels((2, 6), 41)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 3, 3, 3, 3]])

    def fn(logits, labels, segments):
        per_token = dpo_fast.token_logprobs(
            logits, labels, shift=True, softcap=5.0, stats=("entropy",), backend=backend
        )
        sums = dpo_fast.sequence_logprobs(
            logits, labels, shift=True, segment_ids=segments, num_segments=4, backend=backend
        )
        return per_token.logps.sum(-1) + per_token.stats["entropy"].sum(-1) + sums.logps.sum(-1)

    eager = _run_with_grads(fn, [logits], labels, segments)
    _assert_same(eager, _run_with_grads(_compiled(fn, compiler), [logits], labels, segments))


@pytest.mark.parametrize(
    ("backend", "compiler"),
    [(b, "eager") for b in CPU_BACKENDS] + [("cpp", "aot_eager"), ("cpp", "inductor")],
)
def test_linear_logprobs(backend, compiler):
    """The scored-row gather is data-dependent; it happens inside the operator, so nothing needs
    ``capture_dynamic_output_shape_ops``."""
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = (torch.randn(53, 16) * 0.3).requires_grad_()
    bias = torch.randn(53, requires_grad=True)
    labels = make_labels((2, 7), 53)

    def fn(hidden, weight, bias, labels):
        per_token = dpo_fast.linear_token_logprobs(
            hidden, weight, labels, bias=bias, shift=True, logit_scale=1.5, backend=backend
        )
        sums = dpo_fast.linear_sequence_logprobs(
            hidden, weight, labels, bias=bias, average=True, backend=backend
        )
        return per_token.logps.sum(-1) + sums.logps

    leaves = [hidden, weight, bias]
    eager = _run_with_grads(fn, leaves, labels)
    _assert_same(eager, _run_with_grads(_compiled(fn, compiler), leaves, labels))


@pytest.mark.gpu
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_triton_ops_compiled_on_gpu(compiler):
    logits = (torch.randn(4, 64, 32000, device="cuda") * 3).bfloat16().requires_grad_()
    labels = make_labels((4, 64), 32000).cuda()
    hidden = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(32000, 256, device="cuda") * 0.05).bfloat16().requires_grad_()

    def fn(logits, hidden, weight, labels):
        a = dpo_fast.token_logprobs(logits, labels, shift=True).logps
        b = dpo_fast.linear_token_logprobs(hidden, weight, labels, shift=True).logps
        return a + b

    leaves = [logits, hidden, weight]
    eager = _run_with_grads(fn, leaves, labels)
    compiled = _run_with_grads(_compiled(fn, compiler), leaves, labels)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_concatenated_forward(layout, compiler, monkeypatch):
    """A tiny Llama end to end. The number of completion tokens is data-dependent, which needs
    ``capture_dynamic_output_shape_ops``; the self-check runs on the first, eager call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_fast.collate import PreferenceCollator

    monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", True)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    pairs = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8]},
        {"prompt_ids": [9, 10], "chosen_ids": [11], "rejected_ids": [12, 13]},
    ]
    batch = PreferenceCollator(layout=layout, pad_token_id=0)(pairs)
    leaves = list(model.parameters())

    def fn(*_):
        out = dpo_fast.concatenated_forward(model, batch, layout=layout)
        return out.chosen_logps - 0.5 * out.rejected_logps

    eager = _run_with_grads(fn, leaves)
    _assert_same(eager, _run_with_grads(_compiled(fn, compiler), leaves))


def test_self_check_refuses_to_run_inside_a_compiled_graph(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_fast.collate import PreferenceCollator

    monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", True)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config)
    batch = PreferenceCollator(layout="padded", pad_token_id=0)(
        [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}]
    )
    compiled = _compiled(lambda b: dpo_fast.concatenated_forward(model, b).chosen_logps, "eager")
    with pytest.raises(Exception, match=r"call concatenated_forward once without torch\.compile"):
        compiled(batch)
    unchecked = _compiled(
        lambda b: dpo_fast.concatenated_forward(model, b, check=False).chosen_logps, "eager"
    )
    torch.testing.assert_close(unchecked(batch), dpo_fast.concatenated_forward(model, batch).chosen_logps)
