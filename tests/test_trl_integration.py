"""dpo_fast.integrations.trl: our head behind TRL's `fused_lm_head` protocol gives TRL's results.

The head alone is compared field by field with TRL's own head on the same tiny model; then
``trl.DPOTrainer`` trains a tiny random Llama for 10 steps on the bundled hh-rlhf pairs with
and without our head, same seed, and the logged per-step metrics must agree.
"""

import copy
import functools
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl.trainer.utils import add_fused_lm_head as trl_add_fused_lm_head  # noqa: E402

import dpo_fast.integrations.trl as fast_trl  # noqa: E402
from dpo_fast.app.pairs import load_preference_data, train_bpe_tokenizer  # noqa: E402

STEPS = 10
METRICS = ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen", "rewards/chosen")


@pytest.fixture(scope="module")
def pairs():
    # the pairs with the shortest prompts, so short max_length truncates completions, not prompts
    return sorted(load_preference_data(), key=lambda pair: len(pair["prompt"]))[:24]


@pytest.fixture(scope="module")
def tokenizer(pairs):
    return train_bpe_tokenizer(pairs, vocab_size=300)


def tiny_llama(tokenizer, **config) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **config,
    )
    return LlamaForCausalLM(config).float()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of our kernel from the TRL head, so a test sees that it really ran."""
    calls = []
    kernel = fast_trl.linear_token_logprobs

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fast_trl, "linear_token_logprobs", counting)
    return calls


@pytest.fixture
def lowered(monkeypatch):
    """The layouts our head re-laid batches out to (proof that a layout path ran)."""
    layouts = []
    scored_rows = fast_trl.scored_rows

    def recording(model, batch, layout, **kwargs):
        layouts.append(layout)
        return scored_rows(model, batch, layout, **kwargs)

    monkeypatch.setattr(fast_trl, "scored_rows", recording)
    return layouts


def random_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels = input ids with a random ~half of the positions ignored (-100)."""
    return input_ids.masked_fill(torch.rand(input_ids.shape) < 0.5, -100)


FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs", "label_mask", "loss")


def assert_same_outputs(ours_out, theirs_out) -> None:
    """Every field of TRL's fused-head output matches; fields TRL left None are None in ours."""
    for field in FIELDS:
        a, b = getattr(ours_out, field), getattr(theirs_out, field)
        if b is None:  # not requested
            assert a is None, field
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, field
        if a.dtype == torch.bool:
            # a near-tie between the label's logit and the arg-max may resolve either way
            assert (a != b).float().mean() <= 0.05, field
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=field)


