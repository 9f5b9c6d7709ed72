"""Building and loading the C++ CPU kernels of ``csrc/`` (the ``"cpp"`` backend).

The first use compiles ``csrc/logprobs_cpu.cpp`` and ``csrc/buffer_cache.cpp`` with
``torch.utils.cpp_extension.load`` (about 9 s on 2 cores, announced by a one-line log message)
into a cache directory keyed by the sources, the flags and the torch version; later processes
load the cached library directly. Loading registers the operators
``torch.ops.dpo_fast.logprobs_forward_cpp`` / ``logprobs_backward_cpp`` (whose fakes and
autograd ``dpo_fast.ops.logprobs`` adds) and ``cached_empty_cpu`` (whose fake is here).
Without a working compiler :func:`load` raises, and ``dpo_fast.registry`` falls back to the
PyTorch backend after one warning.

The code is built for the instruction set PyTorch dispatches to on this machine
(``torch.backends.cpu.get_cpu_capability()``): AVX512, AVX2 or portable code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
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

_loaded = False


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


def load() -> None:
    """Build (first use only) and load the library; a no-op once loaded in this process.

    Raises:
        RuntimeError / OSError / subprocess errors: no compiler, or the build or load failed.
    """
    global _loaded
    if _loaded:
        return
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
    _loaded = True


def _register_fakes() -> None:
    """The buffer cache's fake, so ``torch.compile`` and fake tensors can trace it."""

    @torch.library.register_fake("dpo_fast::cached_empty_cpu")
    def _cached_empty_fake(size, dtype):
        return torch.empty(size, dtype=dtype)


def loaded() -> bool:
    """True once :func:`load` has succeeded in this process."""
    return _loaded


def empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor for a ``[tokens, V]`` buffer, from a small cache
    of freed blocks (``csrc/buffer_cache.cpp``): reusing a block skips the first-touch page
    faults a fresh one costs at every training step.

    Set ``DPO_FAST_CPU_BUFFER_CACHE=0`` to allocate with ``torch.empty`` instead;
    :func:`empty_cache` returns the idle blocks to the system.
    """
    load()
    if os.environ.get("DPO_FAST_CPU_BUFFER_CACHE", "1") == "0":
        return torch.empty(shape, dtype=dtype)
    return torch.ops.dpo_fast.cached_empty_cpu(list(shape), dtype)


def empty_cache() -> None:
    """Free the idle blocks :func:`empty` keeps (at most two). A no-op if the kernels never loaded."""
    if _loaded:
        torch.ops.dpo_fast.empty_cache_cpu()
