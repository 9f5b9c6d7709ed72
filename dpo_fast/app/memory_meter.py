"""Memory meters for the profiler: live bytes, the peak, and the peak of each phase of a step.

- :class:`CudaMeter`: the CUDA caching allocator's ``memory_allocated`` /
  ``max_memory_allocated``.
- :class:`AllocatorMeter` (CPU): the CPU allocator's allocations and frees as the PyTorch
  profiler records them (``profile_memory=True``), replayed in time order — the peak of live
  tensor storage, compiled code (FlexAttention's kernels) included. It does not see memory a
  library allocates outside PyTorch's allocator (MKL's scratch buffers); a test checks it
  against the process's resident memory.
- :class:`StorageMeter`: a ``TorchDispatchMode`` that adds up the storage of every tensor an
  operator returns and subtracts it when the storage is freed. It serves fake tensors (the
  estimator: the same count with no memory behind it) and the tests; it cannot see inside
  compiled code.

Phases: :meth:`mark` starts a phase; each phase records the live bytes at its start and its
own peak, so a step's peak can be split into where it happens (forward, head, backward, ...).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class MemoryBudgetExceeded(RuntimeError):
    """Live tensor storage went over the meter's budget (the CPU stand-in for out of memory)."""


@dataclass
class Phase:
    name: str
    start: int  # live bytes when the phase began
    peak: int  # most live bytes during the phase


class _Phases:
    """The phase bookkeeping both meters share; subclasses provide ``current()``."""

    def __init__(self) -> None:
        self.phases: list[Phase] = []

    def current(self) -> int:
        raise NotImplementedError

    def mark(self, name: str) -> None:
        """Start phase ``name`` (ends the previous one)."""
        self._close()
        now = self.current()
        self.phases.append(Phase(name, now, now))

    def _close(self) -> None:
        pass

    def peak(self) -> int:
        self._close()
        return max((p.peak for p in self.phases), default=self.current())

    def phase(self, name: str) -> Phase | None:
        self._close()
        return next((p for p in self.phases if p.name == name), None)


class CudaMeter(_Phases):
    """Phases over the CUDA allocator's statistics of ``device``."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        torch.cuda.reset_peak_memory_stats(device)

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def _close(self) -> None:
        if self.phases:
            phase = self.phases[-1]
            phase.peak = max(phase.peak, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def __enter__(self) -> CudaMeter:
        return self

    def __exit__(self, *exc) -> None:
        self._close()


class AllocatorMeter(_Phases):
    """Phases over the CPU allocator's events, recorded by the PyTorch profiler.

    Live bytes start at ``baseline`` (the tensors that exist before the step: weights,
    optimizer state, inputs) and follow every allocation and free while the meter is active;
    :meth:`mark` records a profiler annotation, and the phases are computed when it exits.
    """

    _PREFIX = "dpo_fast.phase::"

    def __init__(self, baseline: int = 0) -> None:
        super().__init__()
        self.baseline = baseline
        self._names: list[str] = []
        self._profile = None

    def current(self) -> int:
        raise RuntimeError("AllocatorMeter knows live bytes only after it exits")

    def mark(self, name: str) -> None:
        self._names.append(name)
        with torch.profiler.record_function(self._PREFIX + name):
            pass

    def __enter__(self) -> AllocatorMeter:
        self._profile = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        )
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        events = []
        for event in self._profile.profiler.kineto_results.events():
            if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU:
                events.append((event.start_ns(), 1, event.nbytes()))
            elif event.name().startswith(self._PREFIX):
                events.append((event.start_ns(), 0, event.name().removeprefix(self._PREFIX)))
        live = self.baseline
        self.phases = []
        for _, kind, value in sorted(events, key=lambda e: (e[0], e[1])):
            if kind == 0:
                self.phases.append(Phase(value, live, live))
                continue
            live += value
            if self.phases:
                self.phases[-1].peak = max(self.phases[-1].peak, live)
        self.live = live

    def peak(self) -> int:
        return max((p.peak for p in self.phases), default=self.baseline)


class StorageMeter(_Phases, TorchDispatchMode):
    """Live tensor storage, counted from operator outputs while the mode is active.

    Args:
        budget: raise :class:`MemoryBudgetExceeded` when live bytes go above it (None: never).

    Storages that exist before the mode is entered are unknown to it: :meth:`adopt` them
    (weights, gradients, optimizer state, inputs), so that live bytes are absolute and freeing
    them is counted.
    """

    # higher-order operators (FlexAttention) pass through too: their outputs are counted
    supports_higher_order_operators = True

    def __init__(self, budget: int | None = None) -> None:
        _Phases.__init__(self)
        TorchDispatchMode.__init__(self)
        self.budget = budget
        self.live = 0
        self._sizes: dict[int, int] = {}  # id of a live storage -> its bytes

    def current(self) -> int:
        return self.live

    def _freed(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def _add(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
            return
        key, size = id(storage), storage.nbytes()
        old = self._sizes.get(key)
        if old is None:
            # the storage's Python object lives exactly as long as the storage itself
            weakref.finalize(storage, self._freed, key)
        self._sizes[key] = size
        self.live += size - (old or 0)
        if self.phases and self.live > self.phases[-1].peak:
            self.phases[-1].peak = self.live
        if self.budget is not None and self.live > self.budget:
            raise MemoryBudgetExceeded(
                f"live tensor storage {self.live / 2**30:.2f} GiB is over the budget of "
                f"{self.budget / 2**30:.2f} GiB"
            )

    def adopt(self, tensors) -> None:
        """Count tensors that already exist (each storage once)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # in-place and out= operators return their (possibly resized) argument: re-read its size
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        return out
