"""Compile a trainer's programs ahead of time, concurrently, while the data load: start-up.

A jitted function compiles on its first call, so a fresh process compiles one program after the
other, each when it is first needed: the initial state, the epoch (the longest: a whole
training step), then the prediction chunk and the evaluation's scores. Their shapes are known
before the data have loaded, and XLA compiles with the GIL released, so :func:`precompile`
lowers them and compiles them on a small thread pool, returning once the small ones are
lowered; the caller loads the data meanwhile::

    trainer = precompile(make_trainer(net, optimizer, batch_size=128), (-1, 1, 28, 28),
                         train_images=jax.ShapeDtypeStruct((60000, 28, 28), jnp.uint8),
                         eval_images=jax.ShapeDtypeStruct((10000, 28, 28), jnp.uint8))
    train_set, test_set = data.load("MNIST", "train"), data.load("MNIST", "test")
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))  # waits for its program only

The returned trainer computes exactly what the original does (the same programs, compiled
earlier): each of its functions calls the executable compiled for the arguments' shapes and
dtypes when there is one (waiting for it if it is still compiling) and the ordinary jitted
function, compiling on first use, otherwise. A compilation error is raised where the program
is first called, as without precompiling.

A scanned epoch (``scan=True``) is one program; a per-step epoch's are its start and its step,
for a full batch and, where the data leave one, for the ragged last batch. With
a mesh the epoch's and the evaluation's programs are compiled for arguments replicated over
it, as the trainer places them (the initial state is computed on one device and replicated
after). With ``FUNCTIONAL_CNN_CONV=auto`` a convolution shape not yet in the cache is measured
while it is traced, here on the calling thread or a worker, beside the other compilations, so
its timings would be disturbed: run once without precompiling to fill the cache first.

On 2 cores the compilations also compete with each other and with the data loading: XLA
compiles one program on about 1.7 cores (the epoch of ``experiments/time_to_accuracy.py``:
3.0 s of wall time, 5.2 s of CPU, 2-core Xeon), so every other program compiling beside it
delays it; and tracing and lowering are Python, one thread at a time. So the initial state's,
the scanned epoch's and the evaluation's chunk programs are lowered on the calling thread, in
the order they are needed, each compiling on a worker as soon as it is lowered: the initial
state's while the epoch's is traced (on a core that would otherwise wait), the epoch's while
the evaluation's is traced. (A per-step epoch's programs, and the small concatenation and
scores programs, are lowered and compiled on a worker.) Traced beside the epoch's, the
evaluation's tracing had taken the GIL from it: the race's epoch ready at 2.06 s median
against 2.27, 99% reached at 4.76 s against 5.26, sooner in 9 of 10 alternating fresh
processes (a 2-core AMD EPYC). What shortens the start most is less to compile (the initial
state's program is compiled for speed of compilation: ``train._fresh_state_program``).
"""
from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import jax
from jax import numpy as jnp

from . import dataparallel, train

LABELS_DTYPE = jnp.int32  # functional_cnn.data's labels


def _signature(args) -> tuple:
    """What an executable is compiled for: the tree, and each leaf's shape and dtype (or, for
    a static Python value such as an input shape, the value itself)."""
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") else x
                       for x in leaves)


class _AheadOfTime:
    """``jitted``, with executables compiled ahead for some argument signatures.

    ``pending``: callables, each waiting for one compile job and returning its
    ``{signature: executable}``; they are waited for on the first call only."""

    def __init__(self, jitted: Callable, pending: list[Callable[[], dict]]):
        self.jitted, self.pending, self.compiled = jitted, pending, None

    def __call__(self, *args):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
            return self.jitted(*args)  # traced (jax.eval_shape, an outer jit): no executable
        if self.compiled is None:
            self.compiled = {}
            for wait in self.pending:
                self.compiled.update(wait())
        return self.compiled.get(_signature(args), self.jitted)(*args)


