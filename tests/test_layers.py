"""Layers against torch.nn modules with the same weights: shapes, outputs, gradients, state;
names."""
import inspect


"""Layers against torch.nn modules with the same weights: shapes, outputs, gradients, state."""
import math

import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn as fcn
from tests.conftest import assert_close


# (our layer, torch module factory given input channels, input shape)
LAYERS = {
    "linear": (lambda: fcn.Linear(7), lambda t, c: t.nn.Linear(c, 7), (3, 5)),
    "linear_3d": (lambda: fcn.Linear(4, bias=False), lambda t, c: t.nn.Linear(c, 4, bias=False),
                  (2, 3, 6)),
    "conv": (lambda: fcn.Conv2d(6, 3, stride=2, padding=1),
             lambda t, c: t.nn.Conv2d(c, 6, 3, stride=2, padding=1), (2, 4, 9, 8)),
    "conv_single_channel": (lambda: fcn.Conv2d(32, 3, stride=2, padding=1),  # im2col path
                            lambda t, c: t.nn.Conv2d(c, 32, 3, stride=2, padding=1),
                            (2, 1, 28, 28)),
    "conv_groups_same": (lambda: fcn.Conv2d(4, (3, 2), padding="same", dilation=2, groups=2),
                         lambda t, c: t.nn.Conv2d(c, 4, (3, 2), padding="same", dilation=2,
                                                  groups=2), (1, 4, 7, 6)),
    "maxpool": (lambda: fcn.MaxPool2d(3, 2, 1, ceil_mode=True),
                lambda t, c: t.nn.MaxPool2d(3, 2, 1, ceil_mode=True), (2, 3, 8, 7)),
    "avgpool": (lambda: fcn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
                lambda t, c: t.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
                (2, 3, 8, 7)),
    "conv_transpose": (lambda: fcn.ConvTranspose2d(4, 3, stride=2, padding=1, output_padding=1),
                       lambda t, c: t.nn.ConvTranspose2d(c, 4, 3, stride=2, padding=1,
                                                         output_padding=1), (2, 2, 5, 4)),
    "conv_transpose_groups": (
        lambda: fcn.ConvTranspose2d(6, (3, 2), (2, 1), 0, (0, 1), groups=2, bias=False,
                                    dilation=2),
        lambda t, c: t.nn.ConvTranspose2d(c, 6, (3, 2), (2, 1), 0, (0, 1), groups=2, bias=False,
                                          dilation=2), (1, 4, 3, 3)),
    "adaptive_avg": (lambda: fcn.AdaptiveAvgPool2d((3, None)),
                     lambda t, c: t.nn.AdaptiveAvgPool2d((3, None)), (2, 3, 7, 5)),
    "adaptive_max": (lambda: fcn.AdaptiveMaxPool2d(4), lambda t, c: t.nn.AdaptiveMaxPool2d(4),
                     (2, 3, 7, 9)),
    "upsample_bilinear": (lambda: fcn.Upsample(scale_factor=1.5, mode="bilinear"),
                          lambda t, c: t.nn.Upsample(scale_factor=1.5, mode="bilinear"),
                          (2, 3, 5, 4)),
    "upsample_nearest": (lambda: fcn.Upsample(size=(7, 3)), lambda t, c: t.nn.Upsample((7, 3)),
                         (2, 3, 5, 4)),
    "flatten": (lambda: fcn.Flatten(), lambda t, c: t.nn.Flatten(), (2, 3, 4, 5)),
    "flatten_range": (lambda: fcn.Flatten(0, 2), lambda t, c: t.nn.Flatten(0, 2), (2, 3, 4, 5)),
    "leaky": (lambda: fcn.LeakyReLU(0.2), lambda t, c: t.nn.LeakyReLU(0.2), (2, 5)),
    "softmax": (lambda: fcn.Softmax(1), lambda t, c: t.nn.Softmax(1), (2, 5, 3)),
    "logsoftmax": (lambda: fcn.LogSoftmax(), lambda t, c: t.nn.LogSoftmax(-1), (2, 5)),
    "tanh": (lambda: fcn.Tanh(), lambda t, c: t.nn.Tanh(), (2, 5)),
    "sigmoid": (lambda: fcn.Sigmoid(), lambda t, c: t.nn.Sigmoid(), (2, 5)),
    "identity": (lambda: fcn.Identity(), lambda t, c: t.nn.Identity(), (2, 5)),
}
LAYERS.update({
    "gelu": (lambda: fcn.GELU(), lambda t, c: t.nn.GELU(), (2, 5)),
    "gelu_tanh": (lambda: fcn.GELU("tanh"), lambda t, c: t.nn.GELU("tanh"), (2, 5)),
    "silu": (lambda: fcn.SiLU(), lambda t, c: t.nn.SiLU(), (2, 5)),
    "elu": (lambda: fcn.ELU(0.5), lambda t, c: t.nn.ELU(0.5), (2, 5)),
    "softplus": (lambda: fcn.Softplus(2.0, 1.0), lambda t, c: t.nn.Softplus(2.0, 1.0), (2, 5)),
    "hardtanh": (lambda: fcn.Hardtanh(-0.5, 0.8), lambda t, c: t.nn.Hardtanh(-0.5, 0.8),
                 (2, 5)),
    "layernorm": (lambda: fcn.LayerNorm((4, 5)), lambda t, c: t.nn.LayerNorm((4, 5)),
                  (2, 3, 4, 5)),
    "layernorm_no_bias": (lambda: fcn.LayerNorm(5, bias=False),
                          lambda t, c: t.nn.LayerNorm(5, bias=False), (2, 3, 5)),
    "layernorm_no_affine": (lambda: fcn.LayerNorm(5, elementwise_affine=False),
                            lambda t, c: t.nn.LayerNorm(5, elementwise_affine=False), (2, 3, 5)),
    "groupnorm": (lambda: fcn.GroupNorm(2), lambda t, c: t.nn.GroupNorm(2, c), (2, 6, 3, 4)),
    "groupnorm_no_affine": (lambda: fcn.GroupNorm(3, affine=False),
                            lambda t, c: t.nn.GroupNorm(3, c, affine=False), (2, 6, 3, 4)),
})


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_matches_torch_module(name, torch):
    check_against_torch_module(name, LAYERS[name][2], "custom", torch)


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_on_an_empty_batch_matches_torch(name, vjp, torch):
    # torch returns an empty output and zero parameter gradients (the im2col convolution
    # raised ZeroDivisionError here, and so did max pooling's scatter rule)
    shape = LAYERS[name][2]
    check_against_torch_module(name, (0,) + shape[1:], vjp, torch)


