"""Beyond one process: DDP, FSDP2, a tensor-parallel head and the TRL head, in real process groups.

Each test starts 2 processes with ``torchrun --standalone`` (a free port on localhost, the
gloo backend on CPU, NCCL on GPUs), the launch the README's multi-GPU section shows; the
processes run a *worker* of this file (``python tests/test_distributed.py WORKER SEED
DEVICE``) that batches several checks. Each rank compares with a single-process oracle it
computes itself, without collectives, from the same seed: the model in float64 on every
rank's batch, the loss averaged over ranks as DDP and FSDP2 average gradients.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def launch(worker: str, device: str = "cpu") -> None:
    """Run ``worker`` on 2 processes under torchrun; fail with their output if one fails."""
    seed = torch.initial_seed()  # the test's fresh seed (conftest prints it)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]
    command += [__file__, worker, str(seed), device]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if result.returncode != 0:
        pytest.fail(
            f"{worker} workers failed (seed {seed}):\n{result.stdout[-4000:]}\n{result.stderr[-12000:]}"
        )


def needs_two_gpus():
    return pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA devices")


# each a comma-separated list of workers that one pair of processes runs in turn
WORKERS = ["tensor_parallel", "ddp_fsdp2", "trl_head,nothing_scored_on_one_rank"]


@pytest.mark.parametrize("worker", WORKERS)
def test_distributed_cpu(worker):
    if "trl" in worker:
        pytest.importorskip("trl")
    launch(worker)


@pytest.mark.gpu
@needs_two_gpus()
@pytest.mark.parametrize("worker", WORKERS)
def test_distributed_nccl(worker):
    launch(worker, "cuda")


def test_deepspeed_zero3_is_refused(monkeypatch):
    """ZeRO-3 (detected from transformers' flag or a partitioned parameter) gets a message
    naming FSDP2, from concatenated_forward and from the TRL head."""
    import transformers.integrations.deepspeed
    from test_hf_forward import random_examples

    from dpo_fast import concatenated_forward
    from dpo_fast.collate import PreferenceCollator

    batch = PreferenceCollator()(random_examples(2))
    model = tiny_llama()
    model.model.embed_tokens.weight.ds_id = 0  # what ZeRO-3 sets on the parameters it partitions
    with pytest.raises(NotImplementedError, match=r"DeepSpeed ZeRO-3.*FSDP2"):
        concatenated_forward(model, batch)
    monkeypatch.setattr(transformers.integrations.deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    model = tiny_llama()
    with pytest.raises(NotImplementedError, match=r"DeepSpeed ZeRO-3.*FSDP2"):
        concatenated_forward(model, batch)
    pytest.importorskip("trl")
    from dpo_fast.integrations.trl import add_fused_lm_head

    add_fused_lm_head(model)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with pytest.raises(NotImplementedError, match=r"DeepSpeed ZeRO-3.*unpatch"):
        model(input_ids=batch["input_ids"], labels=labels, fused_lm_head=True)


# ------------------------------------------------------------------------------------------
# workers: run in the torchrun processes


def tensor_parallel(device: torch.device) -> None:
    """``linear_token_logprobs`` with a DTensor weight, Replicate and Shard(0), against the
    dense float64 head: values, statistics, hidden / weight / bias gradients (each rank's
    shard of the weight gradient against the oracle's rows for that shard)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
    from torch.utils._python_dispatch import TorchDispatchMode

    import dpo_fast
    from dpo_fast.formulas import dense_token_logprobs, transform_logits

    rank = dist.get_rank()
    mesh = init_device_mesh(device.type, (WORLD,))

    class LargestTensor(TorchDispatchMode):
        """The most elements any plain tensor created by an op had (DTensor ops excluded)."""

        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
                    self.largest = max(self.largest, t.numel())
            return out

    def oracle(hidden, weight, bias, labels, shift, options):
        h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
        b = None if bias is None else bias.double().requires_grad_()
        logits = h @ w.T + (0 if b is None else b)
        logp = dense_token_logprobs(logits, labels, shift=shift, **options)
        if shift:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        z = transform_logits(
            logits.detach(), options["logit_scale"] / options["temperature"], options["softcap"]
        )
        logq, valid = z.log_softmax(-1), labels != -100
        stats = {
            "entropy": -(logq.exp() * logq).sum(-1),
            "mean_logits": z.mean(-1),
            "is_top1": z.argmax(-1) == labels,
            "log_sum_sq_probs": torch.logsumexp(2 * logq, -1),
        }
        stats = {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in stats.items()}
        return logp, stats, float(z.abs().max()), (h, w, b)

    def check(
        shape, vocab, *, bias=True, shift=False, dtype=torch.float32, dtensor_hidden=False, **transform
    ):
        options = {"temperature": 1.0, "softcap": None, "logit_scale": 1.0, **transform}
        # multiples of 1/8: every logit is exact in fp32, on any rank, whatever the matmul's
        # summation order, so arg-max ties are ties everywhere
        hidden = dyadic(torch.randn(*shape, device=device))
        weight = dyadic(torch.randn(vocab, shape[-1], device=device) * 0.75)
        b = dyadic(torch.randn(vocab, device=device)) if bias else None
        labels = torch.randint(0, vocab, shape[:-1], device=device)
        labels[torch.rand(labels.shape, device=device) < 0.2] = -100
        # a tie across the two shards: row 0 (rank 0) copied to the last row (rank 1); the label
        # of one token is row 0 (the arg-max rule's first index), of another the copy
        weight[-1] = weight[0]
        if b is not None:
            b[-1] = b[0]
            b[0] = b[-1] = 40.0  # the arg-max of every token
        labels.view(-1)[1:3] = torch.tensor([0, vocab - 1])
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        b = None if b is None else b.to(dtype)
        expected, expected_stats, largest_logit, (h64, w64, b64) = oracle(
            hidden, weight, b, labels, shift, options
        )
        assert not bias or (expected_stats["is_top1"].any() and not expected_stats["is_top1"].all())
        grad = torch.randn(expected.shape, dtype=torch.float64, device=device)
        (expected * grad).sum().backward()
        # max |error| relative to the largest magnitude: fp32 rounding at logits of ~|z|
        tolerance = 1e-5 * max(1.0, largest_logit / 10) if dtype == torch.float32 else 2e-2
        rows = torch.chunk(torch.arange(vocab), WORLD)[rank]  # the rows Shard(0) gives this rank
        for placement in (Replicate(), Shard(0)):
            h = hidden.clone().requires_grad_()
            w = distribute_tensor(weight.clone(), mesh, [placement]).requires_grad_()
            bb = None if b is None else distribute_tensor(b.clone(), mesh, [placement]).requires_grad_()
            h_in = DTensor.from_local(h, mesh, [Replicate()]) if dtensor_hidden else h
            with LargestTensor() as largest:
                got, stats = dpo_fast.linear_token_logprobs(
                    h_in, w, labels, bias=bb, shift=shift, stats=dpo_fast.STAT_NAMES, **options
                )
                (got * grad.float()).sum().backward()
            where = f"rank {rank} {placement} shape {shape} V={vocab} {dtype} {options}"
            assert got.dtype == torch.float32 and got.shape == expected.shape, where
            assert_close(got, expected, tolerance, where)
            for name, value in expected_stats.items():
                if name == "is_top1" and dtype == torch.float32:
                    assert torch.equal(stats[name], value), (where, name)
                elif name != "is_top1":
                    assert_close(stats[name], value, tolerance, f"{where} {name}")
            assert_close(h.grad, h64.grad, tolerance, f"{where} hidden grad")
            assert isinstance(w.grad, DTensor) and w.grad.placements == (placement,), where
            local = w.grad.to_local()
            expected_w = w64.grad if placement == Replicate() else w64.grad[rows]
            assert_close(local, expected_w, tolerance, f"{where} weight grad")
            if b is not None:
                expected_b = b64.grad if placement == Replicate() else b64.grad[rows]
                assert_close(bb.grad.to_local(), expected_b, tolerance, f"{where} bias grad")
            if placement == Shard(0):
                # neither the full weight nor a (tokens, V) tensor exists on a rank
                # (what a rank legitimately holds: its weight shard, the hidden states, a
                # tokens x local-vocabulary tile; in tiny bf16 cases these can reach tokens x V)
                tokens = int((labels[..., 1:] if shift else labels).ne(-100).sum())
                allowed = max(len(rows) * shape[-1], hidden.numel(), tokens * len(rows))
                assert largest.largest < vocab * shape[-1], (where, largest.largest)
                assert largest.largest <= allowed, (where, largest.largest, allowed)

    # uneven shards (19 + 18 rows), every transform, shifted labels
    check((2, 9, 16), 37, shift=True, temperature=0.7, softcap=5.0, logit_scale=1.3)
    # large logits: the cross-rank log-sum-exp must shift by the global max
    check((11, 8), 64, bias=False, logit_scale=40.0)
    check((3, 5, 8), 30, dtensor_hidden=True)  # replicated DTensor hidden states
    check((2, 6, 16), 40, dtype=torch.bfloat16)

    # the per-sequence sums go through the same dispatch
    hidden = torch.randn(2, 7, 8, device=device, requires_grad=True)
    weight = torch.randn(21, 8, device=device)
    labels = torch.randint(0, 21, (2, 7), device=device)
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [2, 2, 3, 3, 3, 3, 3]], device=device)
    sharded = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    got = dpo_fast.linear_sequence_logprobs(hidden, sharded, labels, segment_ids=segments, num_segments=4)
    expected = dpo_fast.linear_sequence_logprobs(hidden, weight, labels, segment_ids=segments, num_segments=4)
    torch.testing.assert_close(got.logps, expected.logps, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.num_tokens, expected.num_tokens)

    # clear errors, on every rank
    labels = torch.randint(0, 21, (2, 7), device=device)
    for bad, match in [
        (dict(weight=distribute_tensor(weight, mesh, [Shard(1)])), r"Replicate\(\) or Shard\(0\)"),
        (dict(bias=torch.zeros(21, device=device)), r"bias must be sharded like the lm_head weight"),
        (dict(hidden=distribute_tensor(hidden.detach(), mesh, [Shard(0)])), r"hidden must be replicated"),
        (dict(labels=labels + 1 - rank), r"same hidden states and labels on every rank"),
    ]:
        args = {"hidden": hidden, "weight": sharded, "labels": labels, **bad}
        bias = args.pop("bias", None)
        try:
            dpo_fast.linear_token_logprobs(args["hidden"], args["weight"], args["labels"] % 21, bias=bias)
        except ValueError as error:
            import re

            assert re.search(match, str(error)), (match, str(error))
        else:
            raise AssertionError(f"no error for {match}")


