"""Which implementation runs an op: one table of (op, backend) and one resolution function.

Every op of ``dpo_fast.ops`` exists once per backend that implements it, as the custom
operators ``torch.ops.dpo_fast.<op>_forward_<backend>`` (and ``..._backward_<backend>``):

========================  ==========================  ==========================================
op                        backends                    where
========================  ==========================  ==========================================
``logprobs``              ``triton``, ``cpp``,        ``kernels/logprobs.py``,
                          ``torch``                   ``csrc/logprobs_cpu.cpp``, ``dpo_fast/ops/logprobs.py``
``linear_logprobs``       ``triton``, ``cpp``,        ``dpo_fast/ops/linear_logprobs.py`` (tiles
                          ``torch``                   folded by the ``logprobs`` kernels of the backend)
``preference_loss``       ``triton``, ``torch``       ``kernels/preference_loss.py``;
                                                      ``torch``: ``dpo_fast.formulas`` (autograd)
========================  ==========================  ==========================================

``backend="auto"`` picks, among the op's own backends, the first that runs on the device:
Triton for CUDA tensors; the C++ kernels for CPU tensors (built on first use) or the PyTorch
backend where they cannot be built. The environment variable ``DPO_FAST_BACKEND`` overrides
``"auto"`` (an explicit argument always wins). An op's backends are loaded when it first
resolves to them: an op never builds or imports what it does not use.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from .constants import BACKEND_ENV_VAR, BACKENDS

# op -> (the module registering its operators, the backends it implements, in "auto" order)
OPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "logprobs": ("dpo_fast.ops.logprobs", ("triton", "cpp", "torch")),
    "linear_logprobs": ("dpo_fast.ops.linear_logprobs", ("triton", "cpp", "torch")),
    "preference_loss": ("dpo_fast.ops.preference_loss", ("triton", "torch")),
}
# backends that run on each device type without any setting ("auto" tries them in op order)
_NATIVE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}

_DESCRIPTIONS = {"triton": "the Triton kernels", "cpp": "the C++ CPU kernels", "torch": "the PyTorch backend"}

_loaded: set[tuple[str, str]] = set()  # (op, backend) whose operators are registered
_unavailable: dict[str, str] = {}  # backend -> why it cannot load here (warned once)


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backends(op: str) -> tuple[str, ...]:
    """The concrete backends that implement ``op``."""
    return OPS[op][1]


def _runs_on(backend: str, device_type: str) -> bool:
    if device_type == "meta":
        return True  # shapes only: every backend's operators trace meta tensors through their fakes
    if backend == "triton":
        return device_type == "cuda" or (device_type == "cpu" and triton_interpreted())
    if backend == "cpp":
        return device_type == "cpu"
    return True


def load(op: str, backend: str) -> bool:
    """Register ``op``'s operators for ``backend``; False (after one warning) if it cannot load."""
    if (op, backend) in _loaded:
        return True
    if backend in _unavailable:
        return False
    module = importlib.import_module(OPS[op][0])
    try:
        module.load(backend)
    except Exception as error:  # a failed build or load of a backend means: use another one
        last_line = (str(error).strip().splitlines() or [""])[-1]
        _unavailable[backend] = f"{type(error).__name__}: {last_line}"
        warnings.warn(
            f"dpo_fast: {_DESCRIPTIONS[backend]} could not be built or loaded ({_unavailable[backend]}); "
            "using the PyTorch backend instead",
            RuntimeWarning,
            stacklevel=4,
        )
        return False
    _loaded.add((op, backend))
    return True


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` failed to load in this process, or None."""
    return _unavailable.get(backend)


# Resolution runs in Python even under torch.compile: Dynamo calls it while tracing and keeps
# its result as a constant (it reads the environment and may build or import a backend).
@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device_type: str) -> str:
    """The concrete backend that runs ``op`` for tensors on ``device_type``, its operators loaded.

    Args:
        op: a key of :data:`OPS`.
        backend: ``"auto"`` or one of ``backends(op)``.
        device_type: ``tensor.device.type`` of the op's inputs.

    Raises:
        ValueError: an unknown name, a backend the op does not implement, ``"triton"`` on CPU
            tensors without ``TRITON_INTERPRET=1``, or ``"cpp"`` on non-CPU tensors.
    """
    own = backends(op)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(
                f"environment variable {BACKEND_ENV_VAR} must be one of {BACKENDS}, got {backend!r}"
            )
        if backend != "auto" and backend not in own:
            backend = "auto"  # a backend this op lacks: the environment's choice does not apply
    if backend == "auto":
        native = _NATIVE.get(device_type, ("torch",))
        for candidate in own:
            if candidate in native and load(op, candidate):
                return candidate
        load(op, "torch")
        return "torch"
    if backend not in own:
        raise ValueError(f"{op} has no {backend!r} backend; its backends are {own} (or 'auto')")
    if not _runs_on(backend, device_type):
        if backend == "triton":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device_type} tensors); set TRITON_INTERPRET=1 "
                "to run the Triton kernels on CPU tensors through the interpreter"
            )
        raise ValueError(f"backend={backend!r} needs CPU tensors, got {device_type} tensors")
    if load(op, backend):
        return backend
    load(op, "torch")
    return "torch"


def operator(op: str, stage: str, backend: str) -> torch._ops.OpOverloadPacket:
    """``torch.ops.dpo_fast.<op>_<stage>_<backend>`` (``stage``: ``"forward"`` or ``"backward"``)."""
    return getattr(torch.ops.dpo_fast, f"{op}_{stage}_{backend}")
