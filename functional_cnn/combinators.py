"""Combinators: build networks out of layers (``serial`` is a fold, as in ``stax``).

Params and state of a combinator are tuples of its children's, so tree paths read like PyTorch's
``nn.Sequential`` names (``"2.0.weight"``). ``train``, ``vjp`` and a split of ``key`` are passed
down to every child. Errors raised inside a child are re-raised with its position prepended, so
a message reads ``serial[2] > serial[0] > Conv2d: expected 3 channels ...``. ``serial`` and
``parallel`` record their layers (``.children``) and how they feed them (``.wiring``), which
:func:`functional_cnn.summary` walks; ``residual`` is a ``serial`` named ``"residual"``.
:func:`frozen` wraps one layer and holds its parameters fixed, as state.
"""
from __future__ import annotations

import jax
from jax import numpy as jnp

from . import _checks
from .layers import Identity, Layer, named_layer


def _split(where, key, n):
    """One key per child (``None`` for all where ``key`` is None: layers without parameters
    or dropout need none, and those that do say so)."""
    _checks.check_key(where, key, optional=True)
    return [None] * n if key is None else list(jax.random.split(key, n))


def _check_children(where: str, what: str, tree, n: int) -> None:
    """A combinator's params or state: a tuple of one entry per child (``zip`` would silently
    drop the children past a shorter tuple)."""
    if not isinstance(tree, (tuple, list)) or len(tree) != n:
        raise ValueError(f"{where}: expected {what} as a tuple of {n} entries (one per layer), "
                         f"got {_checks.describe(tree)}")


def _check_no_params(where: str, params, state) -> None:
    _checks.check_keys(where, "params", params, ())
    _checks.check_keys(where, "state", state, ())


def _input_shapes(where: str, input_shape, n: int | None = None) -> list[tuple[int, ...]]:
    """``init``'s tuple of input shapes (``n`` of them, where given; at least one)."""
    shapes = input_shape if isinstance(input_shape, (tuple, list)) else None
    if shapes is None or (len(shapes) != n if n is not None else not shapes) or \
            not all(isinstance(s, (tuple, list)) for s in shapes):
        count = "" if n is None else f"{n} "
        raise TypeError(f"{where}: init expected a tuple of {count}input shapes (one per "
                        f"input), got {input_shape!r}")
    return [_checks.check_input_shape(where, s) for s in shapes]


def _input_arrays_shapes(where: str, inputs) -> list[tuple[int, ...]]:
    """``apply``'s tuple of input arrays, as their shapes."""
    if not isinstance(inputs, (tuple, list)) or not inputs or \
            not all(hasattr(x, "shape") for x in inputs):
        raise TypeError(f"{where}: expected a tuple of input arrays, got "
                        f"{_checks.describe(inputs)}")
    return [tuple(x.shape) for x in inputs]


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
        for i, (layer, k) in enumerate(zip(layers, _split("serial", key, len(layers)))):
            input_shape, p, s = _located("serial", i, layer.init, k, input_shape)
            params.append(p)
            states.append(s)
        return input_shape, tuple(params), tuple(states)

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        _check_children("serial", "params", params, len(layers))
        _check_children("serial", "state", state, len(layers))
        new_states = []
        for i, (layer, p, s, k) in enumerate(zip(layers, params, state,
                                                 _split("serial", key, len(layers)))):
            x, s = _located("serial", i, layer.apply, p, s, x, train=train, key=k, vjp=vjp)
            new_states.append(s)
        return x, tuple(new_states)

    return Layer(init, apply, name="serial", children=layers, wiring="serial")


def parallel(*layers: Layer) -> Layer:
    """Apply the i-th layer to the i-th element of a tuple input; returns a tuple."""

    def init(key, input_shape):
        shapes = _input_shapes("parallel", input_shape, len(layers))
        results = [_located("parallel", i, layer.init, k, shape) for i, (layer, k, shape)
                   in enumerate(zip(layers, _split("parallel", key, len(layers)), shapes))]
        shapes, params, states = zip(*results) if results else ((), (), ())
        return tuple(shapes), tuple(params), tuple(states)

    def apply(params, state, inputs, *, train=False, key=None, vjp="custom"):
        for what, tree in (("inputs", inputs), ("params", params), ("state", state)):
            _check_children("parallel", what, tree, len(layers))
        results = [_located("parallel", i, layer.apply, p, s, x, train=train, key=k, vjp=vjp)
                   for i, (layer, p, s, x, k) in enumerate(
                       zip(layers, params, state, inputs, _split("parallel", key, len(layers))))]
        outputs, states = zip(*results) if results else ((), ())
        return tuple(outputs), tuple(states)

    return Layer(init, apply, name="parallel", children=layers, wiring="parallel")


@named_layer
def fan_out(n: int) -> Layer:
    """Copy the input into an ``n``-tuple."""

    def init(key, input_shape):
        if not isinstance(input_shape, (tuple, list)):  # a shape, or a tuple of them
            raise TypeError(f"fan_out: init expected an input shape, got {input_shape!r}")
        return (tuple(input_shape),) * n, {}, {}

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        _check_no_params("fan_out", params, state)
        return (x,) * n, state

    return Layer(init, apply)


def _same_shapes(where: str, shapes) -> tuple[int, ...]:
    if len(set(shapes)) != 1:
        raise ValueError(f"{where}: expected inputs of one shape, got shapes {shapes}")
    return shapes[0]


