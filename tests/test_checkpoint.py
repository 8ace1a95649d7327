"""Checkpoints: round trip (keys included), atomic writes, corruption, truncation and mismatch
errors."""
import os
import stat
import zipfile

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


def test_extension_dtypes_round_trip_and_keys_keep_their_generator(tmp_path):
    """``.npy`` stores bfloat16 as raw bytes (``|V2``): the header's dtype restores it. A key's
    data is only numbers: the header names its generator, and another's key is refused."""
    path = tmp_path / "c.npz"
    w = jnp.arange(6, dtype=jnp.bfloat16) / 3
    ckpt.save(path, {"w": w, "k": jax.random.key(1, impl="rbg")})
    got, _ = ckpt.load(path, {"w": jnp.zeros_like(w), "k": jax.random.key(0, impl="rbg")})
    assert got["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got["w"], np.float32), np.asarray(w, np.float32))
    raw, _ = ckpt.load(path, {"w": w, "k": jnp.zeros(4, jnp.uint32)})  # a raw key template
    np.testing.assert_array_equal(raw["k"], jax.random.key_data(jax.random.key(1, impl="rbg")))
    with pytest.raises(ckpt.CheckpointError, match=r"leaf \['k'\] expected the key data of a "
                                                   r"PRNG key of unsafe_rbg, got rbg's"):
        ckpt.load(path, {"w": w, "k": jax.random.key(0, impl="unsafe_rbg")})


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "c.npz"
    ckpt.save(path, tree())
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"c\.npz: truncated or corrupt"):
        ckpt.load(path, tree())


def small_tree():
    return {"w": jnp.arange(3.0), "key": jax.random.key(7)}


def assert_original_or_error(path, like, original):
    """Loading ``path`` gives exactly ``original``'s leaves, or a CheckpointError naming it."""
    try:
        got, meta = ckpt.load(path, like)
    except ckpt.CheckpointError as err:
        assert str(path) in str(err)
        return False
    assert meta == {"epoch": 1}
    np.testing.assert_array_equal(got["w"], original["w"])
    np.testing.assert_array_equal(jax.random.key_data(got["key"]),
                                  jax.random.key_data(original["key"]))
    return True


def test_every_corruption_and_truncation_is_caught(tmp_path):
    # Every single-byte flip (xor with 0x01, 0x80 or 0xff in turn) and every truncation: the
    # file loads as the exact original (a byte the reader never looks at, e.g. a timestamp) or
    # raises CheckpointError naming the path -- never another exception, never other values.
    original = small_tree()
    path = tmp_path / "c.npz"
    ckpt.save(path, original, {"epoch": 1})
    blob = path.read_bytes()
    assert len(blob) < 1500  # keeps this loop fast
    like = small_tree()
    survived = 0
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= (0x01, 0x80, 0xFF)[i % 3]
        path.write_bytes(bytes(flipped))
        survived += assert_original_or_error(path, like, original)
    for cut in range(len(blob)):
        path.write_bytes(blob[:cut])
        assert not assert_original_or_error(path, like, original)
    assert survived < len(blob) // 4  # nearly every byte is checked


def test_old_format_and_foreign_zip_are_named(tmp_path):
    path = tmp_path / "old.npz"
    np.savez(path, __header__=np.frombuffer(b'{"format": "functional_cnn.checkpoint/1"}',
                                            np.uint8), leaf_0=np.zeros(3))
    with pytest.raises(ckpt.CheckpointError, match=r"old\.npz: .*no __sha256__"):
        ckpt.load(path, {"w": jnp.zeros(3)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__sha256__", b"0" * 64)
    with pytest.raises(ckpt.CheckpointError, match=r"old\.npz: .*SHA-256 mismatch"):
        ckpt.read_meta(path)


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


def test_save_syncs_the_file_then_the_directory_that_holds_the_rename(tmp_path, monkeypatch):
    """A rename lives in its directory: unsynced, a crash could bring the previous checkpoint
    back. The file is synced before the rename, the directory after it."""
    synced, fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    ckpt.save(tmp_path / "c.npz", tree())
    assert synced == ["file", "directory"]
