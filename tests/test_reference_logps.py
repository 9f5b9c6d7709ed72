"""dpo_fast.precompute_reference_logps: values, no autograd state, ordering, and the cache."""

import copy
import warnings

import pytest
import torch
from helpers import TINY_DECODER, tiny_llama
from torch.utils.data import DataLoader

import dpo_fast.reference_logps as reference_logps
from dpo_fast import registry
from dpo_fast.collate import PreferenceCollator
from dpo_fast.reference_logps import (
    data_fingerprint,
    model_fingerprint,
    precompute_reference_logps,
)

VOCAB = TINY_DECODER["vocab_size"]


def random_examples(n: int) -> list[dict[str, list[int]]]:
    """Tokenized pairs of varied lengths (one-token completions included), shared prompts."""

    def ids(low: int, high: int) -> list[int]:
        return torch.randint(1, VOCAB, (int(torch.randint(low, high, ())),)).tolist()

    return [{"prompt_ids": ids(1, 9), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7)} for _ in range(n)]


def naive_logps(model, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference: each sequence alone through the model's own logits."""
    model = model.double()

    def logp(prompt, completion):
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).sum()

    with torch.no_grad():
        chosen = [logp(e["prompt_ids"], e["chosen_ids"]) for e in examples]
        rejected = [logp(e["prompt_ids"], e["rejected_ids"]) for e in examples]
    return torch.stack(chosen), torch.stack(rejected)


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
def test_values_match_naive_float64(layout):
    model = tiny_llama()
    examples = random_examples(7)  # batches of 3: the last one is short
    result = precompute_reference_logps(model, examples, layout=layout, batch_size=3, progress=False)
    chosen, rejected = naive_logps(copy.deepcopy(model), examples)
    assert result.chosen.dtype == torch.float32 and result.chosen.shape == (7,)
    assert result.chosen.device.type == "cpu"
    torch.testing.assert_close(result.chosen.double(), chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.rejected.double(), rejected, rtol=1e-5, atol=1e-5)


def test_no_autograd_state_eval_mode_restored():
    model = tiny_llama(attention_dropout=0.5)  # dropout would make two passes differ
    model.train()
    examples = random_examples(4)
    first = precompute_reference_logps(model, examples, batch_size=2, progress=False)
    second = precompute_reference_logps(model, examples, batch_size=2, progress=False)
    assert model.training, "the model's mode must be restored"
    assert not first.chosen.requires_grad and first.chosen.grad_fn is None
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(first.chosen, second.chosen, rtol=0, atol=0)


