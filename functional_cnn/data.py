"""MNIST-format data sets as uint8 device arrays, normalized and shuffled on the device.

* :func:`load` reads ``MNIST`` (or ``FashionMNIST`` / ``KMNIST``, same IDX format) from
  ``ROOT/NAME/raw/`` -- torchvision's layout -- where ``ROOT`` is the ``root`` argument, else the
  environment variable ``FUNCTIONAL_CNN_DATA``, else ``./data``. The IDX files are parsed with
  numpy (``.gz`` or uncompressed, whichever is there), so reading works offline, from read-only
  directories and without torch. Only when a file is missing and ``download=True`` is
  ``torchvision.datasets`` imported (lazily) to fetch the archives, into a temporary directory
  that is moved into place only once complete.
* :func:`normalize` turns uint8 ``(N, 28, 28)`` into float32 ``(N, 1, 28, 28)`` on the device.
* :func:`batch_indices` is the per-epoch shuffle from a jax key (:func:`shuffled_order`).

A :class:`Dataset` is a pair of device arrays; slicing it with :meth:`Dataset.range` gives the
index ranges the articles use (``[0, 1500)``, ``[1500, 60000)``, ...).
"""
from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
import zlib
from typing import NamedTuple

import jax
import numpy as np
from jax import lax
from jax import numpy as jnp

from . import dataparallel, prng

#: torchvision class (and folder) names of the MNIST-format data sets this module reads.
DATASETS = ("MNIST", "FashionMNIST", "KMNIST")
SPLITS = ("train", "test")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# IDX magic numbers: 0x0000 0x08 (uint8) then the number of dimensions.
_MAGIC = {3: 0x00000803, 1: 0x00000801}
ENV_VAR = "FUNCTIONAL_CNN_DATA"


class Dataset(NamedTuple):
    """Images ``uint8 (N, H, W)`` and labels ``int32 (N,)``, both on the device (:meth:`range`
    also cuts numpy arrays, before :func:`to_device` puts them there)."""

    images: jax.Array
    labels: jax.Array

    def __len__(self):
        return int(self.labels.shape[0])

    def range(self, start: int, stop: int) -> "Dataset":
        """The examples with indices in ``[start, stop)``, checked against the data set size."""
        n = len(self)
        if not (0 <= start < stop <= n):
            raise ValueError(f"Dataset.range: expected 0 <= start < stop <= {n} (the data set "
                             f"size), got [{start}, {stop})")
        return Dataset(self.images[start:stop], self.labels[start:stop])


class DataFileError(FileNotFoundError):
    """A data file is missing; the message says which, where it was looked for and how to get it."""


class CorruptDataError(ValueError):
    """A data file is there but unreadable (truncated, not IDX, inconsistent); names the file."""


def data_root(root: str | os.PathLike | None = None) -> str:
    """``root`` if given, else ``$FUNCTIONAL_CNN_DATA``, else ``./data``."""
    return os.fspath(root or os.environ.get(ENV_VAR) or "data")


def raw_dir(name: str, root=None) -> str:
    """The directory torchvision keeps ``name``'s raw IDX files in: ``ROOT/NAME/raw``."""
    return os.path.join(data_root(root), name, "raw")


def _check_choice(what, value, choices):
    if value not in choices:
        raise ValueError(f"data: expected {what} to be one of {choices}, got {value!r}")


