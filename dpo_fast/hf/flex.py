"""FlexAttention block masks for the packed and prefix-shared layouts.

A model whose attention implementation is ``flex_attention`` gets, instead of a dense
``(R, 1, L, L)`` mask, a FlexAttention ``BlockMask``: a ``mask_mod`` that evaluates
:func:`dpo_fast.hf.masks.visible` on the batch's ``doc_ids`` / ``branch_ids`` /
``position_ids``, plus per ``BLOCK_SIZE x BLOCK_SIZE`` tile whether it is empty (skipped),
full (no ``mask_mod`` call) or partial. transformers passes a ``BlockMask`` given as
``attention_mask`` through unchanged; a model mixing layer types gets ``{layer_type:
BlockMask}``.

The tile tables come from per-block summaries (the range of block ids, branches and positions
of each 128-token block), not from evaluating the mask on all ``L^2`` pairs: a tile is *empty*
or *full* only when the summaries prove it for every pair, otherwise *partial* (flex then
evaluates the ``mask_mod`` on it, so a partial tile is always exact). Cost: ``O(R (L/128)^2)``
small integers, 17 MB for one 128k-token row, instead of ``R L^2`` mask elements.

Every layer type uses the same ``mask_mod`` code with its window as captured tensors (a huge
value for "no window"), so the compiled flex kernel is traced once per set of shapes, not once
per layer type. A mask is built once per batch and reused (the policy and reference forwards
of one batch, the self-check) while the batch's ids are unchanged.

FlexAttention has no backward on CPU (torch 2.13): on CPU the flex path is forward only
(reference log-probs, evaluation); training uses a GPU.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .masks import Window, layer_windows, visible
from .model import text_config, unwrap_model

BLOCK_SIZE = 128
# "no window": larger than any position difference, and every position // it is 0
_NO_WINDOW = 2**62
# the range of a block without a real token: [_FAR, -_FAR] (differences stay within int64)
_FAR = 2**40
# the last few block masks built, with the ids they were built from
_CACHE_SIZE = 4
_cache: list[tuple[tuple, torch.Tensor, object]] = []


def flex_supports_backward(device: torch.device) -> bool:
    """Whether FlexAttention can differentiate on ``device`` (not on CPU as of torch 2.13)."""
    return torch.device(device).type != "cpu"


def use_flex_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a loaded transformers model (or a PEFT wrapper of one) to FlexAttention.

    The same as loading it with ``attn_implementation="flex_attention"``: transformers checks
    the model supports it. Returns ``model``. With it, ``layout="packed"`` and
    ``"prefix_shared"`` pass block masks instead of dense ``L x L`` masks.
    """
    base = unwrap_model(model)
    setter = getattr(base, "set_attn_implementation", None)
    if callable(setter):
        setter("flex_attention")
    else:  # older transformers: the attention functions read the config on every call
        text_config(base)._attn_implementation = "flex_attention"
    return model


def _pad_to_blocks(x: torch.Tensor, num_blocks: int, value: int) -> torch.Tensor:
    """``(R, L)`` -> ``(R, num_blocks * BLOCK_SIZE)``, padded with ``value``: the mask_mod may
    be called on the last block's positions beyond ``L``."""
    pad = num_blocks * BLOCK_SIZE - x.shape[1]
    return torch.nn.functional.pad(x, (0, pad), value=value)


