"""conv2d specifics: every formulation is exercised by the shared edge cases, and the fast
paths agree with XLA's own convolution at the networks' real shapes."""
import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn.functional as F
from functional_cnn.audit import cases as C
from functional_cnn.functional import conv


def _path_of(config):
    case = C.build("conv2d", config)
    x, w = case.inputs["x"], case.inputs["weight"]
    cfg = conv.conv_config("test", x.shape, w.shape, config["stride"], config["padding"],
                           config["dilation"], config["groups"])
    return conv._path(cfg, x.shape, w.shape)


def test_edge_cases_run_every_conv_formulation():
    # the hypothesis and torch tests walk these cases: each formulation must be among them
    assert {_path_of(c) for c in C.edge_cases("conv2d")} == {"im2col", "banded", "lax"}


@pytest.mark.parametrize("shape, weight, stride, padding, path", [
    ((8, 10, 12, 12), (20, 10, 5, 5), 1, 0, "banded"),   # LeNet's second conv
    ((8, 1, 28, 28), (10, 1, 5, 5), 1, 0, "banded"),     # LeNet's first conv
    ((8, 1, 28, 28), (32, 1, 3, 3), 2, 1, "im2col"),     # article 001's first conv
    ((8, 32, 6, 6), (64, 32, 3, 3), 2, 1, "lax"),        # article 001's second conv
])
def test_network_shapes_match_xla_convolution(shape, weight, stride, padding, path):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, shape), jax.random.normal(kw, weight)
    cfg = conv.conv_config("test", shape, weight, stride, padding, 1, 1)
    assert conv._path(cfg, shape, weight) == path

    def xla(x, w):  # XLA's convolution in PyTorch's layout, differentiated by JAX
        return jax.lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2)

    y, vjp = jax.vjp(lambda x, w: F.conv2d(x, w, None, stride, padding), x, w)
    y_ref, vjp_ref = jax.vjp(xla, x, w)
    g = jax.random.normal(kg, y.shape)
    for got, want in zip((y, *vjp(g)), (y_ref, *vjp_ref(g))):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=2e-6)
