"""DPO in a plain PyTorch loop on dpo_fast's kernels (no TRL): what ``dpo-fast train`` runs.

Data flow: pairs (:mod:`dpo_fast.app.pairs`) -> a tokenizer (a local one, or a BPE learned from
the pairs) -> every pair tokenized and truncated once -> the reference model's log-probs
precomputed once (:mod:`dpo_fast.reference_logps`, cached) -> each step: a shuffled batch
collated for the layout -> :func:`dpo_fast.concatenated_forward` (policy, fused head) ->
:func:`dpo_fast.preference_loss.preference_loss` -> AdamW. Per-step metrics go to
``<output_dir>/metrics.jsonl``; checkpoints to ``<output_dir>/checkpoint``.

The reference model is the initial policy: a model directory, or a random Llama built from a
named config (:data:`MODEL_CONFIGS`) with a fixed seed, so ``--resume`` can rebuild it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..collate import Pair, PreferenceCollator
from ..constants import LAYOUTS, LOSS_TYPES, REFERENCE_FREE
from ..hf import concatenated_forward
from ..preference_loss import preference_loss
from ..reference_logps import ReferenceLogps, precompute_reference_logps, to_device
from .pairs import BUNDLED_DATA, DataError, load_preference_data, train_bpe_tokenizer

# Random-init Llama shapes for runs without --model. "tiny" trains in minutes on a laptop
# CPU; "small" (~30M parameters with its 8k vocabulary) is the GPU default.
MODEL_CONFIGS: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
}
BPE_VOCAB = {"tiny": 512, "small": 8192}
CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"


class SetupError(ValueError):
    """A problem with the user's model, tokenizer, checkpoint or options (one-line message)."""


