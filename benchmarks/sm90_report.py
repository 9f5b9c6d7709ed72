"""Offline sm_90 compile report: every Triton kernel in every configuration dpo_fast launches.

No GPU is needed. The library's public functions are called on small CPU tensors with
``backend="triton"`` while ``JITFunction.run`` is replaced by a recorder: each launch is
specialized exactly as Triton would specialize it for a CUDA device (argument types,
16-byte divisibility of pointers and integers, compile-time constants, launch options), and
nothing runs. Each distinct configuration is then compiled for ``sm_90a`` with the ptxas
bundled in Triton's wheel and read back:

* registers, stack frame and local memory (``cuobjdump --dump-resource-usage``), spill
  instructions (``LDL``/``STL`` in the SASS), shared memory, and the resulting occupancy
  (blocks and warps per SM, from H100 limits);
* every loop of the SASS (a backward branch): its instructions, the instructions per
  element of the kernel's streaming loop, and its global load widths, MUFU, shuffle and
  barrier counts;
* the launch grid at the representative shape.

``--out`` writes the report as JSON (``benchmarks/results/sm90-static.json`` by default);
``--check`` exits non-zero when a configuration spills or misses an instruction target
(:data:`TARGETS`). ``tests/test_sm90_compile.py`` runs it in CI; the GPU suite runs it on
the GPU machine's own Triton.

Usage: ``python benchmarks/sm90_report.py [--out PATH] [--check] [--quiet]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dpo_fast  # noqa: E402
from dpo_fast.constants import STAT_NAMES  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sm90-static.json"
TARGET = GPUTarget("cuda", 90, 32)

# H100 (sm_90) per-SM limits used for occupancy.
SM90 = {
    "sms": 132,
    "registers_per_sm": 65536,
    "register_unit_per_warp": 256,
    "max_threads_per_sm": 2048,
    "max_blocks_per_sm": 32,
    "shared_bytes_per_sm": 233472,
    "shared_reserved_per_block": 1024,
}

# The streaming loop of these kernels handles the value of this compile-time constant
# (elements of one row) per iteration, spread over all the program's threads.
LOOP_ELEMENTS = {
    "_logprobs_forward_kernel": "BLOCK_V",
    "_logprobs_backward_kernel": "BLOCK_V",
}

# Issue 19's budgets: SASS instructions per bf16 element of the streaming loop, without
# statistics or softcap, temperature 1, at a vocabulary that is a multiple of 16 (the common
# case): the limit and the variant it applies to, as :func:`variant` names it.
TARGETS = {
    "_logprobs_forward_kernel": (10.0, "bf16 FOLD_SCALE VEC=8 ALIGN V%16==0"),
    "_logprobs_backward_kernel": (12.0, "bf16 UNIT_SCALE VEC=8 ALIGN V%16==0"),
}

VOCABS = (32000, 50257, 128256, 151936)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SOFTCAP = 30.0


# ---------------------------------------------------------------------------------------
# Scenarios: calls of the public API that together reach every launch configuration.


def _core(vocab: int, dtype: torch.dtype, *, stats=(), softcap=None, temperature=1.0, inplace=False):
    def run() -> None:
        logits = torch.randn(2, 5, vocab, dtype=dtype).requires_grad_()
        labels = torch.randint(0, vocab, (2, 5))
        labels[0, 2] = -100
        out = dpo_fast.token_logprobs(
            logits,
            labels,
            shift=True,
            temperature=temperature,
            softcap=softcap,
            stats=stats,
            inplace_backward=inplace,
            backend="triton",
        )
        out.logps.sum().backward()

    return run


def _strided_vocab(vocab: int, dtype: torch.dtype):
    def run() -> None:
        logits = torch.randn(2, 4, vocab, 2, dtype=dtype)[..., 0].requires_grad_()
        labels = torch.randint(0, vocab, (2, 4))
        dpo_fast.token_logprobs(logits, labels, backend="triton").logps.sum().backward()

    return run


def _linear(vocab: int, dtype: torch.dtype):
    def run() -> None:
        hidden = torch.randn(2, 6, 32, dtype=dtype).requires_grad_()
        weight = torch.randn(vocab, 32, dtype=dtype).requires_grad_()
        labels = torch.randint(0, vocab, (2, 6))
        labels[:, :2] = -100
        out = dpo_fast.linear_token_logprobs(hidden, weight, labels, shift=True, backend="triton")
        out.logps.sum().backward()

    return run


def _loss(loss_type, *, reference_free=False, **options):
    def run() -> None:
        P = 40
        chosen = (-50 * torch.rand(P)).requires_grad_()
        rejected = (-50 * torch.rand(P)).requires_grad_()
        ref = (
            {}
            if reference_free
            else {f"ref_{side}_logps": -50 * torch.rand(P) for side in ("chosen", "rejected")}
        )
        lengths = {
            "chosen_lengths": torch.randint(1, 99, (P,)),
            "rejected_lengths": torch.randint(1, 99, (P,)),
        }
        out = dpo_fast.preference_loss(
            chosen, rejected, **ref, **lengths, loss_type=loss_type, backend="triton", **options
        )
        out.loss.sum().backward()

    return run


def scenarios() -> Iterator[tuple[str, Callable[[], None]]]:
    """``(label, call)`` pairs covering every launch configuration of every kernel."""
    for vocab in VOCABS:
        for name, dtype in DTYPES.items():
            for stats in ((), STAT_NAMES):
                for softcap in (None, SOFTCAP):
                    label = f"token_logprobs V={vocab} {name}"
                    label += " stats" if stats else ""
                    label += " softcap" if softcap else ""
                    yield label, _core(vocab, dtype, stats=stats, softcap=softcap)
    yield "token_logprobs V=128256 bf16 temperature=0.7", _core(128256, torch.bfloat16, temperature=0.7)
    yield "token_logprobs V=128256 bf16 inplace_backward", _core(128256, torch.bfloat16, inplace=True)
    yield "token_logprobs V=32000 bf16 vocabulary stride 2", _strided_vocab(32000, torch.bfloat16)
    for name, dtype in DTYPES.items():
        yield f"linear_token_logprobs V=50257 {name}", _linear(50257, dtype)
    for loss_type, options in (
        ("sigmoid", {}),
        ("sigmoid", {"reduction": "none"}),
        (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}),
        ("ipo", {}),
        ("aot", {}),
        ("sigmoid", {"f_divergence": "alpha_divergence"}),
        ("simpo", {"reference_free": True}),
    ):
        yield f"preference_loss {loss_type} {options}", _loss(loss_type, **options)


# ---------------------------------------------------------------------------------------
# Capture: record each launch as Triton would specialize it for a CUDA device.


@dataclass
class Launch:
    """One distinct launch configuration and the scenarios that reach it."""

    kernel: JITFunction
    signature: dict[str, str]
    constexprs: dict
    attrs: dict
    options: Any
    grid: tuple[int, ...]
    scenarios: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def constant(self, name: str) -> Any:
        return self.constexprs.get((self.kernel.arg_names.index(name),))

    def key(self) -> str:
        return repr(
            (self.name, self.signature, sorted(self.constexprs.items()), self.attrs, self.options.hash())
        )


def _import_kernel_modules() -> list[Any]:
    names = sorted(p.stem for p in (ROOT / "kernels").glob("*.py"))
    return [importlib.import_module(f"dpo_fast.kernels.{name}") for name in names]


def kernel_functions() -> dict[str, JITFunction]:
    """Every module-level ``@triton.jit`` function of ``kernels/`` whose name ends in ``_kernel``."""
    found = {}
    for module in _import_kernel_modules():
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value.fn.__name__.endswith("_kernel"):
                found[value.fn.__name__] = value
    return found


def capture() -> list[Launch]:
    """Run every scenario with launches recorded instead of executed; distinct configurations.

    Kernels are defined when their modules are imported: without TRITON_INTERPRET they become
    JITFunctions, not interpreted functions, so this must run in a process that has not
    imported them under the interpreter (the script's own, or a subprocess of the tests).
    """
    os.environ.pop("TRITON_INTERPRET", None)
    kernel_functions()
    # the registry accepts backend="triton" for CPU tensors only under the interpreter flag;
    # the kernels themselves are already compiled-mode JITFunctions
    os.environ["TRITON_INTERPRET"] = "1"
    backend = make_backend(TARGET)
    launches: dict[str, Launch] = {}
    current = [""]

    def record(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(
            backend, kwargs, bound_args, specialization, options
        )
        grid = grid(bound_args) if callable(grid) else grid
        launch = Launch(self, signature, constexprs, attrs, options, tuple(int(g) for g in grid))
        launch = launches.setdefault(launch.key(), launch)
        if current[0] not in launch.scenarios:
            launch.scenarios.append(current[0])

    real_run = JITFunction.run
    JITFunction.run = record
    try:
        torch.manual_seed(0)
        for label, call in scenarios():
            current[0] = label
            call()
    finally:
        JITFunction.run = real_run
        os.environ.pop("TRITON_INTERPRET", None)
    return list(launches.values())


# ---------------------------------------------------------------------------------------
# Compile and read back.


def _tool(name: str) -> str:
    return str(Path(get_ptxas(90).path).with_name(name))


def ptxas_available() -> bool:
    """Triton's bundled ptxas (and cuobjdump / nvdisasm beside it) can run here."""
    try:
        subprocess.run([get_ptxas(90).path, "--version"], check=True, capture_output=True)
        subprocess.run([_tool("nvdisasm"), "--version"], check=True, capture_output=True)
    except (OSError, RuntimeError, subprocess.CalledProcessError):
        return False
    return True


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"BRA\s.*`\((\.L_x_\d+)\)")


