"""The networks of the articles in ``shared/seeds``, as layers.

* :func:`mytorch_net` -- article 001's ``Net`` (conv, max-pool, conv+BN+ReLU, avg-pool, linear).
* :func:`lenet` -- article 004's CNN (two conv+ReLU+max-pool stages, linear).
* :func:`mlp` -- article 004's 784-512-256-128-64-10 ReLU network.

Each takes NCHW MNIST input ``(N, 1, 28, 28)`` and returns logits ``(N, 10)``. Their nesting
mirrors an ``nn.Sequential`` twin, so :func:`functional_cnn.interop.load_state_dict` copies torch
weights (pass ``rename=`` where the torch model uses attribute names instead).
"""
from __future__ import annotations

from .combinators import serial
from .layers import AvgPool2d, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU


def _two_pins(where: str, formulations) -> tuple:
    """One training formulation (or None) per convolution of a two-convolution network."""
    if not isinstance(formulations, (tuple, list)) or len(formulations) != 2:
        raise ValueError(f"{where}: expected formulations, one per convolution (2), got "
                         f"{formulations!r}")
    return tuple(formulations)


def mytorch_net(formulations=(None, None)):
    """Article 001: Conv(32,3,s2,p1) MaxPool(3,s2) [Conv(64,3,s2,p1) BN ReLU] AvgPool(3) Flatten
    Linear(10). Param names follow its torch twin (``2.conv.weight`` is our ``2.0.weight``).
    ``formulations``: each convolution's ``train_formulation`` (:func:`~.layers.Conv2d`)."""
    first, second = _two_pins("mytorch_net", formulations)
    conv_block = serial(Conv2d(64, 3, stride=2, padding=1, train_formulation=second),
                        BatchNorm2d(), ReLU())
    return serial(Conv2d(32, 3, stride=2, padding=1, train_formulation=first),
                  MaxPool2d(3, stride=2), conv_block, AvgPool2d(3), Flatten(), Linear(10))


def lenet(formulations=(None, None)):
    """Article 004: Conv(10,5) ReLU MaxPool(2) Conv(20,5) ReLU MaxPool(2) Flatten Linear(10).
    ``formulations``: each convolution's ``train_formulation`` (:func:`~.layers.Conv2d`)."""
    first, second = _two_pins("lenet", formulations)
    return serial(Conv2d(10, 5, train_formulation=first), ReLU(), MaxPool2d(2),
                  Conv2d(20, 5, train_formulation=second), ReLU(), MaxPool2d(2), Flatten(),
                  Linear(10))


def mlp():
    """Article 004: Flatten, then 784-512-256-128-64-10 with ReLU between the linear layers."""
    layers = [Flatten()]
    for width in (512, 256, 128, 64):
        layers += [Linear(width), ReLU()]
    return serial(*layers, Linear(10))
