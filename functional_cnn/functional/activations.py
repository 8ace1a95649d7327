"""Elementwise activations and the (log-)softmax family."""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from jax import lax
from jax import numpy as jnp

from .. import _checks
from . import _spaces as S
from ._registry import check_vjp, register, two_gradients


def _checked(where, x, vjp):
    check_vjp(where, vjp)
    _checks.check_floating(where, x)


def _axis(where, x, dim):
    ndim = jnp.ndim(x)
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise ValueError(f"{where}: dim must be in [{-ndim}, {ndim}) for an input of "
                         f"shape {tuple(jnp.shape(x))}, got {dim}")
    return dim % max(ndim, 1)


# ------------------------------------------------------------------------------- relu

def _relu_forward(_, x):
    # where, not maximum: autodiff of maximum(x, 0) gives 1/2 at x == 0, PyTorch gives 0.
    # "x <= 0 -> 0" rather than "x > 0 -> x": a NaN passes through (and its gradient with it),
    # as in PyTorch, instead of being hidden as 0.
    return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


def _relu_fwd(_, x):
    return _relu_forward(_, x), x <= 0


def _relu_bwd(_, off, g):
    return (jnp.where(off, jnp.zeros((), g.dtype), g),)


_relu = two_gradients(_relu_forward, _relu_fwd, _relu_bwd)


@register()
def relu(x, *, vjp: str = "custom"):
    """``max(x, 0)``. Backward rule: ``dx = g [not x <= 0]``.

    Both paths take PyTorch's subgradient 0 at ``x == 0`` (and ``-0``); a NaN passes through
    with its gradient ``g``, as in PyTorch.
    """
    _checked("relu", x, vjp)
    return _relu(vjp, None, x)


# ------------------------------------------------------------------------------- leaky_relu

def _leaky_forward(slope, x):
    return jnp.where(x > 0, x, x * np.array(slope, x.dtype))


def _leaky_fwd(slope, x):
    return _leaky_forward(slope, x), x > 0


def _leaky_bwd(slope, positive, g):
    return (jnp.where(positive, g, g * np.array(slope, g.dtype)),)


_leaky_relu = two_gradients(_leaky_forward, _leaky_fwd, _leaky_bwd)


@register()
def leaky_relu(x, negative_slope: float = 0.01, *, vjp: str = "custom"):
    """``x`` if ``x > 0`` else ``slope x``.

    Backward rule: ``dx = g`` where ``x > 0``, else ``slope g``. Both paths take PyTorch's
    subgradient ``slope`` at ``x == 0`` (and at a NaN).
    """
    _checked("leaky_relu", x, vjp)
    return _leaky_relu(vjp, float(negative_slope), x)


# ------------------------------------------------------------------------------- sigmoid, tanh

def _sigmoid_forward(_, x):
    return lax.logistic(x)  # 1 / (1 + exp(-x)), finite for any x


def _sigmoid_fwd(_, x):
    y = lax.logistic(x)
    return y, y


def _sigmoid_bwd(_, y, g):
    return (g * y * (1 - y),)


_sigmoid = two_gradients(_sigmoid_forward, _sigmoid_fwd, _sigmoid_bwd)


@register()
def sigmoid(x, *, vjp: str = "custom"):
    """``y = 1 / (1 + exp(-x))``. Backward rule from the saved output: ``dx = g y (1 - y)``.

    Smooth: both paths give the derivative everywhere (0 at ``+-inf``)."""
    _checked("sigmoid", x, vjp)
    return _sigmoid(vjp, None, x)


def _tanh_forward(_, x):
    return jnp.tanh(x)


def _tanh_fwd(_, x):
    y = jnp.tanh(x)
    return y, y


def _tanh_bwd(_, y, g):
    return (g * (1 - y * y),)


_tanh = two_gradients(_tanh_forward, _tanh_fwd, _tanh_bwd)


@register()
def tanh(x, *, vjp: str = "custom"):
    """``y = tanh(x)``. Backward rule from the saved output: ``dx = g (1 - y^2)``.

    Smooth: both paths give the derivative everywhere (0 at ``+-inf``)."""
    _checked("tanh", x, vjp)
    return _tanh(vjp, None, x)