def _disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], check=True, capture_output=True, text=True)
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", f.name], check=True, capture_output=True, text=True
        )
    return sass.stdout, usage.stdout


def _opcode(instruction: str) -> str:
    """``@!P1 LDG.E.128 R4, ...`` -> ``LDG.E.128``."""
    words = instruction.split()
    return words[1] if words[0].startswith("@") else words[0]


def sass_loops(sass: str) -> tuple[list[dict], list[str]]:
    """The loops of a disassembly (one per backward branch) and all its opcodes."""
    labels: dict[str, int] = {}
    instructions: list[tuple[int, str]] = []
    for line in sass.splitlines():
        if m := _LABEL.match(line.strip()):
            labels[m.group(1)] = len(instructions)
        elif m := _INSTRUCTION.search(line):
            instructions.append((int(m.group(1), 16), m.group(2)))
    loops = []
    for index, (_, text) in enumerate(instructions):
        target = _BRANCH_TARGET.search(text)
        # a backward branch; the one-instruction `BRA` to itself after EXIT is a trap, not a loop
        if target and labels.get(target.group(1), index) < index:
            body = [_opcode(t) for _, t in instructions[labels[target.group(1)] : index + 1]]
            loops.append(_loop_summary(body))
    return loops, [_opcode(t) for _, t in instructions]


