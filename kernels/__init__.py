"""Triton kernels of cdfast, installed as ``cdfast.kernels``.

The kernels are pure functions on tensors; :mod:`cdfast._backends.triton` wraps
them as backend implementations of the ops in :mod:`cdfast.dispatch`.
"""
