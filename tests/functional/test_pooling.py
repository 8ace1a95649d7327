"""Pooling specifics: first-maximum routing on ties, dilation under autodiff, divisors."""
import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn as fcn
import functional_cnn.functional as F
from functional_cnn.functional import pooling


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


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                                    dict(kernel_size=2, count_include_pad=False),
                                    dict(kernel_size=(2, 3), stride=1)])
@pytest.mark.parametrize("divisor", [1, 5, -3])
def test_avg_pool_divisor_override_divides_every_window_as_torch(vjp, kwargs, divisor, torch):
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    expected = torch.nn.functional.avg_pool2d(xt, divisor_override=divisor, **kwargs)
    g = np.random.default_rng(1).standard_normal(tuple(expected.shape)).astype(np.float32)
    expected.backward(torch.tensor(g))
    y, back = jax.vjp(lambda x: F.avg_pool2d(x, divisor_override=divisor, vjp=vjp, **kwargs),
                      jnp.asarray(x))
    np.testing.assert_allclose(y, expected.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back(jnp.asarray(g))[0], xt.grad.numpy(), rtol=1e-6, atol=1e-6)
    layer = fcn.AvgPool2d(divisor_override=divisor, **kwargs)
    np.testing.assert_allclose(layer.apply({}, {}, jnp.asarray(x))[0], y, rtol=0, atol=0)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="avg_pool2d: expected divisor_override None or a "
                                             "nonzero int"):
            F.avg_pool2d(jnp.asarray(x), 2, divisor_override=bad)


@pytest.mark.parametrize("dtype, ulp", [("bfloat16", 0.5), ("float16", 2 ** -4)])
def test_low_precision_average_is_a_float32_sum_rounded_once(dtype, ulp, torch):
    """Summed in the input's dtype, a bfloat16 3x3 window around 100 came out 3.5x further
    from the exact mean than torch's, which sums in float32. Now within half a unit in the
    last place (at 100) of the exact value, forward and (overlapping windows) backward: one
    rounding, never further than torch's."""
    rng = np.random.default_rng(0)
    a, g = rng.standard_normal((2, 3, 9, 9)) + 100, rng.standard_normal((2, 3, 9, 9)) + 100
    low = getattr(torch, dtype)
    at, gt = torch.tensor(a).to(low).requires_grad_(), torch.tensor(g).to(low)
    theirs = torch.nn.functional.avg_pool2d(at, 3, 1, 1)
    theirs.backward(gt)
    exact_in = at.detach().double().requires_grad_()  # the same rounded values, exactly
    exact = torch.nn.functional.avg_pool2d(exact_in, 3, 1, 1)
    exact.backward(gt.double())
    x = jnp.asarray(at.detach().float().numpy()).astype(dtype)
    for vjp in ("custom", "autodiff"):
        y, back = jax.vjp(lambda x: F.avg_pool2d(x, 3, 1, 1, vjp=vjp), x)
        dx, = back(jnp.asarray(gt.float().numpy()).astype(dtype))
        assert y.dtype == dx.dtype == x.dtype
        for ours, want, torchs in ((y, exact.detach(), theirs.detach()),
                                   (dx, exact_in.grad, at.grad)):
            error = np.abs(np.asarray(ours, np.float64) - want.numpy())
            assert error.max() <= ulp / 2 * 1.01, (vjp, error.max())
            assert error.max() <= np.abs(torchs.double().numpy() - want.numpy()).max()
        # adaptive windows that do not divide the input (a matrix product, not the windows'
        # sums): the same one rounding
        adaptive = F.adaptive_avg_pool2d(x, 4, vjp=vjp)
        exact_adaptive = torch.nn.functional.adaptive_avg_pool2d(at.detach().double(), 4)
        error = np.abs(np.asarray(adaptive, np.float64) - exact_adaptive.numpy())
        assert adaptive.dtype == x.dtype and error.max() <= ulp / 2 * 1.01, (vjp, error.max())


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


