"""conv2d specifics: every formulation is exercised by the shared edge cases, and the fast
paths agree with XLA's own convolution at the networks' real shapes; conv_transpose2d is
conv2d's adjoint, and refuses what PyTorch refuses."""
import functools

import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn.functional as F
from functional_cnn.audit import cases as C
from functional_cnn.functional import conv
from functional_cnn.verify import leaf_errors
from tests.conftest import assert_close, float64


def _path_of(config):
    case = C.build("conv2d", config)
    x, w = case.inputs["x"], case.inputs["weight"]
    cfg = conv.conv_config("test", x.shape, w.shape, config["stride"], config["padding"],
                           config["dilation"], config["groups"])
    return conv._path(cfg, x.shape, w.shape)


def _transpose_rule_path_of(config):
    """The formulation of the conv2d forward that conv_transpose2d's rule runs for dx."""
    case = C.build("conv_transpose2d", config)
    x, w = case.inputs["x"], case.inputs["weight"]
    cfg = conv.conv_transpose_config("test", x.shape, w.shape, config["stride"],
                                     config["padding"], config["output_padding"],
                                     config["groups"], config["dilation"])
    g_shape = (x.shape[0], w.shape[1] * config["groups"]) + tuple(a.in_size for a in cfg.axes)
    return conv._path(cfg, g_shape, w.shape)


@pytest.mark.parametrize("op,path_of", [("conv2d", _path_of),
                                        ("conv_transpose2d", _transpose_rule_path_of)])
def test_edge_cases_run_every_conv_formulation(op, path_of):
    # the hypothesis and torch tests walk these cases: each formulation must be among them
    assert {path_of(c) for c in C.edge_cases(op)} == {"im2col", "banded", "im2col_nhwc", "lax"}