def test_dataloader_input_and_order():
    model = tiny_llama()
    examples = random_examples(6)
    collator = PreferenceCollator(layout="padded")
    expected = precompute_reference_logps(model, examples, batch_size=4, progress=False)
    loader = DataLoader(examples, batch_size=4, shuffle=False, collate_fn=collator)
    got = precompute_reference_logps(model, loader, progress=False)
    torch.testing.assert_close(got.chosen, expected.chosen)
    # each pair's value does not depend on its batch: batches of 1 give the same
    single = precompute_reference_logps(model, examples, batch_size=1, progress=False)
    torch.testing.assert_close(single.rejected, expected.rejected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shuffle"):
        precompute_reference_logps(model, DataLoader(examples, shuffle=True, collate_fn=collator))
    with pytest.raises(ValueError, match="collator"):
        precompute_reference_logps(model, loader, collator=collator)


def test_string_examples_with_tokenizer_collator():
    from dpo_fast.app.pairs import load_preference_data, train_bpe_tokenizer

    pairs = load_preference_data(limit=5)
    tokenizer = train_bpe_tokenizer(pairs, vocab_size=300)
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    collator = PreferenceCollator(tokenizer, max_length=48, max_prompt_length=24)
    result = precompute_reference_logps(model, pairs, collator=collator, batch_size=2, progress=False)
    assert result.chosen.shape == (5,) and bool((result.chosen < 0).all())


def test_progress_bar(capsys):
    precompute_reference_logps(tiny_llama(), random_examples(2), progress=True)
    assert "reference log-probs" in capsys.readouterr().err


@pytest.fixture
def forward_calls(monkeypatch):
    calls = []
    forward = reference_logps.concatenated_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(reference_logps, "concatenated_forward", counting)
    return calls


def test_cache_reused_only_when_fresh(tmp_path, forward_calls):
    model = tiny_llama()
    examples = random_examples(5)
    cache = tmp_path / "sub" / "ref.pt"
    first = precompute_reference_logps(model, examples, batch_size=2, cache=cache, progress=False)
    assert cache.is_file() and len(forward_calls) == 3

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh cache loads silently
        again = precompute_reference_logps(model, examples, batch_size=2, cache=cache, progress=False)
    assert len(forward_calls) == 3, "a fresh cache must not run the model"
    torch.testing.assert_close(again.chosen, first.chosen, rtol=0, atol=0)

    # the smallest change to one weight makes it stale
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    with pytest.warns(UserWarning, match="stale .*model weights"):
        changed = precompute_reference_logps(model, examples, batch_size=2, cache=cache, progress=False)
    assert len(forward_calls) == 6
    assert not torch.equal(changed.chosen, first.chosen)

    # one token of the data
    examples[4]["rejected_ids"][0] = (examples[4]["rejected_ids"][0] + 1) % VOCAB
    with pytest.warns(UserWarning, match="stale .*data"):
        precompute_reference_logps(model, examples, batch_size=2, cache=cache, progress=False)
    assert len(forward_calls) == 9
    # ... and what was recomputed is saved: now fresh
    precompute_reference_logps(model, examples, batch_size=2, cache=cache, progress=False)
    assert len(forward_calls) == 9


def test_unreadable_cache_is_recomputed(tmp_path, forward_calls):
    cache = tmp_path / "ref.pt"
    cache.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        result = precompute_reference_logps(tiny_llama(), random_examples(2), cache=cache, progress=False)
    assert forward_calls and result.chosen.shape == (2,)
    assert torch.load(cache, weights_only=True)["chosen"].shape == (2,)


def test_fingerprints():
    model = tiny_llama()
    same = tiny_llama()
    same.load_state_dict(model.state_dict())
    assert model_fingerprint(model) == model_fingerprint(same)
    with torch.no_grad():
        same.lm_head.weight[3, 1] = torch.nextafter(same.lm_head.weight[3, 1], torch.tensor(1.0))
    assert model_fingerprint(model) != model_fingerprint(same), "one ulp of one weight must show"
    assert model_fingerprint(model) != model_fingerprint(copy.deepcopy(model).to(torch.bfloat16))
    batch = {"input_ids": torch.tensor([[1, 2]]), "num_pairs": 1}
    assert data_fingerprint([batch]) == data_fingerprint([dict(batch)])
    assert data_fingerprint([batch]) != data_fingerprint([{**batch, "num_pairs": 2}])
    assert data_fingerprint([batch]) != data_fingerprint([{**batch, "input_ids": torch.tensor([[1, 3]])}])


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="layout"):
        precompute_reference_logps(model, random_examples(2), layout="ragged")
    with pytest.raises(ValueError, match="batch_size"):
        precompute_reference_logps(model, random_examples(2), batch_size=0)
    with pytest.raises(TypeError, match="DataLoader or a sequence"):
        precompute_reference_logps(model, iter(random_examples(2)))
    with pytest.raises(ValueError, match="no examples"):
        precompute_reference_logps(model, [], progress=False)


def _granite(logits_scaling: float):
    from transformers import GraniteConfig, GraniteForCausalLM

    return GraniteForCausalLM(GraniteConfig(**TINY_DECODER, logits_scaling=logits_scaling)).float()