def check_against_torch_module(name, shape, vjp, torch):
    """Output, input and parameter gradients of ``sum(y * ct)`` against the torch module."""
    make, make_torch, _ = LAYERS[name]
    layer = make()
    out_shape, params, state = layer.init(jax.random.key(0), shape)
    module = make_torch(torch, shape[1] if len(shape) == 4 else shape[-1]).double()
    params, state = fcn.load_state_dict(params, state, module.state_dict())
    x = np.random.default_rng(1).standard_normal(shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    assert out_shape == tuple(yt.shape)
    ct = np.random.default_rng(2).standard_normal(tuple(yt.shape))
    (yt * torch.tensor(ct)).sum().backward()

    def loss(params, x):
        y, _ = layer.apply(params, state, x, vjp=vjp)
        return jnp.sum(y * ct), y

    (gp, gx), y = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, jnp.asarray(x, jnp.float32))
    assert_close(y, yt.detach().numpy(), 1e-5, 1e-5, "output")
    assert_close(gx, xt.grad.numpy(), 1e-5, 1e-5, "input grad")
    torch_grads = {k: v.grad.numpy() for k, v in module.named_parameters()}
    assert_close(gp, {k: torch_grads[k] for k in gp}, 1e-4, 1e-5, "param grads")


def test_init_follows_torch_default_distribution():
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias of Conv2d and Linear.
    _, params, _ = fcn.Conv2d(64, 3).init(jax.random.key(0), (1, 8, 10, 10))
    bound = 1 / np.sqrt(8 * 9)
    for leaf in (params["weight"], params["bias"]):
        assert float(jnp.max(jnp.abs(leaf))) <= bound
        assert float(jnp.max(jnp.abs(leaf))) > 0.9 * bound
    assert params["weight"].shape == (64, 8, 3, 3) and params["bias"].shape == (64,)
    _, params, _ = fcn.Linear(10, bias=False).init(jax.random.key(0), (-1, 64))
    assert set(params) == {"weight"} and params["weight"].shape == (10, 64)


