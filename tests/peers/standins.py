"""Local stand-ins for the hub models and datasets TRL's DPO trainer tests load.

TRL's tests name hub repositories (``trl-internal-testing/tiny-Qwen2ForCausalLM-2.5``,
``trl-internal-testing/zen``, ...). Nothing can be downloaded here, so :func:`build` writes a
folder of the same relative names: tiny random models of the same architectures (saved in
bfloat16, as the hub's tiny models are), one small byte-level BPE tokenizer with a ChatML chat
template, and datasets in the hub's formats built from the Zen of Python (the standard
library's ``this`` module). ``from_pretrained("trl-internal-testing/...")`` and
``load_dataset("trl-internal-testing/...")`` resolve a relative path that exists on disk
before going to the hub, so running pytest from that folder with ``HF_HUB_OFFLINE=1`` gives
TRL's tests their inputs without changing the tests.

Vision-language models are not built: their tests are deselected (see ``run.py``).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
from pathlib import Path

import torch

ORG = "trl-internal-testing"
# bump when a stand-in changes: build() rebuilds a folder whose stamp differs
VERSION = "1"

CHAT_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\nTools:\\n' }}{%- for tool in tools %}{{ tool | tojson }}"
    "{{ '\\n' }}{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny model.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message.get('content') %}{{ message['content'] }}{%- endif %}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>' + call['function']['name'] + ' ' }}"
    "{{ (call['function']['arguments'] | string) + '</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def zen_lines() -> list[str]:
    """The 19 aphorisms of the Zen of Python (``this.s`` is ROT13)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing it prints the poem
        import this
    text = codecs.decode(this.s, "rot13")
    return [line for line in text.splitlines()[2:] if line.strip()]


def _pairs() -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): the first words of a line, its end, another line's end."""
    lines = zen_lines()
    pairs = []
    for i, line in enumerate(lines):
        other = lines[(i + 7) % len(lines)]
        words, other_words = line.split(" "), other.split(" ")
        cut, other_cut = max(1, len(words) // 2), max(1, len(other_words) // 2)
        pairs.append(
            (" ".join(words[:cut]), " " + " ".join(words[cut:]), " " + " ".join(other_words[other_cut:]))
        )
    return pairs


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str, **extra) -> list[dict]:
    return [{"role": "assistant", "content": text.strip(), **extra}]


def zen_configs() -> dict[str, list[dict]]:
    """The ``zen`` dataset's preference configurations, as rows."""
    pairs = _pairs()
    return {
        "standard_preference": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs],
        "conversational_preference": [
            {"prompt": _user(p), "chosen": _assistant(c), "rejected": _assistant(r)} for p, c, r in pairs
        ],
        "standard_implicit_prompt_preference": [{"chosen": p + c, "rejected": p + r} for p, c, r in pairs],
        "conversational_implicit_prompt_preference": [
            {"chosen": _user(p) + _assistant(c), "rejected": _user(p) + _assistant(r)} for p, c, r in pairs
        ],
        "standard_unpaired_preference": [
            {"prompt": p, "completion": completion, "label": label}
            for p, c, r in pairs
            for completion, label in ((c, True), (r, False))
        ],
    }


def harmony_rows() -> list[dict]:
    """GPT-OSS style pairs: an assistant ``thinking`` field and chat-template keyword arguments."""
    return [
        {
            "prompt": _user(p),
            "chosen": _assistant(c, thinking="Say what the Zen says."),
            "rejected": _assistant(r, thinking="Say anything."),
            "chat_template_kwargs": {"reasoning_effort": "low", "model_identity": "A tiny model."},
        }
        for p, c, r in _pairs()
    ]


def toolcall_rows() -> list[dict]:
    """Tool-calling pairs: a tool call and its result in the prompt, the tools' JSON schemas."""
    tool = {
        "type": "function",
        "function": {
            "name": "zen",
            "description": "Look up an aphorism of the Zen of Python.",
            "parameters": {
                "type": "object",
                "properties": {"start": {"type": "string", "description": "Its first words."}},
                "required": ["start"],
            },
        },
    }
    rows = []
    for p, c, r in _pairs():
        call = {"type": "function", "function": {"name": "zen", "arguments": json.dumps({"start": p})}}
        prompt = [
            *_user(f"Finish: {p}"),
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": p + c},
        ]
        rows.append({"prompt": prompt, "chosen": _assistant(c), "rejected": _assistant(r), "tools": [tool]})
    return rows


