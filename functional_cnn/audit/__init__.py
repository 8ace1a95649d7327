"""Compare hand-written VJPs with JAX autodiff, float64 finite differences and PyTorch.

From Python, on your own op or network::

    from functional_cnn import audit
    records = audit.check_op(my_op, x, w)          # my_op(*inputs, vjp="custom"|"autodiff")
    records = audit.check_network(net, (-1, 1, 28, 28))

Each returns a list of :class:`~functional_cnn.audit.core.Record` and raises
:class:`AuditFailure` (an ``AssertionError``) when a comparison is over its tolerance
(``functional_cnn.verify.TOLERANCES``); pass ``strict=False`` to get the records flagged
(``record.passed``, ``record.failures``) instead. From the shell, over every registered op and
the article networks::

    python -m functional_cnn.audit [--ops conv2d,lenet] [--dtype float64] [--json PATH]
                                   [--report docs/VJP_REPORT.md] [--chart PATH]

Torch is optional and imported only when a comparison against it is asked for.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Sequence

import jax
import numpy as np

from . import cases
from .cases import Case
from .core import (Record, audit_built, audit_case, audit_model, audit_network, configs,
                   error_record, short_config)

__all__ = ["AuditFailure", "Record", "check_op", "check_network", "audit_registry", "cases",
           "load_torch"]


class AuditFailure(AssertionError):
    """Some comparison was over its tolerance; ``records`` holds every audited case."""

    def __init__(self, records: Sequence[Record]):
        self.records = list(records)
        failed = [f"{r.op} [{r.short}]: {'; '.join(r.failures)}"
                  for r in self.records if not r.passed]
        super().__init__("audit failed:\n  " + "\n  ".join(failed))


def load_torch(wanted: bool = True):
    """The ``torch`` module (one thread, as the tests), or None if unwanted or not installed."""
    if not wanted:
        return None
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    return torch


def _settle(records: list[Record], strict: bool) -> list[Record]:
    if strict and not all(r.passed for r in records):
        raise AuditFailure(records)
    return records


def _user_case(fn: Callable, inputs, torch_fn) -> Case:
    names = [f"arg{i}" for i in range(len(inputs))]
    return Case(getattr(fn, "__name__", "op"), {}, dict(zip(names, map(np.asarray, inputs))),
                lambda *a, vjp="custom": fn(*a, vjp=vjp), torch_fn)


def check_op(fn: Callable, *inputs, torch_fn: Callable | None = None, fd: bool = True,
             repeats: int = 0, strict: bool = True) -> list[Record]:
    """Audit ``fn(*inputs, vjp=...)`` at these inputs: its ``vjp="custom"`` gradients of
    ``sum(primary(output) * ct)`` (a fixed random cotangent) against ``vjp="autodiff"``, the
    forward of both paths, float64 central differences (the inputs cast to float64; ``fd=False``
    to skip, e.g. at a kink), and ``torch_fn(torch, *tensors)`` when given and torch imports.
    ``repeats > 0`` also times both paths. Tolerances follow the inputs' dtype."""
    case = _user_case(fn, inputs, torch_fn)
    dtype = np.result_type(*case.inputs.values()).name
    case64 = (lambda: case._replace(inputs={k: v.astype(np.float64)
                                            for k, v in case.inputs.items()}))
    torch = load_torch(torch_fn is not None)
    record = audit_built(case, dtype, repeats, torch, fd, case64, short="given inputs")
    return _settle([record], strict)


def check_network(net, input_shape, *, dtype: str = "float32", repeats: int = 0, seed: int = 0,
                  name: str | None = None, strict: bool = True) -> list[Record]:
    """Audit a ``Layer`` network: gradients of the mean cross-entropy of a training-mode forward
    (labels ``arange(N) % classes``, random input of ``input_shape``, ``-1`` a batch of 16)
    over every parameter leaf, custom rules against autodiff; ``repeats > 0`` times a step."""
    name = name or getattr(net, "name", "network")
    x64 = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    with x64:
        record = audit_network(net, input_shape, dtype, repeats, seed, name)
    return _settle([record], strict)


def _plan(ops, grid, dtype, progress):
    plan = []
    for op in ops:
        progress(f"configs {op}")
        plan += [(op, c) for c in configs(op, grid, np.dtype(dtype))]
    return plan


def audit_registry(ops: Sequence[str], nets: Sequence[str], dtype: str = "float32",
                   repeats: int = 9, grid: int = 2, seed: int = 0, fd: bool = True, torch=None,
                   progress: Callable[[str], None] = lambda _: None) -> list[Record]:
    """Every config of the registered ``ops`` (default, edge cases, ``grid`` more) and the
    article networks ``nets``; a case that raises is a failed record, never dropped."""
    records = []
    x64 = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    with x64, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "same"-padding notice
        for op, config in _plan(ops, grid, dtype, progress):
            progress(f"{op} [{short_config(op, config)}]")
            try:
                records.append(audit_case(op, config, dtype, repeats, torch, fd, seed))
            except Exception as exc:  # a case that raises is a failure, and reported
                records.append(error_record(op, config, dtype, exc))
        for name in nets:
            progress(f"network {name}")
            try:
                records.append(audit_model(name, dtype, repeats, seed=seed))
            except Exception as exc:
                records.append(error_record(name, {}, dtype, exc, kind="network"))
    return records
