"""Preference data for ``dpo-fast train``: reading and checking it, the bundled subset, a BPE
tokenizer learned from it.

A record is one of TRL's preference formats: ``{"prompt", "chosen", "rejected"}`` (standard:
strings; conversational: lists of ``{"role", "content"}`` messages) or an implicit prompt
``{"chosen", "rejected"}``. hh-rlhf's implicit-prompt dialogues (strings with
``"\\n\\nAssistant:"`` turns) are cut at the last assistant turn both share
(:func:`split_dialogue`); other implicit prompts are left to TRL. Extra columns (``tools``,
``chat_template_kwargs``) pass through to TRL.

Local JSON / JSONL files (optionally gzipped) are read here, line by line, so a bad line is
reported as ``file:line: what is wrong`` (or skipped with ``skip_invalid``, a line that is not
UTF-8 included); parquet files, ``save_to_disk`` folders and Hub names go through the
``datasets`` library and are checked row by row. Every problem raises :class:`DataError`.

The bundled default, :data:`BUNDLED_DATA`, is a 512-pair subset of Anthropic's hh-rlhf
(harmless-base test split, MIT licence): see ``dpo_fast/app/assets/README.md``.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import UserError, first_line

BUNDLED_DATA = Path(__file__).parent / "assets" / "hh_rlhf_subset.jsonl.gz"
BUNDLED_TEST_PAIRS = 64  # the bundled file's last pairs form its "test" split
ASSISTANT_TURN = "\n\nAssistant:"
PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|endoftext|>"
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
FIELDS = ("prompt", "chosen", "rejected")


class DataError(UserError):
    """A problem with the user's data; the message names the file and line (or row)."""


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


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value
    )


def _is_empty(value: str | list) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not any(str(m["content"]).strip() for m in value)