def _write_dataset(folder: Path, configs: dict[str, list[dict]], test_rows: int = 2) -> None:
    """JSON Lines files per config and split, and the README's ``configs`` metadata that
    ``load_dataset(folder, config_name)`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = ["---", "configs:"]
    for name, rows in configs.items():
        splits = {"train": rows[:-test_rows], "test": rows[-test_rows:]}
        meta += [f"- config_name: {name}", "  data_files:"]
        for split, split_rows in splits.items():
            path = folder / name / f"{split}.jsonl"
            path.parent.mkdir(exist_ok=True)
            path.write_text("".join(json.dumps(row) + "\n" for row in split_rows))
            meta += [f"  - split: {split}", f"    path: {name}/{split}.jsonl"]
    meta.append("---")
    (folder / "README.md").write_text("\n".join(meta) + "\nLocal stand-in for a TRL test dataset.\n")


def build_tokenizer():
    """A byte-level BPE tokenizer on the Zen's text, ChatML special tokens, a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [*zen_lines(), "system user assistant tool You are a tiny model. Finish: zen start"]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


REMOTE_CONFIG = """from transformers import LlamaConfig


class RemoteConfig(LlamaConfig):
    model_type = "remote"
"""
REMOTE_MODELING = """from transformers import LlamaForCausalLM, LlamaModel

from .configuration_remote import RemoteConfig


class RemoteModel(LlamaModel):
    config_class = RemoteConfig


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
"""


def _model_configs(vocab: int, pad: int, eos: int) -> dict[str, object]:
    import transformers as tf

    small = {
        "vocab_size": vocab,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": pad,
        "eos_token_id": eos,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    moe = {"num_experts_per_tok": 2, "moe_intermediate_size": 16}
    return {
        "tiny-Qwen2ForCausalLM-2.5": tf.Qwen2Config(**small),
        "tiny-Cohere2ForCausalLM": tf.Cohere2Config(
            **small, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
        ),
        "tiny-Glm4MoeForCausalLM": tf.Glm4MoeConfig(
            **small, **moe, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, head_dim=4
        ),
        "tiny-GptOssForCausalLM": tf.GptOssConfig(
            **{**small, "intermediate_size": 16},
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=4,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "tiny-Qwen3MoeForCausalLM": tf.Qwen3MoeConfig(**small, **moe, num_experts=4, head_dim=4),
        "tiny-NemotronHForCausalLM-nano": tf.NemotronHConfig(
            **{**small, "num_hidden_layers": 3},
            layers_block_type=["mamba", "attention", "moe"],
            mamba_num_heads=8,
            mamba_head_dim=4,
            mamba_n_groups=1,
            ssm_state_size=16,
            mamba_d_conv=4,
            mamba_expand=2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=16,
            use_mamba_kernels=False,
        ),
        "tiny-Olmo3ForCausalLM": tf.Olmo3Config(
            **small, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
        ),
        "tiny-Lfm2ForCausalLM": tf.Lfm2Config(
            **small, full_attn_idxs=[1], block_multiple_of=8, conv_L_cache=3
        ),
        "tiny-Lfm2ForCausalLM-2.5": tf.Lfm2Config(
            **{**small, "num_hidden_layers": 3}, full_attn_idxs=[2], block_multiple_of=8, conv_L_cache=3
        ),
    }


def build(root: Path) -> Path:
    """Write the stand-ins under ``root / "trl-internal-testing"`` (skipped when up to date)."""
    import transformers as tf

    base = Path(root) / ORG
    stamp = base / "VERSION"
    if stamp.exists() and stamp.read_text() == VERSION:
        return base
    base.mkdir(parents=True, exist_ok=True)
    _write_dataset(base / "zen", zen_configs())
    _write_dataset(base / "harmony", {"preference": harmony_rows()})
    _write_dataset(base / "toolcall", {"preference": toolcall_rows()})

    tokenizer = build_tokenizer()
    vocab, pad, eos = len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    for name, config in _model_configs(vocab, pad, eos).items():
        model = tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        model.generation_config = tf.GenerationConfig(pad_token_id=pad, eos_token_id=eos)
        model.save_pretrained(base / name)
        tokenizer.save_pretrained(base / name)

    remote = base / "tiny-RemoteForCausalLM"
    remote.mkdir(exist_ok=True)
    (remote / "configuration_remote.py").write_text(REMOTE_CONFIG)
    (remote / "modeling_remote.py").write_text(REMOTE_MODELING)
    config = tf.LlamaConfig(**_model_configs(vocab, pad, eos)["tiny-Qwen2ForCausalLM-2.5"].to_diff_dict())
    config = config.to_dict()
    config.update(
        model_type="remote",
        architectures=["RemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
        },
    )
    weights = tf.LlamaForCausalLM(tf.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    weights.to(torch.bfloat16).save_pretrained(remote)
    (remote / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(remote)
    stamp.write_text(VERSION)
    return base


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "build/peers/trl")))
