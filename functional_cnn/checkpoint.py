"""Checkpoints of pytrees: an npz of the flattened leaves plus a JSON header and a SHA-256 of
both, no pickle.

The header records every leaf's tree path, shape and dtype, and any JSON metadata (step, epoch,
history). :func:`load` restores into the structure of a *template* pytree (e.g. a freshly
initialized train state), so nothing but arrays is ever deserialized, and a checkpoint of another
network or optimizer is refused with a message that names the first leaf that differs.

The file is a zip of ``.npy`` members (``np.load`` reads it) plus ``__sha256__``, the hex SHA-256
of every other member's name and stored bytes. A load verifies it before parsing anything, so a
truncated or corrupt file -- a flipped byte anywhere, in an array, the header or the zip's own
bookkeeping -- is a :class:`CheckpointError` naming the file, never a wrong array or another
library's exception.

Writes are atomic: the file goes to a temporary name in the same directory, is flushed to disk,
then ``os.replace``-d over the target and the directory synced, so a crash leaves either the
old checkpoint or the new one.
PRNG keys (typed ``jax.random.key`` arrays) are stored as their raw key data, the header
naming their implementation (a key of another generator is refused, not reinterpreted).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile

import jax
import numpy as np
from jax import numpy as jnp

from ._keys import is_prng_key

FORMAT = "functional_cnn.checkpoint/2"
_HEADER = "__header__.npy"
_CHECKSUM = "__sha256__"


class CheckpointError(ValueError):
    """A checkpoint is truncated, corrupt, or does not match the template it is loaded into."""


def _flatten(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(path) for path, _ in leaves]
    arrays = [np.asarray(jax.random.key_data(x) if is_prng_key(x) else x) for _, x in leaves]
    return paths, arrays


def _key_impls(tree) -> list:
    """Each leaf's PRNG implementation (``"threefry2x32"``...), or None for a plain array."""
    return [str(jax.random.key_impl(x)) if is_prng_key(x) else None
            for x in jax.tree_util.tree_leaves(tree)]


def _as_saved_dtype(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` in the dtype the header names: ``.npy`` stores extension dtypes (bfloat16,
    the float8s) as raw bytes (``|V2``), which that name restores."""
    if array.dtype.kind != "V":
        return array
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        return array
    return array.view(dtype) if dtype.itemsize == array.dtype.itemsize else array


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _digest(members: dict[str, bytes]) -> bytes:
    """Hex SHA-256 over every member's name and bytes, each length-prefixed (unambiguous)."""
    h = hashlib.sha256()
    for name in sorted(members):
        for part in (name.encode(), members[name]):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest().encode()


def _encode(tree, meta: dict | None) -> dict[str, bytes]:
    """The zip members: header, one ``.npy`` per leaf, and the checksum of them all."""
    paths, arrays = _flatten(tree)
    header = {"format": FORMAT, "meta": meta or {},
              "leaves": [{"path": p, "shape": list(a.shape), "dtype": str(a.dtype),
                          **({"key_impl": impl} if impl else {})}
                         for p, a, impl in zip(paths, arrays, _key_impls(tree))]}
    members = {f"leaf_{i}.npy": _npy(a) for i, a in enumerate(arrays)}
    members[_HEADER] = _npy(np.frombuffer(json.dumps(header).encode(), np.uint8))
    members[_CHECKSUM] = _digest(members)
    return members


def save(path: str | os.PathLike, tree, meta: dict | None = None) -> str:
    """Write ``tree``'s leaves and ``meta`` (JSON-serializable) to ``path`` atomically."""
    path = os.fspath(path)
    members = _encode(tree, meta)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                for name, blob in members.items():
                    zf.writestr(name, blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _sync_directory(directory)
    return path


def _sync_directory(directory: str) -> None:
    """Make the rename durable: on POSIX a rename lives in the directory, which a crash can
    lose unless it is synced too (the file would then be the previous checkpoint). Where a
    directory cannot be opened (Windows), the rename is as durable as the OS makes it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to sync a directory: nothing more to do
        pass
    finally:
        os.close(fd)


def _verified_members(blob: bytes) -> dict[str, bytes]:
    """The zip's members once their checksum matches; raises on any mismatch or bad zip."""
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:  # CRC-32 is checked on each read as well
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    stored = members.pop(_CHECKSUM, None)
    if stored is None:
        raise KeyError(f"no {_CHECKSUM} member (a file of format /1 or older has none)")
    if stored != _digest(members):
        raise ValueError("SHA-256 mismatch")
    return members


def _parse(members: dict[str, bytes]):
    def array(name):
        return np.lib.format.read_array(io.BytesIO(members[name]), allow_pickle=False)

    header = json.loads(array(_HEADER).tobytes().decode())
    return header, [array(f"leaf_{i}.npy") for i in range(len(header["leaves"]))]


def _read(path: str):
    with open(path, "rb") as f:  # FileNotFoundError stays itself: absent is not corrupt
        blob = f.read()
    try:
        header, arrays = _parse(_verified_members(blob))
    except Exception as err:
        # Every failure of the reader, whatever layer raised it (zipfile's
        # NotImplementedError/RuntimeError on a flipped flag, numpy, json), means the same
        # thing to the caller: this file cannot be trusted.
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
    for entry, p, want, template, got, impl in zip(saved, want_paths, want_arrays, leaves,
                                                   arrays, _key_impls(like)):
        got = _as_saved_dtype(got, entry["dtype"])
        if entry["path"] != p or got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"checkpoint {path}: leaf {p} expected shape {want.shape} {want.dtype}, got "
                f"{entry['path']} {got.shape} {got.dtype}; it was written by another network, "
                f"optimizer or configuration")
        # a typed key's generator, where both sides have one (older files record none; a
        # raw uint32 key template takes any key's data, as it always did)
        if impl is not None and entry.get("key_impl", impl) != impl:
            raise CheckpointError(
                f"checkpoint {path}: leaf {p} expected the key data of a PRNG key of {impl}, got "
                f"{entry['key_impl']}'s; it was written with another generator")
        if is_prng_key(template):
            restored.append(jax.random.wrap_key_data(got, impl=jax.random.key_impl(template)))
        else:
            restored.append(jnp.asarray(got))
    return jax.tree_util.tree_unflatten(treedef, restored), header["meta"]