# ------------------------------------------------------------------------------- softmax family

def _shifted(axis, x):
    # Subtracting the (constant) max keeps exp() finite for logits of any size; softmax is
    # shift-invariant, so the shift carries no gradient. An empty input (an empty batch, or an
    # empty axis, which has no max) has nothing to shift: the result is empty, as in PyTorch.
    if x.size == 0:
        return x
    return x - lax.stop_gradient(x.max(axis=axis, keepdims=True))


def _softmax_forward(axis, x):
    e = jnp.exp(_shifted(axis, x))
    return e / e.sum(axis=axis, keepdims=True)


def _softmax_fwd(axis, x):
    y = _softmax_forward(axis, x)
    return y, y


def _softmax_bwd(axis, y, g):
    return (y * (g - (g * y).sum(axis=axis, keepdims=True)),)


_softmax = two_gradients(_softmax_forward, _softmax_fwd, _softmax_bwd)


@register()
def softmax(x, dim: int = -1, *, vjp: str = "custom"):
    """``y = exp(x - max x) / sum exp(x - max x)`` along ``dim`` (finite for logits of 1e4).

    Backward rule (Jacobian ``diag(y) - y y^T``): ``dx = y (g - sum(g y))``.

    Smooth: the shift by the max carries no gradient, so ties for the max do not matter, and
    both paths give the derivative (a ``-inf`` entry, a masked one, gets ``y = 0``, ``dx = 0``).
    """
    _checked("softmax", x, vjp)
    return _softmax(vjp, _axis("softmax", x, dim), x)


def _log_softmax_forward(axis, x):
    z = _shifted(axis, x)
    return z - jnp.log(jnp.exp(z).sum(axis=axis, keepdims=True))


def _log_softmax_fwd(axis, x):
    y = _log_softmax_forward(axis, x)
    return y, y


def _log_softmax_bwd(axis, y, g):
    return (g - jnp.exp(y) * g.sum(axis=axis, keepdims=True),)


_log_softmax = two_gradients(_log_softmax_forward, _log_softmax_fwd, _log_softmax_bwd)


@register()
def log_softmax(x, dim: int = -1, *, vjp: str = "custom"):
    """``y = z - log sum exp z`` with ``z = x - max x`` along ``dim``: finite for logits of 1e4.

    Backward rule (Jacobian ``I - 1 softmax^T``): ``dx = g - exp(y) sum(g)``.

    Smooth: the shift by the max carries no gradient, so ties for the max do not matter, and
    both paths give the derivative (a ``-inf`` entry gets ``y = -inf``, ``dx = g``).
    """
    _checked("log_softmax", x, vjp)
    return _log_softmax(vjp, _axis("log_softmax", x, dim), x)


# ------------------------------------------------------------------------------- smooth and
# piecewise activations whose rule is dx = g f'(x), f' written out from the saved input

def _with_derivative(forward, derivative):
    """An elementwise op that saves ``x`` and whose backward rule is ``dx = g f'(x)``, with the
    hand-written ``derivative(config, x) = f'(x)``, itself differentiable (second order)."""

    def fwd(cfg, x):
        return forward(cfg, x), x

    def bwd(cfg, x, g):
        return (g * derivative(cfg, x),)

    return two_gradients(forward, fwd, bwd)


def _zero_where(mask, x):
    # Where another branch is taken, a harmless 0 replaces x, so that an exp() that branch
    # would overflow gives no inf * 0 = NaN in the gradient (the "double where").
    return jnp.where(mask, jnp.zeros((), x.dtype), x)


def _straight_at(kink, value, slope, x):
    """``value`` with derivative ``slope`` and curvature 0 where ``kink``: PyTorch's double
    backward takes the second derivative at a kink point from the other side (its first
    derivative uses ``x <= kink``, its second ``x < kink``), and so do both paths here."""
    straight = lax.stop_gradient(value) + slope * (x - lax.stop_gradient(x))
    return jnp.where(kink, straight, value)


_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi)
_GELU_KAPPA = 0.044715


def _gelu_tanh_inner(x):
    return jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_KAPPA * x * x * x))


