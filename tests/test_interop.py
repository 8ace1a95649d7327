"""functional_cnn.interop: torch state dicts in and out."""
import jax
import numpy as np
import pytest

import functional_cnn as fcn


def test_loaded_leaves_are_copies_of_the_torch_tensors(torch):
    """On a CPU ``jnp.asarray`` may keep a numpy view of the tensor's memory: a later in-place
    torch update (an optimizer step, a BatchNorm forward in training mode) would then change
    the loaded parameters and running statistics."""
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    net = fcn.serial(fcn.Linear(3), fcn.BatchNorm1d())
    _, params, state = net.init(jax.random.key(0), (-1, 4))
    params, state = fcn.load_state_dict(params, state, module.state_dict())
    loaded = jax.tree.map(np.array, (params, state))
    with torch.no_grad():
        module[0].weight.add_(100.0)
    module.train()
    module(torch.randn(8, 4))  # moves the running statistics in place
    assert not np.allclose(module[1].running_mean.numpy(), loaded[1][1]["running_mean"])
    numpy_dict = {k: v.numpy() for k, v in module.state_dict().items()}
    params2, _ = fcn.load_state_dict(params, state, numpy_dict)
    numpy_dict["0.bias"][:] = -7.0
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.array, (params, state)))
    assert not np.any(np.array(params2[0]["bias"]) == -7.0)


def test_parameters_that_require_grad_and_bfloat16_tensors_load_as_torch_loads_them(torch):
    """``dict(module.named_parameters())`` holds tensors that require grad, and a bfloat16
    module's tensors have a dtype numpy lacks: both load, cast to each leaf's dtype (bfloat16
    to float32 exactly); an entry that is no array is a ValueError naming its key."""
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    net = fcn.serial(fcn.Linear(3))
    _, params, state = net.init(jax.random.key(0), (-1, 4))
    named = {f"0.{k}": v for k, v in module.named_parameters()}
    loaded, _ = fcn.load_state_dict(params, state, named)
    np.testing.assert_array_equal(loaded[0]["weight"], module.weight.detach().numpy())
    half = {k: v.to(torch.bfloat16) for k, v in named.items()}
    loaded, _ = fcn.load_state_dict(params, state, half)
    assert loaded[0]["weight"].dtype == np.float32
    np.testing.assert_array_equal(loaded[0]["bias"], half["0.bias"].float().detach().numpy())
    with pytest.raises(ValueError, match=r"^load_state_dict: '0\.bias'"):
        fcn.load_state_dict(params, state, {**named, "0.bias": object()})