def _block_range(x: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, the min and max of ``x`` ``(R, nb * BLOCK_SIZE)`` over the real tokens
    (``(R, nb)`` each; +/- a huge value in a block without one)."""
    blocks = x.unflatten(1, (-1, BLOCK_SIZE))
    real = real.unflatten(1, (-1, BLOCK_SIZE))
    lo = blocks.masked_fill(~real, _FAR).amin(-1)
    hi = blocks.masked_fill(~real, -_FAR).amax(-1)
    return lo, hi


def _tiles(
    doc: torch.Tensor, branch: torch.Tensor, pos: torch.Tensor, window: Window
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` bool ``(R, nb, nb)`` tile tables (query block, key block) of padded
    ``(R, nb * BLOCK_SIZE)`` ids. Tiles in neither are empty."""
    real = doc >= 0
    any_real = real.unflatten(1, (-1, BLOCK_SIZE)).any(-1)
    all_real = real.unflatten(1, (-1, BLOCK_SIZE)).all(-1)
    ranges = [_block_range(x, real) for x in (doc, branch, pos)]
    # query-block quantities vary along dim 1, key-block ones along dim 2
    (dq0, dq1), (bq0, bq1), (pq0, pq1) = [(lo[:, :, None], hi[:, :, None]) for lo, hi in ranges]
    (dk0, dk1), (bk0, bk1), (pk0, pk1) = [(lo[:, None, :], hi[:, None, :]) for lo, hi in ranges]
    nb = doc.shape[1] // BLOCK_SIZE
    i = torch.arange(nb, device=doc.device)
    below = (i[:, None] > i[None, :]).unsqueeze(0)
    diagonal = (i[:, None] == i[None, :]).unsqueeze(0)

    # empty: for every (q, k) of the tile (q != k off the diagonal), visible() is False
    empty = ~below | ~any_real[:, :, None] | ~any_real[:, None, :] | (dq1 < dk0) | (dk1 < dq0)
    empty |= (bk0 > 0) & ((bq1 < bk0) | (bk1 < bq0))  # no prompt key and no key on a query's branch
    # full: every (q, k) has the same block, k < q, a visible branch and the window
    one_doc = (dq0 == dq1) & (dq1 == dk0) & (dk0 == dk1)
    one_branch = (bq0 == bq1) & (bq1 == bk0) & (bk0 == bk1)
    full = below & all_real[:, :, None] & all_real[:, None, :] & one_doc & ((bk1 == 0) | one_branch)
    if window.sliding is not None:
        empty |= pq0 - pk1 >= window.sliding
        full &= pq1 - pk0 < window.sliding
    if window.chunk is not None:
        c = window.chunk
        empty |= (pk1 // c < pq0 // c) | (pq1 // c < pk0 // c)
        full &= (pq0 // c == pq1 // c) & (pq1 // c == pk0 // c) & (pk0 // c == pk1 // c)
    partial = diagonal | ~(empty | full)
    return partial, full & ~diagonal


def _kv_table(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's ``(num_blocks (R, 1, nb), indices (R, 1, nb, nb))`` int32 of a tile table:
    per query block, the key blocks it lists first, in increasing order."""
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~tiles).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    return counts.unsqueeze(1), indices.unsqueeze(1)


def _mask_mod(doc: torch.Tensor, branch: torch.Tensor, pos: torch.Tensor, window: Window):
    device = doc.device
    sliding = torch.tensor(_NO_WINDOW if window.sliding is None else window.sliding, device=device)
    chunk = torch.tensor(_NO_WINDOW if window.chunk is None else window.chunk, device=device)

    def mask_mod(b, h, q, k):
        return visible(
            doc[b, q], doc[b, k], branch[b, q], branch[b, k], pos[b, q], pos[b, k], q, k, sliding, chunk
        )

    return mask_mod


def _build(doc_ids: torch.Tensor, branch_ids: torch.Tensor, position_ids: torch.Tensor, window: Window):
    from torch.nn.attention.flex_attention import BlockMask

    L = doc_ids.shape[1]
    nb = -(-L // BLOCK_SIZE)
    doc = _pad_to_blocks(doc_ids, nb, -1)
    branch = _pad_to_blocks(branch_ids, nb, 0)
    pos = _pad_to_blocks(position_ids, nb, 0)
    partial, full = _tiles(doc, branch, pos, window)
    kv_num_blocks, kv_indices = _kv_table(partial)
    full_num_blocks, full_indices = _kv_table(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks=kv_num_blocks,
        kv_indices=kv_indices,
        full_kv_num_blocks=full_num_blocks,
        full_kv_indices=full_indices,
        BLOCK_SIZE=BLOCK_SIZE,
        mask_mod=_mask_mod(doc, branch, pos, window),
        seq_lengths=(L, L),
    )


def flex_block_mask(config, doc_ids: torch.Tensor, branch_ids: torch.Tensor, position_ids: torch.Tensor):
    """The ``attention_mask`` argument of a flex model for a packed / prefix-shared batch ``(R, L)``.

    Returns a ``BlockMask`` of shape ``(R, 1, L, L)``, or ``{layer_type: BlockMask}`` for
    models mixing layer types. Cached: the same ids (compared by value) give the same object.
    """
    windows = layer_windows(config)
    ids = torch.stack([doc_ids, branch_ids, position_ids])
    key = (tuple(windows.items()), tuple(ids.shape), ids.device)
    cacheable = not is_fake(ids)  # fake tensors (the memory estimator) have no values to compare
    for cached_key, cached_ids, cached in _cache if cacheable else ():
        if cached_key == key and torch.equal(cached_ids, ids):
            return cached
    masks = {layer_type: _build(doc_ids, branch_ids, position_ids, w) for layer_type, w in windows.items()}
    result = next(iter(masks.values())) if len(masks) == 1 else masks
    if cacheable:
        _cache.insert(0, (key, ids, result))
        del _cache[_CACHE_SIZE:]
    return result
