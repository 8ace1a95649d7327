"""The MNIST loader on tiny IDX files written here (.gz and raw), and its error messages."""
import gzip
import math
import os
import sys
import types

import jax
import numpy as np
import pytest
from jax import numpy as jnp

from functional_cnn import data
from tests._compiles import compiled_programs
from tests._stats import assert_uniform_orders


def write_idx(path, array, compress):
    header = np.array([0x00000800 | array.ndim, *array.shape], ">u4").tobytes()
    blob = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(blob)


def make_split(root, split, n, compress, name="MNIST"):
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    raw = os.path.join(root, name, "raw")
    os.makedirs(raw, exist_ok=True)
    img_stem, lbl_stem = data._FILES[split]
    suffix = ".gz" if compress else ""
    write_idx(os.path.join(raw, img_stem + suffix), images, compress)
    write_idx(os.path.join(raw, lbl_stem + suffix), labels, compress)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("name", ["MNIST", "FashionMNIST"])
def test_reads_tiny_idx_files(tmp_path, compress, name):
    images, labels = make_split(tmp_path, "test", 7, compress, name)
    with compiled_programs() as compiled:  # a device_put: jnp.asarray compiled a program each
        ds = data.load(name, "test", root=tmp_path, download=False)
    assert compiled == []
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(ds.images), images)
    np.testing.assert_array_equal(np.asarray(ds.labels), labels)
    assert len(ds.range(2, 5)) == 3
    np.testing.assert_array_equal(np.asarray(ds.range(2, 5).labels), labels[2:5])


def test_root_from_environment(tmp_path, monkeypatch):
    make_split(tmp_path, "train", 3, True)
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    assert len(data.load(split="train", download=False)) == 3
    monkeypatch.delenv(data.ENV_VAR)
    assert data.data_root() == "data"


def test_missing_file_names_file_directory_and_remedy(tmp_path):
    make_split(tmp_path, "train", 3, True)
    os.remove(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError) as err:
        data.load("MNIST", "train", root=tmp_path, download=False)
    msg = str(err.value)
    assert "train-labels-idx1-ubyte" in msg and "train-images" not in msg
    assert str(tmp_path / "MNIST" / "raw") in msg
    assert "--data-dir" in msg and data.ENV_VAR in msg


@pytest.fixture
def offline_torchvision(monkeypatch):
    """A torchvision whose downloads fail as they do without a network (after creating their
    folders, as torchvision does)."""
    def offline(root, train, download):
        os.makedirs(os.path.join(root, "MNIST", "raw"), exist_ok=True)
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    fake = types.ModuleType("torchvision")
    fake.datasets = types.SimpleNamespace(MNIST=offline, FashionMNIST=offline, KMNIST=offline)
    monkeypatch.setitem(sys.modules, "torchvision", fake)


