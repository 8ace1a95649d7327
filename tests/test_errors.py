"""Bad input raises ValueError/TypeError naming the layer or op, the expected and the actual
value, before XLA sees it."""
import jax
import pytest
from jax import numpy as jnp

import functional_cnn as fcn
import functional_cnn.functional as F

KEY = jax.random.key(0)


def applied(layer, init_shape, x, **kwargs):
    _, params, state = layer.init(KEY, init_shape)
    return layer.apply(params, state, x, **kwargs)


@pytest.mark.parametrize("layer,init_shape,x,error,message", [
    # wrong rank
    (fcn.Conv2d(4, 3), (1, 3, 8, 8), jnp.ones((3, 8, 8)), ValueError,
     r"Conv2d: expected a 4-D input \(N, C, H, W\), got shape \(3, 8, 8\)"),
    (fcn.MaxPool2d(2), (1, 3, 8, 8), jnp.ones((8, 8)), ValueError,
     r"MaxPool2d: expected a 4-D input .*got shape \(8, 8\)"),
    (fcn.BatchNorm2d(), (2, 3, 4, 4), jnp.ones((2, 3, 4)), ValueError,
     r"BatchNorm2d: expected a 4-D input .*got shape \(2, 3, 4\)"),
    # channels at apply differ from init
    (fcn.Conv2d(4, 3), (1, 3, 8, 8), jnp.ones((1, 2, 8, 8)), ValueError,
     r"Conv2d: expected 3 channels at axis 1 \(as at init\), got 2"),
    (fcn.BatchNorm2d(), (2, 3, 4, 4), jnp.ones((2, 5, 4, 4)), ValueError,
     r"BatchNorm2d: expected 3 channels at axis 1 \(as at init\), got 5"),
    (fcn.Linear(5), (2, 7), jnp.ones((2, 6)), ValueError,
     r"Linear: expected 7 input features on the last axis \(as at init\), got input shape \(2, 6\)"),
    # a window larger than the padded input
    (fcn.MaxPool2d(5), (1, 1, 8, 8), jnp.ones((1, 1, 3, 3)), ValueError,
     r"MaxPool2d: the window 5x5 .* larger than the padded input 3x3"),
    (fcn.Conv2d(2, 3, dilation=3), (1, 1, 8, 8), jnp.ones((1, 1, 6, 6)), ValueError,
     r"Conv2d: the window 7x7 .* larger than the padded input 6x6"),
    # non-floating input
    (fcn.Conv2d(4, 3), (1, 3, 8, 8), jnp.ones((1, 3, 8, 8), jnp.int32), TypeError,
     r"Conv2d: expected a floating-point input, got dtype int32"),
    (fcn.ReLU(), (2,), jnp.ones(2, jnp.int32), TypeError,
     r"relu: expected a floating-point input, got dtype int32"),
    (fcn.Dropout(0.5), (2, 3), jnp.ones((2, 3)), ValueError,
     r"Dropout: apply\(train=True\) needs a PRNG key"),
])
def test_layer_apply_errors(layer, init_shape, x, error, message):
    kwargs = {"train": True} if "Dropout" in message else {}
    with pytest.raises(error, match=message):
        applied(layer, init_shape, x, **kwargs)


@pytest.mark.parametrize("layer,shape,message", [
    (fcn.MaxPool2d(3, padding=2), (1, 1, 9, 9),
     r"MaxPool2d: padding must be at most half the kernel size .*got padding \(2, 2\) for kernel \(3, 3\)"),
    (fcn.AvgPool2d(2, padding=(0, 2)), (1, 1, 9, 9),
     r"AvgPool2d: padding must be at most half .*got padding \(0, 2\) for kernel \(2, 2\)"),
    (fcn.Conv2d(6, 3, groups=4), (1, 6, 9, 9),
     r"Conv2d: groups=4 must be a positive int dividing in_channels=6"),
    (fcn.Conv2d(6, 3, groups=4), (1, 8, 9, 9),
     r"Conv2d: groups=4 must divide both in_channels=8 and out_channels=6"),
    (fcn.Conv2d(6, 3, stride=2, padding="same"), (1, 1, 9, 9),
     r"Conv2d: padding='same' needs stride 1 .*got stride \(2, 2\)"),
    (fcn.Conv2d(6, 3, padding="full"), (1, 1, 9, 9),
     r"Conv2d: padding must be an int, a pair, 'same' or 'valid', got 'full'"),
    (fcn.AvgPool2d(4), (1, 1, 3, 9), r"AvgPool2d: the window 4x4 .* larger than the padded input 3x9"),
    (fcn.Flatten(2, 1), (1, 2, 3), r"Flatten: start_dim=2, end_dim=1 do not name a range"),
])
def test_layer_init_errors(layer, shape, message):
    with pytest.raises(ValueError, match=message):
        layer.init(KEY, shape)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"Conv2d: kernel_size must be >= 1, got 0"):
        fcn.Conv2d(4, 0)
    with pytest.raises(TypeError, match=r"Conv2d: kernel_size must be an int or a pair of ints, got 2.5"):
        fcn.Conv2d(4, 2.5)
    with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\], got 1.5"):
        fcn.Dropout(1.5)


