"""Loss specifics: exact values at logits of 1e4 and label smoothing against hand computation."""
import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn as fcn


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_cross_entropy_at_logits_of_1e4_is_exact(vjp):
    logits = jnp.array([[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]])
    labels = jnp.array([2, 1])
    loss, g = jax.value_and_grad(lambda z: fcn.cross_entropy(z, labels, "sum", vjp=vjp))(logits)
    np.testing.assert_allclose(loss, 2e4, rtol=1e-7)
    np.testing.assert_allclose(g, [[1, 0, -1], [0, 0, 0]], atol=1e-7)


def test_label_smoothing_by_hand():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    logp = jax.nn.log_softmax(logits)
    eps = 0.3
    expected = -((1 - eps) * logp[0, 0] + eps / 3 * logp[0].sum())
    np.testing.assert_allclose(fcn.cross_entropy(logits, jnp.array([0]), label_smoothing=eps),
                               expected, rtol=1e-6)


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_bce_with_logits_at_1e4(vjp):
    z = jnp.array([1e4, -1e4, 1e4])
    t = jnp.array([1.0, 0.0, 0.0])
    loss, (gz, gt) = jax.value_and_grad(
        lambda z, t: fcn.binary_cross_entropy_with_logits(z, t, "none", vjp=vjp).sum(),
        argnums=(0, 1))(z, t)
    np.testing.assert_allclose(loss, 1e4, rtol=1e-7)
    np.testing.assert_allclose(gz, [0, 0, 1])
    np.testing.assert_allclose(gt, -z)


def test_reductions_relate():
    rng = np.random.default_rng(0)
    p, t = (jnp.asarray(rng.standard_normal((4, 3)), jnp.float32) for _ in range(2))
    none = fcn.mse_loss(p, t, "none")
    np.testing.assert_allclose(fcn.mse_loss(p, t, "sum"), none.sum(), rtol=1e-6)
    np.testing.assert_allclose(fcn.mse_loss(p, t), none.mean(), rtol=1e-6)
