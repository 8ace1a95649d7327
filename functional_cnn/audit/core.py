"""The measurements of the audit: one op case or one network, its hand-written gradients against
JAX autodiff, float64 central finite differences and PyTorch, and the jitted forward+backward
time of both paths, as one :class:`Record`.

Everything is enumerated from the library: ops from ``fcn.functional.REGISTRY``, their
configurations from each op's space (``cases.edge_cases`` and ``cases.grid``), networks from the
public functions of ``functional_cnn.models``. Nothing here keeps a list of its own, and every
tolerance, the error metric and the finite-difference skip rule are ``functional_cnn.verify``'s.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import jax
import numpy as np
from jax import numpy as jnp

from .. import verify
from ..functional import REGISTRY
from . import cases as C
from .timing import calls, race


@dataclasses.dataclass
class Record:
    """One audited case (an op at one config, or a whole network): one table row, one JSON
    record. Errors are ``None`` where a comparison was not run (its reason in ``fd_note``)."""

    kind: str  # "op", "loss" or "network"
    op: str
    config: dict
    short: str  # the config as its differences from the op's defaults
    dtype: str
    max_abs_err: float | None = None  # custom vs autodiff, every gradient leaf
    max_rel_err: float | None = None
    leaves: list = dataclasses.field(default_factory=list)  # per gradient leaf: name, abs, ...
    fd_err: float | None = None  # custom vs float64 central differences, elementwise
    fd_abs_err: float | None = None
    fd_note: str | None = None  # why there is no fd_err
    torch_err: float | None = None
    custom_ms: float | None = None  # jitted forward+backward, median of the timing rounds
    autodiff_ms: float | None = None
    ratio: float | None = None  # autodiff_ms / custom_ms: above 1 the rule is faster
    failures: list = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict:
        return {**jsonable(dataclasses.asdict(self)), "passed": self.passed}


# ------------------------------------------------------------------------------------ configs

def op_names(kinds=("op", "loss")) -> list[str]:
    """Every registered op, then every loss, in registration order."""
    import functional_cnn as fcn
    return [name for kind in kinds for name in fcn.functional.ops(kind)]


def networks() -> dict[str, Callable]:
    """The public network constructors of ``functional_cnn.models``."""
    from .. import models
    return {name: fn for name, fn in vars(models).items()
            if inspect.isfunction(fn) and fn.__module__ == models.__name__
            and not name.startswith("_")}


def _key(config: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in config.items()))


def configs(op: str, extra: int, dtype=np.float32) -> list[dict]:
    """The op's default config and edge cases, then ``extra`` valid grid configs beyond them."""
    chosen = C.edge_cases(op)
    seen, wanted = {_key(c) for c in chosen}, len(chosen) + extra
    for config in C.grid(op)[len(chosen):] if extra > 0 else ():  # the product is large
        if len(chosen) >= wanted:
            break
        if _key(config) not in seen and C.is_valid(C.build(op, config, dtype=dtype)):
            chosen.append(config)
            seen.add(_key(config))
    return chosen


def short_config(op: str, config: dict) -> str:
    """The config as its differences from the op's defaults (``default`` when none)."""
    defaults = C.space(op).defaults if op in REGISTRY else {}
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


def leaf_rows(names, actual, expected, tol: verify.Tol) -> list[dict]:
    """Per gradient leaf: its name, max abs error, scale and relative error (as ``tol``)."""
    return [dict(name=n, abs=r.abs, scale=r.scale, rel=tol.relative(r.abs, r.scale))
            for n, r in zip(names, verify.leaf_errors(actual, expected))]


def _over(value, tol: verify.Tol) -> bool:
    return not value <= tol.rtol  # nan counts as over


# ------------------------------------------------------------------------------------ timing

def time_pair(fns: dict, args, repeats: int) -> dict:
    """Median ms per call of each jitted (already compiled) function, in alternating rounds."""
    if repeats <= 0:
        return {}
    timing = race({n: calls(fn, *args) for n, fn in fns.items()}, repeats, target_s=1e-3)
    return {n: t["median_ms"] for n, t in timing.items()}


