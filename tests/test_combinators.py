"""serial / parallel / fan_out / fan_in / residual: shapes, threading of state and keys."""
import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn as fcn
from tests.conftest import assert_close


def basic_block(channels):
    return fcn.serial(
        fcn.residual(fcn.Conv2d(channels, 3, padding=1, bias=False), fcn.BatchNorm2d(), fcn.ReLU(),
                     fcn.Conv2d(channels, 3, padding=1, bias=False), fcn.BatchNorm2d()),
        fcn.ReLU())


def test_resnet_basic_block_matches_torch(torch):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(c))

        def forward(self, x):
            return torch.relu(self.body(x) + x)

    block = basic_block(4)
    shape, params, state = block.init(jax.random.key(0), (2, 4, 6, 6))
    assert shape == (2, 4, 6, 6)
    module = Block(4).double()
    # ours: 0 (residual) -> 1 (parallel) -> 0 (main branch serial) -> i
    params, state = fcn.load_state_dict(
        params, state, module.state_dict(),
        rename=lambda n: n.replace("0.1.0.", "body.", 1))
    x = np.random.default_rng(0).standard_normal((2, 4, 6, 6))
    y, new_state = block.apply(params, state, jnp.asarray(x, jnp.float32), train=True)
    assert_close(y, module(torch.tensor(x)).detach().numpy(), 1e-5, 1e-5)
    torch_mean = module.body[1].running_mean.numpy()
    assert_close(new_state[0][1][0][1]["running_mean"], torch_mean, 1e-5, 1e-6)


def test_residual_with_projection_shortcut_and_concat():
    block = fcn.residual(fcn.Conv2d(8, 3, stride=2, padding=1),
                         shortcut=fcn.Conv2d(8, 1, stride=2))
    shape, params, _ = block.init(jax.random.key(0), (-1, 3, 9, 9))
    assert shape == (-1, 8, 5, 5)
    net = fcn.serial(fcn.fan_out(3), fcn.parallel(fcn.Identity(), fcn.ReLU(), fcn.Conv2d(2, 1)),
                     fcn.fan_in_concat(axis=1))
    shape, params, state = net.init(jax.random.key(0), (2, 3, 4, 4))
    assert shape == (2, 8, 4, 4)
    x = jnp.arange(96.0).reshape(2, 3, 4, 4) - 40
    y, _ = net.apply(params, state, x)
    assert y.shape == shape
    np.testing.assert_array_equal(y[:, :3], x)
    np.testing.assert_array_equal(y[:, 3:6], jnp.maximum(x, 0))


def test_fan_in_sum_adds_and_checks_shapes():
    net = fcn.serial(fcn.fan_out(3), fcn.fan_in_sum())
    _, params, state = net.init(None, (2, 3))
    y, _ = net.apply(params, state, jnp.ones((2, 3)))
    np.testing.assert_array_equal(y, 3 * np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"fan_in_sum: expected inputs of one shape"):
        fcn.fan_in_sum().init(None, ((2, 3), (2, 4)))


def test_serial_threads_keys_train_and_vjp_to_children():
    seen = []

    def probe(tag):
        def init(key, shape):
            return shape, {}, {}

        def apply(params, state, x, *, train=False, key=None, vjp="custom"):
            seen.append((tag, train, vjp, None if key is None else jax.random.key_data(key)))
            return x, state

        return fcn.Layer(init, apply)

    net = fcn.serial(probe("a"), fcn.serial(probe("b"), probe("c")))
    _, params, state = net.init(jax.random.key(0), (1,))
    net.apply(params, state, jnp.ones(1), train=True, key=jax.random.key(1), vjp="autodiff")
    assert [(t, tr, v) for t, tr, v, _ in seen] == [("a", True, "autodiff"),
                                                   ("b", True, "autodiff"),
                                                   ("c", True, "autodiff")]
    keys = [tuple(np.asarray(k)) for *_, k in seen]
    assert len(set(keys)) == 3  # every child gets its own key


def test_dropout_in_serial_gets_distinct_keys():
    net = fcn.serial(fcn.Dropout(0.5), fcn.Dropout(0.5))
    _, params, state = net.init(None, (1, 4000))
    y, _ = net.apply(params, state, jnp.ones((1, 4000)), train=True, key=jax.random.key(0))
    # two independent masks keep about a quarter; one mask applied twice would keep half
    assert abs(float(jnp.mean(y != 0)) - 0.25) < 0.03


def test_state_round_trip_names_like_torch_sequential():
    net = fcn.serial(fcn.Conv2d(2, 3), fcn.serial(fcn.BatchNorm2d(), fcn.ReLU()))
    _, params, state = net.init(jax.random.key(0), (1, 1, 5, 5))
    names = set(fcn.state_dict(params, state))
    assert names == {"0.weight", "0.bias", "1.0.weight", "1.0.bias", "1.0.running_mean",
                     "1.0.running_var"}
    with pytest.raises(ValueError, match=r"'0.weight' expected shape \(2, 1, 3, 3\), got \(2, 1, 2, 2\)"):
        fcn.load_state_dict(params, state, {**fcn.state_dict(params, state),
                                            "0.weight": np.zeros((2, 1, 2, 2))})
    with pytest.raises(ValueError, match="no matching leaf: \\['extra'\\]"):
        fcn.load_state_dict(params, state, {**fcn.state_dict(params, state), "extra": 1.0})