def _loop_summary(body: list[str]) -> dict:
    widths: dict[str, int] = {}
    for op in body:
        if op.startswith(("LDG", "STG")):
            width = next((p for p in op.split(".")[1:] if p in ("64", "128", "U16", "16", "U8", "S8")), "32")
            key = f"{op[:3]}.{width}"
            widths[key] = widths.get(key, 0) + 1
    return {
        "instructions": len(body),
        "mufu": sum(op.startswith("MUFU") for op in body),
        "shuffles": sum(op.startswith("SHFL") for op in body),
        "barriers": sum(op.startswith("BAR") for op in body),
        # warpgroup (Hopper) and warp-level tensor-core instructions
        "hgmma": sum(op.startswith("HGMMA") for op in body),
        "hmma": sum(op.startswith("HMMA") for op in body),
        "global_accesses": dict(sorted(widths.items())),
    }


def _resource(usage: str, name: str) -> int:
    m = re.search(rf"\b{name}:(\d+)", usage)
    return int(m.group(1)) if m else 0


def occupancy(registers: int, shared: int, num_warps: int) -> dict:
    """Resident blocks and warps per SM on sm_90 for a launch of this footprint."""
    unit = SM90["register_unit_per_warp"]
    regs_per_warp = -(-registers * 32 // unit) * unit
    limits = {
        "threads": SM90["max_threads_per_sm"] // (32 * num_warps),
        "registers": SM90["registers_per_sm"] // (regs_per_warp * num_warps),
        "shared": SM90["shared_bytes_per_sm"] // (shared + SM90["shared_reserved_per_block"]),
        "blocks": SM90["max_blocks_per_sm"],
    }
    blocks = min(limits.values())
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * num_warps,
        "occupancy": blocks * num_warps * 32 / SM90["max_threads_per_sm"],
        "limited_by": min(limits, key=limits.get),
    }