def test_serial_prefixes_the_failing_layer_position():
    net = fcn.serial(fcn.Conv2d(4, 3), fcn.serial(fcn.ReLU(), fcn.MaxPool2d(9)))
    with pytest.raises(ValueError, match=r"^serial\[1\] > serial\[1\] > MaxPool2d: the window 9x9"):
        net.init(KEY, (1, 1, 10, 10))
    _, params, state = net.init(KEY, (1, 1, 12, 12))
    with pytest.raises(ValueError, match=r"^serial\[0\] > Conv2d: expected 1 channels"):
        net.apply(params, state, jnp.ones((1, 2, 12, 12)))


def test_labels_outside_the_classes_are_rejected_when_concrete():
    logits = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match=r"cross_entropy: labels must lie in \[0, 4\), got values in \[0, 4\]"):
        fcn.cross_entropy(logits, jnp.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 2\]"):
        fcn.cross_entropy(logits, jnp.array([-1, 2, 1]))
    with pytest.raises(TypeError, match=r"cross_entropy: expected integer class labels, got dtype float32"):
        fcn.cross_entropy(logits, jnp.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"cross_entropy: expected labels of shape \(3,\) .*got \(2,\)"):
        fcn.cross_entropy(logits, jnp.array([0, 1]))
    # under jit the values are unknown: no check, no error
    assert jnp.isfinite(jax.jit(fcn.cross_entropy)(logits, jnp.array([0, 1, 2])))


@pytest.mark.parametrize("call,error,message", [
    (lambda: F.conv2d(jnp.ones((1, 4, 5, 5)), jnp.ones((2, 3, 3, 3))), ValueError,
     r"conv2d: expected 3 channels at axis 1 \(weight \(2, 3, 3, 3\) with groups=1\), got 4"),
    (lambda: F.conv2d(jnp.ones((1, 4, 5, 5)), jnp.ones((2, 2, 3, 3)), jnp.ones(3), groups=2),
     ValueError, r"conv2d: expected bias of shape \(2,\), got \(3,\)"),
    (lambda: F.linear(jnp.ones((2, 3)), jnp.ones((4, 5))), ValueError,
     r"linear: expected input with last axis 5 \(weight \(4, 5\)\), got shape \(2, 3\)"),
    (lambda: F.batch_norm(jnp.ones((1, 2, 1, 1)), None, None, training=True), ValueError,
     r"batch_norm: training needs more than 1 value per channel, got input shape \(1, 2, 1, 1\)"),
    (lambda: F.batch_norm(jnp.ones((2, 2)), jnp.zeros(3), jnp.ones(2)), ValueError,
     r"batch_norm: expected running_mean of shape \(2,\), got \(3,\)"),
    (lambda: F.batch_norm(jnp.ones((2, 2)), None, None), ValueError,
     r"batch_norm: eval mode \(training=False\) needs running_mean and running_var"),
    (lambda: F.softmax(jnp.ones((2, 3)), dim=2), ValueError,
     r"softmax: dim must be in \[-2, 2\) for an input of shape \(2, 3\), got 2"),
    (lambda: F.max_pool2d(jnp.ones((1, 1, 4, 4)), 2, vjp="manual"), ValueError,
     r"max_pool2d: vjp must be one of \('custom', 'autodiff'\), got 'manual'"),
    (lambda: F.dropout(jnp.ones(3), 0.5), ValueError, r"dropout: training with p > 0 needs a PRNG key"),
    (lambda: fcn.mse_loss(jnp.ones(3), jnp.ones(4)), ValueError,
     r"mse_loss: expected target of the same shape as pred \(3,\), got \(4,\)"),
    (lambda: fcn.mse_loss(jnp.ones(3), jnp.ones(3), reduction="avg"), ValueError,
     r"mse_loss: reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"),
    (lambda: fcn.binary_cross_entropy_with_logits(jnp.ones(3), jnp.ones(3, jnp.int32)), TypeError,
     r"binary_cross_entropy_with_logits: expected a floating-point targets, got dtype int32"),
])
def test_functional_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("layer,init_shape,x,vjp,message", [
    (fcn.Linear(5), (2, 7), jnp.ones((2, 7), jnp.int32), "custom",
     r"^Linear: expected a floating-point input, got dtype int32"),
    (fcn.BatchNorm2d(), (2, 3, 4, 4), jnp.ones((2, 3, 4, 4)), "manual",
     r"^BatchNorm2d: vjp must be one of \('custom', 'autodiff'\), got 'manual'"),
    (fcn.AvgPool2d(2), (1, 1, 4, 4), jnp.ones((1, 1, 4, 4)), "manual",
     r"^AvgPool2d: vjp must be one of"),
])
def test_the_ops_checks_inside_a_layer_name_the_layer(layer, init_shape, x, vjp, message):
    """A layer leaves dtype, vjp and geometry to its op, which checks them once."""
    with pytest.raises((TypeError, ValueError), match=message):
        applied(layer, init_shape, x, vjp=vjp)
