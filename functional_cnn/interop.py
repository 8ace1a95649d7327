"""Name the leaves of params/state as PyTorch does, and copy a torch ``state_dict`` in.

Tree paths become dotted names: tuple positions from ``serial`` are ``"0"``, ``"1"``, ...; dict
keys are the torch parameter names. A network built with the same nesting as an
``nn.Sequential`` therefore has exactly its ``state_dict`` keys (``"2.0.weight"``). Nothing here
imports torch: tensors are read through ``numpy.asarray``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import numpy as np
from jax import numpy as jnp

# Buffers PyTorch keeps that this library derives or does not need.
IGNORED_TORCH_KEYS = ("num_batches_tracked",)


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return ".".join(parts)


def named_leaves(tree) -> dict[str, jax.Array]:
    """``{dotted_name: leaf}`` for every array in ``tree``, in tree order."""
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def state_dict(params, state) -> dict[str, np.ndarray]:
    """One flat ``{name: numpy array}`` of params and state, like ``module.state_dict()``."""
    merged = {**named_leaves(params), **named_leaves(state)}
    return {name: np.asarray(v) for name, v in merged.items()}


def _as_numpy(name: str, value) -> np.ndarray:
    """A torch tensor (or anything array-like) as numpy, without importing torch: detached
    (``named_parameters()``'s require grad), on the host, and through float32 for a dtype
    numpy lacks (bfloat16: exact, every bfloat16 is a float32)."""
    for method in ("detach", "cpu"):
        if hasattr(value, method):
            value = getattr(value, method)()
    try:
        return np.asarray(value)
    except TypeError as err:
        if hasattr(value, "float"):
            return np.asarray(value.float())
        raise ValueError(f"load_state_dict: {name!r}: cannot read a {type(value).__name__} "
                         f"as an array ({err})") from None


def load_state_dict(params, state, torch_state: Mapping, rename: Callable[[str], str] = None):
    """Return ``(params, state)`` with every leaf replaced by ``torch_state[name]``.

    ``rename`` maps our dotted names to the torch model's keys where the nesting differs.
    Strict like ``nn.Module.load_state_dict``: a missing or unused key, or a shape mismatch, is
    a ValueError naming it (``num_batches_tracked`` buffers are ignored). Tensors may require
    grad or be bfloat16; each is cast to its leaf's dtype, as torch casts to its parameter's.
    The leaves are copies: changing the torch tensors afterwards leaves them as loaded.
    """
    rename = rename or (lambda name: name)
    used = set()

    def load(tree):
        def replace(path, leaf):
            name = rename(_path_name(path))
            if name not in torch_state:
                raise ValueError(f"load_state_dict: no entry {name!r} in the torch state dict "
                                 f"(it has {sorted(torch_state)[:8]}...)")
            value = _as_numpy(name, torch_state[name])
            if value.shape != tuple(jnp.shape(leaf)):
                raise ValueError(f"load_state_dict: {name!r} expected shape "
                                 f"{tuple(jnp.shape(leaf))}, got {value.shape}")
            used.add(name)
            # a copy: on a CPU jnp.asarray may keep the numpy view of the torch tensor, which
            # a later in-place torch update (optimizer.step, BatchNorm statistics) would change
            return jnp.array(value, dtype=jnp.result_type(leaf), copy=True)

        return jax.tree_util.tree_map_with_path(replace, tree)

    new_params, new_state = load(params), load(state)
    unused = [k for k in torch_state
              if k not in used and not k.endswith(IGNORED_TORCH_KEYS)]
    if unused:
        raise ValueError(f"load_state_dict: torch entries with no matching leaf: {unused}")
    return new_params, new_state
