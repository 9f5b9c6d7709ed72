"""concatenated_forward on tiny random Hugging Face causal LMs against the naive full-logits path.

The oracle is the model itself in float64: ``model(input_ids, attention_mask).logits`` ->
``log_softmax`` -> gather -> masked sum over the padded TRL batch, differentiated by autograd.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers
from torch import nn

from dpo_fast import STAT_NAMES, concatenated_forward
from dpo_fast.collate import PreferenceCollator

VOCAB = 128
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# name -> (config class, model class, config kwargs, attention implementation)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**SMALL, **HEADS}, "sdpa"),
    # a window shorter than the sequences: the masks must apply it in position space
    "mistral": ("MistralConfig", "MistralForCausalLM", {**SMALL, **HEADS, "sliding_window": 5}, "sdpa"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**SMALL, **HEADS}, "sdpa"),
    # soft-capped logits; sliding and full layers alternate (a dict of masks); eager attention
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**SMALL, **HEADS, "head_dim": 8, "final_logit_softcapping": 2.0, "sliding_window": 4},
        "eager",
    ),
    # tied embeddings, biases everywhere, learned absolute positions
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
        "sdpa",
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**SMALL, **HEADS}, "sdpa"),
    # a bias on the lm_head itself, partial rotary embeddings
    "phi": ("PhiConfig", "PhiForCausalLM", {**SMALL, **HEADS, "partial_rotary_factor": 0.5}, "eager"),
    # logits divided by config.logits_scaling
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {**SMALL, **HEADS, "logits_scaling": 4.0, "embedding_multiplier": 2.0, "attention_multiplier": 0.3},
        "sdpa",
    ),
}
LAYOUTS = ("padded", "packed", "prefix_shared")


def make_model(name: str) -> nn.Module:
    config_class, model_class, kwargs, attention = ARCHITECTURES[name]
    # a wide init so logits spread over several units: soft-capping and scaling matter
    config = getattr(transformers, config_class)(**kwargs, **TOKENS, initializer_range=0.2)
    config._attn_implementation = attention
    return getattr(transformers, model_class)(config).eval()


def random_examples(num_pairs: int = 3, *, prompt=(5, 9), completion=(1, 6)) -> list[dict]:
    rng = random.Random(torch.randint(0, 2**31, ()).item())

    def ids(bounds):
        return [rng.randrange(3, VOCAB) for _ in range(rng.randint(*bounds))]

    return [
        {"prompt_ids": ids(prompt), "chosen_ids": ids(completion), "rejected_ids": ids(completion)}
        for _ in range(num_pairs)
    ]


def naive_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-logits path, one unpadded sequence at a time (no mask for transformers to get
    wrong: its float64 eager masks overflow to NaN on padding rows).

    Returns the per-sequence sums ``(2B,)`` and the logits predicting each completion token
    ``(N, V)``, sequence-major.
    """
    sums, scored_logits = [], []
    for ids, attention, completion in zip(
        batch["input_ids"], batch["attention_mask"], batch["completion_mask"], strict=True
    ):
        ids, completion = ids[attention.bool()], completion[attention.bool()]
        logits = model(input_ids=ids[None]).logits[0, :-1]
        scored = completion[1:].bool()
        logp = logits.log_softmax(-1).gather(-1, ids[1:, None]).squeeze(-1)
        sums.append(logp[scored].sum())
        scored_logits.append(logits[scored])
    return torch.stack(sums), torch.cat(scored_logits)


