"""The shared window geometry: PyTorch's output sizes, the exact-reach invariant, and the
transpose pair window_views / add_window_views."""
import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from jax import numpy as jnp

from functional_cnn.functional._windows import (Taps, adaptive_taps, add_window_views, gather_taps,
                                                make_axis, pad_spatial, scatter_taps,
                                                transposed_axis, unpad_spatial, window_views)

axis_args = st.tuples(st.integers(1, 12), st.integers(1, 4), st.integers(1, 4),
                      st.integers(1, 3), st.integers(0, 2), st.booleans())


@given(args=axis_args)
def test_output_size_matches_torch_pooling(args, torch):
    """Windows wider than the padded input included: none fits (torch raises, the size is 0),
    or in ceil mode the first does, read past the end."""
    size, kernel, stride, dilation, pad, ceil = args
    assume(pad <= kernel // 2)
    a = make_axis(size, kernel, stride, dilation, pad, pad, ceil)
    x = torch.zeros(1, 1, size, 1)
    try:
        out = torch.nn.functional.max_pool2d(x, (kernel, 1), (stride, 1), (pad, 0),
                                             (dilation, 1), ceil_mode=ceil).shape[2]
    except RuntimeError:  # "Output size is too small"
        out = 0
    assert a.out_size == out
    if out:  # invariant: the padded length is exactly the windows' reach
        assert a.padded_size == (a.out_size - 1) * stride + dilation * (kernel - 1) + 1


@given(args=axis_args, seed=st.integers(0, 2**16))
def test_window_views_and_add_window_views_are_transposes(args, seed):
    size, kernel, stride, dilation, pad, ceil = args
    a = make_axis(size, kernel, stride, dilation, pad, pad, ceil)
    assume(a.out_size >= 1)
    b = make_axis(5, 2, 1, 1, 0, 0)
    axes = (a, b)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, size, 5)))
    cts = [jnp.asarray(rng.standard_normal((2, a.out_size, b.out_size)))
           for _ in range(kernel * b.kernel)]
    views = window_views(pad_spatial(x, axes, 0), axes)
    lhs = sum(float(jnp.vdot(v, c)) for v, c in zip(views, cts))
    rhs = float(jnp.vdot(x, unpad_spatial(add_window_views(cts, axes), axes)))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_floor_mode_crops_rows_no_window_reaches():
    a = make_axis(8, 3, 3, 1, 0, 0, False)  # windows at 0, 3: rows 6 and 7 unused
    assert (a.out_size, a.pad_hi) == (2, -2)
    c = make_axis(8, 3, 3, 1, 0, 0, True)  # ceil mode keeps a third window reaching row 8
    assert (c.out_size, c.pad_hi) == (3, 1)


@given(kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       out=st.tuples(st.integers(1, 4), st.integers(1, 4)), pad=st.booleans(),
       crop=st.tuples(st.integers(0, 2), st.integers(0, 2)), seed=st.integers(0, 2**16))
def test_tiling_windows_interleave_is_the_transpose_too(kernel, out, pad, crop, seed):
    # stride == kernel: add_window_views takes its interleave case; ceil-mode overhang and
    # floor-mode cropping both appear through the input size
    sizes = [o * k - c if c < k else o * k for o, k, c in zip(out, kernel, crop)]
    pads = [min(int(pad), k // 2) for k in kernel]
    axes = tuple(make_axis(n, k, k, 1, p, p, True) for n, k, p in zip(sizes, kernel, pads))
    assume(all(a.out_size >= 1 for a in axes))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, 3, *sizes)))
    views = window_views(pad_spatial(x, axes, 0), axes)
    cts = [jnp.asarray(rng.standard_normal(v.shape)) for v in views]
    lhs = sum(float(jnp.vdot(v, c)) for v, c in zip(views, cts))
    rhs = float(jnp.vdot(x, unpad_spatial(add_window_views(cts, axes), axes)))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5)


@given(size=st.integers(1, 6), kernel=st.integers(1, 4), stride=st.integers(1, 3),
       dilation=st.integers(1, 3), padding=st.integers(0, 3), output_padding=st.integers(0, 2))
def test_transposed_axis_matches_torch_and_keeps_the_reach_invariant(
        size, kernel, stride, dilation, padding, output_padding, torch):
    assume(output_padding < max(stride, dilation))
    a = transposed_axis(size, kernel, stride, dilation, padding, output_padding)
    assume(a.in_size >= 1)
    y = torch.nn.functional.conv_transpose2d(torch.zeros(1, 1, size, 1),
                                             torch.zeros(1, 1, kernel, 1), None, (stride, 1),
                                             (padding, 0), (output_padding, 0), 1, (dilation, 1))
    assert a.in_size == y.shape[2] and a.out_size == size
    assert a.padded_size == (a.out_size - 1) * stride + dilation * (kernel - 1) + 1


@given(in_size=st.integers(1, 12), out_size=st.integers(1, 12))
def test_adaptive_taps_are_torch_windows_in_scan_order(in_size, out_size):
    taps = adaptive_taps(in_size, out_size)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -(-(i + 1) * in_size // out_size)
        assert list(taps.index[taps.present[:, i], i]) == list(range(start, end))
        assert (taps.index[~taps.present[:, i], i] == end - 1).all()  # padded by the last


@given(in_size=st.integers(1, 8), out_size=st.integers(1, 8), weighted=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gather_and_scatter_taps_are_transposes_and_match_the_matrix(in_size, out_size,
                                                                    weighted, seed):
    rng = np.random.default_rng(seed)
    taps = adaptive_taps(in_size, out_size)
    if weighted:
        taps = Taps(taps.index, rng.standard_normal(taps.index.shape), taps.present)
    x = rng.standard_normal((2, in_size, 3))
    g = rng.standard_normal((2, out_size, 3))
    y = gather_taps(jnp.asarray(x), taps, 1)
    np.testing.assert_allclose(y, np.einsum("oi,nic->noc", taps.matrix(in_size, np.float64), x),
                               rtol=1e-5, atol=1e-5)
    dx = scatter_taps(jnp.asarray(g), taps, 1, in_size)
    np.testing.assert_allclose(float(jnp.vdot(y, g)), float(jnp.vdot(x, dx)), rtol=1e-4,
                               atol=1e-4)
