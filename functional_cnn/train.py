"""The training engine: a jitted epoch (one ``lax.scan`` over on-device batches), jitted
evaluation, and :func:`fit`, the epoch loop with progress bars, checkpoints and exact resume.

Everything is explicit: a :class:`TrainState` (params, model state, optimizer state, step, PRNG
key) goes in and a new one comes out; the data stay on the device as uint8 and are normalized
(and augmented) inside the compiled step. ::

    trainer = make_trainer(net, optax.adamw(1e-3, weight_decay=1e-2), batch_size=64)
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    result = fit(trainer, ts, train_set, epochs=10, eval_data=test_set)
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Callable, NamedTuple

import jax
import numpy as np
import optax
from jax import lax
from jax import numpy as jnp

from . import checkpoint as ckpt
from . import dataparallel
from .data import Dataset, batch_indices, check_labels, normalize
from .functional.losses import cross_entropy
from .layers import Layer

REDUCTIONS = ("mean", "sum")


class TrainState(NamedTuple):
    """Everything a run needs to continue: a pytree, donated to and returned by every epoch."""

    params: object
    state: object
    opt_state: object
    step: jax.Array
    key: jax.Array


def adamw(learning_rate=1e-3, weight_decay=1e-2) -> optax.GradientTransformation:
    """``torch.optim.AdamW``'s defaults (betas 0.9/0.999, eps 1e-8, decay on every parameter)."""
    return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)


class Trainer(NamedTuple):
    """Compiled functions of one configuration (network, optimizer, loss, batch size).

    ``init(key, input_shape) -> TrainState``; ``epoch(ts, images, labels) -> (ts, metrics)``
    (jitted, ``ts`` donated); ``predict(params, state, images) -> logits`` (eval mode, jitted
    per chunk of ``eval_batch_size``); ``place(tree)`` puts a pytree (a :class:`TrainState`, a
    :class:`~functional_cnn.data.Dataset`) replicated on ``mesh`` (identity without a mesh).
    """

    init: Callable
    epoch: Callable
    predict: Callable
    config: dict
    place: Callable = lambda tree: tree  # replicate a pytree (TrainState, Dataset) on the mesh
    mesh: object = None  # the jax.sharding.Mesh the batches are split over, or None


def _default_loss(vjp, label_smoothing):
    return functools.partial(cross_entropy, reduction="none", label_smoothing=label_smoothing,
                             vjp=vjp)


