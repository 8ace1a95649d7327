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

import itertools
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax import numpy as jnp

from . import functional as F
from .functional import REGISTRY
from .functional.dropout import channel_mask_shape


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


def primary(output):
    """The output that gradients are taken of (batch_norm also returns running statistics)."""
    return output[0] if isinstance(output, tuple) else output


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


def _at_kinks(x, points):
    """Every other element of ``x`` set exactly to one of ``points`` (in turn)."""
    flat = x.reshape(-1)
    flat[::2] = np.resize(np.asarray(points, x.dtype), flat[::2].shape)
    return x


def _activation(name, torch_name, extra=(), kinks=None):
    """Builder for an elementwise op; ``kinks(config)`` lists the inputs where its derivative
    jumps, which a config with ``kinks=True`` places in the input."""
    def build(rng, c, dtype):
        kw = {k: c[k] for k in extra}
        fn = getattr(F, name)
        x = _elementwise_input(rng, c, dtype)
        if c.get("kinks"):
            x = _at_kinks(x, kinks(c))
        return Case(name, c, {"x": x},
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


def _dropout(name, mask_shape):
    """Builder for ``dropout`` / ``dropout2d``, whose keep-mask has shape ``mask_shape(x)``."""
    def build(rng, c, dtype):
        key = jax.random.key(c["seed"])
        x = _elementwise_input(rng, c, dtype)
        p, training = c["p"], c["training"]
        fn = getattr(F, name)

        def torch_call(torch, x):  # torch cannot replay JAX's random stream: same mask, its math
            if not training or p == 0:
                return x * 1
            if p == 1:
                return x * 0
            keep = np.array(jax.random.bernoulli(key, 1 - p, mask_shape(x.shape)))
            return x * torch.as_tensor(keep) / (1 - p)

        return Case(name, c, {"x": x},
                    lambda x, vjp="custom": fn(x, p, training, key=key, vjp=vjp), torch_call)
    return build


def _classification(name, input_name, extra=()):
    """Builder for a loss of class scores ``(N, C, ...)`` and integer labels."""
    def build(rng, c, dtype):
        n, classes, extra_dims = c["batch"], c["classes"], tuple(c["extra_dims"])
        scores = _normal(rng, (n, classes) + extra_dims, dtype, c.get("scale", 1.0))
        labels = rng.integers(0, classes, (n,) + extra_dims)
        kw = dict(reduction=c["reduction"], **{k: c[k] for k in extra})
        fn = getattr(F, name)
        return Case(name, c, {input_name: scores},
                    lambda z, vjp="custom": fn(z, jnp.asarray(labels), vjp=vjp, **kw),
                    lambda torch, z: getattr(torch.nn.functional, name)(
                        z, torch.as_tensor(labels), **kw))
    return build


def _bce(rng, c, dtype):
    shape = tuple(c["shape"])
    inputs = {"logits": _normal(rng, shape, dtype, c["scale"]),
              "targets": rng.uniform(0, 1, shape).astype(dtype)}
    return Case("binary_cross_entropy_with_logits", c, inputs,
                lambda z, t, vjp="custom": F.binary_cross_entropy_with_logits(
                    z, t, c["reduction"], vjp=vjp),
                lambda torch, z, t: torch.nn.functional.binary_cross_entropy_with_logits(
                    z, t, reduction=c["reduction"]))


def _regression(name, extra=()):
    """Builder for a loss of two same-shaped arrays ``pred``, ``target``."""
    def build(rng, c, dtype):
        shape = tuple(c["shape"])
        pred = _normal(rng, shape, dtype, c.get("scale", 1.0))
        target = _normal(rng, shape, dtype)
        if c.get("kinks"):  # |pred - target| == delta exactly, where huber's pieces meet
            _at_kinks(pred, (c["delta"], -c["delta"]))
            _at_kinks(target, (0.0,))
        kw = {k: c[k] for k in extra}
        fn = getattr(F, name)
        return Case(name, c, {"pred": pred, "target": target},
                    lambda p, t, vjp="custom": fn(p, t, c["reduction"], vjp=vjp, **kw),
                    lambda torch, p, t: getattr(torch.nn.functional, name)(
                        p, t, reduction=c["reduction"], **kw))
    return build


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
        _dropout("dropout", tuple), ({"p": 1.0}, {"training": False}, {"p": 0.0})),
    "cross_entropy": OpSpace(
        dict(batch=(4, 1), classes=(10, 2), extra_dims=((), (3,)),
             reduction=("mean", "sum", "none"), label_smoothing=(0.0, 0.1),
             scale=(1.0, 1e4)),
        _classification("cross_entropy", "logits", ("label_smoothing",)),
        ({"scale": 1e4}, {"scale": 1e4, "label_smoothing": 0.1},
         {"batch": 1, "extra_dims": (3,)})),
    "binary_cross_entropy_with_logits": OpSpace(
        dict(shape=_SHAPES, reduction=("mean", "sum", "none"), scale=(1.0, 1e4)), _bce,
        ({"scale": 1e4},)),
    "mse_loss": OpSpace(dict(shape=_SHAPES, reduction=("mean", "sum", "none")),
                        _regression("mse_loss")),
}


