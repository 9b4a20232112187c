"""Build script for cdfast.

The pure-Python package lives in ``cdfast/``; the Triton sources in ``kernels/`` are
installed as the subpackage ``cdfast.kernels``. Compiled extensions (``csrc/``) are
added by :func:`extensions` below.
"""
from setuptools import setup

PACKAGES = ["cdfast", "cdfast.kernels"]
PACKAGE_DIR = {"cdfast": "cdfast", "cdfast.kernels": "kernels"}


def extensions():
    """Compiled extensions; empty until csrc/ provides them."""
    return []


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=extensions())
