"""Test utilities: every registered op's hyperparameter space, inputs and PyTorch oracle.

For each name in :data:`functional_cnn.functional.REGISTRY` there is one :class:`OpSpace`:

* ``hyper`` -- the values each hyperparameter ranges over (hypothesis samples from it, the
  VJP audit tool walks it);
* ``edge_cases`` -- configurations that must always be checked (stride above kernel, ceil-mode
  overhang, ties, logits of 1e4, ...), each a partial config over ``DEFAULTS``;
* ``build(rng, config, dtype)`` -- a :class:`Case`: inputs plus the op call and its torch twin.

Importing this module never imports torch; oracles receive the ``torch`` module as an argument.
A missing space for a registered op is an import-time error, so a new op cannot go untested.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax import numpy as jnp

from . import functional as F
from .functional import REGISTRY


class Case(NamedTuple):
    """One concrete call of an op: differentiable inputs, the call, and PyTorch's equivalent."""

    op: str
    config: dict
    inputs: dict  # name -> numpy array, the differentiable arguments in call order
    call: Callable  # call(*inputs, vjp=...) -> output (array or tuple, first is primary)
    torch_call: Callable | None  # torch_call(torch, *tensors) -> output of the same structure


class OpSpace(NamedTuple):
    hyper: Mapping[str, Sequence]
    build: Callable[[np.random.Generator, dict, np.dtype], Case]
    edge_cases: Sequence[dict] = ()

    @property
    def defaults(self) -> dict:
        return {name: values[0] for name, values in self.hyper.items()}


def _normal(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _ties(x):
    """Quantize to a few levels and clip at 0, so windows hold repeated maxima (as after ReLU)."""
    return np.maximum(np.round(x * 1.5), 0).astype(x.dtype)


# ------------------------------------------------------------------------------------- spaces

def _linear(rng, c, dtype):
    x = _normal(rng, tuple(c["batch_shape"]) + (c["in_features"],), dtype)
    w = _normal(rng, (c["out_features"], c["in_features"]), dtype)
    inputs = {"x": x, "weight": w}
    if c["bias"]:
        inputs["bias"] = _normal(rng, (c["out_features"],), dtype)
    return Case("linear", c, inputs,
                lambda x, w, b=None, vjp="custom": F.linear(x, w, b, vjp=vjp),
                lambda torch, x, w, b=None: torch.nn.functional.linear(x, w, b))


def _conv2d(rng, c, dtype):
    g = c["groups"]
    x = _normal(rng, (c["batch"], c["in_per_group"] * g) + tuple(c["size"]), dtype)
    kernel = c["kernel"] if isinstance(c["kernel"], tuple) else (c["kernel"],) * 2
    w = _normal(rng, (c["out_per_group"] * g, c["in_per_group"]) + kernel, dtype)
    inputs = {"x": x, "weight": w}
    if c["bias"]:
        inputs["bias"] = _normal(rng, (w.shape[0],), dtype)
    kw = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=g)
    return Case("conv2d", c, inputs,
                lambda x, w, b=None, vjp="custom": F.conv2d(x, w, b, vjp=vjp, **kw),
                lambda torch, x, w, b=None: torch.nn.functional.conv2d(x, w, b, **kw))


def _pool_input(rng, c, dtype):
    x = _normal(rng, (c["batch"], c["channels"]) + tuple(c["size"]), dtype)
    return _ties(x) if c.get("ties") else x


def _pool(name, extra):
    """Builder for a pooling op: the shared hyperparameters plus its own (``extra``)."""
    def build(rng, c, dtype):
        kw = dict(kernel_size=c["kernel"], stride=c["stride"], padding=c["padding"],
                  ceil_mode=c["ceil_mode"], **{k: c[k] for k in extra})
        fn = getattr(F, name)
        return Case(name, c, {"x": _pool_input(rng, c, dtype)},
                    lambda x, vjp="custom": fn(x, vjp=vjp, **kw),
                    lambda torch, x: getattr(torch.nn.functional, name)(x, **kw))
    return build


