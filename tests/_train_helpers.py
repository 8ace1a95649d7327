"""Tiny data and a tiny BatchNorm network for the engine's tests (test_train, test_parallel)."""
import numpy as np
from jax import numpy as jnp

import functional_cnn as fcn
from functional_cnn import data


def tiny_data(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return data.Dataset(jnp.asarray(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                        jnp.asarray(rng.integers(0, 10, n), jnp.int32))


def small_net():  # BatchNorm, so a padded batch would change the result
    return fcn.serial(fcn.Conv2d(4, 3, stride=2), fcn.BatchNorm2d(), fcn.ReLU(), fcn.Flatten(),
                      fcn.Linear(10))
