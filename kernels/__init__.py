"""Triton kernels of cdfast, installed as ``cdfast.kernels``.

The kernels are pure functions on tensors; :mod:`cdfast._backends.triton` wraps
them as backend implementations of the ops in :mod:`cdfast.dispatch`.

==================  ===========================================================
``statistics``       one-pass dual-path Grams with implicit im2col (SPEC §2.1)
``conv``             data form: student convolution + loss + ``dL/dY``, weight gradient (§2.2)
``gram``             fused Gram-form solver step, per-channel prox, grid projection (§3, §4)
``_common``          implicit-im2col addressing, rounding, proximal maps
==================  ===========================================================

Every configuration a launcher may pick is listed in the modules' ``*CONFIGS``
tuples; ``tools/aot_compile.py`` compiles them all for sm_80 and sm_90.
"""
