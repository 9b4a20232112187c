"""What reproduces the paper and is not the library: the Fashion-MNIST loader and
few-shot draws, the bundled VGG/ResNet, teacher training, the baselines, the
experiment grid, the crossing study and the demo. The library (``cdfast.layer``,
``cdfast.model``, the backends) never imports this package.
"""
from __future__ import annotations

import time
from pathlib import Path

#: Where the commands write when no output folder is given: under the current directory.
RUNS_ROOT = "cdfast-runs"


def new_run_folder(kind: str, root: str | Path = RUNS_ROOT) -> Path:
    """A fresh folder ``<root>/<kind>-<YYYYmmdd-HHMMSS>`` (a suffix if it exists), not yet created."""
    base = Path(root) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path
