"""What reproduces the paper and is not the library: the Fashion-MNIST loader and
few-shot draws, the bundled VGG/ResNet, teacher training, the baselines, the
experiment grid, the crossing study and the demo. The library (``cdfast.layer``,
``cdfast.model``, the backends) never imports this package.
"""
