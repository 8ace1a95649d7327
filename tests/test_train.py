"""The engine: exact ragged-batch losses, scan == per-step loop, exact resume, progress, bad
config."""
import functools

import jax
import numpy as np
import optax
import pytest
from jax import numpy as jnp

import functional_cnn as fcn
from functional_cnn import checkpoint as ckpt
from functional_cnn import data, dataparallel, train
from functional_cnn.verify import tolerance
from tests._compiles import compiled_programs
from tests._train_helpers import small_net, tiny_data
from tests.conftest import assert_close


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
    apply = jax.jit(lambda x: net.apply(params, state, x, train=True)[0])
    per = []
    for lo in range(0, 23, 5):  # batches of 5, 5, 5, 5 and the ragged 3
        logits = apply(x[lo:lo + 5])
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


@pytest.mark.parametrize("mesh", [None, "one device"])
def test_a_step_by_step_epoch_compiles_its_step_once_and_nothing_eagerly(mesh):
    """The first step's totals are placed as every later step's (over a mesh they had compiled
    the step twice), the tail's row is cut in the epoch's start and the metrics are computed on
    the host (each an eager program before)."""
    mesh = None if mesh is None else dataparallel.make_mesh(1)
    ds = tiny_data()  # 23 examples: 4 full batches of 5 and a tail of 3
    trainer = train.make_trainer(small_net(), optax.sgd(0.05), batch_size=5, scan=False,
                                 mesh=mesh, label_smoothing=0.1)  # a net's own programs only
    ts = trainer.init(jax.random.key(3), (-1, 1, 28, 28))
    with compiled_programs() as compiled:
        ts, metrics = trainer.epoch(ts, ds.images, ds.labels)
    assert sorted(compiled) == ["jit(_loop_epoch_start)", "jit(_step_row)", "jit(_step_row)"]
    assert metrics["loss"].dtype == metrics["accuracy"].dtype == np.float32
    assert all(isinstance(m, jax.Array) for m in metrics.values())  # as the scan's
    with compiled_programs() as compiled:  # a second epoch: all compiled
        trainer.epoch(ts, ds.images, ds.labels)
    assert compiled == []


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


def test_resume_refuses_another_network_of_the_same_shapes_but_not_other_pins(tmp_path):
    """The fingerprint records the network (its calls, without formulation pins, which change
    the speed and rounding only): a ReLU for a tanh, with the same parameter shapes, is
    refused; a checkpoint written before the network was recorded still resumes."""
    ds, path = tiny_data(), str(tmp_path / "run.npz")

    def net(activation, pin=None):
        return fcn.serial(fcn.Conv2d(4, 3, stride=2, train_formulation=pin), activation,
                          fcn.Flatten(), fcn.Linear(10))

    def fit(trainer, epochs):
        return train.fit(trainer, trainer.init(jax.random.key(0), (-1, 1, 28, 28)), ds,
                         epochs=epochs, checkpoint_path=path, resume=True, log=lambda m: None)

    relu = train.make_trainer(net(fcn.ReLU()), batch_size=5)
    assert relu.config.fingerprint()["network"] == (
        "serial(Conv2d(4, kernel_size=3, stride=2), ReLU(), Flatten(), Linear(10))")
    fit(relu, 1)
    with pytest.raises(ckpt.CheckpointError, match=r"another configuration.*'network'"):
        fit(train.make_trainer(net(fcn.Tanh()), batch_size=5), 2)
    assert fit(train.make_trainer(net(fcn.ReLU(), "lax"), batch_size=5), 2).resumed_from_epoch == 1
    ts, meta = ckpt.load(path, relu.init(jax.random.key(0), (-1, 1, 28, 28)))
    del meta["fingerprint"]["network"]  # as written before the network was in it
    ckpt.save(path, ts, meta)
    assert fit(train.make_trainer(net(fcn.Tanh()), batch_size=5), 3).resumed_from_epoch == 2


