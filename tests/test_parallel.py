"""Data-parallel training (functional_cnn.dataparallel): 4 forced host devices give the same
parameters, BatchNorm statistics and loss as 1; two processes joined by jax.distributed give the
same as one; clear errors; multi-host configuration."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from functional_cnn import checkpoint, dataparallel, train, verify
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
    for reduction, case in report["per_device"].items():  # each quarter alone, combined
        assert case["rel_err"] < RTOL, (reduction, case)
        assert case["loss"] == pytest.approx(case["ref_loss"], rel=RTOL), (reduction, case)
        assert case["accuracy"] == case["ref_accuracy"], (reduction, case)
        assert case["global_rel_diff"] > 100 * RTOL, (reduction, case)  # not the global batch's
    config = report["per_device_config"]
    assert config["fingerprints"] == [None, 2, 4]  # one device: the same as without the option
    assert "needs at least 2 examples per device; batch_size 4 over 4 devices gives 1" in \
        config["too_small"]
    ahead = report["precompiled_mesh"]
    assert ahead == {"identical": True, "fallback_compiles": 0, "spread": 4}, ahead
    # experiments/time_to_accuracy's default: two of the 4, or one where the worker has a core
    assert report["race_devices"] == min(2, len(os.sched_getaffinity(0)))
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


def free_port() -> int:
    """A port nobody listens on now (the coordinator binds it on every interface)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run_together(commands, logs, env, timeout):
    """Run ``commands`` at once, each in its own session with its output in ``logs``; as soon
    as one fails, or when ``timeout`` seconds have passed, kill every one still running (the
    others would wait for it in a collective until the heartbeat gives up, minutes later).
    Returns the exit codes, None for a process that was killed."""
    procs = []
    try:
        for command, log in zip(commands, logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                              cwd=ROOT, env=env, start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.poll() is None for p in procs) \
                and not any(p.poll() for p in procs):
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: only what it started
                p.wait()
    return [None if p.returncode == -signal.SIGKILL else p.returncode for p in procs]


def two_process_run(argv, tmp_path, attempts=2):
    """``python -m experiments.lenet ARGV`` as processes 0 and 1 of one jax.distributed
    run on localhost; process I writes to tmp_path/pI (only 0 should). Another attempt on a new
    port if the coordinator's port was taken in between."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FUNCTIONAL_CNN_") or k == "FUNCTIONAL_CNN_DATA"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    for _ in range(attempts):
        port = free_port()
        commands = [[sys.executable, "-m", "experiments.lenet", *argv,
                     "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                     "--process-id", str(i), "--json", str(tmp_path / f"p{i}" / "r.json"),
                     "--checkpoint", str(tmp_path / f"p{i}")] for i in (0, 1)]
        logs = [tmp_path / f"p{i}.log" for i in (0, 1)]
        codes = run_together(commands, logs, env, timeout=300)
        output = "\n".join(f"--- process {i} ({'killed' if c is None else f'exit {c}'}):\n"
                           f"{log.read_text()[-3000:]}"
                           for i, (c, log) in enumerate(zip(codes, logs)))
        if codes == [0, 0] or "Failed to add port" not in output:
            return codes, output
    return codes, output


@needs_mnist  # trains on the shared MNIST, as the README's multi-host commands do
def test_two_processes_match_one_process(tmp_path):
    """The README's multi-host commands on one machine: two processes on localhost, one CPU
    device each, joined by jax.distributed.initialize (gloo collectives), train a LeNet epoch
    to the parameters, momentum and loss of one process on the same data. SGD, because Adam
    would turn rounding noise in near-zero gradients into full-size steps."""
    from experiments import lenet
    # 69 = 4 x 16 + a ragged 5 that does not divide by 2: the tail batch runs replicated
    argv = ["--epochs", "1", "--train-range", "0", "69", "--eval-limit", "40", "--no-progress",
            "--optimizer", "sgd", "--batch-size", "16", "--devices", "2"]
    codes, output = two_process_run(argv, tmp_path)
    assert codes == [0, 0], output
    two = json.loads((tmp_path / "p0" / "r.json").read_text())
    assert not (tmp_path / "p1").exists(), "only process 0 writes the JSON and checkpoints"
    argv[-1] = "1"
    one = lenet.run(lenet.PROTOCOL, argv + ["--checkpoint", str(tmp_path / "one")])
    assert (two["processes"], two["devices"], one["processes"], one["devices"]) == (2, 2, 1, 1)
    header, leaves2 = checkpoint._read(tmp_path / "p0" / "lenet.npz")
    _, leaves1 = checkpoint._read(tmp_path / "one" / "lenet.npz")
    paths = [entry["path"] for entry in header["leaves"]]
    assert len(leaves2) == len(leaves1) == 14, paths  # 6 params, 6 momenta, the step, the key
    assert int(leaves2[paths.index(".step")]) == int(leaves1[paths.index(".step")]) == 5
    for entry, a, b in zip(header["leaves"], leaves2, leaves1):
        assert verify.max_errors(a, b)[1] < 1e-5, (entry["path"], verify.max_errors(a, b))
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-5)
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
    assert two["test_accuracy"] == one["test_accuracy"]


FROZEN_ON_FIVE_DEVICES = """
import jax, numpy as np, optax
from jax import numpy as jnp
import functional_cnn as fcn
from functional_cnn import data, dataparallel, train
net = fcn.serial(fcn.frozen(fcn.Conv2d(64, 3, bias=False)), fcn.BatchNorm2d(affine=False),
                 fcn.ReLU(), fcn.Flatten(), fcn.Linear(10))