def variant(launch: Launch) -> str:
    """A short description: the narrowest float tensor type, the kernel's own compile-time
    switches that are on (not Triton's specializations), a strided vocabulary, and whether
    the vocabulary size is a multiple of 16."""
    pointers = [t[1:] for t in launch.signature.values() if t.startswith("*")]
    parts = [next((t for t in ("fp16", "bf16") if t in pointers), "fp32")]
    for param in launch.kernel.params:
        value = launch.constant(param.name)
        if not param.is_constexpr or param.name.startswith("BLOCK"):
            continue
        if value is True:
            parts.append(param.name)
        elif type(value) in (int, float) and value:
            parts.append(f"{param.name}={value:g}")
    names = launch.kernel.arg_names
    if "stride_v" in names and launch.constant("stride_v") != 1:
        parts.append("strided")
    if "V" in names:
        divisible = ["tt.divisibility", 16] in launch.attrs.get((names.index("V"),), [])
        parts.append("V%16==0" if divisible else "V%16!=0")
    return " ".join(parts)


def analyse(launch: Launch) -> dict:
    """Compile one configuration for sm_90a and read its resources and loops."""
    compiled = triton.compile(
        ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs),
        target=TARGET,
        options=launch.options.__dict__,
    )
    ptx_version = re.search(r"\.version\s+(\S+)", compiled.asm["ptx"]).group(1)
    sass, usage = _disassemble(compiled.asm["cubin"])
    loops, opcodes = sass_loops(sass)
    num_warps = launch.options.num_warps
    registers = _resource(usage, "REG")
    shared = compiled.metadata.shared
    entry = {
        "kernel": launch.name,
        "module": f"kernels/{Path(launch.kernel.fn.__code__.co_filename).name}",
        "variant": variant(launch),
        "num_warps": num_warps,
        "num_stages": launch.options.num_stages,
        "grid": list(launch.grid),
        "registers": registers,
        "stack_bytes": _resource(usage, "STACK"),
        "local_bytes": _resource(usage, "LOCAL"),
        "spill_instructions": sum(op.startswith(("LDL", "STL")) for op in opcodes),
        "shared_bytes": shared,
        **occupancy(registers, shared, num_warps),
        "sass_instructions": len(opcodes),
        "loops": loops,
        "scenarios": launch.scenarios,
        "ptx_version": ptx_version,
    }
    block_name = LOOP_ELEMENTS.get(launch.name)
    if block_name is not None and loops:
        per_thread = launch.constant(block_name) / (32 * num_warps)
        # the streaming loop is the longest one (the only one, in the core kernels)
        main = max(loops, key=lambda loop: loop["instructions"])
        entry["elements_per_thread_per_iteration"] = per_thread
        entry["instructions_per_element"] = round(main["instructions"] / per_thread, 2)
    return entry


