"""Checkpoints: round trip (keys included), atomic writes, truncation and mismatch errors."""
import os

import jax
import numpy as np
import pytest
from jax import numpy as jnp

from functional_cnn import checkpoint as ckpt


def tree():
    return {"w": jnp.arange(6.0).reshape(2, 3), "n": (jnp.int32(3), jnp.zeros(0)),
            "key": jax.random.key(7)}


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "c.npz"
    ckpt.save(path, tree(), {"epoch": 2})
    assert os.listdir(tmp_path / "sub") == ["c.npz"]  # no temp file left
    like = jax.tree.map(jnp.zeros_like, {k: v for k, v in tree().items() if k != "key"})
    like["key"] = jax.random.key(0)
    got, meta = ckpt.load(path, like)
    assert meta == {"epoch": 2}
    np.testing.assert_array_equal(got["w"], tree()["w"])
    assert got["n"][0].dtype == jnp.int32 and int(got["n"][0]) == 3
    np.testing.assert_array_equal(jax.random.key_data(got["key"]),
                                  jax.random.key_data(jax.random.key(7)))


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "c.npz"
    ckpt.save(path, tree())
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"c\.npz: truncated or corrupt"):
        ckpt.load(path, tree())


def test_mismatched_checkpoint(tmp_path):
    path = tmp_path / "c.npz"
    ckpt.save(path, tree())
    other = dict(tree(), w=jnp.zeros((3, 3)))
    with pytest.raises(ckpt.CheckpointError, match=r"\['w'\] expected shape \(3, 3\)"):
        ckpt.load(path, other)
    with pytest.raises(ckpt.CheckpointError, match="holds 4 arrays.*has 5"):
        ckpt.load(path, dict(tree(), extra=jnp.zeros(1)))


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "c.npz"
    ckpt.save(path, tree(), {"v": 1})
    with pytest.raises(TypeError):
        ckpt.save(path, tree(), {"v": object()})  # not JSON: fails before touching the file
    assert ckpt.read_meta(path) == {"v": 1} and os.listdir(tmp_path) == ["c.npz"]
