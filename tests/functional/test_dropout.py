"""Dropout specifics: dropout2d's channel mask, its rule, its input checks."""
import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn.functional as F

KEY = jax.random.key(0)


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
@pytest.mark.parametrize("shape", [(4, 6, 3, 5), (4, 6, 7)])
def test_dropout2d_masks_whole_channels_and_its_gradient_is_the_same_mask(shape, vjp):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    y, g = jax.value_and_grad(lambda x: (F.dropout2d(x, 0.5, key=KEY, vjp=vjp) ** 2).sum())(x)
    out = F.dropout2d(x, 0.5, key=KEY, vjp=vjp)
    kept = np.asarray(out != 0).reshape(shape[:2] + (-1,))
    assert np.all(kept.all(axis=-1) | ~kept.any(axis=-1))  # every channel all kept or all zero
    assert 0 < kept[..., 0].sum() < kept[..., 0].size
    channel_kept = kept.any(axis=-1).reshape(shape[:2] + (1,) * (len(shape) - 2))
    np.testing.assert_allclose(out, np.where(channel_kept, 2 * x, 0), rtol=1e-6)
    np.testing.assert_allclose(g, 2 * out * 2, rtol=1e-6)  # d/dx (2x m)^2 = 2 (2x m) 2 m


def test_dropout2d_is_the_identity_in_eval_and_zero_at_p_1():
    x = jnp.ones((2, 3, 4, 4))
    assert F.dropout2d(x, 0.5, training=False) is x
    np.testing.assert_array_equal(F.dropout2d(x, 1.0, key=KEY), 0)


@pytest.mark.parametrize("call,error,message", [
    (lambda: F.dropout2d(jnp.ones((2, 3)), key=KEY), ValueError,
     r"dropout2d: expected a 3-D or 4-D input \(N, C, L\) or \(N, C, H, W\), got shape \(2, 3\)"),
    (lambda: F.dropout2d(jnp.ones((2, 3, 4))), ValueError,
     r"dropout2d: training with p > 0 needs a PRNG key"),
    (lambda: F.dropout2d(jnp.ones((2, 3, 4)), 1.5, key=KEY), ValueError,
     r"dropout2d: p must be in \[0, 1\], got 1.5"),
    (lambda: F.dropout2d(jnp.ones((2, 3, 4), jnp.int32), key=KEY), TypeError,
     r"dropout2d: expected a floating-point input"),
])
def test_dropout2d_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()
