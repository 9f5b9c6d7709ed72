"""Choosing the implementation behind the public functions.

``backend="auto"`` resolves to Triton for CUDA tensors and, for CPU tensors, to the C++
kernels (``"cpp"``, compiled on first use) or the PyTorch backend where they cannot be built;
the environment variable ``DPO_FAST_BACKEND`` overrides ``"auto"`` (an explicit argument
always wins).
"""

from __future__ import annotations

import os

import torch

from .constants import BACKEND_ENV_VAR as ENV_VAR
from .constants import BACKENDS
from .ops import cpp


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user-facing backend name to a concrete one (``"triton"``, ``"cpp"`` or ``"torch"``).

    ``"cpp"`` (and ``"auto"`` on CPU) compiles the C++ kernels on first use; where that fails
    it warns once and resolves to ``"torch"``.

    Raises:
        ValueError: unknown name, ``"triton"`` on CPU tensors without ``TRITON_INTERPRET=1``,
            or ``"cpp"`` on non-CPU tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpp" if device.type == "cpu" and cpp.available() else "torch"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got device {device}")
        return "cpp" if cpp.available() else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got device {device}); set TRITON_INTERPRET=1 "
            "to run the Triton kernels on CPU tensors through the interpreter"
        )
    return backend
