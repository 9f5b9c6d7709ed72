"""FlexAttention block masks (dpo_fast.hf.flex) and the attention routing of the block layouts.

The tile tables are checked exhaustively against the dense rule (itself checked against a
loop oracle in test_masks.py); the end-to-end tests run transformers' compiled flex path on
CPU (forward only: FlexAttention has no CPU backward in torch 2.13) and compare its log-probs
with the dense path's. Gradients are compared on a GPU.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import transformers
from test_hf_forward import ARCHITECTURES, assert_grads_close, make_model, random_examples
from torch.nn.attention.flex_attention import create_mask

from dpo_fast import concatenated_forward
from dpo_fast.collate import Pair, PreferenceCollator, collate_prefix_shared
from dpo_fast.hf import flex
from dpo_fast.hf.flex import flex_block_mask, use_flex_attention
from dpo_fast.hf.forward import scored_rows
from dpo_fast.hf.masks import dense_attention_mask
from dpo_fast.hf.plan import lower_batch

WINDOWS = {
    "full": {},
    "sliding": {"sliding_window": 5},
    "chunked": {"attention_chunk_size": 6, "layer_types": ["chunked_attention"], "num_hidden_layers": 1},
}


def block_batch(layout: str, num_pairs: int, pack_length: int, *, prompt=(2, 12), completion=(1, 8)):
    rng = random.Random(torch.randint(0, 2**31, ()).item())

    def ids(bounds):
        return [rng.randrange(3, 100) for _ in range(rng.randint(*bounds))]

    examples = [
        {"prompt_ids": ids(prompt), "chosen_ids": ids(completion), "rejected_ids": ids(completion)}
        for _ in range(num_pairs)
    ]
    return PreferenceCollator(layout=layout, pack_length=pack_length, pad_to_multiple_of=pack_length)(
        examples
    )


def tile_sets(block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool ``(R, nq, nk)`` tables read back from a BlockMask."""

    def table(num, indices):
        R, _, nq, nk = indices.shape
        out = torch.zeros(R, nq, nk, dtype=torch.bool)
        for r in range(R):
            for q in range(nq):
                out[r, q, indices[r, 0, q, : num[r, 0, q]].long()] = True
        return out

    return (
        table(block_mask.kv_num_blocks, block_mask.kv_indices),
        table(block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    )


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
@pytest.mark.parametrize("window", sorted(WINDOWS))
def test_tiles_and_mask_mod_are_exact(layout, window, monkeypatch):
    """Every tile is sound (empty: nothing visible, full: everything visible) and the mask_mod
    equals the dense mask; small blocks so that rows span many tiles of every kind."""
    monkeypatch.setattr(flex, "BLOCK_SIZE", 8)
    monkeypatch.setattr(flex, "_cache", [])
    config = transformers.LlamaConfig(**WINDOWS[window])
    config._attn_implementation = "flex_attention"
    batch = block_batch(layout, 8, 61)
    args = [batch[key] for key in ("doc_ids", "branch_ids", "position_ids")]
    R, L = args[0].shape
    assert R > 1 and L == 61
    dense = dense_attention_mask(config, *args, dtype=torch.float32)[:, 0] == 0
    block_mask = flex_block_mask(config, *args)
    assert block_mask.shape == (R, 1, L, L)
    from_mask_mod = create_mask(block_mask.mask_mod, R, 1, L, L, device="cpu")[:, 0]
    assert torch.equal(from_mask_mod, dense)
    partial, full = tile_sets(block_mask)
    assert not (partial & full).any()
    nb = partial.shape[-1]
    padded = torch.nn.functional.pad(dense, (0, nb * 8 - L, 0, nb * 8 - L))
    tiles = padded.unflatten(1, (nb, 8)).unflatten(3, (nb, 8))  # (R, nq, 8, nk, 8)
    any_visible, all_visible = tiles.any(4).any(2), tiles.all(4).all(2)
    assert not any_visible[~(partial | full)].any(), "a tile marked empty has a visible pair"
    assert all_visible[full].all(), "a tile marked full has a hidden pair"
    # the summaries are conservative, not loose: few partial tiles could have been empty or full
    wasted = (partial & ~any_visible).sum() + (partial & all_visible).sum()
    assert wasted <= 0.25 * partial.sum()


def test_long_prefix_shared_row_is_small():
    """One 64k-token prompt with 32k + 32k completions (a 128k row): a few MB of tile tables
    where a dense mask would take 32 GiB (fp16); partial tiles only near the diagonal and the
    branch boundaries."""
    n = 32768
    batch = collate_prefix_shared([Pair([5] * 2 * n, [6] * n, [7] * n)], pad_token_id=0)
    args = [batch[key] for key in ("doc_ids", "branch_ids", "position_ids")]
    block_mask = flex_block_mask(transformers.LlamaConfig(), *args)
    size = sum(t.untyped_storage().nbytes() for t in block_mask.as_tuple() if isinstance(t, torch.Tensor))
    assert size < 20 * 2**20
    nb = 4 * n // 128
    assert int(block_mask.kv_num_blocks.sum()) <= 2 * nb
    # a rejected query block sees the prompt and the earlier rejected blocks in full tiles, no
    # chosen tile, and its own block partially
    prompt, chosen = range(2 * n // 128), range(2 * n // 128, 3 * n // 128)
    q = nb - 2
    full = block_mask.full_kv_indices[0, 0, q, : block_mask.full_kv_num_blocks[0, 0, q]]
    assert set(full.tolist()) == set(prompt) | set(range(chosen.stop, q))
    assert block_mask.kv_indices[0, 0, q, : block_mask.kv_num_blocks[0, 0, q]].tolist() == [q]


def test_block_mask_is_cached_by_value():
    config = transformers.LlamaConfig()
    batch = block_batch("prefix_shared", 4, 60)
    args = [batch[key] for key in ("doc_ids", "branch_ids", "position_ids")]
    first = flex_block_mask(config, *args)
    assert flex_block_mask(config, *[a.clone() for a in args]) is first
    args[1] = args[1].clone()
    args[1][0, 0] = 2
    assert flex_block_mask(config, *args) is not first


def _flex_copy(model):
    import copy

    return use_flex_attention(copy.deepcopy(model))


@pytest.fixture
def eager_flex(monkeypatch):
    """transformers calls torch.compile(flex_attention) (tens of seconds per model shape on
    CPU); the eager flex_attention runs the same mask_mod on the full score matrix, so these
    tests check transformers' plumbing of our masks, and the tile tables are checked above and
    by the compiled test below."""
    from torch.nn.attention.flex_attention import flex_attention
    from transformers.integrations import flex_attention as hf_flex

    def eager(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager)


def _compare_with_dense(model, batch, layout):
    dense = concatenated_forward(model, batch, layout=layout, grad=False, check=False, backend="torch")
    flexed = _flex_copy(model)
    with torch.no_grad():
        plan = lower_batch(batch, layout, flexed.config.get_text_config(), torch.float32)
    masks = plan.inputs["attention_mask"]
    assert all(
        type(m).__name__ == "BlockMask" for m in (masks.values() if isinstance(masks, dict) else [masks])
    )
    got = concatenated_forward(flexed, batch, layout=layout, grad=False, check=False, backend="torch")
    for a, b in ((got.chosen_logps, dense.chosen_logps), (got.rejected_logps, dense.rejected_logps)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_flex_matches_dense_logps(name, layout, eager_flex):
    """Every architecture of the suite that transformers runs on flex, both layouts, several
    sequences per row: the block mask gives the dense path's log-probs."""
    model = make_model(name)
    if not getattr(model, "_supports_flex_attn", False):
        with pytest.raises(
            ValueError, match="does not support an attention implementation through torch's flex"
        ):
            use_flex_attention(model)
        pytest.skip(f"transformers has no flex attention for {type(model).__name__}")
    examples = random_examples(6, prompt=(10, 30), completion=(3, 15))
    batch = PreferenceCollator(layout=layout, pack_length=100)(examples)
    assert batch["input_ids"].shape[0] > 1
    _compare_with_dense(model, batch, layout)


@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
def test_compiled_flex_kernel(layout):
    """transformers' compiled flex kernel, which skips empty tiles and evaluates no mask_mod on
    full ones: one row of 512 (four tiles) in both layouts, so it compiles once."""
    examples = random_examples(3, prompt=(10, 30), completion=(3, 15))
    batch = PreferenceCollator(layout=layout, pack_length=512, pad_to_multiple_of=512)(examples)
    assert batch["input_ids"].shape == (1, 512)
    _compare_with_dense(make_model("llama"), batch, layout)


def test_flex_passes_the_self_check(eager_flex):
    model = use_flex_attention(make_model("llama"))
    batch = PreferenceCollator(layout="prefix_shared")(random_examples(3))
    concatenated_forward(model, batch, layout="prefix_shared", grad=False, backend="torch")


def test_flash_packed_is_one_row_of_restarting_positions():
    """flash_attention_2 gets no mask: the rows become one row whose position_ids restart per
    sequence (transformers derives the varlen kernels' cu_seqlens from them, for a batch of
    one row only). The same inputs through transformers' own packed-sequence detection on sdpa
    give the dense path's hidden rows."""
    model = make_model("mistral")  # sliding window 5: applied per sequence
    batch = PreferenceCollator(layout="packed", pack_length=40)(random_examples(4))
    assert batch["input_ids"].shape[0] > 1
    config = model.config.get_text_config()
    dense_plan = lower_batch(batch, "packed", config, torch.float32)
    config._attn_implementation = "flash_attention_2"
    flash_plan = lower_batch(batch, "packed", config, torch.float32)
    config._attn_implementation = "sdpa"
    assert set(flash_plan.inputs) == {"input_ids", "position_ids"}
    assert flash_plan.inputs["input_ids"].shape == (1, batch["input_ids"].numel())
    assert torch.equal(flash_plan.source, dense_plan.source)
    with torch.no_grad():
        dense = model.model(**dense_plan.inputs, use_cache=False).last_hidden_state.flatten(0, 1)[
            dense_plan.source
        ]
        varlen = model.model(**flash_plan.inputs, use_cache=False).last_hidden_state.flatten(0, 1)[
            flash_plan.source
        ]
    torch.testing.assert_close(varlen, dense, rtol=1e-5, atol=1e-5)


def test_flash_prefix_shared_is_routed_to_flex(eager_flex):
    """Without gradients FlexAttention runs on CPU: a flash model is switched to it, with a
    warning, and gives the dense path's log-probs."""
    model = make_model("llama")
    batch = PreferenceCollator(layout="prefix_shared")(random_examples(3))
    dense = concatenated_forward(model, batch, layout="prefix_shared", grad=False, backend="torch")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.warns(
        UserWarning, match=r"switching LlamaForCausalLM to attn_implementation='flex_attention'"
    ):
        got = concatenated_forward(
            model, batch, layout="prefix_shared", grad=False, check=False, backend="torch"
        )
    assert model.config._attn_implementation == "flex_attention"
    torch.testing.assert_close(got.rejected_logps, dense.rejected_logps, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad input: before any forward


def _count_backbone_calls(model) -> list[int]:
    calls = [0]
    model.model.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    ("attention", "layout", "message"),
    [
        (
            "flash_attention_2",
            "prefix_shared",
            r"layout='prefix_shared' .*attn_implementation='flash_attention_2'",
        ),
        ("flex_attention", "packed", r"layout='packed' with attn_implementation='flex_attention' on cpu"),
        (
            "flex_attention",
            "prefix_shared",
            r"layout='prefix_shared' with attn_implementation='flex_attention'",
        ),
        ("paged|sdpa", "packed", r"layout='packed' cannot run on attn_implementation='paged\|sdpa'"),
    ],
)
def test_unservable_layout_fails_before_any_forward(attention, layout, message):
    model = make_model("llama")
    model.config._attn_implementation = attention
    calls = _count_backbone_calls(model)
    batch = PreferenceCollator(layout=layout)(random_examples(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no switch to flex: it has no CPU backward
        with pytest.raises(ValueError, match=message):
            scored_rows(model, batch, layout)
    assert calls[0] == 0 and model.config._attn_implementation == attention


# ---------------------------------------------------------------- GPU: gradients


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["packed", "prefix_shared"])
@pytest.mark.parametrize("name", ["llama", "gemma2", "mistral"])
def test_flex_gradients_match_dense(name, layout):
    model = make_model(name).cuda()
    flexed = _flex_copy(model)
    examples = random_examples(6, prompt=(10, 30), completion=(3, 15))
    batch = {
        k: v.cuda() if isinstance(v, torch.Tensor) else v
        for k, v in PreferenceCollator(layout=layout, pack_length=200)(examples).items()
    }
    weights = torch.randn(2 * len(examples), device="cuda", dtype=torch.float64)
    outputs = []
    for m in (model, flexed):
        out = concatenated_forward(m, batch, layout=layout)
        (torch.cat([out.chosen_logps, out.rejected_logps]).double() * weights).sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1].chosen_logps, outputs[0].chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[1].rejected_logps, outputs[0].rejected_logps, rtol=1e-5, atol=1e-5)
    for p in model.parameters():
        p.grad = p.grad.double()
    assert_grads_close(flexed, model)