def _check_config(batch_size, reduction, eval_batch_size):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"make_trainer: expected batch_size a positive int, got {batch_size!r}")
    if not isinstance(eval_batch_size, int) or eval_batch_size < 1:
        raise ValueError(f"make_trainer: expected eval_batch_size a positive int, got "
                         f"{eval_batch_size!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"make_trainer: expected reduction in {REDUCTIONS}, got {reduction!r}")


def make_trainer(net: Layer, optimizer: optax.GradientTransformation | None = None, *,
                 batch_size: int, loss: Callable | None = None, reduction: str = "mean",
                 label_smoothing: float = 0.0, preprocess: Callable = normalize,
                 augment: Callable | None = None, shuffle: bool = True, vjp: str = "custom",
                 eval_batch_size: int = 1000, on_step: Callable | None = None,
                 report_every: int = 1, scan: bool = True, mesh=None) -> Trainer:
    """Build the jitted epoch and prediction functions.

    * ``optimizer``: any optax transform; default :func:`adamw` (torch's defaults).
    * ``loss(logits, labels) -> per-example losses (N,)``; default cross-entropy with
      ``label_smoothing``. The objective is their ``reduction`` (``"mean"`` or ``"sum"``) over
      each batch -- the ragged last batch is reduced over its own size, as PyTorch does.
    * ``preprocess(uint8 images) -> float NCHW``, on the device; ``augment(key, x) -> x`` is
      applied to training batches only.
    * ``on_step(i, loss_sum, correct, seen)`` is a host callback every ``report_every`` steps
      (progress bars); leave it ``None`` for no callbacks in the compiled code.
    * ``scan=True``: the epoch is one jitted ``lax.scan`` over the batches (plus the ragged
      tail). ``scan=False`` calls the same jitted step once per batch from Python (data still on
      the device, same keys and order): on XLA:CPU that is several times faster for NCHW
      convolution networks, whose convolutions are slow inside a loop body (jax issue #12868).
    * ``mesh``: a 1-D :class:`jax.sharding.Mesh` (:func:`functional_cnn.dataparallel.make_mesh`) for
      data-parallel training. Params, model state, optimizer state and the data set are
      replicated over it and each batch is sharded along its first dimension inside the jitted
      step; XLA inserts the gradient and BatchNorm all-reduces, so the network still computes on
      the global batch (BatchNorm uses global-batch statistics) and the result does not depend on
      the number of devices. ``batch_size`` is the global batch and must divide by
      ``mesh.size`` (``ValueError`` otherwise); the ragged last batch is sharded when it divides
      too, else computed replicated (every device runs the whole tail batch). ``None``: one
      device, no sharding.
    """
    _check_config(batch_size, reduction, eval_batch_size)
    dataparallel.check_divides(batch_size, mesh)
    optimizer = optimizer or adamw()
    loss = loss or _default_loss(vjp, label_smoothing)

    # One compiled program, not an eager op (and a compilation) per parameter and optimizer
    # slot; it runs once, so LLVM's optimization level 1 is plenty (its random bits compile
    # 3x faster than at the default level, to the same values): 2.2 s -> 0.6 s at start-up.
    @functools.partial(jax.jit, static_argnums=1,
                       compiler_options={"xla_backend_optimization_level": 1})
    def fresh_state(key, input_shape) -> TrainState:
        init_key, train_key = jax.random.split(key)
        _, params, state = net.init(init_key, input_shape)
        return TrainState(params, state, optimizer.init(params), jnp.zeros((), jnp.int32),
                          train_key)

    def init(key, input_shape) -> TrainState:
        return place(fresh_state(key, tuple(input_shape)))

    def place(tree):
        return dataparallel.replicate(tree, mesh)

    # With a mesh every jitted function returns replicated values: identical on every device
    # (and process), so the host can read metrics and checkpoints from any of them.
    jit = jax.jit if mesh is None else functools.partial(
        jax.jit, out_shardings=dataparallel.replicated(mesh))

    def step(ts: TrainState, images, labels, key):
        images, labels = dataparallel.constrain_batch(mesh, images, labels)
        aug_key, drop_key = jax.random.split(key)
        x = preprocess(images)
        if augment is not None:
            x = augment(aug_key, x)

        def objective(params):
            logits, new_state = net.apply(params, ts.state, x, train=True, key=drop_key, vjp=vjp)
            per_example = loss(logits, labels)
            total = per_example.sum() if reduction == "sum" else per_example.mean()
            correct = (logits.argmax(-1) == labels).sum()
            return total, (new_state, per_example.sum(), correct)

        grads, (new_state, loss_sum, correct) = jax.grad(objective, has_aux=True)(ts.params)
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        return (TrainState(params, new_state, opt_state, ts.step + 1, ts.key),
                (loss_sum.astype(jnp.float32), correct.astype(jnp.int32)))

    def report(i, loss_sum, correct):
        if on_step is None:
            return
        seen = jnp.minimum((i + 1) * batch_size, 2 ** 31 - 1)
        lax.cond(i % report_every == 0,
                 lambda: jax.debug.callback(on_step, i, loss_sum, correct, seen),
                 lambda: None)

    def start(ts: TrainState, labels):
        """The epoch's key split and batch order; the state's key moves on to the next epoch."""
        next_key, perm_key, step_key = jax.random.split(ts.key, 3)
        full, tail = batch_indices(perm_key, labels.shape[0], batch_size, shuffle)
        return ts._replace(key=next_key), full, tail, step_key

    def step_at(ts, totals, images, labels, idx, i, step_key):
        ts, (l, c) = step(ts, images[idx], labels[idx], jax.random.fold_in(step_key, i))
        return ts, (totals[0] + l, totals[1] + c)

    def finish(totals, n):
        return {"loss": totals[0] / n, "accuracy": totals[1] / n}

    def zeros():  # fresh each epoch: the loop donates its totals
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)

    def scan_epoch(ts: TrainState, images, labels):
        ts, full, tail, step_key = start(ts, labels)

        def body(carry, idx):
            ts, i, totals = carry
            ts, totals = step_at(ts, totals, images, labels, idx, i, step_key)
            report(i, *totals)
            return (ts, i + 1, totals), None

        (ts, i, totals), _ = lax.scan(body, (ts, jnp.zeros((), jnp.int32), zeros()), full)
        if tail.shape[0]:  # the ragged last batch: its own (static) shape, never dropped
            ts, totals = step_at(ts, totals, images, labels, tail, i, step_key)
        return ts, finish(totals, labels.shape[0])

    jit_start = jit(start, donate_argnums=0)
    def step_row(ts, totals, images, labels, batches, row, i, step_key):
        return step_at(ts, totals, images, labels, batches[row], i, step_key)

    jit_step = jit(step_row, donate_argnums=(0, 1))

    # XLA:CPU with several (forced host) devices can deadlock when several steps with
    # all-reduces are in flight at once (the devices' rendezvous of different steps interleave
    # on a small thread pool): wait for each step there. One program (scan) is not affected.
    serialize = (mesh is not None and mesh.size > 1
                 and mesh.devices.flat[0].platform == "cpu")

    def loop_epoch(ts: TrainState, images, labels):
        # The same steps, each a jitted call from Python: XLA:CPU runs NCHW convolutions inside
        # a while loop (lax.scan) several times slower than outside one (jax issue #12868).
        ts, full, tail, step_key = jit_start(ts, labels)
        totals = zeros()
        for i in range(full.shape[0]):
            ts, totals = jit_step(ts, totals, images, labels, full, i, i, step_key)
            if serialize:
                jax.block_until_ready(totals)
            if on_step is not None and i % report_every == 0:
                on_step(i, *totals, (i + 1) * batch_size)
        if tail.shape[0]:
            ts, totals = jit_step(ts, totals, images, labels, tail[None], 0,
                                  full.shape[0], step_key)
        return ts, finish(totals, labels.shape[0])

    @jit
    def logits_of(params, state, chunk):
        chunk, = dataparallel.constrain_batch(mesh, chunk)
        return net.apply(params, state, preprocess(chunk), train=False, vjp=vjp)[0]

    def predict(params, state, images):
        # Chunks from Python rather than lax.map: convolutions are slow inside XLA:CPU loops.
        chunks = []
        for i in range(0, images.shape[0], eval_batch_size):
            chunks.append(logits_of(params, state, images[i:i + eval_batch_size]))
            if serialize:  # see loop_epoch
                jax.block_until_ready(chunks[-1])
        return jnp.concatenate(chunks)

    config = {"batch_size": batch_size, "reduction": reduction, "vjp": vjp,
              "label_smoothing": label_smoothing, "shuffle": shuffle,
              "augment": augment is not None, "scan": scan}
    compiled = jit(scan_epoch, donate_argnums=0) if scan else loop_epoch
    if mesh is None:
        epoch = compiled
    else:
        def epoch(ts: TrainState, images, labels):
            # a no-op for arrays already replicated on the mesh (fit places them once)
            return compiled(*place((ts, images, labels)))
    return Trainer(init, epoch, predict, config, place, mesh)