def test_combinators_record_their_children_and_wiring():
    conv, relu = fcn.Conv2d(2, 3), fcn.ReLU()
    net = fcn.serial(conv, fcn.parallel(relu, relu))
    assert net.children[0] is conv and net.wiring == "serial" and net.name == "serial"
    assert net.children[1].children == (relu, relu) and net.children[1].wiring == "parallel"
    assert repr(net) == "serial(Conv2d(2, kernel_size=3), parallel(ReLU(), ReLU()))"
    block = fcn.residual(fcn.ReLU())
    assert repr(block) == "residual(fan_out(2), parallel(serial(ReLU()), Identity()), fan_in_sum())"
    assert block.wiring == "serial" and fcn.fan_out(2).children == ()


def test_serial_and_parallel_reject_params_for_fewer_layers():
    # zip used to stop at the shorter tuple: serial returned the first two layers' output
    net = fcn.serial(fcn.Linear(3), fcn.ReLU(), fcn.Linear(2))
    _, params, state = net.init(jax.random.key(0), (4, 5))
    x = jnp.ones((4, 5))
    assert net.apply(params, state, x)[0].shape == (4, 2)
    with pytest.raises(ValueError, match=r"^serial: expected params as a tuple of 3 entries "
                                         r"\(one per layer\), got tuple of length 2"):
        net.apply(params[:2], state[:2], x)
    with pytest.raises(ValueError, match=r"^serial: expected state as a tuple of 3 entries "
                                         r"\(one per layer\), got dict with keys \(\)"):
        net.apply(params, {}, x)
    pair = fcn.parallel(fcn.Linear(3), fcn.Linear(2))
    _, params, state = pair.init(jax.random.key(0), ((4, 5), (4, 6)))
    inputs = (jnp.ones((4, 5)), jnp.ones((4, 6)))
    assert [y.shape for y in pair.apply(params, state, inputs)[0]] == [(4, 3), (4, 2)]
    with pytest.raises(ValueError, match=r"^parallel: expected params as a tuple of 2 entries"):
        pair.apply(params[:1], state[:1], inputs)
    with pytest.raises(ValueError, match=r"^parallel: expected inputs as a tuple of 2 entries "
                                         r"\(one per layer\), got tuple of length 1"):
        pair.apply(params, state, inputs[:1])


def test_combinators_without_params_reject_params():
    block = fcn.residual(fcn.Linear(3))  # serial(fan_out, parallel(serial(Linear), Identity), fan_in_sum)
    _, params, state = block.init(jax.random.key(0), (2, 3))
    x = jnp.ones((2, 3))
    misplaced = (params[1][0][0], params[1], params[2])  # Linear's params where fan_out's go
    with pytest.raises(ValueError, match=r"^serial\[0\] > fan_out: expected empty params \{\}, "
                                         r"got dict with keys \('weight', 'bias'\)"):
        block.apply(misplaced, state, x)
    with pytest.raises(ValueError, match=r"^serial\[1\] > parallel\[1\] > Identity: expected "
                                         r"empty params \{\}, got dict with keys"):
        block.apply((params[0], (params[1][0], params[1][0][0]), params[2]), state, x)
    with pytest.raises(ValueError, match=r"^serial\[2\] > fan_in_sum: expected empty state"):
        block.apply(params, (state[0], state[1], (1,)), x)


def test_keys_are_checked_where_they_are_split():
    net = fcn.serial(fcn.Dropout(0.5), fcn.ReLU())
    _, params, state = net.init(None, (2, 3))  # nothing here draws parameters: no key needed
    with pytest.raises(TypeError, match=r"^serial: expected a PRNG key \(jax.random.key\(seed\)\) "
                                        r"or None, got int 3"):
        net.apply(params, state, jnp.ones((2, 3)), train=True, key=3)
    legacy = jax.random.PRNGKey(0)  # a raw uint32[2] key is a key too
    assert net.apply(params, state, jnp.ones((2, 3)), train=True, key=legacy)[0].shape == (2, 3)
    assert fcn.Linear(2).init(legacy, (1, 3))[1]["weight"].shape == (2, 3)


