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


def _dropout_bn_net():
    import functional_cnn as fcn
    return fcn.serial(fcn.Conv2d(4, 3, stride=2), fcn.BatchNorm2d(), fcn.ReLU(), fcn.Flatten(),
                      fcn.Dropout(0.5), fcn.Linear(10))


def _by_shards(cfg, ts, images, labels, key, shards):
    """One step written out shard by shard on one device: each shard's gradient, BatchNorm
    update and dropout (its key folded with the shard's index) alone, then combined."""
    _, drop_key = jax.random.split(key)
    x, size = cfg.preprocess(images), images.shape[0] // shards
    outs = [train._batch_gradients(cfg, ts.params, ts.state, x[i * size:(i + 1) * size],
                                   labels[i * size:(i + 1) * size],
                                   jax.random.fold_in(drop_key, i)) for i in range(shards)]
    total = lambda *v: sum(v)  # noqa: E731
    grads = jax.tree.map(total, *[o[0] for o in outs])
    if cfg.reduction == "mean":
        grads = jax.tree.map(lambda g: g / shards, grads)
    state = jax.tree.map(lambda *v: sum(v) / shards, *[o[1][0] for o in outs])
    updates, opt_state = cfg.optimizer.update(grads, ts.opt_state, ts.params)
    ts = train.TrainState(optax.apply_updates(ts.params, updates), state, opt_state,
                          ts.step + 1, ts.key)
    return ts, (sum(o[1][1] for o in outs), sum(o[1][2] for o in outs))


def per_device_epoch(reduction):
    """An epoch of a BatchNorm + Dropout network with ``sync_batch_norm=False`` on the
    4-device mesh (a batch of 16, then a tail of 4, whose shards of 1 run as one batch,
    replicated) against the same written out on one device."""
    from functools import partial
    ds = TRAIN.range(0, 20)
    # the same step size either way (a sum's gradient is the batch size times the mean's)
    sgd = optax.sgd(0.05 if reduction == "mean" else 0.05 / 16)
    options = dict(batch_size=16, shuffle=False, reduction=reduction,
                   preprocess=lambda x: data.normalize(x, 0.5, 0.5))
    mesh_cfg = train.make_trainer(_dropout_bn_net(), sgd, mesh=dataparallel.make_mesh(4),
                                  sync_batch_norm=False, **options).config
    one_cfg = train.make_trainer(_dropout_bn_net(), sgd, **options).config
    ts0 = train._fresh_state(one_cfg, jax.random.key(0), (-1, 1, 28, 28))
    mesh_ts, metrics = jax.jit(partial(train._scan_epoch, mesh_cfg))(
        dataparallel.replicate(ts0, mesh_cfg.mesh), ds.images, ds.labels)

    def reference(ts, images, labels):
        ts, full, tail, step_key = train._epoch_start(one_cfg, ts, labels)
        ts, (loss, correct) = _by_shards(one_cfg, ts, images[full[0]], labels[full[0]],
                                         jax.random.fold_in(step_key, 0), 4)
        ts, (tail_loss, tail_correct) = train._train_step(
            one_cfg, ts, images[tail], labels[tail], jax.random.fold_in(step_key, 1))
        return ts, (loss + tail_loss) / 20, (correct + tail_correct) / 20

    ref_ts, ref_loss, ref_accuracy = jax.jit(reference)(ts0, ds.images, ds.labels)
    global_ts, _ = jax.jit(partial(train._scan_epoch, one_cfg))(ts0, ds.images, ds.labels)
    flat = lambda ts: [np.asarray(x) for x in jax.tree.leaves((ts.params, ts.state))]  # noqa
    return {"rel_err": verify.max_errors(flat(mesh_ts), flat(ref_ts))[1],
            "loss": float(metrics["loss"]), "ref_loss": float(ref_loss),
            "accuracy": float(metrics["accuracy"]), "ref_accuracy": float(ref_accuracy),
            "global_rel_diff": verify.max_errors(flat(global_ts), flat(ref_ts))[1]}


def per_device_config():
    """What the option puts in checkpoints, and the batch it refuses."""
    def config(devices, batch=16):
        return train.make_trainer(_dropout_bn_net(), batch_size=batch, sync_batch_norm=False,
                                  mesh=dataparallel.make_mesh(devices)).config
    return {"fingerprints": [config(d).fingerprint().get("per_device_batch_norm")
                             for d in (1, 2, 4)],
            "too_small": message(lambda: config(4, batch=4))}


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
            and ea == eb, "fallback_compiles": ahead.epoch.args[1].jitted._cache_size()
            + ahead.predict.args[1].jitted._cache_size(),
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
    report["per_device"] = {r: per_device_epoch(r) for r in ("mean", "sum")}
    report["per_device_config"] = per_device_config()
    report["precompiled_mesh"] = precompiled_mesh()
    from experiments import time_to_accuracy
    race_mesh = time_to_accuracy.host_mesh(None)  # the backend's devices are up already
    report["race_devices"] = 1 if race_mesh is None else race_mesh.size
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
