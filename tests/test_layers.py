"""Layers against torch.nn modules with the same weights: shapes, outputs, gradients, state."""
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
    "flatten": (lambda: fcn.Flatten(), lambda t, c: t.nn.Flatten(), (2, 3, 4, 5)),
    "flatten_range": (lambda: fcn.Flatten(0, 2), lambda t, c: t.nn.Flatten(0, 2), (2, 3, 4, 5)),
    "leaky": (lambda: fcn.LeakyReLU(0.2), lambda t, c: t.nn.LeakyReLU(0.2), (2, 5)),
    "softmax": (lambda: fcn.Softmax(1), lambda t, c: t.nn.Softmax(1), (2, 5, 3)),
    "logsoftmax": (lambda: fcn.LogSoftmax(), lambda t, c: t.nn.LogSoftmax(-1), (2, 5)),
    "tanh": (lambda: fcn.Tanh(), lambda t, c: t.nn.Tanh(), (2, 5)),
    "sigmoid": (lambda: fcn.Sigmoid(), lambda t, c: t.nn.Sigmoid(), (2, 5)),
    "identity": (lambda: fcn.Identity(), lambda t, c: t.nn.Identity(), (2, 5)),
}


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


def test_init_is_deterministic_and_key_dependent():
    layer = fcn.Linear(3)
    a = layer.init(jax.random.key(0), (2, 4))[1]["weight"]
    b = layer.init(jax.random.key(0), (2, 4))[1]["weight"]
    c = layer.init(jax.random.key(1), (2, 4))[1]["weight"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_running_statistics_follow_torch_over_steps(momentum, affine, torch):
    layer = fcn.BatchNorm2d(momentum=momentum, affine=affine)
    _, params, state = layer.init(jax.random.key(0), (-1, 3, 5, 4))
    module = torch.nn.BatchNorm2d(3, momentum=momentum, affine=affine).double()
    if affine:
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-1, 1)
    params, state = fcn.load_state_dict(params, state, module.state_dict())
    rng = np.random.default_rng(0)
    step = jax.jit(lambda p, s, x: layer.apply(p, s, x, train=True))
    for _ in range(4):
        x = rng.standard_normal((6, 3, 5, 4)) * 3 + 1
        y, state = step(params, state, jnp.asarray(x, jnp.float32))
        module.train()
        assert_close(y, module(torch.tensor(x)).detach().numpy(), 1e-5, 1e-5, "train output")
    torch_state = {k: v.numpy() for k, v in module.state_dict().items()}
    assert_close(state["running_mean"], torch_state["running_mean"], 1e-5, 1e-6, "mean")
    assert_close(state["running_var"], torch_state["running_var"], 1e-5, 1e-6, "var")
    if momentum is None:
        assert int(state["num_batches_tracked"]) == 4
    module.eval()
    x = rng.standard_normal((2, 3, 5, 4))
    y, eval_state = layer.apply(params, state, jnp.asarray(x, jnp.float32), train=False)
    assert_close(y, module(torch.tensor(x)).detach().numpy(), 1e-5, 1e-5, "eval output")
    assert eval_state["running_mean"] is state["running_mean"]  # eval leaves state alone


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
