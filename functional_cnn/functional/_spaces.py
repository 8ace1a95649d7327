"""Each op's hyperparameter space, declared in the op's own module by :func:`register_space`.

An :class:`OpSpace` holds

* ``hyper`` -- the values each hyperparameter ranges over (hypothesis samples from it, the
  audit walks it); the first value of each is the default;
* ``edge_cases`` -- configurations that must always be checked (stride above kernel, ceil-mode
  overhang, ties, logits of 1e4, ...), each a partial config over the defaults;
* ``build(rng, config, dtype)`` -- a :class:`Case`: inputs plus the op call and its torch twin.

The tests and ``functional_cnn.audit`` walk them (``functional_cnn.audit.cases``). Nothing here
imports torch: oracles receive the ``torch`` module as an argument. ``functional/__init__``
checks that every registered op has a space, so a new op cannot go untested.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from ._registry import REGISTRY


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


SPACES: dict[str, OpSpace] = {}


def register_space(name: str, hyper: Mapping[str, Sequence], build: Callable,
                   edge_cases: Sequence[dict] = ()) -> OpSpace:
    """Declare the hyperparameter space of the op ``name`` (written below the op)."""
    if name in SPACES:
        raise ValueError(f"register_space: {name!r} has a space already")
    SPACES[name] = OpSpace(hyper, build, tuple(edge_cases))
    return SPACES[name]


def check_complete() -> None:
    """Every registered op has a space (called once the op modules are imported)."""
    missing = sorted(set(REGISTRY) - set(SPACES))
    if missing:
        raise ImportError(f"functional_cnn.functional: no OpSpace for registered ops {missing}; "
                          "call register_space below each op")


def op(name: str) -> Callable:
    """The public function of the registered op ``name``."""
    return REGISTRY[name].fn


# ------------------------------------------------------------- inputs the spaces share

SHAPES = ((2, 3), (1,), (2, 3, 4, 5))  # elementwise ops and losses


def normal(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def ties(x):
    """Quantize to a few levels and clip at 0, so windows hold repeated maxima (as after ReLU)."""
    return np.maximum(np.round(x * 1.5), 0).astype(x.dtype)


def elementwise_input(rng, c, dtype):
    x = normal(rng, tuple(c["shape"]), dtype, c.get("scale", 1.0))
    if c.get("zeros"):  # exact zeros, where relu's derivative convention matters
        x[..., ::2] = 0
    return x


def at_kinks(x, points):
    """Every other element of ``x`` set exactly to one of ``points`` (in turn)."""
    flat = x.reshape(-1)
    flat[::2] = np.resize(np.asarray(points, x.dtype), flat[::2].shape)
    return x
