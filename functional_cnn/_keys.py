"""Typed PRNG keys in pytrees: checkpoints and replication treat them through their raw data."""
from __future__ import annotations

import jax
from jax import numpy as jnp


def is_prng_key(x) -> bool:
    """Whether ``x`` is a typed ``jax.random.key`` array (not a raw ``uint32`` key)."""
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