trainer = train.make_trainer(net, optax.adam(1e-2), batch_size=20, steps_per_epoch=5,
                             mesh=dataparallel.make_mesh(5), sync_batch_norm=False,
                             preprocess=lambda x: data.normalize(x, 0.5, 0.5))
ts = trainer.init(jax.random.key(0), (-1, 1, 8, 8))
frozen, running = np.asarray(ts.state[0]["weight"]), np.asarray(ts.state[1]["running_mean"])
images = np.random.default_rng(0).integers(0, 256, (200, 8, 8), dtype=np.uint8)
for _ in range(3):
    ts, _ = trainer.epoch(ts, jnp.asarray(images), jnp.arange(200, dtype=jnp.int32) % 10)
print(np.array_equal(frozen, ts.state[0]["weight"]),
      not np.allclose(running, ts.state[1]["running_mean"]))
"""


def test_frozen_params_stay_bit_exact_under_per_device_batch_norm():
    """The devices' state is combined by its average change: five equal filters summed and
    divided by five had moved some by an ulp (on 3, 5 and 6 host devices, as the sum's order
    fell; 2 and 4 add exactly)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=5",
           "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", FROZEN_ON_FIVE_DEVICES], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "True"]  # the filters exact, the statistics moved


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


def test_per_device_batch_norm_on_a_one_device_mesh_matches_no_mesh():
    """``sync_batch_norm=False`` over one device: the shard is the batch, the all-reduce a
    sum of one; the same numbers as without a mesh."""
    ds = tiny_data(20)
    out = []
    for mesh, sync in ((None, True), (dataparallel.make_mesh(1), False)):
        # SGD: Adam would turn rounding noise in near-zero gradients into full-size steps
        trainer = train.make_trainer(small_net(), optax.sgd(0.05), batch_size=5, mesh=mesh,
                                     sync_batch_norm=sync)
        ts, m = trainer.epoch(trainer.init(jax.random.key(0), (-1, 1, 28, 28)), ds.images,
                              ds.labels)
        out.append((jax.tree.leaves((ts.params, ts.state)), float(m["loss"])))
    (a, la), (b, lb) = out
    assert verify.max_errors([np.asarray(x) for x in a], [np.asarray(x) for x in b])[1] < RTOL
    assert la == pytest.approx(lb, rel=RTOL)


def test_one_buffer_sum_divides_each_part_and_restores_its_dtypes():
    """The all-reduce's one flat vector (``_summed_as_one_buffer``), on a one-device mesh
    (the sum of one): each part comes back in its own structure and dtypes, divided by its
    own divisor; bfloat16 and int32 leaves ride in the promoted float32 buffer."""
    parts = ({"w": np.arange(6, dtype=np.float32).reshape(2, 3),
              "b": np.array([3.0, 5.0], jax.numpy.bfloat16)},
             {"mean": np.array([4.0, 8.0], np.float32)}, np.float32(9.0), np.int32(7))
    mesh = dataparallel.make_mesh(1)
    summed = jax.jit(jax.shard_map(
        lambda *p: dataparallel._summed_as_one_buffer(p, divisors=(2, 4, 3, 1)), mesh=mesh,
        in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False))(*parts)
    grads, state, loss, count = summed
    np.testing.assert_array_equal(grads["w"], parts[0]["w"] / 2)
    assert grads["b"].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(grads["b"], np.float32), [1.5, 2.5])
    np.testing.assert_array_equal(state["mean"], [1.0, 2.0])
    assert (float(loss), loss.dtype) == (3.0, np.float32)
    assert (int(count), count.dtype) == (7, np.int32)
    with pytest.raises(TypeError, match="a floating leaf, got a buffer of int32"):
        jax.jit(jax.shard_map(
            lambda c: dataparallel._summed_as_one_buffer((c,), divisors=(2,)), mesh=mesh,
            in_specs=PartitionSpec(), out_specs=PartitionSpec(), check_vma=False))(np.int32(7))


def test_sync_batch_norm_without_several_devices_changes_nothing_and_takes_bools_only():
    on = train.make_trainer(small_net(), batch_size=4).config.fingerprint()
    for mesh in (None, dataparallel.make_mesh(1)):  # several devices: tests/_parallel_worker
        off = train.make_trainer(small_net(), batch_size=4, sync_batch_norm=False, mesh=mesh)
        assert off.config.fingerprint() == on and not off.config.per_device_batch_norm
    with pytest.raises(ValueError, match="expected sync_batch_norm True or False, got 'no'"):
        train.make_trainer(small_net(), batch_size=4, sync_batch_norm="no")


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
