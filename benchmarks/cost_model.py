"""Static cost model: bytes, FLOPs, waves and predicted time of each kernel and design.

Predictions for an H100 (or any :class:`Device`) at issue 20's target shapes, made without a
GPU. Each prediction is a band:

* ``seconds`` (fast end): the costs overlap perfectly, so time is the largest of memory
  traffic over the copy bandwidth, instruction issue over the SMs' issue rate, and matmul
  FLOPs over the bf16 rate;
* ``seconds_slow``: memory and issue add in quadrature (partial overlap: a warp that is
  issuing arithmetic has no load in flight), the usual picture once issue is above ~50% busy.

Instruction counts per element come from the offline compile report
(``benchmarks/results/sm90-static*.json``, written by ``benchmarks/sm90_report.py``), for
the Triton version that will run: the GPU machines run Triton 3.6, CI runs 3.9.

Kernels and designs modelled:

* the core label log-probs kernels (forward, backward, a training step) on bf16 logits;
* the fused linear log-probs designs at N=8192, H=4096, V=131072: (a) ``method="chunked"``,
  (b) the removed ``method="fused"`` kernels (figures from their compile report), and the
  floor of any deterministic fused rework (five matmuls at the cuBLAS rate);
* the fused preference head (``FusedLinearPreferenceLoss``) against Liger's
  ``LigerFusedLinearDPOLoss`` at T=4096 (one pair, reference head included);
* the preference loss op.

Usage: ``python benchmarks/cost_model.py [--device h100|h200] [--copy-tbps 3.0] [--tflops 800]
[--static PATH] [--json PATH]``. The GPU suite imports :func:`predictions` with the ceilings
it measured and prints them beside the measurements.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Device:
    """What bounds a kernel: the ceilings (measure them on the machine) and issue rate."""

    name: str
    copy_bytes_per_s: float  # device-to-device copy, bytes read + bytes written per second
    bf16_flops: float  # dense bf16 matmul FLOP/s through cuBLAS on random data
    sms: int = 132
    clock_hz: float = 1.98e9  # seen under load on the H200s here (KINDS.md)
    lanes_issued_per_clock: int = 128  # per SM: 4 schedulers x one 32-lane warp instruction


DEVICES = {
    # issue 19's planning figures for an H100 SXM
    "h100": Device("H100 SXM (3.0 TB/s copy, 800 TFLOP/s bf16)", 3.0e12, 800e12),
    # measured on a lent H200 (KINDS.md, 2026-10-28: 4.3 TB/s copy, 788 TFLOP/s on random data)
    "h200": Device("H200 (4.3 TB/s copy, 788 TFLOP/s bf16)", 4.3e12, 788e12),
}


@dataclass
class Prediction:
    """One kernel or design at one shape."""

    name: str
    shape: str
    bytes: float
    flops: float = 0.0
    instructions: float = 0.0
    waves: float | None = None
    seconds: float = 0.0
    seconds_slow: float = 0.0
    bound: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def copy_fraction(self) -> tuple[float, float]:
        """Fraction of the copy bandwidth the minimal bytes reach: (slow end, fast end)."""
        return (
            self.bytes / self.copy_bytes_per_s / self.seconds_slow,
            self.bytes / self.copy_bytes_per_s / self.seconds,
        )

    copy_bytes_per_s: float = 1.0


# ---------------------------------------------------------------------------------------
# The compile report


def static_report(path: Path | None = None, triton_version: str | None = None) -> dict:
    """The offline compile report: ``path``, else the one for ``triton_version`` if committed,
    else ``sm90-static.json``; {} if none is found."""
    candidates = [path] if path else []
    if triton_version:
        candidates.append(RESULTS / f"sm90-static-triton{'.'.join(triton_version.split('.')[:2])}.json")
    candidates.append(RESULTS / "sm90-static.json")
    for candidate in candidates:
        if candidate and candidate.exists():
            return json.loads(candidate.read_text())
    return {}


# Variants of the core kernels by the words of the compile report's variant names: (the
# variant's label, words it must have, words it must not have; "NAME=" stands for any value).
PLAIN = ("", {"bf16", "V%16==0"}, {"HAS_SOFTCAP", "STATS=", "strided"})
WITH_STATS = ("all statistics", {"bf16", "V%16==0", "STATS=15"}, {"HAS_SOFTCAP", "strided"})
WITH_SOFTCAP = ("softcap", {"bf16", "V%16==0", "HAS_SOFTCAP"}, {"STATS=", "strided"})


def kernel_entry(report: dict, kernel: str, variant: tuple) -> dict | None:
    """The report's configuration of ``kernel`` matching ``variant`` (see :data:`PLAIN`); of
    several (a temperature of 1 or not), the one with the fewest instructions per element."""
    _, required, forbidden = variant
    found = []
    for entry in report.get("configurations", []):
        words = set(entry["variant"].split())
        named = words | {w[: w.index("=") + 1] for w in words if "=" in w}
        if entry["kernel"] == kernel and required <= words and not forbidden & named:
            found.append(entry)
    return min(found, key=lambda e: e.get("instructions_per_element", 0.0), default=None)


# Used where no report is at hand: the kernels as first written (Triton 3.9, issue 19).
DEFAULT_CORE = {
    "_logprobs_forward_kernel": {"instructions_per_element": 15.81, "blocks_per_sm": 6},
    "_logprobs_backward_kernel": {"instructions_per_element": 19.44, "blocks_per_sm": 8},
}


def _core_figures(report: dict, kernel: str, variant: tuple) -> tuple[float, int, str]:
    entry = kernel_entry(report, kernel, variant)
    if entry is None or "instructions_per_element" not in entry:
        fallback = DEFAULT_CORE[kernel]
        return fallback["instructions_per_element"], fallback["blocks_per_sm"], "issue-19 figures"
    source = f"Triton {report.get('triton')} compile report"
    return entry["instructions_per_element"], entry["blocks_per_sm"], source


# ---------------------------------------------------------------------------------------
# Building blocks


def _streaming(
    name: str, shape: str, nbytes: float, instructions: float, device: Device, waves: float | None = None
) -> Prediction:
    memory = nbytes / device.copy_bytes_per_s
    issue = instructions / (device.sms * device.lanes_issued_per_clock * device.clock_hz)
    prediction = Prediction(name, shape, nbytes, instructions=instructions, waves=waves)
    prediction.seconds = max(memory, issue)
    prediction.seconds_slow = math.hypot(memory, issue)
    prediction.bound = "memory" if memory >= issue else "issue"
    prediction.notes.append(f"issue slots {issue / memory:.0%} busy at copy bandwidth")
    prediction.copy_bytes_per_s = device.copy_bytes_per_s
    return prediction


def _matmul(m: int, n: int, k: int, device: Device, extra_bytes: float = 0.0, elem: int = 2) -> float:
    """Seconds for one ``(m, k) @ (k, n)`` through cuBLAS: FLOPs at the measured rate, or its
    operand and output traffic (plus ``extra_bytes``, e.g. an fp32 accumulator) if larger."""
    flops = 2.0 * m * n * k
    traffic = elem * (m * k + k * n + m * n) + extra_bytes
    return max(flops / device.bf16_flops, traffic / device.copy_bytes_per_s)


def _combine(
    name: str, shape: str, parts: dict[str, float], flops: float, nbytes: float, device: Device, bound: str
) -> Prediction:
    """Parts that run one after another (kernels on one stream): their times add."""
    prediction = Prediction(name, shape, nbytes, flops=flops, bound=bound)
    prediction.seconds = prediction.seconds_slow = sum(parts.values())
    prediction.notes += [f"{part}: {1e3 * seconds:.1f} ms" for part, seconds in parts.items()]
    prediction.copy_bytes_per_s = device.copy_bytes_per_s
    return prediction


# ---------------------------------------------------------------------------------------
# Core label log-probs from logits


def _core(kernel: str, name: str, tokens: int, vocab: int, passes: int, device: Device, report, variant):
    """A core kernel over bf16 ``[tokens, V]`` logits: ``passes`` bytes-per-element passes (one
    read forward; a read and a write backward) and a few fp32 / int64 values per token."""
    per_element, blocks_per_sm, source = _core_figures(report, kernel, variant)
    elements = tokens * vocab
    nbytes = 2 * passes * elements + tokens * (8 + 4 * (passes + 1))
    waves = tokens / (device.sms * blocks_per_sm)
    name += f", {variant[0]}" if variant[0] else ""
    prediction = _streaming(name, f"{tokens}x{vocab} bf16", nbytes, elements * per_element, device, waves)
    prediction.notes.append(f"{per_element} SASS instructions per element ({source})")
    return prediction


def core_forward(tokens: int, vocab: int, device: Device, report: dict, variant: tuple = PLAIN):
    """Forward over bf16 ``[tokens, V]`` logits: read them once, O(1) per token written."""
    return _core("_logprobs_forward_kernel", "core forward", tokens, vocab, 1, device, report, variant)


def core_backward(tokens: int, vocab: int, device: Device, report: dict, variant: tuple = PLAIN):
    """Backward: read the logits once more and write the gradient once."""
    return _core("_logprobs_backward_kernel", "core backward", tokens, vocab, 2, device, report, variant)


def core_step(tokens: int, vocab: int, device: Device, report: dict) -> Prediction:
    """Forward + backward: three passes over ``[tokens, V]`` (read, read, write)."""
    forward, backward = (
        core_forward(tokens, vocab, device, report),
        core_backward(tokens, vocab, device, report),
    )
    step = Prediction("core forward+backward", forward.shape, forward.bytes + backward.bytes)
    step.instructions = forward.instructions + backward.instructions
    step.seconds = forward.seconds + backward.seconds
    step.seconds_slow = forward.seconds_slow + backward.seconds_slow
    step.bound = forward.bound if forward.bound == backward.bound else "mixed"
    step.copy_bytes_per_s = device.copy_bytes_per_s
    return step


# ---------------------------------------------------------------------------------------
# Fused linear log-probs


def chunk_rows(vocab: int, tile_bytes: int = 512 << 20) -> int:
    """Tokens per logits tile on CUDA (``dpo_fast.linear_logprobs.chunk_rows``'s rule)."""
    rows = tile_bytes // (vocab * 2)
    return rows // 64 * 64


def linear_chunked(n: int, hidden: int, vocab: int, device: Device, report: dict) -> Prediction:
    """Design (a), ``method="chunked"``: per chunk of tokens one cuBLAS matmul writes a bf16
    ``(chunk, V)`` tile that the core kernels fold; backward recomputes every tile but the
    kept last one and runs two gradient matmuls, ``grad_W`` accumulating in fp32."""
    chunk = min(chunk_rows(vocab), n)
    chunks = math.ceil(n / chunk)
    tile = chunk * vocab
    forward = core_forward(chunk, vocab, device, report).seconds
    backward = core_backward(chunk, vocab, device, report).seconds
    accumulator = 2 * 4 * vocab * hidden  # fp32 grad_W read and written by each chunk's addmm
    parts = {
        "forward matmuls": chunks * _matmul(chunk, vocab, hidden, device),
        "forward kernel": chunks * forward,
        "recompute matmuls": (chunks - 1) * _matmul(chunk, vocab, hidden, device),
        "backward kernel": chunks * backward,
        "grad_hidden matmuls": chunks * _matmul(chunk, hidden, vocab, device),
        "grad_W matmuls": chunks * _matmul(hidden, vocab, chunk, device, extra_bytes=accumulator),
    }
    flops = 2.0 * n * hidden * vocab * (4 - 1 / chunks)
    nbytes = chunks * (3 * 2 * tile + accumulator)
    prediction = _combine(
        "fused linear (a) chunked", f"N={n} H={hidden} V={vocab} bf16", parts, flops, nbytes, device, "matmul"
    )
    prediction.notes.insert(0, f"{chunks} chunks of {chunk} tokens; {flops / 1e12:.1f} TFLOP")
    return prediction


# The removed design (b) as compiled for sm_90a (Triton 3.9, bf16, no softcap; benchmarks/
# sm90_report.py on kernels/linear_logprobs.py before its removal): BLOCK_N x BLOCK_V x BLOCK_H
# = 64 x 128 x 32 tiles, 8 warps, SASS instructions per BLOCK_H step of each inner loop, and
# resident CTAs per SM (register-limited).
FUSED_B = {
    "block": (64, 128, 32),
    "warps": 8,
    "forward": {"step_instructions": 72, "ctas_per_sm": 2, "registers": 120},
    "grad_rows": {"step_instructions": 71 + 158, "ctas_per_sm": 1, "registers": 143},
    "grad_weight": {"step_instructions": 73 + 136, "ctas_per_sm": 2, "registers": 110},
    "spills": "softcap + filter: grad_rows 255 registers and 64 bytes of stack; fp32 grad_weight 4 KB",
}


def linear_fused_b(n: int, hidden: int, vocab: int, device: Device) -> Prediction:
    """The removed design (b), ``method="fused"``: three kernels, each CTA walking its logits
    tiles over H in 32-wide ``tl.dot`` steps; the two backward kernels load, multiply into and
    store their fp32 gradient rows once per step (no reuse across steps)."""
    bn, bv, bh = FUSED_B["block"]
    warps = FUSED_B["warps"]
    sm_flops = device.bf16_flops / device.sms
    issue_per_sm = device.lanes_issued_per_clock / 32 * device.clock_hz  # warp instructions / s
    steps_per_tile = hidden / bh
    parts: dict[str, float] = {}
    nbytes = 0.0

    def kernel(
        name: str, ctas: int, tiles_per_cta: int, dots_per_tile: int, acc_bytes_per_step: float
    ) -> None:
        nonlocal nbytes
        figures = FUSED_B[name]
        resident = device.sms * figures["ctas_per_sm"]
        waves = math.ceil(ctas / resident)
        per_sm_ctas = min(ctas, resident) / device.sms
        steps = tiles_per_cta * steps_per_tile
        # per SM: tensor work of its resident CTAs, their instruction issue, their accumulator traffic
        mma = per_sm_ctas * steps * dots_per_tile * 2 * bn * bv * bh / sm_flops
        issue = per_sm_ctas * steps * figures["step_instructions"] * warps / issue_per_sm
        traffic = ctas * steps * acc_bytes_per_step / device.copy_bytes_per_s / waves
        parts[f"{name} ({ctas} CTAs, {waves} wave{'s' * (waves > 1)})"] = waves * (max(mma, issue) + traffic)
        nbytes += ctas * steps * acc_bytes_per_step

    kernel("forward", math.ceil(n / bn), math.ceil(vocab / bv), 1, 0.0)
    # recompute the tile (1 dot per step) + G @ W (1 dot per step); fp32 (BLOCK_N, BLOCK_H) rows in and out
    kernel("grad_rows", math.ceil(n / bn), math.ceil(vocab / bv), 2, 2 * 4 * bn * bh)
    kernel("grad_weight", math.ceil(vocab / bv), math.ceil(n / bn), 2, 2 * 4 * bv * bh)
    flops = 10.0 * n * hidden * vocab
    prediction = _combine(
        "fused linear (b) removed",
        f"N={n} H={hidden} V={vocab} bf16",
        parts,
        flops,
        nbytes,
        device,
        "traffic",
    )
    prediction.notes.insert(0, f"fp32 accumulator traffic {nbytes / 1e9:.0f} GB; {flops / 1e12:.1f} TFLOP")
    return prediction


def linear_fused_floor(n: int, hidden: int, vocab: int, device: Device) -> Prediction:
    """The best any deterministic fused rework can do: forward, two recomputations and two
    gradient matmuls (atomics would save one recomputation but not be bitwise reproducible),
    each at the cuBLAS rate with the softmax free and no accumulator round trips."""
    parts = {"5 matmuls at the cuBLAS rate": 5 * _matmul(n, vocab, hidden, device)}
    flops = 10.0 * n * hidden * vocab
    return _combine(
        "fused linear, deterministic floor",
        f"N={n} H={hidden} V={vocab} bf16",
        parts,
        flops,
        0,
        device,
        "matmul",
    )


# ---------------------------------------------------------------------------------------
# Preference losses


# Liger's elementwise traffic per logit: policy bf16 -> fp32 upcast, log_softmax, its backward
# and the cast back (~32 bytes unfused), the reference's upcast and log_softmax (~14); its
# torch.compile'd chunk step fuses some of it.
LIGER_BYTES_PER_LOGIT = 30


def preference_head(tokens: int, hidden: int, vocab: int, device: Device, report: dict) -> tuple:
    """``FusedLinearPreferenceLoss`` and Liger's ``LigerFusedLinearDPOLoss`` on one pair of
    ``tokens``-token responses with a reference head (bench_loss.py's "head" part)."""
    n = 2 * tokens
    policy = linear_chunked(n, hidden, vocab, device, report)
    reference_parts = {
        "reference matmuls": math.ceil(n / min(chunk_rows(vocab), n))
        * _matmul(min(chunk_rows(vocab), n), vocab, hidden, device),
        "reference kernel": core_forward(n, vocab, device, report).seconds,
    }
    parts = {"policy (chunked design)": policy.seconds, **reference_parts}
    ours = _combine(
        "preference head dpo_fast", f"T={tokens} H={hidden} V={vocab} bf16", parts, 0, 0, device, "matmul"
    )
    # Liger: per pair, bf16 logits, log_softmax over an fp32 upcast and its backward through
    # torch.func, two gradient matmuls, no recomputation; the reference's logits likewise
    liger_parts = {
        "4 matmuls": 4 * _matmul(n, vocab, hidden, device),
        "fp32 softmax passes": n * vocab * LIGER_BYTES_PER_LOGIT / device.copy_bytes_per_s,
    }
    liger = _combine("preference head Liger", ours.shape, liger_parts, 0, 0, device, "matmul")
    liger.notes.append(f"{LIGER_BYTES_PER_LOGIT} bytes per logit of elementwise traffic (assumed)")
    return ours, liger


def preference_loss_op(pairs: int, device: Device) -> Prediction:
    """The loss op: two launches (forward, backward), a few fp32 values per pair; the forward
    is one program looping over blocks of 1024 pairs, so latency, not bandwidth, bounds it."""
    nbytes = pairs * 4 * 12
    launch, block_latency = 5e-6, 2e-6
    prediction = Prediction("preference loss op fwd+bwd", f"P={pairs}", nbytes)
    prediction.seconds = prediction.seconds_slow = 2 * launch + math.ceil(pairs / 1024) * block_latency
    prediction.bound = "latency"
    prediction.notes.append("assumed 5 us per launch, 2 us per block of 1024 pairs")
    prediction.copy_bytes_per_s = device.copy_bytes_per_s
    return prediction


# ---------------------------------------------------------------------------------------


def predictions(device: Device, report: dict) -> list[Prediction]:
    """Every prediction at issue 20's target shapes."""
    found = [
        core_forward(16384, 128256, device, report),
        core_backward(16384, 128256, device, report),
        core_step(16384, 128256, device, report),
    ]
    for variant in (WITH_STATS, WITH_SOFTCAP):
        if kernel_entry(report, "_logprobs_forward_kernel", variant):
            found.append(core_forward(16384, 128256, device, report, variant))
        if variant is WITH_SOFTCAP and kernel_entry(report, "_logprobs_backward_kernel", variant):
            found.append(core_backward(16384, 128256, device, report, variant))
    found += [
        linear_chunked(8192, 4096, 131072, device, report),
        linear_fused_b(8192, 4096, 131072, device),
        linear_fused_floor(8192, 4096, 131072, device),
        *preference_head(4096, 4096, 128256, device, report),
        preference_loss_op(8192, device),
    ]
    return found


def with_ceilings(device: Device, copy_bytes_per_s: float | None, bf16_flops: float | None) -> Device:
    """``device`` with measured ceilings in place of the planning figures."""
    changes = {}
    if copy_bytes_per_s:
        changes["copy_bytes_per_s"] = copy_bytes_per_s
    if bf16_flops:
        changes["bf16_flops"] = bf16_flops
    return replace(device, name=f"{device.name}, measured ceilings", **changes) if changes else device


def as_dict(prediction: Prediction) -> dict:
    row = {k: v for k, v in asdict(prediction).items()}
    row["ms"] = 1e3 * prediction.seconds
    row["ms_slow"] = 1e3 * prediction.seconds_slow
    if prediction.bytes and prediction.flops == 0:
        slow, fast = prediction.copy_fraction
        row["copy_fraction"] = [slow, fast]
    return row


def print_predictions(found: list[Prediction], device: Device) -> None:
    print(f"Predicted on {device.name}")
    print(f"{'kernel / design':36} {'shape':28} {'ms':>15} {'of copy BW':>10} {'bound':>10}")
    for p in found:
        band = f"{1e3 * p.seconds:.2f}"
        if p.seconds_slow > p.seconds:
            band += f"-{1e3 * p.seconds_slow:.2f}"
        fraction = ""
        if p.bytes and p.flops == 0 and p.bound != "latency":
            slow, fast = p.copy_fraction
            fraction = f"{slow:.0%}-{fast:.0%}" if fast - slow > 0.005 else f"{fast:.0%}"
        print(f"{p.name[:36]:36} {p.shape[:28]:28} {band:>15} {fraction:>10} {p.bound[:10]:>10}")
        for note in p.notes:
            print(f"{'':40}{note}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=DEVICES, default="h100")
    parser.add_argument("--copy-tbps", type=float, help="measured copy bandwidth, TB/s (read + write)")
    parser.add_argument("--tflops", type=float, help="measured bf16 matmul TFLOP/s")
    parser.add_argument("--static", type=Path, help="compile report (default: the committed one)")
    parser.add_argument(
        "--triton", help="Triton version whose compile report to use (default: 3.6, the GPU's)"
    )
    parser.add_argument("--json", type=Path, help="also write the predictions here")
    args = parser.parse_args(argv)
    device = with_ceilings(
        DEVICES[args.device], args.copy_tbps and args.copy_tbps * 1e12, args.tflops and args.tflops * 1e12
    )
    report = static_report(args.static, args.triton or "3.6")
    found = predictions(device, report)
    print_predictions(found, device)
    if args.json:
        args.json.write_text(json.dumps([as_dict(p) for p in found], indent=1) + "\n")


if __name__ == "__main__":
    main()
