"""Checkpoints of pytrees: ``np.savez`` of the flattened leaves plus a JSON header, no pickle.

The header records every leaf's tree path, shape and dtype, and any JSON metadata (step, epoch,
history). :func:`load` restores into the structure of a *template* pytree (e.g. a freshly
initialized train state), so nothing but arrays is ever deserialized, and a checkpoint of another
network or optimizer is refused with a message that names the first leaf that differs.

Writes are atomic: the file goes to a temporary name in the same directory, is flushed to disk,
then ``os.replace``-d over the target, so a crash leaves either the old checkpoint or the new one.
PRNG keys (typed ``jax.random.key`` arrays) are stored as their raw key data.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import jax
import numpy as np
from jax import numpy as jnp

from ._keys import is_prng_key

FORMAT = "functional_cnn.checkpoint/1"
_HEADER = "__header__"


class CheckpointError(ValueError):
    """A checkpoint is truncated, corrupt, or does not match the template it is loaded into."""


def _flatten(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(path) for path, _ in leaves]
    arrays = [np.asarray(jax.random.key_data(x) if is_prng_key(x) else x) for _, x in leaves]
    return paths, arrays


def save(path: str | os.PathLike, tree, meta: dict | None = None) -> str:
    """Write ``tree``'s leaves and ``meta`` (JSON-serializable) to ``path`` atomically."""
    path = os.fspath(path)
    paths, arrays = _flatten(tree)
    header = {"format": FORMAT, "meta": meta or {},
              "leaves": [{"path": p, "shape": list(a.shape), "dtype": str(a.dtype)}
                         for p, a in zip(paths, arrays)]}
    entries = {f"leaf_{i}": a for i, a in enumerate(arrays)}
    entries[_HEADER] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _read(path: str):
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z[_HEADER]).decode())
            arrays = [z[f"leaf_{i}"] for i in range(len(header["leaves"]))]
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: truncated or corrupt, cannot be read "
                              f"({type(err).__name__}: {err}); delete it to start over") from err
    if header.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: expected format {FORMAT!r}, got "
                              f"{header.get('format')!r}")
    return header, arrays


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata saved with the checkpoint at ``path``."""
    return _read(os.fspath(path))[0]["meta"]


def load(path: str | os.PathLike, like):
    """Restore ``(tree, meta)`` from ``path`` into the structure of ``like``.

    Every leaf must have the template's tree path, shape and dtype; otherwise a
    :class:`CheckpointError` names the leaf and both sides.
    """
    path = os.fspath(path)
    header, arrays = _read(path)
    leaves, treedef = jax.tree_util.tree_flatten(like)
    want_paths, want_arrays = _flatten(like)
    saved = header["leaves"]
    if len(saved) != len(want_paths):
        raise CheckpointError(f"checkpoint {path}: holds {len(saved)} arrays, the model/optimizer "
                              f"being restored has {len(want_paths)}; was it written by another "
                              f"network or optimizer?")
    restored = []
    for entry, p, want, template, got in zip(saved, want_paths, want_arrays, leaves, arrays):
        if entry["path"] != p or got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"checkpoint {path}: leaf {p} expected shape {want.shape} {want.dtype}, got "
                f"{entry['path']} {got.shape} {got.dtype}; it was written by another network, "
                f"optimizer or configuration")
        if is_prng_key(template):
            restored.append(jax.random.wrap_key_data(got, impl=jax.random.key_impl(template)))
        else:
            restored.append(jnp.asarray(got))
    return jax.tree_util.tree_unflatten(treedef, restored), header["meta"]
