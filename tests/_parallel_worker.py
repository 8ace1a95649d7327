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


def per_device_batch_norm():
    """One step of a BatchNorm network with ``sync_batch_norm=False`` on the 4-device mesh
    against the same step written out on one device: each quarter of the batch's gradient
    and BatchNorm update computed alone, then averaged."""
    from functools import partial
    ds = TRAIN.range(0, 16)
    options = dict(batch_size=16, preprocess=lambda x: data.normalize(x, 0.5, 0.5))
    mesh_cfg = train.make_trainer(models.mytorch_net(), optax.sgd(0.05),
                                  mesh=dataparallel.make_mesh(4), sync_batch_norm=False,
                                  **options).config
    one_cfg = train.make_trainer(models.mytorch_net(), optax.sgd(0.05), **options).config
    ts = train._fresh_state(one_cfg, jax.random.key(0), (-1, 1, 28, 28))
    key = jax.random.key(1)

    def by_quarters(ts, images, labels):
        x = one_cfg.preprocess(images)
        outs = [train._batch_gradients(one_cfg, ts.params, ts.state, x[i:i + 4],
                                       labels[i:i + 4], None) for i in range(0, 16, 4)]
        mean = lambda *v: sum(v) / 4  # noqa: E731
        grads = jax.tree.map(mean, *[o[0] for o in outs])
        state = jax.tree.map(mean, *[o[1][0] for o in outs])
        updates, _ = one_cfg.optimizer.update(grads, ts.opt_state, ts.params)
        return optax.apply_updates(ts.params, updates), state, sum(o[1][1] for o in outs)

    mesh_ts, (loss_sum, _) = jax.jit(partial(train._train_step, mesh_cfg))(
        dataparallel.replicate(ts, mesh_cfg.mesh), ds.images, ds.labels, key)
    params, state, ref_loss_sum = jax.jit(by_quarters)(ts, ds.images, ds.labels)
    whole = train._batch_gradients(one_cfg, ts.params, ts.state, one_cfg.preprocess(ds.images),
                                   ds.labels, None)[0]  # the global batch's: not what ran
    flat = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]  # noqa: E731
    return {"rel_err": verify.max_errors(flat((mesh_ts.params, mesh_ts.state)),
                                         flat((params, state)))[1],
            "loss_sum": float(loss_sum), "ref_loss_sum": float(ref_loss_sum),
            "global_rel_diff": verify.max_errors(flat(jax.tree.map(
                lambda p, g: p - 0.05 * g, ts.params, whole)), flat(params))[1]}


def precompiled_mesh():
    """precompile over the 4-device mesh: the same numbers as the plain trainer, from the
    programs compiled ahead (no compilation on the call)."""
    from functional_cnn.precompile import precompile
    ds, test = TRAIN.range(0, 40), TRAIN.range(40, 52)

    def make():
        return train.make_trainer(models.mytorch_net(), optax.adam(1e-2), batch_size=8,
                                  eval_batch_size=5, mesh=dataparallel.make_mesh(4),
                                  sync_batch_norm=False)
    abstract = lambda d: jax.ShapeDtypeStruct(d.images.shape, d.images.dtype)  # noqa: E731
    ahead = precompile(make(), (-1, 1, 28, 28), train_images=abstract(ds),
                       eval_images=abstract(test))
    results = []
    for trainer in (make(), ahead):
        ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
        ts, metrics = trainer.epoch(ts, ds.images, ds.labels)
        results.append((jax.tree.leaves((ts.params, ts.state)), float(metrics["loss"]),
                        train.evaluate(trainer, ts, test).loss))
    (a, la, ea), (b, lb, eb) = results
    return {"identical": all(bool((x == y).all()) for x, y in zip(a, b)) and la == lb
            and ea == eb, "fallback_compiles": ahead.epoch.args[1].jitted._cache_size(),
            "spread": len(b[0].sharding.device_set)}


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
    report["per_device_batch_norm"] = per_device_batch_norm()
    report["precompiled_mesh"] = precompiled_mesh()
    from experiments import time_to_accuracy
    report["race_devices"] = time_to_accuracy.host_mesh(None).size  # the backend's are up
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
