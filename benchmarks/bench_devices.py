"""Data-parallel training throughput on 1, 2, 4 (forced host) devices.

Each device count runs in its own worker process (``XLA_FLAGS`` must be set before jax is
imported); the workers compile first, then the controller asks them for one timed epoch in turn,
round after round (the order rotates each round), and reports the median images/s per network
and device count. The table goes into ``docs/BENCHMARKS.md`` between ``<!-- scaling:begin -->``
and ``<!-- scaling:end -->`` (the rest of that file is left alone).

    FUNCTIONAL_CNN_DATA=../shared/datasets python -m benchmarks.bench_devices
    python -m benchmarks.bench_devices --devices 1 2 4 8 --rounds 7 --no-write

On a CPU the N devices are ``--xla_force_host_platform_device_count=N`` host devices sharing the
same cores; on a machine with several accelerators pass ``--platform gpu`` to use real devices.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

from experiments._machine import cpu_model
from benchmarks import _report
from benchmarks._report import BENCHMARKS, ROOT, command, write_section

class Case(NamedTuple):
    network: str  # a function of functional_cnn.models, or "race": experiments.time_to_accuracy's
    batch: int  # global; divides by 1, 2, 4, 8
    scan: bool
    sync_batch_norm: bool = True  # False: each device's BatchNorm normalizes its own shard


CASES = {"lenet": Case("lenet", 64, False),
         "mytorch_net (BatchNorm)": Case("mytorch_net", 40, False),
         "mytorch_net (per-device BatchNorm)": Case("mytorch_net", 40, False, False),
         "race network (per-device BatchNorm)": Case("race", 32, True, False),
         "mlp": Case("mlp", 64, True)}


def _network(name: str):
    if name == "race":
        from experiments import time_to_accuracy  # its pins as the race takes them
        return time_to_accuracy.net(formulations=time_to_accuracy.recipe_formulations())
    from functional_cnn import models
    return getattr(models, name)()


# ----------------------------------------------------------------------------- worker
def worker(images: int):
    import jax
    import numpy as np
    from jax import numpy as jnp

    from functional_cnn import data, dataparallel, train

    try:
        ds, source = data.load("MNIST", "train", download=False).range(0, images), "MNIST"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        ds = data.Dataset(jnp.asarray(rng.integers(0, 256, (images, 28, 28), dtype=np.uint8)),
                          jnp.asarray(rng.integers(0, 10, images), jnp.int32))
        source = "synthetic"
    mesh = dataparallel.make_mesh()  # every device of this process
    trainers, states = {}, {}
    for name, case in CASES.items():
        trainer = train.make_trainer(_network(case.network), train.adamw(),
                                     batch_size=case.batch, scan=case.scan, mesh=mesh,
                                     sync_batch_norm=case.sync_batch_norm)
        ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
        ts, m = trainer.epoch(ts, ds.images, ds.labels)  # compile (full batches and the tail)
        float(m["loss"])
        trainers[name], states[name] = trainer, ts
    placed = trainers[name].place(ds)
    print(json.dumps({"ready": True, "devices": mesh.size, "source": source,
                      "backend": jax.default_backend(),
                      "device_kind": mesh.devices.flat[0].device_kind}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        t0 = time.perf_counter()
        states[name], m = trainers[name].epoch(states[name], placed.images, placed.labels)
        float(m["loss"])  # wait for the epoch
        seconds = time.perf_counter() - t0
        print(json.dumps({"images_per_s": images / seconds, "seconds": seconds}), flush=True)


# ----------------------------------------------------------------------------- controller
def start(n: int, images: int, platform_name: str):
    env = dict(os.environ)
    if platform_name == "cpu":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={n}").strip()
        env["JAX_PLATFORMS"] = "cpu"
    else:  # real accelerators: the first n of them
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(n)))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_devices", "--worker",
                             "--images", str(images)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return proc


def ask(proc, line=None):
    if line is not None:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
    out = proc.stdout.readline()
    if not out:
        raise RuntimeError(f"worker exited with {proc.wait()}")
    return json.loads(out)


def measure(devices, images, rounds, platform_name):
    procs = {}
    info = {}
    for n in devices:  # one at a time: compiling in parallel would fight over the cores
        procs[n] = start(n, images, platform_name)
        info[n] = ask(procs[n])
        assert info[n]["devices"] == n, info[n]
    rates = {(c, n): [] for c in CASES for n in devices}
    for r in range(rounds):
        order = devices[r % len(devices):] + devices[:r % len(devices)]
        for case in CASES:
            for n in order:
                rates[case, n].append(ask(procs[n], case)["images_per_s"])
    for p in procs.values():
        p.stdin.close()
        p.wait()
    return {k: statistics.median(v) for k, v in rates.items()}, info


def table(medians, devices, info, images, rounds):
    first = info[devices[0]]
    header = ["network (global batch)"] + [f"{n} device{'s' * (n > 1)}" for n in devices]
    cells = []
    for case, (_, batch, scan, _) in CASES.items():
        base = medians[case, devices[0]]
        cells.append([f"{case} ({batch}, {'scan' if scan else 'per-step'})"]
                     + [f"{medians[case, n]:,.0f} img/s ({medians[case, n] / base:.2f}x)"
                        for n in devices])
    rows = _report.table(header, cells)
    import jax
    setup = (f"{first['backend']} ({first['device_kind']}), {os.cpu_count()} cores, "
             f"{cpu_model()}, jax {jax.__version__}; "
             f"{images} {first['source']} training images per epoch, AdamW, median of {rounds} "
             f"alternating rounds after compilation")
    return "\n".join(rows), setup


def section(rows, setup, platform_name, device_kind, command):
    if platform_name == "cpu":
        note = (
            "On the CPU the N devices are `--xla_force_host_platform_device_count=N` *host* "
            "devices: XLA:CPU runs each device's share of the batch on the same cores (this "
            f"machine has {os.cpu_count()}). With global-batch BatchNorm the columns mostly "
            "measure what the sharding costs (smaller per-device convolutions, the all-reduces "
            "of the gradients and of BatchNorm's statistics, one dispatch per device, and for the "
            "per-step networks a wait after every step, which XLA:CPU needs with several devices "
            "to avoid a collective deadlock); the point of those runs is that the same code "
            "runs sharded and, as `tests/test_parallel.py` checks, gives the same parameters and "
            "loss as on one device. With per-device BatchNorm (`make_trainer(sync_batch_norm="
            "False)`: each device its shard alone, one all-reduce a step) up to one device per "
            "core can gain, where XLA:CPU's one device leaves a core idle. Accelerators are "
            "measured by the same command with `--platform gpu`, on a machine with several of "
            "them.")
    else:
        note = (f"The N devices are real accelerators ({device_kind}), the first N of them "
                "(`CUDA_VISIBLE_DEVICES`).")
    return (f"## Data-parallel scaling (`--devices N`)\n\n"
            f"Training throughput, images per second (speed relative to 1 device). {setup}.\n\n"
            f"{rows}\n\n{note}\n\nReproduce: `{command}` (writes this section).\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--images", type=int, default=3200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-write", action="store_true", help="print, leave docs/ alone")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.images)
    medians, info = measure(args.devices, args.images, args.rounds, args.platform)
    rows, setup = table(medians, args.devices, info, args.images, args.rounds)
    if args.platform == "cpu":  # the cores the host devices share: what they can do at best
        from benchmarks._peak import matmul_peak, peak_text
        setup += "; " + peak_text(matmul_peak())
    print(setup)
    print(rows)
    reproduce = ("FUNCTIONAL_CNN_DATA=../shared/datasets "
                 + command("benchmarks.bench_devices", argv))
    if not args.no_write:
        write_section(BENCHMARKS, "scaling", section(rows, setup, args.platform,
                                                    info[args.devices[0]]["device_kind"],
                                                    reproduce))
        print(f"wrote the scaling section of {BENCHMARKS}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "images_per_s": {f"{c}|{n}": v for (c, n), v in
                                                        medians.items()}}, f, indent=1)
    return rows, setup


if __name__ == "__main__":
    main()
