"""The ``preference_loss`` op (being ported to torch.library operators)."""

from __future__ import annotations


def load(backend: str) -> None:
    """Make ``backend`` ready (called once per process by ``dpo_fast.registry``)."""
    if backend == "triton":
        # imported on first use: Triton reads TRITON_INTERPRET when the kernels are defined
        from ..kernels import preference_loss  # noqa: F401