def test_examples_and_labels_must_pair_up_wherever_data_comes_in():
    """One label per image, checked by every entry point (a gather past the end of a JAX array
    clamps: a short side trained on wrong pairs, in silence)."""
    ds = tiny_data()
    short = data.Dataset(ds.images[:20], ds.labels)
    pairs = (r"expected one label per image.*images of shape \(20, 28, 28\) and labels of "
             r"shape \(23,\)")
    trainer = train.make_trainer(small_net(), batch_size=5)
    fresh = lambda: trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    with pytest.raises(ValueError, match="fit: train_data: " + pairs):
        train.fit(trainer, fresh(), short, epochs=1)
    with pytest.raises(ValueError, match="fit: eval_data: " + pairs):
        train.fit(trainer, fresh(), ds, epochs=1, eval_data=short)
    with pytest.raises(ValueError, match="evaluate: " + pairs):
        train.evaluate(trainer, fresh(), short)
    for scan in (True, False):
        epoch = train.make_trainer(small_net(), batch_size=5, scan=scan).epoch
        with pytest.raises(ValueError, match="trainer.epoch: " + pairs):
            epoch(fresh(), short.images, short.labels)
    with pytest.raises(ValueError, match="to_device: " + pairs):
        data.to_device(np.zeros((20, 28, 28), np.uint8), np.zeros(23, np.int32))
    with pytest.raises(ValueError, match=r"to_device: .*labels of shape \(23, 1\)"):
        data.to_device(np.zeros((23, 28, 28), np.uint8), np.zeros((23, 1), np.int32))
    empty = data.Dataset(ds.images[:0], ds.labels[:0])
    with pytest.raises(ValueError, match="fit: expected train_data with examples"):
        train.fit(trainer, fresh(), empty, epochs=1)


def test_a_loss_must_return_one_value_per_example_and_smoothing_is_the_default_losss():
    """A loss already reduced over the batch would be reduced again (its mean 1/N of the
    reported loss, ``reduction="sum"`` ignored); ``label_smoothing`` beside a loss of one's
    own would be ignored. Both are refused. A config copied with another smoothing derives
    its default loss again."""
    ds = tiny_data()
    mean = functools.partial(fcn.cross_entropy, reduction="mean")
    trainer = train.make_trainer(small_net(), batch_size=5, loss=mean)
    with pytest.raises(ValueError, match=r"make_trainer: expected loss\(logits, labels\) to "
                                         r"return one loss per example, shape \(5,\); got "
                                         r"shape \(\)"):
        train.fit(trainer, trainer.init(jax.random.key(0), (-1, 1, 28, 28)), ds, epochs=1)
    own = functools.partial(fcn.cross_entropy, reduction="none")
    with pytest.raises(ValueError, match="label_smoothing smooths the default loss only; got a "
                                         "loss of your own and label_smoothing=0.5"):
        train.make_trainer(small_net(), batch_size=5, loss=own, label_smoothing=0.5)
    cfg = train.make_trainer(small_net(), batch_size=5, label_smoothing=0.1).config
    assert cfg.loss == train.DefaultLoss("custom", 0.1)
    import dataclasses
    assert dataclasses.replace(cfg, label_smoothing=0.2).loss == train.DefaultLoss("custom", 0.2)
    for bad in (True, 0, 2.0):
        with pytest.raises(ValueError, match="expected batch_size a positive int"):
            train.make_trainer(small_net(), batch_size=bad)


def test_fit_stops_resumes_and_replaces_checkpoints_as_asked(tmp_path):
    """``stop_after=0`` trains no epoch and a negative one is refused; a checkpoint saved past
    ``epochs`` is refused before anything is logged as resumed; a fresh run over an existing
    checkpoint says that it replaces it; resuming with no path says so."""
    ds, path = tiny_data(), str(tmp_path / "run.npz")
    trainer = train.make_trainer(small_net(), batch_size=5)
    fresh = lambda: trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    assert train.fit(trainer, fresh(), ds, epochs=2, stop_after=0).history == []
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="expected stop_after None or a non-negative int"):
            train.fit(trainer, fresh(), ds, epochs=2, stop_after=bad)
    logged = []
    train.fit(trainer, fresh(), ds, epochs=2, checkpoint_path=path, log=logged.append)
    assert logged == []
    with pytest.raises(ValueError, match=r"saved after epoch 2, past epochs=1; pass epochs >= 2"):
        train.fit(trainer, fresh(), ds, epochs=1, checkpoint_path=path, resume=True,
                  log=logged.append)
    assert logged == []
    train.fit(trainer, fresh(), ds, epochs=2, stop_after=0, checkpoint_path=path,
              log=logged.append)
    assert logged == []  # no epoch runs: nothing replaces the checkpoint, nothing said
    result = train.fit(trainer, fresh(), ds, epochs=1, checkpoint_path=path, log=logged.append)
    assert logged == [f"{path} exists: this run starts from scratch and replaces it after its "
                      f"first epoch (resume=True continues it)"]
    assert ckpt.read_meta(path)["epoch"] == 1 and result.resumed_from_epoch == 0
    train.fit(trainer, fresh(), ds, epochs=1, resume=True, log=logged.append)
    assert logged[-1] == "resume: no checkpoint path given, starting from scratch"