def _gelu_forward(approximate, x):
    if approximate == "tanh":
        return 0.5 * x * (1 + _gelu_tanh_inner(x))
    return 0.5 * x * (1 + lax.erf(x * _SQRT_HALF))


def _gelu_derivative(approximate, x):
    if approximate == "tanh":
        t = _gelu_tanh_inner(x)
        inner_slope = _SQRT_2_OVER_PI * (1 + 3 * _GELU_KAPPA * x * x)
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * inner_slope
    return 0.5 * (1 + lax.erf(x * _SQRT_HALF)) + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI


_gelu = _with_derivative(_gelu_forward, _gelu_derivative)


@register()
def gelu(x, approximate: str = "none", *, vjp: str = "custom"):
    """``x Phi(x)`` with ``Phi`` the standard normal CDF, ``0.5 x (1 + erf(x / sqrt 2))``; with
    ``approximate="tanh"``, ``0.5 x (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``
    (``torch.nn.functional.gelu``). Smooth: both paths give the derivative everywhere.

    Backward rule: ``dx = g (Phi(x) + x phi(x))`` with ``phi(x) = exp(-x^2/2) / sqrt(2 pi)``;
    for tanh, ``dx = g (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2))``,
    ``t = tanh(u)``.
    """
    _checked("gelu", x, vjp)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _gelu(vjp, approximate, x)


def _sigmoid_of_exp_minus_abs(x):
    """``sigmoid(x)`` from ``e = exp(-|x|)``: ``1 / (1 + e)`` where ``x >= 0``, ``e / (1 + e)``
    below; within an ulp of ``lax.logistic`` (``1 / (1 + exp(-x))``). The exponent is never
    positive, so nothing overflows, and each branch is smooth (``-|x|`` is taken branch by
    branch, so derivatives of any order hold at 0 too). Inside SiLU, XLA:CPU evaluates it
    faster: the network of experiments/time_to_accuracy trained in 0.92 of the time (AMD EPYC
    of docs/BENCHMARKS.md). Not everywhere: a lone sigmoid's forward and gradient, under XLA's
    default emitters, took 1.28 ms against ``lax.logistic``'s 0.94, so :func:`sigmoid` keeps
    ``lax.logistic``."""
    nonnegative = x >= 0
    e = jnp.exp(jnp.where(nonnegative, -x, x))
    return jnp.where(nonnegative, 1, e) / (1 + e)


def _silu_forward(_, x):
    return x * _sigmoid_of_exp_minus_abs(x)


def _silu_derivative(_, x):
    s = _sigmoid_of_exp_minus_abs(x)
    return s * (1 + x * (1 - s))


_silu = _with_derivative(_silu_forward, _silu_derivative)


@register()
def silu(x, *, vjp: str = "custom"):
    """``x sigmoid(x)`` (swish). Smooth: both paths give the derivative everywhere.

    Backward rule: ``dx = g s (1 + x (1 - s))`` with ``s = sigmoid(x)``.
    """
    _checked("silu", x, vjp)
    return _silu(vjp, None, x)


def _elu_linear(x):
    """Where elu is ``x``: not ``x <= 0``, so a NaN too, whose gradient passes as torch's
    (``x <= 0 ? g alpha exp(x) : g``)."""
    return jnp.logical_not(x <= 0)


def _elu_forward(alpha, x):
    linear = _elu_linear(x)
    negative = _straight_at(x == 0, alpha * jnp.expm1(_zero_where(linear, x)), alpha, x)
    return jnp.where(linear, x, negative)


def _elu_derivative(alpha, x):
    linear = _elu_linear(x)
    slope = _straight_at(x == 0, alpha * jnp.exp(_zero_where(linear, x)), 0.0, x)
    return jnp.where(linear, jnp.ones((), x.dtype), slope)


_elu = _with_derivative(_elu_forward, _elu_derivative)


