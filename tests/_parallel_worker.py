"""Run by tests/test_parallel.py in a subprocess whose XLA_FLAGS force 4 host devices (they must be
set before jax is imported). Trains one epoch on 4 devices and on 1; writes a JSON report to
argv[1]."""
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
import optax

from functional_cnn import data, dataparallel, models, train
from functional_cnn import verify


# the shared MNIST, read once (tests/test_parallel.py runs this only when it is there)
TRAIN = data.load("MNIST", "train", download=False)


def one_epoch(net, n_images, batch_size, devices, scan, optimizer):
    ds = TRAIN.range(0, n_images)
    mesh = dataparallel.make_mesh(devices)
    trainer = train.make_trainer(net(), optimizer, batch_size=batch_size, scan=scan,
                                 mesh=mesh, preprocess=lambda x: data.normalize(x, 0.5, 0.5))
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    ts, metrics = trainer.epoch(ts, ds.images, ds.labels)
    ev = train.evaluate(trainer, ts, ds)
    sharding = jax.tree.leaves(ts.params)[0].sharding
    leaves = [np.asarray(x) for x in jax.tree.leaves((ts.params, ts.state))]
    return leaves, float(metrics["loss"]), ev.loss, len(sharding.device_set)


def compare(name, **kw):
    t0 = time.perf_counter()
    (p4, l4, e4, spread), (p1, l1, e1, _) = (one_epoch(devices=d, **kw) for d in (4, 1))
    return {"case": name, "params_rel_err": verify.max_errors(p4, p1)[1], "loss4": l4, "loss1": l1,
            "eval_loss4": e4, "eval_loss1": e1, "spread": spread,
            "seconds": time.perf_counter() - t0}


def cli(devices):
    from experiments import mytorch_net
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.json")
        mytorch_net.run(mytorch_net.PROTOCOL, [
            "--epochs", "1", "--train-range", "0", "60", "--eval-limit", "40", "--no-progress",
            "--batch-size", "12", "--devices", str(devices), "--json", path])
        with open(path) as f:
            return json.load(f)


def message(fn):
    try:
        fn()
    except (ValueError, SystemExit) as err:
        return str(err)
    return None


def main():
    report = {"device_count": jax.device_count()}
    # BatchNorm (mytorch_net), one jitted call per step; 130 = 8 x 16 + a ragged 2 that does not
    # divide by 4, so the tail batch runs replicated
    report["cases"] = [
        compare("mytorch_net loop", net=models.mytorch_net, n_images=130, batch_size=16,
                scan=False, optimizer=optax.sgd(0.05)),
        # the whole epoch as one lax.scan; 132 = 8 x 16 + a tail of 4, sharded like the others
        compare("mytorch_net scan", net=models.mytorch_net, n_images=132, batch_size=16,
                scan=True, optimizer=optax.sgd(0.05)),
    ]
    report["cli"] = {d: cli(d) for d in (4, 1)}
    from experiments import mytorch_net
    report["errors"] = {
        "trainer": message(lambda: train.make_trainer(models.mytorch_net(), batch_size=10,
                                                      mesh=dataparallel.make_mesh(4))),
        "mesh": message(lambda: dataparallel.make_mesh(8)),
        "cli": message(lambda: mytorch_net.run(mytorch_net.PROTOCOL, [
            "--epochs", "1", "--train-range", "0", "20", "--no-progress", "--devices", "4"])),
    }
    with open(sys.argv[1], "w") as f:  # stdout carries the experiments' summaries
        json.dump(report, f)


if __name__ == "__main__":
    main()