_NAN_POOLS = [  # (pool, kwargs): tiling, overlapping with padding, dilated, adaptive
    ("max_pool2d", {"kernel_size": 2}),
    ("max_pool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True}),
    ("max_pool2d", {"kernel_size": (3, 2), "stride": 1, "dilation": (2, 1)}),
    ("adaptive_max_pool2d", {"output_size": (3, 2)}),  # irregular windows, repeats
    ("adaptive_max_pool2d", {"output_size": 2}),  # the tiling path
]


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_max_pool_window_with_two_nans_passes_its_gradient_to_the_last(vjp):
    # as torch (checked there): 2x2 windows, and 3x3 windows at stride 1 with padding
    x = jnp.array([[[[jnp.nan, 1.0], [jnp.nan, 2.0]]]])
    grad, = jax.vjp(lambda x: F.max_pool2d(x, 2, vjp=vjp), x)[1](jnp.ones((1, 1, 1, 1)))
    np.testing.assert_array_equal(grad[0, 0], [[0, 0], [1, 0]])
    x = jnp.array([[[[jnp.nan, 1.0, 0.0], [jnp.nan, 2.0, jnp.nan], [0.0, 0.0, 0.0]]]])
    grad, = jax.vjp(lambda x: F.max_pool2d(x, 3, 1, 1, vjp=vjp), x)[1](jnp.ones((1, 1, 3, 3)))
    np.testing.assert_array_equal(grad[0, 0], [[0, 0, 0], [3, 0, 6], [0, 0, 0]])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
@pytest.mark.parametrize("pool, kwargs", _NAN_POOLS)
@pytest.mark.parametrize("channels", [3, 8])  # 8: overlapping windows fold channels-last
def test_max_pools_send_a_window_with_several_nans_to_its_last_like_torch(vjp, pool, kwargs,
                                                                          channels, dtype, torch):
    # torch's kernels replace the running maximum at every NaN: the last NaN of a window (in
    # row-major order) takes its cotangent; ties between numbers go to the first; windows mix
    # NaN, -inf and the padding. Small integers: exact in every dtype, sums included.
    x = np.random.default_rng(1).choice(np.array([np.nan, -np.inf, -1.0, 0.0, 1.0], np.float32),
                                        (2, channels, 7, 6), p=[0.3, 0.15, 0.15, 0.2, 0.2])
    fn = getattr(F, pool)
    y, pullback = jax.vjp(lambda x: fn(x, **kwargs, vjp=vjp), jnp.asarray(x, dtype))
    g = np.arange(y.size, dtype=np.float32).reshape(y.shape) % 7 + 1  # which window went where
    xt = torch.tensor(x).to(getattr(torch, dtype)).requires_grad_()
    yt = getattr(torch.nn.functional, pool)(xt, **kwargs)
    yt.backward(torch.tensor(g).to(getattr(torch, dtype)))
    assert np.isnan(np.asarray(y, np.float32)).sum() > y.size // 4  # many windows have NaNs
    np.testing.assert_array_equal(np.asarray(y, np.float32), yt.detach().float().numpy())
    np.testing.assert_array_equal(np.asarray(pullback(jnp.asarray(g, dtype))[0], np.float32),
                                  xt.grad.float().numpy())


def test_first_max_reducer_is_order_free():
    # XLA may combine a window's (value, key) pairs in any order: the reducer must be
    # commutative and associative, over every pair of these values (infinities, zeros of both
    # signs, which compare equal: a zero maximum's sign is not promised) and keys, NaNs, which
    # come with negative keys (pooling._nan_keyed), and the reductions' start
    values = np.array([-np.inf, -1.0, -0.0, 0.0, 1.0, np.inf], np.float32)
    pairs = ([(jnp.float32(v), jnp.int32(k)) for v in values for k in range(3)]
             + [(jnp.float32(np.nan), jnp.int32(k)) for k in range(-3, 0)]
             + [(jnp.float32(-np.inf), jnp.int32(pooling._NO_POSITION))])
    pick = jax.jit(pooling._first_max)

    def same(p, q):
        return bool(jnp.array_equal(p[0], q[0], equal_nan=True)) and int(p[1]) == int(q[1])

    for a in pairs:
        for b in pairs:
            assert same(pick(a, b), pick(b, a)), (a, b)
    a_bc = jax.jit(jax.vmap(jax.vmap(jax.vmap(
        lambda a, b, c: (pick(a, pick(b, c)), pick(pick(a, b), c)), (None, None, 0)),
        (None, 0, None)), (0, None, None)))
    stacked = (jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs]))
    left, right = a_bc(stacked, stacked, stacked)
    np.testing.assert_array_equal(left[0], right[0])  # NaN equals NaN here
    np.testing.assert_array_equal(left[1], right[1])