def _labels(n: int, sharding=None):
    return jax.ShapeDtypeStruct((n,), LABELS_DTYPE, sharding=sharding)


def _labels_of(images):
    """The labels of ``images``-shaped training data: one each, placed as the images."""
    return _labels(images.shape[0], getattr(images, "sharding", None))


def _placed(cfg: train.TrainConfig, tree):
    """Abstract values (or arrays) as the trainer's functions get them: replicated over its
    mesh (the arguments' shardings are part of what a program is compiled for), or as they
    are without one."""
    if cfg.mesh is None:
        return tree
    sharding = dataparallel.replicated(cfg.mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        tree)


def _here(fn, *args) -> Future:
    """``fn(*args)``, run now on this thread, its result or its error kept in a future: a
    lowering's error is raised where the program is first called, as a compilation's is."""
    done = Future()
    try:
        done.set_result(fn(*args))
    except Exception as e:  # noqa: BLE001 -- re-raised by the job that needs it
        done.set_exception(e)
    return done


def _without_static(compiled, index: int):
    """``compiled``, called as its jitted function is: with the static argument at ``index``,
    which the compiled program does not take (it was compiled for its value)."""
    return lambda *args: compiled(*args[:index], *args[index + 1:])


def _compile_init(lowered: Future, key, input_shape) -> dict:
    return {_signature((key, input_shape)): _without_static(lowered.result().compile(), 1)}


def _compile_epoch(lowered: Future, ts, images) -> dict:
    return {_signature((ts, images, _labels_of(images))): lowered.result().compile()}


def _compile_loop(cfg, start, step, ts, images) -> tuple[dict, dict]:
    """A per-step epoch's programs for ``images``-shaped data: its start, and its step for a
    full batch and for the ragged last one (if any), with the totals placed as the loop places
    them and numpy int32 step numbers. One job: the epoch's first call waits for all three (the
    tail's step compiled beside training would stall its steps on a small machine)."""
    labels = _labels_of(images)
    lowered_start = start.lower(ts, labels)
    ts_after, full, tail, step_key = lowered_start.out_info
    totals = _placed(cfg, jax.eval_shape(train._zero_totals))
    i = jax.ShapeDtypeStruct((), jnp.int32)
    steps = {}
    for rows in (full, tail) if tail.shape[1] else (full,):
        args = (ts_after, totals, images, labels, rows, i, i, step_key)
        steps[_signature(args)] = step.lower(*args).compile()
    return {_signature((ts, labels)): lowered_start.compile()}, steps


def _ahead_epoch(cfg, pool, ts, train_images):
    """The trainer's epoch, its programs compiling on ``pool`` for ``train_images``-shaped
    data (none if None): the scanned epoch's one (lowered here first), or the per-step loop's
    start and steps (lowered and compiled on the pool)."""
    if cfg.scan:
        epoch = train._scan_epoch_program(cfg)
        jobs = [] if train_images is None else [pool.submit(
            _compile_epoch, _here(epoch.lower, ts, train_images, _labels_of(train_images)),
            ts, train_images).result]
        epoch = _AheadOfTime(epoch, jobs)
    else:
        start, step = train._loop_programs(cfg)
        job = None if train_images is None else pool.submit(_compile_loop, cfg, start, step,
                                                             ts, train_images)
        epoch = functools.partial(
            train._loop_epoch, cfg, _AheadOfTime(start, [lambda: job.result()[0]] if job else []),
            _AheadOfTime(step, [lambda: job.result()[1]] if job else []))
    return epoch if cfg.mesh is None else functools.partial(train._placed_epoch, cfg, epoch)