@dataclasses.dataclass
class TrainConfig:
    """Options of a training run (the ``dpo-fast train`` flags). ``None`` means "pick for the
    device": the tiny config on CPU, the small one on a GPU."""

    data: str | None = None  # JSONL(.gz); None: the bundled hh-rlhf subset
    model: str | None = None  # a local HF causal LM directory; None: random init
    model_config: str | None = None  # "tiny" / "small" (random init)
    tokenizer: str | None = None  # a local tokenizer directory; None: the model's, or a BPE
    vocab_size: int | None = None  # the BPE's size
    loss_type: Sequence[str] = ("sigmoid",)
    loss_weights: Sequence[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    layout: str = "padded"
    steps: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    max_prompt_length: int | None = None  # default: half of max_length
    lr: float | None = None
    warmup_steps: int | None = None
    max_grad_norm: float = 1.0
    train_pairs: int | None = None  # pairs to train on (first of the file); None: all but eval
    eval_pairs: int = 64  # the next pairs, held out: accuracy after training
    skip_invalid: bool = False
    output_dir: str = "dpo_fast_run"
    save_every: int = 0  # 0: only at the end
    resume: bool = False
    seed: int = 0
    backend: str = "auto"
    device: str | None = None
    progress: bool = True

    def resolved(self, device: torch.device) -> TrainConfig:
        """A copy with the device-dependent defaults filled in and every option checked."""
        gpu = device.type == "cuda"
        defaults = {
            "model_config": "small" if gpu else "tiny",
            "steps": 300 if gpu else 60,
            "batch_size": 32 if gpu else 16,
            "max_length": 512 if gpu else 160,
            "lr": 3e-4 if gpu else 2e-3,
            # the CPU demo trains on a part of the bundled pairs; a user's file is used whole
            "train_pairs": 192 if not gpu and self.data is None else None,
        }
        config = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        if config.vocab_size is None:
            config.vocab_size = BPE_VOCAB.get(config.model_config, 512)
        if config.max_prompt_length is None:
            config.max_prompt_length = config.max_length // 2
        if config.warmup_steps is None:
            config.warmup_steps = max(1, config.steps // 20)
        config.loss_type = tuple(config.loss_type)
        _check_config(config)
        return config


def _check_config(config: TrainConfig) -> None:
    unknown = [t for t in config.loss_type if t not in LOSS_TYPES]
    if unknown or not config.loss_type:
        raise SetupError(f"--loss-type must be names from {', '.join(LOSS_TYPES)}; got {unknown or 'none'}")
    if config.loss_weights is not None and len(config.loss_weights) != len(config.loss_type):
        raise SetupError(
            f"--loss-weights needs one weight per loss type ({len(config.loss_type)}), "
            f"got {len(config.loss_weights)}"
        )
    if config.layout not in LAYOUTS:
        raise SetupError(f"--layout must be one of {', '.join(LAYOUTS)}, got {config.layout!r}")
    if config.model is None and config.model_config not in MODEL_CONFIGS:
        raise SetupError(
            f"--model-config must be one of {', '.join(MODEL_CONFIGS)}, got {config.model_config!r}"
        )
    positive = ("steps", "batch_size", "max_length", "max_prompt_length", "vocab_size")
    for name in positive:
        if getattr(config, name) < 1:
            raise SetupError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.max_prompt_length >= config.max_length:
        raise SetupError(
            f"--max-prompt-length ({config.max_prompt_length}) must leave room for the completion "
            f"within --max-length ({config.max_length})"
        )
    if not config.lr > 0 or not config.beta > 0:
        raise SetupError(f"--lr and --beta must be > 0, got lr={config.lr}, beta={config.beta}")
    if config.eval_pairs < 0 or (config.train_pairs is not None and config.train_pairs < 1):
        raise SetupError("--train-pairs must be >= 1 and --eval-pairs >= 0")


def _load_tokenizer(config: TrainConfig, train_pairs: list[dict[str, str]], log: Callable[[str], None]):
    from transformers import AutoTokenizer

    checkpoint = Path(config.output_dir) / CHECKPOINT
    source = checkpoint if config.resume else config.tokenizer or config.model
    if source is not None:
        if not Path(source).is_dir():
            raise SetupError(f"--tokenizer {source} is not a directory (local tokenizers only: no downloads)")
        try:
            # local only: a typo must not turn into a Hugging Face Hub download
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as error:
            hint = "" if config.tokenizer or config.resume else "; pass --tokenizer"
            raise SetupError(f"cannot load a tokenizer from {source}: {_first_line(error)}{hint}") from None
    else:
        tokenizer = train_bpe_tokenizer(train_pairs, vocab_size=config.vocab_size)
        log(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens, learned from the {len(train_pairs)} pairs")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _build_model(config: TrainConfig, tokenizer, device: torch.device) -> nn.Module:
    """The initial policy (= the reference model), in fp32 on ``device``."""
    if config.model is None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(config.seed)
        model_config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=max(config.max_length, 128),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            tie_word_embeddings=False,
            **MODEL_CONFIGS[config.model_config],
        )
        return LlamaForCausalLM(model_config).to(device)
    from transformers import AutoModelForCausalLM

    path = Path(config.model)
    if not (path / "config.json").is_file():
        raise SetupError(f"--model {path} is not a Hugging Face model directory (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise SetupError(
            f"--model {path} is not a causal LM that transformers can load: {_first_line(error)}"
        ) from None
    embeddings = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embeddings:
        raise SetupError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {embeddings}: "
            "pass the model's own tokenizer with --tokenizer"
        )
    return model.to(device)


def _tokenize(pairs: list[dict[str, str]], collator: PreferenceCollator, where: str) -> list[Pair]:
    try:
        return collator.pairs(pairs)
    except ValueError as error:
        raise DataError(f"{where}: {_first_line(error)}") from None


def _as_examples(pairs: list[Pair]) -> list[dict[str, list[int]]]:
    return [dataclasses.asdict(pair) for pair in pairs]


def _batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> torch.Tensor:
    """The example indices of ``step``: epochs of seeded permutations, a pure function of the
    step so a resumed run continues the same order."""
    per_epoch = num_examples // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[offset * batch_size : (offset + 1) * batch_size]


def _loss(out, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, config: TrainConfig):
    """The configured preference loss (a ``dpo_fast.preference_loss.PreferenceLossOutput``) of a
    ``ConcatenatedOutput``."""
    reference_free = all(t in REFERENCE_FREE for t in config.loss_type)
    needs_nll = bool({"orpo", "cpo"} & set(config.loss_type))
    chosen_nll = -out.chosen_logps.sum() / out.chosen_tokens.sum().clamp(min=1) if needs_nll else None
    return preference_loss(
        out.chosen_logps,
        out.rejected_logps,
        None if reference_free else ref_chosen,
        None if reference_free else ref_rejected,
        loss_type=list(config.loss_type),
        loss_weights=config.loss_weights,
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        chosen_lengths=out.chosen_tokens,
        rejected_lengths=out.rejected_tokens,
        chosen_nll=chosen_nll,
        backend=config.backend,
    )


def _autocast(device: torch.device):
    # bf16 matmuls with fp32 master weights on GPUs; fp32 on CPU (bf16 CPU matmuls are slow)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[dict[str, list[int]]],
    reference: ReferenceLogps,
    collator: PreferenceCollator,
    config: TrainConfig,
    device: torch.device,
) -> dict[str, float]:
    """Mean loss, reward accuracy and margin of ``model`` over ``examples`` (no gradient)."""
    totals: dict[str, float] = {}
    for start in range(0, len(examples), config.batch_size):
        index = slice(start, start + config.batch_size)
        batch = to_device(collator(examples[index]), device)
        with _autocast(device):
            out = concatenated_forward(model, batch, layout=config.layout, grad=False, backend=config.backend)
        result = _loss(out, reference.chosen[index].to(device), reference.rejected[index].to(device), config)
        count = out.chosen_logps.shape[0]
        for name, value in {"loss": result.loss, **result.metrics}.items():
            totals[name] = totals.get(name, 0.0) + float(value) * count
    return {name: value / len(examples) for name, value in totals.items()}


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_checkpoint(model, tokenizer, optimizer, step: int, config: TrainConfig) -> None:
    directory = Path(config.output_dir) / CHECKPOINT
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    state = {"step": step, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(config)}
    torch.save(state, directory / STATE_FILE)