# ---------------------------------------- layer_norm, group_norm, dropout2d, activations, losses

_AFFINE = {"both": ("weight", "bias"), "weight": ("weight",), "bias": ("bias",), "none": ()}


def _affine_norm(name, x_shape, param_shape, extra):
    """Builder for layer_norm / group_norm: ``x``, the ``weight``/``bias`` that ``affine`` names
    (differentiable), and the op's second argument ``extra(config)``."""
    def build(rng, c, dtype):
        x = _normal(rng, x_shape(c), dtype, 2.0) + np.asarray(1.5, dtype)
        inputs = {"x": x, **{k: _normal(rng, param_shape(c), dtype) for k in _AFFINE[c["affine"]]}}
        names = list(inputs)

        def args(values):
            given = dict(zip(names, values))
            return given["x"], extra(c), given.get("weight"), given.get("bias"), c["eps"]

        fn = getattr(F, name)
        return Case(name, c, inputs, lambda *a, vjp="custom": fn(*args(a), vjp=vjp),
                    lambda torch, *a: getattr(torch.nn.functional, name)(*args(a)))
    return build


def _trailing(c):
    return tuple(c["shape"][len(c["shape"]) - c["normalized_dims"]:])


def _grouped_input(c):
    return (c["batch"], c["channels"]) + tuple(c["size"])


_NORM_EPS = (1e-5, 1e-3)
_AFFINES = tuple(_AFFINE)

