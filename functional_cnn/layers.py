"""Layers: ``(init, apply)`` pairs with PyTorch semantics, parameter names and layouts.

A layer is a :class:`Layer`::

    init(key, input_shape) -> (output_shape, params, state)
    apply(params, state, x, *, train=False, key=None, vjp="custom") -> (y, new_state)

Shapes are inferred at ``init`` (constructors take no input sizes); the batch axis of
``input_shape`` may be ``-1``. ``params`` and ``state`` are dicts of arrays named as in PyTorch
(``weight``, ``bias``, ``running_mean``, ``running_var``), so a torch ``state_dict`` copies across
unchanged (see :mod:`functional_cnn.interop`). Every array op comes from
:mod:`functional_cnn.functional`, where its backward rule lives. Each constructor is decorated
with :func:`named_layer`, so ``layer.name`` (and ``repr(layer)``) repeats the call that built it;
decorate new constructors too.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Callable, NamedTuple

import jax
from jax import numpy as jnp

from . import _checks
from . import functional as F
from .functional._registry import check_vjp
from .functional.conv import conv_config, conv_transpose_config, with_formulation
from .functional.normalization import normalized_shape_tuple
from .functional.pooling import adaptive_config, pool_axes
from .functional.upsampling import interp_config, interp_options


class _InitApply(NamedTuple):
    init: Callable
    apply: Callable


class Layer(_InitApply):
    """A layer: ``init(key, input_shape)`` and ``apply(params, state, x, *, train, key, vjp)``.

    Still the ``(init, apply)`` pair of ``stax``: ``init, apply = layer`` unpacks it, and it
    compares, hashes and indexes as that 2-tuple. Three attributes ride outside the tuple, so
    they cannot break unpacking: ``name``, a torch-like repr of the call that built it
    (``Conv2d(6, kernel_size=5, padding=2)``; see :func:`named_layer`); ``children``, the child
    layers of a combinator, in the order of its params tuple; ``wiring``, how a combinator feeds
    its children (``"serial"``: each the previous one's output; ``"parallel"``: the i-th the i-th
    input; ``None``: not described). :func:`functional_cnn.summary` walks them. The attributes are
    read-only; ``_replace`` returns a copy with any of the five changed.
    """

    def __new__(cls, init: Callable, apply: Callable, name: str = "Layer",
                children: tuple = (), wiring: str | None = None):
        layer = super().__new__(cls, init, apply)
        layer.__dict__.update(name=name, children=tuple(children), wiring=wiring)
        return layer

    def __setattr__(self, attr, value):
        raise AttributeError(f"Layer is immutable: use layer._replace({attr}=...)")

    @classmethod
    def _make(cls, iterable):
        return cls(*iterable)

    def _replace(self, **changes) -> "Layer":
        fields = dict(init=self.init, apply=self.apply, name=self.name, children=self.children,
                      wiring=self.wiring)
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"Layer._replace: unknown fields {sorted(unknown)}; "
                            f"expected some of {list(fields)}")
        return type(self)(**{**fields, **changes})

    def __repr__(self) -> str:
        if not self.children:
            return self.name
        return f"{self.name}({', '.join(map(repr, self.children))})"


def _call_repr(signature: inspect.Signature, bound: inspect.BoundArguments) -> str:
    """The arguments of a call as torch prints them: a required first argument positionally,
    the others as ``name=value``, those equal to their default (same type and value) left out."""
    parts = []
    for i, (arg, value) in enumerate(bound.arguments.items()):
        default = signature.parameters[arg].default
        if i == 0 and default is inspect.Parameter.empty:
            parts.append(repr(value))
        elif not (type(value) is type(default) and value == default):
            parts.append(f"{arg}={value!r}")
    return ", ".join(parts)


def named_layer(constructor: Callable[..., Layer]) -> Callable[..., Layer]:
    """Decorate a layer constructor so its layers are named after the call that built them:
    ``Conv2d(6, 5, padding=2).name == "Conv2d(6, kernel_size=5, padding=2)"``."""
    signature = inspect.signature(constructor)

    @functools.wraps(constructor)
    def build(*args, **kwargs) -> Layer:
        layer = constructor(*args, **kwargs)
        call = _call_repr(signature, signature.bind(*args, **kwargs))
        return layer._replace(name=f"{constructor.__name__}({call})")

    return build


def _uniform(key, shape, fan_in):
    # PyTorch's default for Linear and Conv2d (kaiming_uniform with a=sqrt(5), and the bias):
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


@contextlib.contextmanager
def _errors_named(where: str, op: str):
    """Input errors of the functional ``op``, which name it, re-raised naming the layer.

    A layer checks only what is its own (the rank it takes, sizes as at init); the op checks
    the rest (``vjp``, dtype, geometry) once, and the message still names the layer."""
    try:
        yield
    except (ValueError, TypeError) as err:
        if not str(err).startswith(f"{op}: "):
            raise
        raise type(err)(f"{where}: {str(err)[len(op) + 2:]}") from err


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



def elementwise(where: str, fn: Callable) -> Layer:
    """A parameter-free, shape-preserving layer applying ``fn(x, vjp=...)``."""

    def init(key, input_shape):
        return tuple(input_shape), {}, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        check_vjp(where, vjp)
        return fn(x, vjp=vjp), state

    return _layer(where, init, apply)


@named_layer
def Identity() -> Layer:
    """Returns its input (``torch.nn.Identity``)."""
    return elementwise("Identity", lambda x, vjp: x)


@named_layer
def ReLU() -> Layer:
    return elementwise("ReLU", F.relu)


@named_layer
def LeakyReLU(negative_slope: float = 0.01) -> Layer:
    return elementwise("LeakyReLU", lambda x, vjp: F.leaky_relu(x, negative_slope, vjp=vjp))


@named_layer
def Sigmoid() -> Layer:
    return elementwise("Sigmoid", F.sigmoid)


@named_layer
def Tanh() -> Layer:
    return elementwise("Tanh", F.tanh)


@named_layer
def Softmax(dim: int = -1) -> Layer:
    return elementwise("Softmax", lambda x, vjp: F.softmax(x, dim, vjp=vjp))


@named_layer
def LogSoftmax(dim: int = -1) -> Layer:
    return elementwise("LogSoftmax", lambda x, vjp: F.log_softmax(x, dim, vjp=vjp))


def _param_names(bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


@named_layer
def GELU(approximate: str = "none") -> Layer:
    """``x Phi(x)`` (``approximate="none"``, with erf) or its tanh approximation."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
    return elementwise("GELU", lambda x, vjp: F.gelu(x, approximate, vjp=vjp))