@register()
def elu(x, alpha: float = 1.0, *, vjp: str = "custom"):
    """``x`` if ``x > 0`` else ``alpha (exp(x) - 1)`` (``torch.nn.functional.elu``).

    Backward rule: ``dx = g`` where ``x > 0`` or ``x`` is NaN (not ``x <= 0``, as PyTorch's),
    else ``g alpha exp(x)``. At ``x == 0`` (a kink unless ``alpha == 1``) both paths take the
    left derivative ``alpha`` and second derivative 0 (the right one), as PyTorch's backward
    and double backward.
    """
    _checked("elu", x, vjp)
    return _elu(vjp, float(alpha), x)


class SoftplusConfig(NamedTuple):
    beta: float
    threshold: float


def _softplus_forward(cfg, x):
    bx = x * cfg.beta
    linear = bx > cfg.threshold
    log_branch = jnp.log1p(jnp.exp(_zero_where(linear, bx))) / cfg.beta
    log_branch = _straight_at(bx == cfg.threshold, log_branch, _logistic(cfg.threshold), x)
    return jnp.where(linear, x, log_branch)


def _softplus_derivative(cfg, x):
    bx = x * cfg.beta
    linear = bx > cfg.threshold
    slope = _straight_at(bx == cfg.threshold, lax.logistic(_zero_where(linear, bx)), 0.0, x)
    return jnp.where(linear, jnp.ones((), x.dtype), slope)


def _logistic(t: float) -> float:
    """A Python float's sigmoid (the same two branches as :func:`_sigmoid_of_exp_minus_abs`)."""
    return 1 / (1 + math.exp(-t)) if t >= 0 else math.exp(t) / (1 + math.exp(t))


_softplus = _with_derivative(_softplus_forward, _softplus_derivative)


@register()
def softplus(x, beta: float = 1.0, threshold: float = 20.0, *, vjp: str = "custom"):
    """``log(1 + exp(beta x)) / beta``, and ``x`` itself where ``beta x > threshold``
    (``torch.nn.functional.softplus``; the switch is a small jump, as in PyTorch).

    Backward rule: ``dx = g sigmoid(beta x)``, and ``dx = g`` where ``beta x > threshold``;
    at ``beta x == threshold`` both paths take the log branch's ``sigmoid(threshold)`` and
    second derivative 0 (the linear side's), as PyTorch's backward and double backward.
    """
    _checked("softplus", x, vjp)
    if beta == 0:
        raise ValueError("softplus: beta must be nonzero (it divides), got 0")
    return _softplus(vjp, SoftplusConfig(float(beta), float(threshold)), x)


class HardtanhConfig(NamedTuple):
    min_val: float
    max_val: float


def _hardtanh_forward(cfg, x):
    # where, not clip: autodiff of clip gives 1/2 at the bounds, PyTorch gives 0.
    return jnp.where(x <= cfg.min_val, jnp.asarray(cfg.min_val, x.dtype),
                     jnp.where(x >= cfg.max_val, jnp.asarray(cfg.max_val, x.dtype), x))


def _hardtanh_derivative(cfg, x):
    # "not at or beyond a bound", not "strictly inside": a NaN passes its gradient, as the
    # forward passes the NaN (and as autodiff of the where differentiates it)
    clamped = (x <= cfg.min_val) | (x >= cfg.max_val)
    return (~clamped).astype(x.dtype)


_hardtanh = _with_derivative(_hardtanh_forward, _hardtanh_derivative)


@register()
def hardtanh(x, min_val: float = -1.0, max_val: float = 1.0, *, vjp: str = "custom"):
    """``x`` clamped to ``[min_val, max_val]`` (``torch.nn.functional.hardtanh``).

    Backward rule: ``dx = g [min_val < x < max_val]``: zero AT the bounds too (both paths take
    that subgradient, as PyTorch); a NaN input, which the forward passes, passes ``g``.
    """
    _checked("hardtanh", x, vjp)
    if min_val > max_val:
        raise ValueError(f"hardtanh: min_val must not exceed max_val, got min_val={min_val!r}, "
                         f"max_val={max_val!r}")
    return _hardtanh(vjp, HardtanhConfig(float(min_val), float(max_val)), x)


# ------------------------------------------------ hyperparameter spaces (tests, audit)

