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
@pytest.mark.parametrize("name, smoothing", [("cross_entropy", 0.0), ("cross_entropy", 0.1),
                                             ("nll_loss", None)])
def test_labels_outside_the_classes_under_jit_give_nan_rows(vjp, name, smoothing):
    # Under jit the labels cannot be checked in Python: a label of C or below 0 must make its
    # element's loss and its row of the gradient NaN on both paths (not a finite loss, not a
    # finite or zero gradient), and leave the other rows exact.
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 10)), jnp.float32)
    labels = jnp.array([10, 3, -1, 9])

    def loss(z, y, reduction):
        if name == "nll_loss":
            return fcn.nll_loss(jax.nn.log_softmax(z), y, reduction, vjp=vjp)
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


# ----------------------------------------------------------------------------- nll, huber

@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_of_log_softmax_is_cross_entropy(reduction, vjp):
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((5, 4, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, (5, 3)))

    def nll(z):
        return fcn.nll_loss(fcn.functional.log_softmax(z, 1, vjp=vjp), y, reduction, vjp=vjp)

    def ce(z):
        return fcn.cross_entropy(z, y, reduction, vjp=vjp)

    np.testing.assert_allclose(nll(z), ce(z), rtol=1e-6, atol=1e-6)
    g_nll = jax.grad(lambda z: (nll(z) ** 2).sum())(z)
    np.testing.assert_allclose(g_nll, jax.grad(lambda z: (ce(z) ** 2).sum())(z),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_nll_picks_the_labelled_entry_and_averages_rows(vjp, torch):
    logp = jnp.array([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    labels = jnp.array([2, 0])
    loss, g = jax.value_and_grad(lambda p: fcn.nll_loss(p, labels, vjp=vjp))(logp)
    assert float(loss) == 3.5  # (3 + 4) / 2
    np.testing.assert_array_equal(g, [[0, 0, -0.5], [-0.5, 0, 0]])
    # unbatched (C,) input with a scalar label, as torch: a scalar loss, reduced or not
    for reduction in ("mean", "sum", "none"):
        single = fcn.nll_loss(logp[0], jnp.array(1), reduction, vjp=vjp)
        expected = torch.nn.functional.nll_loss(torch.tensor(np.asarray(logp[0])),
                                                torch.tensor(1), reduction=reduction)
        assert single.shape == tuple(expected.shape) == ()
        assert float(single) == float(expected) == 2.0
        ce = fcn.cross_entropy(logp[0], jnp.array(1), reduction, vjp=vjp)
        assert ce.shape == () and jax.grad(
            lambda z: fcn.cross_entropy(z, jnp.array(1), reduction, vjp=vjp))(logp[0]).shape == (3,)


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_nll_batch_zero_like_torch(vjp, torch):
    empty, labels = jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32)
    assert np.isnan(float(fcn.nll_loss(empty, labels, vjp=vjp)))  # 0 / 0, as torch
    assert np.isnan(float(torch.nn.functional.nll_loss(torch.zeros(0, 3),
                                                       torch.zeros(0, dtype=torch.long))))
    loss, g = jax.value_and_grad(lambda p: fcn.nll_loss(p, labels, "sum", vjp=vjp))(empty)
    assert float(loss) == 0 and g.shape == (0, 3)


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_huber_pieces_meet_at_delta(vjp, torch):
    delta = 0.5
    pred = jnp.array([-2.0, -0.5, -0.25, 0.0, 0.25, 0.5, 2.0])
    target = jnp.zeros_like(pred)
    loss, g = jax.value_and_grad(
        lambda p: fcn.huber_loss(p, target, "sum", delta, vjp=vjp))(pred)
    pt = torch.tensor(np.asarray(pred), requires_grad=True)
    expected = torch.nn.functional.huber_loss(pt, torch.zeros(7), reduction="sum", delta=delta)
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-6)
    np.testing.assert_array_equal(g, pt.grad.numpy())
    np.testing.assert_array_equal(g, [-0.5, -0.5, -0.25, 0, 0.25, 0.5, 0.5])  # clip(d, -δ, δ)


def test_huber_with_a_large_delta_is_half_the_squared_error():
    rng = np.random.default_rng(0)
    p, t = (jnp.asarray(rng.standard_normal((4, 3)), jnp.float32) for _ in range(2))
    np.testing.assert_allclose(fcn.huber_loss(p, t, delta=100.0), 0.5 * fcn.mse_loss(p, t),
                               rtol=1e-6)


@pytest.mark.parametrize("call,error,message", [
    (lambda: fcn.nll_loss(jnp.zeros((2, 3)), jnp.array([0, 3])), ValueError,
     r"nll_loss: labels must lie in \[0, 3\), got values in \[0, 3\]"),
    (lambda: fcn.nll_loss(jnp.zeros((2, 3)), jnp.array([0.0, 1.0])), TypeError,
     r"nll_loss: expected integer class labels, got dtype float32"),
    (lambda: fcn.nll_loss(jnp.zeros((2, 3)), jnp.array([0, 1, 2])), ValueError,
     r"nll_loss: expected labels of shape \(2,\) for log_probs \(2, 3\), got \(3,\)"),
    (lambda: fcn.nll_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), "avg"), ValueError,
     r"nll_loss: reduction must be one of"),
    (lambda: fcn.huber_loss(jnp.zeros(3), jnp.zeros(3), delta=0.0), ValueError,
     r"huber_loss: delta must be positive, got 0.0"),
    (lambda: fcn.huber_loss(jnp.zeros(3), jnp.zeros(4)), ValueError,
     r"huber_loss: expected target of the same shape as pred \(3,\), got \(4,\)"),
])
def test_bad_loss_input_raises_before_xla(call, error, message):
    with pytest.raises(error, match=message):
        call()