def ddp_fsdp2(device: torch.device) -> None:
    """``concatenated_forward`` on a tiny Llama wrapped by DDP or FSDP2 (lm_head in the root
    unit or its own; tied and untied embeddings), each layout: every rank's log-probs equal
    the float64 model's on its batch, and every gradient the average over both ranks' batches."""
    import torch.distributed as dist
    from test_hf_forward import LAYOUTS, loss_of, naive_logps, random_examples

    from dpo_fast import STAT_NAMES, concatenated_forward
    from dpo_fast.collate import PreferenceCollator

    rank, seed = dist.get_rank(), torch.initial_seed()
    examples = []
    for r in range(WORLD):
        torch.manual_seed(seed + 1 + r)
        examples.append(random_examples(3))
    weights = [torch.randn(6, dtype=torch.float64) for _ in range(WORLD)]

    for wrapper, tied, head_unit in [
        ("ddp", False, False),
        ("ddp", True, False),
        ("fsdp2", False, False),
        ("fsdp2", False, True),
        ("fsdp2", True, False),
    ]:
        torch.manual_seed(seed)
        model = tiny_llama(tie_word_embeddings=tied).to(device)
        oracle = copy.deepcopy(model).double()
        plain = copy.deepcopy(model)
        wrapped = wrap(model, wrapper, head_unit, device)
        total = 0.0
        for r in range(WORLD):
            expected, _ = naive_logps(oracle, _on(PreferenceCollator()(examples[r]), device))
            total = total + loss_of(*expected.chunk(2), weights[r].to(device)) / WORLD
            if r == rank:
                mine = expected.detach()
        total.backward()
        for layout in LAYOUTS:
            where = f"rank {rank} {wrapper} tied={tied} lm_head unit={head_unit} {layout}"
            batch = _on(PreferenceCollator(layout=layout)(examples[rank]), device)
            out = concatenated_forward(wrapped, batch, layout=layout)
            got = torch.cat([out.chosen_logps, out.rejected_logps]).double()
            torch.testing.assert_close(got, mine, rtol=1e-5, atol=1e-6, msg=where)
            loss_of(out.chosen_logps, out.rejected_logps, weights[rank].to(device)).backward()
            assert_grads_close(model, oracle, where)
            model.zero_grad(set_to_none=True)
            # a reference model's pass (no graph) and the statistics, against the plain model's
            ref = concatenated_forward(wrapped, batch, layout=layout, grad=False, stats=STAT_NAMES)
            plain_ref = concatenated_forward(plain, batch, layout=layout, grad=False, stats=STAT_NAMES)
            assert ref.chosen_logps.grad_fn is None, where
            torch.testing.assert_close(ref.chosen_logps, plain_ref.chosen_logps, rtol=1e-5, atol=1e-5)
            for name in STAT_NAMES:
                torch.testing.assert_close(ref.stats[name], plain_ref.stats[name], rtol=1e-5, atol=1e-5)

    # FSDP1 is refused with a message naming FSDP2
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp1 = FullyShardedDataParallel(tiny_llama().to(device), device_id=device)
    try:
        concatenated_forward(fsdp1, _on(PreferenceCollator()(examples[rank]), device))
    except NotImplementedError as error:
        assert "FSDP2" in str(error), str(error)
    else:
        raise AssertionError("FSDP1 was not refused")


