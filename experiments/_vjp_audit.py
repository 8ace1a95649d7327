"""The measurements behind ``python -m experiments.compare_vjps``: one op case or one network,
its hand-written gradients against JAX autodiff, central finite differences and PyTorch, and
the jitted forward+backward time of both paths.

Everything is enumerated from the library: ops from ``fcn.functional.REGISTRY``, their
configurations from ``functional_cnn.testing`` (``edge_cases`` and ``grid``), networks from the
public functions of ``functional_cnn.models``. Nothing here keeps a list of its own.

Error metric (the same one the tests' ``assert_close`` uses, written as a ratio): for every
leaf, ``err = max|a - ref|`` and ``scale = max|ref|``; the leaf's relative error is
``err / (scale + floor)`` with ``floor = atol / rtol``, and the comparison passes when it is at
most ``rtol``, i.e. exactly when ``err <= atol + rtol * scale``. The floor keeps the ratio
meaningful where a gradient is zero up to rounding (a conv bias before BatchNorm, BatchNorm with
two values per channel, dropout with p=1). Finite differences are compared elementwise, as in
the tests: ``|exact_i - fd_i| / (|fd_i| + atol / rtol) <= rtol``.
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax import numpy as jnp

import functional_cnn as fcn
from functional_cnn import testing as T
from functional_cnn.functional import REGISTRY
from benchmarks._timing import calls, race


class Tol(NamedTuple):
    """``|a - ref| <= atol + rtol * max|ref|`` per leaf (elementwise for finite differences)."""

    rtol: float
    atol: float
    why: str

    @property
    def floor(self) -> float:
        return self.atol / self.rtol


# Never looser than the tests (tests/functional/test_all_ops.py); see docs/VJP_REPORT.md.
TOLERANCES = {
    "float32": {
        "autodiff": Tol(1e-5, 1e-5, "float32 eps is 6e-8; the two paths sum the same products in "
                                    "different orders, so sums of a few hundred terms differ by "
                                    "~1e-6 relative; 1e-5 leaves a margin of ~10 (as the tests)"),
        "torch": Tol(1e-4, 1e-5, "torch uses other kernels (oneDNN convolutions, its own "
                                 "reductions): more reordering than between the two JAX paths "
                                 "(as the tests)"),
        "network": Tol(1e-4, 1e-5, "a whole network chains ~10 ops and sums over the batch and "
                                   "28x28 positions: rounding differences compound through the "
                                   "chain rule (as experiments/demo_gradients.py)"),
    },
    "float64": {
        "autodiff": Tol(1e-10, 1e-12, "float64 eps is 1.1e-16: reordered sums differ by "
                                      "~1e-14 relative; 1e-10 leaves a margin of 1e4"),
        "torch": Tol(1e-9, 1e-12, "other kernels, same reasoning as float32, at float64 eps"),
        "network": Tol(1e-9, 1e-12, "rounding compounds through ~10 ops, at float64 eps"),
    },
    # Central differences f'(x) ~ (f(x+e) - f(x-e)) / 2e with e = 1e-6 in float64: truncation
    # error e^2 |f'''| / 6 ~ 1e-13, rounding error ~ 1e-16 |f| / e ~ 1e-10 |f|.
    "fd": Tol(1e-6, 1e-7, "float64, eps 1e-6: truncation eps^2 f'''/6 ~ 1e-13 and rounding "
                          "1e-16 |f| / eps ~ 1e-10 |f| (as the tests)"),
}
FD_EPS = 1e-6
FD_ENTRIES = 64


def fd_skip_reason(config: dict) -> str | None:
    """Why central differences say nothing about this configuration (None: they do)."""
    if config.get("zeros"):
        return "exact zeros: relu/leaky_relu kink, no derivative to estimate"
    if config.get("ties"):
        return "tied maxima: max_pool2d kink, the derivative is a convention"
    if config.get("kinks"):
        return "inputs exactly at a kink (hardtanh's bounds, softplus's threshold, huber's delta)"
    if config.get("scale", 1) > 100:
        return "logits of 1e4: a difference of 1e-6 is below their float64 resolution"
    return None


# ------------------------------------------------------------------------------------ configs

def op_names(kinds=("op", "loss")) -> list[str]:
    """Every registered op, then every loss, in registration order."""
    return [name for kind in kinds for name in fcn.functional.ops(kind)]


def networks() -> dict[str, Callable]:
    """The public network constructors of ``functional_cnn.models``."""
    models = fcn.models
    return {name: fn for name, fn in vars(models).items()
            if inspect.isfunction(fn) and fn.__module__ == models.__name__
            and not name.startswith("_")}


def _key(config: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in config.items()))


def configs(op: str, extra: int, dtype=np.float32) -> list[dict]:
    """The op's default config and edge cases, then ``extra`` valid grid configs beyond them."""
    chosen = T.edge_cases(op)
    seen = {_key(c) for c in chosen}
    added = 0
    if extra > 0:
        for config in T.grid(op)[len(chosen):]:
            if added >= extra:
                break
            if _key(config) in seen:
                continue
            if T.is_valid(T.build(op, config, dtype=dtype)):
                chosen.append(config)
                seen.add(_key(config))
                added += 1
    return chosen


