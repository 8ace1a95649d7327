"""The VJP audit tool (experiments.compare_vjps): it enumerates the registry, reports the keys it
promises, and fails (exit 1) when a hand-written rule is wrong."""
import json

import numpy as np
import pytest
from jax import numpy as jnp

from experiments import _vjp_audit as A
from experiments import compare_vjps
from functional_cnn import testing as T
from functional_cnn.functional import _registry
from functional_cnn.functional._registry import OpInfo, two_gradients

KEYS = {"op", "config", "max_abs_err", "max_rel_err", "fd_err", "torch_err", "custom_ms",
        "autodiff_ms"}
FAST = ["--repeats", "1", "--grid", "0", "--report", "none"]


def _square_forward(_, x):
    return x * x


def _square_fwd(_, x):
    return x * x, x


def _wrong_bwd(_, x, g):
    return (g * x,)  # the derivative of x^2 is 2x: this rule is off by a factor of 2


def _right_bwd(_, x, g):
    return (2 * g * x,)


def _register(monkeypatch, name, bwd):
    """Register a throwaway op ``name`` (y = x^2 with rule ``bwd``) and its OpSpace."""
    op = two_gradients(_square_forward, _square_fwd, bwd)

    def public(x, *, vjp="custom"):
        """``x^2``. Backward rule: ``dx = 2 g x`` (deliberately wrong in one test)."""
        return op(vjp, None, x)

    public.__name__ = name

    def build(rng, c, dtype):
        x = rng.standard_normal(tuple(c["shape"])).astype(dtype)
        return T.Case(name, c, {"x": x}, lambda x, vjp="custom": public(x, vjp=vjp),
                      lambda torch, x: x * x)

    monkeypatch.setitem(_registry.REGISTRY, name, OpInfo(name, public, "op", __name__))
    monkeypatch.setitem(T.SPACES, name, T.OpSpace(dict(shape=((3, 4), (5,))), build))


def _records(path):
    with open(path) as f:
        return json.load(f)


def test_ops_come_from_the_registry(monkeypatch):
    assert A.op_names() == list(_registry.ops("op")) + list(_registry.ops("loss"))
    _register(monkeypatch, "square_for_listing", _right_bwd)
    assert "square_for_listing" in A.op_names()
    assert set(A.networks()) >= {"mytorch_net", "lenet", "mlp"}


def test_configs_are_the_edge_cases_then_distinct_valid_grid_points():
    for op in A.op_names():
        edges = T.edge_cases(op)
        assert A.configs(op, 0) == edges
        configs = A.configs(op, 2)
        assert configs[:len(edges)] == edges and len(configs) == len(edges) + 2, op
        assert len({A._key(c) for c in configs}) == len(configs), op
        assert all(T.is_valid(T.build(op, c)) for c in configs[len(edges):]), op


def test_a_wrong_rule_is_reported_and_exits_1(monkeypatch, tmp_path, capsys):
    _register(monkeypatch, "square_wrong", _wrong_bwd)
    out = tmp_path / "audit.json"
    code = compare_vjps.main(["--ops", "square_wrong", "--json", str(out)] + FAST
                             + ["--grid", "1"])  # the default config and one from the grid
    assert code == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and "square_wrong" in text
    records = _records(out)
    assert len(records) == 2 and all(r["op"] == "square_wrong" for r in records)
    for r in records:
        assert KEYS <= set(r)
        assert not r["passed"]
        assert "custom vs autodiff" in r["failures"]
        assert "custom vs finite differences" in r["failures"]  # caught in float64 too
        if r["torch_err"] is not None:  # torch is importable
            assert "custom vs torch" in r["failures"]
        assert r["max_rel_err"] > 0.1 and r["fd_err"] > 0.1


def test_a_right_rule_passes_with_every_key(monkeypatch, tmp_path):
    _register(monkeypatch, "square_right", _right_bwd)
    out = tmp_path / "audit.json"
    assert compare_vjps.main(["--ops", "square_right", "--json", str(out)] + FAST) == 0
    for r in _records(out):
        assert KEYS <= set(r) and r["passed"]
        assert r["max_rel_err"] < 1e-6 and r["fd_err"] < 1e-6
        assert r["custom_ms"] > 0 and r["autodiff_ms"] > 0


def test_real_op_with_kinks_reports_nulls_and_float64(tmp_path):
    out = tmp_path / "audit.json"
    code = compare_vjps.main(["--ops", "relu", "--dtype", "float64", "--json", str(out),
                              "--no-torch"] + FAST)
    assert code == 0
    records = _records(out)
    assert [r["config"]["zeros"] for r in records] == [False, True]
    kink = records[1]
    assert kink["fd_err"] is None and "kink" in kink["fd_note"]
    assert all(r["torch_err"] is None and r["dtype"] == "float64" for r in records)


def test_network_records_every_parameter_leaf(tmp_path):
    out = tmp_path / "audit.json"
    code = compare_vjps.main(["--ops", "mlp", "--json", str(out), "--repeats", "0",
                              "--report", "none"])
    assert code == 0
    (record,) = _records(out)
    assert record["kind"] == "network" and KEYS <= set(record)
    assert [leaf["name"] for leaf in record["leaves"]][:2] == ["1.bias", "1.weight"]
    assert record["custom_ms"] is None and record["fd_err"] is None


def test_relative_error_has_an_absolute_floor():
    tol = A.Tol(1e-5, 1e-5)
    rows = A.leaf_errors([np.full(3, 2e-8)], [np.full(3, 1e-8)], tol)
    assert rows[0]["rel"] <= tol.rtol  # zero up to rounding on both sides: no false alarm
    rows = A.leaf_errors([jnp.ones(3) * 2.0], [jnp.ones(3)], tol)
    assert rows[0]["rel"] > 0.4  # a factor of 2 at scale 1 is a failure


def test_unknown_op_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        compare_vjps.main(["--ops", "no_such_op"])
    assert exc.value.code == 2
