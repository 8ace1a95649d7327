"""Every registered op at its kinks, ties and edges -- where a derivative has a choice to make:
both gradient paths (the hand-written rule and JAX autodiff of the forward) must take PyTorch's
subgradient there. The generic tests sample random inputs, which almost never land on a kink."""
import jax
import numpy as np
import pytest
from jax import numpy as jnp

from functional_cnn.audit import cases as C
from functional_cnn.functional import REGISTRY
from functional_cnn.verify import assert_close, tolerance

KINK = tolerance("kink")


def replace(**arrays):
    """A transform of a case's inputs: the named inputs become ``arrays`` (callables of the
    built input's shape, or fixed arrays)."""
    def transform(inputs):
        out = dict(inputs)
        for name, value in arrays.items():
            shape, dtype = inputs[name].shape, inputs[name].dtype
            out[name] = np.asarray(value(shape) if callable(value) else value, dtype)
        return out
    return transform


def zeros(shape):
    return np.zeros(shape)


def constant(c):
    return lambda shape: np.full(shape, c)


def signed_zeros(shape):
    """+0 and -0 (torch's relu and leaky_relu treat both as not positive) between +-1 and
    NaN (which torch's relu passes through, with its gradient)."""
    flat = np.resize([0.0, 1.0, -0.0, -1.0, np.nan], int(np.prod(shape)))
    return flat.reshape(shape)


def constant_per_channel(shape):
    return np.broadcast_to(np.arange(shape[1], dtype=float).reshape(1, -1, *[1] * (len(shape) - 2)),
                           shape)


SATURATED = [[0.0, -0.0, 30.0], [-30.0, np.inf, -np.inf]]

# op -> [(config over the op's defaults, transform of the built inputs)]
KINKS = {
    # smooth ops: the points a zero-initialized layer starts from
    "linear": [({}, replace(weight=zeros)), ({"bias": False}, replace(x=zeros))],
    "conv2d": [({"padding": 1, "stride": 2}, replace(weight=zeros))],
    "conv_transpose2d": [({"stride": 2, "padding": 1, "output_padding": 1},
                          replace(weight=zeros))],
    # ties everywhere (first maximum wins), windows overlapping, overhanging and in the padding
    "max_pool2d": [({"stride": 1, "padding": 1}, replace(x=constant(1.0))),
                   # all -inf: torch passes the gradient to the first element inside the
                   # input, never to the (-inf) padding
                   ({"ceil_mode": True, "stride": 2, "size": (6, 9), "dilation": 2,
                     "padding": 1}, replace(x=constant(-np.inf))),
                   ({"kernel": 3, "stride": 2, "padding": 1, "ties": True}, replace())],
    # window edges: padding, ceil-mode overhang, with and without the padding counted
    "avg_pool2d": [({"ceil_mode": True, "stride": 2, "padding": 1}, replace()),
                   ({"ceil_mode": True, "stride": 2, "padding": 1, "count_include_pad": False},
                    replace()),
                   ({"kernel": 3, "stride": 2, "padding": 1, "size": (6, 6)}, replace())],
    # adaptive windows overlapping (7 -> 3) and repeating inputs (4 -> 9): ties everywhere
    # (first maximum wins), all -inf windows (their first element), a constant mean
    "adaptive_max_pool2d": [({"size": (7, 7), "output_size": 3}, replace(x=constant(1.0))),
                            ({"size": (7, 7), "output_size": 3}, replace(x=constant(-np.inf))),
                            ({"ties": True, "size": (4, 3), "output_size": (9, 4)}, replace())],
    "adaptive_avg_pool2d": [({"size": (7, 5), "output_size": (3, 2)}, replace(x=constant(2.0))),
                            ({"size": (4, 3), "output_size": (9, 4)}, replace(x=zeros))],
    # a constant image (every source pixel tied in its weights), output size equal to the input
    # (scale 1.1: sources at the pixel centres) and align_corners at a 1-wide output
    "interpolate": [({"target": ("scale", 1.7)}, replace(x=constant(1.0))),
                    ({"mode": "bilinear", "align_corners": False, "target": ("scale", 1.1)},
                     replace(x=constant(1.0))),
                    ({"mode": "bilinear", "align_corners": True, "target": ("size", (1, 3))},
                     replace(x=constant(-2.0)))],
    # a constant channel: zero variance, x - mean == 0
    "batch_norm": [({"training": True}, replace(x=constant_per_channel)),
                   ({"training": True, "affine": False}, replace(x=constant(2.0)))],
    "relu": [({"shape": (2, 3, 4, 5)}, replace(x=signed_zeros))],
    "leaky_relu": [({"shape": (2, 3, 4, 5), "negative_slope": 0.2}, replace(x=signed_zeros))],
    "sigmoid": [({"shape": (2, 3)}, replace(x=SATURATED))],
    "tanh": [({"shape": (2, 3)}, replace(x=SATURATED))],
    # ties for the max the shift subtracts, and a masked (-inf) entry
    "softmax": [({"shape": (2, 3)}, replace(x=[[1.0, 1.0, 1.0], [0.0, -np.inf, 0.0]]))],
    "log_softmax": [({"shape": (2, 3)}, replace(x=[[1.0, 1.0, 1.0], [0.0, -np.inf, 0.0]]))],
    "dropout": [({}, replace(x=zeros))],
    # a zero-initialized last layer: every logit tied, with and without smoothing
    "cross_entropy": [({}, replace(logits=zeros)),
                      ({"label_smoothing": 0.1, "extra_dims": (3,)}, replace(logits=zeros))],
    # the stable form's max(x, 0) and |x| both have a kink at 0; the loss has none
    "binary_cross_entropy_with_logits": [
        ({"shape": (2, 3)}, replace(logits=zeros, targets=[[0.0, 0.3, 1.0], [0.5, 1.0, 0.0]])),
        ({"shape": (2, 3), "reduction": "sum"},
         replace(logits=[[0.0, -0.0, 0.0], [-0.0, 0.0, -0.0]], targets=constant(0.25)))],
    "mse_loss": [({}, lambda inputs: {**inputs, "target": inputs["pred"].copy()})],
    # smooth activations: where a zero-initialized layer feeds them, and saturation
    "gelu": [({"shape": (2, 3)}, replace(x=zeros)),
             ({"shape": (2, 3), "approximate": "tanh"}, replace(x=SATURATED))],
    "silu": [({"shape": (2, 3)}, replace(x=SATURATED))],
    # elu's kink at 0 (both signs of zero), softplus at beta x == threshold, hardtanh at its
    # two bounds (the spaces' ``kinks=True`` configs place inputs exactly there)
    "elu": [({"shape": (2, 3), "alpha": 0.5},
             replace(x=[[0.0, -0.0, 1.0], [-1.0, 0.0, -30.0]]))],
    "softplus": [({"shape": (2, 3, 4), "kinks": True, "beta": 2.0, "threshold": 2.0}, replace())],
    "hardtanh": [({"shape": (2, 3, 4), "kinks": True}, replace()),
                 ({"shape": (2, 3, 4), "kinks": True, "min_val": 0.0, "max_val": 0.0},
                  replace())],
    # a constant row or group: zero variance, x - mean == 0
    "layer_norm": [({}, replace(x=constant(2.0)))],
    "group_norm": [({}, replace(x=zeros))],  # exact in torch too (its float32 variance of
    # a constant 2.0 rounds to a few 1e-7, which eps turns into 2e-5 of output)
    "dropout2d": [({}, replace(x=zeros))],
    # every class tied
    "nll_loss": [({}, replace(log_probs=zeros))],
    # |pred - target| == delta, where huber's two pieces meet
    "huber_loss": [({"kinks": True}, replace()),
                   ({"kinks": True, "delta": 2.0, "reduction": "none"}, replace())],
}
CASES = [(op, i) for op in sorted(KINKS) for i in range(len(KINKS[op]))]