def test_conv_train_formulation_runs_in_training_only_and_changes_no_number():
    x = jax.random.normal(jax.random.key(1), (2, 1, 12, 12))
    layer = fcn.Conv2d(4, 5, train_formulation="taps")  # the gates: the band, a dot_general
    _, params, state = layer.init(jax.random.key(0), x.shape)

    def run(train):
        return layer.apply(params, state, x, train=train)[0]

    assert "dot_general" not in str(jax.make_jaxpr(run, static_argnums=0)(True))
    assert "dot_general" in str(jax.make_jaxpr(run, static_argnums=0)(False))
    np.testing.assert_allclose(run(True), run(False), atol=1e-6)
    with pytest.raises(ValueError, match="^Conv2d: train_formulation 'taps' cannot run"):
        fcn.Conv2d(4, 3, train_formulation="taps").init(jax.random.key(0), (1, 16, 8, 8))


def test_conv_eval_formulation_runs_in_evaluation_only_and_changes_no_number():
    x = jax.random.normal(jax.random.key(1), (2, 8, 12, 12))
    layer = fcn.Conv2d(16, 5, eval_formulation="lax")  # the gates: the band, a dot_general
    _, params, state = layer.init(jax.random.key(0), x.shape)

    def jaxpr(train):
        return str(jax.make_jaxpr(lambda x: layer.apply(params, state, x, train=train)[0])(x))

    assert "conv_general_dilated" in jaxpr(False) and "dot_general" not in jaxpr(False)
    assert "dot_general" in jaxpr(True) and "conv_general_dilated" not in jaxpr(True)
    np.testing.assert_allclose(layer.apply(params, state, x)[0],
                               layer.apply(params, state, x, train=True)[0], atol=1e-5)
    assert "eval_formulation='lax'" in repr(layer)
    with pytest.raises(ValueError, match="^Conv2d: eval_formulation 'taps' cannot run"):
        fcn.Conv2d(4, 3, eval_formulation="taps").init(jax.random.key(0), (1, 16, 8, 8))


def test_conv_transpose_init_follows_torch_fan_in():
    # PyTorch's fan_in for ConvTranspose2d is weight.size(1) * kh * kw = (out / groups) * kh * kw
    _, params, _ = fcn.ConvTranspose2d(16, 3, groups=2).init(jax.random.key(0), (1, 4, 5, 5))
    assert params["weight"].shape == (4, 8, 3, 3) and params["bias"].shape == (16,)
    bound = 1 / np.sqrt(8 * 9)
    for leaf in (params["weight"], params["bias"]):
        assert 0.9 * bound < float(jnp.max(jnp.abs(leaf))) <= bound


@pytest.mark.parametrize("make,shape", [
    (lambda: fcn.ConvTranspose2d(3, 2, stride=2), (0, 2, 4, 4)),
    (lambda: fcn.AdaptiveMaxPool2d(3), (0, 2, 7, 5)),
    (lambda: fcn.AdaptiveAvgPool2d(3), (0, 2, 7, 5)),
    (lambda: fcn.Upsample(scale_factor=2, mode="bilinear"), (0, 2, 3, 3)),
])
def test_new_layers_with_an_empty_batch(make, shape):
    layer = make()
    out_shape, params, state = layer.init(jax.random.key(0), (-1,) + shape[1:])
    x = jnp.zeros(shape)

    def loss(params, x):
        return jnp.sum(layer.apply(params, state, x)[0] ** 2)

    y, _ = layer.apply(params, state, x)
    assert y.shape == (0,) + out_shape[1:]
    grads = jax.grad(loss, argnums=(0, 1))(params, x)
    assert grads[1].shape == shape
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads[0]))


