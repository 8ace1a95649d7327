"""``functional_cnn.precompile``: the programs compiled ahead give exactly what the trainer's
own jitted functions give, are really used (no compilation on the call), and shapes they were
not compiled for still work."""
import jax
import numpy as np
import optax
import pytest
from jax import numpy as jnp

from functional_cnn import dataparallel, train
from functional_cnn.precompile import _AheadOfTime, precompile
from tests._train_helpers import small_net, tiny_data


def _abstract(ds):
    return jax.ShapeDtypeStruct(ds.images.shape, ds.images.dtype)


def _trainer(**options):
    return train.make_trainer(small_net(), optax.adam(1e-2), batch_size=5, **options)


def test_precompiled_trainer_matches_the_plain_one_and_calls_its_own_programs():
    train_set, test_set = tiny_data(23), tiny_data(12, seed=1)
    plain = _trainer(eval_batch_size=5)  # 12 test images: chunks of 5, 5 and a tail of 2
    ahead = precompile(_trainer(eval_batch_size=5), (-1, 1, 28, 28),
                       train_images=_abstract(train_set), eval_images=_abstract(test_set))
    assert isinstance(ahead.epoch, _AheadOfTime)
    results = []
    for trainer in (plain, ahead):
        ts = trainer.init(jax.random.key(2), (-1, 1, 28, 28))
        ts, metrics = trainer.epoch(ts, train_set.images, train_set.labels)
        results.append((ts, metrics, train.evaluate(trainer, ts, test_set)))
    (a, ma, ea), (b, mb, eb) = results
    for x, y in zip(jax.tree.leaves((a.params, a.state)), jax.tree.leaves((b.params, b.state))):
        np.testing.assert_array_equal(x, y)
    assert float(ma["loss"]) == float(mb["loss"])
    assert ea.loss == eb.loss and ea.accuracy == eb.accuracy
    np.testing.assert_array_equal(ea.predictions, eb.predictions)
    # the jitted fallbacks never ran: their caches hold no compiled program
    assert ahead.epoch.jitted._cache_size() == 0 and len(ahead.epoch.compiled) == 1
    assert len(ahead.scores.compiled) == 1  # (its fallback is module-level: shared)
    assert len(ahead.predict.args[1].compiled) == 2  # chunks of 5 and of 2
    assert ahead.predict.args[1].jitted._cache_size() == 0  # each cut inside its program
    assert len(ahead.predict.args[2].compiled) == 1  # their concatenation


def test_other_shapes_fall_back_to_the_jitted_functions():
    train_set, other = tiny_data(20), tiny_data(15, seed=3)
    ahead = precompile(_trainer(), (-1, 1, 28, 28), train_images=_abstract(train_set))
    ts = ahead.init(jax.random.key(0), (-1, 1, 28, 28))
    ts, metrics = ahead.epoch(ts, other.images, other.labels)  # 15 images: compiled on use
    assert int(ts.step) == 3 and np.isfinite(float(metrics["loss"]))
    assert ahead.epoch.jitted._cache_size() == 1


def test_a_traced_call_takes_the_jitted_function_even_where_a_program_matches():
    """fit finds the network's outputs by ``jax.eval_shape`` of ``predict`` on one image: with
    an evaluation set of one image, that is the signature of a chunk compiled ahead, and an
    executable cannot take tracers."""
    train_set, test_set = tiny_data(20), tiny_data(1, seed=1)
    ahead = precompile(_trainer(), (-1, 1, 28, 28), train_images=_abstract(train_set),
                       eval_images=_abstract(test_set))
    ts = ahead.init(jax.random.key(0), (-1, 1, 28, 28))
    result = train.fit(ahead, ts, train_set, epochs=1, eval_data=test_set)
    assert result.evaluation.predictions.shape == (1,)
    assert ahead.predict.args[1].jitted._cache_size() == 0  # traced, never compiled