class Evaluation(NamedTuple):
    accuracy: float
    loss: float
    predictions: np.ndarray
    labels: np.ndarray


@jax.jit
def _scores(logits, labels):
    """Mean cross-entropy and predicted classes: one compiled program (eagerly, the loss alone
    takes 0.25 s of compilations on the first evaluation)."""
    return cross_entropy(logits, labels, reduction="mean"), logits.argmax(-1)


def evaluate(trainer: Trainer, ts: TrainState, data: Dataset) -> Evaluation:
    """Accuracy and mean (unsmoothed) cross-entropy of ``data`` in eval mode (``train=False``)."""
    data = trainer.place(data)
    logits = trainer.predict(*trainer.place((ts.params, ts.state)), data.images)
    loss, predictions = _scores(logits, data.labels)
    loss, predictions, labels = float(loss), np.asarray(predictions), np.asarray(data.labels)
    return Evaluation(float((predictions == labels).mean()), loss, predictions, labels)


class FitResult(NamedTuple):
    train_state: TrainState
    history: list  # one dict per epoch: train_loss, train_accuracy, [eval_accuracy], seconds
    train_seconds: float
    resumed_from_epoch: int
    evaluation: Evaluation | None = None  # eval_data's, of train_state, if the last epoch had one


def _restore(path, ts, fingerprint, log):
    """Load a checkpoint into ``ts``'s structure; refuse one written by another configuration."""
    ts, meta = ckpt.load(path, ts)
    saved = meta.get("fingerprint") or {}
    if saved != fingerprint:
        diff = {k: (fingerprint.get(k), saved.get(k)) for k in {**fingerprint, **saved}
                if fingerprint.get(k) != saved.get(k)}
        raise ckpt.CheckpointError(
            f"checkpoint {path}: written by another configuration; (expected, saved) differ in "
            f"{diff}. Remove it or pick another directory")
    log(f"resumed from {path} after epoch {meta['epoch']}")
    return ts, meta