def _activation_case(name, torch_name, extra=(), kinks=None):
    """Builder for an elementwise op; ``kinks(config)`` lists the inputs where its derivative
    jumps, which a config with ``kinks=True`` places in the input."""
    def build(rng, c, dtype):
        kw = {k: c[k] for k in extra}
        fn = S.op(name)
        x = S.elementwise_input(rng, c, dtype)
        if c.get("kinks"):
            x = S.at_kinks(x, kinks(c))
        return S.Case(name, c, {"x": x},
                    lambda x, vjp="custom": fn(x, vjp=vjp, **kw),
                    lambda torch, x: getattr(torch.nn.functional, torch_name)(x, **kw))
    return build


def _softmax_like_case(name):
    def build(rng, c, dtype):
        fn = S.op(name)
        return S.Case(name, c, {"x": S.elementwise_input(rng, c, dtype)},
                    lambda x, vjp="custom": fn(x, c["dim"], vjp=vjp),
                    lambda torch, x: getattr(torch.nn.functional, name)(x, dim=c["dim"]))
    return build


S.register_space(
    "relu",
    dict(shape=S.SHAPES, zeros=(False, True)),
    _activation_case("relu", "relu"),
    ({"zeros": True},))

S.register_space(
    "leaky_relu",
    dict(shape=S.SHAPES, negative_slope=(0.01, 0.2), zeros=(False, True)),
    _activation_case("leaky_relu", "leaky_relu", ("negative_slope",)),
    ({"zeros": True},))

S.register_space(
    "sigmoid",
    dict(shape=S.SHAPES, scale=(1.0, 30.0)),
    _activation_case("sigmoid", "sigmoid"),
    ({"scale": 30.0},))

S.register_space(
    "tanh",
    dict(shape=S.SHAPES, scale=(1.0, 30.0)),
    _activation_case("tanh", "tanh"),
    ({"scale": 30.0},))

S.register_space(
    "softmax",
    dict(shape=S.SHAPES, dim=(-1, 0, 1), scale=(1.0, 1e4)),
    _softmax_like_case("softmax"),
    ({"scale": 1e4},))

S.register_space(
    "log_softmax",
    dict(shape=S.SHAPES, dim=(-1, 0, 1), scale=(1.0, 1e4)),
    _softmax_like_case("log_softmax"),
    ({"scale": 1e4},))

S.register_space(
    "gelu",
    dict(shape=S.SHAPES, approximate=("none", "tanh"), scale=(1.0, 5.0)),
    _activation_case("gelu", "gelu", ("approximate",)),
    ({"approximate": "tanh"}, {"scale": 5.0, "approximate": "tanh"}))

S.register_space(
    "silu",
    dict(shape=S.SHAPES, scale=(1.0, 30.0)),
    _activation_case("silu", "silu"),
    ({"scale": 30.0},))

# scale 100: exp overflows float32 where the other branch is taken
S.register_space(
    "elu",
    dict(shape=S.SHAPES, alpha=(1.0, 0.5, 2.0), zeros=(False, True), scale=(1.0, 100.0)),
    _activation_case("elu", "elu", ("alpha",)),
    ({"scale": 100.0}, {"zeros": True, "alpha": 0.5}))

S.register_space(
    "softplus",
    dict(shape=S.SHAPES, beta=(1.0, 2.0, -0.5), threshold=(20.0, 2.0), scale=(1.0, 30.0),
         kinks=(False, True)),
    _activation_case("softplus", "softplus", ("beta", "threshold"),
                     lambda c: (c["threshold"] / c["beta"],)),
    ({"scale": 30.0}, {"kinks": True, "beta": 2.0, "threshold": 2.0},
     {"kinks": True, "beta": -0.5, "scale": 30.0}))

S.register_space(
    "hardtanh",
    dict(shape=S.SHAPES, min_val=(-1.0, -0.5, 0.0), max_val=(1.0, 2.0, 0.0),
         scale=(1.0, 3.0), kinks=(False, True)),
    _activation_case("hardtanh", "hardtanh", ("min_val", "max_val"),
                     lambda c: (c["min_val"], c["max_val"])),
    ({"scale": 3.0}, {"kinks": True}, {"kinks": True, "min_val": 0.0, "max_val": 0.0}))