def _lower_chunks(cfg, logits, ts, images) -> tuple[dict, list]:
    """The prediction chunks of ``images``-shaped data (one program per chunk size), lowered,
    and every chunk's logits (abstract, in order)."""
    lowered, out = {}, {}
    start = jax.ShapeDtypeStruct((), jnp.int32)
    sizes = [size for _, size in train.eval_chunks(cfg, images.shape[0])]
    for size in sorted(set(sizes)):
        program = logits.lower(size, ts.params, ts.state, images, start)
        lowered[_signature((size, ts.params, ts.state, images, start))] = program
        out[size] = program.out_info
    return lowered, [out[size] for size in sizes]


def _compile_chunks(lowered_chunks: Future) -> tuple[dict, list]:
    lowered, chunk_logits = lowered_chunks.result()
    return {sig: _without_static(low.compile(), 0) for sig, low in lowered.items()}, chunk_logits


def _compile_scores(programs: tuple, chunks: Future, n: int) -> tuple[dict, dict]:
    """The chunks' concatenation and the scores of all ``n`` examples' logits (``programs``:
    the trainer's, :func:`train._evaluation_programs`; the shapes: from the chunks')."""
    concatenate, scores = programs
    _, chunk_logits = chunks.result()
    sharding = getattr(chunk_logits[0], "sharding", None)
    all_logits = jax.ShapeDtypeStruct((n, chunk_logits[0].shape[-1]), chunk_logits[0].dtype,
                                      sharding=sharding)
    compiled = scores.lower(all_logits, _labels(n, sharding)).compile()
    return ({_signature((chunk_logits,)): concatenate.lower(chunk_logits).compile()},
            {_signature((all_logits, _labels(n))): compiled})


def precompile(trainer: train.Trainer, input_shape, *, train_images=None, eval_images=None,
               key=None, init: bool = True, workers: int = 2) -> train.Trainer:
    """``trainer`` with its programs compiling ahead, on ``workers`` threads (see the module
    docstring). ``input_shape`` as for ``trainer.init``; ``train_images`` / ``eval_images``:
    ``jax.ShapeDtypeStruct`` (or arrays) like the data sets' images (labels are int32), or
    None to leave that program to compile on first use; ``init=False`` leaves the initial
    state's program to compile on first use too (a trainer that will only evaluate). ``key``:
    a PRNG key like the one ``init`` will get (default ``jax.random.key(0)``'s type)."""
    cfg = trainer.config
    key = jax.eval_shape(lambda: jax.random.key(0)) if key is None else key
    input_shape = tuple(input_shape)
    fresh_state = train._fresh_state_program(cfg)
    # the state's shapes, by abstract evaluation; the programs lowered here one after the
    # other, each compiling on the pool once lowered: the initial state's first (it compiles
    # while the epoch's is traced), the evaluation's chunks last (the module docstring)
    ts = _placed(cfg, jax.eval_shape(lambda k: train._fresh_state(cfg, k, input_shape), key))
    train_images, eval_images = _placed(cfg, (train_images, eval_images))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="precompile")
    inits = [pool.submit(_compile_init, _here(fresh_state.lower, key, input_shape), key,
                         input_shape).result] if init else []
    epoch = _ahead_epoch(cfg, pool, ts, train_images)
    logits = train._logits_program(cfg)
    programs = train._evaluation_programs(cfg.compiler_options)
    chunks, concatenations, scores = [], [], []
    if eval_images is not None:
        lowered_chunks = _here(_lower_chunks, cfg, logits, ts, eval_images)
        chunk_job = pool.submit(_compile_chunks, lowered_chunks)
        chunks.append(lambda: chunk_job.result()[0])
        score_job = pool.submit(_compile_scores, programs, chunk_job, eval_images.shape[0])
        concatenations.append(lambda: score_job.result()[0])
        scores.append(lambda: score_job.result()[1])
    pool.shutdown(wait=False)
    return train.Trainer(
        cfg, functools.partial(train._init, cfg, _AheadOfTime(fresh_state, inits)), epoch,
        functools.partial(train._predict, cfg, _AheadOfTime(logits, chunks),
                          _AheadOfTime(programs[0], concatenations)),
        _AheadOfTime(programs[1], scores))
