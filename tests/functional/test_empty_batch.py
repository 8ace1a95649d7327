"""An empty batch (N = 0) through every op that is not a layer's, on both gradient paths, as
PyTorch computes it: empty outputs, NaN for a mean over no rows, zero gradients for weights.
(The layers' ops are checked at N = 0 in tests/test_layers.py.)"""
import jax
import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn.functional as F
from functional_cnn.audit import cases as C

CASES = [
    *[("cross_entropy", {"batch": 0, "reduction": r, "label_smoothing": s, "extra_dims": e})
      for r in ("mean", "sum", "none") for s, e in ((0.0, ()), (0.1, (3,)))],
    *[(op, {"shape": (0, 3), "reduction": r})
      for op in ("binary_cross_entropy_with_logits", "mse_loss") for r in ("mean", "sum", "none")],
    # an empty axis has no max to shift by: softmax over the batch axis raised
    ("softmax", {"shape": (0, 3), "dim": 0}), ("log_softmax", {"shape": (0, 3), "dim": 0}),
    ("dropout", {"shape": (0, 3), "p": 0.5, "training": True}),
    # training on no rows keeps the running statistics (their mean would be NaN); we raised
    ("batch_norm", {"batch": 0, "training": True}),
    ("batch_norm", {"batch": 0, "training": True, "affine": False, "size": (1, 2)}),
    ("batch_norm", {"batch": 0, "training": False}),
    ("conv2d", {"batch": 0, "in_per_group": 1, "groups": 1, "stride": 2, "padding": 1,
                "dilation": 2, "kernel": (3, 2)}),  # im2col: ZeroDivisionError in a reshape
    ("max_pool2d", {"batch": 0, "kernel": 3, "stride": 2}),  # the scatter rule: the same
]


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
@pytest.mark.parametrize("op,config", CASES, ids=[f"{op}-{i}" for i, (op, _) in enumerate(CASES)])
def test_empty_batch_matches_torch(op, config, vjp, torch):
    case = C.build(op, config)
    ct = C.cotangent(case)
    out, grads = C.value_and_grads(case, vjp, ct)
    out_torch, grads_torch = C.torch_value_and_grads(case, torch, ct)
    for name, got, want in (("output", out, out_torch), ("grads", grads, grads_torch)):
        got, want = (tuple(v) if isinstance(v, tuple) else (v,) for v in (got, want))
        for a, b in zip(got, want):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape, f"{op} {name}: shape {a.shape} != torch {b.shape}"
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True,
                                       err_msg=f"{op} {name}")
    if config.get("reduction") == "mean":  # torch: the mean of no rows is NaN
        assert np.isnan(out)


@pytest.mark.parametrize("vjp", ["custom", "autodiff"])
@pytest.mark.parametrize("in_features, out_features", [(0, 3), (3, 0)])
def test_linear_without_features_has_empty_gradients_as_torch(in_features, out_features, vjp,
                                                              torch):
    """No input or output features: the custom rule had raised ZeroDivisionError reshaping
    its rows (-1 beside a 0)."""
    x = torch.ones(2, in_features, requires_grad=True)
    w = torch.ones(out_features, in_features, requires_grad=True)
    torch.nn.functional.linear(x, w).sum().backward()
    dx, dw = jax.grad(lambda x, w: F.linear(x, w, vjp=vjp).sum(), argnums=(0, 1))(
        jnp.ones((2, in_features)), jnp.ones((out_features, in_features)))
    assert dx.shape == tuple(x.grad.shape) and dw.shape == tuple(w.grad.shape)
    np.testing.assert_array_equal(dx, x.grad.numpy())
