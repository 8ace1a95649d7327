"""A random number generator that XLA:CPU compiles in a fraction of threefry's time.

JAX's default generator, threefry-2x32, draws every random array, and derives every key, with
20 rounds of a 64-bit block cipher, unrolled into each kernel that draws. Compiling those kernels
is most of what a small network's initial state costs at start-up: the race network of
``experiments/time_to_accuracy.py`` initializes in a program of 97 kernels that XLA:CPU compiles
in 0.81-0.93 CPU-s (2-core AMD EPYC), 7 kernels and 0.27-0.33 CPU-s with :data:`FMIX32`.

:data:`FMIX32` is a JAX PRNG implementation (``jax.extend.random.define_prng_impl``), chosen
explicitly, per key: ``jax.random.key(seed, impl=prng.FMIX32)`` or :func:`key`. Everything
else works as with any typed key -- ``jax.random.split``, ``fold_in``, ``uniform``, ``normal``,
``bernoulli``, ``permutation``, the layers' ``init`` and dropout, checkpoints. A key is two
``uint32`` words, as threefry's; draw ``i`` is :func:`keyed_bijection` of the counter ``i`` under
the key: three rounds of MurmurHash3's 32-bit finalizer (:func:`fmix32`), each a bijection, so one
draw of up to 2^32 words never repeats a word; child keys (``split``) are draws from a counter
range of their own. Its streams pass the uniformity and independence tests of
``tests/test_prng.py``; it is not a cryptographic generator, nor one for statistics that need a
proven one -- use threefry (the default) there.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax import lax
from jax import numpy as jnp
from jax.extend.random import define_prng_impl

GOLDEN = np.uint32(0x9E3779B9)  # 2^32 / golden ratio: the usual odd constant between rounds
_SPLIT_STREAM = np.uint32(0x5BD1E995)  # child keys come from counters of another stream


def fmix32(h):
    """MurmurHash3's 32-bit finalizer: a bijection of ``uint32`` in which each input bit flips
    each output bit with probability close to 1/2."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def keyed_bijection(x, k0, k1):
    """``f(f(f(x ^ k0) ^ k1) + k0)`` with ``f`` = :func:`fmix32`: for fixed ``uint32`` words
    ``(k0, k1)`` a bijection of ``uint32``, elementwise (one small kernel)."""
    return fmix32(fmix32(fmix32(x ^ k0) ^ k1) + k0)


def _seed(seed):
    """Two words from an integer seed (its high word too where it has one)."""
    return _seed_words(jnp.asarray(seed), jnp)


def _seed_words(seed, xp):
    """:func:`_seed` in the array module ``xp`` (``jnp``, or ``np`` on the host: :func:`key`)."""
    low = seed.astype(xp.uint32)
    high = (seed >> 32).astype(xp.uint32) if seed.dtype.itemsize == 8 else xp.zeros_like(low)
    return xp.stack([fmix32(low ^ GOLDEN), fmix32(high + fmix32(low))], axis=-1)


def _random_bits(key, bit_width: int, shape):
    """``shape`` words of ``bit_width`` bits (8, 16, 32: the low bits of one 32-bit draw each;
    64: two draws each)."""
    words_each = 2 if bit_width == 64 else 1
    draws = keyed_bijection(lax.iota(jnp.uint32, math.prod(shape) * words_each),
                            key[..., 0], key[..., 1])
    if bit_width == 64:
        pairs = draws.reshape(-1, 2).astype(jnp.uint64)
        return ((pairs[:, 0] << 32) | pairs[:, 1]).reshape(shape)
    return draws.astype(jnp.dtype(f"uint{bit_width}")).reshape(shape)


def _split(key, shape):
    counters = lax.iota(jnp.uint32, 2 * math.prod(shape)) ^ _SPLIT_STREAM
    return keyed_bijection(counters, key[..., 0], key[..., 1]).reshape(*shape, 2)


def _fold_in(key, data):
    data = jnp.asarray(data).astype(jnp.uint32)
    return jnp.stack([fmix32(key[0] ^ fmix32(data + GOLDEN)), fmix32(key[1] + data)])


FMIX32 = define_prng_impl(key_shape=(2,), seed=_seed, split=_split, random_bits=_random_bits,
                          fold_in=_fold_in, name="functional_cnn.prng.FMIX32", tag="fmix32")


def key(seed) -> jax.Array:
    """``jax.random.key(seed, impl=FMIX32)``; a Python or numpy integer is hashed on the host.

    JAX computes a key's words from a concrete seed eagerly, one jitted program per operation:
    seven small programs to compile (0.25 CPU-s on the AMD EPYC of docs/BENCHMARKS.md, at the
    start of every run). numpy computes the same words here, after JAX's conversion of the seed
    (a Python int to int64, then any seed to its canonical type: int32 unless
    ``jax_enable_x64``). Arrays, traced seeds and runs with a ``jax_random_seed_offset`` go to
    ``jax.random.key``."""
    if not isinstance(seed, (int, np.integer)) or jax.config.jax_random_seed_offset:
        return jax.random.key(seed, impl=FMIX32)
    seed = np.asarray(np.int64(seed) if isinstance(seed, int) else seed)
    seed = seed.astype(jax.dtypes.canonicalize_dtype(seed.dtype)).reshape(1)  # 1-d: wraps quietly
    words = _seed_words(seed, np).reshape(2)
    return jax.random.wrap_key_data(jax.device_put(words), impl=FMIX32)