def short_config(op: str, config: dict) -> str:
    """The config as its differences from the op's defaults (``default`` when none)."""
    defaults = T.SPACES[op].defaults
    parts = [f"{k}={v}" for k, v in config.items() if defaults.get(k, object()) != v]
    return ", ".join(parts) or "default"


def jsonable(value):
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return repr(value)  # "inf"/"nan": JSON has no such numbers
    return value


# ------------------------------------------------------------------------------------ metrics

def leaf_errors(actual, expected, tol: Tol) -> list[dict]:
    """Per leaf: max abs error, scale, relative error ``err / (scale + floor)``."""
    rows = []
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if a.shape != e.shape:
            rows.append(dict(abs=float("inf"), scale=float("nan"), rel=float("inf")))
            continue
        err = float(np.max(np.abs(a - e))) if e.size else 0.0
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        if not np.isfinite(err):
            err = float("inf")
        rows.append(dict(abs=err, scale=scale, rel=err / (scale + tol.floor)))
    return rows


def worst(rows: list[dict]) -> tuple[float, float]:
    return (max((r["abs"] for r in rows), default=0.0), max((r["rel"] for r in rows), default=0.0))


# ------------------------------------------------------------------------------------ timing

def time_pair(fns: dict, args, repeats: int) -> dict:
    """Median ms per call of each jitted (already compiled) function, in alternating rounds."""
    timing = race({n: calls(fn, *args) for n, fn in fns.items()}, repeats, target_s=1e-3)
    return {n: t["median_ms"] for n, t in timing.items()}


# ------------------------------------------------------------------------------------ op cases

def fwd_bwd(case: T.Case, vjp: str):
    """Jitted ``(ct, *inputs) -> (primary output, input cotangents)``: one forward+backward."""
    def run(ct, *args):
        out, pullback = jax.vjp(lambda *a: T.primary(case.call(*a, vjp=vjp)), *args)
        return out, pullback(ct)
    return jax.jit(run)


def fd_check(case: T.Case, eps=FD_EPS, max_entries=FD_ENTRIES, seed=0):
    """The custom rule's gradients at the positions ``testing.finite_difference_grads`` samples,
    beside its central-difference estimates there. Run under x64.
    Returns ``[(exact at positions, estimates)]`` per input."""
    ct = T.cotangent(case)
    args = [jnp.asarray(np.asarray(a, np.float64)) for a in case.inputs.values()]
    _, grads = fwd_bwd(case, "custom")(jnp.asarray(ct), *args)
    estimates = T.finite_difference_grads(case, eps, ct, max_entries, seed)
    return [(np.asarray(g, np.float64).reshape(-1)[flat], est)
            for g, (flat, est) in zip(grads, estimates)]


def fd_error(case64: T.Case, tol: Tol) -> tuple[float, float]:
    """``(max elementwise relative error, max abs error)`` of the custom rule against central
    differences, float64; call under ``jax.enable_x64(True)``."""
    rel, absolute = 0.0, 0.0
    for exact, estimates in fd_check(case64):
        diff = np.abs(exact - estimates)
        if diff.size:
            absolute = max(absolute, float(np.max(diff)))
            rel = max(rel, float(np.max(diff / (np.abs(estimates) + tol.floor))))
    return rel, absolute


class Result(dict):
    """One table row / JSON record."""


