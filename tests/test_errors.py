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
    # mixed dtypes, refused as torch refuses them (promoted, the result's dtype had depended on
    # the formulation that computed it)
    (lambda: F.conv2d(jnp.ones((1, 3, 6, 6)), jnp.ones((2, 3, 3, 3), jnp.bfloat16)), TypeError,
     r"conv2d: expected weight of the input's dtype float32, got bfloat16"),
    (lambda: F.conv2d(jnp.ones((1, 3, 6, 6)), jnp.ones((2, 3, 3, 3)), jnp.ones(2, jnp.bfloat16)),
     TypeError, r"conv2d: expected bias of the input's dtype float32, got bfloat16"),
    (lambda: F.conv_transpose2d(jnp.ones((1, 3, 6, 6)), jnp.ones((3, 2, 3, 3), jnp.float16)),
     TypeError, r"conv_transpose2d: expected weight of the input's dtype float32, got float16"),
    (lambda: F.linear(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((4, 3))), TypeError,
     r"linear: expected weight of the input's dtype bfloat16, got float32"),
])
def test_functional_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("layer,init_shape,x,vjp,message", [
    (fcn.Linear(5), (2, 7), jnp.ones((2, 7), jnp.int32), "custom",
     r"^Linear: expected a floating-point input, got dtype int32"),
    (fcn.Conv2d(4, 3), (1, 3, 8, 8), jnp.ones((1, 3, 8, 8), jnp.bfloat16), "custom",
     r"^Conv2d: expected weight of the input's dtype bfloat16, got float32"),
    (fcn.BatchNorm2d(), (2, 3, 4, 4), jnp.ones((2, 3, 4, 4)), "manual",
     r"^BatchNorm2d: vjp must be one of \('custom', 'autodiff'\), got 'manual'"),
    (fcn.AvgPool2d(2), (1, 1, 4, 4), jnp.ones((1, 1, 4, 4)), "manual",
     r"^AvgPool2d: vjp must be one of"),
])
def test_the_ops_checks_inside_a_layer_name_the_layer(layer, init_shape, x, vjp, message):
    """A layer leaves dtype, vjp and geometry to its op, which checks them once."""
    with pytest.raises((TypeError, ValueError), match=message):
        applied(layer, init_shape, x, vjp=vjp)


def _params_of(net, shape=(1, 1, 28, 28)):
    _, params, state = net.init(KEY, shape)
    return params, state


def test_another_networks_params_name_the_layer_and_the_mismatch():
    x = jnp.ones((2, 1, 28, 28))
    lenet = _params_of(fcn.models.lenet())
    with pytest.raises(ValueError, match=r"^serial: expected params as a tuple of 6 entries "
                                         r"\(one per layer\), got tuple of length 8"):
        fcn.models.mytorch_net().apply(*lenet, x)
    # same length, other layers: the first layer that does not fit says how
    net = fcn.serial(fcn.Conv2d(32, 3), fcn.ReLU(), fcn.Flatten(), fcn.Linear(10))
    other = _params_of(fcn.serial(fcn.Conv2d(10, 5), fcn.ReLU(), fcn.Flatten(), fcn.Linear(10)))
    with pytest.raises(ValueError, match=r"^serial\[0\] > Conv2d: expected params 'weight' of "
                                         r"shape \(32, \*, 3, 3\), got \(10, 1, 5, 5\)"):
        net.apply(*other, x)


