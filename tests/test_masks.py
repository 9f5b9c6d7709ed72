"""Dense attention masks of the packed and prefix-shared layouts (dpo_fast.hf.masks).

The oracle is a per-pair Python loop over the rule as the collator documents it; the tests
also check what the masks cost: one additive tensor shared by every layer (no per-layer copy
kept by autograd), built without ``L^2`` temporaries beyond itself.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from dpo_fast.app.memory_meter import StorageMeter
from dpo_fast.collate import Pair, collate_packed, collate_prefix_shared
from dpo_fast.hf import masks
from dpo_fast.hf.masks import dense_attention_mask, layer_windows


def loop_oracle(doc, branch, pos, sliding=None, chunk=None) -> torch.Tensor:
    """``(L, L)`` bool of one row, pair by pair."""
    L = len(doc)
    out = torch.zeros(L, L, dtype=torch.bool)
    for q in range(L):
        for k in range(L):
            if q == k:
                out[q, k] = True  # padding too: no empty softmax row
                continue
            ok = doc[q] >= 0 and doc[q] == doc[k] and k < q and branch[k] in (0, branch[q])
            if sliding is not None:
                ok = ok and pos[q] - pos[k] < sliding
            if chunk is not None:
                ok = ok and pos[q] // chunk == pos[k] // chunk
            out[q, k] = ok
    return out


def random_block_batch(layout: str, num_pairs: int = 3, pack_length: int | None = None, multiple=None):
    rng = random.Random(torch.randint(0, 2**31, ()).item())

    def ids(lo, hi):
        return [rng.randrange(3, 100) for _ in range(rng.randint(lo, hi))]

    pairs = [Pair(ids(2, 9), ids(1, 6), ids(1, 6)) for _ in range(num_pairs)]
    if layout == "prefix_shared":
        return collate_prefix_shared(
            pairs, pad_token_id=0, pack_length=pack_length, pad_to_multiple_of=multiple
        )
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
        (p.prompt_ids, p.rejected_ids) for p in pairs
    ]
    return collate_packed(sequences, pad_token_id=0, pack_length=pack_length, pad_to_multiple_of=multiple)


def config_for(attention: str, **kwargs):
    config = transformers.LlamaConfig(**kwargs)
    config._attn_implementation = attention
    return config


def test_prefix_shared_mask_pattern():
    """[prompt a b | chosen c d | rejected e]: e sees a, b and itself, never c or d."""
    doc = torch.tensor([[0, 0, 0, 0, 0, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 0]])
    positions = torch.tensor([[0, 1, 2, 3, 2, 0]])
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 1],  # padding sees itself only: no empty softmax row
        ],
        dtype=torch.bool,
    )
    for attention, dtype in (("sdpa", torch.float32), ("eager", torch.bfloat16)):
        mask = dense_attention_mask(config_for(attention), doc, branch, positions, dtype=dtype)
        # additive in the attention dtype for sdpa too: a bool mask is copied to float per layer
        assert mask.dtype == dtype and mask.shape == (1, 1, 6, 6)
        assert torch.equal(mask[0, 0] == 0, expected)
        assert (mask[0, 0][~expected] == torch.finfo(dtype).min).all()


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
@pytest.mark.parametrize(
    "window",
    [
        {},
        {"sliding_window": 3},
        {"attention_chunk_size": 4, "layer_types": ["chunked_attention"], "num_hidden_layers": 1},
    ],
    ids=["full", "sliding", "chunked"],
)
def test_dense_mask_matches_the_rule(layout, window, monkeypatch):
    # a band of 7 query rows: the mask is filled in several bands, one of them short
    monkeypatch.setattr(masks, "_BAND_ELEMENTS", 7 * 24)
    # 8 pairs of at least 4 (prefix_shared) or 2 x 3 (packed) tokens exceed one row of 24
    batch = random_block_batch(layout, num_pairs=8, pack_length=24, multiple=8)
    config = config_for("sdpa", **window)
    (w,) = layer_windows(config).values()
    mask = dense_attention_mask(
        config, batch["doc_ids"], batch["branch_ids"], batch["position_ids"], dtype=torch.float32
    )
    assert mask.shape[0] > 1  # several rows
    for r in range(mask.shape[0]):
        row = [batch[key][r].tolist() for key in ("doc_ids", "branch_ids", "position_ids")]
        assert torch.equal(mask[r, 0] == 0, loop_oracle(*row, w.sliding, w.chunk)), r


def test_mixed_layer_types_get_a_dict():
    config = transformers.Gemma2Config(sliding_window=3, num_hidden_layers=2)
    config._attn_implementation = "eager"
    batch = random_block_batch("prefix_shared")
    args = [batch[key] for key in ("doc_ids", "branch_ids", "position_ids")]
    mask = dense_attention_mask(config, *args, dtype=torch.float32)
    assert set(mask) == {"sliding_attention", "full_attention"}
    row = [a[0].tolist() for a in args]
    assert torch.equal(mask["full_attention"][0, 0] == 0, loop_oracle(*row))
    assert torch.equal(mask["sliding_attention"][0, 0] == 0, loop_oracle(*row, sliding=3))


def test_unknown_layer_type_is_refused():
    config = transformers.LlamaConfig(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"])
    with pytest.raises(ValueError, match=r"layer type 'linear_attention' of LlamaConfig .*layout='padded'"):
        layer_windows(config)


def test_large_dense_mask_warns_and_names_flex(monkeypatch):
    monkeypatch.setattr(masks, "DENSE_MASK_WARN_BYTES", 1000)
    monkeypatch.setattr(masks, "_warned", set())
    batch = random_block_batch("packed", num_pairs=4)
    args = [batch[key] for key in ("doc_ids", "branch_ids", "position_ids")]
    with pytest.warns(UserWarning, match=r"attn_implementation='sdpa'.*'flex_attention'.*use_flex_attention"):
        dense_attention_mask(config_for("sdpa"), *args, dtype=torch.float32)


@pytest.mark.parametrize("window", [{}, {"sliding_window": 100}], ids=["full", "sliding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_building_needs_no_square_temporaries(dtype, window, monkeypatch):
    """Peak live storage while building = the mask + one band of temporaries (at most an int64
    and a few bools per element); the bool-mask builder peaked at about 5 R L^2 bytes."""
    band = 2**18
    monkeypatch.setattr(masks, "_BAND_ELEMENTS", band)
    L = 3072
    batch = collate_prefix_shared([Pair([5] * 1024, [6] * 1024, [7] * 1024)], pad_token_id=0)
    args = [batch[key] for key in ("doc_ids", "branch_ids", "position_ids")]
    meter = StorageMeter()
    with meter:
        mask = dense_attention_mask(config_for("sdpa", **window), *args, dtype=dtype)
    mask_bytes = L * L * dtype.itemsize
    assert mask.shape == (1, 1, L, L) and mask.untyped_storage().nbytes() == mask_bytes
    assert meter.peak() <= mask_bytes + 12 * band + 2**20, (meter.peak(), mask_bytes)


def _saved_square_storages(model, inputs, L: int) -> int:
    """How many distinct storages of at least L*L elements autograd saves in a forward."""
    storages = set()

    def pack(t):
        if t.numel() >= L * L:
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(**inputs).last_hidden_state.sum().backward()
    return len(storages)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_one_mask_shared_by_every_layer(attention):
    """Autograd keeps no per-layer copy of the mask (sdpa copies a bool mask to float in every
    layer): whatever it saves of L x L size does not grow with the number of layers."""
    L, counts = 96, []
    batch = collate_prefix_shared([Pair([5] * 40, [6] * 28, [7] * 28)], pad_token_id=0)
    for layers in (1, 4):
        config = transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
        )
        config._attn_implementation = attention
        model = transformers.LlamaForCausalLM(config)
        mask = dense_attention_mask(
            config, batch["doc_ids"], batch["branch_ids"], batch["position_ids"], dtype=torch.float32
        )
        inputs = {
            "input_ids": batch["input_ids"],
            "position_ids": batch["position_ids"],
            "attention_mask": mask,
        }
        counts.append(_saved_square_storages(model, inputs, L))
    # eager saves each layer's attention probabilities (L x L): that is activations, not the mask
    per_layer = 1 if attention == "eager" else 0
    assert counts[1] - counts[0] == 3 * per_layer, counts