def nothing_scored_on_one_rank(device: torch.device) -> None:
    """Rank 1's batch has no completion token left (TRL truncates [prompt | completion] as a
    whole): the self-check and the head must still make the collective calls rank 0 makes."""
    import torch.distributed as dist
    from test_hf_forward import naive_logps, random_examples
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from dpo_fast import concatenated_forward

    rank = dist.get_rank()
    torch.manual_seed(torch.initial_seed() + 1)
    examples = random_examples(2, prompt=(12, 14) if rank == 1 else (3, 5), completion=(2, 5))
    batch = _on(DataCollatorForPreference(pad_token_id=0, max_length=12)(examples), device)
    assert bool(batch["completion_mask"].any()) == (rank == 0)
    model = tiny_llama().to(device)
    oracle = copy.deepcopy(model).double()
    wrap(model, "fsdp2", True, device)
    for layout in ("padded", "prefix_shared"):
        out = concatenated_forward(model, batch, layout=layout)
        got = torch.cat([out.chosen_logps, out.rejected_logps])
        if rank == 0:
            assert_close(got, naive_logps(oracle, batch)[0].detach(), 1e-5, layout)
        else:
            assert not got.any() and not out.chosen_tokens.any() and not out.rejected_tokens.any()
        got.sum().backward()