def _find(directory: str, stem: str) -> str | None:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _missing_message(name, directory, stems, why=""):
    files = ", ".join(f"{s}(.gz)" for s in stems)
    return (f"{name}: missing {files} in {os.path.abspath(directory)}{why}. Put the four raw "
            f"archives of {name} there (torchvision's layout ROOT/{name}/raw/, e.g. from "
            f"torchvision.datasets.{name}(ROOT, download=True) on a machine with internet), and "
            f"point --data-dir or ${ENV_VAR} at ROOT.")


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse one IDX file (``.gz`` or raw) of unsigned bytes with ``ndim`` dimensions.

    Raises :class:`CorruptDataError` naming the file when it is truncated, not gzip, has the wrong
    magic number, or its size disagrees with its header.
    """
    try:
        with open(path, "rb") as f:
            blob = f.read()
        if path.endswith(".gz"):  # in one call, which releases the GIL: loads beside compiling
            blob = gzip.decompress(blob)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise CorruptDataError(f"{path}: cannot read this IDX file ({err}); it is corrupt or "
                            f"truncated: delete it and fetch it again") from err
    header = 4 * (1 + ndim)
    if len(blob) < header:
        raise CorruptDataError(f"{path}: {len(blob)} bytes, shorter than an IDX header of "
                            f"{header} bytes; delete it and fetch it again")
    magic, *dims = np.frombuffer(blob[:header], ">u4").tolist()
    if magic != _MAGIC[ndim]:
        raise CorruptDataError(f"{path}: expected IDX magic {_MAGIC[ndim]:#010x} (uint8, "
                               f"{ndim}-D), got {magic:#010x}; is it the right file?")
    expected = header + math.prod(dims)  # Python ints: a corrupt header cannot overflow
    if len(blob) != expected:
        raise CorruptDataError(f"{path}: the header promises {dims} -> {expected} bytes, the file "
                            f"has {len(blob)}; it is truncated or corrupt: fetch it again")
    return np.frombuffer(blob, np.uint8, offset=header).reshape(dims)


def _new_dirs(path: str) -> list[str]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    new, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        new.append(path)
        path = os.path.dirname(path)
    return new


def _download(name: str, root: str, missing: list[str]) -> None:
    """Fetch ``name`` with torchvision into a temp dir, then move the archives into place.

    On failure the error names the ``missing`` files, and nothing is left behind: not the temp
    dir, nor any directory (``root`` included) that did not exist before.
    """
    try:
        from torchvision import datasets  # lazily: `import functional_cnn` never needs torch
    except ImportError as err:
        raise DataFileError(_missing_message(name, raw_dir(name, root), missing,
                                             " and torchvision is not installed")) from err
    created = _new_dirs(raw_dir(name, root))
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-download-", dir=root)
    done = False
    try:
        for train in (True, False):
            getattr(datasets, name)(tmp, train=train, download=True)
        fetched = os.path.join(tmp, name, "raw")
        os.makedirs(raw_dir(name, root), exist_ok=True)  # only once everything is fetched
        for stem in sum(_FILES.values(), ()):
            os.replace(os.path.join(fetched, stem + ".gz"), os.path.join(raw_dir(name, root),
                                                                          stem + ".gz"))
        done = True
    except Exception as err:  # offline, bad md5, ...: say which files and where
        raise DataFileError(_missing_message(name, raw_dir(name, root), missing,
                                             f" and downloading failed ({err})")) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in created if not done else ():
            try:
                os.rmdir(directory)  # only if still empty
            except OSError:
                pass


def load_numpy(name: str = "MNIST", split: str = "train", root=None,
               download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels uint8 (N,))`` as numpy arrays, see :func:`load`."""
    _check_choice("name", name, DATASETS)
    _check_choice("split", split, SPLITS)
    root = data_root(root)
    directory = raw_dir(name, root)
    stems = _FILES[split]
    paths = [_find(directory, s) for s in stems]
    if None in paths and download:
        _download(name, root, [s for s, p in zip(stems, paths) if p is None])
        paths = [_find(directory, s) for s in stems]
    if None in paths:
        missing = [s for s, p in zip(stems, paths) if p is None]
        raise DataFileError(_missing_message(name, directory, missing))
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if images.shape[0] != labels.shape[0]:
        raise CorruptDataError(f"{paths[0]} holds {images.shape[0]} images but {paths[1]} holds "
                            f"{labels.shape[0]} labels; one of them is from another data set")
    return images, labels


def load(name: str = "MNIST", split: str = "train", root=None, download: bool = True,
         mesh=None) -> Dataset:
    """Load a split of an MNIST-format data set once, as uint8 images and int32 labels on the
    device (60000 x 28 x 28 bytes is 47 MB: every later step indexes it there, no host copies),
    or replicated over ``mesh``.

    ``root`` defaults to ``$FUNCTIONAL_CNN_DATA``, then ``./data``; files are looked for in
    ``ROOT/NAME/raw/``. Missing files raise :class:`DataFileError` (a ``FileNotFoundError``) that
    names them, the directory and how to get them.
    """
    return to_device(*load_numpy(name, split, root, download), mesh=mesh)


def to_device(images: np.ndarray, labels: np.ndarray, mesh=None) -> Dataset:
    """numpy images and labels as a :class:`Dataset` on the device (or replicated over
    ``mesh``), the labels as int32; ``ValueError`` unless there is one label per image.

    By :func:`~functional_cnn.dataparallel.put`: ``jnp.asarray`` compiles a program for each
    array (0.3 CPU-s at the start of every run). Cut the arrays before, on the host: a slice of
    an array on the device is an eager program of its own, compiled for each size."""
    labels = np.asarray(labels, np.int32)
    check_pairs("to_device", images, labels)
    return Dataset(*dataparallel.put((images, labels), mesh))