def test_init_is_deterministic_and_key_dependent():
    layer = fcn.Linear(3)
    a = layer.init(jax.random.key(0), (2, 4))[1]["weight"]
    b = layer.init(jax.random.key(0), (2, 4))[1]["weight"]
    c = layer.init(jax.random.key(1), (2, 4))[1]["weight"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def _check_batchnorm_against_torch(layer, module, shape, affine, momentum, torch):
    """Four training steps, then eval, against the torch module with the same weights."""
    _, params, state = layer.init(jax.random.key(0), (-1,) + shape[1:])
    module = module.double()
    if affine:
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-1, 1)
    params, state = fcn.load_state_dict(params, state, module.state_dict())
    rng = np.random.default_rng(0)
    step = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))
    for _ in range(4):
        x = rng.standard_normal(shape) * 3 + 1
        y, state = step(params, state, jnp.asarray(x, jnp.float32))
        module.train()
        assert_close(y, module(torch.tensor(x)).detach().numpy(), 1e-5, 1e-5, "train output")
    torch_state = {k: v.numpy() for k, v in module.state_dict().items()}
    assert_close(state["running_mean"], torch_state["running_mean"], 1e-5, 1e-6, "mean")
    assert_close(state["running_var"], torch_state["running_var"], 1e-5, 1e-6, "var")
    if momentum is None:
        assert int(state["num_batches_tracked"]) == 4
    module.eval()
    x = rng.standard_normal((2,) + shape[1:])
    y, eval_state = layer.apply(params, state, jnp.asarray(x, jnp.float32), train=False)
    assert_close(y, module(torch.tensor(x)).detach().numpy(), 1e-5, 1e-5, "eval output")
    assert eval_state["running_mean"] is state["running_mean"]  # eval leaves state alone


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_running_statistics_follow_torch_over_steps(momentum, affine, torch):
    _check_batchnorm_against_torch(fcn.BatchNorm2d(momentum=momentum, affine=affine),
                                   torch.nn.BatchNorm2d(3, momentum=momentum, affine=affine),
                                   (6, 3, 5, 4), affine, momentum, torch)


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 7)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm1d_follows_torch_on_flat_and_sequence_input(shape, momentum, torch):
    _check_batchnorm_against_torch(fcn.BatchNorm1d(momentum=momentum),
                                   torch.nn.BatchNorm1d(3, momentum=momentum),
                                   shape, True, momentum, torch)


def test_batchnorm_without_running_stats_always_uses_batch_statistics(torch):
    layer = fcn.BatchNorm2d(track_running_stats=False)
    _, params, state = layer.init(jax.random.key(0), (-1, 2, 3, 3))
    assert state == {}
    x = np.random.default_rng(0).standard_normal((4, 2, 3, 3))
    module = torch.nn.BatchNorm2d(2, track_running_stats=False).double().eval()
    y, _ = layer.apply(params, state, jnp.asarray(x, jnp.float32), train=False)
    assert_close(y, module(torch.tensor(x)).detach().numpy(), 1e-5, 1e-5)


def test_dropout_layer_train_and_eval():
    layer = fcn.Dropout(0.25)
    _, params, state = layer.init(None, (1000, 100))
    x = jnp.ones((1000, 100))
    y, _ = layer.apply(params, state, x, train=True, key=jax.random.key(3))
    kept = float(jnp.mean(y != 0))
    assert abs(kept - 0.75) < 0.01
    assert np.allclose(np.asarray(y)[np.asarray(y) != 0], 1 / 0.75)
    y2, _ = layer.apply(params, state, x, train=True, key=jax.random.key(3))
    assert np.array_equal(y, y2)  # same key, same mask
    assert np.array_equal(layer.apply(params, state, x, train=False)[0], x)


