"""Layers: ``(init, apply)`` pairs with PyTorch semantics, parameter names and layouts.

A layer is a :class:`Layer`::

    init(key, input_shape) -> (output_shape, params, state)
    apply(params, state, x, *, train=False, key=None, vjp="custom") -> (y, new_state)

Shapes are inferred at ``init`` (constructors take no input sizes); the batch axis of
``input_shape`` may be ``-1``. ``params`` and ``state`` are dicts of arrays named as in PyTorch
(``weight``, ``bias``, ``running_mean``, ``running_var``), so a torch ``state_dict`` copies across
unchanged (see :mod:`functional_cnn.interop`). Every array op comes from
:mod:`functional_cnn.functional`, where its backward rule lives.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
from jax import numpy as jnp

from . import _checks
from . import functional as F
from .functional._registry import check_vjp
from .functional.conv import conv_config
from .functional.pooling import pool_axes


class Layer(NamedTuple):
    """A layer: ``init(key, input_shape)`` and ``apply(params, state, x, *, train, key, vjp)``."""

    init: Callable
    apply: Callable


def _uniform(key, shape, fan_in):
    # PyTorch's default for Linear and Conv2d (kaiming_uniform with a=sqrt(5), and the bias):
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def _layer(where: str, init: Callable, apply: Callable, params: tuple[str, ...] = (),
           state: tuple[str, ...] = (), needs_key: bool = False) -> Layer:
    """``Layer(init, apply)`` behind the checks every layer shares, so that a wrong argument is
    reported by name before the layer's own code reads it: ``init`` gets an input shape (and a
    PRNG key where it draws parameters), ``apply`` gets params and state dicts with exactly the
    names ``init`` gives them (``params``, ``state``). The layers check their arrays' shapes."""

    def checked_init(key, input_shape):
        shape = _checks.check_input_shape(where, input_shape)
        if needs_key:
            _checks.check_key(where, key)
        return init(key, shape)

    def checked_apply(layer_params, layer_state, x, **kwargs):
        _checks.check_keys(where, "params", layer_params, params)
        _checks.check_keys(where, "state", layer_state, state)
        return apply(layer_params, layer_state, x, **kwargs)

    return Layer(checked_init, checked_apply)


def _checked_input(where, x, vjp, ranks, layout):
    check_vjp(where, vjp)
    _checks.check_floating(where, x)
    _checks.check_rank(where, jnp.shape(x), ranks, layout)


def elementwise(where: str, fn: Callable) -> Layer:
    """A parameter-free, shape-preserving layer applying ``fn(x, vjp=...)``."""

    def init(key, input_shape):
        return tuple(input_shape), {}, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        check_vjp(where, vjp)
        return fn(x, vjp=vjp), state

    return _layer(where, init, apply)


def Identity() -> Layer:
    """Returns its input (``torch.nn.Identity``)."""
    return elementwise("Identity", lambda x, vjp: x)


def ReLU() -> Layer:
    return elementwise("ReLU", F.relu)


def LeakyReLU(negative_slope: float = 0.01) -> Layer:
    return elementwise("LeakyReLU", lambda x, vjp: F.leaky_relu(x, negative_slope, vjp=vjp))


def Sigmoid() -> Layer:
    return elementwise("Sigmoid", F.sigmoid)


def Tanh() -> Layer:
    return elementwise("Tanh", F.tanh)


def Softmax(dim: int = -1) -> Layer:
    return elementwise("Softmax", lambda x, vjp: F.softmax(x, dim, vjp=vjp))


def LogSoftmax(dim: int = -1) -> Layer:
    return elementwise("LogSoftmax", lambda x, vjp: F.log_softmax(x, dim, vjp=vjp))


