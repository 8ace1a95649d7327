"""Normalization over a set of axes: ``batch_norm``, ``layer_norm``, ``group_norm``.

All three normalize ``x`` by a mean and biased variance taken over some axes and then apply a
per-element affine map, so they share one op (:data:`_train_norm`) and one rule: only the
axes and the parameters' broadcast shape differ. ``batch_norm`` in eval mode, where the
statistics are inputs, has a rule of its own.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from jax import lax
from jax import numpy as jnp

from .. import _checks
from . import _spaces as S
from ._precision import accumulating
from ._registry import check_vjp, register, two_gradients


class NormConfig(NamedTuple):
    eps: float
    axes: tuple[int, ...]  # the axes the statistics are taken over


def _channel_shape(x):
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _affine(xhat, weight, bias):
    # weight and bias come in a shape that broadcasts against x (the same rank).
    y = xhat if weight is None else xhat * weight
    return y if bias is None else y + bias


def _sum(cfg, t, keepdims=False):
    return t.sum(axis=cfg.axes, keepdims=keepdims)


def _reduce_to(t, shape):
    """The transpose of broadcasting to ``t.shape``: sum ``t`` over the axes where ``shape``
    (the same rank) is 1."""
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(axis=axes, keepdims=True) if axes else t


def _constant_over(shape, axes):
    return shape is None or all(shape[a] == 1 for a in axes)


def _check_param(where, name, v, shape):
    if v is not None and tuple(jnp.shape(v)) != tuple(shape):
        raise ValueError(f"{where}: expected {name} of shape {tuple(shape)}, "
                         f"got {tuple(jnp.shape(v))}")


def _checked_input(where, x, vjp, min_rank, layout):
    check_vjp(where, vjp)
    _checks.check_floating(where, x)
    if jnp.ndim(x) < min_rank:
        raise ValueError(f"{where}: expected an input of shape {layout}, "
                         f"got shape {tuple(jnp.shape(x))}")


def _check_momentum(where, momentum):
    """A number, or a scalar array (BatchNorm2d(momentum=None) passes 1 / batches seen)."""
    scalar_array = hasattr(momentum, "dtype") and jnp.ndim(momentum) == 0
    if isinstance(momentum, bool) or not (isinstance(momentum, (int, float)) or scalar_array):
        raise ValueError(f"{where}: expected momentum a number (the running statistics' update "
                         f"weight), got {momentum!r}; BatchNorm2d(momentum=None), the "
                         f"cumulative average, passes 1 / num_batches_tracked")


def _broadcast(v, shape):
    return None if v is None else jnp.reshape(v, shape)


# ------------------------------------------------- statistics of x itself (the shared rule)

def _train_stats(cfg, x):
    x = x.astype(accumulating(x.dtype))
    mean = x.mean(axis=cfg.axes, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=cfg.axes, keepdims=True)  # biased, as torch normalizes
    return mean, centered, var


def _train_forward(cfg, x, weight, bias):
    mean, centered, var = _train_stats(cfg, x)
    xhat = centered * lax.rsqrt(var + cfg.eps)
    return _affine(xhat, weight, bias).astype(x.dtype), mean, var


def _train_fwd(cfg, x, weight, bias):
    mean, centered, var = _train_stats(cfg, x)
    invstd = lax.rsqrt(var + cfg.eps)
    xhat = centered * invstd
    # bias: its shape, and its dtype carried by a scalar (a residual must be an array)
    residuals = (xhat, invstd, weight,
                 None if bias is None else (bias.shape, jnp.zeros((), bias.dtype)))
    return (_affine(xhat, weight, bias).astype(x.dtype), mean, var), residuals


def _train_bwd(cfg, residuals, cotangents):
    xhat, invstd, weight, bias_meta = residuals
    bias_shape, bias_like = (None, None) if bias_meta is None else bias_meta
    g, g_mean, g_var = cotangents
    x_dtype, g = g.dtype, g.astype(xhat.dtype)  # y, so g, has the input's dtype
    count = math.prod(xhat.shape[a] for a in cfg.axes)
    weight_shape = None if weight is None else weight.shape
    # When gamma and beta are constant over the statistics' axes (batch_norm: per channel),
    # gamma folds into dx's per-statistic coefficients and the sums of g and g xhat serve
    # dgamma and dbeta too; otherwise (layer_norm, group_norm) dx needs the sums of gx = g gamma.
    per_stat = _constant_over(weight_shape, cfg.axes) and _constant_over(bias_shape, cfg.axes)
    gx = g if per_stat or weight is None else g * weight
    sum_gx, sum_gx_xhat = _sum(cfg, gx, True), _sum(cfg, gx * xhat, True)
    # dx is one affine map of gx and xhat per statistic, dx = a gx + b xhat + c, every term
    # folded into a, b, c. The mean and (biased) variance are outputs too:
    # d mean/dx = 1/M and d var/dx = 2 (x - mu)/M = 2 xhat / (M invstd).
    # (Saving xhat alone and folding this way halved a BatchNorm network's step on XLA:CPU
    # against saving x - mu as well and adding the terms separately.)
    a = weight * invstd if per_stat and weight is not None else invstd
    b = (-a * sum_gx_xhat + 2 * g_var / invstd) / count
    c = (-a * sum_gx + g_mean) / count
    dx = a * gx + b * xhat + c
    dweight, dbias = (sum_gx_xhat, sum_gx) if per_stat else (g * xhat, g)
    return (dx.astype(x_dtype),
            None if weight is None else _reduce_to(dweight, weight_shape).astype(weight.dtype),
            None if bias_shape is None else _reduce_to(dbias, bias_shape).astype(bias_like.dtype))


_train_norm = two_gradients(_train_forward, _train_fwd, _train_bwd)


def _normalize(vjp, cfg, x, weight, bias, param_shape):
    """``(y, mean, var)`` of the shared op, weight and bias reshaped to broadcast against x."""
    return _train_norm(vjp, cfg, x, _broadcast(weight, param_shape),
                       _broadcast(bias, param_shape))


# ---------------------------------------------------------------- evaluation: given statistics

def _eval_forward(cfg, x, mean, var, weight, bias):
    shape = _channel_shape(x)
    centered = x.astype(accumulating(x.dtype)) - mean.reshape(shape)
    xhat = centered * lax.rsqrt(var.reshape(shape) + cfg.eps)
    return _affine(xhat, weight, bias).astype(x.dtype)  # the input's dtype, as in training


def _eval_fwd(cfg, x, mean, var, weight, bias):
    shape = _channel_shape(x)
    invstd = lax.rsqrt(var + cfg.eps)
    xhat = (x.astype(accumulating(x.dtype)) - mean.reshape(shape)) * invstd.reshape(shape)
    # the mean's and the bias's dtypes, each carried by a scalar (a residual must be an array)
    dtypes = (jnp.zeros((), mean.dtype), None if bias is None else jnp.zeros((), bias.dtype))
    return _affine(xhat, weight, bias).astype(x.dtype), (xhat, invstd, weight, dtypes)


def _eval_bwd(cfg, residuals, g):
    xhat, invstd, weight, (mean_like, bias_like) = residuals
    shape = _channel_shape(xhat)
    x_dtype, g = g.dtype, g.astype(xhat.dtype)  # y, so g, has the input's dtype
    g_xhat = g if weight is None else g * weight
    dx = g_xhat * invstd.reshape(shape)
    dmean = -_sum(cfg, dx)
    dvar = -0.5 * invstd * invstd * _sum(cfg, g_xhat * xhat)
    dweight = None if weight is None else _sum(cfg, g * xhat, True).astype(weight.dtype)
    dbias = None if bias_like is None else _sum(cfg, g, True).astype(bias_like.dtype)
    return (dx.astype(x_dtype), dmean.astype(mean_like.dtype), dvar.astype(invstd.dtype),
            dweight, dbias)


_eval_norm = two_gradients(_eval_forward, _eval_fwd, _eval_bwd)


# ---------------------------------------------------------------- public ops

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

    Backward rule in training (statistics depend on x; the rule layer_norm and group_norm
    share), with ``gx = g gamma``::

        dx     = (1 / (M sqrt(var + eps))) (M gx - sum(gx) - xhat sum(gx xhat))
        dgamma = sum(g xhat),   dbeta = sum(g)

    and in eval (statistics are inputs)::

        dx = gx / sqrt(var + eps),   dmu = -sum(dx),   dvar = -sum(gx xhat) / (2 (var + eps))

    The running statistics are state, not parameters: no gradient flows into their update.
    Smooth (``eps > 0``): both paths give the derivative everywhere, also for a constant
    channel (zero variance, ``xhat = 0``).
    An empty batch in training gives an empty output and keeps the running statistics, as
    PyTorch; a single value per channel is an error, as in PyTorch.
    """
    where = "batch_norm"
    _checked_input(where, x, vjp, 2, "(N, C, ...)")
    channels = x.shape[1]
    for name, v in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_param(where, name, v, (channels,))
    cfg = NormConfig(float(eps), (0,) + tuple(range(2, x.ndim)))
    param_shape = _channel_shape(x)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(f"{where}: eval mode (training=False) needs running_mean and "
                             f"running_var, got None")
        return _eval_norm(vjp, cfg, x, running_mean, running_var,
                          _broadcast(weight, param_shape), _broadcast(bias, param_shape)), \
            running_mean, running_var
    count = math.prod(n for axis, n in enumerate(x.shape) if axis != 1)
    if count == 0:  # an empty batch: an empty output, the running statistics kept (as torch)
        empty = _affine(x, _broadcast(weight, param_shape), _broadcast(bias, param_shape))
        return empty.astype(x.dtype), running_mean, running_var
    if count < 2:
        raise ValueError(f"{where}: training needs more than 1 value per channel, "
                         f"got input shape {tuple(x.shape)}")
    y, mean, var = _normalize(vjp, cfg, x, weight, bias, param_shape)
    if running_mean is None or running_var is None:
        return y, running_mean, running_var
    return (y, *_running_update(where, momentum, running_mean, running_var, mean, var, count))


