"""Combinators: build networks out of layers (``serial`` is a fold, as in ``stax``).

Params and state of a combinator are tuples of its children's, so tree paths read like PyTorch's
``nn.Sequential`` names (``"2.0.weight"``). ``train``, ``vjp`` and a split of ``key`` are passed
down to every child. Errors raised inside a child are re-raised with its position prepended, so
a message reads ``serial[2] > serial[0] > Conv2d: expected 3 channels ...``. ``serial`` and
``parallel`` record their layers (``.children``) and how they feed them (``.wiring``), which
:func:`functional_cnn.summary` walks; ``residual`` is a ``serial`` named ``"residual"``.
"""
from __future__ import annotations

import jax
from jax import numpy as jnp

from .layers import Identity, Layer, named_layer


def _split(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def _located(where: str, index: int, fn, *args, **kwargs):
    """Call ``fn``, prefixing our own ValueError/TypeError messages with the child's position."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        if type(err) not in (ValueError, TypeError):
            raise
        raise type(err)(f"{where}[{index}] > {err}") from err


def serial(*layers: Layer) -> Layer:
    """Compose layers left to right: ``serial(f, g)(x) = g(f(x))``."""

    def init(key, input_shape):
        params, states = [], []
        for i, (layer, k) in enumerate(zip(layers, _split(key, len(layers)))):
            input_shape, p, s = _located("serial", i, layer.init, k, input_shape)
            params.append(p)
            states.append(s)
        return input_shape, tuple(params), tuple(states)

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        new_states = []
        for i, (layer, p, s, k) in enumerate(zip(layers, params, state,
                                                 _split(key, len(layers)))):
            x, s = _located("serial", i, layer.apply, p, s, x, train=train, key=k, vjp=vjp)
            new_states.append(s)
        return x, tuple(new_states)

    return Layer(init, apply, name="serial", children=layers, wiring="serial")


def parallel(*layers: Layer) -> Layer:
    """Apply the i-th layer to the i-th element of a tuple input; returns a tuple."""

    def _check_arity(inputs, what):
        if not isinstance(inputs, (tuple, list)) or len(inputs) != len(layers):
            raise ValueError(f"parallel: expected a tuple of {len(layers)} {what} (one per "
                             f"layer), got {type(inputs).__name__} of length "
                             f"{len(inputs) if isinstance(inputs, (tuple, list)) else 'n/a'}")

    def init(key, input_shape):
        _check_arity(input_shape, "input shapes")
        results = [_located("parallel", i, layer.init, k, shape) for i, (layer, k, shape)
                   in enumerate(zip(layers, _split(key, len(layers)), input_shape))]
        shapes, params, states = zip(*results) if results else ((), (), ())
        return tuple(shapes), tuple(params), tuple(states)

    def apply(params, state, inputs, *, train=False, key=None, vjp="custom"):
        _check_arity(inputs, "inputs")
        results = [_located("parallel", i, layer.apply, p, s, x, train=train, key=k, vjp=vjp)
                   for i, (layer, p, s, x, k) in enumerate(
                       zip(layers, params, state, inputs, _split(key, len(layers))))]
        outputs, states = zip(*results) if results else ((), ())
        return tuple(outputs), tuple(states)

    return Layer(init, apply, name="parallel", children=layers, wiring="parallel")


@named_layer
def fan_out(n: int) -> Layer:
    """Copy the input into an ``n``-tuple."""

    def init(key, input_shape):
        return (tuple(input_shape),) * n, {}, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        return (x,) * n, state

    return Layer(init, apply)


@named_layer
def fan_in_sum() -> Layer:
    """Sum a tuple of equally shaped inputs."""

    def init(key, input_shape):
        shapes = [tuple(s) for s in input_shape]
        if len(set(shapes)) != 1:
            raise ValueError(f"fan_in_sum: expected inputs of one shape, got shapes {shapes}")
        return shapes[0], {}, {}

    def apply(params, state, inputs, *, train=False, key=None, vjp="custom"):
        total = inputs[0]
        for x in inputs[1:]:
            total = total + x
        return total, state

    return Layer(init, apply)


@named_layer
def fan_in_concat(axis: int = 1) -> Layer:
    """Concatenate a tuple of inputs along ``axis`` (channels by default)."""

    def init(key, input_shape):
        shapes = [tuple(s) for s in input_shape]
        ax = axis % len(shapes[0])
        rest = {s[:ax] + s[ax + 1:] for s in shapes}
        if len(rest) != 1:
            raise ValueError(f"fan_in_concat: inputs must agree on every axis but {axis}, "
                             f"got shapes {shapes}")
        sizes = [s[ax] for s in shapes]
        size = -1 if any(d < 0 for d in sizes) else sum(sizes)
        return shapes[0][:ax] + (size,) + shapes[0][ax + 1:], {}, {}

    def apply(params, state, inputs, *, train=False, key=None, vjp="custom"):
        return jnp.concatenate(inputs, axis=axis), state

    return Layer(init, apply)


def residual(*layers: Layer, shortcut: Layer | None = None) -> Layer:
    """``x -> serial(*layers)(x) + shortcut(x)`` (identity shortcut by default).

    A ResNet basic block is one expression::

        serial(residual(Conv2d(c, 3, padding=1), BatchNorm2d(), ReLU(),
                        Conv2d(c, 3, padding=1), BatchNorm2d()), ReLU())

    Params/state: ``({}, (main_branch, shortcut), {})``.
    """
    block = serial(fan_out(2), parallel(serial(*layers), shortcut or Identity()), fan_in_sum())
    return block._replace(name="residual")