def _param_names(bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


def Linear(out_features: int, bias: bool = True) -> Layer:
    """``y = x W^T + b`` on the last axis; params ``weight (out, in)``, ``bias (out,)``."""
    where = "Linear"

    def init(key, input_shape):
        if len(input_shape) < 1:
            raise ValueError(f"{where}: expected an input with a feature axis, got shape ()")
        in_features = input_shape[-1]
        w_key, b_key = jax.random.split(key)
        params = {"weight": _uniform(w_key, (out_features, in_features), in_features)}
        if bias:
            params["bias"] = _uniform(b_key, (out_features,), in_features)
        return tuple(input_shape[:-1]) + (out_features,), params, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        check_vjp(where, vjp)
        _checks.check_floating(where, x)
        _checks.check_shape(where, "params 'weight'", params["weight"], (out_features, None))
        in_features = params["weight"].shape[1]
        if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != in_features:
            raise ValueError(f"{where}: expected {in_features} input features on the last axis "
                             f"(as at init), got input shape {tuple(jnp.shape(x))}")
        if bias:
            _checks.check_shape(where, "params 'bias'", params["bias"], (out_features,))
        return F.linear(x, params["weight"], params.get("bias"), vjp=vjp), state

    return _layer(where, init, apply, _param_names(bias), needs_key=True)


def Conv2d(out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
           bias: bool = True) -> Layer:
    """2-D convolution on NCHW input; params ``weight (O, C/groups, kh, kw)``, ``bias (O,)``.

    ``padding`` is an int, a pair, ``"same"`` (stride 1 only) or ``"valid"``.
    """
    where = "Conv2d"
    kernel = _checks.int_pair(where, "kernel_size", kernel_size)

    def init(key, input_shape):
        _checks.check_rank(where, input_shape, (4,), "(N, C, H, W)")
        in_channels = input_shape[1]
        if not isinstance(groups, int) or groups < 1 or in_channels % groups:
            raise ValueError(f"{where}: groups={groups!r} must be a positive int dividing "
                             f"in_channels={in_channels} and out_channels={out_channels}")
        w_shape = (out_channels, in_channels // groups) + kernel
        cfg = conv_config(where, input_shape, w_shape, stride, padding, dilation, groups)
        fan_in = (in_channels // groups) * kernel[0] * kernel[1]
        w_key, b_key = jax.random.split(key)
        params = {"weight": _uniform(w_key, w_shape, fan_in)}
        if bias:
            params["bias"] = _uniform(b_key, (out_channels,), fan_in)
        out_shape = (input_shape[0], out_channels) + tuple(a.out_size for a in cfg.axes)
        return out_shape, params, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        _checked_input(where, x, vjp, (4,), "(N, C, H, W)")
        w = params["weight"]
        _checks.check_shape(where, "params 'weight'", w, (out_channels, None) + kernel)
        _checks.check_channels(where, jnp.shape(x), w.shape[1] * groups, context="(as at init)")
        if bias:
            _checks.check_shape(where, "params 'bias'", params["bias"], (out_channels,))
        conv_config(where, jnp.shape(x), w.shape, stride, padding, dilation, groups)
        return F.conv2d(x, w, params.get("bias"), stride, padding, dilation, groups,
                        vjp=vjp), state

    return _layer(where, init, apply, _param_names(bias), needs_key=True)


def _pool(where: str, fn: Callable, kernel_size, stride, padding, dilation, ceil_mode) -> Layer:
    def geometry(shape):
        _checks.check_rank(where, shape, (4,), "(N, C, H, W)")
        return pool_axes(where, shape, kernel_size, stride, padding, dilation, ceil_mode)

    def init(key, input_shape):
        axes = geometry(input_shape)
        return tuple(input_shape[:2]) + tuple(a.out_size for a in axes), {}, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        _checked_input(where, x, vjp, (4,), "(N, C, H, W)")
        geometry(jnp.shape(x))
        return fn(x, vjp), state

    return _layer(where, init, apply)


def MaxPool2d(kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> Layer:
    """Max pooling on NCHW input; the gradient goes to the first maximum of each window."""
    return _pool("MaxPool2d",
                 lambda x, vjp: F.max_pool2d(x, kernel_size, stride, padding, dilation,
                                             ceil_mode, vjp=vjp),
                 kernel_size, stride, padding, dilation, ceil_mode)


def AvgPool2d(kernel_size, stride=None, padding=0, ceil_mode: bool = False,
              count_include_pad: bool = True) -> Layer:
    """Average pooling on NCHW input."""
    return _pool("AvgPool2d",
                 lambda x, vjp: F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode,
                                             count_include_pad, vjp=vjp),
                 kernel_size, stride, padding, 1, ceil_mode)


def BatchNorm2d(eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                track_running_stats: bool = True) -> Layer:
    """Batch normalization over the channels of NCHW input.

    params ``{"weight", "bias"}`` when ``affine``; state ``{"running_mean", "running_var"}``
    when ``track_running_stats``. ``apply(train=True)`` normalizes with the batch statistics and
    returns the running statistics updated as PyTorch does (the variance unbiased);
    ``train=False`` normalizes with the running statistics. ``momentum=None`` is PyTorch's
    cumulative average; the state then also counts ``num_batches_tracked``.
    """
    where = "BatchNorm2d"

    def init(key, input_shape):
        _checks.check_rank(where, input_shape, (4,), "(N, C, H, W)")
        channels = input_shape[1]
        params = {"weight": jnp.ones(channels), "bias": jnp.zeros(channels)} if affine else {}
        state = {}
        if track_running_stats:
            state = {"running_mean": jnp.zeros(channels), "running_var": jnp.ones(channels)}
            if momentum is None:
                state["num_batches_tracked"] = jnp.zeros((), jnp.int32)
        return tuple(input_shape), params, state

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        _checked_input(where, x, vjp, (4,), "(N, C, H, W)")
        _check_per_channel(where, x, params, state)
        use_batch_stats = train or not track_running_stats
        new_state = dict(state)
        rate = momentum
        if track_running_stats and train and momentum is None:
            new_state["num_batches_tracked"] = state["num_batches_tracked"] + 1
            rate = 1.0 / new_state["num_batches_tracked"]
        y, mean, var = F.batch_norm(
            x, state.get("running_mean"), state.get("running_var"), params.get("weight"),
            params.get("bias"), training=use_batch_stats, momentum=rate, eps=eps, vjp=vjp)
        if track_running_stats and train:
            new_state.update(running_mean=mean, running_var=var)
        return y, new_state

    state_names = ()
    if track_running_stats:
        state_names = ("running_mean", "running_var")
        state_names += ("num_batches_tracked",) if momentum is None else ()
    return _layer(where, init, apply, ("weight", "bias") if affine else (), state_names)


def _check_per_channel(where, x, params, state) -> None:
    """BatchNorm2d's params and running statistics: one value per channel of ``x``, and
    ``num_batches_tracked`` a scalar. The first vector sets the channels seen at init."""
    vectors = {f"params {k!r}": params[k] for k in params}
    vectors.update({f"state {k!r}": state[k] for k in ("running_mean", "running_var")
                    if k in state})
    for name, v in vectors.items():
        _checks.check_shape(where, name, v, (None,))
    if vectors:
        channels = next(iter(vectors.values())).shape[0]
        _checks.check_channels(where, jnp.shape(x), channels, context="(as at init)")
        for name, v in vectors.items():
            _checks.check_shape(where, name, v, (channels,))
    if "num_batches_tracked" in state:
        _checks.check_shape(where, "state 'num_batches_tracked'", state["num_batches_tracked"], ())


def Flatten(start_dim: int = 1, end_dim: int = -1) -> Layer:
    """Merge axes ``start_dim..end_dim`` into one (``torch.nn.Flatten``)."""
    where = "Flatten"

    def flat_shape(shape):
        n = len(shape)
        lo, hi = start_dim % max(n, 1), end_dim % max(n, 1)
        if not (-n <= start_dim < n and -n <= end_dim < n) or lo > hi:
            raise ValueError(f"{where}: start_dim={start_dim}, end_dim={end_dim} do not name a "
                             f"range of axes of an input of shape {tuple(shape)}")
        merged = shape[lo:hi + 1]
        size = -1 if any(d < 0 for d in merged) else math.prod(merged)
        return tuple(shape[:lo]) + (size,) + tuple(shape[hi + 1:])

    def init(key, input_shape):
        return flat_shape(tuple(input_shape)), {}, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        check_vjp(where, vjp)
        return jnp.reshape(x, flat_shape(jnp.shape(x))), state

    return _layer(where, init, apply)


def Dropout(p: float = 0.5) -> Layer:
    """Inverted dropout in train mode (needs ``key``), identity in eval mode."""
    where = "Dropout"
    _checks.check_probability(where, "p", p)

    def init(key, input_shape):
        return tuple(input_shape), {}, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        check_vjp(where, vjp)
        if train and 0 < p < 1 and key is None:
            raise ValueError(f"{where}: apply(train=True) needs a PRNG key (key=...), got None")
        return F.dropout(x, p, train, key=key, vjp=vjp), state

    return _layer(where, init, apply)
