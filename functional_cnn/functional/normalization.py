"""Batch normalization over the channel axis: ``batch_norm``."""
from __future__ import annotations

import math
from typing import NamedTuple

from jax import lax
from jax import numpy as jnp

from .. import _checks
from ._registry import check_vjp, register, two_gradients


class NormConfig(NamedTuple):
    eps: float
    axes: tuple[int, ...]  # every axis but the channel axis 1


def _channel_shape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _affine(xhat, weight, bias):
    y = xhat if weight is None else xhat * weight.reshape(_channel_shape(xhat))
    return y if bias is None else y + bias.reshape(_channel_shape(xhat))


def _sum(cfg, t):
    return t.sum(axis=cfg.axes)


# ---------------------------------------------------------------- training: batch statistics

def _train_stats(cfg, x):
    mean = x.mean(axis=cfg.axes, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=cfg.axes, keepdims=True)  # biased, as torch normalizes
    return mean, centered, var


def _train_forward(cfg, x, weight, bias):
    mean, centered, var = _train_stats(cfg, x)
    xhat = centered * lax.rsqrt(var + cfg.eps)
    return _affine(xhat, weight, bias), mean.reshape(-1), var.reshape(-1)


def _train_fwd(cfg, x, weight, bias):
    mean, centered, var = _train_stats(cfg, x)
    invstd = lax.rsqrt(var + cfg.eps)
    xhat = centered * invstd
    out = (_affine(xhat, weight, bias), mean.reshape(-1), var.reshape(-1))
    return out, (xhat, invstd, weight, bias is None)


def _train_bwd(cfg, residuals, cotangents):
    xhat, invstd, weight, no_bias = residuals
    g, g_mean, g_var = cotangents
    count = xhat.size // xhat.shape[1]
    shape = _channel_shape(xhat)
    sum_g, sum_g_xhat = _sum(cfg, g), _sum(cfg, g * xhat)
    gamma = jnp.ones(shape, g.dtype) if weight is None else weight.reshape(shape)
    # dx is one affine map of g and xhat per channel, dx = a g + b xhat + c, with every term
    # folded into a, b, c. The batch mean and (biased) variance are outputs too:
    # d mean/dx = 1/M and d var/dx = 2 (x - mu)/M = 2 xhat / (M invstd).
    # (Saving xhat alone and folding this way halved a BatchNorm network's step on XLA:CPU
    # against saving x - mu as well and adding the terms separately.)
    a = gamma * invstd
    b = (-a * sum_g_xhat.reshape(shape) + 2 * g_var.reshape(shape) / invstd) / count
    c = (-a * sum_g.reshape(shape) + g_mean.reshape(shape)) / count
    dx = a * g + b * xhat + c
    return dx, None if weight is None else sum_g_xhat, None if no_bias else sum_g


_train_norm = two_gradients(_train_forward, _train_fwd, _train_bwd)


# ---------------------------------------------------------------- evaluation: given statistics

def _eval_forward(cfg, x, mean, var, weight, bias):
    shape = _channel_shape(x)
    xhat = (x - mean.reshape(shape)) * lax.rsqrt(var.reshape(shape) + cfg.eps)
    return _affine(xhat, weight, bias)


def _eval_fwd(cfg, x, mean, var, weight, bias):
    shape = _channel_shape(x)
    invstd = lax.rsqrt(var + cfg.eps)
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    return _affine(xhat, weight, bias), (xhat, invstd, weight, bias is None)


def _eval_bwd(cfg, residuals, g):
    xhat, invstd, weight, no_bias = residuals
    shape = _channel_shape(xhat)
    g_xhat = g if weight is None else g * weight.reshape(shape)
    dx = g_xhat * invstd.reshape(shape)
    dmean = -_sum(cfg, dx)
    dvar = -0.5 * invstd * invstd * _sum(cfg, g_xhat * xhat)
    dweight = None if weight is None else _sum(cfg, g * xhat)
    dbias = None if no_bias else _sum(cfg, g)
    return dx, dmean, dvar, dweight, dbias


_eval_norm = two_gradients(_eval_forward, _eval_fwd, _eval_bwd)


def _check_vector(where, name, v, channels):
    if v is not None and tuple(jnp.shape(v)) != (channels,):
        raise ValueError(f"{where}: expected {name} of shape ({channels},), "
                         f"got {tuple(jnp.shape(v))}")


@register()
def batch_norm(x, running_mean=None, running_var=None, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, vjp: str = "custom"):
    """Batch normalization over axis 1, ``torch.nn.functional.batch_norm`` semantics.

    Returns ``(y, new_running_mean, new_running_var)`` instead of updating buffers in place
    (the new statistics are ``None`` when none were given). With ``M`` elements per channel::

        training:  mu = mean(x),  var = mean((x - mu)^2)         (biased, used to normalize)
                   running_mean <- (1 - momentum) running_mean + momentum mu
                   running_var  <- (1 - momentum) running_var  + momentum var M / (M - 1)
        eval:      mu, var = running_mean, running_var
        y = gamma xhat + beta,   xhat = (x - mu) / sqrt(var + eps)

    Backward rule in training (statistics depend on x), with ``gx = g gamma``::

        dx     = (1 / (M sqrt(var + eps))) (M gx - sum(gx) - xhat sum(gx xhat))
        dgamma = sum(g xhat),   dbeta = sum(g)

    and in eval (statistics are inputs)::

        dx = gx / sqrt(var + eps),   dmu = -sum(dx),   dvar = -sum(gx xhat) / (2 (var + eps))

    The running statistics are state, not parameters: no gradient flows into their update.
    An empty batch (``M = 0``) normalizes nothing, leaves the running statistics as they were
    and gives ``dgamma = dbeta = 0``, as in PyTorch; ``M = 1`` in training is an error there
    and here.
    """
    where = "batch_norm"
    check_vjp(where, vjp)
    _checks.check_floating(where, x)
    if jnp.ndim(x) < 2:
        raise ValueError(f"{where}: expected an input of shape (N, C, ...), "
                         f"got shape {tuple(jnp.shape(x))}")
    channels = x.shape[1]
    for name, v in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_vector(where, name, v, channels)
    cfg = NormConfig(float(eps), (0,) + tuple(range(2, x.ndim)))
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(f"{where}: eval mode (training=False) needs running_mean and "
                             f"running_var, got None")
        return _eval_norm(vjp, cfg, x, running_mean, running_var, weight, bias), \
            running_mean, running_var
    count = math.prod(x.shape[:1] + x.shape[2:])
    if count == 1:  # as in PyTorch, which also accepts an empty batch (below)
        raise ValueError(f"{where}: training needs more than 1 value per channel, "
                         f"got input shape {tuple(x.shape)}")
    y, mean, var = _train_norm(vjp, cfg, x, weight, bias)
    if running_mean is None or running_var is None or count == 0:
        return y, running_mean, running_var
    mean, unbiased = lax.stop_gradient(mean), lax.stop_gradient(var * (count / (count - 1)))
    new_mean = (1 - momentum) * running_mean + momentum * mean.astype(running_mean.dtype)
    new_var = (1 - momentum) * running_var + momentum * unbiased.astype(running_var.dtype)
    return y, new_mean, new_var