def _peak_memory(device: torch.device) -> tuple[str, int]:
    if device.type == "cuda":
        return "peak GPU memory", torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return "peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _reference_cache(config: TrainConfig) -> Path:
    """Next to the user's data file when that folder is writable; in the output folder for the
    bundled data (installed packages may be read-only) or read-only data folders."""
    if config.data is not None:
        data = Path(config.data)
        probe = data.parent / f".{data.name}.write-test"
        try:
            probe.touch()
            probe.unlink()
            return data.with_name(f"{data.name}.ref-logps.pt")
        except OSError:
            pass
    return Path(config.output_dir) / "reference_logps.pt"


@dataclasses.dataclass
class _Run:
    """Everything a run prepares before its first step."""

    model: nn.Module
    tokenizer: Any
    collator: PreferenceCollator  # token ids -> a batch of the layout
    train: list[dict[str, list[int]]]
    held_out: list[dict[str, list[int]]]
    train_reference: ReferenceLogps
    held_out_reference: ReferenceLogps


def _prepare(config: TrainConfig, device: torch.device, log: Callable[[str], None]) -> _Run:
    """Data, tokenizer, model and reference log-probs."""
    limit = None if config.train_pairs is None else config.train_pairs + config.eval_pairs
    pairs = load_preference_data(config.data, limit=limit, skip_invalid=config.skip_invalid)
    num_eval = min(config.eval_pairs, len(pairs) // 4)
    num_train = len(pairs) - num_eval
    if config.train_pairs is not None:
        num_train = min(num_train, config.train_pairs)
    source = config.data or f"{BUNDLED_DATA.name} (bundled hh-rlhf subset)"
    log(f"data: {num_train} training pairs, {num_eval} held out, from {source}")

    tokenizer = _load_tokenizer(config, pairs[:num_train], log)
    text_collator = PreferenceCollator(
        tokenizer,
        layout=config.layout,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
    )
    examples = _as_examples(_tokenize(pairs, text_collator, str(config.data or BUNDLED_DATA)))
    model = _build_model(config, tokenizer, device)
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    what = config.model or f"random-init Llama ({config.model_config} config)"
    log(f"model: {what}, {parameters:.2f}M parameters, on {device}, layout {config.layout}")

    collator = PreferenceCollator(layout=config.layout, pad_token_id=tokenizer.pad_token_id)
    if all(t in REFERENCE_FREE for t in config.loss_type):
        zeros = torch.zeros(len(examples))  # never read: the loss sees no reference
        reference = ReferenceLogps(zeros, zeros)
    else:
        reference = precompute_reference_logps(
            model,
            examples,
            layout=config.layout,
            batch_size=config.batch_size,
            collator=collator,
            cache=_reference_cache(config),
            progress=config.progress,
            backend=config.backend,
        )
    split = slice(None, num_train), slice(num_train, None)
    return _Run(
        model,
        tokenizer,
        collator,
        examples[split[0]],
        examples[split[1]],
        *(ReferenceLogps(reference.chosen[part], reference.rejected[part]) for part in split),
    )


def _step(run: _Run, step: int, optimizer, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """One optimizer step on the step's batch; its metrics."""
    index = _batch_indices(step, len(run.train), min(config.batch_size, len(run.train)), config.seed)
    batch = to_device(run.collator([run.train[i] for i in index]), device)
    for group in optimizer.param_groups:
        group["lr"] = config.lr * _lr_factor(step, config)
    with _autocast(device):
        out = concatenated_forward(run.model, batch, layout=config.layout, backend=config.backend)
    reference = run.train_reference
    result = _loss(out, reference.chosen[index].to(device), reference.rejected[index].to(device), config)
    result.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(
        2 * len(run.train[i]["prompt_ids"])
        + len(run.train[i]["chosen_ids"])
        + len(run.train[i]["rejected_ids"])
        for i in index.tolist()
    )
    return {
        "step": step + 1,
        "loss": float(result.loss.detach()),
        "grad_norm": float(grad_norm),
        "lr": optimizer.param_groups[0]["lr"],
        **{name: float(value) for name, value in result.metrics.items()},
        "tokens": tokens,
    }


def train(config: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run DPO as ``config`` says; returns the run's summary (also saved as ``summary.json``).

    Raises:
        DataError, SetupError: a problem with the user's data, model or options.
        torch.OutOfMemoryError: out of GPU memory (the CLI suggests smaller settings).
    """
    from tqdm.auto import tqdm

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = config.resolved(device)
    output = Path(config.output_dir)
    checkpoint = output / CHECKPOINT
    if config.resume and not (checkpoint / STATE_FILE).is_file():
        raise SetupError(f"--resume: no checkpoint to resume from in {checkpoint}")
    output.mkdir(parents=True, exist_ok=True)
    run = _prepare(config, device, log)

    optimizer = torch.optim.AdamW(run.model.parameters(), lr=config.lr, weight_decay=0.0)
    start = 0
    if config.resume:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True)
        run.model.load_state_dict(saved.state_dict())
        state = torch.load(checkpoint / STATE_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        log(f"resumed from {checkpoint} at step {start}")
    # Dropout off, as TRL does: the policy's log-probs must be comparable with the reference's.
    # eval() also covers attention dropout, which transformers applies only in training mode.
    run.model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    step_times: list[float] = []
    tokens_seen = 0
    last: dict[str, float] = {}
    steps = tqdm(
        range(start, config.steps), desc="dpo", disable=not config.progress, initial=start, total=config.steps
    )
    metrics_path = output / "metrics.jsonl"
    if config.resume:
        # steps logged after the checkpoint (an interrupted run) are run again: drop them
        kept = [line for line in _read_lines(metrics_path) if json.loads(line)["step"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    with metrics_path.open("a") as metrics_file:
        for step in steps:
            began = time.perf_counter()
            last = _step(run, step, optimizer, config, device)
            step_times.append(time.perf_counter() - began)
            tokens_seen += last["tokens"]
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
            steps.set_postfix(
                loss=f"{last['loss']:.3f}",
                acc=f"{last['rewards/accuracies']:.2f}",
                margin=f"{last['rewards/margins']:.3f}",
            )
            if config.save_every and (step + 1) % config.save_every == 0:
                _save_checkpoint(run.model, run.tokenizer, optimizer, step + 1, config)
    steps.close()
    _save_checkpoint(run.model, run.tokenizer, optimizer, config.steps, config)

    memory_name, memory = _peak_memory(device)
    summary: dict[str, Any] = {
        "steps": config.steps,
        "steps_this_run": len(step_times),
        "seconds_per_step": statistics.median(step_times) if step_times else None,
        "tokens_per_second": tokens_seen / sum(step_times) if step_times else None,
        memory_name: memory,
        "final_step": last,
        "train_pairs": evaluate(run.model, run.train, run.train_reference, run.collator, config, device),
    }
    if run.held_out:
        summary["held_out_pairs"] = evaluate(
            run.model, run.held_out, run.held_out_reference, run.collator, config, device
        )
    summary["config"] = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