@named_layer
def SiLU() -> Layer:
    return elementwise("SiLU", F.silu)


@named_layer
def ELU(alpha: float = 1.0) -> Layer:
    return elementwise("ELU", lambda x, vjp: F.elu(x, alpha, vjp=vjp))


@named_layer
def Softplus(beta: float = 1.0, threshold: float = 20.0) -> Layer:
    if beta == 0:
        raise ValueError("Softplus: beta must be nonzero (it divides), got 0")
    return elementwise("Softplus", lambda x, vjp: F.softplus(x, beta, threshold, vjp=vjp))


@named_layer
def Hardtanh(min_val: float = -1.0, max_val: float = 1.0) -> Layer:
    if min_val > max_val:
        raise ValueError(f"Hardtanh: min_val must not exceed max_val, got min_val={min_val!r}, "
                         f"max_val={max_val!r}")
    return elementwise("Hardtanh", lambda x, vjp: F.hardtanh(x, min_val, max_val, vjp=vjp))


@named_layer
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
        _checks.check_shape(where, "params 'weight'", params["weight"], (out_features, None))
        in_features = params["weight"].shape[1]
        if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != in_features:
            raise ValueError(f"{where}: expected {in_features} input features on the last axis "
                             f"(as at init), got input shape {tuple(jnp.shape(x))}")
        if bias:
            _checks.check_shape(where, "params 'bias'", params["bias"], (out_features,))
        with _errors_named(where, "linear"):
            return F.linear(x, params["weight"], params.get("bias"), vjp=vjp), state

    return _layer(where, init, apply, _param_names(bias), needs_key=True)