@pytest.mark.parametrize("make,init_shape,x_shape,error,message", [
    (lambda: fcn.ConvTranspose2d(4, 3), (1, 3, 5, 5), (1, 2, 5, 5), ValueError,
     r"ConvTranspose2d: expected 3 channels at axis 1 \(as at init\), got 2"),
    (lambda: fcn.ConvTranspose2d(4, 3), (1, 3, 5, 5), (3, 5, 5), ValueError,
     r"ConvTranspose2d: expected a 4-D input \(N, C, H, W\), got shape \(3, 5, 5\)"),
    (lambda: fcn.ConvTranspose2d(4, 3, stride=2, output_padding=2), (1, 3, 5, 5), None,
     ValueError, r"ConvTranspose2d: output_padding must be smaller than either stride or "
                 r"dilation"),
    (lambda: fcn.ConvTranspose2d(4, 3, groups=2), (1, 3, 5, 5), None, ValueError,
     r"ConvTranspose2d: groups=2 must be a positive int dividing in_channels=3 and "
     r"out_channels=4"),
    (lambda: fcn.ConvTranspose2d(4, 3, padding=4), (1, 3, 2, 2), None, ValueError,
     r"ConvTranspose2d: the output would be -4x-4"),
    (lambda: fcn.AdaptiveAvgPool2d((2, 3, 4)), (1, 3, 5, 5), None, TypeError,
     r"AdaptiveAvgPool2d: output_size must be an int or a pair of ints or None"),
    (lambda: fcn.AdaptiveMaxPool2d(2), (1, 3, 5, 5), (1, 3, 0, 5), ValueError,
     r"AdaptiveMaxPool2d: expected non-empty channel and spatial axes"),
    (lambda: fcn.AdaptiveMaxPool2d(2), (1, 3, 5, 5), (3, 5, 5), ValueError,
     r"AdaptiveMaxPool2d: expected a 4-D input"),
    (lambda: fcn.Upsample(scale_factor=0.1), (1, 3, 5, 5), None, ValueError,
     r"Upsample: scale_factor 0.1 makes the output 0x0 from 5x5"),
    (lambda: fcn.Upsample(size=4), (1, 3, 5, 5), (3, 5, 5), ValueError,
     r"Upsample: expected a 4-D input"),
])
def test_new_layers_bad_input(make, init_shape, x_shape, error, message):
    with pytest.raises(error, match=message):
        layer = make()
        _, params, state = layer.init(jax.random.key(0), init_shape)
        layer.apply(params, state, jnp.ones(x_shape))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(), ValueError, r"Upsample: give exactly one of size and scale_factor"),
    (dict(size=3, mode="bilinear", align_corners=None, scale_factor=2), ValueError,
     r"Upsample: give exactly one"),
    (dict(size=3, mode="area"), ValueError, r"Upsample: mode must be one of"),
    (dict(size=3, align_corners=False), ValueError,
     r"Upsample: align_corners can only be set with mode='bilinear'"),
])
def test_upsample_constructor_checks_its_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        fcn.Upsample(**kwargs)


def test_a_decoder_copies_weights_both_ways_with_an_nn_sequential(torch):
    # the transposed weight layout (C_in, C_out/groups, kh, kw) is PyTorch's: state dicts copy
    # in (load_state_dict) and out (state_dict -> module.load_state_dict) unchanged
    net = fcn.serial(fcn.ConvTranspose2d(4, 3, stride=2, padding=1, output_padding=1),
                     fcn.ReLU(), fcn.Upsample(scale_factor=2, mode="bilinear"),
                     fcn.ConvTranspose2d(2, 2, groups=2), fcn.AdaptiveMaxPool2d((5, 3)))
    module = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1),
        torch.nn.ReLU(), torch.nn.Upsample(scale_factor=2, mode="bilinear"),
        torch.nn.ConvTranspose2d(4, 2, 2, groups=2), torch.nn.AdaptiveMaxPool2d((5, 3)))
    out_shape, params, state = net.init(jax.random.key(0), (-1, 6, 3, 4))
    params, state = fcn.load_state_dict(params, state, module.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 6, 3, 4)).astype(np.float32)
    y, _ = net.apply(params, state, jnp.asarray(x))
    assert out_shape == (-1, 2, 5, 3)
    assert_close(y, module(torch.tensor(x)).detach().numpy(), 1e-5, 1e-5, "decoder output")
    _, ours, _ = net.init(jax.random.key(1), (-1, 6, 3, 4))
    module.load_state_dict({k: torch.tensor(v) for k, v in fcn.state_dict(ours, {}).items()})
    y, _ = net.apply(ours, state, jnp.asarray(x))
    assert_close(y, module(torch.tensor(x)).detach().numpy(), 1e-5, 1e-5, "after copying out")