def check_pairs(where: str, images, labels) -> None:
    """Raise ``ValueError`` (naming ``where`` and both shapes) unless ``labels`` has shape
    ``(N,)`` for ``images`` of shape ``(N, ...)``. Reads static shapes only, so it also runs
    while a program is traced. Without it a short side would pair examples wrongly, in
    silence: a gather past the end of a JAX array clamps its index rather than raising."""
    if np.ndim(labels) != 1 or np.ndim(images) < 1 or np.shape(images)[0] != np.shape(labels)[0]:
        raise ValueError(f"{where}: expected one label per image, labels of shape (N,) for "
                         f"images of shape (N, ...); got images of shape "
                         f"{tuple(np.shape(images))} and labels of shape "
                         f"{tuple(np.shape(labels))}")


def check_labels(num_classes: int, where: str = "check_labels", **datasets: Dataset | None):
    """Raise ``ValueError`` unless every label of every given data set lies in
    ``[0, num_classes)``; the message names ``where``, the data set, the first bad example and
    its label. ``None`` data sets are skipped.

    A jitted training step cannot check label values (under jit an out-of-range label only
    makes its loss and gradient NaN), so :func:`~functional_cnn.train.fit` calls this once,
    on concrete values, before training: one host read of the labels and a compare.
    """
    for name, dataset in datasets.items():
        if dataset is None:
            continue
        labels = np.asarray(dataset.labels)
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{where}: {name} labels must lie in [0, {num_classes}) (the "
                             f"network's {num_classes} outputs), got {labels[i]} at index {i} "
                             f"({bad.size} of {labels.size} labels outside)")


def normalize(images: jax.Array, mean: float = 0.0, std: float = 1.0) -> jax.Array:
    """uint8 ``(N, H, W)`` -> float32 ``(N, 1, H, W)``: ``(x / 255 - mean) / std``, on the device.

    The articles' scalings are ``mean=0.5, std=1`` (003: ``x/255 - 0.5``), ``mean=std=0.5`` (001)
    and ``mean=0.1307, std=0.3081`` (004, torchvision's ``Normalize``).
    """
    if images.dtype != jnp.uint8 or images.ndim != 3:
        raise ValueError(f"normalize: expected uint8 images of shape (N, H, W), got "
                         f"{images.dtype} {tuple(images.shape)}")
    x = images.astype(jnp.float32)[:, None] / 255.0
    return (x - mean) / std


def shuffled_order(key, n: int) -> jax.Array:
    """A random order of ``0 .. n-1`` drawn from ``key``: the positions sorted by a keyed
    bijection of 32-bit integers (:func:`~functional_cnn.prng.keyed_bijection`, three rounds
    of MurmurHash3's finalizer, under two seeds mixed from the key's words).

    A bijection has no ties, so the order is a permutation for any ``n <= 2^32``; over many
    keys each of the ``n!`` orders appears equally often (chi-square tests in
    ``tests/test_data.py``, consecutive seeds included). One elementwise kernel and one sort,
    whatever the key's generator: ``jax.random.permutation`` with threefry keys costs XLA:CPU
    0.36-0.54 CPU-s to compile (this: 0.06-0.09), 0.3-0.5 CPU-s of every training epoch's
    compilation, and runs 2x slower (2-core AMD EPYC, 60000 examples). Not for cryptography."""
    seed = np.uint32(0)
    for word in jax.random.key_data(key).reshape(-1):  # threefry: 2 words, rbg: 4
        seed = prng.fmix32(seed ^ word.astype(jnp.uint32)) + prng.GOLDEN
    h = prng.keyed_bijection(jnp.arange(n, dtype=jnp.uint32), seed, prng.fmix32(seed))
    return lax.sort_key_val(h, jnp.arange(n, dtype=jnp.int32))[1]


def batch_indices(key, n: int, batch_size: int, shuffle: bool = True):
    """One epoch's example order split into batches: ``(full (n // B, B), tail (n % B,))``.

    The full batches are scanned over; the ragged tail (possibly empty) is its own last step,
    so no example is dropped and no batch statistic sees padding.
    """
    if batch_size < 1 or n < 1:
        raise ValueError(f"batch_indices: expected n >= 1 and batch_size >= 1, got n={n}, "
                         f"batch_size={batch_size}")
    order = shuffled_order(key, n) if shuffle else jnp.arange(n)
    full = (n // batch_size) * batch_size
    return order[:full].reshape(-1, batch_size), order[full:]