def test_failed_download_names_only_the_missing_files(tmp_path, offline_torchvision):
    make_split(tmp_path, "train", 3, True)
    os.remove(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz")
    with pytest.raises(data.DataFileError, match="downloading failed.*name resolution") as err:
        data.load("MNIST", "train", root=tmp_path)  # download=True, the default
    msg = str(err.value)
    assert "missing train-labels-idx1-ubyte(.gz) in" in msg
    assert "train-images" not in msg and "t10k" not in msg
    assert sorted(os.listdir(tmp_path)) == ["MNIST"]  # no temp dir left
    assert os.listdir(tmp_path / "MNIST" / "raw") == ["train-images-idx3-ubyte.gz"]


def test_failed_download_leaves_nothing_behind(tmp_path, offline_torchvision):
    root = tmp_path / "no" / "such" / "data"
    with pytest.raises(data.DataFileError, match="downloading failed"):
        data.load("MNIST", "test", root=root)
    assert os.listdir(tmp_path) == []  # not root, not its new parents, not MNIST/raw
    with pytest.raises(data.DataFileError, match="downloading failed"):
        data.load("KMNIST", "test", root=tmp_path)
    assert os.listdir(tmp_path) == []  # an existing root stays, empty


def test_truncated_and_wrong_files_are_named(tmp_path):
    make_split(tmp_path, "test", 5, False)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(data.CorruptDataError, match="t10k-images-idx3-ubyte.*truncated"):
        data.load("MNIST", "test", root=tmp_path, download=False)
    make_split(tmp_path, "test", 5, True)
    os.remove(path)  # the uncompressed files would be read first
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    gz = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(data.CorruptDataError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("MNIST", "test", root=tmp_path, download=False)
    # a header whose sizes overflow 64 bits (in numpy they wrapped past the size check)
    path.write_bytes(np.array([0x803, 2 ** 31, 2 ** 31, 4], ">u4").tobytes())
    with pytest.raises(data.CorruptDataError, match=r"promises \[2147483648, 2147483648, 4\]"):
        data.read_idx(str(path), 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="expected name to be one of"):
        data.load("CIFAR10", download=False)
    with pytest.raises(ValueError, match="expected split"):
        data.load("MNIST", "val", download=False)
    ds = data.Dataset(np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int32))
    with pytest.raises(ValueError, match=r"0 <= start < stop <= 4.*\[2, 9\)"):
        ds.range(2, 9)
    with pytest.raises(ValueError, match="expected uint8 images"):
        data.normalize(np.zeros((2, 28, 28), np.float32))


def test_normalize_and_batches():
    x = np.array([[[0, 255]]], np.uint8)
    np.testing.assert_allclose(np.asarray(data.normalize(x, 0.5, 0.5)), [[[[-1.0, 1.0]]]])
    full, tail = data.batch_indices(jax.random.key(0), 23, 5)
    assert full.shape == (4, 5) and tail.shape == (3,)
    assert sorted(np.concatenate([np.ravel(full), tail]).tolist()) == list(range(23))
    full2, _ = data.batch_indices(jax.random.key(1), 23, 5)
    assert not np.array_equal(full, full2)  # a new key, a new order


@pytest.mark.parametrize("n,keys", [
    (4, "split"), (5, "split"),
    (4, "consecutive seeds"), (5, "consecutive seeds"),  # keys differing in one small word
])
def test_shuffled_orders_are_uniform_over_keys(n, keys):
    count = 100 * math.factorial(n)
    key_set = (jax.random.split(jax.random.key(7), count) if keys == "split"
               else jax.vmap(jax.random.key)(jnp.arange(count)))
    assert_uniform_orders(np.asarray(
        jax.jit(jax.vmap(lambda k: data.shuffled_order(k, n)))(key_set)))


def test_a_shuffled_order_is_a_permutation_of_any_size_and_fixed_by_its_key():
    for n in (1, 2, 17, 60000):
        order = np.asarray(data.shuffled_order(jax.random.key(3), n))
        assert order.dtype == np.int32 and sorted(order.tolist()) == list(range(n))
    big = np.asarray(data.shuffled_order(jax.random.key(3), 60000))
    np.testing.assert_array_equal(big, np.asarray(data.shuffled_order(jax.random.key(3), 60000)))
    assert abs(np.corrcoef(big, np.arange(60000))[0, 1]) < 0.02  # no trace of the data order
    # another key, another order; an rbg key (4 words) too
    assert not np.array_equal(big, np.asarray(data.shuffled_order(jax.random.key(4), 60000)))
    rbg = np.asarray(data.shuffled_order(jax.random.key(3, impl="rbg"), 100))
    assert sorted(rbg.tolist()) == list(range(100))


def test_check_labels_names_the_set_the_example_and_the_label():
    ds = data.Dataset(np.zeros((5, 28, 28), np.uint8), np.array([0, 9, 3, 12, 5], np.int32))
    data.check_labels(13, train=ds, other=None)  # 12 < 13 and None is skipped
    with pytest.raises(ValueError, match=r"fit: test labels must lie in \[0, 10\) \(the "
                                         r"network's 10 outputs\), got 12 at index 3 \(1 of 5"):
        data.check_labels(10, "fit", test=ds)
    negative = data.Dataset(ds.images, np.array([0, 9, 3, 12, -2], np.int32))
    with pytest.raises(ValueError, match=r"got -2 at index 4 \(1 of 5"):
        data.check_labels(13, "fit", test=negative)