@pytest.mark.parametrize(
    "make, changed",
    [
        (lambda value: tiny_llama(rope_theta=value), (10000.0, 2.0)),
        (_granite, (1.0, 4.0)),  # Granite divides its logits by logits_scaling, a config field only
    ],
    ids=["llama-rope_theta", "granite-logits_scaling"],
)
def test_cache_stale_when_only_the_config_changes(tmp_path, forward_calls, make, changed):
    """The same weights under a changed config give other log-probs: the cache must not be reused."""
    before, after = make(changed[0]), make(changed[1])
    after.load_state_dict(before.state_dict())
    examples = random_examples(3)
    cache = tmp_path / "ref.pt"
    first = precompute_reference_logps(before, examples, cache=cache, progress=False)
    with pytest.warns(UserWarning, match="stale .*model config"):
        second = precompute_reference_logps(after, examples, cache=cache, progress=False)
    assert len(forward_calls) == 2
    assert (first.chosen - second.chosen).abs().max() > 1e-5, "the config change must change the values"
    expected, _ = naive_logps(copy.deepcopy(after), examples)
    torch.testing.assert_close(second.chosen.double(), expected, rtol=1e-5, atol=1e-5)


def test_cache_stale_when_the_settings_change(tmp_path, forward_calls, monkeypatch):
    model, examples = tiny_llama(), random_examples(2)
    cache = tmp_path / "ref.pt"
    precompute_reference_logps(model, examples, cache=cache, progress=False)
    with pytest.warns(UserWarning, match="stale .*layout 'padded' -> 'packed'"):
        precompute_reference_logps(model, examples, layout="packed", cache=cache, progress=False)
    auto = registry.resolve("linear_logprobs", "auto", "cpu")  # cpp, or torch without a compiler
    other = "torch" if auto != "torch" else "triton"
    with pytest.warns(UserWarning, match=f"stale .*backend '{auto}' -> '{other}'"):
        precompute_reference_logps(
            model, examples, layout="packed", cache=cache, progress=False, backend=other
        )
    stale_autocast = pytest.warns(UserWarning, match="stale .*autocast 'off' -> 'bfloat16'")
    with stale_autocast, torch.autocast("cpu", dtype=torch.bfloat16):
        precompute_reference_logps(
            model, examples, layout="packed", cache=cache, progress=False, backend=other
        )
    monkeypatch.setattr("dpo_fast.__version__", "99.0")
    with pytest.warns(UserWarning, match="stale .*library versions 'dpo_fast .* -> 'dpo_fast 99.0"):
        precompute_reference_logps(
            model, examples, layout="packed", cache=cache, progress=False, backend=other
        )
    with pytest.warns(UserWarning, match=r"stale \(model weights and dtypes changed\)"):
        precompute_reference_logps(
            model.to(torch.bfloat16), examples, layout="packed", cache=cache, progress=False, backend=other
        )
    assert len(forward_calls) == 6


def test_cache_stale_when_peft_adapters_are_disabled(tmp_path, forward_calls):
    """A PEFT model's reference pass often runs with its adapters disabled: same tensors, other values."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    examples = random_examples(2)
    cache = tmp_path / "ref.pt"
    with_adapters = precompute_reference_logps(model, examples, cache=cache, progress=False)
    with model.disable_adapter(), pytest.warns(UserWarning, match="stale .*model config"):
        without = precompute_reference_logps(model, examples, cache=cache, progress=False)
    assert len(forward_calls) == 2
    assert not torch.allclose(with_adapters.chosen, without.chosen)


def test_cache_of_an_older_format_is_recomputed(tmp_path, forward_calls):
    cache = tmp_path / "ref.pt"
    torch.save(
        {"format": 1, "model": "x", "data": "y", "chosen": torch.zeros(2), "rejected": torch.zeros(2)}, cache
    )
    with pytest.warns(UserWarning, match="stale .*file format 1 -> 2"):
        precompute_reference_logps(tiny_llama(), random_examples(2), cache=cache, progress=False)
    assert len(forward_calls) == 1


def test_meta_model_is_refused():
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match="model's parameters are on the meta device"):
        precompute_reference_logps(model, random_examples(2), progress=False)
