"""Cases of registered ops: one concrete call (inputs, the op, its torch twin) at a
configuration of the op's space, and how the tests and the audit differentiate it: both VJP
paths, PyTorch, and float64 central differences.

Each op declares its space next to itself (``register_space`` below the op in its module);
this module only walks it. Importing it never imports torch: oracles receive the ``torch``
module as an argument.
"""
from __future__ import annotations

import itertools
from typing import Mapping

import jax
import numpy as np
from jax import numpy as jnp

from ..functional import REGISTRY
from ..functional._spaces import SPACES, Case, OpSpace  # noqa: F401  (re-exported)
from ..functional._spaces import normal as _normal


def space(op: str) -> OpSpace:
    """The hyperparameter space registered for ``op``."""
    if op not in SPACES:
        raise KeyError(f"no OpSpace for op {op!r}; registered: {sorted(REGISTRY)}")
    return SPACES[op]


def primary(output):
    """The output that gradients are taken of (batch_norm also returns running statistics)."""
    return output[0] if isinstance(output, tuple) else output



def build(op: str, config: Mapping | None = None, seed: int = 0, dtype=np.float32) -> Case:
    """The case for ``op`` at ``config`` (missing keys take the space's defaults)."""
    op_space = space(op)
    full = {**op_space.defaults, **(config or {})}
    return op_space.build(np.random.default_rng(seed), full, np.dtype(dtype))


def edge_cases(op: str) -> list[dict]:
    """The op's default configuration followed by its edge cases, as full configs."""
    op_space = space(op)
    return [op_space.defaults] + [{**op_space.defaults, **e} for e in op_space.edge_cases]


def grid(op: str, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Edge cases, then configurations drawn from the full product (deterministic order)."""
    op_space = space(op)
    names = list(op_space.hyper)
    product = [dict(zip(names, values)) for values in itertools.product(*op_space.hyper.values())]
    np.random.default_rng(seed).shuffle(product)
    configs = edge_cases(op) + product
    return configs if limit is None else configs[:limit]


def is_valid(case: Case) -> bool:
    """Whether the op accepts this configuration (its own checks raise ValueError otherwise)."""
    try:
        jax.eval_shape(lambda *a: case.call(*a), *case.inputs.values())
    except ValueError:
        return False
    return True


def cotangent(case: Case, seed: int = 1) -> np.ndarray:
    """A fixed random cotangent for the case's primary output."""
    out = jax.eval_shape(lambda *a: primary(case.call(*a)), *case.inputs.values())
    return _normal(np.random.default_rng(seed), out.shape, out.dtype)


def value_and_grads(case: Case, vjp: str, ct: np.ndarray | None = None, jit: bool = False):
    """``(output, grads)``: grads of ``sum(primary(output) * ct)`` w.r.t. every input."""
    ct = cotangent(case) if ct is None else ct
    args = [jnp.asarray(a) for a in case.inputs.values()]

    def scalar(*a):
        return jnp.sum(primary(case.call(*a, vjp=vjp)) * ct)

    grad_fn = jax.grad(scalar, argnums=tuple(range(len(args))))
    if jit:
        grad_fn = jax.jit(grad_fn)
    return case.call(*args, vjp=vjp), tuple(grad_fn(*args))


def torch_value_and_grads(case: Case, torch, ct: np.ndarray | None = None):
    """The same as :func:`value_and_grads`, computed by PyTorch (float64 stays float64)."""
    ct = cotangent(case) if ct is None else ct
    tensors = [torch.tensor(np.array(a), requires_grad=True) for a in case.inputs.values()]
    out = case.torch_call(torch, *tensors)
    main = primary(out)
    if main.requires_grad:
        (main * torch.as_tensor(ct)).sum().backward()
    to_np = (lambda t: t.detach().cpu().numpy())
    outputs = tuple(to_np(o) for o in out) if isinstance(out, tuple) else to_np(out)
    grads = tuple(np.zeros_like(np.array(a)) if t.grad is None else to_np(t.grad)
                  for t, a in zip(tensors, case.inputs.values()))
    return outputs, grads


def _perturbed_inputs(args, eps, max_entries, seed):
    """Sampled flat positions per input, and every input stacked over all ``2 * entries``
    perturbed evaluations (``+eps`` then ``-eps`` at each position of each input in turn)."""
    rng = np.random.default_rng(seed)
    positions = [rng.permutation(a.size)[:max_entries] for a in args]
    stacks = [[] for _ in args]
    for i, flat in enumerate(positions):
        for index in flat:
            for sign in (1.0, -1.0):
                for j, a in enumerate(args):
                    if j == i:
                        a = a.copy()
                        a.reshape(-1)[index] += sign * eps
                    stacks[j].append(a)
    return positions, [np.stack(s) for s in stacks]


def finite_difference_grads(case: Case, eps: float = 1e-6, ct: np.ndarray | None = None,
                            max_entries: int = 64, seed: int = 0):
    """Central differences of ``sum(primary(out) * ct)`` at up to ``max_entries`` sampled
    positions per input, all evaluated in one jitted, vmapped call; returns
    ``[(flat positions, estimates)]`` per input. Run it under float64."""
    ct = jnp.asarray(cotangent(case) if ct is None else ct)
    args = [np.array(a, np.float64) for a in case.inputs.values()]
    positions, stacks = _perturbed_inputs(args, eps, max_entries, seed)

    def scalar(*a):
        return jnp.sum(primary(case.call(*a)) * ct)

    values = np.asarray(jax.jit(jax.vmap(scalar))(*stacks), np.float64)
    results, offset = [], 0
    for flat in positions:
        pairs = values[offset:offset + 2 * len(flat)].reshape(-1, 2)
        offset += 2 * len(flat)
        results.append((flat, (pairs[:, 0] - pairs[:, 1]) / (2 * eps)))
    return results
