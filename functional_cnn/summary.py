"""``summary(net, input_shape)``: a table of a network's layers, like ``torchinfo.summary``.

One row per layer, nested under its combinator and numbered by its path in the params tree
(``2.0`` is ``params[2][0]``, the prefix of :func:`functional_cnn.interop.named_leaves`' names),
with its output shape and the sizes of its params and state; then the totals and the forward
FLOPs that XLA counts in the compiled network.

Nothing is allocated: ``init`` runs under :func:`jax.eval_shape` (a fixed key, shapes only) and
the FLOPs come from compiling ``apply`` on :class:`jax.ShapeDtypeStruct` arguments.
Combinators are walked through ``Layer.children`` and ``Layer.wiring``; a layer without them
(a custom combinator, say) is one row holding everything below it.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax import numpy as jnp

from .layers import Layer

_INIT_KEY = 0


class _Row(NamedTuple):
    depth: int
    path: str
    name: str
    out_shape: tuple
    params: int | None  # None: a combinator, whose children's rows hold the counts
    state: int | None


def _abstract_init(layer: Layer, input_shape):
    """``layer.init`` traced, not run: its output shape and ShapeDtypeStructs of params, state."""
    shapes = []

    def init(key):
        out_shape, params, state = layer.init(key, input_shape)
        shapes.append(out_shape)
        return params, state

    params, state = jax.eval_shape(init, jax.random.key(_INIT_KEY))
    return shapes[0], params, state


def _size(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _bytes(tree) -> int:
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def _feed_serial(children, input_shape, visit):
    for i, child in enumerate(children):
        input_shape = visit(i, child, input_shape)
    return input_shape


def _feed_parallel(children, input_shapes, visit):
    return tuple(visit(i, child, shape)
                 for i, (child, shape) in enumerate(zip(children, input_shapes)))


# Layer.wiring -> how a combinator's init feeds its children; returns the combinator's output
# shape, as its init does.
_FEEDS: dict[str, Callable] = {"serial": _feed_serial, "parallel": _feed_parallel}


def _walk(layer: Layer, input_shape, path: str, depth: int, rows: list) -> tuple:
    """Append the rows of ``layer`` and its descendants, depth first; return its output shape."""
    feed = _FEEDS.get(layer.wiring) if layer.children else None
    if feed is None:
        out_shape, params, state = _abstract_init(layer, input_shape)
        rows.append(_Row(depth, path, layer.name, out_shape, _size(params), _size(state)))
        return out_shape
    own = len(rows)
    rows.append(None)  # the combinator's row goes above its children's, once its shape is known

    def visit(i, child, shape):
        return _walk(child, shape, f"{path}.{i}" if path else str(i), depth + 1, rows)

    out_shape = feed(layer.children, input_shape, visit)
    rows[own] = _Row(depth, path, layer.name, out_shape, None, None)
    return out_shape


def _is_shape(shape) -> bool:
    return isinstance(shape, (tuple, list)) and all(
        isinstance(d, (int, np.integer)) for d in shape)


def _input_structs(input_shape):
    """Float32 ShapeDtypeStructs for ``input_shape`` (a shape, or a tuple of them for a network
    that starts with ``parallel``), a batch axis of -1 taken as 1."""
    if _is_shape(input_shape):
        shape = tuple(int(d) for d in input_shape)
        if shape and shape[0] == -1:
            shape = (1,) + shape[1:]
        return jax.ShapeDtypeStruct(shape, jnp.float32)
    return tuple(_input_structs(s) for s in input_shape)


def _first_shape(input_shape) -> tuple:
    return input_shape if _is_shape(input_shape) else _first_shape(input_shape[0])


def _batch_text(input_shape) -> str:
    """The batch the FLOPs are counted for, as the footer says it."""
    shape = _first_shape(input_shape)
    if not shape:
        return "a scalar input"
    return "batch of 1 for -1" if shape[0] == -1 else f"batch of {shape[0]}"


def _forward_flops(net: Layer, params, state, input_shape) -> float | None:
    """FLOPs of the compiled eval-mode forward, from XLA's cost analysis; None if unavailable.

    ``Compiled.cost_analysis()`` has returned a dict, a one-element list of dicts (one per
    program, older JAX) and None (backends without the analysis)."""
    forward = jax.jit(lambda p, s, x: net.apply(p, s, x)[0])
    compiled = forward.lower(params, state, _input_structs(input_shape)).compile()
    try:
        analysis = compiled.cost_analysis()
    except NotImplementedError:
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = analysis.get("flops") if isinstance(analysis, dict) else None
    return float(flops) if flops is not None and flops >= 0 else None


def _shape_text(shape) -> str:
    if _is_shape(shape):
        return str(tuple(int(d) for d in shape))
    return "(" + ", ".join(_shape_text(s) for s in shape) + ")"


def _count_text(count: int | None) -> str:
    return "--" if not count else f"{count:,}"


def _table(rows: list[_Row]) -> list[str]:
    header = ("Layer", "Output shape", "Params", "State")
    cells = [header] + [("  " * r.depth + (f"{r.path} " if r.path else "") + r.name,
                         _shape_text(r.out_shape), _count_text(r.params), _count_text(r.state))
                        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = [f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:>{widths[2]}}  {c[3]:>{widths[3]}}"
             for c in cells]
    rule = "=" * len(lines[0])
    return [rule, lines[0], rule, *lines[1:], rule]


def _totals(params, state, flops: float | None, batch: str) -> list[str]:
    trainable, non_trainable = _size(params), _size(state)
    memory = _bytes(params) + _bytes(state)
    flops_text = "n/a (no cost analysis from XLA)" if flops is None else f"{flops:,.0f}"
    return [f"Total params: {trainable + non_trainable:,}",
            f"Trainable params: {trainable:,}",
            f"Non-trainable params (state): {non_trainable:,}",
            f"Params + state size: {memory:,} bytes ({memory / 1e6:.2f} MB)",
            f"Forward FLOPs: {flops_text} (XLA cost analysis of the compiled eval forward, "
            f"{batch})"]


def summary(net: Layer, input_shape) -> str:
    """A torchinfo-like table of ``net`` on inputs of ``input_shape``.

    A row per layer, indented under its combinator and prefixed with its path in the params
    tree (``1.0``); columns: the layer's name, its output shape, its parameter count (``params``,
    trained) and state count (``state``, e.g. BatchNorm's running mean and variance: not
    trained). ``--`` marks zero, and a combinator's row, whose children carry its counts.
    Totals: parameters, split into trainable (params) and non-trainable (state); their bytes;
    and the forward FLOPs that XLA's cost analysis counts in the compiled eval-mode ``apply``
    on float32 input, a batch axis of -1 counted as one row. XLA counts the operations it runs,
    so this library's convolutions, run as banded or im2col matrix products, count more than the
    textbook ``2 * multiply-adds`` (LeNet: about 4.5 M against 0.93 M).

    Raises what ``net.init`` raises for a bad ``input_shape``
    (``serial[0] > Conv2d: expected a 4-D input ...``).
    """
    _, params, state = _abstract_init(net, input_shape)  # raises the located init error
    rows: list[_Row] = []
    _walk(net, input_shape, "", 0, rows)
    flops = _forward_flops(net, params, state, input_shape)
    return "\n".join(_table(rows) + _totals(params, state, flops, _batch_text(input_shape)))