def test_max_pool_gradient_with_an_empty_batch_and_overlapping_windows():
    # the scatter rule reshaped an empty batch with -1 (ZeroDivisionError) before the fix
    x = jnp.ones((0, 3, 7, 7))
    for pool in (lambda x: F.max_pool2d(x, 3, 2), lambda x: F.adaptive_max_pool2d(x, 3)):
        y, pullback = jax.vjp(pool, x)
        assert y.shape == (0, 3, 3, 3) and pullback(y)[0].shape == x.shape


def test_adaptive_windows_follow_torch_start_and_end_rule():
    # 7 -> 3: rows [0, 3), [2, 5), [4, 7) (floor(i 7/3), ceil((i+1) 7/3)): row 2 and 4 shared
    x = jnp.arange(7.0).reshape(1, 1, 7, 1)
    np.testing.assert_allclose(F.adaptive_avg_pool2d(x, (3, 1))[0, 0, :, 0], [1.0, 3.0, 5.0])
    np.testing.assert_array_equal(F.adaptive_max_pool2d(x, (3, 1))[0, 0, :, 0], [2.0, 4.0, 6.0])
    g = jax.grad(lambda x: F.adaptive_avg_pool2d(x, (3, 1)).sum())(x)
    np.testing.assert_allclose(g[0, 0, :, 0], [1, 1, 2, 1, 2, 1, 1] / np.array(3.0))
    # 2 -> 3 (larger output): rows [0, 1), [0, 2), [1, 2)
    x = jnp.array([[[[1.0], [4.0]]]])
    np.testing.assert_allclose(F.adaptive_avg_pool2d(x, (3, 1))[0, 0, :, 0], [1.0, 2.5, 4.0])


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
@pytest.mark.parametrize("size", [(5, 1), (3, 2), (2, 2)])  # irregular, and the tiling path
def test_adaptive_max_routes_ties_to_the_first_maximum_in_row_major_order(vjp, size, torch):
    x = np.zeros((1, 1, 6, 4), np.float32)
    x[0, 0, [0, 1, 3, 4], [2, 0, 3, 1]] = 1.0  # ties in most windows, zeros elsewhere
    g = jax.grad(lambda x: F.adaptive_max_pool2d(x, size, vjp=vjp).sum())(jnp.asarray(x))
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.adaptive_max_pool2d(xt, size).sum().backward()
    np.testing.assert_array_equal(np.asarray(g), xt.grad.numpy())


@pytest.mark.parametrize("pool", ["adaptive_avg_pool2d", "adaptive_max_pool2d"])
def test_adaptive_pools_take_unbatched_input_and_an_empty_output(pool):
    fn = getattr(F, pool)
    x = jax.random.normal(jax.random.key(0), (3, 7, 5))
    np.testing.assert_array_equal(fn(x, (3, None)), fn(x[None], (3, None))[0])
    # output_size 0 gives an empty output (as PyTorch's forward) and a zero gradient
    assert fn(x[None], 0).shape == (1, 3, 0, 0)
    assert float(jnp.abs(jax.grad(lambda x: fn(x, (0, 2)).sum())(x[None])).sum()) == 0.0


@pytest.mark.parametrize("output_size,error,message", [
    ((2, 3, 4), TypeError, r"adaptive_avg_pool2d: output_size must be an int or a pair of ints "
                           r"or None, got \(2, 3, 4\)"),
    (2.5, TypeError, r"output_size must be an int or a pair"),
    (-1, ValueError, r"adaptive_avg_pool2d: output_size must be >= 0, got -1"),
])
def test_adaptive_pool_bad_output_size(output_size, error, message):
    with pytest.raises(error, match=message):
        F.adaptive_avg_pool2d(jnp.ones((1, 2, 4, 4)), output_size)


def test_adaptive_pool_refuses_empty_spatial_axes_like_torch():
    with pytest.raises(ValueError, match=r"adaptive_max_pool2d: expected non-empty channel and "
                                         r"spatial axes .*got input shape \(2, 3, 0, 5\)"):
        F.adaptive_max_pool2d(jnp.ones((2, 3, 0, 5)), 2)