@pytest.mark.parametrize("shape, weight, stride, padding, path, formulation", [
    ((8, 10, 12, 12), (20, 10, 5, 5), 1, 0, "banded", None),   # LeNet's second conv
    ((8, 1, 28, 28), (10, 1, 5, 5), 1, 0, "banded", None),     # LeNet's first conv
    ((8, 1, 28, 28), (32, 1, 3, 3), 2, 1, "im2col", None),     # article 001's first conv
    ((8, 32, 6, 6), (64, 32, 3, 3), 2, 1, "im2col_nhwc", None),  # article 001's second conv
    ((8, 32, 6, 6), (64, 32, 3, 3), 2, 1, "im2col_nhwc", "lax"),  # ... as XLA's, on request
    ((8, 32, 14, 14), (64, 32, 3, 3), 2, 1, "lax", "im2col_nhwc"),  # 7x7 pixels, on request
    ((8, 16, 12, 12), (32, 16, 5, 5), 1, 0, "banded", None),   # torch's race network's second
    ((8, 1, 28, 28), (8, 1, 5, 5), 1, 0, "banded", "taps"),    # our race network's first
    ((8, 1, 28, 28), (32, 1, 3, 3), 2, 1, "im2col", "taps"),   # article 001's first, on request
])
def test_network_shapes_match_xla_convolution(shape, weight, stride, padding, path,
                                              formulation):
    """Both gradient paths where a formulation is asked for: its forward is differentiated
    by JAX too (the gates' choices are walked by the audit)."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, shape), jax.random.normal(kw, weight)
    cfg = conv.conv_config("test", shape, weight, stride, padding, 1, 1)
    assert conv._path(cfg, shape, weight) == path

    def xla(x, w):  # XLA's convolution in PyTorch's layout, differentiated by JAX
        return jax.lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2)

    @functools.partial(jax.jit, static_argnums=0)
    def output_and_grads(fn, x, w, g):  # one compiled program per formulation, not op by op
        y, vjp = jax.vjp(fn, x, w)
        return (y, *vjp(g))

    g = jax.random.normal(kg, F.conv2d(x, w, None, stride, padding).shape)
    with float64():
        exact = output_and_grads(xla, *(a.astype(jnp.float64) for a in (x, w, g)))
    xla_errors = leaf_errors(output_and_grads(xla, x, w, g), exact)
    for vjp in ("custom", "autodiff") if formulation else ("custom",):
        ours = output_and_grads(lambda x, w: F.conv2d(x, w, None, stride, padding, vjp=vjp,
                                                      formulation=formulation), x, w, g)
        # as exact as XLA's own within a factor 2, or within 1e-6 of the scale: both sum in
        # other orders, XLA's with the CPU's kernels (on one AMD EPYC both were 1e-7 to 8e-7
        # of the scale from exact, ours at most 1.7x XLA's; compared with each other, a
        # bound of 2e-6 had been 0.6 used)
        for name, row, xla_row in zip(("y", "dx", "dW"), leaf_errors(ours, exact), xla_errors):
            assert row.abs <= max(2 * xla_row.abs, 1e-6 * row.scale), (
                f"{name} ({vjp}): {row.abs:.3g} from exact, XLA's {xla_row.abs:.3g}")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_taps_rounds_once_in_half_precision(dtype):
    # its products are added in float32, like the matrix products of the other formulations
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, (4, 2, 12, 12), dtype), jax.random.normal(kw, (8, 2, 5, 5), dtype)
    want = F.conv2d(x.astype(jnp.float32), w.astype(jnp.float32), formulation="lax")
    errors = {f: float(jnp.max(jnp.abs(F.conv2d(x, w, formulation=f).astype(jnp.float32) - want)))
              for f in ("taps", "lax")}
    assert F.conv2d(x, w, formulation="taps").dtype == dtype
    assert errors["taps"] <= 1.5 * errors["lax"], errors


def test_taps_gradients_follow_the_mode():
    x, w = jnp.ones((2, 1, 12, 12)), jnp.ones((4, 1, 5, 5))

    def gradient_program():
        loss = lambda x, w: F.conv2d(x, w, formulation="taps").sum()  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w))

    with F.conv_formulation("lax"):
        text = gradient_program()
    assert "conv_general_dilated" in text and "dot_general" not in text
    with F.conv_formulation("gates"):
        assert "dot_general" in gradient_program()  # the band's products


@pytest.mark.parametrize("x_shape, w_shape, groups, formulation, message", [
    ((1, 16, 8, 8), (4, 16, 3, 3), 1, "taps", "at most 64 products"),  # 144 products
    ((1, 4, 8, 8), (4, 2, 3, 3), 2, "banded", "needs groups=1"),
    ((1, 1, 8, 8), (4, 1, 3, 3), 1, "fastest", "one of .*'taps'"),
    ((1, 1, 8, 8), (4, 1, 3, 3), 1, ["taps"], "one of"),  # not a name: no TypeError
])
def test_a_formulation_that_cannot_run_is_refused(x_shape, w_shape, groups, formulation,
                                                  message):
    with pytest.raises(ValueError, match=f"^conv2d: .*{message}"):
        F.conv2d(jnp.ones(x_shape), jnp.ones(w_shape), groups=groups, formulation=formulation)


@pytest.mark.parametrize("shape, weight, stride, padding, dilation, tiles, narrow", [
    ((4, 1, 28, 28), (8, 1, 5, 5), 1, 0, 1, (6, 4), False),   # the race network's first conv
    ((4, 8, 12, 12), (16, 8, 5, 5), 1, 0, 1, (2, 4), False),  # its second
    ((3, 2, 13, 17), (3, 2, 3, 3), 2, 1, 1, (9, 1), False),   # stride 2: tiles of one column
    ((3, 2, 13, 18), (3, 2, 3, 5), (1, 2), (2, 1), 1, (4, 2), False),  # tiles of 2, stride 2
    ((3, 2, 13, 16), (3, 2, 3, 3), 1, 1, (2, 1), (8, 2), False),  # dilated height, 8 tiles
    ((3, 3, 9, 23), (2, 3, 5, 5), 1, 2, 1, (1, 23), False),   # 23 columns: one tile, whole rows
    ((128, 1, 28, 28), (8, 1, 5, 5), 1, 0, 1, (6, 4), False),  # batch 128: tiles at any size
    ((4, 1, 28, 28), (10, 1, 5, 5), 1, 0, 1, (12, 2), True),  # LeNet's first, differentiated
    ((3, 1, 13, 26), (3, 1, 3, 7), 1, 1, 1, (11, 2), True),   # tiles of 2 from four pieces
    ((3, 1, 13, 18), (3, 1, 3, 5), (1, 2), (2, 1), 1, (4, 2), True),  # stride 2: as before
    ((3, 1, 9, 23), (2, 1, 5, 5), 1, 2, 1, (1, 23), True),    # no divisor: one tile
])
def test_banded_tiles_equal_xla_convolution(shape, weight, stride, padding, dilation, tiles,
                                            narrow):
    """The band's three parts, called directly, on tiled and whole rows (``narrow``: as
    differentiated, ``conv._differentiated``), against XLA."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, shape), jax.random.normal(kw, weight)
    cfg = conv.conv_config("test", shape, weight, stride, padding, dilation, 1)
    cfg = cfg._replace(narrow_tiles=narrow)
    assert conv._tiles(cfg)[:2] == tiles
    band = conv._FORMULATIONS["banded"]

    def xla(x, w):
        return jax.lax.conv_general_dilated(
            x, w, tuple(a.stride for a in cfg.axes), [(a.pad_lo, a.pad_hi) for a in cfg.axes],
            rhs_dilation=tuple(a.dilation for a in cfg.axes), precision="highest")

    y_ref, vjp_ref = jax.vjp(xla, x, w)
    g = jax.random.normal(kg, y_ref.shape)
    ours = jax.jit(lambda x, w, g: (band.forward(cfg, x, w), band.dx(cfg, w, g),
                                    band.dw(cfg, x, g)))(x, w, g)
    assert_close(ours, (y_ref, *vjp_ref(g)), 2e-6, 0.0, "y, dx, dW")


