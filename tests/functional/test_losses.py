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


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_labels_outside_the_classes_under_jit_give_nan_rows(vjp, smoothing):
    # Under jit the labels cannot be checked in Python: a label of C or below 0 must make its
    # element's loss and its row of the gradient NaN on both paths (not a finite loss, not a
    # finite or zero gradient), and leave the other rows exact.
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 10)), jnp.float32)
    labels = jnp.array([10, 3, -1, 9])

    def loss(z, y, reduction):
        return fcn.cross_entropy(z, y, reduction, smoothing, vjp=vjp)

    per_fn = jax.jit(lambda z, y: loss(z, y, "none"))
    grad_fn = jax.jit(jax.grad(lambda z, y: loss(z, y, "mean")))
    per, grad = per_fn(logits, labels), np.asarray(grad_fn(logits, labels))
    valid = np.array([False, True, False, True])
    assert np.isnan(per[~valid]).all() and np.isnan(grad[~valid]).all()
    good = jnp.array([0, 3, 0, 9])  # the same program with in-range labels is the reference
    np.testing.assert_array_equal(per[valid], per_fn(logits, good)[valid])
    np.testing.assert_array_equal(grad[valid], grad_fn(logits, good)[valid])


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_bce_with_logits_at_zero_and_infinite_logits(vjp):
    # 0: the loss is smooth there, dx = sigmoid(0) - t (autodiff of the stable form gave -t);
    # +-inf with the matching target: the exact loss 0, not nan (PyTorch gives nan).
    z = jnp.array([0.0, -0.0, 0.0, -jnp.inf, jnp.inf, -jnp.inf])
    t = jnp.array([0.0, 0.3, 1.0, 0.0, 1.0, 0.5])
    loss, (gz, gt) = jax.jit(jax.value_and_grad(
        lambda z, t: (fcn.binary_cross_entropy_with_logits(z, t, "none", vjp=vjp)
                      * jnp.arange(1.0, 7.0)).sum(), argnums=(0, 1)))(z, t)
    per = fcn.binary_cross_entropy_with_logits(z, t, "none", vjp=vjp)
    np.testing.assert_allclose(per, [np.log(2)] * 3 + [0, 0, np.inf], rtol=1e-7)
    assert loss == np.inf
    np.testing.assert_allclose(gz, [0.5, 2 * 0.2, 3 * -0.5, 0, 0, 6 * -0.5], rtol=1e-6)
    np.testing.assert_array_equal(gt, [0, 0, 0, np.inf, -np.inf, np.inf])
