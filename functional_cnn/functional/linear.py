"""Affine map on the last axis: ``linear``."""
from __future__ import annotations

import math

from jax import lax
from jax import numpy as jnp

from .. import _checks
from . import _spaces as S
from ._registry import check_vjp, register, two_gradients


def _forward(config, x, weight, bias):
    y = lax.dot_general(x, weight, (((x.ndim - 1,), (1,)), ((), ())))
    return y if bias is None else y + bias


def _fwd(config, x, weight, bias):
    return _forward(config, x, weight, bias), (x, weight, bias is None)


def _bwd(config, residuals, g):
    x, weight, no_bias = residuals
    dx = lax.dot_general(g, weight, (((g.ndim - 1,), (0,)), ((), ())))
    rows = math.prod(g.shape[:-1])  # not -1: a reshape cannot infer it beside 0 features
    rows_g = g.reshape(rows, g.shape[-1])
    rows_x = x.reshape(rows, x.shape[-1])
    dweight = lax.dot_general(rows_g, rows_x, (((0,), (0,)), ((), ())))
    dbias = None if no_bias else rows_g.sum(axis=0)
    return dx, dweight, dbias


_linear = two_gradients(_forward, _fwd, _bwd)


@register()
def linear(x, weight, bias=None, *, vjp: str = "custom"):
    """``y = x W^T + b`` over the last axis (``torch.nn.functional.linear``).

    Shapes: ``x (..., in)``, ``weight (out, in)``, ``bias (out,)``, ``y (..., out)``.

    Backward rule, with all leading axes flattened into rows ``m``::

        dx = g W                     (..., out) @ (out, in)
        dW = sum_m g[m]^T x[m]       (out, in)
        db = sum_m g[m]              (out,)

    Linear in each input: no kinks, both paths give the one derivative.
    """
    check_vjp("linear", vjp)
    _checks.check_weighted_input("linear", x, weight, bias)
    if weight.ndim != 2:
        raise ValueError(f"linear: expected a 2-D weight (out, in), got shape {weight.shape}")
    if x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: expected input with last axis {weight.shape[1]} "
                         f"(weight {tuple(weight.shape)}), got shape {tuple(jnp.shape(x))}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear: expected bias of shape ({weight.shape[0]},), "
                         f"got {tuple(bias.shape)}")
    return _linear(vjp, None, x, weight, bias)


# ------------------------------------------------ hyperparameter spaces (tests, audit)

def _linear_case(rng, c, dtype):
    x = S.normal(rng, tuple(c["batch_shape"]) + (c["in_features"],), dtype)
    w = S.normal(rng, (c["out_features"], c["in_features"]), dtype)
    inputs = {"x": x, "weight": w}
    if c["bias"]:
        inputs["bias"] = S.normal(rng, (c["out_features"],), dtype)
    return S.Case("linear", c, inputs,
                lambda x, w, b=None, vjp="custom": linear(x, w, b, vjp=vjp),
                lambda torch, x, w, b=None: torch.nn.functional.linear(x, w, b))


S.register_space(
    "linear",
    dict(batch_shape=((4,), (1,), (2, 3)), in_features=(5, 1, 8), out_features=(4, 1),
         bias=(True, False)),
    _linear_case,
    ({"batch_shape": (1,)}, {"in_features": 1, "out_features": 1, "bias": False}))