def _batch_norm(rng, c, dtype):
    ch = c["channels"]
    x = _normal(rng, (c["batch"], ch) + tuple(c["size"]), dtype, 2.0) + np.asarray(1.5, dtype)
    stats = {"running_mean": _normal(rng, (ch,), dtype),
             "running_var": (rng.uniform(0.5, 2.0, ch)).astype(dtype)}
    affine = {"weight": _normal(rng, (ch,), dtype), "bias": _normal(rng, (ch,), dtype)}
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
        return F.batch_norm(given["x"], mean, var, given.get("weight"), given.get("bias"),
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

    return Case("batch_norm", c, inputs, call, torch_call)


def _elementwise_input(rng, c, dtype):
    x = _normal(rng, tuple(c["shape"]), dtype, c.get("scale", 1.0))
    if c.get("zeros"):  # exact zeros, where relu's derivative convention matters
        x[..., ::2] = 0
    return x


def _activation(name, torch_name, extra=()):
    def build(rng, c, dtype):
        kw = {k: c[k] for k in extra}
        fn = getattr(F, name)
        return Case(name, c, {"x": _elementwise_input(rng, c, dtype)},
                    lambda x, vjp="custom": fn(x, vjp=vjp, **kw),
                    lambda torch, x: getattr(torch.nn.functional, torch_name)(x, **kw))
    return build


def _softmax_like(name):
    def build(rng, c, dtype):
        fn = getattr(F, name)
        return Case(name, c, {"x": _elementwise_input(rng, c, dtype)},
                    lambda x, vjp="custom": fn(x, c["dim"], vjp=vjp),
                    lambda torch, x: getattr(torch.nn.functional, name)(x, dim=c["dim"]))
    return build


def _dropout(rng, c, dtype):
    key = jax.random.key(c["seed"])
    x = _elementwise_input(rng, c, dtype)
    p, training = c["p"], c["training"]

    def torch_call(torch, x):  # torch cannot replay JAX's random stream: same mask, its math
        if not training or p == 0:
            return x * 1
        if p == 1:
            return x * 0
        keep = np.array(jax.random.bernoulli(key, 1 - p, x.shape))
        return x * torch.as_tensor(keep) / (1 - p)

    return Case("dropout", c, {"x": x},
                lambda x, vjp="custom": F.dropout(x, p, training, key=key, vjp=vjp),
                torch_call)


def _cross_entropy(rng, c, dtype):
    n, classes, extra = c["batch"], c["classes"], tuple(c["extra_dims"])
    logits = _normal(rng, (n, classes) + extra, dtype, c["scale"])
    labels = rng.integers(0, classes, (n,) + extra)
    kw = dict(reduction=c["reduction"], label_smoothing=c["label_smoothing"])
    return Case("cross_entropy", c, {"logits": logits},
                lambda z, vjp="custom": F.cross_entropy(z, jnp.asarray(labels), vjp=vjp, **kw),
                lambda torch, z: torch.nn.functional.cross_entropy(
                    z, torch.as_tensor(labels), **kw))


def _bce(rng, c, dtype):
    shape = tuple(c["shape"])
    inputs = {"logits": _normal(rng, shape, dtype, c["scale"]),
              "targets": rng.uniform(0, 1, shape).astype(dtype)}
    return Case("binary_cross_entropy_with_logits", c, inputs,
                lambda z, t, vjp="custom": F.binary_cross_entropy_with_logits(
                    z, t, c["reduction"], vjp=vjp),
                lambda torch, z, t: torch.nn.functional.binary_cross_entropy_with_logits(
                    z, t, reduction=c["reduction"]))


def _mse(rng, c, dtype):
    shape = tuple(c["shape"])
    inputs = {"pred": _normal(rng, shape, dtype), "target": _normal(rng, shape, dtype)}
    return Case("mse_loss", c, inputs,
                lambda p, t, vjp="custom": F.mse_loss(p, t, c["reduction"], vjp=vjp),
                lambda torch, p, t: torch.nn.functional.mse_loss(p, t, reduction=c["reduction"]))


_SHAPES = ((2, 3), (1,), (2, 3, 4, 5))
_POOL = dict(batch=(2, 1), channels=(3, 1), size=((7, 6), (5, 5), (9, 8), (6, 9)),
             kernel=(3, 2, 1, (2, 3)), stride=(None, 1, 2, 3, (1, 2)), padding=(0, 1, (1, 0)),
             ceil_mode=(False, True))

SPACES: dict[str, OpSpace] = {
    "linear": OpSpace(
        dict(batch_shape=((4,), (1,), (2, 3)), in_features=(5, 1, 8), out_features=(4, 1),
             bias=(True, False)),
        _linear, ({"batch_shape": (1,)}, {"in_features": 1, "out_features": 1, "bias": False})),
    "conv2d": OpSpace(
        dict(batch=(2, 1), in_per_group=(3, 1, 2), out_per_group=(2, 1), groups=(1, 2, 3),
             size=((8, 7), (5, 5), (9, 6)), kernel=(3, 1, 2, (3, 2)),
             stride=(1, 2, 3, (2, 1)), padding=(0, 1, 2, (1, 0), "same", "valid"),
             dilation=(1, 2, (1, 2), (2, 1)), bias=(True, False)),
        _conv2d,
        ({"kernel": 2, "stride": 3}, {"padding": "same", "dilation": 2},
         {"padding": "same", "kernel": 2}, {"groups": 3, "stride": 2, "padding": 1},
         {"batch": 1, "size": (5, 5), "kernel": 3, "padding": 2, "stride": 2},
         {"dilation": (1, 2), "stride": (2, 1), "kernel": (3, 2)},
         {"in_per_group": 1, "groups": 1},  # the single-channel (im2col) fast path
         {"in_per_group": 1, "groups": 1, "stride": 2, "padding": 1, "dilation": 2,
          "kernel": (3, 2), "batch": 1},
         # the banded fast path (several channels, narrow): stride and dilation on the height,
         # stride on the width, "same" padding
         {"in_per_group": 3, "groups": 1, "kernel": 3, "size": (9, 6), "stride": (2, 1),
          "dilation": (2, 1), "padding": (1, 0)},
         {"in_per_group": 2, "groups": 1, "kernel": (3, 2), "size": (5, 5), "stride": (1, 2),
          "padding": 0, "dilation": 1},
         {"in_per_group": 2, "groups": 1, "kernel": 3, "size": (5, 5), "padding": "same",
          "stride": 1, "dilation": 1})),
    "max_pool2d": OpSpace(
        dict(_POOL, dilation=(1, 2, (2, 1)), ties=(False, True)),
        _pool("max_pool2d", ["dilation"]),
        ({"kernel": 2, "stride": 3}, {"ceil_mode": True, "stride": 2, "size": (6, 9)},
         {"ties": True}, {"ties": True, "stride": 1, "padding": 1}, {"dilation": 2},
         {"kernel": 3, "stride": 2, "size": (28, 28), "batch": 1},
         {"batch": 1, "kernel": (2, 3), "ceil_mode": True, "padding": 1, "stride": 2})),
    "avg_pool2d": OpSpace(
        dict(_POOL, count_include_pad=(True, False)),
        _pool("avg_pool2d", ["count_include_pad"]),
        ({"kernel": 2, "stride": 3}, {"ceil_mode": True, "stride": 2, "padding": 1},
         {"ceil_mode": True, "stride": 2, "padding": 1, "count_include_pad": False},
         {"padding": 1, "count_include_pad": False}, {"batch": 1, "size": (5, 5)})),
    "batch_norm": OpSpace(
        dict(batch=(4, 1, 2), channels=(3, 1), size=((5, 4), (1, 2), (3, 3)),
             training=(True, False), affine=(True, False), momentum=(0.1, 0.5),
             eps=(1e-5, 1e-3)),
        _batch_norm, ({"training": False}, {"batch": 1, "size": (1, 2)}, {"affine": False})),
    "relu": OpSpace(dict(shape=_SHAPES, zeros=(False, True)), _activation("relu", "relu"),
                    ({"zeros": True},)),
    "leaky_relu": OpSpace(
        dict(shape=_SHAPES, negative_slope=(0.01, 0.2), zeros=(False, True)),
        _activation("leaky_relu", "leaky_relu", ("negative_slope",)), ({"zeros": True},)),
    "sigmoid": OpSpace(dict(shape=_SHAPES, scale=(1.0, 30.0)),
                       _activation("sigmoid", "sigmoid"), ({"scale": 30.0},)),
    "tanh": OpSpace(dict(shape=_SHAPES, scale=(1.0, 30.0)), _activation("tanh", "tanh"),
                    ({"scale": 30.0},)),
    "softmax": OpSpace(dict(shape=_SHAPES, dim=(-1, 0, 1), scale=(1.0, 1e4)),
                       _softmax_like("softmax"), ({"scale": 1e4},)),
    "log_softmax": OpSpace(dict(shape=_SHAPES, dim=(-1, 0, 1), scale=(1.0, 1e4)),
                           _softmax_like("log_softmax"), ({"scale": 1e4},)),
    "dropout": OpSpace(
        dict(shape=_SHAPES, p=(0.5, 0.1, 0.0, 1.0), training=(True, False), seed=(0, 1)),
        _dropout, ({"p": 1.0}, {"training": False}, {"p": 0.0})),
    "cross_entropy": OpSpace(
        dict(batch=(4, 1), classes=(10, 2), extra_dims=((), (3,)),
             reduction=("mean", "sum", "none"), label_smoothing=(0.0, 0.1),
             scale=(1.0, 1e4)),
        _cross_entropy, ({"scale": 1e4}, {"scale": 1e4, "label_smoothing": 0.1},
                         {"batch": 1, "extra_dims": (3,)})),
    "binary_cross_entropy_with_logits": OpSpace(
        dict(shape=_SHAPES, reduction=("mean", "sum", "none"), scale=(1.0, 1e4)), _bce,
        ({"scale": 1e4},)),
    "mse_loss": OpSpace(dict(shape=_SHAPES, reduction=("mean", "sum", "none")), _mse),
}

_missing = set(REGISTRY) - set(SPACES)
if _missing:
    raise ImportError(f"functional_cnn.testing: no OpSpace for registered ops {sorted(_missing)}")