@pytest.mark.parametrize("make,name", [
    (lambda: fcn.Conv2d(6, 5, padding=2), "Conv2d(6, kernel_size=5, padding=2)"),
    (lambda: fcn.Conv2d(6, kernel_size=(3, 1), padding="same", bias=False),
     "Conv2d(6, kernel_size=(3, 1), padding='same', bias=False)"),
    (lambda: fcn.Linear(10, bias=True), "Linear(10)"),  # an explicit default is left out
    (lambda: fcn.MaxPool2d(3, 2, 1), "MaxPool2d(3, stride=2, padding=1)"),
    (lambda: fcn.BatchNorm2d(momentum=None), "BatchNorm2d(momentum=None)"),
    (lambda: fcn.BatchNorm2d(1e-3), "BatchNorm2d(eps=0.001)"),
    (lambda: fcn.LeakyReLU(0.2), "LeakyReLU(negative_slope=0.2)"),
    (lambda: fcn.Dropout(), "Dropout()"),
    (lambda: fcn.fan_in_concat(axis=2), "fan_in_concat(axis=2)"),
    (lambda: fcn.fan_out(3), "fan_out(3)"),
    (lambda: fcn.ConvTranspose2d(4, 3, stride=2), "ConvTranspose2d(4, kernel_size=3, stride=2)"),
    (lambda: fcn.AdaptiveAvgPool2d((2, None)), "AdaptiveAvgPool2d((2, None))"),
    (lambda: fcn.AdaptiveMaxPool2d(1), "AdaptiveMaxPool2d(1)"),
    (lambda: fcn.Upsample(scale_factor=2, mode="bilinear"),
     "Upsample(scale_factor=2, mode='bilinear')"),
])
def test_layer_names_repeat_the_constructor_call(make, name):
    assert make().name == name == repr(make())


def test_layer_is_still_the_init_apply_pair():
    layer = fcn.Conv2d(4, 3)
    init, apply = layer  # the stax idiom
    assert (init, apply) == (layer.init, layer.apply) == tuple(layer) and len(layer) == 2
    assert fcn.Layer(init, apply).name == "Layer"
    renamed = layer._replace(name="stem")
    assert renamed.name == "stem" and renamed == layer and renamed.init is layer.init
    with pytest.raises(AttributeError, match="immutable"):
        layer.name = "other"
    with pytest.raises(TypeError, match="unknown fields"):
        layer._replace(nmae="x")
    kernel_size = inspect.signature(fcn.Conv2d).parameters["kernel_size"]
    assert kernel_size.default is inspect.Parameter.empty
    assert fcn.Conv2d.__name__ == "Conv2d" and "NCHW" in fcn.Conv2d.__doc__


def test_dropout2d_layer_zeroes_whole_channels():
    layer = fcn.Dropout2d(0.25)
    _, params, state = layer.init(None, (50, 40, 3, 2))
    x = jnp.ones((50, 40, 3, 2))
    y, _ = layer.apply(params, state, x, train=True, key=jax.random.key(3))
    per_channel = np.asarray(y).reshape(50, 40, -1)
    assert np.all(per_channel.min(axis=-1) == per_channel.max(axis=-1))  # all or nothing
    assert abs(float(np.mean(per_channel[..., 0] != 0)) - 0.75) < 0.03
    assert np.allclose(per_channel[per_channel != 0], 1 / 0.75)
    y2, _ = layer.apply(params, state, x, train=True, key=jax.random.key(3))
    assert np.array_equal(y, y2)  # same key, same mask
    assert np.array_equal(layer.apply(params, state, x, train=False)[0], x)


# Layers whose batch-0 output and gradients are compared with torch's (shapes and values).
BATCH_ZERO = ["gelu", "silu", "elu", "softplus", "hardtanh", "layernorm", "groupnorm"]


