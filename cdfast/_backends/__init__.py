"""Backend implementations, one module per backend.

``reference`` is the plain PyTorch path: the fallback on every device and the
oracle the tests compare the kernels with. The other modules register themselves
with :mod:`cdfast.dispatch` when their dependencies import; an import failure only
marks that backend unavailable (with the reason), it never breaks cdfast.
"""
from __future__ import annotations

import importlib

from .. import dispatch
from . import reference  # noqa: F401  (registers the torch backend)

for _name in ("cpp", "triton", "cuda"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name and _exc.name.startswith(__name__):
            dispatch.register_probe(_name, lambda n=_name: f"the {n} backend is not part of this build")
        else:
            dispatch.register_probe(_name, lambda e=_exc: f"import failed: {e}")
    except Exception as _exc:  # pragma: no cover - a broken optional backend
        dispatch.register_probe(_name, lambda e=_exc: f"import failed: {type(e).__name__}: {e}")