def test_fit_checks_that_the_network_takes_the_evaluation_images_before_training():
    trainer = train.make_trainer(small_net(), batch_size=5)
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    wrong = data.Dataset(jnp.zeros((3, 32, 32), jnp.uint8), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="Linear: expected .* input features"):
        train.fit(trainer, ts, tiny_data(), epochs=1, eval_data=wrong)
    assert int(ts.step) == 0  # not trained (nor donated)


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
    labels = np.asarray(ds.labels).copy()
    labels[2] = 10  # under jit only a NaN loss: evaluate checks, as fit does
    with pytest.raises(ValueError, match=r"evaluate: data labels must lie in \[0, 10\) .* got "
                                         r"10 at index 2"):
        train.evaluate(trainer, ts, data.Dataset(ds.images, jnp.asarray(labels)))


@pytest.mark.parametrize("n, spans", [(7, [(0, 3), (3, 3), (6, 1)]), (6, [(0, 3), (3, 3)]),
                                      (2, [(0, 2)]), (0, [(0, 0)])])
def test_eval_chunks_batch_as_torch_and_an_empty_set_predicts_an_empty_output(n, spans):
    trainer = train.make_trainer(small_net(), batch_size=5, eval_batch_size=3)
    assert train.eval_chunks(trainer.config, n) == spans
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    ds = tiny_data(7).range(0, n) if n else data.Dataset(tiny_data(1).images[:0],
                                                            tiny_data(1).labels[:0])
    with compiled_programs() as compiled:
        logits = trainer.predict(ts.params, ts.state, ds.images)
    assert compiled.count("jit(_logits)") == len({size for _, size in spans})
    expected, _ = small_net().apply(ts.params, ts.state, data.normalize(ds.images))
    assert logits.shape == expected.shape == (n, 10)  # none: an empty output, as torch's
    assert_close(logits, expected, tolerance("autodiff"))  # other batches: reordered sums
    if n == 0:
        with pytest.raises(ValueError, match="evaluate: expected a data set with examples"):
            train.evaluate(trainer, ts, ds)


def test_eval_chunks_normalize_as_torch_where_batchnorm_keeps_no_running_statistics():
    """In eval mode such a BatchNorm normalizes each chunk with the chunk's own statistics: a
    last chunk overlapping the one before (one program less to compile) changed row 6 by 0.07."""
    net = fcn.serial(fcn.Flatten(), fcn.Linear(3), fcn.BatchNorm1d(track_running_stats=False))
    trainer = train.make_trainer(net, batch_size=5, eval_batch_size=3)
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    ds = tiny_data(8)
    logits = trainer.predict(ts.params, ts.state, ds.images)
    x = data.normalize(ds.images)
    expected = jnp.concatenate([net.apply(ts.params, ts.state, x[a:a + size])[0]
                                for a, size in ((0, 3), (3, 3), (6, 2))])
    assert_close(logits, expected, tolerance("autodiff"))


def linear_net():  # the cheapest to compile: progress does not depend on the network
    return fcn.serial(fcn.Flatten(), fcn.Linear(10))


class RecordingProgress:
    """The progress protocol, recording every call."""

    def __init__(self):
        self.calls = []

    def every(self, steps):
        self.calls.append(("every", steps))
        return 2

    def open(self, epoch, epochs, steps):
        self.calls.append(("open", epoch, epochs, steps))

    def update(self, i, loss_sum, correct, seen):
        self.calls.append(("update", int(i), int(seen), float(loss_sum), int(correct)))

    def close(self, steps, loss, accuracy):
        self.calls.append(("close", steps, loss, accuracy))


@pytest.mark.parametrize("scan", [True, False])
def test_progress_is_passed_once_and_fit_drives_it(scan):
    progress = RecordingProgress()
    trainer = train.make_trainer(linear_net(), batch_size=5, scan=scan, progress=progress)
    result = train.fit(trainer, trainer.init(jax.random.key(0), (-1, 1, 28, 28)), tiny_data(),
                       epochs=2)
    jax.effects_barrier()  # the compiled epoch's callbacks have all run
    calls = progress.calls
    assert ("every", 5) in calls  # 23 examples in batches of 5: 4 full and a tail of 3
    for epoch, record in enumerate(result.history, start=1):
        opened = calls.index(("open", epoch, 2, 5))
        closed = calls.index(("close", 5, record["train_loss"], record["train_accuracy"]))
        updates = [c for c in calls[opened:closed] if c[0] == "update"]
        assert [(i, seen) for _, i, seen, _, _ in updates] == [(0, 5), (2, 15)]
        assert all(loss > 0 and 0 <= correct <= seen for _, _, seen, loss, correct in updates)


