"""Preference data from JSONL files, and a BPE tokenizer learned from it.

A line is either ``{"prompt", "chosen", "rejected"}`` (strings) or an hh-rlhf record
``{"chosen", "rejected"}`` holding two whole dialogues, which :func:`split_dialogue` cuts into
the shared prompt and two completions. Every problem in a file raises :class:`DataError`
naming the file and line, so the CLI can print it on one line.

The bundled default, :data:`BUNDLED_DATA`, is a 512-pair subset of Anthropic's hh-rlhf
(harmless-base test split, MIT licence): see ``dpo_fast/app/assets/README.md``.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from pathlib import Path

BUNDLED_DATA = Path(__file__).parent / "assets" / "hh_rlhf_subset.jsonl.gz"
ASSISTANT_TURN = "\n\nAssistant:"
PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|endoftext|>"


class DataError(ValueError):
    """A problem with the user's data file; the message names the file and line."""


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Cut two hh-rlhf dialogues into ``(prompt, chosen_completion, rejected_completion)``.

    The prompt is everything up to and including the last ``"\\n\\nAssistant:"`` the two
    dialogues share; the completions are the rest of each. Splitting on the shared prefix, not
    on each dialogue's own last turn, keeps pairs whose completion itself contains an
    assistant turn (a handful of hh-rlhf records do) correctly aligned.

    Raises:
        ValueError: the dialogues share no assistant turn.
    """
    # character by character is what is wanted here: these are texts, not paths
    common = len(os.path.commonprefix([chosen, rejected]))  # noqa: RUF071
    cut = chosen.rfind(ASSISTANT_TURN, 0, common)
    if cut < 0:
        raise ValueError(f"chosen and rejected share no {ASSISTANT_TURN!r} turn to split the prompt at")
    cut += len(ASSISTANT_TURN)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _parse_line(line: str, where: str) -> dict[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: bad JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = ("prompt", "chosen", "rejected") if "prompt" in record else ("chosen", "rejected")
    missing = [key for key in keys if key not in record]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing}; expected {{prompt, chosen, rejected}} strings "
            "or hh-rlhf {chosen, rejected} dialogues"
        )
    not_text = [key for key in keys if not isinstance(record[key], str)]
    if not_text:
        raise DataError(f"{where}: field(s) {not_text} must be strings")
    if "prompt" in record:
        prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    else:
        try:
            prompt, chosen, rejected = split_dialogue(record["chosen"], record["rejected"])
        except ValueError as error:
            raise DataError(f"{where}: {error}") from None
    empty = [name for name, text in (("chosen", chosen), ("rejected", rejected)) if not text.strip()]
    if empty:
        raise DataError(f"{where}: empty {' and '.join(empty)} completion")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_preference_data(
    path: str | Path | None = None, *, limit: int | None = None, skip_invalid: bool = False
) -> list[dict[str, str]]:
    """Read preference pairs from a ``.jsonl`` or ``.jsonl.gz`` file.

    Args:
        path: the file; ``None`` reads the bundled hh-rlhf subset (:data:`BUNDLED_DATA`).
        limit: keep only the first ``limit`` valid pairs.
        skip_invalid: skip lines that are not a valid pair (empty completion, no shared
            assistant turn, bad JSON) instead of raising; blank lines are always skipped.

    Returns:
        A list of ``{"prompt": str, "chosen": str, "rejected": str}`` in file order.

    Raises:
        DataError: missing file, no pairs, or (unless ``skip_invalid``) an invalid line; the
            message names the file and the 1-based line number.
    """
    path = Path(BUNDLED_DATA if path is None else path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    opener = gzip.open if path.suffix == ".gz" else open
    pairs: list[dict[str, str]] = []
    try:
        with opener(path, "rt", encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    pairs.append(_parse_line(line, f"{path}:{number}"))
                except DataError:
                    if not skip_invalid:
                        raise
                if limit is not None and len(pairs) == limit:
                    break
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise DataError(f"{path}: cannot be read as UTF-8 JSONL ({error})") from None
    if not pairs:
        raise DataError(f"{path}: no preference pairs found")
    return pairs


def train_bpe_tokenizer(pairs: Iterable[dict[str, str]], *, vocab_size: int = 512):
    """Learn a byte-level BPE tokenizer from the pairs' text (the ``tokenizers`` library).

    For demos and tests that start from a random model: no tokenizer download. Byte-level,
    so any text can be encoded, whatever the training set.

    Args:
        pairs: ``{"prompt", "chosen", "rejected"}`` dicts, as :func:`load_preference_data` returns.
        vocab_size: target vocabulary size, special tokens included (>= 258: the 256 bytes
            plus ``<|pad|>`` and ``<|endoftext|>``).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with pad and eos tokens set (ids 0 and 1).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + 2 special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (pair[key] for pair in pairs for key in ("prompt", "chosen", "rejected"))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN)
