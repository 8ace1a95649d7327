"""Pooling specifics: first-maximum routing on ties, dilation under autodiff, divisors."""
import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn.functional as F


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_max_pool_routes_ties_to_the_first_maximum_in_row_major_order(vjp):
    x = jnp.array([[[[1.0, 3.0, 3.0, 0.0],
                     [3.0, 2.0, 0.0, 0.0],
                     [0.0, 0.0, 0.0, 0.0],
                     [0.0, 0.0, 0.0, 0.0]]]])
    g = jax.grad(lambda x: F.max_pool2d(x, 2, vjp=vjp).sum())(x)
    expected = np.zeros((4, 4))
    expected[0, 1] = 1  # 3 at (0,1) comes before the tied 3 at (1,0)
    expected[0, 2] = 1  # window of zeros and a 3: the 3
    expected[2, 0] = expected[2, 2] = 1  # all-zero windows: their first element
    np.testing.assert_array_equal(g[0, 0], expected)


def test_max_pool_overlapping_windows_accumulate():
    x = jnp.array([[[[0.0, 5.0, 0.0, 0.0, 0.0]]]])
    g = jax.grad(lambda x: F.max_pool2d(x, (1, 3), stride=1).sum())(x)
    # windows [0,5,0], [5,0,0], [0,0,0]: the 5 wins twice, the all-zero window picks its first
    np.testing.assert_array_equal(g[0, 0, 0], [0, 2, 1, 0, 0])


def test_dilated_max_pool_is_differentiable_by_autodiff_path():
    x = jax.random.normal(jax.random.key(0), (1, 2, 9, 9))
    grads = [jax.grad(lambda x: (F.max_pool2d(x, 3, 2, 1, dilation=2, vjp=v) ** 2).sum())(x)
             for v in ("custom", "autodiff")]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)
    assert int((grads[0] != 0).sum()) > 0


def test_avg_pool_divisors_follow_torch_at_the_borders():
    # 3-wide input, kernel 2, stride 2, padding 1, ceil_mode: windows [-1,1), [1,3), [3,5)->drop
    x = jnp.ones((1, 1, 1, 3)) * jnp.array([1.0, 2.0, 4.0])
    incl = F.avg_pool2d(x, (1, 2), (1, 2), (0, 1), ceil_mode=True)
    excl = F.avg_pool2d(x, (1, 2), (1, 2), (0, 1), ceil_mode=True, count_include_pad=False)
    np.testing.assert_allclose(incl[0, 0, 0], [0.5, 3.0])
    np.testing.assert_allclose(excl[0, 0, 0], [1.0, 3.0])


def test_unbatched_input_like_torch():
    x = jax.random.normal(jax.random.key(0), (3, 6, 6))
    np.testing.assert_array_equal(F.max_pool2d(x, 2), F.max_pool2d(x[None], 2)[0])
    np.testing.assert_array_equal(F.avg_pool2d(x, 2), F.avg_pool2d(x[None], 2)[0])
    w = jnp.ones((4, 3, 3, 3))
    np.testing.assert_array_equal(F.conv2d(x, w), F.conv2d(x[None], w)[0])


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_max_pool_nan_wins_its_window_and_takes_the_gradient(vjp):
    # PyTorch propagates NaN through max pooling; the rule sends the window's gradient to it
    x = jnp.array([[[[1.0, jnp.nan, 0.0, 2.0],
                     [5.0, 3.0, 1.0, 0.5]]]])
    y = F.max_pool2d(x, 2, vjp=vjp)  # the primal (no differentiation)
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == 2.0
    value, pullback = jax.vjp(lambda x: F.max_pool2d(x, 2, vjp=vjp), x)
    np.testing.assert_array_equal(value, y)  # the rule's own forward (the variadic reduce)
    grad, = pullback(jnp.ones_like(value))
    expected = np.zeros((2, 4))
    expected[0, 1] = expected[0, 3] = 1
    np.testing.assert_array_equal(np.asarray(grad[0, 0]), expected)
