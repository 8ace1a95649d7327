"""The engine: exact ragged-batch losses, scan == per-step loop, exact resume, bad config."""
import jax
import numpy as np
import optax
import pytest
from jax import numpy as jnp

import functional_cnn as fcn
from functional_cnn import checkpoint as ckpt
from functional_cnn import data, train


def tiny_data(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return data.Dataset(jnp.asarray(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                        jnp.asarray(rng.integers(0, 10, n), jnp.int32))


def small_net():  # BatchNorm, so a padded batch would change the result
    return fcn.serial(fcn.Conv2d(4, 3, stride=2), fcn.BatchNorm2d(), fcn.ReLU(), fcn.Flatten(),
                      fcn.Linear(10))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_epoch_loss_counts_every_example_once(reduction):
    ds = tiny_data()
    net = small_net()
    trainer = train.make_trainer(net, optax.sgd(0.0), batch_size=5, reduction=reduction,
                                 shuffle=False)
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    params, state = jax.tree.map(jnp.copy, (ts.params, ts.state))  # ts is donated below
    _, metrics = trainer.epoch(ts, ds.images, ds.labels)
    # lr 0: every batch sees the initial params; BN uses each batch's own statistics
    x = data.normalize(ds.images)
    per = []
    for lo in range(0, 23, 5):  # batches of 5, 5, 5, 5 and the ragged 3
        logits, _ = net.apply(params, state, x[lo:lo + 5], train=True)
        per.append(fcn.cross_entropy(logits, ds.labels[lo:lo + 5], reduction="none"))
    np.testing.assert_allclose(float(metrics["loss"]), float(jnp.concatenate(per).mean()),
                               rtol=1e-6)


def test_scan_and_loop_epochs_agree():
    ds = tiny_data()
    results = []
    for scan in (True, False):
        # plain SGD: Adam's normalization would amplify rounding differences of tiny gradients
        trainer = train.make_trainer(small_net(), optax.sgd(0.05), batch_size=5, scan=scan)
        ts = trainer.init(jax.random.key(3), (-1, 1, 28, 28))
        for _ in range(2):
            ts, m = trainer.epoch(ts, ds.images, ds.labels)
        results.append((ts, m))
    (a, ma), (b, mb) = results
    assert int(a.step) == int(b.step) == 10
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)


@pytest.mark.parametrize("scan", [True, False])
def test_resume_is_bitwise_identical(tmp_path, scan):
    ds, ev = tiny_data(), tiny_data(11, seed=1)

    shared = train.make_trainer(small_net(), batch_size=5, scan=scan)  # compiled once

    def fresh():  # a new process would start exactly like this
        return shared, shared.init(jax.random.key(0), (-1, 1, 28, 28))

    trainer, ts = fresh()
    full = train.fit(trainer, ts, ds, epochs=3, eval_data=ev, log=lambda m: None)
    path = str(tmp_path / "run.npz")
    trainer, ts = fresh()
    train.fit(trainer, ts, ds, epochs=1, eval_data=ev, checkpoint_path=path, log=lambda m: None)
    trainer, ts = fresh()
    resumed = train.fit(trainer, ts, ds, epochs=3, eval_data=ev, checkpoint_path=path,
                        resume=True, log=lambda m: None)
    assert resumed.resumed_from_epoch == 1 and len(resumed.history) == 3
    for x, y in zip(jax.tree.leaves(full.train_state), jax.tree.leaves(resumed.train_state)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(x, y)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
    assert strip(full.history) == strip(resumed.history)
    # the last epoch's evaluation comes back with the result: the final state's, on eval_data
    again = train.evaluate(trainer, resumed.train_state, ev)
    assert resumed.evaluation.accuracy == again.accuracy == full.history[-1]["eval_accuracy"]
    assert resumed.evaluation.loss == again.loss
    np.testing.assert_array_equal(resumed.evaluation.predictions, again.predictions)


def test_resume_refuses_another_configuration(tmp_path):
    ds = tiny_data()
    path = str(tmp_path / "run.npz")
    trainer = train.make_trainer(small_net(), batch_size=5)
    train.fit(trainer, trainer.init(jax.random.key(0), (-1, 1, 28, 28)), ds, epochs=1,
              checkpoint_path=path)
    other = train.make_trainer(small_net(), batch_size=4)
    with pytest.raises(ckpt.CheckpointError, match="another configuration"):
        train.fit(other, other.init(jax.random.key(0), (-1, 1, 28, 28)), ds, epochs=2,
                  checkpoint_path=path, resume=True)
    wider = train.make_trainer(fcn.serial(fcn.Flatten(), fcn.Linear(10)), batch_size=5)
    with pytest.raises(ckpt.CheckpointError, match="holds .* arrays"):
        train.fit(wider, wider.init(jax.random.key(0), (-1, 1, 28, 28)), ds, epochs=2,
                  checkpoint_path=path, resume=True)


def test_evaluate_and_bad_config():
    ds = tiny_data(7)
    trainer = train.make_trainer(small_net(), batch_size=5, eval_batch_size=3)
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    ev = train.evaluate(trainer, ts, ds)
    logits, _ = small_net().apply(ts.params, ts.state, data.normalize(ds.images))
    np.testing.assert_array_equal(ev.predictions, np.asarray(logits.argmax(-1)))
    with pytest.raises(ValueError, match="expected batch_size a positive int, got 0"):
        train.make_trainer(small_net(), batch_size=0)
    with pytest.raises(ValueError, match=r"expected reduction in \('mean', 'sum'\), got 'none'"):
        train.make_trainer(small_net(), batch_size=2, reduction="none")
    with pytest.raises(ValueError, match="expected epochs a non-negative int"):
        train.fit(trainer, ts, ds, epochs=-1)


def test_fit_checks_labels_against_the_outputs_before_training():
    # Under jit a bad label would only give NaN; fit checks the sets once, up front.
    trainer = train.make_trainer(small_net(), batch_size=5)
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    for which, bad_label in (("train_data", 10), ("eval_data", -1)):
        sets = {"train_data": tiny_data(), "eval_data": tiny_data(11, seed=1)}
        labels = np.asarray(sets[which].labels).copy()
        labels[4] = bad_label
        sets[which] = data.Dataset(sets[which].images, jnp.asarray(labels))
        with pytest.raises(ValueError, match=rf"fit: {which} labels must lie in \[0, 10\) .* "
                                             rf"got {bad_label} at index 4 \(1 of"):
            train.fit(trainer, ts, epochs=1, log=lambda m: None, **sets)
        assert int(ts.step) == 0  # not trained (nor donated)
