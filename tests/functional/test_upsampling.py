"""interpolate specifics: PyTorch's source positions to the index (non-integer scales, the
float32 rounding, its special cases), the sizes scale_factor gives, and bad arguments."""
import math

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import numpy as jnp

import functional_cnn.functional as F
from functional_cnn.functional import upsampling

SCALES = st.sampled_from([0.3, 0.5, 0.7, 1 / 3, 0.9, 1.1, 4 / 3, 1.5, 5 / 3, 1.7, 1.99, 2.0,
                          2.01, 2.2, 2.5, 2.9, 3.0, 3.3])


def _ramp(n, dtype=np.float64):
    """A row whose values are its indices: resizing it shows which input each output read."""
    return np.arange(n, dtype=dtype).reshape(1, 1, 1, n)


def _resized_by_taps(x_row, n_out, scale, mode, align_corners, dtype):
    """One row resized by our taps alone (numpy, no JAX): ``A x`` with ``A`` from the taps."""
    if mode == "nearest":
        taps = upsampling.nearest_taps(x_row.size, n_out, scale)
    else:
        taps = upsampling.bilinear_taps(x_row.size, n_out, scale, align_corners, dtype)
    return taps.matrix(x_row.size, np.float64) @ x_row


@given(n_in=st.integers(1, 12), n_out=st.integers(1, 30), scale=SCALES,
       by_scale=st.booleans(), double=st.booleans(), align_corners=st.booleans())
def test_positions_and_weights_match_torch(n_in, n_out, scale, by_scale, double, align_corners,
                                           torch):
    # nearest must read the very same input (exact equality on a ramp of indices), bilinear
    # weigh the same two inputs with PyTorch's weights (computed in float32 for float32 input)
    if by_scale:
        n_out = math.floor(n_in * scale)
        if n_out < 1:
            return
    kw = dict(scale_factor=(1, scale)) if by_scale else dict(size=(1, n_out))
    dtype = np.float64 if double else np.float32
    ramp = _ramp(n_in, dtype)
    nearest = torch.nn.functional.interpolate(torch.tensor(ramp), **kw).numpy()[0, 0, 0]
    got = _resized_by_taps(ramp[0, 0, 0], n_out, scale if by_scale else None, "nearest", None,
                           dtype)
    np.testing.assert_array_equal(got, nearest)
    x = np.random.default_rng(n_in).standard_normal(n_in).astype(dtype)
    bilinear = torch.nn.functional.interpolate(torch.tensor(x).reshape(1, 1, 1, -1),
                                               mode="bilinear", align_corners=align_corners,
                                               **kw).numpy()[0, 0, 0]
    got = _resized_by_taps(x.astype(np.float64), n_out, scale if by_scale else None, "bilinear",
                           align_corners, dtype)
    np.testing.assert_allclose(got, bilinear, rtol=0, atol=1e-14 if double else 1e-6)


def test_nearest_positions_are_floored_in_float32(torch):
    # PyTorch computes i * (26 / 22) in float32 even for float64 input, and output 11 of 22
    # reads input 12 (exact arithmetic: 11 * 26 / 22 = 13): so does ours
    assert upsampling.nearest_taps(26, 22, None).index[0, 11] == 12
    want = torch.nn.functional.interpolate(torch.tensor(_ramp(26)), size=(1, 22))
    with jax.enable_x64(True):
        got = F.interpolate(jnp.asarray(_ramp(26)), size=(1, 22))
    np.testing.assert_array_equal(np.asarray(got), want.numpy())
    # the two special cases PyTorch keeps: same size copies, twice the size halves the index
    np.testing.assert_array_equal(upsampling.nearest_taps(5, 5, 1.1).index[0], np.arange(5))
    np.testing.assert_array_equal(upsampling.nearest_taps(4, 8, 2.01).index[0],
                                  [0, 0, 1, 1, 2, 2, 3, 3])


