"""Inverted dropout with an explicit PRNG key: ``dropout``."""
from __future__ import annotations

import jax
import numpy as np
from jax import numpy as jnp

from .. import _checks
from ._registry import check_vjp, register, two_gradients


def _forward(p, x, keep):
    return jnp.where(keep, x * np.array(1 / (1 - p), x.dtype), jnp.zeros((), x.dtype))


def _fwd(p, x, keep):
    return _forward(p, x, keep), keep


def _bwd(p, keep, g):
    return _forward(p, g, keep), None  # the mask is not differentiable


_dropout = two_gradients(_forward, _fwd, _bwd)


@register()
def dropout(x, p: float = 0.5, training: bool = True, *, key=None, vjp: str = "custom"):
    """Zero each element with probability ``p`` and scale survivors by ``1 / (1 - p)``.

    The keep-mask ``m ~ Bernoulli(1 - p)`` is drawn from ``key`` (so the same key gives the same
    mask). Identity when ``training`` is False or ``p == 0``; all zeros when ``p == 1``.

    Backward rule: the map is diagonal and linear, ``dx = g m / (1 - p)`` (both paths; no
    kinks).
    """
    check_vjp("dropout", vjp)
    _checks.check_floating("dropout", x)
    _checks.check_probability("dropout", "p", p)
    if not training or p == 0:
        return x
    if p == 1:
        return jnp.zeros_like(x)
    if key is None:
        raise ValueError("dropout: training with p > 0 needs a PRNG key (pass key=...), got None")
    keep = jax.random.bernoulli(key, 1 - p, jnp.shape(x))
    return _dropout(vjp, float(p), x, keep)
