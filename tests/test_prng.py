"""functional_cnn.prng: FMIX32, a JAX PRNG implementation cheap to compile."""
import contextlib
import math

import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn as fcn
from functional_cnn import checkpoint, prng
from tests._compiles import compiled_programs
from tests._stats import assert_uniform_counts, assert_uniform_orders
from tests.conftest import float64


def test_a_key_is_a_typed_key_of_two_words_fixed_by_its_seed():
    key = prng.key(0)
    assert jax.random.key_impl(key) == prng.FMIX32 and jax.random.key_data(key).shape == (2,)
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(prng.key(0)))
    assert not np.array_equal(jax.random.key_data(key), jax.random.key_data(prng.key(1)))


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("seed", [0, 1, -1, 2**31, 2**32 + 5, 2**63 - 1, -2**63, True,
                                  np.int32(-5), np.uint32(2**32 - 1), np.uint64(2**64 - 1)])
def test_a_key_hashed_on_the_host_is_jax_s_own_and_compiles_nothing(seed, x64):
    with float64() if x64 else contextlib.nullcontext():
        with compiled_programs() as compiled:
            key = prng.key(seed)
        assert compiled == []
        assert jax.random.key_impl(key) == prng.FMIX32
        expected = jax.random.key_data(jax.random.key(seed, impl=prng.FMIX32))
        assert jax.random.key_data(key).dtype == expected.dtype == jnp.uint32
        np.testing.assert_array_equal(jax.random.key_data(key), expected)


def test_a_seed_offset_is_left_to_jax():
    jax.config.update("jax_random_seed_offset", -7)  # no host hashing: JAX's own wrap-around
    try:
        for seed in (5, np.uint32(5)):
            np.testing.assert_array_equal(
                jax.random.key_data(prng.key(seed)),
                jax.random.key_data(jax.random.key(seed, impl=prng.FMIX32)))
    finally:
        jax.config.update("jax_random_seed_offset", 0)


def test_the_bijection_never_repeats_a_word_and_depends_on_both_key_words():
    x = jnp.arange(1 << 16, dtype=jnp.uint32)
    words = np.asarray(prng.keyed_bijection(x, np.uint32(1), np.uint32(2)))
    assert len(np.unique(words)) == len(words)
    for other in ((np.uint32(3), np.uint32(2)), (np.uint32(1), np.uint32(3))):
        assert np.mean(np.asarray(prng.keyed_bijection(x, *other)) == words) < 1e-3


@pytest.mark.parametrize("keys", ["consecutive seeds", "split"])
def test_uniform_draws_fill_every_bin_evenly(keys):
    parents = (jax.vmap(prng.key)(jnp.arange(64)) if keys == "consecutive seeds"
               else jax.random.split(prng.key(5), 64))
    u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (4096,)))(parents))
    assert 0 <= u.min() and u.max() < 1
    assert_uniform_counts(np.histogram(u, bins=256, range=(0, 1))[0], 256)
    assert abs(u.mean() - 0.5) < 3e-3 and abs(u.var() - 1 / 12) < 1e-3
    # streams of different keys are uncorrelated, and so are neighbours within a stream
    assert np.abs(np.corrcoef(u)[np.triu_indices(64, 1)]).max() < 0.08
    assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.01


def test_split_children_and_folds_are_new_streams():
    parent = prng.key(3)
    children = jax.random.split(parent, 1000)
    data = np.asarray(jax.random.key_data(children))
    assert len({tuple(row) for row in data.tolist()}) == 1000
    folded = np.asarray([jax.random.key_data(jax.random.fold_in(parent, i)) for i in range(50)])
    assert len({tuple(row) for row in folded.tolist()}) == 50
    draws = [np.asarray(jax.random.uniform(k, (2048,))) for k in (parent, children[0],
                                                                  children[1])]
    assert np.abs(np.corrcoef(draws)[np.triu_indices(3, 1)]).max() < 0.08


def test_every_bit_width_and_the_derived_distributions():
    key = prng.key(11)
    for dtype in (jnp.uint8, jnp.uint16, jnp.uint32):
        bits = np.asarray(jax.random.bits(key, (1 << 14,), dtype))
        assert bits.dtype == dtype
        top = np.iinfo(dtype).max
        assert_uniform_counts(np.histogram(bits, bins=64, range=(0, top + 1.0))[0], 64)
    assert abs(float(jax.random.bernoulli(key, 0.3, (1 << 16,)).mean()) - 0.3) < 0.01
    z = np.asarray(jax.random.normal(key, (1 << 16,)))
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02


def test_jax_permutations_under_this_generator_are_uniform():
    keys = jax.random.split(prng.key(1), 100 * math.factorial(4))
    assert_uniform_orders(np.asarray(jax.jit(jax.vmap(lambda k: jax.random.permutation(k, 4)))(
        keys)))


def test_a_network_initializes_and_a_checkpoint_keeps_the_generator(tmp_path):
    net = fcn.serial(fcn.Conv2d(4, 3), fcn.ReLU(), fcn.Flatten(), fcn.Linear(10))
    _, params, _ = net.init(prng.key(0), (2, 1, 8, 8))
    weight = np.asarray(params[0]["weight"])
    assert np.abs(weight).max() <= 1 / 3 and weight.std() > 0.1  # U(-1/3, 1/3), fan_in 9
    tree = {"params": params, "key": prng.key(2)}
    checkpoint.save(tmp_path / "ck", tree)
    restored, _ = checkpoint.load(tmp_path / "ck", tree)
    assert jax.random.key_impl(restored["key"]) == prng.FMIX32
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                  jax.random.key_data(tree["key"]))
