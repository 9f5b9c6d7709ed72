"""Preference batches for :func:`dpo_fast.concatenated_forward`, one format per layout.

A *pair* is three token-id lists: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``. The
collator turns a list of pairs into the batch of one layout:

``padded`` (TRL 1.x's collated format): ``input_ids`` ``[2B, T]``, the B chosen rows
``[prompt | chosen]`` first, then the B rejected rows ``[prompt | rejected]``, right padded;
``attention_mask`` (1 on real tokens) and ``completion_mask`` (1 on completion tokens).

``packed`` and ``prefix_shared``: sequences laid end to end in rows of at most
``pack_length`` tokens, ``[R, L]`` int64 tensors

- ``input_ids``; ``position_ids`` (restart at 0 for each sequence);
- ``doc_ids``: which attention block a token belongs to (a token sees earlier tokens of its
  own block only), -1 on padding;
- ``branch_ids``: 0 prompt, 1 chosen, 2 rejected. Within a block a token sees the prompt and
  earlier tokens of its own branch, never the other branch;
- ``sequence_ids``: on completion tokens, the output sequence they count for (pair ``i``'s
  chosen is ``i``, its rejected ``B + i``); -1 elsewhere;

and ``num_pairs`` (the int B). ``packed`` holds 2B blocks ``[prompt | chosen]`` and
``[prompt | rejected]`` (padding-free training); ``prefix_shared`` holds B blocks
``[prompt | chosen | rejected]`` whose rejected positions continue from the end of the prompt,
so the prompt runs through the model once per pair instead of twice.

Examples' ``ref_chosen_logps`` / ``ref_rejected_logps`` (TRL's precomputed reference
log-probs) pass through as ``(B,)`` tensors in every layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .checks import check_layout
from .constants import BRANCH_CHOSEN, BRANCH_PROMPT, BRANCH_REJECTED

_PAIR_TEXT_KEYS = ("prompt", "chosen", "rejected")
_PAIR_ID_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
_REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass(frozen=True)
class Pair:
    """One tokenized preference pair (lists of token ids)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def _token_list(value: object, what: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise ValueError(f"{what} must be a 1-D integer tensor, got {value.dtype} {tuple(value.shape)}")
        return value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{what} must be a list of int token ids, got {type(value).__name__}")
    bad = next((t for t in value if isinstance(t, bool) or not isinstance(t, int)), None)
    if bad is not None:
        raise TypeError(f"{what} must be a list of int token ids, got an element {bad!r}")
    return list(value)


def tokenize_pair(example: Mapping[str, Any], tokenizer: Any = None, *, add_eos: bool = True) -> Pair:
    """Token ids of one example.

    Args:
        example: ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` lists of ints (TRL's field
            names, used as they are), or ``{"prompt", "chosen", "rejected"}`` strings.
        tokenizer: a Hugging Face tokenizer, needed for strings. As in TRL, the prompt is
            tokenized with the tokenizer's special tokens (e.g. BOS), each completion without.
        add_eos: append ``tokenizer.eos_token_id`` to tokenized completion strings.
    """
    if not isinstance(example, Mapping):
        raise TypeError(f"an example must be a mapping, got {type(example).__name__}")
    if all(key in example for key in _PAIR_ID_KEYS):
        return Pair(*(_token_list(example[key], key) for key in _PAIR_ID_KEYS))
    if not all(key in example for key in _PAIR_TEXT_KEYS):
        raise ValueError(
            f"an example must have keys {_PAIR_ID_KEYS} (token ids) or {_PAIR_TEXT_KEYS} (strings), "
            f"got {sorted(example)}"
        )
    if tokenizer is None:
        raise ValueError("examples with prompt/chosen/rejected strings need a tokenizer; got tokenizer=None")
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    prompt = tokenizer(example["prompt"])["input_ids"]
    chosen = tokenizer(example["chosen"], add_special_tokens=False)["input_ids"] + eos
    rejected = tokenizer(example["rejected"], add_special_tokens=False)["input_ids"] + eos
    return Pair(list(prompt), list(chosen), list(rejected))


def truncate_pair(
    pair: Pair, *, max_length: int | None, max_prompt_length: int | None = None, index: int = 0
) -> Pair:
    """Fit ``prompt + completion`` into ``max_length`` for both completions.

    The prompt keeps its last ``max_prompt_length`` tokens (the end of a dialogue is what the
    completion answers); each completion then keeps what fits after the prompt.

    Raises:
        ValueError: a completion is empty, or would be after truncation (the prompt leaves
            no room): truncation never silently drops a completion.
    """
    prompt = pair.prompt_ids
    if max_prompt_length is not None:
        prompt = prompt[len(prompt) - max_prompt_length :] if len(prompt) > max_prompt_length else prompt
    room = None if max_length is None else max_length - len(prompt)
    completions = []
    for name, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        if not ids:
            raise ValueError(f"example {index}: the {name} completion is empty")
        if room is not None and room < 1:
            raise ValueError(
                f"example {index}: the prompt ({len(prompt)} tokens) leaves no room for the {name} "
                f"completion within max_length={max_length}; raise max_length or set max_prompt_length"
            )
        completions.append(ids if room is None else ids[:room])
    return Pair(prompt, *completions)


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def collate_padded(
    pairs: Sequence[Pair], *, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict:
    """The ``padded`` layout (TRL's format) of ``pairs``; see the module docstring."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = _round_up(max(len(a) + len(b) for a, b in rows), pad_to_multiple_of)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[r, :n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[r, :n] = 1
        completion_mask[r, len(prompt) : n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


@dataclass
class _Unit:
    """One attention block of a packed row, as per-token lists."""

    ids: list[int]
    positions: list[int]
    branches: list[int]
    sequences: list[int]


def _sequence_unit(prompt: list[int], completion: list[int], branch: int, sequence: int) -> _Unit:
    n = len(prompt) + len(completion)
    return _Unit(
        prompt + completion,
        list(range(n)),
        [BRANCH_PROMPT] * len(prompt) + [branch] * len(completion),
        [-1] * len(prompt) + [sequence] * len(completion),
    )


def _pair_unit(pair: Pair, index: int, num_pairs: int) -> _Unit:
    p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
    return _Unit(
        pair.prompt_ids + pair.chosen_ids + pair.rejected_ids,
        # rejected continues from the end of the prompt: the positions it has in its own row
        list(range(p + c)) + list(range(p, p + r)),
        [BRANCH_PROMPT] * p + [BRANCH_CHOSEN] * c + [BRANCH_REJECTED] * r,
        [-1] * p + [index] * c + [num_pairs + index] * r,
    )


def _pack_units(
    units: list[_Unit],
    num_pairs: int,
    *,
    pack_length: int | None,
    pad_token_id: int,
    pad_to_multiple_of: int | None,
) -> dict:
    """Lay units end to end in rows of at most ``pack_length`` tokens (first fit, longest first)."""
    longest = max(len(u.ids) for u in units)
    if pack_length is None:
        pack_length = longest
    if longest > pack_length:
        raise ValueError(f"a sequence of {longest} tokens does not fit pack_length={pack_length}")
    rows: list[list[int]] = []  # unit indices per row
    used: list[int] = []
    for i in sorted(range(len(units)), key=lambda i: -len(units[i].ids)):
        n = len(units[i].ids)
        row = next((r for r, u in enumerate(used) if u + n <= pack_length), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        used[row] += n
    width = _round_up(max(used), pad_to_multiple_of)
    shape = (len(rows), width)
    out = {
        "input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "doc_ids": torch.full(shape, -1, dtype=torch.long),
        "branch_ids": torch.zeros(shape, dtype=torch.long),
        "sequence_ids": torch.full(shape, -1, dtype=torch.long),
    }
    for r, members in enumerate(rows):
        start = 0
        # units keep their input order inside a row, so the layout is easy to read
        for i in sorted(members):
            unit, end = units[i], start + len(units[i].ids)
            out["input_ids"][r, start:end] = torch.tensor(unit.ids, dtype=torch.long)
            out["position_ids"][r, start:end] = torch.tensor(unit.positions, dtype=torch.long)
            out["doc_ids"][r, start:end] = i
            out["branch_ids"][r, start:end] = torch.tensor(unit.branches, dtype=torch.long)
            out["sequence_ids"][r, start:end] = torch.tensor(unit.sequences, dtype=torch.long)
            start = end
    out["num_pairs"] = num_pairs
    return out


def collate_packed(
    sequences: Sequence[tuple[list[int], list[int]]],
    *,
    pack_length: int | None = None,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict:
    """The ``packed`` layout of 2B ``(prompt_ids, completion_ids)`` sequences, chosen first.

    ``pack_length`` (default: the longest sequence) bounds a row's length: with sdpa/eager
    attention a row costs ``L^2`` in its mask and attention, so rows are kept short.
    """
    if len(sequences) % 2:
        raise ValueError(f"packed needs 2B sequences (B chosen then B rejected), got {len(sequences)}")
    num_pairs = len(sequences) // 2
    units = [
        _sequence_unit(prompt, completion, BRANCH_CHOSEN if s < num_pairs else BRANCH_REJECTED, s)
        for s, (prompt, completion) in enumerate(sequences)
    ]
    return _pack_units(
        units,
        num_pairs,
        pack_length=pack_length,
        pad_token_id=pad_token_id,
        pad_to_multiple_of=pad_to_multiple_of,
    )


def collate_prefix_shared(
    pairs: Sequence[Pair],
    *,
    pack_length: int | None = None,
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
) -> dict:
    """The ``prefix_shared`` layout of ``pairs``: one block ``[prompt | chosen | rejected]`` each.

    ``pack_length`` (default: the longest block) bounds a row's length.
    """
    units = [_pair_unit(pair, i, len(pairs)) for i, pair in enumerate(pairs)]
    return _pack_units(
        units,
        len(pairs),
        pack_length=pack_length,
        pad_token_id=pad_token_id,
        pad_to_multiple_of=pad_to_multiple_of,
    )


def sequences_from_padded(batch: Mapping[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """The 2B ``(prompt_ids, completion_ids)`` of a ``padded`` batch (read back on the host).

    A row's prompt is its attended non-completion tokens, its completion the completion tokens.
    """
    ids = batch["input_ids"].tolist()
    attention = batch["attention_mask"].bool().tolist()
    completion = batch["completion_mask"].bool().tolist()
    sequences = []
    for row, seen, scored in zip(ids, attention, completion, strict=True):
        prompt = [t for t, a, c in zip(row, seen, scored, strict=True) if a and not c]
        sequences.append((prompt, [t for t, a, c in zip(row, seen, scored, strict=True) if a and c]))
    return sequences


def pairs_from_padded(batch: Mapping[str, torch.Tensor]) -> list[Pair]:
    """The B pairs of a ``padded`` batch.

    Raises:
        ValueError: a pair's chosen and rejected rows hold different prompts (they cannot
            share one).
    """
    sequences = sequences_from_padded(batch)
    num_pairs = len(sequences) // 2
    pairs = []
    for i in range(num_pairs):
        (prompt, chosen), (other_prompt, rejected) = sequences[i], sequences[num_pairs + i]
        if prompt != other_prompt:
            raise ValueError(
                f"layout='prefix_shared' needs each pair's chosen and rejected rows to share the prompt; "
                f"pair {i} has a prompt of {len(prompt)} tokens in row {i} and a different one of "
                f"{len(other_prompt)} tokens in row {num_pairs + i}"
            )
        pairs.append(Pair(prompt, chosen, rejected))
    return pairs


class PreferenceCollator:
    """Collate preference examples into the batch :func:`dpo_fast.concatenated_forward` takes.

    Args:
        tokenizer: a Hugging Face tokenizer; needed for ``{"prompt", "chosen", "rejected"}``
            strings, not for ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` lists.
        layout: ``"padded"``, ``"packed"`` or ``"prefix_shared"``.
        max_length: cap on ``prompt + completion`` for each completion (see
            :func:`truncate_pair`); the same pair gives the same sequences in every layout.
        pad_token_id: filler id; default the tokenizer's pad (else eos) token, else 0.
        max_prompt_length: keep only the prompt's last this many tokens.
        pack_length: ``packed``/``prefix_shared`` row capacity in tokens; default the longest
            block of the batch, so no row is longer than the ``padded`` layout's rows (with
            sdpa/eager attention a row of L tokens costs L^2). A large value packs one row.
        pad_to_multiple_of: round the padded width up (helps tensor-core shapes).
        add_eos: append EOS to tokenized completion strings.

    Calling it on a list of examples returns a dict of tensors (see the module docstring).
    Raises ValueError when a completion is empty or truncation would leave it empty.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        layout: str = "padded",
        max_length: int | None = None,
        pad_token_id: int | None = None,
        *,
        max_prompt_length: int | None = None,
        pack_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        add_eos: bool = True,
    ) -> None:
        self.layout = check_layout(layout)
        for name, value in (
            ("max_length", max_length),
            ("max_prompt_length", max_prompt_length),
            ("pack_length", pack_length),
            ("pad_to_multiple_of", pad_to_multiple_of),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
        if pad_token_id is not None and (
            isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0
        ):
            raise ValueError(f"pad_token_id must be None or a token id >= 0, got {pad_token_id!r}")
        self.tokenizer = tokenizer
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.pack_length = pack_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.add_eos = add_eos

    def pairs(self, examples: Sequence[Mapping[str, Any]]) -> list[Pair]:
        """Tokenized, truncated pairs of ``examples``."""
        if len(examples) == 0:
            raise ValueError("cannot collate an empty list of examples")
        return [
            truncate_pair(
                tokenize_pair(example, self.tokenizer, add_eos=self.add_eos),
                max_length=self.max_length,
                max_prompt_length=self.max_prompt_length,
                index=i,
            )
            for i, example in enumerate(examples)
        ]

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict:
        pairs = self.pairs(examples)
        options = {"pad_token_id": self.pad_token_id, "pad_to_multiple_of": self.pad_to_multiple_of}
        if self.layout == "padded":
            batch = collate_padded(pairs, **options)
        elif self.layout == "packed":
            sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs]
            sequences += [(p.prompt_ids, p.rejected_ids) for p in pairs]
            batch = collate_packed(sequences, pack_length=self.pack_length, **options)
        else:
            batch = collate_prefix_shared(pairs, pack_length=self.pack_length, **options)
        for key in _REFERENCE_KEYS:  # precomputed reference log-probs travel with the batch, as in TRL
            if all(key in example for example in examples):
                batch[key] = torch.tensor(
                    [_log_prob(example[key], key, i) for i, example in enumerate(examples)]
                )
        return batch


def _log_prob(value: object, key: str, index: int) -> float:
    """A precomputed reference log-prob: a finite number (NaN or inf would poison the loss)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"example {index}: {key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"example {index}: {key} must be finite, got {number}")
    return number