@pytest.mark.parametrize("shape, kernel, stride, padding, dilation, ceil_mode", [
    ((4, 32, 14, 14), 3, 2, 0, 1, False),  # article 001's pool, after its first convolution
    ((2, 3, 13, 11), 3, 2, 1, 1, True),  # padding and a ceil-mode overhang
    ((2, 2, 10, 12), (3, 2), (1, 2), (1, 0), (2, 1), False),  # dilated, strided unevenly
])
def test_overlapping_windows_reduce_in_place_as_the_stacked_views(shape, kernel, stride, padding,
                                                                  dilation, ceil_mode):
    # _sliding_maxima (reduce_window over the input) picks what _stacked_maxima picks: the
    # same values and first offsets, on small integers (ties everywhere), -inf windows and NaN
    x = np.random.default_rng(0).integers(-2, 2, shape).astype(np.float32)
    x[0, 0, :2, :] = -np.inf
    x[-1, -1, 3, 3] = np.nan
    cfg = pooling.PoolConfig(pooling.pool_axes("test", shape, kernel, stride, padding, dilation,
                                               ceil_mode))
    assert not pooling.tiles(cfg.axes)
    stacked = jax.jit(lambda x: pooling._stacked_maxima(cfg, x))(x)
    for way in (pooling._sliding_maxima, pooling._channels_last_maxima):
        value, first = jax.jit(lambda x: way(cfg, x))(x)
        np.testing.assert_array_equal(value, stacked[0], err_msg=way.__name__)
        np.testing.assert_array_equal(first, stacked[1], err_msg=way.__name__)


@pytest.mark.parametrize("channels, way", [(3, "reduce_window"), (8, "fold")])
def test_overlapping_windows_fold_channels_last_from_eight_channels(channels, way):
    # the rule's forward: one variadic reduce_window below 8 channels, the channels-last fold
    # (no reduce_window) from 8 on; tiling windows reduce their stacked views either way
    forward = jax.jit(lambda x, k, s: pooling._window_maxima(
        pooling.PoolConfig(pooling.pool_axes("t", x.shape, k, s, 0, 1, False)), x),
        static_argnums=(1, 2))
    x = jnp.zeros((2, channels, 13, 13))
    assert ("reduce_window" in str(forward.trace(x, 3, 2).jaxpr)) == (way == "reduce_window")
    assert "reduce_window" not in str(forward.trace(x, 2, 2).jaxpr)


def test_planes_too_large_for_int32_positions_take_the_stacked_views():
    # _sliding_maxima keys each element by its int32 position in the padded plane; a wrapped
    # (negative) position would read as a NaN's key, so such planes go the stacked way
    # (padded 46341 x 46341 is past 2^31 - 1, 46339 x 46339 within)
    big = pooling.PoolConfig(pooling.pool_axes("test", (1, 1, 46340, 46340), 3, 2, 1, 1, False))
    small = pooling.PoolConfig(pooling.pool_axes("test", (1, 1, 46338, 46338), 3, 2, 1, 1, False))
    assert not pooling._positions_fit(big) and pooling._positions_fit(small)


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
@pytest.mark.parametrize("op, kwargs", [
    ("max_pool2d", dict(kernel_size=(1, 3), stride=2, ceil_mode=True)),
    ("avg_pool2d", dict(kernel_size=4, stride=3, ceil_mode=True)),
    ("avg_pool2d", dict(kernel_size=4, stride=3, ceil_mode=True, count_include_pad=False)),
    ("max_pool2d", dict(kernel_size=(1, 2), stride=2, dilation=(1, 2), ceil_mode=True)),
])
def test_ceil_mode_keeps_a_first_window_wider_than_the_padded_input(op, kwargs, vjp, torch):
    """As torch: in ceil mode one window (read past the input's end) still fits a 5x2 input
    where the window is 3, 4 or 3 (dilated) wide; they had raised."""
    x = np.arange(10, dtype=np.float32).reshape(1, 1, 5, 2)
    tx = torch.tensor(x, requires_grad=True)
    want = getattr(torch.nn.functional, op)(tx, **kwargs)
    g = np.random.default_rng(0).standard_normal(tuple(want.shape)).astype(np.float32)
    (want_dx,) = torch.autograd.grad(want, tx, torch.tensor(g))
    got, pull = jax.vjp(lambda x: getattr(F, op)(x, **kwargs, vjp=vjp), jnp.asarray(x))
    np.testing.assert_array_equal(got, want.detach().numpy())
    np.testing.assert_allclose(pull(jnp.asarray(g))[0], want_dx.numpy(), rtol=1e-6)
