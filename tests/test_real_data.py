"""A real-data compression: a Fashion-MNIST teacher compressed from one image per class.

Needs Debian's ``dataset-fashion-mnist`` (CI installs it); skips cleanly without it.
"""
import os

import pytest
import torch

import cdfast
from cdfast.experiments.data import few_shot, load_fashion_mnist
from cdfast.experiments.models import count_parameters
from cdfast.experiments.train import evaluate, train_teacher

ROOT = os.environ.get("CDFAST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not os.path.isdir(ROOT), reason="Fashion-MNIST not installed "
                                "(apt-get install dataset-fashion-mnist)")


def test_one_shot_channel_pruning_keeps_a_working_classifier(tmp_path):
    torch.manual_seed(0)
    teacher = train_teacher("small_cnn", epochs=1, max_train=6000, cache_dir=tmp_path, progress=False).eval()
    test = load_fashion_mnist("test")
    test = torch.utils.data.TensorDataset(*(t[:2000] for t in test.tensors))
    acc_teacher = evaluate(teacher, test)
    x, _ = few_shot(load_fashion_mnist("train"), 1, seed=0).tensors  # K = 1: ten images, no labels used
    small, report = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), loss="cross", mu=0.6,
                                    solver="exact", progress=False, verbose=False)
    acc = evaluate(small.eval(), test)
    assert count_parameters(small) < count_parameters(teacher)
    assert report.params_after == count_parameters(small) < report.params_before
    assert acc_teacher > 60.0
    # the same channels removed without any refit (the L1-norm baseline): far lower
    naive, _ = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), loss="cross", mu=0.6,
                               solver="adam", steps=1, lr=1e-12, progress=False, verbose=False)
    acc_naive = evaluate(naive.eval(), test)
    assert acc > acc_naive + 10.0 and acc > 0.7 * acc_teacher, (acc, acc_naive, acc_teacher)


def _trained_mlp(seed: int = 0) -> torch.nn.Module:
    """784 → 256 → 128 → 10 with ReLUs, two epochs of SGD on 20,000 training images."""
    torch.manual_seed(seed)
    x, y = load_fashion_mnist("train").tensors
    x, y = x[:20000], y[:20000]
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(mlp.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for i in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(mlp(x[i]), y[i]).backward()
            opt.step()
    return mlp.eval()


@pytest.mark.parametrize("k", [1, 5])
def test_refitting_every_layer_with_nothing_compressed_keeps_the_accuracy(k):
    """Nothing to compress: every layer is only refit, and the teacher is already optimal
    for each of them. The exact solve once damped towards zero the directions that fewer
    samples than inputs (M < D) do not see, and the accuracy fell (84.2 % → 79.0 % at K=5)."""
    teacher = _trained_mlp()
    test = load_fashion_mnist("test")
    acc_teacher = evaluate(teacher, test)
    assert acc_teacher > 80.0
    x, _ = few_shot(load_fashion_mnist("train"), k, seed=0).tensors
    for loss in ("cross", "nc"):
        for solver in ("exact", "adam"):
            student, _ = cdfast.compress(teacher, x, compression=None, loss=loss, solver=solver, steps=200,
                                         policy="all", progress=False, verbose=False)
            acc = evaluate(student.eval(), test)
            assert abs(acc - acc_teacher) <= 0.1, (loss, solver, acc, acc_teacher)
