"""Every registered op, across its hyperparameter space (``functional_cnn.audit.cases``):
the hand-written VJP against JAX autodiff of the same forward, and forward and backward
against PyTorch with the same inputs; in float64, against central finite differences."""
import jax
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from functional_cnn.audit import cases as C
from functional_cnn.functional import REGISTRY
from functional_cnn.verify import EXACT, assert_close, fd_skip_reason, tolerance
from tests.conftest import float64

OPS = sorted(REGISTRY)
EDGE_CASES = [(op, i, cfg) for op in OPS for i, cfg in enumerate(C.edge_cases(op))]


def configs(op):
    space = C.space(op)
    return st.fixed_dictionaries({k: st.sampled_from(v) for k, v in space.hyper.items()})


def check_against_autodiff_and_torch(case, torch):
    ct = C.cotangent(case)
    out_custom, g_custom = C.value_and_grads(case, "custom", ct, jit=True)
    out_auto, g_auto = C.value_and_grads(case, "autodiff", ct, jit=True)
    op = case.op
    assert_close(out_custom, out_auto, EXACT, what=f"{op} forward, custom vs autodiff path")
    assert_close(g_custom, g_auto, tolerance("autodiff"), what=f"{op} grads, custom vs autodiff")
    out_torch, g_torch = C.torch_value_and_grads(case, torch, ct)
    assert_close(out_custom, out_torch, tolerance("torch_forward"), what=f"{op} forward vs torch")
    assert_close(g_custom, g_torch, tolerance("torch"), what=f"{op} grads vs torch")


@pytest.mark.parametrize("op", OPS)
def test_hypothesis_space(op, torch):
    @given(config=configs(op), seed=st.integers(0, 2**16))
    def run(config, seed):
        case = C.build(op, config, seed)
        assume(C.is_valid(case))
        check_against_autodiff_and_torch(case, torch)

    run()


@pytest.mark.parametrize("op,index,config", EDGE_CASES,
                         ids=[f"{op}-{i}" for op, i, _ in EDGE_CASES])
def test_edge_cases(op, index, config, torch):
    case = C.build(op, config)
    assert C.is_valid(case), f"edge case {config} is rejected by {op}"
    check_against_autodiff_and_torch(case, torch)


@pytest.mark.parametrize("op", OPS)
def test_float64_finite_differences(op):
    with float64():
        for config in C.edge_cases(op)[:2]:
            case = C.build(op, config, dtype=np.float64)
            if fd_skip_reason(config):  # kinks, ties, 1e4-sized logits: nothing to estimate
                continue
            ct = C.cotangent(case)
            _, grads = C.value_and_grads(case, "custom", ct, jit=True)
            assert all(g.dtype == np.float64 for g in grads)
            for grad, (positions, estimates) in zip(grads, C.finite_difference_grads(case, ct=ct)):
                exact = np.asarray(grad).reshape(-1)[positions]
                assert_close(exact, estimates, tolerance("fd"), what=f"{op} {config}",
                             elementwise=True)


def test_custom_path_really_runs_the_hand_written_rule():
    # A jaxpr with vjp="custom" contains custom_vjp calls; the autodiff path has none.
    case = C.build("conv2d")
    args = [jax.numpy.asarray(a) for a in case.inputs.values()]
    custom = str(jax.make_jaxpr(lambda *a: case.call(*a, vjp="custom"))(*args))
    auto = str(jax.make_jaxpr(lambda *a: case.call(*a, vjp="autodiff"))(*args))
    assert "custom_vjp_call" in custom and "custom_vjp_call" not in auto


def test_every_op_documents_its_rule():
    for name, info in REGISTRY.items():
        assert "Backward rule" in info.doc, f"{name}'s docstring does not state its rule"


def _hvp(case, vjp, ct, v):
    """Reverse over reverse: d/dinputs <grad sum(primary(out) ct), v>, through the op's rule."""
    args = [jax.numpy.asarray(a) for a in case.inputs.values()]
    argnums = tuple(range(len(args)))

    def inner(*a):
        grads = jax.grad(lambda *b: (C.primary(case.call(*b, vjp=vjp)) * ct).sum(), argnums)(*a)
        return sum((g * w).sum() for g, w in zip(grads, v))

    return jax.jit(jax.grad(inner, argnums))(*args)


def _torch_hvp(case, torch, ct, v):
    tensors = [torch.tensor(np.array(a), requires_grad=True) for a in case.inputs.values()]
    out = C.primary(case.torch_call(torch, *tensors))
    if not out.requires_grad:
        return [np.zeros_like(np.array(a)) for a in case.inputs.values()]
    grads = torch.autograd.grad((out * torch.as_tensor(ct)).sum(), tensors, create_graph=True,
                                allow_unused=True)
    inner = sum((g * torch.as_tensor(w)).sum() for g, w in zip(grads, v) if g is not None)
    if not getattr(inner, "requires_grad", False):  # the op is linear in every input
        return [np.zeros_like(np.array(a)) for a in case.inputs.values()]
    hv = torch.autograd.grad(inner, tensors, allow_unused=True)
    return [np.zeros_like(np.array(a)) if h is None else h.detach().numpy()
            for h, a in zip(hv, case.inputs.values())]


@pytest.mark.parametrize("op", OPS)
def test_second_order_through_the_rule_matches_autodiff_and_torch(op, torch):
    # Rules are written in differentiable primitives, so differentiating them again (Hessian-
    # vector products) must agree with autodiff of the forward and with torch's double backward.
    with float64():
        case = C.build(op, dtype=np.float64)
        ct = C.cotangent(case)
        rng = np.random.default_rng(3)
        v = [rng.standard_normal(np.shape(a)) for a in case.inputs.values()]
        custom, auto = _hvp(case, "custom", ct, v), _hvp(case, "autodiff", ct, v)
        assert_close(custom, auto, 1e-9, 1e-12, f"{op} HVP, custom vs autodiff")
        assert_close(custom, _torch_hvp(case, torch, ct, v), 1e-8, 1e-12, f"{op} HVP vs torch")
