import os
import sys

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The variable must be
# set before the first `import triton` anywhere in the session (cdfast imports it
# lazily through its backends), so it is set here, ahead of every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests/authors_reference.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
