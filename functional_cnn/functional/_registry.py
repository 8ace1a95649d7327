"""The op registry and the plumbing that gives every op two gradients.

Each op is written as three plain functions of a hashable static ``config`` and its array inputs:

* ``forward(config, *args)`` -- the math, in differentiable ``jax.numpy``/``lax``;
* ``fwd(config, *args) -> (out, residuals)`` -- the same forward, saving what the rule needs;
* ``bwd(config, residuals, cotangent) -> input cotangents`` -- the hand-derived rule.

:func:`two_gradients` turns them into one callable ``op(vjp, config, *args)``: with
``vjp="custom"`` it runs ``forward`` under ``jax.custom_vjp`` with the hand-written rule, with
``vjp="autodiff"`` it runs the very same ``forward`` and lets JAX differentiate it.

Public ops are recorded in :data:`REGISTRY` by :func:`register`; tools and tests enumerate it
instead of keeping lists of their own.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax

VJP_MODES = ("custom", "autodiff")


class OpInfo(NamedTuple):
    """One registry entry."""

    name: str
    fn: Callable  # the public function, taking ``vjp=``
    kind: str  # "op" (fcn.functional) or "loss" (top level)
    module: str  # where its backward rule lives

    @property
    def doc(self) -> str:
        return self.fn.__doc__ or ""


REGISTRY: dict[str, OpInfo] = {}


def register(kind: str = "op"):
    """Decorator recording a public op (``kind="op"``) or loss (``kind="loss"``)."""
    if kind not in ("op", "loss"):
        raise ValueError(f"register: kind must be 'op' or 'loss', got {kind!r}")

    def record(fn):
        if fn.__name__ in REGISTRY:
            raise ValueError(f"register: an op named {fn.__name__!r} is registered already")
        REGISTRY[fn.__name__] = OpInfo(fn.__name__, fn, kind, fn.__module__)
        return fn

    return record


def ops(kind: str | None = None) -> dict[str, OpInfo]:
    """Registered entries, optionally only one kind ("op" or "loss"), in registration order."""
    return {n: info for n, info in REGISTRY.items() if kind is None or info.kind == kind}


def check_vjp(where: str, vjp: str) -> None:
    if vjp not in VJP_MODES:
        raise ValueError(f"{where}: vjp must be one of {VJP_MODES}, got {vjp!r}")


def two_gradients(forward: Callable, fwd: Callable, bwd: Callable,
                  primal: Callable | None = None) -> Callable:
    """Bundle an op's forward and its hand-written rule into ``op(vjp, config, *args)``.

    ``primal``, if given, is what ``vjp="custom"`` runs when nothing differentiates it (as in
    evaluation): the same values as ``forward``, in a formulation that need not be
    differentiable by JAX (``fwd`` is the custom path's forward under differentiation).
    """
    custom = jax.custom_vjp(primal or forward, nondiff_argnums=(0,))
    custom.defvjp(fwd, bwd)

    def op(vjp: str, config, *args):
        return custom(config, *args) if vjp == "custom" else forward(config, *args)

    op.custom = custom
    op.forward = forward
    op.__name__ = getattr(forward, "__name__", "op")
    return op