def check_pair(record: object, where: str) -> dict[str, Any]:
    """One record checked and normalized (hh-rlhf dialogues split into a prompt and completions).

    Args:
        record: a parsed JSON value / dataset row.
        where: ``file:line`` or ``split row N``, the start of every error message.

    Returns:
        The record as a dict; ``prompt`` added for hh-rlhf dialogues.

    Raises:
        DataError: not an object, a missing field, a field that is neither a string nor a list of
            ``{role, content}`` messages, strings mixed with messages, an empty completion, or
            identical completions.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = [key for key in FIELDS if key in record] if "prompt" in record else ["chosen", "rejected"]
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing}; expected TRL's preference format: "
            "{prompt, chosen, rejected} or an implicit prompt {chosen, rejected}"
        )
    wrong = [key for key in keys if not isinstance(record[key], str) and not _is_messages(record[key])]
    if wrong:
        raise DataError(f"{where}: field(s) {wrong} must be a string or a list of {{role, content}} messages")
    if len({isinstance(record[key], str) for key in keys}) > 1:
        raise DataError(f"{where}: {', '.join(keys)} mix strings and message lists; use one or the other")
    pair = dict(record)
    if "prompt" not in pair and isinstance(pair["chosen"], str) and ASSISTANT_TURN in pair["chosen"]:
        # not an hh-rlhf pair when they share no assistant turn: TRL finds the implicit prompt
        with contextlib.suppress(ValueError):
            pair["prompt"], pair["chosen"], pair["rejected"] = split_dialogue(
                pair["chosen"], pair["rejected"]
            )
    empty = [key for key in ("chosen", "rejected") if _is_empty(pair[key])]
    if empty:
        raise DataError(f"{where}: empty {' and '.join(empty)} completion")
    if pair["chosen"] == pair["rejected"]:
        raise DataError(f"{where}: chosen and rejected are identical")
    return pair


def _is_conversational(pair: Mapping[str, Any]) -> bool:
    return not isinstance(pair["chosen"], str)


def _json_values(path: Path) -> Iterator[tuple[str, Callable[[], object]]]:
    """``(where, parse)`` per record of a JSON Lines file or a JSON array; ``parse()`` raises
    ``DataError`` for a line that is not UTF-8 or not JSON."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        first = stream.read(64).lstrip(codecs.BOM_UTF8).lstrip()
        stream.seek(0)
        if first.startswith(b"["):  # one JSON array: it parses whole, or not at all
            try:
                values = json.loads(stream.read().decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise DataError(f"{path}: not a UTF-8 JSON array ({error})") from None
            for index, value in enumerate(values):
                yield f"{path}: item {index}", lambda value=value: value
            return
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"

            def parse(raw: bytes = raw, where: str = where, first: bool = number == 1) -> object:
                try:
                    line = raw.decode("utf-8-sig" if first else "utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{where}: not UTF-8 (byte {error.start + 1})") from None
                try:
                    return json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: bad JSON ({error.msg} at column {error.colno})") from None

            yield where, parse


def read_pairs(
    path: str | Path, *, limit: int | None = None, skip_invalid: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """The preference pairs of a ``.json``/``.jsonl`` file (optionally ``.gz``) and how many
    records were skipped.

    Args:
        path: JSON Lines (blank lines ignored) or one JSON array of records.
        limit: stop after ``limit`` valid pairs.
        skip_invalid: skip records that are not a valid pair (bad JSON, a line that is not
            UTF-8, see :func:`check_pair`) instead of raising.

    Raises:
        DataError: missing or unreadable file, no pairs, or (unless ``skip_invalid``) an
            invalid record; the message names the file and the 1-based line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    pairs: list[dict[str, Any]] = []
    skipped = 0
    first_where = ""
    try:
        for where, parse in _json_values(path):
            try:
                pair = check_pair(parse(), where)
                if pairs and _is_conversational(pair) != _is_conversational(pairs[0]):
                    kinds = ("standard (strings)", "conversational (messages)")
                    raise DataError(
                        f"{where}: {kinds[_is_conversational(pair)]} but {first_where} is "
                        f"{kinds[_is_conversational(pairs[0])]}; a data set uses one format"
                    )
            except DataError:
                if not skip_invalid:
                    raise
                skipped += 1
                continue
            first_where = first_where or where
            pairs.append(pair)
            if limit is not None and len(pairs) == limit:
                break
    except (OSError, EOFError) as error:  # unreadable, or a corrupt .gz stream
        raise DataError(f"{path}: cannot be read ({error})") from None
    if not pairs:
        raise DataError(f"{path}: no preference pairs found" + (f" ({skipped} invalid)" if skipped else ""))
    return pairs, skipped


def load_preference_data(
    path: str | Path | None = None, *, limit: int | None = None, skip_invalid: bool = False
) -> list[dict[str, Any]]:
    """The pairs of a JSON / JSONL file (:func:`read_pairs`); ``None`` reads the bundled hh-rlhf
    subset, 512 ``{"prompt", "chosen", "rejected"}`` string pairs."""
    return read_pairs(BUNDLED_DATA if path is None else path, limit=limit, skip_invalid=skip_invalid)[0]


def _has_suffix(path: Path, suffixes: Iterable[str]) -> bool:
    return any(path.name.lower().endswith(suffix) for suffix in suffixes)


def local_data_files(path: Path) -> dict[str, list[Path]]:
    """``{split: files}`` of a local data file or folder, named as ``datasets`` names splits
    (``train.jsonl``, ``test.parquet``, ``data/eval-0.jsonl``, ...; anything else is "train")."""
    if path.is_file():
        return {"train": [path]}
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except EmptyDatasetError:
        return {}
    splits = {
        str(split): [Path(f) for f in files if _has_suffix(Path(f), JSON_SUFFIXES + PARQUET_SUFFIXES)]
        for split, files in found.items()
    }
    return {split: files for split, files in splits.items() if files}


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk``."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def data_fingerprint(source: str | None, config_name: str | None = None) -> str:
    """SHA-256 of a local data file's or folder's bytes (file names included); for a Hub data set,
    its name and configuration (a revision change there is not seen)."""
    path = BUNDLED_DATA if source is None else Path(source)
    if not path.exists():
        return f"hub:{source}:{config_name}"
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(f"{file.relative_to(path) if file != path else file.name}\0".encode())
        with open(file, "rb") as stream:
            for block in iter(lambda stream=stream: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_dataset(dataset, where: str, skip_invalid: bool, log: Callable[[str], None]):
    """A ``datasets.Dataset`` whose rows all pass :func:`check_pair` (normalized; invalid rows
    dropped with ``skip_invalid``)."""
    from datasets import Dataset

    pairs, changed, skipped = [], False, 0
    for index, row in enumerate(dataset):
        try:
            pair = check_pair(row, f"{where} row {index}")
            if pairs and _is_conversational(pair) != _is_conversational(pairs[0]):
                raise DataError(f"{where} row {index}: mixes standard and conversational pairs with row 0")
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
            continue
        changed = changed or pair != row
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{where}: no preference pairs found" + (f" ({skipped} invalid)" if skipped else ""))
    if skipped:
        log(f"data: skipped {skipped} invalid pair(s) in {where}")
    return Dataset.from_list(pairs) if changed or skipped else dataset


def _load_json_split(files: list[Path], skip_invalid: bool, log: Callable[[str], None]):
    from datasets import Dataset

    pairs: list[dict[str, Any]] = []
    for file in files:
        records, skipped = read_pairs(file, skip_invalid=skip_invalid)
        if skipped:
            log(f"data: skipped {skipped} invalid line(s) in {file}")
        pairs += records
    if len({_is_conversational(p) for p in pairs}) > 1:
        raise DataError(
            f"{', '.join(map(str, files))}: mix standard and conversational pairs; use one format"
        )
    return Dataset.from_list(pairs)


def check_data_source(source: str | None) -> None:
    """Raise :class:`DataError` for a local data path (by its form) that does not exist; other
    names are Hub data sets."""
    if source is None or Path(source).exists():
        return
    if source.startswith((".", "/", "~")) or _has_suffix(Path(source), JSON_SUFFIXES + PARQUET_SUFFIXES):
        raise DataError(f"data file or folder not found: {source}")


def load_splits(
    source: str | None,
    *,
    config_name: str | None = None,
    streaming: bool = False,
    skip_invalid: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``{split: datasets.Dataset}`` of checked preference pairs.

    Args:
        source: a local ``.json``/``.jsonl``(``.gz``)/``.parquet`` file, a folder of them (splits
            from the file names), a ``save_to_disk`` folder, or a Hub data set name; ``None``: the
            bundled hh-rlhf subset (448 ``train`` pairs, 64 ``test`` pairs).
        config_name: the Hub data set's configuration (``--dataset_config``).
        streaming: stream a Hub data set (its rows are then not checked here).
        skip_invalid: drop invalid records (logged) instead of raising.

    Raises:
        DataError: a file, folder or data set that cannot be read, or an invalid record.
    """
    from datasets import Dataset

    if source is None:
        pairs = load_preference_data()
        test = len(pairs) - BUNDLED_TEST_PAIRS
        return {"train": Dataset.from_list(pairs[:test]), "test": Dataset.from_list(pairs[test:])}
    check_data_source(source)
    path = Path(source)
    if not path.exists():
        return _load_with_datasets(
            source, config_name=config_name, streaming=streaming, skip_invalid=skip_invalid, log=log
        )
    if is_saved_dataset(path):
        return _load_with_datasets(str(path), from_disk=True, skip_invalid=skip_invalid, log=log)
    if path.is_file() and not _has_suffix(path, JSON_SUFFIXES + PARQUET_SUFFIXES):
        raise DataError(
            f"{path}: unsupported data file; expected .json or .jsonl (optionally .gz) or .parquet"
        )
    splits = local_data_files(path)
    if not splits:
        raise DataError(f"{path}: no .json, .jsonl(.gz) or .parquet files in this folder")
    loaded = {}
    for split, files in splits.items():
        if all(_has_suffix(f, JSON_SUFFIXES) for f in files):
            loaded[split] = _load_json_split(files, skip_invalid, log)
        elif all(_has_suffix(f, PARQUET_SUFFIXES) for f in files):
            parquet = _load_with_datasets(
                "parquet", data_files=[str(f) for f in files], skip_invalid=skip_invalid, log=log
            )
            loaded[split] = parquet["train"]
        else:
            raise DataError(f"{path}: split {split!r} mixes JSON and parquet files; use one format per split")
    return loaded


def _load_with_datasets(
    source: str,
    *,
    from_disk: bool = False,
    skip_invalid: bool,
    log: Callable[[str], None],
    **kwargs: Any,
) -> dict[str, Any]:
    import datasets

    try:
        loaded = datasets.load_from_disk(source) if from_disk else datasets.load_dataset(source, **kwargs)
    except Exception as error:  # datasets raises many types; all mean "cannot load"
        raise DataError(f"cannot load the data set {source}: {first_line(error)}") from None
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        loaded = {"train": loaded}
    where = source if "data_files" not in kwargs else ", ".join(kwargs["data_files"])
    return {
        str(split): dataset
        if isinstance(dataset, datasets.IterableDataset)
        else check_dataset(dataset, f"{where} [{split}]", skip_invalid, log)
        for split, dataset in loaded.items()
    }


def _texts(pairs: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    for pair in pairs:
        for key in FIELDS:
            value = pair.get(key)
            if isinstance(value, str):
                yield value
            elif isinstance(value, list):
                yield from (str(message["content"]) for message in value)


def train_bpe_tokenizer(pairs: Iterable[Mapping[str, Any]], *, vocab_size: int = 512):
    """Learn a byte-level BPE tokenizer from the pairs' text (the ``tokenizers`` library).

    For demos and tests that start from a random model: no tokenizer download. Byte-level,
    so any text can be encoded, whatever the training set. It has a ChatML chat template
    (``<|im_start|>role\\n...<|im_end|>``), so conversational data works too.

    Args:
        pairs: preference records (strings or message lists), as :func:`read_pairs` returns.
        vocab_size: target vocabulary size, special tokens included (>= 260: the 256 bytes,
            ``<|pad|>``, ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>``).

    Returns:
        A ``transformers.PreTrainedTokenizerFast``: pad and eos tokens ids 0 and 1, the ChatML
        tokens 2 and 3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD_TOKEN, EOS_TOKEN, *CHATML_TOKENS]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be >= 260 (256 bytes + 4 special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(pairs), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=list(CHATML_TOKENS),
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast
