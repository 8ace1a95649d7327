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


# ------------------------------------------------------------- gelu, silu, elu, softplus, hardtanh

def _grad(op, x, vjp, **kw):
    return jax.grad(lambda x: op(x, vjp=vjp, **kw).sum())(x)


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_subgradients_at_the_kinks_follow_torch(vjp, torch):
    x = jnp.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0])
    cases = [(F.hardtanh, dict(min_val=-1.0, max_val=1.0), "hardtanh"),  # 0 AT the bounds
             (F.hardtanh, dict(min_val=0.0, max_val=0.0), "hardtanh"),
             (F.elu, dict(alpha=0.5), "elu"),  # alpha (the left derivative) at 0
             (F.softplus, dict(beta=2.0, threshold=1.0), "softplus")]  # log branch at 0.5
    for op, kw, torch_name in cases:
        xt = torch.tensor(np.asarray(x), requires_grad=True)
        getattr(torch.nn.functional, torch_name)(xt, **kw).sum().backward()
        np.testing.assert_allclose(_grad(op, x, vjp, **kw), xt.grad.numpy(), rtol=1e-6,
                                   err_msg=f"{torch_name} {kw}")
    np.testing.assert_array_equal(_grad(F.hardtanh, x, vjp), [0, 0, 1, 1, 1, 0, 0])
    # a NaN passes the forward and its gradient on both paths (torch's kernels disagree)
    np.testing.assert_array_equal(_grad(F.hardtanh, jnp.array([np.nan, 0.5]), vjp), [1, 1])
    np.testing.assert_allclose(_grad(F.elu, jnp.array([0.0]), vjp, alpha=0.5), [0.5])
    # elu too, as torch's backward (not x <= 0: the gradient passes)
    nan = torch.tensor([np.nan, -1.0], requires_grad=True)
    torch.nn.functional.elu(nan, alpha=0.5).sum().backward()
    np.testing.assert_allclose(_grad(F.elu, jnp.array([np.nan, -1.0]), vjp, alpha=0.5),
                               nan.grad.numpy(), rtol=1e-6)
    assert nan.grad[0] == 1


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_softplus_is_the_identity_above_the_threshold(vjp):
    x = jnp.array([20.5, 1e4, 10.0])
    y = F.softplus(x, vjp=vjp)
    np.testing.assert_array_equal(y[:2], x[:2])
    np.testing.assert_allclose(y[2], np.log1p(np.exp(10.0)), rtol=1e-6)
    np.testing.assert_array_equal(_grad(F.softplus, x[:2], vjp), [1.0, 1.0])
    # beta scales the switch: beta x > threshold
    np.testing.assert_array_equal(F.softplus(jnp.array([3.0]), beta=10.0, threshold=20.0), [3.0])


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_large_inputs_give_no_nans(vjp):
    # elu's and softplus's exp() of the branch not taken would overflow: both paths guard it.
    x = jnp.array([-1e4, -100.0, 0.0, 100.0, 1e4])
    for op in (F.gelu, F.silu, F.elu, F.softplus, F.hardtanh):
        y, g = jax.value_and_grad(lambda x: op(x, vjp=vjp).sum())(x)
        assert np.isfinite(float(y)) and bool(jnp.all(jnp.isfinite(g))), op.__name__
    np.testing.assert_allclose(_grad(F.elu, x, vjp), [0, 0, 1, 1, 1], atol=1e-30)
    np.testing.assert_allclose(_grad(F.softplus, x, vjp), [0, 0, 0.5, 1, 1], atol=1e-30)