def assert_same_parameter_grads(model, ours_out, theirs, theirs_out) -> None:
    """Gradients of one random weighting of the log-probs agree on every parameter."""
    weights = torch.randn_like(ours_out.log_probs)
    (ours_out.log_probs * weights).sum().backward()
    (theirs_out.log_probs * weights).sum().backward()
    # two fp32 evaluations differ by rounding, which the backbone's backward spreads over every
    # parameter: entries near zero are compared against the gradient's largest entry
    for (name, p), q in zip(model.named_parameters(), theirs.parameters(), strict=True):
        atol = 1e-5 * q.grad.abs().max().item()
        torch.testing.assert_close(
            p.grad, q.grad, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize(
    "transform",
    [{}, {"final_logit_softcapping": 2.0, "logit_scale": 3.0}, {"logits_scaling": 4.0}],
    ids=["plain", "softcap-scale", "granite-scaling"],
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_head_matches_trl_head(tokenizer, kernel_calls, transform, temperature):
    model = tiny_llama(tokenizer)
    for name, value in transform.items():
        setattr(model.config, name, value)
    # a head bias exercises the bias path (Llama has none)
    model.lm_head.bias = torch.nn.Parameter(torch.randn(model.config.vocab_size))
    theirs = copy.deepcopy(model)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    fast_trl.add_fused_lm_head(model, temperature=temperature, outputs=outputs)
    trl_add_fused_lm_head(theirs, temperature=temperature, outputs=outputs)

    input_ids = torch.randint(2, model.config.vocab_size, (3, 11))
    labels = random_labels(input_ids)
    ours_out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
    theirs_out = theirs(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert kernel_calls, "our kernel did not run"
    assert_same_outputs(ours_out, theirs_out)
    assert not ours_out.log_probs[~ours_out.label_mask].any(), "ignored positions must be 0"
    assert_same_parameter_grads(model, ours_out, theirs, theirs_out)


def test_head_shift_labels_num_items_and_plain_forward(tokenizer):
    model = tiny_llama(tokenizer)
    theirs = copy.deepcopy(model)
    fast_trl.add_fused_lm_head(model)
    trl_add_fused_lm_head(theirs)
    input_ids = torch.randint(2, model.config.vocab_size, (2, 9))
    shift_labels = random_labels(input_ids)
    for kwargs in ({"shift_labels": shift_labels}, {"labels": shift_labels, "num_items_in_batch": 7}):
        ours_out = model(input_ids=input_ids, fused_lm_head=True, **kwargs)
        theirs_out = theirs(input_ids=input_ids, fused_lm_head=True, **kwargs)
        torch.testing.assert_close(ours_out.log_probs, theirs_out.log_probs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_out.loss, theirs_out.loss, rtol=1e-5, atol=1e-6)
    assert ours_out.entropy is None and ours_out.is_top1 is None  # not requested
    # without fused_lm_head the model's own forward runs: logits and its own loss
    plain = model(input_ids=input_ids, labels=input_ids)
    reference = theirs(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(plain.logits, reference.logits)
    torch.testing.assert_close(plain.loss, reference.loss)


@pytest.mark.parametrize("cast_to_fp32", [False, True])
def test_head_under_bf16_autocast(tokenizer, cast_to_fp32):
    """TRL's default on CPU: bf16 autocast with fp32 weights; the head runs in bf16 (or fp32
    with ``cast_lm_head_to_fp32``) like TRL's, and the weights get fp32 gradients."""
    model = tiny_llama(tokenizer)
    theirs = copy.deepcopy(model)
    fast_trl.add_fused_lm_head(model, cast_lm_head_to_fp32=cast_to_fp32)
    trl_add_fused_lm_head(theirs, cast_lm_head_to_fp32=cast_to_fp32)
    input_ids = torch.randint(2, model.config.vocab_size, (2, 12))
    labels = random_labels(input_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        theirs_out = theirs(input_ids=input_ids, labels=labels, fused_lm_head=True)
    assert ours_out.log_probs.dtype == torch.float32
    tolerance = 1e-5 if cast_to_fp32 else 3e-2  # bf16 logits: ~3 significant digits
    torch.testing.assert_close(ours_out.log_probs, theirs_out.log_probs, rtol=tolerance, atol=tolerance)
    ours_out.log_probs.sum().backward()
    theirs_out.log_probs.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(
        model.lm_head.weight.grad, theirs.lm_head.weight.grad, rtol=10 * tolerance, atol=10 * tolerance
    )


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
    )
    return MixtralForCausalLM(config).float()


def test_head_moe_router_aux_loss_matches_trl():
    """MoE models that request router logits add TRL's load-balancing loss."""
    model = tiny_mixtral()
    theirs = copy.deepcopy(model)
    fast_trl.add_fused_lm_head(model)
    trl_add_fused_lm_head(theirs)
    input_ids = torch.randint(0, 61, (2, 9))
    kwargs = {"input_ids": input_ids, "labels": random_labels(input_ids), "fused_lm_head": True}
    ours_out, theirs_out = model(**kwargs), theirs(**kwargs)
    assert ours_out.aux_loss is not None and float(ours_out.aux_loss) > 0
    torch.testing.assert_close(ours_out.aux_loss, theirs_out.aux_loss)
    torch.testing.assert_close(ours_out.loss, theirs_out.loss, rtol=1e-5, atol=1e-6)


def test_head_all_positions_ignored_gives_connected_zero(tokenizer):
    model = tiny_llama(tokenizer)
    fast_trl.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    input_ids = torch.randint(2, model.config.vocab_size, (2, 6))
    out = model(input_ids=input_ids, labels=torch.full_like(input_ids, -100), fused_lm_head=True)
    assert out.log_probs.shape == (2, 5) and not out.log_probs.any() and not out.entropy.any()
    out.log_probs.sum().backward()  # must not fail: TRL relies on it for all-masked micro-batches
    assert model.lm_head.weight.grad is not None and not model.lm_head.weight.grad.any()


def preference_batch(vocab_size: int, pairs: int = 3):
    """TRL's padded layout: B chosen rows then B rejected rows, [prompt | completion | pad]."""
    rows, prompts = [], []
    for _ in range(pairs):
        prompts.append(torch.randint(2, vocab_size, (int(torch.randint(1, 6, ())),)))
    for _ in range(2):
        for prompt in prompts:
            completion = torch.randint(2, vocab_size, (int(torch.randint(1, 6, ())),))
            rows.append((prompt, completion))
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(completion)
        input_ids[i, : n + m] = torch.cat([prompt, completion])
        attention_mask[i, : n + m] = 1
        labels[i, n : n + m] = completion
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_head_layouts_match_trl_head(tokenizer, kernel_calls, lowered, layout):
    model = tiny_llama(tokenizer)
    theirs = copy.deepcopy(model)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    fast_trl.add_fused_lm_head(model, outputs=outputs, layout=layout)
    trl_add_fused_lm_head(theirs, outputs=outputs)
    input_ids, attention_mask, labels = preference_batch(model.config.vocab_size)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "fused_lm_head": True,
    }
    ours_out, theirs_out = model(**kwargs), theirs(**kwargs)
    assert kernel_calls and lowered == [layout]
    assert_same_outputs(ours_out, theirs_out)
    assert_same_parameter_grads(model, ours_out, theirs, theirs_out)
    # what a re-laid-out batch cannot carry is refused, not ignored
    with pytest.raises(NotImplementedError, match="position_ids"):
        model(**kwargs, position_ids=torch.arange(input_ids.shape[1]).expand_as(input_ids))


def test_unknown_output_name_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="logps"):
        fast_trl.add_fused_lm_head(tiny_llama(tokenizer), outputs=("log_probs", "logps"))


def test_version_check(monkeypatch):
    fast_trl.check_trl_version("1.16.0")
    fast_trl.check_trl_version("1.15.2")
    for version in ("1.14.0", "1.17.0", "0.29.1"):
        with pytest.raises(RuntimeError, match=f"found trl {version}"):
            fast_trl.check_trl_version(version)
    monkeypatch.setattr(trl, "__version__", "2.0.0")
    with pytest.raises(RuntimeError, match="supports trl"):
        fast_trl.patch()
    assert trl.trainer.dpo_trainer.add_fused_lm_head is trl_add_fused_lm_head


def test_patch_unpatch_and_context():
    module = trl.trainer.dpo_trainer
    try:
        fast_trl.patch()
        fast_trl.patch()  # idempotent
        assert module.add_fused_lm_head is fast_trl.add_fused_lm_head
        with fast_trl.patched("packed"):
            assert module.add_fused_lm_head.keywords == {"layout": "packed"}
        assert module.add_fused_lm_head is fast_trl.add_fused_lm_head, "patched() must keep an outer patch"
        with pytest.raises(ValueError, match="layout"):
            fast_trl.patch("ragged")
    finally:
        fast_trl.unpatch()
    fast_trl.unpatch()  # idempotent
    assert module.add_fused_lm_head is trl_add_fused_lm_head
    with fast_trl.patched():
        assert module.add_fused_lm_head is fast_trl.add_fused_lm_head
    assert module.add_fused_lm_head is trl_add_fused_lm_head


def train_trl(trainer_cls, pairs, tokenizer, tmp_path, seed, **dpo_args) -> list[dict]:
    """10 DPO steps of ``trainer_cls`` on the pairs; the per-step logs."""
    torch.manual_seed(seed)
    model = tiny_llama(tokenizer)
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=seed,
        max_length=64,
        use_cpu=True,
        bf16=False,  # TRL's default: bf16 autocast, even on CPU
        disable_tqdm=True,
        **dpo_args,
    )
    trainer = trainer_cls(
        model=model,
        ref_model=copy.deepcopy(model),
        args=args,
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=tokenizer,
    )
    trainer.train()
    assert len(trainer.train_dataset) == len(pairs), "TRL dropped pairs: prompts too long for max_length"
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == STEPS
    return logs


SEED = 20240601


@pytest.fixture(scope="module")
def trl_logs(pairs, tokenizer, tmp_path_factory):
    """TRL's own per-step logs for a set of DPO arguments, computed once per module."""
    done = {}

    def logs(**dpo_args):
        key = repr(sorted(dpo_args.items()))
        if key not in done:
            directory = tmp_path_factory.mktemp("trl")
            done[key] = train_trl(trl.DPOTrainer, pairs, tokenizer, directory, SEED, **dpo_args)
        return done[key]

    return logs


def assert_logs_match(ours, reference):
    for step, (theirs, mine) in enumerate(zip(reference, ours, strict=True), start=1):
        for metric in METRICS:
            a, b = mine[metric], theirs[metric]
            # relative 1e-4. Rewards are beta times differences of log-prob sums of size ~100,
            # whose fp32 rounding (~1e-5) is all that is left where a reward is near 0
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), f"step {step} {metric}: {a} vs TRL {b}"
    # training did something, so the comparison is not between two constants
    assert reference[-1]["rewards/margins"] != reference[0]["rewards/margins"]