def loss_of(chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (torch.cat([chosen, rejected]).double() * weights).sum()


def assert_grads_close(model: nn.Module, oracle: nn.Module, rtol: float = 1e-4) -> None:
    oracle_params = dict(oracle.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        expected = oracle_params[name].grad
        assert (param.grad is None) == (expected is None), name
        if expected is None:
            continue
        scale = expected.abs().max().item()
        error = (param.grad.double() - expected).abs().max().item()
        assert error <= rtol * scale + 1e-9, f"{name}: max error {error:.3g} vs max |grad| {scale:.3g}"
        checked += 1
    assert checked > 0


def run_and_compare(model, examples, layout, *, batch=None, **kwargs):
    """Our layout vs the float64 naive path: log-probs, token counts and every gradient."""
    oracle = copy.deepcopy(model).double()
    padded = PreferenceCollator(layout="padded")(examples)
    expected, _ = naive_logps(oracle, padded)
    weights = torch.randn(expected.shape, dtype=torch.float64)
    loss_of(*expected.chunk(2), weights).backward()

    batch = PreferenceCollator(layout=layout)(examples) if batch is None else batch
    out = concatenated_forward(model, batch, layout=layout, **kwargs)
    assert out.chosen_logps.dtype == torch.float32 and out.chosen_tokens.dtype == torch.int64
    got = torch.cat([out.chosen_logps, out.rejected_logps]).double()
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    counts = (padded["completion_mask"][:, 1:] * padded["attention_mask"][:, 1:]).sum(-1)
    assert torch.equal(torch.cat([out.chosen_tokens, out.rejected_tokens]), counts)
    loss_of(out.chosen_logps, out.rejected_logps, weights).backward()
    assert_grads_close(model, oracle)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_layouts_match_naive_path(name, layout):
    run_and_compare(make_model(name), random_examples(), layout, backend="torch")


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_padded_batch_is_relaid_out(layout):
    """A TRL padded batch given to another layout is converted, with the same results."""
    examples = random_examples(4)
    run_and_compare(
        make_model("qwen2"), examples, layout, batch=PreferenceCollator()(examples), backend="torch"
    )


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_one_long_packed_row(layout):
    examples = random_examples(4)
    batch = PreferenceCollator(layout=layout, pack_length=1000)(examples)
    assert batch["input_ids"].shape[0] == 1
    run_and_compare(make_model("mistral"), examples, layout, batch=batch, backend="torch")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_match_naive_path(layout):
    model = make_model("gemma2")
    examples = random_examples(3)
    padded = PreferenceCollator()(examples)
    with torch.no_grad():
        _, logits = naive_logps(copy.deepcopy(model).double(), padded)
    out = concatenated_forward(
        model, PreferenceCollator(layout=layout)(examples), layout=layout, stats=STAT_NAMES, backend="torch"
    )
    scored = (padded["completion_mask"][:, 1:] * padded["attention_mask"][:, 1:]).bool()
    counts = scored.sum(-1)
    assert torch.equal(out.token_mask, torch.arange(int(counts.max())) < counts[:, None])
    z = logits  # the model's own (soft-capped) logits, sequence-major
    logp = z.log_softmax(-1)
    labels = padded["input_ids"][:, 1:][scored]
    expected = {
        "entropy": -(logp.exp() * logp).sum(-1),
        "mean_logits": z.mean(-1),
        "is_top1": z.argmax(-1) == labels,
        "log_sum_sq_probs": torch.logsumexp(2 * logp, -1),
    }
    for name in STAT_NAMES:
        got = out.stats[name][out.token_mask]
        assert out.stats[name].shape == out.token_mask.shape
        assert not out.stats[name][~out.token_mask].any(), name
        if name == "is_top1":
            assert torch.equal(got, expected[name]), name
        else:
            torch.testing.assert_close(got.double(), expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_grad_false_builds_no_graph():
    model = make_model("llama")
    batch = PreferenceCollator(layout="prefix_shared")(random_examples())
    with_grad = concatenated_forward(model, batch, layout="prefix_shared", backend="torch")
    without = concatenated_forward(model, batch, layout="prefix_shared", grad=False, backend="torch")
    assert with_grad.chosen_logps.requires_grad and not without.chosen_logps.requires_grad
    assert without.chosen_logps.grad_fn is None and without.rejected_logps.grad_fn is None
    torch.testing.assert_close(without.chosen_logps, with_grad.chosen_logps.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rejected_emptied_by_truncation_counts_zero(layout):
    """TRL truncates [prompt | completion] as a whole: a long prompt can leave a completion
    with no token. Documented behaviour: log-prob 0.0 over 0 tokens, the rest unaffected."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = random_examples(3, prompt=(2, 5), completion=(2, 5))
    examples[1]["prompt_ids"] = list(range(3, 15))
    batch = DataCollatorForPreference(pad_token_id=0, max_length=12)(examples)
    assert batch["completion_mask"][[1, 4]].sum() == 0
    model = make_model("llama")
    expected, _ = naive_logps(copy.deepcopy(model).double(), batch)
    out = concatenated_forward(model, batch, layout=layout, backend="torch")
    assert out.chosen_tokens[1] == 0 and out.rejected_tokens[1] == 0
    assert out.chosen_logps[1] == 0 and out.rejected_logps[1] == 0
    got = torch.cat([out.chosen_logps, out.rejected_logps]).double()
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(make_model("llama"), config)
    run_and_compare(model, random_examples(), "prefix_shared", backend="torch")
    trained = [name for name, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in name for name in trained)


def _scale_logits(model: nn.Module, factor: float) -> list[int]:
    """Monkey-patch ``model.forward`` to scale its logits; returns a call counter."""
    original, calls = model.forward, [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        out = original(*args, **kwargs)
        out.logits = out.logits * factor
        return out

    model.forward = forward
    return calls


@pytest.mark.parametrize("layout", LAYOUTS)
def test_self_check_fires_on_undeclared_logit_transform(layout):
    model = make_model("llama")
    _scale_logits(model, 1.5)
    batch = PreferenceCollator(layout=layout)(random_examples())
    with pytest.raises(ValueError, match=r"self-check failed for LlamaForCausalLM .*max \|difference\|"):
        concatenated_forward(model, batch, layout=layout, backend="torch")
    concatenated_forward(model, batch, layout=layout, check=False, backend="torch")


def test_self_check_runs_once_per_model_and_layout():
    model = make_model("llama")
    calls = _scale_logits(model, 1.0)
    batch = PreferenceCollator(layout="packed")(random_examples())
    for _ in range(2):
        concatenated_forward(model, batch, layout="packed", backend="torch")
    assert calls[0] == 1
    concatenated_forward(model, PreferenceCollator()(random_examples()), backend="torch")
    assert calls[0] == 2


def test_self_check_picks_the_logits_scaling_reading():
    """``logits_scaling`` divides in Granite and multiplies in HyperCLOVA X: a model that
    multiplies (emulated by patching Granite) is matched by the second reading."""
    model = make_model("granite")
    oracle = copy.deepcopy(model).double()
    scaling = model.config.logits_scaling
    for m in (model, oracle):
        _scale_logits(m, scaling**2)  # Granite divides by s; times s^2 makes it multiply
    examples = random_examples()
    out = concatenated_forward(
        model, PreferenceCollator(layout="packed")(examples), layout="packed", backend="torch"
    )
    expected, _ = naive_logps(oracle, PreferenceCollator()(examples))
    got = torch.cat([out.chosen_logps, out.rejected_logps]).double()
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)
    other = make_model("granite")
    _scale_logits(other, 3.0)  # neither reading fits: both are reported
    with pytest.raises(ValueError, match=r"GraniteForCausalLM.*logit_scale=0.25.*logit_scale=4,"):
        concatenated_forward(other, PreferenceCollator()(examples), backend="torch")


def test_triton_backend_under_interpreter():
    run_and_compare(make_model("gpt2"), random_examples(2), "prefix_shared", backend="triton")


# ---------------------------------------------------------------- bad input


def test_odd_number_of_rows():
    batch = PreferenceCollator()(random_examples(2))
    batch = {key: value[:3] for key, value in batch.items()}
    with pytest.raises(ValueError, match=r"\[2B, T\].*shape \(3, \d+\).*odd number of rows"):
        concatenated_forward(make_model("llama"), batch)


@pytest.mark.parametrize("key", ["attention_mask", "completion_mask"])
def test_mask_of_the_wrong_shape(key):
    batch = PreferenceCollator()(random_examples(2))
    batch[key] = batch[key][:, :-1]
    with pytest.raises(ValueError, match=rf"batch\['{key}'\] must have input_ids' shape"):
        concatenated_forward(make_model("llama"), batch)


def test_missing_mask():
    batch = PreferenceCollator()(random_examples(2))
    del batch["completion_mask"]
    with pytest.raises(ValueError, match=r"batch\['completion_mask'\] must be a tensor"):
        concatenated_forward(make_model("llama"), batch)


def test_model_without_output_embedding():
    backbone = make_model("llama").model  # LlamaModel: no lm_head
    with pytest.raises(ValueError, match="LlamaModel has no output embedding"):
        concatenated_forward(backbone, PreferenceCollator()(random_examples(2)))


def test_unknown_layout():
    with pytest.raises(ValueError, match=r"layout must be one of .*got 'unpadded'"):
        concatenated_forward(make_model("llama"), PreferenceCollator()(random_examples(2)), layout="unpadded")


def test_prefix_shared_rows_with_different_prompts():
    examples = random_examples(2)
    batch = PreferenceCollator()(examples)
    batch["input_ids"][3, 0] = (batch["input_ids"][3, 0] + 1) % VOCAB  # rejected row of pair 1
    with pytest.raises(ValueError, match=r"pair 1 has a prompt .* in row 1 and a different one .* in row 3"):
        concatenated_forward(make_model("llama"), batch, layout="prefix_shared")
    concatenated_forward(
        make_model("llama"), batch, layout="packed", backend="torch"
    )  # packing needs no sharing


def test_block_batch_for_padded_layout():
    batch = PreferenceCollator(layout="packed")(random_examples(2))
    with pytest.raises(ValueError, match="layout='padded' got a packed/prefix-shared batch"):
        concatenated_forward(make_model("llama"), batch)


def test_block_batch_field_of_the_wrong_shape():
    batch = PreferenceCollator(layout="prefix_shared")(random_examples(2))
    batch["doc_ids"] = batch["doc_ids"][:, 1:]
    with pytest.raises(ValueError, match=r"batch\['doc_ids'\] must have input_ids' shape"):
        concatenated_forward(make_model("llama"), batch, layout="prefix_shared")


def test_unknown_stat():
    with pytest.raises(ValueError, match="stats must be names from"):
        concatenated_forward(
            make_model("llama"), PreferenceCollator()(random_examples(2)), stats=("perplexity",)
        )


def test_lora_on_the_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"output embedding of LlamaForCausalLM is a Linear.*plain"):
        concatenated_forward(model, PreferenceCollator()(random_examples(2)))


def test_autocast_bf16():
    """fp32 weights under bf16 autocast (mixed-precision training): the head computes in bf16
    like F.linear would, log-probs stay fp32 and close to the fp32 result."""
    model = make_model("llama")
    batch = PreferenceCollator(layout="packed")(random_examples())
    exact = concatenated_forward(model, batch, layout="packed", backend="torch", grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = concatenated_forward(model, batch, layout="packed", backend="torch")
    assert out.chosen_logps.dtype == torch.float32
    torch.testing.assert_close(out.chosen_logps.detach(), exact.chosen_logps, rtol=5e-2, atol=5e-2)
    out.chosen_logps.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32 and model.lm_head.weight.grad.abs().sum() > 0