def test_frozen_layer_holds_its_params_as_state_under_torch_names():
    conv = fcn.Conv2d(3, 3)
    _, params, _ = conv.init(jax.random.key(1), (-1, 2, 6, 6))
    net = fcn.serial(fcn.frozen(conv), fcn.frozen(fcn.BatchNorm2d()), fcn.ReLU(),
                     fcn.Flatten(), fcn.Linear(2))
    _, net_params, state = net.init(jax.random.key(0), (-1, 2, 6, 6))
    assert net_params[:2] == ({}, {}) and set(net_params[4]) == {"weight", "bias"}
    assert set(fcn.state_dict(net_params, state)) == {
        "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "4.weight", "4.bias"}
    x = jax.random.normal(jax.random.key(2), (4, 2, 6, 6))
    # the frozen conv computes what the layer computes with those params (same init key)
    frozen_conv = fcn.frozen(conv)
    _, _, conv_state = frozen_conv.init(jax.random.key(1), (-1, 2, 6, 6))
    np.testing.assert_array_equal(frozen_conv.apply({}, conv_state, x)[0],
                                  conv.apply(params, {}, x)[0])
    # a frozen BatchNorm still updates its running statistics in training, as torch's does
    _, new_state = net.apply(net_params, state, x, train=True)
    assert not np.allclose(new_state[1]["running_mean"], state[1]["running_mean"])
    np.testing.assert_array_equal(new_state[0]["weight"], state[0]["weight"])


def test_frozen_layer_passes_the_input_gradient_and_takes_none():
    conv = fcn.Conv2d(3, 3)
    _, params, _ = conv.init(jax.random.key(1), (-1, 2, 6, 6))
    frozen_conv = fcn.frozen(conv)
    _, _, state = frozen_conv.init(jax.random.key(1), (-1, 2, 6, 6))
    x = jax.random.normal(jax.random.key(2), (4, 2, 6, 6))
    through_frozen = jax.grad(lambda x: jnp.sum(frozen_conv.apply({}, state, x)[0] ** 2))(x)
    through_layer = jax.grad(lambda x: jnp.sum(conv.apply(params, {}, x)[0] ** 2))(x)
    np.testing.assert_array_equal(through_frozen, through_layer)
    # differentiated as state would be, its weights get a zero gradient, not a wrong one
    by_state = jax.grad(lambda s: jnp.sum(frozen_conv.apply({}, s, x)[0] ** 2))(state)
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(by_state))


def test_frozen_layers_are_not_trained_and_a_nest_keeps_its_names():
    block = fcn.frozen(fcn.serial(fcn.Conv2d(2, 3, bias=False), fcn.BatchNorm2d()))
    net = fcn.serial(block, fcn.Flatten(), fcn.Linear(3))
    _, params, state = net.init(jax.random.key(0), (-1, 1, 5, 5))
    assert set(fcn.state_dict(params, state)) == {
        "0.0.weight", "0.1.weight", "0.1.bias", "0.1.running_mean", "0.1.running_var",
        "2.weight", "2.bias"}
    x, y = jax.random.normal(jax.random.key(1), (6, 1, 5, 5)), jnp.arange(6) % 3

    def loss(p):
        return fcn.cross_entropy(net.apply(p, state, x, train=True)[0], y)

    grads = jax.grad(loss)(params)
    assert grads[0] == {} and np.any(grads[2]["weight"])


def test_frozen_rejects_params_and_a_state_without_its_params():
    layer = fcn.frozen(fcn.Conv2d(2, 3))
    _, params, state = layer.init(jax.random.key(0), (-1, 1, 5, 5))
    x = jnp.zeros((1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"frozen\(Conv2d\(2, kernel_size=3\)\): expected "
                                         r"empty params \{\}, got dict with keys \('weight',\)"):
        layer.apply({"weight": state["weight"]}, state, x)
    with pytest.raises(ValueError, match=r"expected the frozen params \['bias'\] in the state"):
        layer.apply(params, {"weight": state["weight"]}, x)
    clash = fcn.layers.Layer(lambda key, shape: (shape, {"w": jnp.zeros(1)}, {"w": jnp.zeros(1)}),
                             lambda p, s, x, **kw: (x, s))
    with pytest.raises(ValueError, match=r"share the names \['w'\]"):
        fcn.frozen(clash).init(jax.random.key(0), (1,))


def test_frozen_runs_wherever_its_layer_runs():
    # init is asked about the params with the batch as -1, as init always is: with the batch
    # itself, a training-only pin's bound (the band's, on the batch) refused an evaluation
    conv = fcn.Conv2d(8, 5, train_formulation="banded")
    layer = fcn.frozen(conv)
    _, _, state = layer.init(jax.random.key(0), (-1, 1, 28, 28))
    big = jax.ShapeDtypeStruct((10000, 1, 28, 28), jnp.float32)
    expected = jax.eval_shape(lambda x: conv.apply({"weight": state["weight"],
                                                    "bias": state["bias"]}, {}, x)[0], big)
    assert jax.eval_shape(lambda x: layer.apply({}, state, x)[0], big) == expected


def test_frozen_refuses_params_it_cannot_hold_as_state():
    odd = fcn.layers.Layer(lambda key, shape: (shape, (jnp.zeros(1), jnp.zeros(2)), {}),
                           lambda p, s, x, **kw: (x, s))
    with pytest.raises(ValueError, match=r"expected params and state as dicts, or as tuples "
                                         r"of one entry per child, got params tuple of length "
                                         r"2 and state dict"):
        fcn.frozen(odd).init(jax.random.key(0), (1,))
