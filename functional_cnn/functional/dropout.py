"""Inverted dropout with an explicit PRNG key: ``dropout`` (elementwise) and
``dropout2d`` (whole channels)."""
from __future__ import annotations

import jax
import numpy as np
from jax import numpy as jnp

from .. import _checks
from . import _spaces as S
from ._registry import check_vjp, register, two_gradients


def _forward(p, x, keep):
    return jnp.where(keep, x * np.array(1 / (1 - p), x.dtype), jnp.zeros((), x.dtype))


def _fwd(p, x, keep):
    return _forward(p, x, keep), keep


def _bwd(p, keep, g):
    return _forward(p, g, keep), None  # the mask is not differentiable


_dropout = two_gradients(_forward, _fwd, _bwd)


def _masked(where, x, p, training, key, mask_shape, vjp):
    """The checks and plumbing both dropouts share; ``mask_shape(shape)`` is the shape of the
    keep-mask, broadcast against ``x``."""
    check_vjp(where, vjp)
    _checks.check_floating(where, x)
    _checks.check_probability(where, "p", p)
    if not training or p == 0:
        return x
    if p == 1:
        return jnp.zeros_like(x)
    if key is None:
        raise ValueError(f"{where}: training with p > 0 needs a PRNG key (pass key=...), "
                         f"got None")
    keep = jax.random.bernoulli(key, 1 - p, mask_shape(jnp.shape(x)))
    return _dropout(vjp, float(p), x, keep)


@register()
def dropout(x, p: float = 0.5, training: bool = True, *, key=None, vjp: str = "custom"):
    """Zero each element with probability ``p`` and scale survivors by ``1 / (1 - p)``.

    The keep-mask ``m ~ Bernoulli(1 - p)`` is drawn from ``key`` (so the same key gives the same
    mask). Identity when ``training`` is False or ``p == 0``; all zeros when ``p == 1``.

    Backward rule: the map is diagonal and linear, ``dx = g m / (1 - p)`` (both paths; no
    kinks).
    """
    return _masked("dropout", x, p, training, key, lambda shape: shape, vjp)


def channel_mask_shape(shape):
    """One keep decision per (sample, channel), broadcast over the remaining axes."""
    return tuple(shape[:2]) + (1,) * (len(shape) - 2)


@register()
def dropout2d(x, p: float = 0.5, training: bool = True, *, key=None, vjp: str = "custom"):
    """Zero whole channels of ``x (N, C, H, W)`` with probability ``p``, scale the kept ones by
    ``1 / (1 - p)`` (``torch.nn.functional.dropout2d``).

    The keep-mask ``m[n, c] ~ Bernoulli(1 - p)`` is drawn from ``key`` and broadcast over the
    spatial axes. A 3-D input is read as ``(N, C, L)``, as PyTorch currently does (it warns
    that this may change). Identity when ``training`` is False or ``p == 0``.

    Backward rule: the map is diagonal and linear, ``dx[n, c] = g[n, c] m[n, c] / (1 - p)``.
    Linear in ``x`` given the mask: both paths scale the gradient by the same mask.
    """
    _checks.check_rank("dropout2d", jnp.shape(x), (3, 4), "(N, C, L) or (N, C, H, W)")
    return _masked("dropout2d", x, p, training, key, channel_mask_shape, vjp)


# ------------------------------------------------ hyperparameter spaces (tests, audit)

def _dropout_case(name, mask_shape):
    """Builder for ``dropout`` / ``dropout2d``, whose keep-mask has shape ``mask_shape(x)``."""
    def build(rng, c, dtype):
        key = jax.random.key(c["seed"])
        x = S.elementwise_input(rng, c, dtype)
        p, training = c["p"], c["training"]
        fn = S.op(name)

        def torch_call(torch, x):  # torch cannot replay JAX's random stream: same mask, its math
            if not training or p == 0:
                return x * 1
            if p == 1:
                return x * 0
            keep = np.array(jax.random.bernoulli(key, 1 - p, mask_shape(x.shape)))
            return x * torch.as_tensor(keep) / (1 - p)

        return S.Case(name, c, {"x": x},
                    lambda x, vjp="custom": fn(x, p, training, key=key, vjp=vjp), torch_call)
    return build


S.register_space(
    "dropout",
    dict(shape=S.SHAPES, p=(0.5, 0.1, 0.0, 1.0), training=(True, False), seed=(0, 1)),
    _dropout_case("dropout", tuple),
    ({"p": 1.0}, {"training": False}, {"p": 0.0}))

S.register_space(
    "dropout2d",
    dict(shape=((2, 3, 4, 5), (2, 3, 6), (1, 2, 3, 3)), p=(0.5, 0.1, 0.0, 1.0),
         training=(True, False), seed=(0, 1)),
    _dropout_case("dropout2d", channel_mask_shape),
    ({"shape": (2, 3, 6)}, {"p": 1.0}, {"training": False}, {"p": 0.0}))