def test_progress_bar_shows_each_epoch(capsys):
    trainer = train.make_trainer(linear_net(), batch_size=5, scan=False,
                                 progress=train.ProgressBar())
    result = train.fit(trainer, trainer.init(jax.random.key(0), (-1, 1, 28, 28)), tiny_data(),
                       epochs=1)
    shown = capsys.readouterr().err
    assert "epoch 1/1" in shown and "5/5" in shown
    assert f"loss={result.history[0]['train_loss']:.4f}" in shown


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


def test_steps_per_epoch_trains_on_the_first_batches_of_the_order():
    """steps_per_epoch=2 of batch 5: the first two batches of the epoch's permutation, the
    same steps a full epoch starts with, and the metrics average over those 10 examples.
    (The per-step loop takes its batches from the same ``_epoch_start``.)"""
    ds = tiny_data()
    part = train.make_trainer(small_net(), optax.sgd(0.05), batch_size=5, steps_per_epoch=2)
    key = jax.random.key(5)
    ts, metrics = part.epoch(part.init(key, (-1, 1, 28, 28)), ds.images, ds.labels)
    assert int(ts.step) == 2
    # the same order and keys: a full epoch's first two steps, on 10 of the 23 examples
    whole = train.make_trainer(small_net(), optax.sgd(0.05), batch_size=5).config
    ts_whole = part.init(key, (-1, 1, 28, 28))
    _, full, _, step_key = train._epoch_start(whole, ts_whole, ds.labels)
    step = jax.jit(functools.partial(train._step_at, whole))
    totals = (jnp.zeros(()), jnp.zeros((), jnp.int32))
    for i in range(2):
        ts_whole, totals = step(ts_whole, totals, ds.images, ds.labels, full[i], i, step_key)
    for x, y in zip(jax.tree.leaves(ts.params), jax.tree.leaves(ts_whole.params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(metrics["loss"]), float(totals[0]) / 10, rtol=1e-6)
    assert float(metrics["accuracy"]) == pytest.approx(int(totals[1]) / 10)  # float32


@pytest.mark.parametrize("scan", [True, False])
def test_steps_per_epoch_is_checked(scan):
    ds = tiny_data()  # 23 examples: four full batches of 5
    trainer = train.make_trainer(small_net(), optax.sgd(0.05), batch_size=5, steps_per_epoch=5,
                                 scan=scan)
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"steps_per_epoch=5 needs 25 examples .* got a data "
                                         r"set of 23"):
        trainer.epoch(ts, ds.images, ds.labels)
    assert int(ts.step) == 0  # checked before a step donated the state
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="expected steps_per_epoch None or a positive int"):
            train.make_trainer(small_net(), optax.sgd(0.05), batch_size=5, steps_per_epoch=bad)


def test_compiler_options_reach_every_program_and_change_no_result():
    ds = tiny_data()
    loop = {"xla_cpu_use_fusion_emitters": False}
    results = []
    for options in (None, loop):
        trainer = train.make_trainer(small_net(), optax.sgd(0.05), batch_size=5,
                                     compiler_options=options)
        ts, m = trainer.epoch(trainer.init(jax.random.key(3), (-1, 1, 28, 28)), ds.images,
                              ds.labels)
        results.append((ts.params, m["loss"], train.evaluate(trainer, ts, ds).predictions))
    (pa, la, ea), (pb, lb, eb) = results
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    np.testing.assert_array_equal(ea, eb)
    assert train.TrainConfig(small_net(), None, batch_size=5, compiler_options={
        "b": 1, "a": 2}).compiler_options == (("a", 2), ("b", 1))  # frozen, in order
    bogus = train.make_trainer(small_net(), batch_size=5, compiler_options={"xla_bogus": 1})
    with pytest.raises(Exception, match="xla_bogus"):  # the initial state's program too
        bogus.init(jax.random.key(0), (-1, 1, 28, 28))
    ts = train.make_trainer(small_net(), batch_size=5).init(jax.random.key(0), (-1, 1, 28, 28))
    for run in (lambda: bogus.epoch(ts, ds.images, ds.labels),
                lambda: bogus.predict(ts.params, ts.state, ds.images)):
        with pytest.raises(Exception, match="xla_bogus"):
            run()
