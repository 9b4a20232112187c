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
    assert acc > 40.0, (acc, acc_teacher)  # chance is 10 %