@pytest.mark.parametrize(
    "dpo_args",
    [
        {"loss_type": ["sigmoid"]},
        {"loss_type": ["ipo"]},
        {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.7, 0.3]},
        {"loss_type": ["sigmoid"], "precompute_ref_log_probs": True},
    ],
    ids=["sigmoid", "ipo", "sigmoid+bco_pair", "sigmoid-precomputed-ref"],
)
def test_dpo_trainer_steps_match_trl(pairs, tokenizer, tmp_path, kernel_calls, trl_logs, dpo_args):
    reference = trl_logs(**dpo_args)
    ours = train_trl(fast_trl.FastDPOTrainer, pairs, tokenizer, tmp_path, SEED, **dpo_args)
    assert True in kernel_calls, "FastDPOTrainer did not run our kernel for the policy"
    assert False in kernel_calls, "... nor for the reference (or its precompute)"
    assert trl.trainer.dpo_trainer.add_fused_lm_head is trl_add_fused_lm_head, "the patch leaked"
    assert_logs_match(ours, reference)


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_fast_dpo_trainer_layouts_match_trl(
    pairs, tokenizer, tmp_path, kernel_calls, lowered, trl_logs, layout
):
    """TRL 1.16 has no padding-free DPO; FastDPOTrainer(layout=...) gives the same steps."""
    reference = trl_logs(loss_type=["sigmoid"])
    trainer = functools.partial(fast_trl.FastDPOTrainer, layout=layout)
    ours = train_trl(trainer, pairs, tokenizer, tmp_path, SEED, loss_type=["sigmoid"])
    assert kernel_calls and set(lowered) == {layout}
    assert_logs_match(ours, reference)


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_layouts_moe_router_aux_loss_equals_padded(layout):
    """The router logits of TRL's real tokens, moved back to TRL's order: the load-balancing
    loss (value and gradients) of a re-laid-out batch equals the padded layout's."""
    padded = tiny_mixtral()
    relaid = copy.deepcopy(padded)
    fast_trl.add_fused_lm_head(padded)
    fast_trl.add_fused_lm_head(relaid, layout=layout)
    input_ids, attention_mask, labels = preference_batch(61)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "fused_lm_head": True,
    }
    a, b = padded(**kwargs, output_router_logits=True), relaid(**kwargs, output_router_logits=True)
    assert float(a.aux_loss) > 0
    torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.log_probs, a.log_probs, rtol=1e-5, atol=1e-5)
    a.aux_loss.backward()
    b.aux_loss.backward()
    gate = "model.layers.0.mlp.gate.weight"
    grads = {name: p.grad for name, p in relaid.named_parameters()}
    torch.testing.assert_close(grads[gate], padded.get_parameter(gate).grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_leave_autocast_as_found(tokenizer, layout, dtype):
    """accelerate wraps ``model.forward`` in one ``torch.autocast`` instance after our head is
    installed; the layouts' self-check must not enter it a second time (that left CPU autocast
    on after the step, and TRL's gradient clipping then failed)."""
    model = tiny_llama(tokenizer).to(dtype)
    fast_trl.add_fused_lm_head(model, layout=layout)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)  # what accelerate does
    input_ids, attention_mask, labels = preference_batch(model.config.vocab_size)
    for _ in range(2):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        assert not torch.is_autocast_enabled("cpu"), "autocast left on"
        out.log_probs.sum().backward()
    assert torch.get_autocast_dtype("cpu") == torch.bfloat16  # the default, untouched
    assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters() if p.requires_grad)


def test_layout_that_cannot_serve_a_model_falls_back_with_one_warning(tokenizer):
    from transformers import Lfm2Config, Lfm2ForCausalLM

    config = Lfm2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        full_attn_idxs=[1],
        block_multiple_of=8,
    )
    model = Lfm2ForCausalLM(config).float()
    theirs = copy.deepcopy(model)
    fast_trl._fallbacks_warned.clear()
    with pytest.warns(
        UserWarning, match=r"layout='packed' cannot serve Lfm2ForCausalLM: its 'conv' layers"
    ) as seen:
        fast_trl.add_fused_lm_head(model, layout="packed")
        fast_trl.add_fused_lm_head(copy.deepcopy(model), layout="packed")  # the reference model
    assert len([w for w in seen if "cannot serve" in str(w.message)]) == 1
    trl_add_fused_lm_head(theirs)
    input_ids, attention_mask, labels = preference_batch(model.config.vocab_size)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "fused_lm_head": True,
    }
    torch.testing.assert_close(model(**kwargs).log_probs, theirs(**kwargs).log_probs, rtol=1e-5, atol=1e-5)
