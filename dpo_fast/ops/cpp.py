"""The ``"cpp"`` backend: the C++ CPU kernels of ``csrc/``, compiled just in time.

The first CPU call compiles ``csrc/logprobs_cpu.cpp`` and ``csrc/buffer_cache.cpp`` with
``torch.utils.cpp_extension.load`` (about a minute, announced by a one-line log message)
into a cache directory keyed by the sources, the flags and the torch version; later
processes load the cached library directly.
The library registers the custom operators ``torch.ops.dpo_fast.logprobs_forward_cpu``,
``logprobs_backward_cpu`` and ``cached_empty_cpu`` (with fake implementations, so
``torch.compile`` can trace them).
Without a working compiler :func:`available` returns False after one warning, and
``dpo_fast.registry`` falls back to the PyTorch backend.

The code is built for the instruction set PyTorch dispatches to on this machine
(``torch.backends.cpu.get_cpu_capability()``): AVX512, AVX2 or portable code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = ("logprobs_cpu.cpp", "buffer_cache.cpp")
_CAPABILITY_FLAGS = {
    "AVX512": [
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
        *("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"),
    ],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": True, or "error": the reason the build failed


def _source_dir() -> Path:
    # installed: dpo_fast/csrc (copied there by setup.py); a source checkout: the repository's csrc/
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / _SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(f"C++ sources {_SOURCES} not found in {package}/csrc or {package.parent}/csrc")


def _compile_flags() -> list[str]:
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-DNDEBUG", *_CAPABILITY_FLAGS.get(capability, ["-DCPU_CAPABILITY=DEFAULT"])]
    # at::parallel_for is an OpenMP pragma in ATen's headers: without -fopenmp it runs serially.
    # The library then uses the libgomp that torch already loaded (same soname).
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        flags.append("-fopenmp")
    return flags


def _build_directory(name: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "torch_extensions"
    )
    return Path(root) / name


def _load() -> None:
    from torch.utils import cpp_extension

    sources = [_source_dir() / name for name in _SOURCES]
    flags = _compile_flags()
    key = hashlib.sha256()
    for part in (torch.__version__, os.environ.get("CXX", ""), " ".join(flags)):
        key.update(part.encode())
    for path in sources:
        key.update(path.read_bytes())
    name = f"dpo_fast_cpu_{key.hexdigest()[:16]}"
    build_dir = _build_directory(name)
    library = build_dir / f"{name}.so"
    # "lock" is cpp_extension's marker of a build in progress in that directory
    if library.is_file() and not (build_dir / "lock").exists():
        torch.ops.load_library(str(library))
    else:
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler {compiler!r} found (set CXX to use another one)")
        logger.warning("dpo_fast: compiling the C++ CPU kernels (first use only; cached in %s)", build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        cpp_extension.load(
            name=name,
            sources=[str(path) for path in sources],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
        logger.info("dpo_fast: C++ CPU kernels compiled in %.1f s", time.perf_counter() - start)
    _register_fakes()


def _register_fakes() -> None:
    """Shape-only implementations, so ``torch.compile`` and meta tensors can trace the ops."""

    @torch.library.register_fake("dpo_fast::logprobs_forward_cpu")
    def _forward_fake(x, labels, ignore_index, scale, softcap, stats):
        values = [
            labels.new_empty(labels.shape, dtype=torch.bool if s == "is_top1" else torch.float32)
            for s in stats
        ]
        return (
            labels.new_empty(labels.shape, dtype=torch.float32),
            labels.new_empty(labels.shape, dtype=torch.float32),
            values,
        )

    @torch.library.register_fake("dpo_fast::logprobs_backward_cpu")
    def _backward_fake(grad_logp, x, labels, logp, lse, grad_x, ignore_index, scale, softcap):
        return None

    @torch.library.register_fake("dpo_fast::cached_empty_cpu")
    def _cached_empty_fake(size, dtype):
        return torch.empty(size, dtype=dtype)


def available() -> bool:
    """True when the C++ kernels are loaded, compiling them on the first call if needed.

    A failed build warns once (``RuntimeWarning``) and is not retried in this process.
    """
    with _lock:
        if not _state:
            try:
                _load()
                _state["loaded"] = True
            except Exception as error:  # any build or load failure means: use the torch backend
                last_line = (str(error).strip().splitlines() or [""])[-1]
                _state["error"] = f"{type(error).__name__}: {last_line}"
                warnings.warn(
                    "dpo_fast: the C++ CPU kernels could not be built or loaded "
                    f"({_state['error']}); using the PyTorch backend instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return "loaded" in _state


def logprobs_forward(
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    scale: float,
    softcap: float | None,
    stats: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Forward over CPU logits ``x`` ``(B, T, V)`` (fp32/bf16/fp16, any strides).

    Args:
        labels: ``(B, T)`` contiguous int64.
    Returns:
        ``logp`` and ``lse`` ``(B, T)`` fp32, and the requested statistics ``(B, T)``
        (``is_top1`` bool, others fp32).
    """
    _require()
    logp, lse, values = torch.ops.dpo_fast.logprobs_forward_cpu(
        x, labels, ignore_index, scale, softcap, list(stats)
    )
    return logp, lse, dict(zip(stats, values, strict=True))


def logprobs_backward(
    grad_logp: torch.Tensor,
    x: torch.Tensor,
    labels: torch.Tensor,
    logp: torch.Tensor,
    lse: torch.Tensor,
    grad_x: torch.Tensor,
    *,
    ignore_index: int,
    scale: float,
    softcap: float | None,
) -> None:
    """Write every element of ``grad_x`` ``(B, T, V)`` (which may alias ``x``).

    ``grad_logp``, ``logp`` and ``lse`` are ``(B, T)`` contiguous fp32 (as forward returns them).
    """
    _require()
    torch.ops.dpo_fast.logprobs_backward_cpu(
        grad_logp, x, labels, logp, lse, grad_x, ignore_index, scale, softcap
    )


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor for a ``[tokens, V]`` buffer, from a small cache
    of freed blocks (``csrc/buffer_cache.cpp``): reusing a block skips the first-touch page
    faults a fresh one costs at every training step.

    Set ``DPO_FAST_CPU_BUFFER_CACHE=0`` to allocate with ``torch.empty`` instead;
    :func:`empty_cache` returns the idle blocks to the system.
    """
    _require()
    if os.environ.get("DPO_FAST_CPU_BUFFER_CACHE", "1") == "0":
        return torch.empty(shape, dtype=dtype)
    return torch.ops.dpo_fast.cached_empty_cpu(list(shape), dtype)


def empty_cache() -> None:
    """Free the idle blocks :func:`empty` keeps (at most two). A no-op if the kernels never loaded."""
    if "loaded" in _state:
        torch.ops.dpo_fast.empty_cache_cpu()


def _require() -> None:
    if not available():
        raise RuntimeError(f"dpo_fast's C++ CPU kernels are unavailable: {_state['error']}")