@named_layer
def fan_in_sum() -> Layer:
    """Sum a tuple of equally shaped inputs (never broadcast: a size-1 axis is an error)."""
    where = "fan_in_sum"

    def init(key, input_shape):
        return _same_shapes(where, _input_shapes(where, input_shape)), {}, {}

    def apply(params, state, inputs, *, train=False, key=None, vjp="custom"):
        _check_no_params(where, params, state)
        _same_shapes(where, _input_arrays_shapes(where, inputs))
        total = inputs[0]
        for x in inputs[1:]:
            total = total + x
        return total, state

    return Layer(init, apply)


def _concat_axis(where: str, shapes, axis: int) -> int:
    """``axis`` as a non-negative index, after checking that the inputs agree on the rest."""
    ranks = {len(s) for s in shapes}
    rank = ranks.pop() if len(ranks) == 1 else None
    if rank is None or not -rank <= axis < rank:
        raise ValueError(f"{where}: expected inputs of one rank with an axis {axis}, "
                         f"got shapes {shapes}")
    ax = axis % rank
    if len({s[:ax] + s[ax + 1:] for s in shapes}) != 1:
        raise ValueError(f"{where}: inputs must agree on every axis but {axis}, "
                         f"got shapes {shapes}")
    return ax


@named_layer
def fan_in_concat(axis: int = 1) -> Layer:
    """Concatenate a tuple of inputs along ``axis`` (channels by default)."""
    where = "fan_in_concat"

    def init(key, input_shape):
        shapes = _input_shapes(where, input_shape)
        ax = _concat_axis(where, shapes, axis)
        sizes = [s[ax] for s in shapes]
        size = -1 if any(d < 0 for d in sizes) else sum(sizes)
        return shapes[0][:ax] + (size,) + shapes[0][ax + 1:], {}, {}

    def apply(params, state, inputs, *, train=False, key=None, vjp="custom"):
        _check_no_params(where, params, state)
        _concat_axis(where, _input_arrays_shapes(where, inputs), axis)
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


def _merged(where: str, params, state):
    """A layer's params and state as one tree of its state's shape: dicts merged name by name
    (``{"weight", "bias", "running_mean", ...}``, torch's state_dict names), a combinator's
    tuples child by child."""
    if isinstance(params, dict) and isinstance(state, dict):
        shared = sorted(set(params) & set(state))
        if shared:
            raise ValueError(f"{where}: the layer's params and state share the names {shared}: "
                             f"they cannot be held in one state")
        return {**params, **state}
    if not (isinstance(params, (tuple, list)) and isinstance(state, (tuple, list))
            and len(params) == len(state)):
        raise ValueError(f"{where}: expected params and state as dicts, or as tuples of one "
                         f"entry per child, got params {_checks.describe(params)} and state "
                         f"{_checks.describe(state)}")
    return tuple(_merged(where, p, s) for p, s in zip(params, state))


def _unmerged(where: str, merged, params_like):
    """The inverse of :func:`_merged`: ``(params, state)`` out of ``merged``, the params being
    the names (and children) that ``params_like``, the layer's params tree, has."""
    if isinstance(params_like, dict):
        if not isinstance(merged, dict):
            raise ValueError(f"{where}: expected state as a dict, got {_checks.describe(merged)}")
        missing = sorted(set(params_like) - set(merged))
        if missing:
            raise ValueError(f"{where}: expected the frozen params {missing} in the state, got "
                             f"{_checks.describe(merged)}")
        return ({k: merged[k] for k in params_like},
                {k: v for k, v in merged.items() if k not in params_like})
    _check_children(where, "state", merged, len(params_like))
    pairs = [_unmerged(where, m, p) for m, p in zip(merged, params_like)]
    return tuple(p for p, _ in pairs), tuple(s for _, s in pairs)


def _input_shape_of(x) -> tuple:
    """What ``init`` takes for the input ``x``: its shape with the batch as ``-1`` (as init is
    called: a layer may check its batch against a bound that only training applies), or a
    tuple input's shapes."""
    if hasattr(x, "shape"):
        return (-1,) + tuple(x.shape[1:]) if x.ndim else ()
    return tuple(_input_shape_of(part) for part in x)


def frozen(layer: Layer) -> Layer:
    """``layer`` with its parameters held fixed: torch's ``requires_grad_(False)`` on all of
    them, with no optimizer able to touch them either.

    Its params are ``{}``; its state holds the layer's params beside the layer's own state,
    under their names (``frozen(BatchNorm2d())``: ``weight``, ``bias``, ``running_mean``,
    ``running_var``, as in torch's state_dict; a combinator's, child by child). So a trainer
    neither differentiates nor updates them (weight decay included), a checkpoint keeps them,
    and :func:`~functional_cnn.interop.load_state_dict` sets them, e.g. to pretrained or
    data-derived filters. ``apply`` runs ``layer`` on them as constants
    (``lax.stop_gradient``), so the gradient still flows to its input: where nothing before a
    frozen layer is trained, its whole backward pass drops out of the step. Its state still
    changes as the layer's does (a frozen BatchNorm updates its running statistics in
    training, as torch's does).
    """
    where = f"frozen({layer.name})"

    def init(key, input_shape):
        out_shape, params, state = layer.init(key, input_shape)
        return out_shape, {}, _merged(where, params, state)

    def apply(params, state, x, *, train=False, key=None, vjp="custom"):
        _checks.check_keys(where, "params", params, ())
        # which of the state's entries are the layer's params: its init's, traced abstractly
        params_like = jax.eval_shape(lambda: layer.init(jax.random.key(0),
                                                        _input_shape_of(x)))[1]
        fixed, inner = _unmerged(where, state, params_like)
        y, inner = layer.apply(jax.lax.stop_gradient(fixed), inner, x, train=train, key=key,
                               vjp=vjp)
        return y, _merged(where, fixed, inner)

    return Layer(init, apply, name=where)