def _timed(ms: dict) -> dict:
    return dict(custom_ms=ms.get("custom"), autodiff_ms=ms.get("autodiff"),
                ratio=(ms["autodiff"] / ms["custom"]) if ms else None)


# ------------------------------------------------------------------------------------ op cases

def fwd_bwd(case: C.Case, vjp: str):
    """Jitted ``(ct, *inputs) -> (primary output, input cotangents)``: one forward+backward."""
    def run(ct, *args):
        out, pullback = jax.vjp(lambda *a: C.primary(case.call(*a, vjp=vjp)), *args)
        return out, pullback(ct)
    return jax.jit(run)


def fd_check(case: C.Case, eps=verify.FD_EPS, max_entries=verify.FD_ENTRIES, seed=0):
    """The custom rule's gradients at the positions ``cases.finite_difference_grads`` samples,
    beside its central-difference estimates there. Run under x64.
    Returns ``[(exact at positions, estimates)]`` per input."""
    ct = C.cotangent(case)
    args = [jnp.asarray(np.asarray(a, np.float64)) for a in case.inputs.values()]
    _, grads = fwd_bwd(case, "custom")(jnp.asarray(ct), *args)
    estimates = C.finite_difference_grads(case, eps, ct, max_entries, seed)
    return [(np.asarray(g, np.float64).reshape(-1)[flat], est)
            for g, (flat, est) in zip(grads, estimates)]


def fd_error(case64: C.Case) -> tuple[float, float]:
    """``(max elementwise relative error, max abs error)`` of the custom rule against central
    differences, float64 (``case64`` is built in float64; x64 is switched on here)."""
    rel, absolute = 0.0, 0.0
    with jax.enable_x64(True):
        for exact, estimates in fd_check(case64):
            a, r = verify.elementwise_errors(exact, estimates, verify.tolerance("fd"))
            absolute, rel = max(absolute, a), max(rel, r)
    return rel, absolute


def _torch_error(case, torch, ct, g_custom, tol) -> float | None:
    if torch is None or case.torch_call is None:
        return None
    _, g_t = C.torch_value_and_grads(case, torch, ct)
    return verify.worst(verify.leaf_errors(g_custom, g_t), tol)[1]


def _fd_part(case64_fn, config: dict, fd: bool) -> dict:
    note = verify.fd_skip_reason(config) if fd else "finite differences disabled (--no-fd)"
    if note is not None or case64_fn is None:
        return dict(fd_note=note or "no float64 case")
    with jax.enable_x64(True):
        case64 = case64_fn()
    fd_err, fd_abs = fd_error(case64)
    return dict(fd_err=fd_err, fd_abs_err=fd_abs)


def audit_built(case: C.Case, dtype: str, repeats: int, torch=None, fd: bool = True,
                case64_fn: Callable | None = None, kind: str = "op", short: str = "") -> Record:
    """Audit one built case: its custom rule against autodiff (gradients and forward), torch
    (when ``torch`` is given and the case has a torch twin) and, with ``case64_fn`` building
    the same case in float64, central finite differences."""
    tol = verify.tolerance("autodiff", dtype)
    ct = C.cotangent(case)
    args, ct_dev = [jnp.asarray(a) for a in case.inputs.values()], jnp.asarray(ct)
    fns = {vjp: fwd_bwd(case, vjp) for vjp in ("custom", "autodiff")}
    (out_c, g_c), (out_a, g_a) = (fns[v](ct_dev, *args) for v in ("custom", "autodiff"))
    rows = leaf_rows(case.inputs, g_c, g_a, tol)
    abs_err, rel_err = verify.worst(verify.leaf_errors(g_c, g_a), tol)
    failures = ["custom vs autodiff"] if _over(rel_err, tol) else []
    if _over(verify.worst(verify.leaf_errors(out_c, out_a), tol)[1], tol):
        failures.append("forward: custom path vs autodiff path")
    torch_err = _torch_error(case, torch, ct, g_c, verify.tolerance("torch", dtype))
    if torch_err is not None and _over(torch_err, verify.tolerance("torch", dtype)):
        failures.append("custom vs torch")
    fd_part = _fd_part(case64_fn, case.config, fd)
    if "fd_err" in fd_part and _over(fd_part["fd_err"], verify.tolerance("fd")):
        failures.append("custom vs finite differences")
    return Record(kind=kind, op=case.op, config=jsonable(case.config), short=short or "default",
                  dtype=dtype, max_abs_err=abs_err, max_rel_err=rel_err, leaves=rows,
                  torch_err=torch_err, failures=failures, **fd_part,
                  **_timed(time_pair(fns, [ct_dev] + args, repeats)))