def trl_head(device: torch.device) -> None:
    """The TRL head (``add_fused_lm_head``, installed before sharding, as ``DPOTrainer`` does)
    under FSDP2 and DDP: per-token log-probs and every gradient equal a single process's. With
    the lm_head as its own FSDP2 unit, TRL 1.16's own head returns each rank's un-averaged
    lm_head gradient; ours goes through the unit's hooks."""
    import torch.distributed as dist
    from test_hf_forward import random_examples
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from dpo_fast.integrations.trl import add_fused_lm_head

    rank, seed = dist.get_rank(), torch.initial_seed()
    batches = []
    for r in range(WORLD):
        torch.manual_seed(seed + 1 + r)
        batch = DataCollatorForPreference(pad_token_id=0)(
            random_examples(2, prompt=(2, 5), completion=(2, 6))
        )
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        batches.append(
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
        )

    def oracle_terms(oracle, batch):
        """Per-token log-probs ``(2B, T-1)`` (each row alone, unpadded) and TRL's mean NLL."""
        labels = batch["labels"][:, 1:]
        logp = torch.zeros(labels.shape, dtype=torch.float64, device=labels.device)
        for row, (ids, attention) in enumerate(zip(batch["input_ids"], batch["attention_mask"], strict=True)):
            n = int(attention.sum())
            logits = oracle(input_ids=ids[None, :n]).logits[0, :-1]
            logp[row, : n - 1] = logits.log_softmax(-1).gather(-1, ids[1:n, None]).squeeze(-1)
        mask = labels != -100
        logp = torch.where(mask, logp, torch.zeros_like(logp))
        return logp, -logp.sum() / mask.sum()

    for wrapper, tied, head_unit, layout in [
        ("fsdp2", False, True, "padded"),  # the wrapping where TRL's own head is wrong
        ("fsdp2", False, True, "prefix_shared"),
        ("fsdp2", False, False, "packed"),
        ("fsdp2", True, False, "padded"),
        ("ddp", False, False, "padded"),
    ]:
        where = f"rank {rank} {wrapper} tied={tied} lm_head unit={head_unit} {layout}"
        torch.manual_seed(seed)
        model = tiny_llama(tie_word_embeddings=tied).to(device)
        oracle = copy.deepcopy(model).double()
        add_fused_lm_head(model, outputs=("log_probs", "entropy"), layout=layout)
        wrapped = wrap(model, wrapper, head_unit, device)
        grads = [torch.randn(b["labels"][:, 1:].shape, dtype=torch.float64, device=device) for b in batches]
        total = 0.0
        for r in range(WORLD):
            logp, loss = oracle_terms(oracle, {k: v.to(device) for k, v in batches[r].items()})
            total = total + (loss + (logp * grads[r]).sum()) / WORLD
            if r == rank:
                mine = logp.detach()
        total.backward()
        out = wrapped(**{k: v.to(device) for k, v in batches[rank].items()}, fused_lm_head=True)
        torch.testing.assert_close(out.log_probs.double(), mine, rtol=1e-5, atol=1e-6, msg=where)
        (out.loss + (out.log_probs * grads[rank].float()).sum()).backward()
        assert_grads_close(model, oracle, where)