SPACES.update({
    "layer_norm": OpSpace(
        dict(shape=((2, 3, 4), (1, 5), (2, 3, 4, 5), (3, 1)), normalized_dims=(1, 2),
             affine=_AFFINES, eps=_NORM_EPS),
        _affine_norm("layer_norm", lambda c: tuple(c["shape"]), _trailing, _trailing),
        ({"shape": (2, 3, 4, 5), "normalized_dims": 2}, {"affine": "bias"},
         {"affine": "weight", "shape": (1, 5)}, {"shape": (3, 1), "affine": "none"})),
    "group_norm": OpSpace(
        # Never one value per group here: torch's float32 output is then off by ~1e-5 (its
        # x * scale + shift cancels), where ours is exactly beta (test_normalization checks).
        dict(batch=(2, 1), channels=(6, 4), groups=(2, 3, 1), size=((3, 4), (5,), ()),
             affine=_AFFINES, eps=_NORM_EPS),
        _affine_norm("group_norm", _grouped_input, lambda c: (c["channels"],),
                     lambda c: c["groups"]),
        ({"groups": 1, "size": (5,)}, {"groups": 6, "affine": "weight"},
         {"batch": 1, "channels": 4, "groups": 2, "affine": "bias"},
         {"groups": 3, "size": ()})),
    "dropout2d": OpSpace(
        dict(shape=((2, 3, 4, 5), (2, 3, 6), (1, 2, 3, 3)), p=(0.5, 0.1, 0.0, 1.0),
             training=(True, False), seed=(0, 1)),
        _dropout("dropout2d", channel_mask_shape),
        ({"shape": (2, 3, 6)}, {"p": 1.0}, {"training": False}, {"p": 0.0})),
    "gelu": OpSpace(dict(shape=_SHAPES, approximate=("none", "tanh"), scale=(1.0, 5.0)),
                    _activation("gelu", "gelu", ("approximate",)),
                    ({"approximate": "tanh"}, {"scale": 5.0, "approximate": "tanh"})),
    "silu": OpSpace(dict(shape=_SHAPES, scale=(1.0, 30.0)), _activation("silu", "silu"),
                    ({"scale": 30.0},)),
    "elu": OpSpace(  # scale 100: exp overflows float32 where the other branch is taken
        dict(shape=_SHAPES, alpha=(1.0, 0.5, 2.0), zeros=(False, True), scale=(1.0, 100.0)),
        _activation("elu", "elu", ("alpha",)), ({"scale": 100.0}, {"zeros": True, "alpha": 0.5})),
    "softplus": OpSpace(
        dict(shape=_SHAPES, beta=(1.0, 2.0, -0.5), threshold=(20.0, 2.0), scale=(1.0, 30.0),
             kinks=(False, True)),
        _activation("softplus", "softplus", ("beta", "threshold"),
                    lambda c: (c["threshold"] / c["beta"],)),
        ({"scale": 30.0}, {"kinks": True, "beta": 2.0, "threshold": 2.0},
         {"kinks": True, "beta": -0.5, "scale": 30.0})),
    "hardtanh": OpSpace(
        dict(shape=_SHAPES, min_val=(-1.0, -0.5, 0.0), max_val=(1.0, 2.0, 0.0),
             scale=(1.0, 3.0), kinks=(False, True)),
        _activation("hardtanh", "hardtanh", ("min_val", "max_val"),
                    lambda c: (c["min_val"], c["max_val"])),
        ({"scale": 3.0}, {"kinks": True}, {"kinks": True, "min_val": 0.0, "max_val": 0.0})),
    "nll_loss": OpSpace(
        dict(batch=(4, 1), classes=(10, 2), extra_dims=((), (3,)),
             reduction=("mean", "sum", "none")),
        _classification("nll_loss", "log_probs"),
        ({"batch": 1, "extra_dims": (3,)}, {"reduction": "none", "classes": 2})),
    "huber_loss": OpSpace(
        dict(shape=_SHAPES, reduction=("mean", "sum", "none"), delta=(1.0, 0.5, 2.0),
             scale=(1.0, 3.0), kinks=(False, True)),
        _regression("huber_loss", ("delta",)),
        ({"scale": 3.0, "delta": 0.5}, {"kinks": True},
         {"kinks": True, "delta": 2.0, "reduction": "none"})),
})

_missing = set(REGISTRY) - set(SPACES)
if _missing:
    raise ImportError(f"functional_cnn.testing: no OpSpace for registered ops {sorted(_missing)}")


# ------------------------------------------------------------------------------------- helpers

def build(op: str, config: Mapping | None = None, seed: int = 0, dtype=np.float32) -> Case:
    """The case for ``op`` at ``config`` (missing keys take the space's defaults)."""
    space = SPACES[op]
    full = {**space.defaults, **(config or {})}
    return space.build(np.random.default_rng(seed), full, np.dtype(dtype))


def edge_cases(op: str) -> list[dict]:
    """The op's default configuration followed by its edge cases, as full configs."""
    space = SPACES[op]
    return [space.defaults] + [{**space.defaults, **e} for e in space.edge_cases]