def test_gelu_exact_uses_erf_and_tanh_is_the_approximation():
    from math import erf, sqrt, tanh, pi
    x = [-3.0, -0.5, 0.0, 1.0, 2.5]
    exact = [v * 0.5 * (1 + erf(v / sqrt(2))) for v in x]
    approx = [0.5 * v * (1 + tanh(sqrt(2 / pi) * (v + 0.044715 * v ** 3))) for v in x]
    np.testing.assert_allclose(F.gelu(jnp.array(x)), exact, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(F.gelu(jnp.array(x), "tanh"), approx, rtol=1e-6, atol=1e-7)
    assert np.max(np.abs(np.array(exact) - np.array(approx))) > 1e-4  # they do differ


@pytest.mark.parametrize("name,kw", [("elu", dict(alpha=0.5)), ("hardtanh", {}),
                                     ("softplus", dict(beta=2.0, threshold=1.0))])
def test_second_derivative_at_the_kinks_is_the_same_on_both_paths(name, kw, torch):
    x = jnp.array([-1.0, -0.25, 0.0, 0.5, 1.0])  # elu's 0, hardtanh's bounds, softplus's 0.5
    op = getattr(F, name)
    second = {vjp: jax.vmap(jax.grad(jax.grad(lambda v, vjp=vjp: op(v, vjp=vjp, **kw))))(x)
              for vjp in ("custom", "autodiff")}
    np.testing.assert_allclose(second["custom"], second["autodiff"], rtol=1e-6)
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    (g,) = torch.autograd.grad(getattr(torch.nn.functional, name)(xt, **kw).sum(), xt,
                               create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), xt)
    np.testing.assert_allclose(second["custom"], h.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("call,error,message", [
    (lambda x: F.gelu(x, "fast"), ValueError, r"gelu: approximate must be 'none' or 'tanh', "
                                              r"got 'fast'"),
    (lambda x: F.hardtanh(x, 1.0, -1.0), ValueError,
     r"hardtanh: min_val must not exceed max_val, got min_val=1.0, max_val=-1.0"),
    (lambda x: F.softplus(x, beta=0), ValueError, r"softplus: beta must be nonzero"),
    (lambda x: F.silu(x.astype(jnp.int32)), TypeError,
     r"silu: expected a floating-point input, got dtype int32"),
    (lambda x: F.elu(x, vjp="numeric"), ValueError, r"elu: vjp must be one of"),
])
def test_bad_arguments_raise_before_xla(call, error, message):
    with pytest.raises(error, match=message):
        call(jnp.ones(3))


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_silu_sigmoid_from_exp_of_minus_abs_is_logistic_and_smooth_at_zero(vjp, torch):
    """SiLU's sigmoid is computed from ``exp(-|x|)``, branch by branch (faster on XLA:CPU than
    ``lax.logistic``): as close to the exact values as ``lax.logistic``, torch's values and
    gradients at the extremes, and second derivatives right at 0 too (``-|x|`` is never
    differentiated at its kink)."""
    from functional_cnn.functional.activations import _sigmoid_of_exp_minus_abs
    x = jnp.linspace(-30, 30, 6001, dtype=jnp.float32)
    exact = 1 / (1 + np.exp(-np.asarray(x, np.float64)))
    # both within 3 eps relative (2 here: 0.70 and 0.57 of 2.4e-7; exp's code is XLA's, per CPU)
    for sigmoid in (_sigmoid_of_exp_minus_abs, jax.lax.logistic):
        np.testing.assert_allclose(sigmoid(x), exact, rtol=3.6e-7, atol=0)
    extremes = jnp.array([-1e30, -200.0, -88.0, -20.0, 0.0, 20.0, 88.0, 200.0, 1e30])
    xt = torch.tensor(np.asarray(extremes), requires_grad=True)
    torch.nn.functional.silu(xt).sum().backward()
    y, back = jax.vjp(lambda x: F.silu(x, vjp=vjp), extremes)
    # (XLA:CPU flushes subnormals: silu(-88) is 0, not torch's -5e-37)
    np.testing.assert_allclose(y, torch.nn.functional.silu(xt).detach().numpy(), rtol=1e-6,
                               atol=1e-30)
    np.testing.assert_allclose(back(jnp.ones_like(y))[0], xt.grad.numpy(), rtol=1e-6, atol=1e-30)
    second = jax.grad(jax.grad(lambda x: F.silu(x, vjp=vjp)))(0.0)
    assert float(second) == 0.5  # 2 sigmoid'(0)