class _Bar:
    """The current epoch's tqdm bar, updated from the compiled epoch's host callbacks."""

    def __init__(self):
        self.bar = None

    def __call__(self, i, loss_sum, correct, seen):
        if self.bar is not None:
            seen = max(int(seen), 1)
            self.bar.n = int(i) + 1
            self.bar.set_postfix(loss=f"{float(loss_sum) / seen:.4f}",
                                 acc=f"{int(correct) / seen:.4f}", refresh=False)
            self.bar.refresh()


def progress_trainer(make: Callable[..., Trainer], steps_per_epoch: int, **kwargs):
    """``make(on_step=..., report_every=...)`` wired to a tqdm bar; returns (trainer, bar)."""
    bar = _Bar()
    every = max(1, steps_per_epoch // 50)
    return make(on_step=bar, report_every=every, **kwargs), bar


def fit(trainer: Trainer, ts: TrainState, train_data: Dataset, *, epochs: int,
        eval_data: Dataset | None = None, eval_each_epoch: bool = True,
        checkpoint_path: str | None = None, resume: bool = False, fingerprint: dict | None = None,
        bar: _Bar | None = None, log: Callable = print,
        stop_after: int | None = None) -> FitResult:
    """Run ``epochs`` epochs of ``trainer.epoch`` from ``ts``.

    With ``checkpoint_path`` the train state and history are saved (atomically) after every
    epoch; ``resume=True`` continues from that file, which gives exactly the result of an
    uninterrupted run (same seed, same compiled step, the key is part of the state). The
    ``fingerprint`` (any JSON dict: data range, seed, protocol) must match to resume.
    ``stop_after=k`` stops after epoch ``k`` of the ``epochs`` planned (as an interruption
    would: schedules still span ``epochs``).
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: expected epochs a non-negative int, got {epochs!r}")
    one = jax.ShapeDtypeStruct((1, *train_data.images.shape[1:]), train_data.images.dtype)
    classes = jax.eval_shape(trainer.predict, ts.params, ts.state, one).shape[-1]
    check_labels(classes, "fit", train_data=train_data, eval_data=eval_data)
    fingerprint = {**trainer.config, **(fingerprint or {}), "examples": len(train_data)}
    fingerprint = _jsonable(fingerprint)
    history, start = [], 0
    if resume and checkpoint_path and os.path.exists(checkpoint_path):
        ts, meta = _restore(checkpoint_path, ts, fingerprint, log)
        history, start = meta["history"], meta["epoch"]
    elif resume:
        log(f"--resume: no checkpoint at {checkpoint_path}, starting from scratch")
    # replicated on the trainer's mesh once, not on every epoch (identity without a mesh)
    ts, train_data = trainer.place((ts, train_data))
    if eval_data is not None:
        eval_data = trainer.place(eval_data)
    steps = math.ceil(len(train_data) / trainer.config["batch_size"])
    train_seconds = sum(h["seconds"] for h in history)
    evaluation = None
    for e in range(start, min(epochs, stop_after or epochs)):
        if bar is not None:
            from tqdm import tqdm
            bar.bar = tqdm(total=steps, desc=f"epoch {e + 1}/{epochs}", unit="step",
                           leave=True, dynamic_ncols=True)
        t0 = time.perf_counter()
        ts, metrics = trainer.epoch(ts, train_data.images, train_data.labels)
        record = {"epoch": e + 1, "train_loss": float(metrics["loss"]),
                  "train_accuracy": float(metrics["accuracy"])}
        record["seconds"] = time.perf_counter() - t0
        train_seconds += record["seconds"]
        evaluation = None
        if eval_data is not None and (eval_each_epoch or e == epochs - 1):
            evaluation = evaluate(trainer, ts, eval_data)
            record["eval_accuracy"] = evaluation.accuracy
        if bar is not None and bar.bar is not None:
            bar.bar.n = steps
            bar.bar.set_postfix(loss=f"{record['train_loss']:.4f}",
                                acc=f"{record['train_accuracy']:.4f}", refresh=True)
            bar.bar.close()
            bar.bar = None
        history.append(record)
        if checkpoint_path and dataparallel.is_main_process():  # one writer in a multi-host run
            ckpt.save(checkpoint_path, ts, {"epoch": e + 1, "history": history,
                                            "fingerprint": fingerprint})
    return FitResult(ts, history, train_seconds, start, evaluation)


def _jsonable(d: dict) -> dict:
    """A dict as it reads back from JSON (tuples become lists), so fingerprints compare equal."""
    import json
    return json.loads(json.dumps(d))
