"""Elementwise activations and the (log-)softmax family."""
from __future__ import annotations

import numpy as np
from jax import lax
from jax import numpy as jnp

from .. import _checks
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
    return jnp.where(x > 0, x, jnp.zeros((), x.dtype))


def _relu_fwd(_, x):
    return _relu_forward(_, x), x > 0


def _relu_bwd(_, positive, g):
    return (jnp.where(positive, g, jnp.zeros((), g.dtype)),)


_relu = two_gradients(_relu_forward, _relu_fwd, _relu_bwd)


@register()
def relu(x, *, vjp: str = "custom"):
    """``max(x, 0)``. Backward rule: ``dx = g [x > 0]`` (zero at ``x == 0``, as PyTorch)."""
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

    Backward rule: ``dx = g`` where ``x > 0``, else ``slope g`` (at 0 too, as PyTorch).
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
    """``y = 1 / (1 + exp(-x))``. Backward rule from the saved output: ``dx = g y (1 - y)``."""
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
    """``y = tanh(x)``. Backward rule from the saved output: ``dx = g (1 - y^2)``."""
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
    """
    _checked("log_softmax", x, vjp)
    return _log_softmax(vjp, _axis("log_softmax", x, dim), x)