def audit_case(op: str, config: dict, dtype: str, repeats: int, torch=None, fd: bool = True,
               seed: int = 0) -> Result:
    tols = TOLERANCES[dtype]
    np_dtype = np.dtype(dtype)
    case = T.build(op, config, seed=seed, dtype=np_dtype)
    ct = T.cotangent(case)
    args = [jnp.asarray(a) for a in case.inputs.values()]
    ct_dev = jnp.asarray(ct)
    fns = {vjp: fwd_bwd(case, vjp) for vjp in ("custom", "autodiff")}
    (out_c, g_c), (out_a, g_a) = (fns[v](ct_dev, *args) for v in ("custom", "autodiff"))
    grad_rows = leaf_errors(g_c, g_a, tols["autodiff"])
    fwd_rows = leaf_errors(out_c, out_a, tols["autodiff"])
    abs_err, rel_err = worst(grad_rows)
    failures = []
    if rel_err > tols["autodiff"].rtol or not np.isfinite(rel_err):
        failures.append("custom vs autodiff")
    if worst(fwd_rows)[1] > tols["autodiff"].rtol:
        failures.append("forward: custom path vs autodiff path")

    torch_err = None
    if torch is not None and case.torch_call is not None:
        _, g_t = T.torch_value_and_grads(case, torch, ct)
        torch_err = worst(leaf_errors(g_c, g_t, tols["torch"]))[1]
        if torch_err > tols["torch"].rtol or not np.isfinite(torch_err):
            failures.append("custom vs torch")

    fd_err, fd_abs, fd_note = None, None, fd_skip_reason(config)
    if not fd:
        fd_note = "finite differences disabled (--no-fd)"
    elif fd_note is None:
        with jax.enable_x64(True):
            case64 = T.build(op, config, seed=seed, dtype=np.float64)
            fd_err, fd_abs = fd_error(case64, TOLERANCES["fd"])
        if fd_err > TOLERANCES["fd"].rtol or not np.isfinite(fd_err):
            failures.append("custom vs finite differences")

    ms = time_pair(fns, [ct_dev] + args, repeats) if repeats > 0 else {}
    custom_ms, autodiff_ms = ms.get("custom"), ms.get("autodiff")
    return Result(
        kind=REGISTRY[op].kind, op=op, config=jsonable(config), short=short_config(op, config),
        dtype=dtype, max_abs_err=abs_err, max_rel_err=rel_err,
        leaves=[dict(name=name, **row) for name, row in zip(case.inputs, grad_rows)],
        fd_err=fd_err, fd_abs_err=fd_abs, fd_note=fd_note, torch_err=torch_err,
        custom_ms=custom_ms, autodiff_ms=autodiff_ms,
        ratio=(autodiff_ms / custom_ms) if ms else None,
        passed=not failures, failures=failures)


def error_result(op: str, config: dict, dtype: str, exc: BaseException,
                 kind: str | None = None) -> Result:
    """A case that raised: reported as a failure, never silently dropped."""
    kind = kind or (REGISTRY[op].kind if op in REGISTRY else "op")
    short = short_config(op, config) if op in T.SPACES else "network"
    return Result(kind=kind, op=op, config=jsonable(config), short=short, dtype=dtype,
                  max_abs_err=None, max_rel_err=None, leaves=[], fd_err=None, fd_abs_err=None,
                  fd_note=None, torch_err=None, custom_ms=None, autodiff_ms=None, ratio=None,
                  passed=False, failures=[f"raised {type(exc).__name__}: {exc}"])


# ------------------------------------------------------------------------------------ networks

def audit_network(name: str, dtype: str, repeats: int, batch: int = 16, seed: int = 0) -> Result:
    """Per-parameter-leaf gradients of the mean cross-entropy, custom vs autodiff, and the
    jitted training-step (forward + backward) time of each."""
    tol = TOLERANCES[dtype]["network"]
    net = networks()[name]()
    init_key, x_key = jax.random.split(jax.random.key(seed))
    _, params, state = net.init(init_key, (batch, 1, 28, 28))
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    state = jax.tree.map(lambda s: jnp.asarray(s, dtype), state)
    x = jax.random.normal(x_key, (batch, 1, 28, 28), dtype)
    y = jnp.arange(batch) % 10

    def step(vjp):
        def loss(p, x, y):
            logits, new_state = net.apply(p, state, x, train=True, vjp=vjp)
            return fcn.cross_entropy(logits, y, vjp=vjp), new_state
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    fns = {vjp: step(vjp) for vjp in ("custom", "autodiff")}
    (_, g_c), (_, g_a) = (fns[v](params, x, y) for v in ("custom", "autodiff"))
    rows = leaf_errors(g_c, g_a, tol)
    names = list(fcn.named_leaves(g_c))
    abs_err, rel_err = worst(rows)
    failures = [] if rel_err <= tol.rtol else ["custom vs autodiff"]
    # A step is ~1 ms, so three times the rounds cost little and tame the noise.
    ms = time_pair(fns, (params, x, y), 3 * repeats) if repeats > 0 else {}
    return Result(
        kind="network", op=name, config={"batch": batch, "loss": "cross_entropy(mean)"},
        short=f"batch={batch}, train, mean cross-entropy", dtype=dtype,
        max_abs_err=abs_err, max_rel_err=rel_err,
        leaves=[dict(name=n, **r) for n, r in zip(names, rows)],
        fd_err=None, fd_abs_err=None, fd_note="not run for whole networks", torch_err=None,
        custom_ms=ms.get("custom"), autodiff_ms=ms.get("autodiff"),
        ratio=(ms["autodiff"] / ms["custom"]) if ms else None,
        passed=not failures, failures=failures)