@pytest.mark.parametrize("stride, padding, output_padding, dilation, groups", [
    (1, 0, 0, 1, 1), (2, 1, 1, 1, 1), (3, 2, (2, 0), (1, 2), 2), (1, 1, 1, 2, 1)])
def test_conv_transpose_is_the_adjoint_of_conv(stride, padding, output_padding, dilation,
                                               groups):
    # <conv2d(z, W), x> == <z, conv_transpose2d(x, W)> for the z of the transposed output's
    # shape; with output_padding >= stride, conv2d(z) has windows past x's (reading only the
    # padded rows): the transposed convolution is the adjoint of the first H x W windows
    kx, kw, kz = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 4, 5, 4), jnp.float32)
    w = jax.random.normal(kw, (4, 6 // groups, 3, 2), jnp.float32)
    y = F.conv_transpose2d(x, w, None, stride, padding, output_padding, groups, dilation)
    z = jax.random.normal(kz, y.shape, jnp.float32)
    conv_z = F.conv2d(z, w, None, stride, padding, dilation, groups)[:, :, :5, :4]
    assert conv_z.shape == x.shape
    np.testing.assert_allclose(float(jnp.vdot(conv_z, x)), float(jnp.vdot(z, y)), rtol=1e-5)


def test_conv_transpose_unbatched_and_empty_batch():
    x = jax.random.normal(jax.random.key(0), (2, 3, 3))
    w = jnp.ones((2, 3, 2, 2))
    np.testing.assert_array_equal(F.conv_transpose2d(x, w, stride=2),
                                  F.conv_transpose2d(x[None], w, stride=2)[0])
    empty = jnp.zeros((0, 2, 3, 3))
    y, pullback = jax.vjp(lambda x, w: F.conv_transpose2d(x, w, stride=2, output_padding=1),
                          empty, w)
    dx, dw = pullback(jnp.ones_like(y))
    assert y.shape == (0, 3, 7, 7) and dx.shape == empty.shape  # (3 - 1) 2 + 2 + 1
    assert float(jnp.abs(dw).sum()) == 0.0  # no samples, no weight gradient (as torch)


@pytest.mark.parametrize("x_shape,w_shape,kwargs,error,message", [
    ((1, 2, 3, 3), (2, 3, 3, 3), dict(stride=2, output_padding=2), ValueError,
     r"conv_transpose2d: output_padding must be smaller than either stride or dilation "
     r"\(as in PyTorch\), got output_padding \(2, 2\) for stride \(2, 2\) and dilation \(1, 1\)"),
    ((1, 2, 3, 3), (2, 3, 3, 3), dict(output_padding=1), ValueError,
     r"output_padding must be smaller than either stride or dilation"),
    ((1, 2, 3, 3), (2, 3, 3, 3), dict(padding=3), ValueError,
     r"conv_transpose2d: the output would be -1x-1: padding \(3, 3\) crops more"),
    ((1, 2, 3, 3), (3, 3, 3, 3), {}, ValueError,
     r"conv_transpose2d: expected 3 channels at axis 1 \(weight \(3, 3, 3, 3\): C_in first\), "
     r"got 2"),
    ((1, 3, 3, 3), (3, 3, 3, 3), dict(groups=2), ValueError,
     r"conv_transpose2d: groups=2 must be a positive int dividing in_channels=3"),
    ((1, 2, 3, 3), (2, 3, 3), {}, ValueError, r"conv_transpose2d: expected a 4-D weight"),
    ((1, 2, 3, 3), (2, 3, 3, 3), dict(padding="same"), TypeError,
     r"conv_transpose2d: padding must be an int or a pair of ints, got 'same'"),
    ((1, 2, 3, 3), (2, 3, 3, 3), dict(bias=jnp.ones(2)), ValueError,
     r"conv_transpose2d: expected bias of shape \(3,\), got \(2,\)"),
    ((3, 3, 3), (2, 3, 3, 3), {}, ValueError,  # unbatched (C, H, W)
     r"conv_transpose2d: expected 2 channels at axis 1"),
])
def test_conv_transpose_bad_input(x_shape, w_shape, kwargs, error, message):
    with pytest.raises(error, match=message):
        F.conv_transpose2d(jnp.ones(x_shape), jnp.ones(w_shape), **kwargs)


@pytest.mark.parametrize("shape", [(2, 3, 4, 0), (2, 3, 0, 4)])
@pytest.mark.parametrize("op", ["conv2d", "conv_transpose2d"])
def test_an_empty_image_is_refused_as_torch_refuses_it(op, shape, torch):
    # an empty batch or no channels are fine (test_empty_batch.py); an image of no rows or no
    # columns is not, in PyTorch: with padding 2 the window would fit, and the output be made up
    weight = (3, 2, 3, 3) if op == "conv_transpose2d" else (2, 3, 3, 3)
    with pytest.raises(RuntimeError, match="Only zero batch or zero channel inputs"):
        getattr(torch.nn.functional, op)(torch.zeros(shape), torch.ones(weight), padding=2)
    with pytest.raises(ValueError, match=rf"{op}: expected non-empty spatial dimensions .* "
                                         rf"got input shape \({shape[0]}, 3, {shape[2]}, "
                                         rf"{shape[3]}\)"):
        getattr(F, op)(jnp.zeros(shape), jnp.ones(weight), padding=2)


def test_a_one_channel_band_runs_narrow_tiles_where_differentiated_only():
    """LeNet's first convolution: its forward and weight gradient under a gradient in tiles of
    2 (products of ``kh * span = 5 * 6 = 30`` terms), a forward alone in tiles of 4 (40), the
    weight gradient as XLA's."""
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x, w = jax.random.normal(kx, (3, 1, 28, 28)), jax.random.normal(kw, (10, 1, 5, 5))
    g = jax.random.normal(kg, (3, 10, 24, 24))

    def dots(jaxpr):  # every dot_general, inside nested programs too
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for sub in jax.tree.leaves(eqn.params, is_leaf=lambda v: hasattr(v, "eqns")):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from dots(inner)

    def contractions(fn) -> set:
        return {int(np.prod([eqn.invars[0].aval.shape[d] for d in
                             eqn.params["dimension_numbers"][0][0]]))
                for eqn in dots(jax.make_jaxpr(fn)(x, w).jaxpr)}

    def pullback(x, w):
        return jax.vjp(lambda w: F.conv2d(x, w), w)[1](g)

    forward = contractions(lambda x, w: F.conv2d(x, w))  # (and the band's 5 taps a row)
    assert 40 in forward and 30 not in forward
    # the differentiated forward's 30 terms; the weight gradient summed over 3 * 24 * 12
    # (image, row, tile) blocks, not 3 * 24 * 6 (the input gradient, unused, in the usual tiles)
    assert {30, 864} <= contractions(pullback) and 432 not in contractions(pullback)
    reference = jax.vjp(lambda w: jax.lax.conv(x, w, (1, 1), "VALID",
                                               precision="highest"), w)[1](g)
    assert_close(pullback(x, w), reference, 2e-6, 0.0, "dW")
