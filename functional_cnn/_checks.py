"""Input validation shared by ops and layers.

Every check names the op or layer (``where``), what it expected and what it got, and runs on
static shapes and dtypes, so bad input is reported in Python before XLA sees it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax import numpy as jnp


def describe(value) -> str:
    """What came, in a few words, for an error message: ``dict with keys ('weight',)``,
    ``tuple of length 3``, ``array of shape (2, 3) float32``, ``int -1``, ``None``."""
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {tuple(value)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of length {len(value)}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"array of shape {tuple(value.shape)} {value.dtype}"
    return f"{type(value).__name__} {value!r}"


def check_floating(where: str, x, what: str = "input") -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{where}: expected a floating-point {what}, got dtype {dtype}")


def check_weighted_input(where: str, x, weight, bias) -> None:
    """``TypeError`` unless ``x`` is floating-point and ``weight`` and ``bias`` (None skipped)
    have its dtype, as torch refuses them otherwise (conv2d, conv_transpose2d, linear).
    Promoted instead, the result's dtype would depend on which formulation computes it."""
    check_floating(where, x)
    dtype = jnp.result_type(x)
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and jnp.result_type(value) != dtype:
            raise TypeError(f"{where}: expected {name} of the input's dtype {dtype}, got "
                            f"{jnp.result_type(value)}")


def check_rank(where: str, shape: Sequence[int], ranks: Sequence[int], layout: str = "") -> None:
    if len(shape) not in tuple(ranks):
        want = " or ".join(f"{r}-D" for r in ranks)
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{where}: expected a {want} input{hint}, got shape {tuple(shape)}")


def check_spatial_nonempty(where: str, shape: Sequence[int]) -> None:
    """An ``(N, C, H, W)`` input may have no images or no channels, not an empty image: PyTorch's
    convolutions refuse one ("Only zero batch or zero channel inputs are supported")."""
    if 0 in tuple(shape[2:]):
        raise ValueError(f"{where}: expected non-empty spatial dimensions (only the batch or the "
                         f"channels may be 0, as in PyTorch), got input shape {tuple(shape)}")


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


def check_input_shape(where: str, shape) -> tuple[int, ...]:
    """``init``'s input shape: a tuple (or list) of ints, each at least -1 (unknown batch)."""
    if isinstance(shape, (tuple, list)) and all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= -1
            for d in shape):
        return tuple(int(d) for d in shape)
    raise TypeError(f"{where}: init expected an input shape (a tuple of ints, the batch may be "
                    f"-1), got {shape!r}")


def is_key(key) -> bool:
    """A PRNG key: a typed key (``jax.random.key``) or a raw ``uint32[2]`` (``PRNGKey``)."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is None:
        return False
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return shape == ()
    return dtype == jnp.uint32 and shape == (2,)


def check_key(where: str, key, optional: bool = False) -> None:
    """``key`` is one PRNG key (or None, where ``optional``)."""
    if is_key(key) or (optional and key is None):
        return
    want = "a PRNG key (jax.random.key(seed))" + (" or None" if optional else "")
    raise TypeError(f"{where}: expected {want}, got {describe(key)}")


def check_keys(where: str, what: str, tree, names: Sequence[str]) -> None:
    """``tree`` (a layer's params or state) is a dict with exactly the keys ``names``."""
    if isinstance(tree, Mapping) and set(tree) == set(names):
        return
    want = f"{what} with keys {tuple(names)}" if names else f"empty {what} {{}}"
    raise ValueError(f"{where}: expected {want}, got {describe(tree)}")


def check_shape(where: str, name: str, value, expected: Sequence[int | None]) -> None:
    """``value`` is an array of shape ``expected`` (``None``: any size on that axis)."""
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) == len(expected) and all(
            e is None or e == d for e, d in zip(expected, shape)):
        return
    dims = ["*" if e is None else str(e) for e in expected]
    want = f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"
    got = tuple(shape) if shape is not None else describe(value)
    raise ValueError(f"{where}: expected {name} of shape {want}, got {got}")