@pytest.mark.parametrize("mesh", [None, "one device"])  # several devices: test_parallel.py
def test_a_per_step_trainer_compiles_its_start_and_both_steps_ahead(mesh):
    mesh = None if mesh is None else dataparallel.make_mesh(1)
    train_set = tiny_data(23)  # 4 full batches of 5 and a tail of 3
    plain = _trainer(scan=False, mesh=mesh)
    ahead = precompile(_trainer(scan=False, mesh=mesh), (-1, 1, 28, 28),
                       train_images=_abstract(train_set))
    results = []
    for trainer in (plain, ahead):
        ts = trainer.init(jax.random.key(2), (-1, 1, 28, 28))
        for _ in range(2):
            ts, metrics = trainer.epoch(ts, train_set.images, train_set.labels)
        results.append((ts, metrics))
    (a, ma), (b, mb) = results
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params,
                                                                              b.opt_state))):
        np.testing.assert_array_equal(x, y)
    assert float(ma["loss"]) == float(mb["loss"])
    loop = ahead.epoch.func if mesh is None else ahead.epoch.args[1].func
    start, step = (ahead.epoch.args if mesh is None else ahead.epoch.args[1].args)[1:]
    assert loop is train._loop_epoch
    assert len(start.compiled) == 1 and len(step.compiled) == 2  # a full batch, the tail
    assert start.jitted._cache_size() == step.jitted._cache_size() == 0  # never compiled


def test_compilation_errors_surface_at_the_call():
    bad = jax.ShapeDtypeStruct((20, 28, 28), jnp.uint8)
    trainer = train.make_trainer(small_net(), optax.adam(1e-2), batch_size=5,
                                 steps_per_epoch=9)  # 9 x 5 > 20 images: raises when traced
    ahead = precompile(trainer, (-1, 1, 28, 28), train_images=bad)
    ts = ahead.init(jax.random.key(0), (-1, 1, 28, 28))
    with pytest.raises(ValueError, match="steps_per_epoch=9 needs 45 examples"):
        ahead.epoch(ts, jnp.zeros((20, 28, 28), jnp.uint8), jnp.zeros((20,), jnp.int32))


def test_lowering_errors_of_the_evaluation_surface_at_the_call():
    # the evaluation's program is lowered inside precompile (after the epoch's):
    # images of 30x30 cannot go through a network built for 28x28, and the error waits for
    # the evaluation, as a compilation error does, while training works
    train_set, test_set = tiny_data(20), tiny_data(12, seed=1)
    odd = jax.ShapeDtypeStruct((12, 30, 30), jnp.uint8)
    ahead = precompile(_trainer(), (-1, 1, 28, 28), train_images=_abstract(train_set),
                       eval_images=odd)
    ts = ahead.init(jax.random.key(0), (-1, 1, 28, 28))
    ts, _ = ahead.epoch(ts, train_set.images, train_set.labels)
    assert int(ts.step) == 4
    with pytest.raises(ValueError, match=r"Linear: expected 676 input features .* \(12, 784\)"):
        ahead.predict(ts.params, ts.state, jnp.zeros((12, 30, 30), jnp.uint8))


def test_the_evaluation_programs_are_the_trainers_and_errors_wait_for_their_call():
    """The concatenation and the scores are the trainer's programs (jitted with its options,
    shared by trainers with the same options), precompiled or not; a bad option in any
    program surfaces where it is first called, with or without precompile, scanned or not."""
    options = {"xla_cpu_use_fusion_emitters": False}
    test_set = tiny_data(12, seed=1)
    programs = train._evaluation_programs(tuple(options.items()))
    plain = _trainer(eval_batch_size=5, compiler_options=options)
    ahead = precompile(_trainer(eval_batch_size=5, compiler_options=options), (-1, 1, 28, 28),
                       eval_images=_abstract(test_set), init=False)
    assert plain.scores is ahead.scores.jitted is programs[1]
    assert plain.predict.args[-1] is ahead.predict.args[-1].jitted is programs[0]
    ts = _trainer().init(jax.random.key(2), (-1, 1, 28, 28))
    a, b = train.evaluate(plain, ts, test_set), train.evaluate(ahead, ts, test_set)
    assert a.loss == b.loss and a.accuracy == b.accuracy
    for scan in (True, False):
        bogus = precompile(_trainer(scan=scan, compiler_options={"xla_bogus": 1}),
                           (-1, 1, 28, 28), train_images=_abstract(test_set),
                           eval_images=_abstract(test_set))
        for run in (lambda: bogus.init(jax.random.key(0), (-1, 1, 28, 28)),
                    lambda: bogus.epoch(ts, test_set.images, test_set.labels),
                    lambda: train.evaluate(bogus, ts, test_set),
                    lambda: bogus.scores(jnp.zeros((2, 10)), jnp.zeros(2, jnp.int32))):
            with pytest.raises(Exception, match="xla_bogus"):
                run()
