"""functional_cnn: pure-functional CNNs on JAX with hand-written, verified backward rules.

A layer is ``Layer(init, apply)``; compose with :func:`serial` and friends; every op's backward
rule lives in :mod:`functional_cnn.functional` (one module per op family) and is selected with
``vjp="custom"`` (default) or replaced by JAX autodiff with ``vjp="autodiff"``.
"""
from . import checkpoint, data, functional, interop, models, train
from .combinators import fan_in_concat, fan_in_sum, fan_out, frozen, parallel, residual, serial
from .functional import REGISTRY, VJP_MODES
from .functional.losses import binary_cross_entropy_with_logits, cross_entropy, mse_loss
from .functional.losses import huber_loss, nll_loss
from .interop import load_state_dict, named_leaves, state_dict
from .summary import summary
from .layers import (AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Identity, Layer,
                     LeakyReLU, Linear, LogSoftmax, MaxPool2d, ReLU, Sigmoid, Softmax, Tanh)
from .layers import AdaptiveAvgPool2d, AdaptiveMaxPool2d, ConvTranspose2d, Upsample
from .layers import (ELU, GELU, BatchNorm1d, Dropout2d, GroupNorm, Hardtanh, LayerNorm, SiLU,
                     Softplus)

__version__ = "0.1.0"

__all__ = [
    "Layer", "Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "BatchNorm2d", "ReLU", "LeakyReLU",
    "Sigmoid", "Tanh", "Softmax", "LogSoftmax", "Flatten", "Dropout", "Identity",
    "ConvTranspose2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "Upsample",
    "serial", "parallel", "fan_out", "fan_in_sum", "fan_in_concat", "residual", "frozen",
    "cross_entropy", "binary_cross_entropy_with_logits", "mse_loss",
    "LayerNorm", "GroupNorm", "BatchNorm1d", "Dropout2d", "GELU", "SiLU", "ELU", "Softplus",
    "Hardtanh", "nll_loss", "huber_loss",
    "functional", "models", "interop", "data", "train", "checkpoint", "REGISTRY", "VJP_MODES",
    "load_state_dict", "state_dict", "named_leaves", "summary",
]