def _running_update(where, momentum, running_mean, running_var, mean, var, count: int):
    """The running statistics moved towards the batch's (its variance unbiased), outside any
    gradient. Only this reads ``momentum`` (eval may pass None: BatchNorm2d(momentum=None))."""
    _check_momentum(where, momentum)
    mean = lax.stop_gradient(mean.reshape(-1))
    unbiased = lax.stop_gradient(var.reshape(-1) * (count / (count - 1)))
    return ((1 - momentum) * running_mean + momentum * mean.astype(running_mean.dtype),
            (1 - momentum) * running_var + momentum * unbiased.astype(running_var.dtype))


def normalized_shape_tuple(where, normalized_shape) -> tuple[int, ...]:
    """``normalized_shape`` (an int or a sequence of ints, as PyTorch takes it) as a tuple."""
    shape = ((normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else
             tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else ())
    if not shape or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool)
                            and n >= 1 for n in shape):
        raise ValueError(f"{where}: normalized_shape must be a positive int or a non-empty "
                         f"sequence of positive ints, got {normalized_shape!r}")
    return tuple(int(n) for n in shape)


@register()
def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, vjp: str = "custom"):
    """Layer normalization over the last ``len(normalized_shape)`` axes,
    ``torch.nn.functional.layer_norm`` semantics.

    Each sample is normalized by the mean and biased variance of its last axes (``M`` values)::

        xhat = (x - mean(x)) / sqrt(var(x) + eps),   y = weight xhat + bias

    with ``weight`` and ``bias`` of shape ``normalized_shape`` (elementwise, not per channel).

    Backward rule (batch_norm's training rule over these axes), with ``gx = g weight``::

        dx      = (1 / (M sqrt(var + eps))) (M gx - sum(gx) - xhat sum(gx xhat))
        dweight = sum over the leading axes of g xhat,   dbias = the same sum of g
    Smooth (``eps > 0``): both paths give the derivative everywhere, also for a constant
    row (zero variance).
    """
    where = "layer_norm"
    shape = normalized_shape_tuple(where, normalized_shape)
    _checked_input(where, x, vjp, len(shape), f"(..., {', '.join(map(str, shape))})")
    lead = x.ndim - len(shape)
    if tuple(x.shape[lead:]) != shape:
        raise ValueError(f"{where}: expected an input whose last {len(shape)} axes are "
                         f"normalized_shape {shape}, got shape {tuple(x.shape)}")
    _check_param(where, "weight", weight, shape)
    _check_param(where, "bias", bias, shape)
    cfg = NormConfig(float(eps), tuple(range(lead, x.ndim)))
    return _normalize(vjp, cfg, x, weight, bias, (1,) * lead + shape)[0]