def grid(op: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Edge cases, then configurations drawn from the full product (deterministic order)."""
    space = SPACES[op]
    names = list(space.hyper)
    product = [dict(zip(names, values)) for values in itertools.product(*space.hyper.values())]
    np.random.default_rng(seed).shuffle(product)
    configs = edge_cases(op) + product
    return configs if limit is None else configs[:limit]


def is_valid(case: Case) -> bool:
    """Whether the op accepts this configuration (its own checks raise ValueError otherwise)."""
    try:
        jax.eval_shape(lambda *a: case.call(*a), *case.inputs.values())
    except ValueError:
        return False
    return True


def cotangent(case: Case, seed: int = 1) -> np.ndarray:
    """A fixed random cotangent for the case's primary output."""
    out = jax.eval_shape(lambda *a: primary(case.call(*a)), *case.inputs.values())
    return _normal(np.random.default_rng(seed), out.shape, out.dtype)


def value_and_grads(case: Case, vjp: str, ct: np.ndarray | None = None, jit: bool = False):
    """``(output, grads)``: grads of ``sum(primary(output) * ct)`` w.r.t. every input."""
    ct = cotangent(case) if ct is None else ct
    args = [jnp.asarray(a) for a in case.inputs.values()]

    def scalar(*a):
        return jnp.sum(primary(case.call(*a, vjp=vjp)) * ct)

    grad_fn = jax.grad(scalar, argnums=tuple(range(len(args))))
    if jit:
        grad_fn = jax.jit(grad_fn)
    return case.call(*args, vjp=vjp), tuple(grad_fn(*args))


def torch_value_and_grads(case: Case, torch, ct: np.ndarray | None = None):
    """The same as :func:`value_and_grads`, computed by PyTorch (float64 stays float64)."""
    ct = cotangent(case) if ct is None else ct
    tensors = [torch.tensor(np.array(a), requires_grad=True) for a in case.inputs.values()]
    out = case.torch_call(torch, *tensors)
    main = primary(out)
    if main.requires_grad:
        (main * torch.as_tensor(ct)).sum().backward()
    to_np = (lambda t: t.detach().cpu().numpy())
    outputs = tuple(to_np(o) for o in out) if isinstance(out, tuple) else to_np(out)
    grads = tuple(np.zeros_like(np.array(a)) if t.grad is None else to_np(t.grad)
                  for t, a in zip(tensors, case.inputs.values()))
    return outputs, grads


def max_errors(a, b) -> tuple[float, float]:
    """Max absolute and max relative error over matching leaves (relative to max |b|)."""
    abs_err, rel_err = 0.0, 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diff = float(np.max(np.abs(x - y))) if x.size else 0.0
        abs_err = max(abs_err, diff)
        rel_err = max(rel_err, diff / max(float(np.max(np.abs(y))) if y.size else 0.0, 1e-30))
    return abs_err, rel_err


def _perturbed_inputs(args, eps, max_entries, seed):
    """Sampled flat positions per input, and every input stacked over all ``2 * entries``
    perturbed evaluations (``+eps`` then ``-eps`` at each position of each input in turn)."""
    rng = np.random.default_rng(seed)
    positions = [rng.permutation(a.size)[:max_entries] for a in args]
    stacks = [[] for _ in args]
    for i, flat in enumerate(positions):
        for index in flat:
            for sign in (1.0, -1.0):
                for j, a in enumerate(args):
                    if j == i:
                        a = a.copy()
                        a.reshape(-1)[index] += sign * eps
                    stacks[j].append(a)
    return positions, [np.stack(s) for s in stacks]


def finite_difference_grads(case: Case, eps: float = 1e-6, ct: np.ndarray | None = None,
                            max_entries: int = 64, seed: int = 0):
    """Central differences of ``sum(primary(out) * ct)`` at up to ``max_entries`` sampled
    positions per input, all evaluated in one jitted, vmapped call; returns
    ``[(flat positions, estimates)]`` per input. Run it under float64."""
    ct = jnp.asarray(cotangent(case) if ct is None else ct)
    args = [np.array(a, np.float64) for a in case.inputs.values()]
    positions, stacks = _perturbed_inputs(args, eps, max_entries, seed)

    def scalar(*a):
        return jnp.sum(primary(case.call(*a)) * ct)

    values = np.asarray(jax.jit(jax.vmap(scalar))(*stacks), np.float64)
    results, offset = [], 0
    for flat in positions:
        pairs = values[offset:offset + 2 * len(flat)].reshape(-1, 2)
        offset += 2 * len(flat)
        results.append((flat, (pairs[:, 0] - pairs[:, 1]) / (2 * eps)))
    return results
