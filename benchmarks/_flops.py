"""Textbook FLOPs of one training step, counted from the jaxpr of a network's forward.

Only the bilinear ops count: every ``conv_general_dilated`` and every ``dot_general`` costs
``2 x multiply-adds`` in the forward,

* a convolution ``2 * prod(output shape) * (C / groups) * kh * kw`` (the textbook
  ``2 N O (C/g) kh kw Ho Wo``; positions in the zero padding count, as they do in that formula),
* a matrix product ``2 * prod(batch dims) * M * N * K``;

and in the backward one more forward's worth for each of its operands that depends on the
parameters: the weight's gradient always, the input's gradient unless the input is the data
itself (the first parametrized layer needs none). So a conv or linear layer costs 3x its
forward in a step, the first one 2x. Elementwise ops, pooling, normalization, the loss and the
optimizer update are not counted (a few percent of a step for these networks).

The count is taken on the *plain JAX twin* of a network (``benchmarks/plain_jax.py``: lax
convolutions, ``x @ W.T``), not on this library's forward: its ``conv2d`` may run as a banded
or im2col matrix product whose ``dot_general`` multiplies zeros and copies, which would inflate
the count (``functional_cnn.summary`` reports what XLA runs: LeNet's forward 4.5 M FLOPs per
image against the textbook 0.93 M).

LeNet (article 004) at batch 256: forward 2 * 467,200 multiply-adds per image
(conv1 10*1*25*24*24 = 144,000, conv2 20*10*25*8*8 = 320,000, linear 320*10 = 3,200), so
0.239 GFLOP; the step adds the weight gradients (0.239 GFLOP) and the input gradients of conv2
and the linear layer (0.165 GFLOP): **0.644 GFLOP per step**. Issue #11's "about 0.72 GFLOP"
is the common shortcut step = 3 x forward (0.718 GFLOP), which also counts conv1's input
gradient (0.074 GFLOP) that no framework computes.
"""
from __future__ import annotations

import math

import jax
from jax import numpy as jnp
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

# higher-order primitives whose inner jaxpr runs once on the eqn's own operands
_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "remat", "checkpoint"}


def conv_flops(eqn) -> int:
    """``2 * prod(out) * I * prod(kernel spatial)``: each output element sums over the kernel's
    input features (``C / feature_group_count``) and its window."""
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (O, I, spatial...) positions
    kernel = eqn.invars[1].aval.shape
    window = math.prod(kernel[d] for d in rhs_spec[2:])
    return 2 * math.prod(eqn.outvars[0].aval.shape) * kernel[rhs_spec[1]] * window


def dot_flops(eqn) -> int:
    """``2 * prod(out) * K``: the output is batch x M x N, each element a K-long sum."""
    (contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)


_BILINEAR = {"conv_general_dilated": conv_flops, "dot_general": dot_flops}


def _inner_jaxpr(eqn) -> Jaxpr | None:
    """The jaxpr a call-like eqn runs once; None for a first-order primitive. Loops and
    branches raise: their FLOPs are not the body's once."""
    inner = [j for value in eqn.params.values()
             for j in (value if isinstance(value, (tuple, list)) else (value,))
             if isinstance(j, (ClosedJaxpr, Jaxpr))]  # cond keeps its branches in a tuple
    if not inner:
        return None
    if eqn.primitive.name not in _CALLS or len(inner) != 1:
        raise NotImplementedError(f"step FLOPs: cannot count through {eqn.primitive.name!r} "
                                  "(a loop or branch); count a network without it")
    jaxpr = inner[0].jaxpr if isinstance(inner[0], ClosedJaxpr) else inner[0]
    if len(jaxpr.invars) != len(eqn.invars):
        raise NotImplementedError(f"step FLOPs: {eqn.primitive.name!r}'s operands do not map "
                                  "onto its inner jaxpr's")
    return jaxpr


def _count(jaxpr: Jaxpr, trained: list[bool]) -> tuple[int, int]:
    """``(forward, step)`` FLOPs of ``jaxpr`` whose invars depend on the parameters where
    ``trained`` says so (a var depends on them if any operand of the eqn that made it does)."""
    depends = {v for v, t in zip(jaxpr.invars, trained) if t}
    forward = step = 0
    for eqn in jaxpr.eqns:
        operands = [not isinstance(v, Literal) and v in depends for v in eqn.invars]
        inner = _inner_jaxpr(eqn)
        if inner is not None:
            f, s = _count(inner, operands)
            forward, step = forward + f, step + s
        elif eqn.primitive.name in _BILINEAR:
            flops = _BILINEAR[eqn.primitive.name](eqn)
            forward += flops
            step += flops * (1 + sum(operands[:2]))  # forward, then one gradient per trained side
        if any(operands):
            depends.update(eqn.outvars)
    return forward, step


def step_flops(forward, params, *inputs) -> dict:
    """``{"forward": F, "step": S}``, textbook FLOPs of ``forward(params, *inputs)`` and of one
    training step through it (forward + the gradients the backward computes; module docstring).
    ``params`` and ``inputs`` may be arrays or :class:`jax.ShapeDtypeStruct`; only the leaves of
    ``params`` are trained."""
    closed = jax.make_jaxpr(forward)(params, *inputs)
    trained = len(jax.tree.leaves(params))
    f, s = _count(closed.jaxpr, [i < trained for i in range(len(closed.jaxpr.invars))])
    return {"forward": f, "step": s}


def model_step_flops(model: str, batch: int) -> dict:
    """:func:`step_flops` of ``functional_cnn.models.<model>`` (its plain-JAX twin) on a batch
    of ``batch`` MNIST images, ``(batch, 1, 28, 28)``."""
    import functional_cnn as fcn
    from benchmarks import plain_jax
    shape = (batch, 1, 28, 28)
    net = getattr(fcn.models, model)()
    _, params, state = jax.eval_shape(lambda key: net.init(key, shape), jax.random.key(0))
    apply = plain_jax.APPLY[model]
    return step_flops(lambda p, s, x: apply(p, s, x)[0], params, state,
                      jax.ShapeDtypeStruct(shape, jnp.float32))