# ------------------------------------------------------------------------------------------
# helpers of the workers

VOCAB = 128


def tiny_llama(**config):
    import transformers
    from test_hf_forward import HEADS, SMALL, TOKENS

    config = transformers.LlamaConfig(**SMALL, **HEADS, **TOKENS, initializer_range=0.2, **config)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).eval()


def wrap(model, wrapper: str, head_unit: bool, device: torch.device):
    """``model`` in DDP, or sharded by FSDP2 as accelerate does (each decoder layer, then the
    root), with the lm_head its own unit if ``head_unit``; returns what to call."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if wrapper == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for layer in model.model.layers:
        fully_shard(layer)
    if head_unit:
        fully_shard(model.lm_head)
    return fully_shard(model)


def _on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def dyadic(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to multiples of 1/8."""
    return torch.round(x * 8) / 8


def assert_close(got: torch.Tensor, expected: torch.Tensor, rtol: float, where: str) -> None:
    """``max |got - expected| <= rtol * max(1, max |expected|)``."""
    assert got.shape == expected.shape, (where, got.shape, expected.shape)
    error = (got.double() - expected).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, expected.abs().max().item()) if got.numel() else 1.0
    assert error <= rtol * scale, f"{where}: max error {error:.3g} vs max |expected| {scale:.3g}"


def assert_grads_close(model, oracle, where: str, rtol: float = 1e-4) -> None:
    """Every parameter's gradient (gathered when FSDP2 shards it) against the oracle's."""
    from torch.distributed.tensor import DTensor

    expected = dict(oracle.named_parameters())
    assert len(expected) == len(dict(model.named_parameters())), where
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        reference = expected[name].grad
        assert grad is not None and reference is not None, (where, name)
        scale = reference.abs().max().item()
        error = (grad.double() - reference).abs().max().item()
        assert error <= rtol * scale + 1e-9, (
            f"{where} {name}: max error {error:.3g} vs max |grad| {scale:.3g}"
        )


def main() -> None:
    import torch.distributed as dist

    worker, seed, device_type = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    # a rank left waiting in a collective fails within a minute instead of hanging the suite
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=60))
    try:
        for name in worker.split(","):
            torch.manual_seed(seed)
            globals()[name](device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