@pytest.mark.parametrize("layer,shape,edit,message", [
    (fcn.Conv2d(4, 3), (1, 2, 5, 5), lambda p, s: ({"weight": p["weight"]}, s),
     r"Conv2d: expected params with keys \('weight', 'bias'\), got dict with keys \('weight',\)"),
    (fcn.Conv2d(4, 3, bias=False), (1, 2, 5, 5), lambda p, s: ({**p, "bias": jnp.ones(4)}, s),
     r"Conv2d: expected params with keys \('weight',\), got dict with keys \('weight', 'bias'\)"),
    (fcn.Conv2d(4, 3), (1, 2, 5, 5), lambda p, s: ({**p, "bias": jnp.ones(5)}, s),
     r"Conv2d: expected params 'bias' of shape \(4,\), got \(5,\)"),
    (fcn.Conv2d(4, 3), (1, 2, 5, 5), lambda p, s: ({**p, "weight": jnp.ones((4, 2, 3))}, s),
     r"Conv2d: expected params 'weight' of shape \(4, \*, 3, 3\), got \(4, 2, 3\)"),
    (fcn.Linear(3), (2, 5), lambda p, s: ({**p, "weight": jnp.ones((4, 5))}, s),
     r"Linear: expected params 'weight' of shape \(3, \*\), got \(4, 5\)"),
    (fcn.Linear(3), (2, 5), lambda p, s: ({**p, "bias": jnp.ones((1, 3))}, s),
     r"Linear: expected params 'bias' of shape \(3,\), got \(1, 3\)"),
    (fcn.Linear(3), (2, 5), lambda p, s: ((p["weight"], p["bias"]), s),
     r"Linear: expected params with keys \('weight', 'bias'\), got tuple of length 2"),
    (fcn.ReLU(), (2, 5), lambda p, s: ({"weight": jnp.ones(3)}, s),
     r"ReLU: expected empty params \{\}, got dict with keys \('weight',\)"),
    (fcn.MaxPool2d(2), (1, 2, 4, 4), lambda p, s: (p, None),
     r"MaxPool2d: expected empty state \{\}, got None"),
    (fcn.BatchNorm2d(), (2, 3, 4, 4), lambda p, s: (p, {"running_mean": s["running_mean"]}),
     r"BatchNorm2d: expected state with keys \('running_mean', 'running_var'\), "
     r"got dict with keys \('running_mean',\)"),
    (fcn.BatchNorm2d(), (2, 3, 4, 4), lambda p, s: (p, {**s, "running_var": jnp.ones(4)}),
     r"BatchNorm2d: expected state 'running_var' of shape \(3,\), got \(4,\)"),
    (fcn.BatchNorm2d(momentum=None), (2, 3, 4, 4),
     lambda p, s: (p, {**s, "num_batches_tracked": jnp.zeros(3)}),
     r"BatchNorm2d: expected state 'num_batches_tracked' of shape \(\), got \(3,\)"),
])
def test_layer_params_and_state_are_checked(layer, shape, edit, message):
    _, params, state = layer.init(KEY, shape)
    params, state = edit(params, state)
    with pytest.raises(ValueError, match=message):
        layer.apply(params, state, jnp.ones(shape), train=True)


@pytest.mark.parametrize("call,error,message", [
    (lambda: fcn.parallel(fcn.ReLU(), fcn.ReLU()).init(KEY, (-1, 3)), TypeError,
     r"^parallel: init expected a tuple of 2 input shapes \(one per input\), got \(-1, 3\)"),
    (lambda: fcn.models.lenet().init(None, (-1, 1, 28, 28)), TypeError,
     r"^serial\[0\] > Conv2d: expected a PRNG key \(jax.random.key\(seed\)\), got None"),
    (lambda: fcn.serial(fcn.ReLU(), fcn.Linear(2)).init(None, (-1, 3)), TypeError,
     r"^serial\[1\] > Linear: expected a PRNG key .*got None"),
    (lambda: fcn.models.mlp().init(0, (-1, 1, 28, 28)), TypeError,
     r"^serial: expected a PRNG key \(jax.random.key\(seed\)\) or None, got int 0"),
    (lambda: fcn.ReLU().init(None, -1), TypeError,
     r"^ReLU: init expected an input shape \(a tuple of ints, the batch may be -1\), got -1"),
    (lambda: fcn.serial(fcn.Flatten()).init(None, (2, "3")), TypeError,
     r"^serial\[0\] > Flatten: init expected an input shape .*got \(2, '3'\)"),
    (lambda: fcn.fan_in_sum().init(None, (2, 3)), TypeError,
     r"^fan_in_sum: init expected a tuple of input shapes \(one per input\), got \(2, 3\)"),
    (lambda: fcn.fan_in_concat(axis=2).init(None, ((2, 3), (2, 4))), ValueError,
     r"^fan_in_concat: expected inputs of one rank with an axis 2, got shapes \[\(2, 3\), \(2, 4\)\]"),
])
def test_init_arguments_are_checked(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("layer,inputs,error,message", [
    # (2, 3) + (1, 3) would broadcast: a silently wrong sum, not an error, before the check
    (fcn.fan_in_sum(), (jnp.ones((2, 3)), jnp.ones((1, 3))), ValueError,
     r"^fan_in_sum: expected inputs of one shape, got shapes \[\(2, 3\), \(1, 3\)\]"),
    (fcn.fan_in_sum(), (jnp.ones((2, 3)), jnp.ones((2, 4))), ValueError,
     r"^fan_in_sum: expected inputs of one shape, got shapes \[\(2, 3\), \(2, 4\)\]"),
    (fcn.fan_in_sum(), jnp.ones((2, 3)), TypeError,
     r"^fan_in_sum: expected a tuple of input arrays, got array of shape \(2, 3\) float32"),
    (fcn.fan_in_concat(), (jnp.ones((2, 3, 4)), jnp.ones((2, 3, 5))), ValueError,
     r"^fan_in_concat: inputs must agree on every axis but 1, got shapes "
     r"\[\(2, 3, 4\), \(2, 3, 5\)\]"),
    (fcn.fan_in_concat(), (jnp.ones((2, 3, 4)), jnp.ones((2, 3))), ValueError,
     r"^fan_in_concat: expected inputs of one rank with an axis 1"),
])
def test_fan_in_apply_checks_its_inputs(layer, inputs, error, message):
    with pytest.raises(error, match=message):
        layer.apply({}, {}, inputs)