@named_layer
def Conv2d(out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
           bias: bool = True, train_formulation: str | None = None,
           eval_formulation: str | None = None) -> Layer:
    """2-D convolution on NCHW input; params ``weight (O, C/groups, kh, kw)``, ``bias (O,)``.

    ``padding`` is an int, a pair, ``"same"`` (stride 1 only) or ``"valid"``.

    ``train_formulation`` pins how :func:`functional_cnn.functional.conv2d` computes the
    convolution in training (``train=True``), ``eval_formulation`` in evaluation (None: conv2d
    chooses per shape). init checks that each applies to the init shape, and conv2d again at
    every call (banded's and im2col's bounds grow with the batch). Two pins, because which
    formulation is fastest depends on what XLA fuses it with, and a training step and an
    evaluation differ there (conv2d's ``"taps"`` is 15% faster in the training step of
    ``experiments/time_to_accuracy`` and makes its evaluation 1.8x slower). They change the
    speed only, not the numbers beyond rounding.
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
        for name, pin in (("train_formulation", train_formulation),
                          ("eval_formulation", eval_formulation)):
            with_formulation(where, cfg, input_shape, w_shape, pin, name)
        fan_in = (in_channels // groups) * kernel[0] * kernel[1]
        w_key, b_key = jax.random.split(key)
        params = {"weight": _uniform(w_key, w_shape, fan_in)}
        if bias:
            params["bias"] = _uniform(b_key, (out_channels,), fan_in)
        out_shape = (input_shape[0], out_channels) + tuple(a.out_size for a in cfg.axes)
        return out_shape, params, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        _checks.check_rank(where, jnp.shape(x), (4,), "(N, C, H, W)")
        w = params["weight"]
        _checks.check_shape(where, "params 'weight'", w, (out_channels, None) + kernel)
        _checks.check_channels(where, jnp.shape(x), w.shape[1] * groups, context="(as at init)")
        if bias:
            _checks.check_shape(where, "params 'bias'", params["bias"], (out_channels,))
        pin = train_formulation if train else eval_formulation
        with _errors_named(where, "conv2d"):
            return F.conv2d(x, w, params.get("bias"), stride, padding, dilation, groups,
                            vjp=vjp, formulation=pin), state

    return _layer(where, init, apply, _param_names(bias), needs_key=True)


@named_layer
def ConvTranspose2d(out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                    groups: int = 1, bias: bool = True, dilation=1) -> Layer:
    """Transposed 2-D convolution on NCHW input (PyTorch's argument order); params
    ``weight (C_in, C_out/groups, kh, kw)`` (PyTorch's layout), ``bias (C_out,)``.

    The output is ``(H - 1) s - 2 p + d (k - 1) + 1 + output_padding`` high (and wide).
    """
    where = "ConvTranspose2d"
    kernel = _checks.int_pair(where, "kernel_size", kernel_size)

    def init(key, input_shape):
        _checks.check_rank(where, input_shape, (4,), "(N, C, H, W)")
        in_channels = input_shape[1]
        if not isinstance(groups, int) or groups < 1 or in_channels % groups or \
                out_channels % groups:
            raise ValueError(f"{where}: groups={groups!r} must be a positive int dividing "
                             f"in_channels={in_channels} and out_channels={out_channels}")
        w_shape = (in_channels, out_channels // groups) + kernel
        cfg = conv_transpose_config(where, input_shape, w_shape, stride, padding, output_padding,
                                    groups, dilation)
        # PyTorch's fan_in for a transposed convolution: weight.size(1) * kh * kw
        fan_in = (out_channels // groups) * kernel[0] * kernel[1]
        w_key, b_key = jax.random.split(key)
        params = {"weight": _uniform(w_key, w_shape, fan_in)}
        if bias:
            params["bias"] = _uniform(b_key, (out_channels,), fan_in)
        out_shape = (input_shape[0], out_channels) + tuple(a.in_size for a in cfg.axes)
        return out_shape, params, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        _checks.check_rank(where, jnp.shape(x), (4,), "(N, C, H, W)")
        w = params["weight"]
        _checks.check_shape(where, "params 'weight'", w, (None, out_channels // groups) + kernel)
        _checks.check_channels(where, jnp.shape(x), w.shape[0], context="(as at init)")
        if bias:
            _checks.check_shape(where, "params 'bias'", params["bias"], (out_channels,))
        with _errors_named(where, "conv_transpose2d"):
            return F.conv_transpose2d(x, w, params.get("bias"), stride, padding, output_padding,
                                      groups, dilation, vjp=vjp), state

    return _layer(where, init, apply, _param_names(bias), needs_key=True)


def _resizing(where: str, op: str, fn: Callable, out_hw: Callable) -> Layer:
    """A parameter-free layer on NCHW input applying ``fn(x, vjp)``, the op ``op``;
    ``out_hw(shape)`` validates an input shape (as PyTorch would) and returns the output's
    spatial size."""

    def init(key, input_shape):
        _checks.check_rank(where, input_shape, (4,), "(N, C, H, W)")
        return tuple(input_shape[:2]) + tuple(out_hw(tuple(input_shape))), {}, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        _checks.check_rank(where, jnp.shape(x), (4,), "(N, C, H, W)")  # the op takes 3-D too
        with _errors_named(where, op):
            return fn(x, vjp), state

    return _layer(where, init, apply)


def _pool(where: str, op: str, fn: Callable, kernel_size, stride, padding, dilation,
          ceil_mode) -> Layer:
    def out_hw(shape):
        axes = pool_axes(where, shape, kernel_size, stride, padding, dilation, ceil_mode)
        return tuple(a.out_size for a in axes)

    return _resizing(where, op, fn, out_hw)


@named_layer
def MaxPool2d(kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> Layer:
    """Max pooling on NCHW input; the gradient goes to the first maximum of each window."""
    return _pool("MaxPool2d", "max_pool2d",
                 lambda x, vjp: F.max_pool2d(x, kernel_size, stride, padding, dilation,
                                             ceil_mode, vjp=vjp),
                 kernel_size, stride, padding, dilation, ceil_mode)


@named_layer
def AvgPool2d(kernel_size, stride=None, padding=0, ceil_mode: bool = False,
              count_include_pad: bool = True, divisor_override: int | None = None) -> Layer:
    """Average pooling on NCHW input."""
    return _pool("AvgPool2d", "avg_pool2d",
                 lambda x, vjp: F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode,
                                             count_include_pad, divisor_override, vjp=vjp),
                 kernel_size, stride, padding, 1, ceil_mode)


def _adaptive_pool(where: str, op: str, fn: Callable, output_size) -> Layer:
    return _resizing(where, op, lambda x, vjp: fn(x, output_size, vjp=vjp),
                     lambda shape: adaptive_config(where, shape, output_size).out_size)


@named_layer
def AdaptiveAvgPool2d(output_size) -> Layer:
    """Average pooling to a fixed output size (an int or a pair; ``None`` keeps that input
    size), PyTorch's windows ``[floor(i H / H_out), ceil((i + 1) H / H_out))``."""
    return _adaptive_pool("AdaptiveAvgPool2d", "adaptive_avg_pool2d", F.adaptive_avg_pool2d,
                          output_size)


@named_layer
def AdaptiveMaxPool2d(output_size) -> Layer:
    """Max pooling to a fixed output size, PyTorch's windows; the gradient goes to the first
    maximum of each window."""
    return _adaptive_pool("AdaptiveMaxPool2d", "adaptive_max_pool2d", F.adaptive_max_pool2d,
                          output_size)


@named_layer
def Upsample(size=None, scale_factor=None, mode: str = "nearest", align_corners=None) -> Layer:
    """Resize NCHW input (``torch.nn.Upsample``): exactly one of ``size`` and
    ``scale_factor``; ``mode`` ``"nearest"`` or ``"bilinear"`` (``align_corners`` only with
    bilinear)."""
    where = "Upsample"
    interp_options(where, size, scale_factor, mode, align_corners)

    def out_hw(shape):
        return interp_config(where, shape, jnp.float32, size, scale_factor, mode,
                             align_corners).out_size

    return _resizing(where, "interpolate",
                     lambda x, vjp: F.interpolate(x, size, scale_factor, mode, align_corners,
                                                  vjp=vjp), out_hw)


def _batch_norm(where: str, ranks, layout: str, eps, momentum, affine,
                track_running_stats) -> Layer:
    """The BatchNorm layers: the same op and state over inputs of ``ranks``, channels on axis 1."""

    def init(key, input_shape):
        _checks.check_rank(where, input_shape, ranks, layout)
        channels = input_shape[1]
        params = {"weight": jnp.ones(channels), "bias": jnp.zeros(channels)} if affine else {}
        state = {}
        if track_running_stats:
            state = {"running_mean": jnp.zeros(channels), "running_var": jnp.ones(channels)}
            if momentum is None:
                state["num_batches_tracked"] = jnp.zeros((), jnp.int32)
        return tuple(input_shape), params, state

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        _checks.check_rank(where, jnp.shape(x), ranks, layout)
        _check_per_channel(where, x, params, state)
        use_batch_stats = train or not track_running_stats
        new_state = dict(state)
        rate = momentum
        if track_running_stats and train and momentum is None:
            new_state["num_batches_tracked"] = state["num_batches_tracked"] + 1
            rate = 1.0 / new_state["num_batches_tracked"]
        with _errors_named(where, "batch_norm"):
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
    """The BatchNorm layers' params and running statistics: one value per channel of ``x``, and
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


@named_layer
def BatchNorm2d(eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                track_running_stats: bool = True) -> Layer:
    """Batch normalization over the channels of NCHW input.

    params ``{"weight", "bias"}`` when ``affine``; state ``{"running_mean", "running_var"}``
    when ``track_running_stats``. ``apply(train=True)`` normalizes with the batch statistics and
    returns the running statistics updated as PyTorch does (the variance unbiased);
    ``train=False`` normalizes with the running statistics. ``momentum=None`` is PyTorch's
    cumulative average; the state then also counts ``num_batches_tracked``.
    """
    return _batch_norm("BatchNorm2d", (4,), "(N, C, H, W)", eps, momentum, affine,
                       track_running_stats)


@named_layer
def BatchNorm1d(eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                track_running_stats: bool = True) -> Layer:
    """Batch normalization over the channels of ``(N, C)`` or ``(N, C, L)`` input: the
    statistics of a channel are taken over N (and L). Params and state as :func:`BatchNorm2d`."""
    return _batch_norm("BatchNorm1d", (2, 3), "(N, C) or (N, C, L)", eps, momentum, affine,
                       track_running_stats)


@named_layer
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


def _dropout(where: str, fn: Callable, p: float) -> Layer:
    _checks.check_probability(where, "p", p)

    def init(key, input_shape):
        return tuple(input_shape), {}, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        check_vjp(where, vjp)
        if train and 0 < p < 1 and key is None:
            raise ValueError(f"{where}: apply(train=True) needs a PRNG key (key=...), got None")
        return fn(x, p, train, key=key, vjp=vjp), state

    return _layer(where, init, apply)


@named_layer
def Dropout(p: float = 0.5) -> Layer:
    """Inverted dropout in train mode (needs ``key``), identity in eval mode."""
    return _dropout("Dropout", F.dropout, p)


@named_layer
def Dropout2d(p: float = 0.5) -> Layer:
    """Zeroes whole channels of ``(N, C, H, W)`` (or ``(N, C, L)``) input in train mode (needs
    ``key``), scaling the kept ones by ``1 / (1 - p)``; identity in eval mode."""
    where = "Dropout2d"
    layer = _dropout(where, F.dropout2d, p)

    def init(key, input_shape):
        _checks.check_rank(where, input_shape, (3, 4), "(N, C, L) or (N, C, H, W)")
        return layer.init(key, input_shape)

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        _checks.check_rank(where, jnp.shape(x), (3, 4), "(N, C, L) or (N, C, H, W)")
        return layer.apply(params, state, x, train=train, key=key, vjp=vjp)

    return _layer(where, init, apply)


@named_layer
def LayerNorm(normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
              bias: bool = True) -> Layer:
    """Layer normalization over the last ``len(normalized_shape)`` axes.

    params ``weight`` (ones) and ``bias`` (zeros) of shape ``normalized_shape`` when
    ``elementwise_affine`` (no ``bias`` when ``bias=False``); no state.
    """
    where = "LayerNorm"
    shape = normalized_shape_tuple(where, normalized_shape)

    def check(input_shape, context=""):
        if tuple(input_shape[len(input_shape) - len(shape):]) != shape:
            raise ValueError(f"{where}: expected an input whose last {len(shape)} axes are "
                             f"{shape}{context}, got shape {tuple(input_shape)}")

    def init(key, input_shape):
        check(input_shape)
        params = {"weight": jnp.ones(shape)} if elementwise_affine else {}
        if elementwise_affine and bias:
            params["bias"] = jnp.zeros(shape)
        return tuple(input_shape), params, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        check_vjp(where, vjp)
        _checks.check_floating(where, x)
        check(jnp.shape(x), " (as at init)")
        return F.layer_norm(x, shape, params.get("weight"), params.get("bias"), eps,
                            vjp=vjp), state

    names = ("weight", "bias") if bias else ("weight",)
    return _layer(where, init, apply, names if elementwise_affine else ())


@named_layer
def GroupNorm(num_groups: int, eps: float = 1e-5, affine: bool = True) -> Layer:
    """Group normalization of ``(N, C, ...)`` input: ``num_groups`` groups of consecutive
    channels. params ``weight`` (ones) and ``bias`` (zeros) of shape ``(C,)`` when ``affine``,
    ``C`` read at init; no state."""
    where = "GroupNorm"
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"{where}: num_groups must be a positive int, got {num_groups!r}")

    def channels_of(input_shape):
        if len(input_shape) < 2:
            raise ValueError(f"{where}: expected an input of shape (N, C, ...), "
                             f"got shape {tuple(input_shape)}")
        channels = input_shape[1]
        if channels % num_groups:
            raise ValueError(f"{where}: num_groups={num_groups} must divide the {channels} "
                             f"channels (input shape {tuple(input_shape)})")
        return channels

    def init(key, input_shape):
        channels = channels_of(input_shape)
        params = {"weight": jnp.ones(channels), "bias": jnp.zeros(channels)} if affine else {}
        return tuple(input_shape), params, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        check_vjp(where, vjp)
        _checks.check_floating(where, x)
        if affine and jnp.ndim(x) >= 2:
            _checks.check_channels(where, jnp.shape(x), params["weight"].shape[0],
                                   context="(as at init)")
        channels_of(jnp.shape(x))
        return F.group_norm(x, num_groups, params.get("weight"), params.get("bias"), eps,
                            vjp=vjp), state

    return _layer(where, init, apply, ("weight", "bias") if affine else ())