def audit_case(op: str, config: dict, dtype: str, repeats: int, torch=None, fd: bool = True,
               seed: int = 0) -> Record:
    """Audit the registered ``op`` at ``config`` (over its space's defaults)."""
    case = C.build(op, config, seed=seed, dtype=np.dtype(dtype))
    return audit_built(case, dtype, repeats, torch, fd,
                       lambda: C.build(op, config, seed=seed, dtype=np.float64),
                       kind=REGISTRY[op].kind, short=short_config(op, config))


def error_record(op: str, config: dict, dtype: str, exc: BaseException,
                 kind: str | None = None) -> Record:
    """A case that raised: reported as a failure, never silently dropped."""
    kind = kind or (REGISTRY[op].kind if op in REGISTRY else "op")
    short = short_config(op, config) if kind != "network" else "network"
    return Record(kind=kind, op=op, config=jsonable(config), short=short, dtype=dtype,
                  failures=[f"raised {type(exc).__name__}: {exc}"])


# ------------------------------------------------------------------------------------ networks

def _network_inputs(net, input_shape, dtype, seed):
    """Parameters, state, a random input and labels ``arange(N) % classes`` for ``net``."""
    init_key, x_key = jax.random.split(jax.random.key(seed))
    shape = tuple(16 if d == -1 else d for d in input_shape)  # -1: a batch of 16
    out_shape, params, state = net.init(init_key, shape)
    cast = (lambda t: jax.tree.map(lambda p: jnp.asarray(p, dtype), t))
    x = jax.random.normal(x_key, shape, dtype)
    return cast(params), cast(state), x, jnp.arange(shape[0]) % out_shape[-1]


def audit_network(net, input_shape, dtype: str = "float32", repeats: int = 0, seed: int = 0,
                  name: str = "network") -> Record:
    """Per-parameter-leaf gradients of the mean cross-entropy of a training-mode forward,
    custom vs autodiff, and the jitted training-step (forward + backward) time of each."""
    from .. import interop
    from ..functional import cross_entropy
    tol = verify.tolerance("network", dtype)
    params, state, x, y = _network_inputs(net, input_shape, dtype, seed)

    def step(vjp):
        def loss(p, x, y):
            logits, new_state = net.apply(p, state, x, train=True, vjp=vjp)
            return cross_entropy(logits, y, vjp=vjp), new_state
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    fns = {vjp: step(vjp) for vjp in ("custom", "autodiff")}
    (_, g_c), (_, g_a) = (fns[v](params, x, y) for v in ("custom", "autodiff"))
    abs_err, rel_err = verify.worst(verify.leaf_errors(g_c, g_a), tol)
    # A step is ~1 ms, so three times the rounds cost little and tame the noise.
    return Record(
        kind="network", op=name, config={"batch": int(x.shape[0]), "loss": "cross_entropy(mean)"},
        short=f"batch={x.shape[0]}, train, mean cross-entropy", dtype=dtype,
        max_abs_err=abs_err, max_rel_err=rel_err,
        leaves=leaf_rows(list(interop.named_leaves(g_c)), g_c, g_a, tol),
        fd_note="not run for whole networks",
        failures=["custom vs autodiff"] if _over(rel_err, tol) else [],
        **_timed(time_pair(fns, (params, x, y), 3 * repeats)))


def audit_model(name: str, dtype: str, repeats: int, batch: int = 16, seed: int = 0) -> Record:
    """``audit_network`` of the article network ``models.<name>()`` on MNIST-shaped input."""
    return audit_network(networks()[name](), (batch, 1, 28, 28), dtype, repeats, seed, name)
