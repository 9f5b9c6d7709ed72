"""PreferenceCollator and the layout builders of dpo_fast.collate, on hand-checked examples."""

from __future__ import annotations

import pytest
import torch

from dpo_fast.collate import (
    Pair,
    PreferenceCollator,
    collate_packed,
    collate_prefix_shared,
    pairs_from_padded,
    sequences_from_padded,
    tokenize_pair,
    truncate_pair,
)

EXAMPLES = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
]


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built in memory (no hub): BOS prepended with special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "[UNK]", "hello", "world", "yes", "no", "maybe"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def test_padded_is_trls_format():
    """Same tensors as TRL's own DataCollatorForPreference (the format TRL 1.x trains on)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    ours = PreferenceCollator(pad_token_id=0)(EXAMPLES)
    theirs = DataCollatorForPreference(pad_token_id=0)(EXAMPLES)
    assert set(ours) == {"input_ids", "attention_mask", "completion_mask"}
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_packed_layout():
    batch = PreferenceCollator(layout="packed", pad_token_id=0)(EXAMPLES)
    # 4 sequences of 5, 3, 4, 4 tokens in rows of <= 5 (the longest), placed longest first
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],
        [1, 2, 3, 6, 0],
        [7, 8, 10, 11, 0],
        [7, 8, 9, 0, 0],
    ]
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 4],
        [0, 1, 2, 3, 0],
        [0, 1, 2, 3, 0],
        [0, 1, 2, 0, 0],
    ]
    assert batch["doc_ids"].tolist() == [[0] * 5, [2, 2, 2, 2, -1], [3, 3, 3, 3, -1], [1, 1, 1, -1, -1]]
    assert batch["branch_ids"].tolist() == [
        [0, 0, 0, 1, 1],
        [0, 0, 0, 2, 0],
        [0, 0, 2, 2, 0],
        [0, 0, 1, 0, 0],
    ]
    assert batch["sequence_ids"].tolist() == [
        [-1, -1, -1, 0, 0],
        [-1, -1, -1, 2, -1],
        [-1, -1, 3, 3, -1],
        [-1, -1, 1, -1, -1],
    ]


def test_packed_rows_share_space():
    batch = PreferenceCollator(layout="packed", pad_token_id=0, pack_length=9)(EXAMPLES)
    # longest first: 5 | 4 (fits with 5) | 4 -> row 2 | 3 (fits with 4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 1, 2, 3, 6], [7, 8, 9, 7, 8, 10, 11, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 0, 0]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 0, 0, 2, 2, 2, 2], [1, 1, 1, 3, 3, 3, 3, -1, -1]]


def test_prefix_shared_layout():
    batch = PreferenceCollator(layout="prefix_shared", pad_token_id=0, pack_length=11)(EXAMPLES)
    # blocks [1 2 3 | 4 5 | 6] and [7 8 | 9 | 10 11], one row
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    # rejected positions continue from the end of the prompt
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3]]
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]
    assert batch["branch_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 2]]
    assert batch["sequence_ids"].tolist() == [[-1, -1, -1, 0, 0, 2, -1, -1, 1, 3, 3]]


def test_pad_to_multiple_of():
    for layout in ("padded", "packed", "prefix_shared"):
        batch = PreferenceCollator(layout=layout, pad_to_multiple_of=8)(EXAMPLES)
        assert batch["input_ids"].shape[1] == 8, layout


def test_reference_logps_pass_through():
    examples = [
        dict(e, ref_chosen_logps=-1.5 * i, ref_rejected_logps=-2.0 * i) for i, e in enumerate(EXAMPLES)
    ]
    for layout in ("padded", "packed", "prefix_shared"):
        batch = PreferenceCollator(layout=layout)(examples)
        assert batch["ref_chosen_logps"].tolist() == [0.0, -1.5] and batch["ref_rejected_logps"].tolist() == [
            0,
            -2,
        ]


def test_strings_are_tokenized_like_trl(tokenizer):
    pair = tokenize_pair({"prompt": "hello world", "chosen": "yes", "rejected": "no maybe"}, tokenizer)
    # prompt with special tokens (BOS), completions without, EOS appended
    assert pair == Pair([1, 4, 5], [6, 2], [7, 8, 2])
    assert tokenize_pair(
        {"prompt": "hello", "chosen": "yes", "rejected": "no"}, tokenizer, add_eos=False
    ) == Pair([1, 4], [6], [7])
    batch = PreferenceCollator(tokenizer)([{"prompt": "hello", "chosen": "yes", "rejected": "no"}])
    assert batch["input_ids"].tolist() == [[1, 4, 6, 2], [1, 4, 7, 2]]
    assert PreferenceCollator(tokenizer).pad_token_id == 0


def test_token_ids_as_tensors():
    example = {key: torch.tensor(value) for key, value in EXAMPLES[0].items()}
    assert tokenize_pair(example) == Pair([1, 2, 3], [4, 5], [6])


def test_truncation_keeps_the_prompt_and_cuts_completions():
    pair = Pair([1, 2, 3, 4], [5, 6, 7], [8, 9])
    assert truncate_pair(pair, max_length=6) == Pair([1, 2, 3, 4], [5, 6], [8, 9])
    assert truncate_pair(pair, max_length=5) == Pair([1, 2, 3, 4], [5], [8])
    # the prompt keeps its end
    assert truncate_pair(pair, max_length=4, max_prompt_length=2) == Pair([3, 4], [5, 6], [8, 9])
    assert truncate_pair(pair, max_length=None) == pair


def test_truncation_never_empties_a_completion():
    pair = Pair([1, 2, 3, 4], [5, 6, 7], [8, 9])
    with pytest.raises(ValueError, match=r"example 7: the prompt \(4 tokens\) leaves no room for the chosen"):
        truncate_pair(pair, max_length=4, index=7)
    collator = PreferenceCollator(max_length=3)
    with pytest.raises(ValueError, match=r"example 0: the prompt \(3 tokens\) leaves no room"):
        collator(EXAMPLES)
    with pytest.raises(ValueError, match="example 1: the rejected completion is empty"):
        PreferenceCollator()([EXAMPLES[0], dict(EXAMPLES[1], rejected_ids=[])])


def test_same_pairs_in_every_layout():
    """Truncated pairs are the same whatever the layout, so the layouts score the same tokens."""
    long = [{"prompt_ids": [1] * 5, "chosen_ids": [2] * 9, "rejected_ids": [3] * 2}]
    padded = PreferenceCollator(max_length=8)(long)
    assert padded["completion_mask"].sum(-1).tolist() == [3, 2]
    block = PreferenceCollator(layout="prefix_shared", max_length=8)(long)
    assert (block["sequence_ids"] == 0).sum() == 3 and (block["sequence_ids"] == 1).sum() == 2


def test_padded_round_trip():
    batch = PreferenceCollator()(EXAMPLES)
    assert pairs_from_padded(batch) == [Pair(**e) for e in EXAMPLES]
    assert sequences_from_padded(batch)[3] == ([7, 8], [10, 11])


def test_different_prompts_cannot_share():
    batch = PreferenceCollator()(EXAMPLES)
    batch["input_ids"][2, 1] = 99
    with pytest.raises(ValueError, match="pair 0 has a prompt of 3 tokens in row 0 and a different one"):
        pairs_from_padded(batch)


def test_bad_input(tokenizer):
    with pytest.raises(ValueError, match=r"layout must be one of .*got 'ragged'"):
        PreferenceCollator(layout="ragged")
    with pytest.raises(ValueError, match="max_length must be None or a positive int, got 0"):
        PreferenceCollator(max_length=0)
    with pytest.raises(ValueError, match="cannot collate an empty list"):
        PreferenceCollator()([])
    with pytest.raises(ValueError, match=r"an example must have keys .*got \['chosen', 'prompt'\]"):
        PreferenceCollator()([{"prompt": "a", "chosen": "b"}])
    with pytest.raises(ValueError, match="strings need a tokenizer"):
        PreferenceCollator()([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(TypeError, match="chosen_ids must be a list of int token ids, got str"):
        PreferenceCollator()([dict(EXAMPLES[0], chosen_ids="4 5")])
    with pytest.raises(ValueError, match=r"rejected_ids must be a 1-D integer tensor"):
        tokenize_pair(dict(EXAMPLES[0], rejected_ids=torch.ones(2, 2, dtype=torch.long)))
    with pytest.raises(TypeError, match="an example must be a mapping, got list"):
        PreferenceCollator()([[1, 2, 3]])
    with pytest.raises(ValueError, match="a sequence of 5 tokens does not fit pack_length=4"):
        PreferenceCollator(layout="packed", pack_length=4)(EXAMPLES)
    with pytest.raises(ValueError, match="packed needs 2B sequences"):
        collate_packed([([1], [2])] * 3, pad_token_id=0)
    assert collate_prefix_shared([Pair([1], [2], [3])], pad_token_id=0)["num_pairs"] == 1
