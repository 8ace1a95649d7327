"""Normalization specifics: the shared rule's invariants, one value per group, batch 0, identities
between the ops, second order against torch, and bad input."""
import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn.functional as F
from tests.conftest import assert_close, float64

VJPS = ["custom", "autodiff"]


def _normal(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


@pytest.mark.parametrize("vjp", VJPS)
def test_layer_norm_input_gradient_is_orthogonal_to_shifts_and_to_xhat(vjp):
    # dx = (M gx - sum gx - xhat sum(gx xhat)) / (M sigma): per sample, sum(dx) = 0 and
    # sum(dx xhat) = 0 for any cotangent, whatever the weight.
    x, w, g = _normal((3, 4, 5), 0, 3.0) + 2, _normal((4, 5), 1), _normal((3, 4, 5), 2)
    dx = jax.grad(lambda x: (F.layer_norm(x, (4, 5), w, vjp=vjp) * g).sum())(x)
    xhat = F.layer_norm(x, (4, 5))
    np.testing.assert_allclose(dx.sum(axis=(1, 2)), 0, atol=2e-5)
    np.testing.assert_allclose((dx * xhat).sum(axis=(1, 2)), 0, atol=2e-5)
    assert float(jnp.max(jnp.abs(dx))) > 0.1


@pytest.mark.parametrize("vjp", VJPS)
def test_group_norm_with_one_group_is_layer_norm_over_channels_and_space(vjp):
    x = _normal((2, 6, 3, 4), 0, 2.0)
    ones = jnp.ones(6)
    a = F.group_norm(x, 1, ones, jnp.zeros(6), vjp=vjp)
    b = F.layer_norm(x, (6, 3, 4), vjp=vjp)
    assert_close(a, b, 1e-6, 1e-6)
    g = _normal((2, 6, 3, 4), 1)
    da = jax.grad(lambda x: (F.group_norm(x, 1, vjp=vjp) * g).sum())(x)
    db = jax.grad(lambda x: (F.layer_norm(x, (6, 3, 4), vjp=vjp) * g).sum())(x)
    assert_close(da, db, 1e-5, 1e-6)


@pytest.mark.parametrize("vjp", VJPS)
def test_one_value_per_group_gives_exactly_the_bias(vjp, torch):
    # var = 0, x - mean = 0: y = bias exactly and dx = 0. torch's float32 kernel is off by ~1e-5
    # here (it folds the statistics into x * scale + shift), so compare with its float64.
    x, w, b = _normal((2, 6), 0, 2.0) + 1.5, _normal((6,), 1), _normal((6,), 2)
    y, dx = jax.value_and_grad(lambda x: F.group_norm(x, 6, w, b, vjp=vjp).sum())(x)
    expected = torch.nn.functional.group_norm(torch.tensor(np.asarray(x, np.float64)), 6,
                                              torch.tensor(np.asarray(w, np.float64)),
                                              torch.tensor(np.asarray(b, np.float64)))
    np.testing.assert_array_equal(F.group_norm(x, 6, w, b, vjp=vjp), jnp.broadcast_to(b, (2, 6)))
    np.testing.assert_allclose(expected.numpy(), np.broadcast_to(b, (2, 6)), atol=1e-12)
    np.testing.assert_array_equal(dx, 0)


@pytest.mark.parametrize("vjp", VJPS)
@pytest.mark.parametrize("op,args,shape", [
    ("layer_norm", ((4,),), (0, 4)), ("group_norm", (2,), (0, 4, 3)),
    ("group_norm", (2,), (0, 4))])
def test_batch_zero_like_torch(op, args, shape, vjp, torch):
    channels = shape[-1] if op == "layer_norm" else shape[1]
    w, b = _normal((channels,), 1), _normal((channels,), 2)
    x = jnp.zeros(shape)
    fn = getattr(F, op)
    y, grads = jax.value_and_grad(lambda x, w, b: fn(x, *args, w, b, vjp=vjp).sum(),
                                  argnums=(0, 1, 2))(x, w, b)
    xt = torch.zeros(shape, requires_grad=True)
    wt, bt = (torch.tensor(np.asarray(v), requires_grad=True) for v in (w, b))
    getattr(torch.nn.functional, op)(xt, *args, wt, bt).sum().backward()
    assert float(y) == 0 and grads[0].shape == shape
    np.testing.assert_array_equal(grads[1], wt.grad.numpy())  # zeros: nothing to sum
    np.testing.assert_array_equal(grads[2], bt.grad.numpy())


@pytest.mark.parametrize("op", ["layer_norm", "group_norm"])
def test_hessian_vector_product_of_weight_and_input_matches_torch(op, torch):
    # The rule's own derivative: cross terms between weight and x, in float64.
    with float64():
        rng = np.random.default_rng(0)
        params = 4 if op == "group_norm" else 3  # per channel, or per element of the last axis
        arg = 2 if op == "group_norm" else (3,)
        x = rng.standard_normal((2, 4, 3)) * 2
        w, b, vw = (rng.standard_normal(params) for _ in range(3))
        ct, vx = (rng.standard_normal(x.shape) for _ in range(2))

        def hvp(vjp):
            def inner(x, w):
                fn = getattr(F, op)
                gx, gw = jax.grad(lambda x, w: (fn(x, arg, w, b, vjp=vjp) * ct).sum(),
                                  (0, 1))(x, w)
                return (gx * vx).sum() + (gw * vw).sum()
            return jax.grad(inner, (0, 1))(jnp.asarray(x), jnp.asarray(w))

        xt, wt = (torch.tensor(v, requires_grad=True) for v in (x, w))
        y = getattr(torch.nn.functional, op)(xt, arg, wt, torch.tensor(b))
        gx, gw = torch.autograd.grad((y * torch.tensor(ct)).sum(), (xt, wt), create_graph=True)
        inner = (gx * torch.tensor(vx)).sum() + (gw * torch.tensor(vw)).sum()
        expected = torch.autograd.grad(inner, (xt, wt))
        custom = hvp("custom")
        assert_close(custom, hvp("autodiff"), 1e-10, 1e-12, "custom vs autodiff")
        assert_close(custom, [e.numpy() for e in expected], 1e-9, 1e-12, "custom vs torch")


@pytest.mark.parametrize("call,message", [
    (lambda: F.layer_norm(jnp.ones((2, 3, 4)), (3, 5)),
     r"layer_norm: expected an input whose last 2 axes are normalized_shape \(3, 5\), "
     r"got shape \(2, 3, 4\)"),
    (lambda: F.layer_norm(jnp.ones((4,)), (3, 4)),
     r"layer_norm: expected an input of shape \(\.\.\., 3, 4\), got shape \(4,\)"),
    (lambda: F.layer_norm(jnp.ones((2, 4)), 4, jnp.ones(5)),
     r"layer_norm: expected weight of shape \(4,\), got \(5,\)"),
    (lambda: F.layer_norm(jnp.ones((2, 4)), ()),
     r"layer_norm: normalized_shape must be a positive int or a non-empty sequence"),
    (lambda: F.layer_norm(jnp.ones((2, 4)), 2.5), r"layer_norm: normalized_shape must be"),
    (lambda: F.group_norm(jnp.ones((2, 6, 3)), 4),
     r"group_norm: num_groups=4 must be a positive int dividing the 6 channels"),
    (lambda: F.group_norm(jnp.ones((2, 6, 3)), 0), r"group_norm: num_groups=0 must be"),
    (lambda: F.group_norm(jnp.ones((6,)), 3),
     r"group_norm: expected an input of shape \(N, C, \.\.\.\), got shape \(6,\)"),
    (lambda: F.group_norm(jnp.ones((2, 6)), 3, None, jnp.ones(3)),
     r"group_norm: expected bias of shape \(6,\), got \(3,\)"),
    (lambda: F.group_norm(jnp.ones((1, 4, 1, 1)), 4),  # torch: N (C / G) H W == 1 raises
     r"group_norm: expected more than 1 value per group and batch .* num_groups=4 for input "
     r"shape \(1, 4, 1, 1\)"),
    (lambda: F.batch_norm(jnp.ones((2, 3)), jnp.zeros(3), jnp.ones(3), training=True,
                          momentum=None),
     r"batch_norm: expected momentum a number .* got None; BatchNorm2d\(momentum=None\)"),
])
def test_bad_input_raises_before_xla(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match=r"layer_norm: expected a floating-point input"):
        F.layer_norm(jnp.ones((2, 3), jnp.int32), 3)
    with pytest.raises(TypeError, match=r"group_norm: expected a floating-point input"):
        F.group_norm(jnp.ones((2, 4), jnp.int32), 2)


@pytest.mark.parametrize("dtype, half_ulp", [("bfloat16", 2 ** -8), ("float16", 2 ** -11)])
def test_low_precision_statistics_are_float32_sums_rounded_once(dtype, half_ulp, torch):
    """Centered and summed in the input's dtype, a bfloat16 layer around 30 came out 5-20x
    further from the exact values than torch's, which sums in float32. Now each output is
    the exact value of the rounded inputs rounded once (within half a unit in its last
    place), never further from it than torch's (whose bfloat16 batch_norm rounds its mean
    first), and both gradient paths agree to a few units."""
    xt = torch.tensor(np.random.default_rng(0).standard_normal((4, 3, 8, 8)) * 0.5 + 30)
    xt = xt.to(getattr(torch, dtype))
    x = jnp.asarray(xt.float().numpy()).astype(dtype)
    tf = torch.nn.functional
    ops = {"layer_norm": (lambda x, vjp: F.layer_norm(x, (3, 8, 8), vjp=vjp),
                          lambda t: tf.layer_norm(t, (3, 8, 8))),
           "group_norm": (lambda x, vjp: F.group_norm(x, 3, vjp=vjp),
                          lambda t: tf.group_norm(t, 3)),
           "batch_norm": (lambda x, vjp: F.batch_norm(x, training=True, vjp=vjp)[0],
                          lambda t: tf.batch_norm(t, None, None, training=True))}
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), dtype)
    for name, (ours, theirs) in ops.items():
        y = ours(x, "custom")
        exact = theirs(xt.double()).numpy()
        error = np.abs(np.asarray(y, np.float64) - exact)
        assert y.dtype == x.dtype and (error <= half_ulp * np.abs(exact) + 1e-6).all(), name
        # never further from exact than torch, but for a value within float32 rounding of a
        # half-precision midpoint, which either side may round either way (the two maxima
        # tie at one element here: the float16 group_norm's is 2e-6 from a midpoint)
        torch_error = np.abs(theirs(xt).double().numpy() - exact).max()
        assert error.max() <= torch_error + 4e-7 * np.abs(exact).max(), name
        grads = [np.asarray(jax.grad(lambda x: (ours(x, vjp).astype(jnp.float32)
                                                * weights).sum())(x), np.float32)
                 for vjp in VJPS]
        np.testing.assert_allclose(grads[0], grads[1], rtol=0, atol=half_ulp * 128,
                                   err_msg=name)


@pytest.mark.parametrize("vjp", VJPS)
def test_a_low_precision_batch_norm_keeps_its_dtype_in_training_eval_and_an_empty_batch(vjp):
    """bfloat16 activations with the layer's float32 parameters and running statistics: the
    output in the input's dtype on every path (as torch), the gradients in their inputs'."""
    x = _normal((4, 3, 5, 5)).astype(jnp.bfloat16)
    w, b, mean, var = _normal((3,), 1), _normal((3,), 2), _normal((3,), 3), jnp.ones(3)
    for training, batch in ((True, x), (False, x), (True, x[:0])):
        def f(x, w, b, mean, var):
            return F.batch_norm(x, mean, var, w, b, training=training, vjp=vjp)[0]
        y = f(batch, w, b, mean, var)
        assert y.dtype == jnp.bfloat16, (training, batch.shape)
        if batch.shape[0]:
            grads = jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(),
                             argnums=(0, 1, 2) if training else (0, 1, 2, 3, 4))(
                batch, w, b, mean, var)
            assert [g.dtype for g in grads] == [jnp.bfloat16] + [jnp.float32] * (len(grads) - 1)