@pytest.mark.parametrize("name", BATCH_ZERO)
@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
def test_batch_zero_like_torch(name, vjp, torch):
    make, make_torch, shape = LAYERS[name]
    shape = (0,) + shape[1:]
    layer = make()
    out_shape, params, state = layer.init(jax.random.key(0), shape)
    module = make_torch(torch, shape[1] if len(shape) == 4 else shape[-1]).double()
    params, state = fcn.load_state_dict(params, state, module.state_dict())
    xt = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    module(xt).sum().backward()

    def loss(params, x):
        return layer.apply(params, state, x, vjp=vjp)[0].sum()

    gp, gx = jax.grad(loss, argnums=(0, 1))(params, jnp.zeros(shape))
    assert out_shape == shape == gx.shape
    torch_grads = {k: v.grad.numpy() for k, v in module.named_parameters()}
    assert_close(gp, {k: torch_grads[k] for k in gp}, 0, 0, "param grads (zeros)")


@pytest.mark.parametrize("make,make_torch,shape", [
    (fcn.BatchNorm1d, lambda t: t.nn.BatchNorm1d(3), (3,)),
    (fcn.BatchNorm1d, lambda t: t.nn.BatchNorm1d(3), (3, 4)),
    (fcn.BatchNorm2d, lambda t: t.nn.BatchNorm2d(3), (3, 2, 2))])
def test_batchnorm_batch_zero_and_one_like_torch(make, make_torch, shape, torch):
    layer = make(momentum=None)
    _, params, state = layer.init(jax.random.key(0), (-1,) + shape)
    module = make_torch(torch).train()
    empty = (0,) + shape

    def loss(params, x):
        y, new_state = layer.apply(params, state, x, train=True)
        return y.sum(), new_state

    (gp, gx), new_state = jax.grad(loss, (0, 1), has_aux=True)(params, jnp.zeros(empty))
    xt = torch.zeros(empty, requires_grad=True)
    module(xt).sum().backward()
    assert gx.shape == empty
    assert_close(gp, {k: v.grad.numpy() for k, v in module.named_parameters()}, 0, 0, "grads")
    assert_close({k: new_state[k] for k in ("running_mean", "running_var")},
                 {k: module.state_dict()[k].numpy() for k in ("running_mean", "running_var")},
                 0, 0, "running statistics kept")
    one = (1,) + shape
    if math.prod(one) // 3 < 2:  # one value per channel: an error in training, as torch
        with pytest.raises(ValueError, match=r"BatchNorm[12]d: training needs more than 1 value"):
            layer.apply(params, state, jnp.zeros(one), train=True)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            module(torch.zeros(one))
    else:
        y, _ = layer.apply(params, state, jnp.ones(one), train=True)
        assert_close(y, module(torch.ones(one)).detach().numpy(), 1e-6, 1e-6, "batch of one")


@pytest.mark.parametrize("make,shape,x,message", [
    (lambda: fcn.LayerNorm((3, 4)), (2, 3, 4), jnp.ones((2, 3, 5)),
     r"LayerNorm: expected an input whose last 2 axes are \(3, 4\) \(as at init\), "
     r"got shape \(2, 3, 5\)"),
    (lambda: fcn.LayerNorm(4), (2, 4), jnp.ones((2, 4), jnp.int32),
     r"LayerNorm: expected a floating-point input, got dtype int32"),
    (lambda: fcn.GroupNorm(2), (2, 6, 3), jnp.ones((2, 4, 3)),
     r"GroupNorm: expected 6 channels at axis 1 \(as at init\), got 4"),
    (lambda: fcn.GroupNorm(4, affine=False), (2, 8, 3), jnp.ones((2, 6, 3)),
     r"GroupNorm: num_groups=4 must divide the 6 channels"),
    (lambda: fcn.BatchNorm1d(), (2, 3), jnp.ones((2, 3, 4, 4)),
     r"BatchNorm1d: expected a 2-D or 3-D input \(N, C\) or \(N, C, L\), got shape "
     r"\(2, 3, 4, 4\)"),
    (lambda: fcn.BatchNorm1d(), (2, 3), jnp.ones((2, 5)),
     r"BatchNorm1d: expected 3 channels at axis 1 \(as at init\), got 5"),
    (lambda: fcn.Dropout2d(), (2, 3, 4, 4), jnp.ones((2, 3)),
     r"Dropout2d: expected a 3-D or 4-D input \(N, C, L\) or \(N, C, H, W\), got shape \(2, 3\)"),
    (lambda: fcn.Dropout2d(), (2, 3, 4, 4), jnp.ones((2, 3, 4, 4)),
     r"Dropout2d: apply\(train=True\) needs a PRNG key"),
    (lambda: fcn.SiLU(), (2,), jnp.ones(2, jnp.int32),
     r"silu: expected a floating-point input, got dtype int32"),
])
def test_new_layers_reject_bad_input_before_xla(make, shape, x, message):
    layer = make()
    _, params, state = layer.init(jax.random.key(0), shape)
    with pytest.raises((ValueError, TypeError), match=message):
        layer.apply(params, state, x, train=True)


