"""Input validation shared by ops and layers.

Every check names the op or layer (``where``), what it expected and what it got, and runs on
static shapes and dtypes, so bad input is reported in Python before XLA sees it.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax import numpy as jnp


def check_floating(where: str, x, what: str = "input") -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{where}: expected a floating-point {what}, got dtype {dtype}")


def check_rank(where: str, shape: Sequence[int], ranks: Sequence[int], layout: str = "") -> None:
    if len(shape) not in tuple(ranks):
        want = " or ".join(f"{r}-D" for r in ranks)
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{where}: expected a {want} input{hint}, got shape {tuple(shape)}")


def check_channels(where: str, shape: Sequence[int], expected: int, axis: int = 1,
                   context: str = "") -> None:
    got = shape[axis]
    if got != expected:
        extra = f" {context}" if context else ""
        raise ValueError(f"{where}: expected {expected} channels at axis {axis}{extra}, "
                         f"got {got} (input shape {tuple(shape)})")


def int_pair(where: str, name: str, value, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints (PyTorch's ``_pair``), each at least ``minimum``."""
    if isinstance(value, (int, np.integer)):
        pair = (value, value)
    elif isinstance(value, (tuple, list)):
        pair = tuple(value)
    else:
        pair = ()
    if len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                 for v in pair):
        raise TypeError(f"{where}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_probability(where: str, name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{where}: {name} must be in [0, 1], got {p!r}")


def concrete_or_none(x):
    """``x`` as a numpy array when its value is known now (not traced under jit), else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_labels(where: str, labels, num_classes: int) -> None:
    dtype = jnp.result_type(labels)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{where}: expected integer class labels, got dtype {dtype}")
    values = concrete_or_none(labels)
    if values is not None and values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{where}: labels must lie in [0, {num_classes}), "
                             f"got values in [{lo}, {hi}]")
