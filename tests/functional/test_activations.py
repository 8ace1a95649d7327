"""Activation specifics: PyTorch's derivative conventions, exactness at logits of 1e4."""
import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn.functional as F


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_relu_and_leaky_relu_derivatives_at_zero_follow_torch(vjp):
    x = jnp.array([-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(jax.grad(lambda x: F.relu(x, vjp=vjp).sum())(x), [0, 0, 1])
    g = jax.grad(lambda x: F.leaky_relu(x, 0.1, vjp=vjp).sum())(x)
    np.testing.assert_allclose(g, [0.1, 0.1, 1])


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_softmax_family_is_exact_for_logits_of_1e4(vjp):
    x = jnp.array([[1e4, 0.0, -1e4], [1e4, 1e4 - 1.0, 5.0]])
    p = F.softmax(x, vjp=vjp)
    logp = F.log_softmax(x, vjp=vjp)
    assert bool(jnp.all(jnp.isfinite(p))) and bool(jnp.all(jnp.isfinite(logp)))
    np.testing.assert_allclose(logp[0], [0.0, -1e4, -2e4], rtol=1e-7)
    e = 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(p[1], [e, 1 - e, 0.0], rtol=1e-6, atol=1e-30)
    g = jax.grad(lambda x: (F.log_softmax(x, vjp=vjp) * jnp.arange(3.0)).sum())(x)
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g.sum(axis=-1), 0.0, atol=1e-5)  # shift invariance


def test_sigmoid_and_tanh_saturate_without_nans():
    x = jnp.array([-1e4, 0.0, 1e4])
    for op in (F.sigmoid, F.tanh):
        y, g = jax.value_and_grad(lambda x: op(x).sum())(x)
        assert np.isfinite(float(y)) and bool(jnp.all(jnp.isfinite(g)))
        np.testing.assert_allclose(g[jnp.array([0, 2])], 0.0)
