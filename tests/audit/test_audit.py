"""The VJP audit (python -m functional_cnn.audit, audit.check_op, audit.check_network): it
enumerates the registry, reports the keys it promises, and fails (exit 1, AuditFailure) when a
hand-written rule is wrong."""
import json
import pathlib

import numpy as np
import pytest
from jax import numpy as jnp

import functional_cnn as fcn
from functional_cnn import audit
from functional_cnn.audit import __main__ as cli
from functional_cnn.audit import cases as C
from functional_cnn.audit import core as A
from functional_cnn.audit.report import rule_text
from functional_cnn.verify import Tol
from functional_cnn.functional import _registry
from functional_cnn.functional._registry import OpInfo, two_gradients

KEYS = {"op", "config", "max_abs_err", "max_rel_err", "fd_err", "torch_err", "custom_ms",
        "autodiff_ms"}
FAST = ["--repeats", "1", "--grid", "0"]


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
        return C.Case(name, c, {"x": x}, lambda x, vjp="custom": public(x, vjp=vjp),
                      lambda torch, x: x * x)

    monkeypatch.setitem(_registry.REGISTRY, name, OpInfo(name, public, "op", __name__))
    monkeypatch.setitem(C.SPACES, name, C.OpSpace(dict(shape=((3, 4), (5,))), build))


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
        edges = C.edge_cases(op)
        assert A.configs(op, 0) == edges
        configs = A.configs(op, 2)
        assert configs[:len(edges)] == edges and len(configs) == len(edges) + 2, op
        assert len({A._key(c) for c in configs}) == len(configs), op
        assert all(C.is_valid(C.build(op, c)) for c in configs[len(edges):]), op


def test_a_wrong_rule_is_reported_and_exits_1(monkeypatch, tmp_path, capsys):
    _register(monkeypatch, "square_wrong", _wrong_bwd)
    out = tmp_path / "audit.json"
    code = cli.main(["--ops", "square_wrong", "--json", str(out)] + FAST
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
    assert cli.main(["--ops", "square_right", "--json", str(out)] + FAST) == 0
    for r in _records(out):
        assert KEYS <= set(r) and r["passed"]
        assert r["max_rel_err"] < 1e-6 and r["fd_err"] < 1e-6
        assert r["custom_ms"] > 0 and r["autodiff_ms"] > 0


def test_real_op_with_kinks_reports_nulls_and_float64(tmp_path):
    out = tmp_path / "audit.json"
    code = cli.main(["--ops", "relu", "--dtype", "float64", "--json", str(out),
                              "--no-torch"] + FAST)
    assert code == 0
    records = _records(out)
    assert [r["config"]["zeros"] for r in records] == [False, True]
    kink = records[1]
    assert kink["fd_err"] is None and "kink" in kink["fd_note"]
    assert all(r["torch_err"] is None and r["dtype"] == "float64" for r in records)


def test_network_records_every_parameter_leaf(tmp_path):
    out = tmp_path / "audit.json"
    code = cli.main(["--ops", "mlp", "--json", str(out), "--repeats", "0"])
    assert code == 0
    (record,) = _records(out)
    assert record["kind"] == "network" and KEYS <= set(record)
    assert [leaf["name"] for leaf in record["leaves"]][:2] == ["1.bias", "1.weight"]
    assert record["custom_ms"] is None and record["fd_err"] is None


def test_relative_error_has_an_absolute_floor():
    tol = Tol(1e-5, 1e-5)
    rows = A.leaf_rows(["x"], [np.full(3, 2e-8)], [np.full(3, 1e-8)], tol)
    assert rows[0]["rel"] <= tol.rtol  # zero up to rounding on both sides: no false alarm
    rows = A.leaf_rows(["x"], [jnp.ones(3) * 2.0], [jnp.ones(3)], tol)
    assert rows[0]["rel"] > 0.4  # a factor of 2 at scale 1 is a failure


def test_unknown_op_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        cli.main(["--ops", "no_such_op"])
    assert exc.value.code == 2


def _square_op(bwd):
    op = two_gradients(_square_forward, _square_fwd, bwd)
    return lambda x, *, vjp="custom": op(vjp, None, x)


def test_check_op_audits_a_users_own_op():
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    (record,) = audit.check_op(_square_op(_right_bwd), x, torch_fn=lambda torch, x: x * x)
    assert record.passed and record.max_rel_err < 1e-6 and record.fd_err < 1e-6
    assert record.dtype == "float32" and [leaf["name"] for leaf in record.leaves] == ["arg0"]
    with pytest.raises(audit.AuditFailure, match="custom vs autodiff"):
        audit.check_op(_square_op(_wrong_bwd), x)
    (flagged,) = audit.check_op(_square_op(_wrong_bwd), x, strict=False)
    assert not flagged.passed and "custom vs finite differences" in flagged.failures


def test_check_network_audits_a_users_own_network():
    net = fcn.serial(fcn.Conv2d(2, 3), fcn.ReLU(), fcn.Flatten(), fcn.Linear(3))
    (record,) = audit.check_network(net, (-1, 1, 6, 6))
    assert record.passed and record.kind == "network" and record.config["batch"] == 16
    assert [leaf["name"] for leaf in record.leaves] == ["0.bias", "0.weight", "3.bias",
                                                        "3.weight"]


def test_writes_files_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--ops", "tanh", "--no-torch", "--no-fd", "--repeats", "0",
                     "--grid", "0"]) == 0
    assert list(tmp_path.iterdir()) == []
    report = tmp_path / "r" / "REPORT.md"
    assert cli.main(["--ops", "max_pool2d", "--no-torch", "--no-fd", "--repeats", "0",
                     "--grid", "0", "--report", str(report)]) == 0
    text = report.read_text()
    assert "python -m functional_cnn.audit --ops max_pool2d" in text
    # the rule is the op's own docstring, not a second copy of it
    assert "`torch.nn.functional.max_pool2d` semantics" in text and "``" not in text
    assert "lax.pad" not in text and "![" not in text  # no chart unless asked


def test_the_committed_report_states_every_rule_as_its_docstring_says_it():
    # docs/VJP_REPORT.md renders each rule from the op's docstring, the one home of its prose;
    # its measurements are re-run rarely, so a docstring edited since reads there as it was
    report = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "VJP_REPORT.md").read_text()
    stale = [op for op in _registry.REGISTRY if rule_text(op) not in report]
    assert not stale, (f"docs/VJP_REPORT.md states an older rule for {stale}: re-render it "
                       "(python -m functional_cnn.audit --report docs/VJP_REPORT.md)")