@register()
def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, vjp: str = "custom"):
    """Group normalization, ``torch.nn.functional.group_norm`` semantics.

    The ``C`` channels of ``x (N, C, ...)`` split into ``num_groups`` groups of ``C / G``
    consecutive channels; each sample's group is normalized by the mean and biased variance of
    its ``M = (C / G) * prod(spatial)`` values, then scaled and shifted per channel::

        xhat = (x - mean) / sqrt(var + eps),   y = weight[c] xhat + bias[c]

    Backward rule (batch_norm's training rule over the grouped axes of the input viewed as
    ``(N, G, C / G, ...)``), with ``gx = g weight[c]``::

        dx = (1 / (M sqrt(var + eps))) (M gx - sum(gx) - xhat sum(gx xhat))   per group
        dweight[c] = sum over N and space of g xhat,   dbias[c] = the same sum of g
    Smooth (``eps > 0``): both paths give the derivative everywhere, also for a constant
    group (zero variance).
    """
    where = "group_norm"
    _checked_input(where, x, vjp, 2, "(N, C, ...)")
    channels = x.shape[1]
    if (not isinstance(num_groups, (int, np.integer)) or isinstance(num_groups, bool)
            or num_groups < 1 or channels % num_groups):
        raise ValueError(f"{where}: num_groups={num_groups!r} must be a positive int dividing "
                         f"the {channels} channels of the input (shape {tuple(x.shape)})")
    _check_param(where, "weight", weight, (channels,))
    _check_param(where, "bias", bias, (channels,))
    spatial = tuple(x.shape[2:])
    if x.shape[0] * (channels // num_groups) * math.prod(spatial) == 1:  # PyTorch's test
        raise ValueError(f"{where}: expected more than 1 value per group and batch (as "
                         f"PyTorch), got num_groups={num_groups} for input shape "
                         f"{tuple(x.shape)}")
    grouped_shape = (x.shape[0], int(num_groups), channels // num_groups) + spatial
    cfg = NormConfig(float(eps), tuple(range(2, len(grouped_shape))))
    param_shape = (1,) + grouped_shape[1:3] + (1,) * len(spatial)
    y = _normalize(vjp, cfg, jnp.reshape(x, grouped_shape), weight, bias, param_shape)[0]
    return jnp.reshape(y, x.shape)


# ------------------------------------------------ hyperparameter spaces (tests, audit)

def _batch_norm_case(rng, c, dtype):
    ch = c["channels"]
    x = S.normal(rng, (c["batch"], ch) + tuple(c["size"]), dtype, 2.0) + np.asarray(1.5, dtype)
    stats = {"running_mean": S.normal(rng, (ch,), dtype),
             "running_var": (rng.uniform(0.5, 2.0, ch)).astype(dtype)}
    affine = {"weight": S.normal(rng, (ch,), dtype), "bias": S.normal(rng, (ch,), dtype)}
    inputs = {"x": x, **(affine if c["affine"] else {})}
    # Statistics are differentiable inputs in eval mode only (in training they are state).
    if not c["training"]:
        inputs.update(stats)
    names = list(inputs)
    kw = dict(training=c["training"], momentum=c["momentum"], eps=c["eps"])

    def statistics(given, fresh):
        # Training updates the statistics (torch in place: give it copies); eval reads them.
        if c["training"]:
            return tuple(fresh(stats[k]) for k in stats)
        return given["running_mean"], given["running_var"]

    def call(*args, vjp="custom"):
        given = dict(zip(names, args))
        mean, var = statistics(given, jnp.asarray)
        return batch_norm(given["x"], mean, var, given.get("weight"), given.get("bias"),
                            vjp=vjp, **kw)

    def torch_call(torch, *args):
        given = dict(zip(names, args))
        mean, var = statistics(given, lambda a: torch.tensor(np.array(a)))
        if c["training"]:
            y = torch.nn.functional.batch_norm(given["x"], mean, var, given.get("weight"),
                                               given.get("bias"), **kw)
            return y, mean, var
        # torch's batch_norm does not differentiate w.r.t. running statistics: spell it out.
        shape = (1, ch) + (1,) * len(c["size"])
        y = (given["x"] - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + c["eps"])
        if c["affine"]:
            y = y * given["weight"].reshape(shape) + given["bias"].reshape(shape)
        return y, mean, var

    return S.Case("batch_norm", c, inputs, call, torch_call)


_AFFINE = {"both": ("weight", "bias"), "weight": ("weight",), "bias": ("bias",), "none": ()}


def _affine_norm_case(name, x_shape, param_shape, extra):
    """Builder for layer_norm / group_norm: ``x``, the ``weight``/``bias`` that ``affine`` names
    (differentiable), and the op's second argument ``extra(config)``."""
    def build(rng, c, dtype):
        x = S.normal(rng, x_shape(c), dtype, 2.0) + np.asarray(1.5, dtype)
        inputs = {"x": x, **{k: S.normal(rng, param_shape(c), dtype) for k in _AFFINE[c["affine"]]}}
        names = list(inputs)

        def args(values):
            given = dict(zip(names, values))
            return given["x"], extra(c), given.get("weight"), given.get("bias"), c["eps"]

        fn = S.op(name)
        return S.Case(name, c, inputs, lambda *a, vjp="custom": fn(*args(a), vjp=vjp),
                    lambda torch, *a: getattr(torch.nn.functional, name)(*args(a)))
    return build


def _trailing(c):
    return tuple(c["shape"][len(c["shape"]) - c["normalized_dims"]:])


def _grouped_input(c):
    return (c["batch"], c["channels"]) + tuple(c["size"])


_NORM_EPS = (1e-5, 1e-3)


_AFFINES = tuple(_AFFINE)


S.register_space(
    "batch_norm",
    dict(batch=(4, 1, 2), channels=(3, 1), size=((5, 4), (1, 2), (3, 3)),
         training=(True, False), affine=(True, False), momentum=(0.1, 0.5),
         eps=(1e-5, 1e-3)),
    _batch_norm_case,
    ({"training": False}, {"batch": 1, "size": (1, 2)}, {"affine": False}))

S.register_space(
    "layer_norm",
    # no (..., 1) rows in the sampled space: one value per row makes xhat 0, where torch's
    # float32 weight gradient is rounding noise of 1e-5 and ours exactly 0 (the edge case
    # (3, 1) below checks that row without affine parameters)
    dict(shape=((2, 3, 4), (1, 5), (2, 3, 4, 5), (3, 2)), normalized_dims=(1, 2),
         affine=_AFFINES, eps=_NORM_EPS),
    _affine_norm_case("layer_norm", lambda c: tuple(c["shape"]), _trailing, _trailing),
    ({"shape": (2, 3, 4, 5), "normalized_dims": 2}, {"affine": "bias"},
     {"affine": "weight", "shape": (1, 5)}, {"shape": (3, 1), "affine": "none"}))

# Never one value per group here: torch's float32 output is then off by ~1e-5 (its
# x * scale + shift cancels), where ours is exactly beta (test_normalization checks).
S.register_space(
    "group_norm",
    dict(batch=(2, 1), channels=(6, 4), groups=(2, 3, 1), size=((3, 4), (5,), ()),
         affine=_AFFINES, eps=_NORM_EPS),
    _affine_norm_case("group_norm", _grouped_input, lambda c: (c["channels"],),
                      lambda c: c["groups"]),
    ({"groups": 1, "size": (5,)}, {"groups": 6, "affine": "weight"},
     {"batch": 1, "channels": 4, "groups": 2, "affine": "bias"},
     {"groups": 3, "size": ()}))