def target_results(entries: list[dict]) -> list[dict]:
    """Each :data:`TARGETS` budget against its plain bf16 configuration."""
    results = []
    for kernel, (limit, plain) in TARGETS.items():
        found = [
            e["instructions_per_element"] for e in entries if e["kernel"] == kernel and e["variant"] == plain
        ]
        measured = max(found, default=None)
        results.append(
            {
                "kernel": kernel,
                "variant": plain,
                "limit": limit,
                "instructions_per_element": measured,
                "met": measured is not None and measured <= limit,
            }
        )
    return results


_LAUNCHES: list[Launch] = []


def _analyse_captured(index: int) -> dict:
    return analyse(_LAUNCHES[index])


def analyse_all(launches: list[Launch], workers: int) -> list[dict]:
    """:func:`analyse` every launch, in ``workers`` forked processes (each compile is serial)."""
    _LAUNCHES[:] = launches
    if workers <= 1:
        return [_analyse_captured(i) for i in range(len(launches))]
    # fork: the children inherit the captured JITFunctions, which do not pickle
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("fork")
    ) as pool:
        return list(pool.map(_analyse_captured, range(len(launches))))


def build_report(workers: int = os.cpu_count() or 1) -> dict:
    """Capture, compile and read back every configuration; the report as a JSON-able dict."""
    launches = capture()
    entries = sorted(analyse_all(launches, workers), key=lambda e: (e["module"], e["kernel"], e["variant"]))
    covered = {e["kernel"] for e in entries}
    ptxas_version = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True).stdout
    return {
        "generated_by": "benchmarks/sm90_report.py",
        "date": datetime.date.today().isoformat(),
        "target": "sm_90a",
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas": ptxas_version.strip().splitlines()[-1],
        "ptx_version": sorted({e.pop("ptx_version") for e in entries}),
        "limits": SM90,
        "uncovered_kernels": sorted(set(kernel_functions()) - covered),
        "targets": target_results(entries),
        "configurations": entries,
    }


def problems(report: dict) -> list[str]:
    """What ``--check`` fails on: spills, uncovered kernels, missed instruction targets."""
    found = [f"no launch reaches {name}" for name in report["uncovered_kernels"]]
    for e in report["configurations"]:
        if e["spill_instructions"] or e["local_bytes"] or e["stack_bytes"]:
            found.append(
                f"{e['kernel']} [{e['variant']}] spills: {e['spill_instructions']} LDL/STL instructions, "
                f"{e['stack_bytes']} bytes of stack, {e['local_bytes']} of local memory"
            )
    for t in report["targets"]:
        if not t["met"]:
            found.append(
                f"{t['kernel']}: {t['instructions_per_element']} SASS instructions per element "
                f"(limit {t['limit']})"
            )
    return found


def print_summary(report: dict) -> None:
    print(
        f"Triton {report['triton']}, {report['ptxas']}, PTX ISA {report['ptx_version']}, {report['target']}"
    )
    header = (
        f"{'kernel':34} {'variant':58} {'regs':>4} {'spill':>5} {'smem':>6} {'occ':>5} {'instr/elem':>10}"
    )
    print(header)
    for e in report["configurations"]:
        per_element = e.get("instructions_per_element")
        print(
            f"{e['kernel']:34} {e['variant'][:58]:58} {e['registers']:4d} {e['spill_instructions']:5d} "
            f"{e['shared_bytes']:6d} {e['occupancy']:5.2f} {'-' if per_element is None else per_element:>10}"
        )
    for t in report["targets"]:
        status = "met" if t["met"] else "MISSED"
        print(f"target {t['kernel']}: {t['instructions_per_element']} <= {t['limit']} per element: {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON report")
    parser.add_argument("--check", action="store_true", help="exit 1 on spills or missed targets")
    parser.add_argument("--quiet", action="store_true", help="no table")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = parser.parse_args(argv)
    if not ptxas_available():
        print("Triton's bundled ptxas / nvdisasm cannot run here: no sm_90 report")
        return 2
    report = build_report(args.workers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if not args.quiet:
        print_summary(report)
    print(f"wrote {args.out}")
    found = problems(report)
    for problem in found:
        print(f"PROBLEM: {problem}")
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