def test_every_registered_op_has_kink_cases_and_documents_them():
    assert sorted(KINKS) == sorted(REGISTRY)
    for name, info in REGISTRY.items():
        assert "both paths" in " ".join(info.doc.lower().split()), (
            f"{name}'s docstring does not say which (sub)gradient both paths take")


def jitted_value_and_grads(case, vjp, ct):
    """The primary output and the input cotangents of ``ct``: one compiled program per path
    (a dozen eager ops compile one by one, 3x slower here)."""
    def run(*args):
        out, pullback = jax.vjp(lambda *a: C.primary(case.call(*a, vjp=vjp)), *args)
        return out, pullback(jnp.asarray(ct))
    return jax.jit(run)(*[jnp.asarray(a) for a in case.inputs.values()])


@pytest.mark.parametrize("op,index", CASES, ids=[f"{op}-{i}" for op, i in CASES])
def test_both_paths_take_torchs_subgradient_at_kinks(op, index, torch):
    config, transform = KINKS[op][index]
    case = C.build(op, config)
    case = case._replace(inputs=transform(case.inputs))
    assert C.is_valid(case), f"{op} rejects kink case {config}"
    ct = C.cotangent(case)
    out_torch, g_torch = C.torch_value_and_grads(case, torch, ct)
    for vjp in ("custom", "autodiff"):
        out, grads = jitted_value_and_grads(case, vjp, ct)
        what = f"{op} {config} vjp={vjp}"
        # infinities and nans in the same places, the finite rest within the kink tolerance
        assert_close(out, C.primary(out_torch), KINK, what=f"{what} forward", nonfinite="match")
        assert_close(grads, g_torch, KINK, what=f"{what} grads", nonfinite="match")