def test_bilinear_half_pixel_centers_clamp_at_zero():
    # 2 -> 4, align_corners=False: src = (i + 1/2) / 2 - 1/2 = -0.25, 0.25, 0.75, 1.25 -> 0 ...
    y = F.interpolate(jnp.asarray(_ramp(2, np.float32)), size=(1, 4), mode="bilinear",
                      align_corners=False)
    np.testing.assert_allclose(np.asarray(y)[0, 0, 0], [0.0, 0.25, 0.75, 1.0])
    y = F.interpolate(jnp.asarray(_ramp(2, np.float32)), size=(1, 4), mode="bilinear",
                      align_corners=True)
    np.testing.assert_allclose(np.asarray(y)[0, 0, 0], [0.0, 1 / 3, 2 / 3, 1.0], rtol=1e-6)


@pytest.mark.parametrize("scale", [1.7, (0.5, 2.5), 3])
def test_output_size_is_the_floor_of_input_times_scale(scale, torch):
    x = np.zeros((2, 1, 7, 5), np.float32)
    want = torch.nn.functional.interpolate(torch.tensor(x), scale_factor=scale).shape
    assert F.interpolate(jnp.asarray(x), scale_factor=scale).shape == tuple(want)


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_nearest_keeps_nan_to_its_copies(vjp):
    # nearest is gathered, not a dense 0/1 matrix: a NaN reaches only the outputs copying it
    x = jnp.zeros((1, 1, 3, 3)).at[0, 0, 1, 1].set(jnp.nan)
    y = F.interpolate(x, scale_factor=2, vjp=vjp)
    assert int(jnp.isnan(y).sum()) == 4 and bool(jnp.isnan(y[0, 0, 2:4, 2:4]).all())
    g = jax.grad(lambda x: F.interpolate(x, size=(5, 4), vjp=vjp).sum())(jnp.ones((1, 1, 3, 3)))
    assert float(g.sum()) == 20.0  # every output's cotangent lands on the input it copies


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_batch_zero_like_torch(mode):
    x = jnp.zeros((0, 3, 4, 4))
    y, pullback = jax.vjp(lambda x: F.interpolate(x, size=(5, 6), mode=mode), x)
    assert y.shape == (0, 3, 5, 6) and pullback(y)[0].shape == x.shape


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(), ValueError, r"interpolate: give exactly one of size and scale_factor"),
    (dict(size=3, scale_factor=2), ValueError, r"interpolate: give exactly one of size"),
    (dict(size=3, mode="bicubic"), ValueError, r"interpolate: mode must be one of \('nearest', "
                                               r"'bilinear'\), got 'bicubic'"),
    (dict(size=3, align_corners=True), ValueError,
     r"interpolate: align_corners can only be set with mode='bilinear'"),
    (dict(size=0), ValueError, r"interpolate: size must be >= 1, got 0"),
    (dict(size=2.5), TypeError, r"interpolate: size must be an int or a pair of ints"),
    (dict(scale_factor=-1.0), ValueError, r"interpolate: scale_factor must be positive"),
    (dict(scale_factor="2"), TypeError, r"interpolate: scale_factor must be a number"),
    (dict(scale_factor=0.1), ValueError, r"interpolate: scale_factor 0.1 makes the output 0x0 "
                                         r"from 4x4"),
])
def test_bad_arguments_raise_before_xla(kwargs, error, message):
    with pytest.raises(error, match=message):
        F.interpolate(jnp.ones((1, 2, 4, 4)), **kwargs)


def test_three_dimensional_input_is_refused_not_read_as_one_dimensional():
    # PyTorch resizes a 3-D input along its last axis only (1-D interpolation): say so
    with pytest.raises(ValueError, match=r"interpolate: expected a 4-D input .*3-D input along "
                                         r"one axis.*got shape \(2, 4, 4\)"):
        F.interpolate(jnp.ones((2, 4, 4)), size=3)
    with pytest.raises(TypeError, match=r"interpolate: expected a floating-point input"):
        F.interpolate(jnp.ones((1, 2, 4, 4), jnp.int32), size=3)
