"""Data-parallel training (functional_cnn.dataparallel): 4 forced host devices give the same
parameters, BatchNorm statistics and loss as 1; clear errors; multi-host configuration."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from functional_cnn import dataparallel, train
from tests.conftest import needs_mnist
from tests._train_helpers import small_net, tiny_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5  # float32: the sharded reductions add in another order


@needs_mnist  # its CLI part trains on the shared MNIST
def test_four_devices_match_one_device(tmp_path):
    """One subprocess (XLA_FLAGS must be set before jax is imported) runs every 4-vs-1 case."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_parallel_worker.py"), str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device_count"] == 4
    for case in report["cases"]:
        what = case["case"]
        assert case["spread"] == 4, what  # the params really live on the 4-device mesh
        assert case["params_rel_err"] < RTOL, (what, case)  # params and BatchNorm statistics
        assert case["loss4"] == pytest.approx(case["loss1"], rel=RTOL), (what, case)
        assert case["eval_loss4"] == pytest.approx(case["eval_loss1"], rel=RTOL), (what, case)
    four, one = report["cli"]["4"], report["cli"]["1"]
    assert (four["devices"], one["devices"]) == (4, 1)
    assert four["batch_size"] == one["batch_size"] == 12 and four["processes"] == 1
    # AdamW at lr 0.01 for 5 steps: its normalization amplifies rounding, hence a looser bound
    assert four["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-3)
    errors = report["errors"]
    assert "global batch size 10 does not divide evenly over 4 devices" in errors["trainer"]
    assert "--devices 2 or 1" in errors["trainer"] and "--batch-size 12" in errors["trainer"]
    assert "asked for 8 devices but this run has 4" in errors["mesh"]
    assert "xla_force_host_platform_device_count" in errors["mesh"]
    assert errors["cli"].startswith("python -m experiments.mytorch_net: error:")
    assert "--batch-size 12" in errors["cli"]


def test_one_device_mesh_matches_no_mesh():
    ds = tiny_data()
    out = []
    for mesh in (None, dataparallel.make_mesh(1)):
        trainer = train.make_trainer(small_net(), batch_size=5, scan=False, mesh=mesh)
        ts, m = trainer.epoch(trainer.init(jax.random.key(0), (-1, 1, 28, 28)), ds.images,
                              ds.labels)
        out.append(float(m["loss"]))
        assert (trainer.mesh is None) == (mesh is None)
    assert out[0] == pytest.approx(out[1], rel=1e-6)


def test_distributed_config_from_flags_and_environment(monkeypatch):
    for var in (dataparallel.ENV_COORDINATOR, dataparallel.ENV_NUM_PROCESSES,
                dataparallel.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    assert dataparallel.distributed_config() is None  # a one-process run: do nothing
    assert dataparallel.initialize_distributed() is False
    env = {dataparallel.ENV_COORDINATOR: "10.0.0.1:1234", dataparallel.ENV_NUM_PROCESSES: "2",
           dataparallel.ENV_PROCESS_ID: "1"}
    assert dataparallel.distributed_config(environ=env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    # flags win over the environment
    assert dataparallel.distributed_config("h:1", 4, 3, environ=env) == {
        "coordinator_address": "h:1", "num_processes": 4, "process_id": 3}
    with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
        dataparallel.distributed_config("h:1", environ={})
    with pytest.raises(ValueError, match="0 <= process_id < num_processes, got 2, 2"):
        dataparallel.distributed_config("h:1", 2, 2, environ={})


def test_bad_devices_argument():
    with pytest.raises(ValueError, match="expected devices a positive int"):
        dataparallel.make_mesh(0)
    with pytest.raises(ValueError, match="asked for 999 devices"):
        dataparallel.make_mesh(999)