@pytest.mark.parametrize("make,shape,message", [
    (lambda: fcn.LayerNorm((3, 4)), (2, 4, 3),
     r"LayerNorm: expected an input whose last 2 axes are \(3, 4\), got shape \(2, 4, 3\)"),
    (lambda: fcn.GroupNorm(4), (2, 6, 3), r"GroupNorm: num_groups=4 must divide the 6 channels"),
    (lambda: fcn.GroupNorm(2), (6,), r"GroupNorm: expected an input of shape \(N, C, \.\.\.\)"),
    (lambda: fcn.BatchNorm1d(), (2, 3, 4, 4), r"BatchNorm1d: expected a 2-D or 3-D input"),
    (lambda: fcn.Dropout2d(), (2, 3), r"Dropout2d: expected a 3-D or 4-D input"),
])
def test_new_layers_reject_bad_shapes_at_init(make, shape, message):
    with pytest.raises(ValueError, match=message):
        make().init(jax.random.key(0), shape)


@pytest.mark.parametrize("make,message", [
    (lambda: fcn.GELU("fast"), r"GELU: approximate must be 'none' or 'tanh', got 'fast'"),
    (lambda: fcn.Hardtanh(1.0, -1.0), r"Hardtanh: min_val must not exceed max_val"),
    (lambda: fcn.Softplus(beta=0), r"Softplus: beta must be nonzero"),
    (lambda: fcn.GroupNorm(0), r"GroupNorm: num_groups must be a positive int, got 0"),
    (lambda: fcn.LayerNorm(()), r"LayerNorm: normalized_shape must be a positive int"),
    (lambda: fcn.Dropout2d(-0.1), r"Dropout2d: p must be in \[0, 1\], got -0.1"),
])
def test_new_layers_reject_bad_constructor_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_on_an_empty_batch_follows_torch(momentum, vjp, torch):
    # torch trains on N = 0: empty output, running statistics kept (not NaN), the batch
    # counted, zero gradients for weight and bias. We raised "needs more than 1 value".
    layer = fcn.BatchNorm2d(momentum=momentum)
    _, params, state = layer.init(jax.random.key(0), (-1, 3, 5, 4))
    module = torch.nn.BatchNorm2d(3, momentum=momentum).double()
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
    params, state = fcn.load_state_dict(params, state, module.state_dict())
    xt = torch.zeros((0, 3, 5, 4), dtype=torch.float64, requires_grad=True)
    module(xt).sum().backward()

    def loss(params, x):
        y, new_state = layer.apply(params, state, x, train=True, vjp=vjp)
        return jnp.sum(y), (y, new_state)

    grads, (y, new_state) = jax.grad(loss, has_aux=True)(params, jnp.zeros((0, 3, 5, 4)))
    assert y.shape == (0, 3, 5, 4)
    torch_state = {k: v.numpy() for k, v in module.state_dict().items()}
    assert_close(new_state, {k: torch_state[k] for k in new_state}, 1e-6, 0, "state")
    assert int(torch_state["num_batches_tracked"]) == 1
    assert_close(grads, {k: v.grad.numpy() for k, v in module.named_parameters()}, 0, 0, "grads")
    module.eval()
    y, _ = layer.apply(params, new_state, jnp.zeros((0, 3, 5, 4)), vjp=vjp)
    assert y.shape == tuple(module(xt).shape) == (0, 3, 5, 4)
