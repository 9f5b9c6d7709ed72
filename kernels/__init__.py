"""Triton kernels of dpo_fast, installed as ``dpo_fast.kernels``.

Each module holds one family of kernels and the thin launchers that allocate their
outputs; the autograd wrappers and argument checks live in ``dpo_fast``.
"""
