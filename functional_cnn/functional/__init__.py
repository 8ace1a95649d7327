"""Functional ops, each with a hand-written backward rule registered through ``jax.custom_vjp``.

One module per op family; every public op takes ``vjp="custom"`` (the hand-written rule) or
``vjp="autodiff"`` (JAX differentiates the same forward). :data:`REGISTRY` lists them all.
"""
from . import _spaces
from ._formulation import conv_formulation, conv_formulations
from ._registry import REGISTRY, VJP_MODES, OpInfo, ops
from .activations import leaky_relu, log_softmax, relu, sigmoid, softmax, tanh
from .activations import elu, gelu, hardtanh, silu, softplus
from .conv import FORMULATIONS as CONV_FORMULATIONS
from .conv import conv2d, conv_transpose2d
from .dropout import dropout, dropout2d
from .linear import linear
from .losses import binary_cross_entropy_with_logits, cross_entropy, mse_loss
from .losses import huber_loss, nll_loss
from .normalization import batch_norm, group_norm, layer_norm
from .pooling import adaptive_avg_pool2d, adaptive_max_pool2d, avg_pool2d, max_pool2d
from .upsampling import interpolate

_spaces.check_complete()  # every op declares its hyperparameter space below itself

__all__ = ["REGISTRY", "VJP_MODES", "OpInfo", "ops", "linear", "conv2d", "max_pool2d",
           "avg_pool2d", "conv_transpose2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
           "interpolate", "batch_norm", "relu", "leaky_relu", "sigmoid", "tanh", "softmax",
           "log_softmax", "dropout", "cross_entropy", "binary_cross_entropy_with_logits",
           "mse_loss",
           "layer_norm", "group_norm", "dropout2d", "gelu", "silu", "elu", "softplus", "hardtanh",
           "nll_loss", "huber_loss", "conv_formulation", "conv_formulations",
           "CONV_FORMULATIONS"]
