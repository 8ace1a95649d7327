"""The training engine: a jitted epoch (one ``lax.scan`` over on-device batches), jitted
evaluation, and :func:`fit`, the epoch loop with progress bars, checkpoints and exact resume.

Everything is explicit: a :class:`TrainState` (params, model state, optimizer state, step, PRNG
key) goes in and a new one comes out; the data stay on the device as uint8 and are normalized
(and augmented) inside the compiled step. ::

    trainer = make_trainer(net, optax.adamw(1e-3, weight_decay=1e-2), batch_size=64)
    ts = trainer.init(jax.random.key(0), (-1, 1, 28, 28))
    result = fit(trainer, ts, train_set, epochs=10, eval_data=test_set)

:func:`make_trainer` freezes its arguments into one :class:`TrainConfig`; every piece below (the
step, the two epoch strategies, prediction) is a module-level function of that configuration,
and the trainer holds them jitted.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Callable, Mapping, NamedTuple

import jax
import numpy as np
import optax
from jax import lax
from jax import numpy as jnp

from . import checkpoint as ckpt
from . import dataparallel
from .data import Dataset, batch_indices, check_labels, check_pairs, normalize
from .functional.losses import cross_entropy
from .layers import Layer

# How a batch's per-example losses become the objective (``"none"``, which the losses accept,
# is no objective).
BATCH_REDUCTIONS = ("mean", "sum")


class TrainState(NamedTuple):
    """Everything a run needs to continue: a pytree, donated to and returned by every epoch."""

    params: object
    state: object
    opt_state: object
    step: jax.Array
    key: jax.Array


def adamw(learning_rate=1e-3, weight_decay=1e-2, *, b2: float = 0.999,
          nesterov: bool = False) -> optax.GradientTransformation:
    """``torch.optim.AdamW``'s defaults (betas 0.9/0.999, eps 1e-8, decay on every parameter);
    ``b2``: the second moment's decay; ``nesterov=True``: the first moment with Nesterov's
    look-ahead (``optax.nadamw``)."""
    return optax.adamw(learning_rate, b1=0.9, b2=b2, eps=1e-8, weight_decay=weight_decay,
                       nesterov=nesterov)


class ProgressBar:
    """A tqdm bar per epoch, moved by the compiled epoch's host callbacks.

    The trainer calls ``update(i, loss_sum, correct, seen)`` after step ``i`` every
    ``every(steps)`` steps (about ``updates_per_epoch`` times an epoch); :func:`fit` calls
    ``open`` and ``close`` around each epoch. Any object with these four methods can be passed
    as ``make_trainer(progress=...)``; outside an open epoch ``update`` does nothing.
    """

    def __init__(self, updates_per_epoch: int = 50):
        self.updates_per_epoch = updates_per_epoch
        self._bar = None

    def every(self, steps: int) -> int:
        return max(1, steps // self.updates_per_epoch)

    def open(self, epoch: int, epochs: int, steps: int) -> None:
        from tqdm import tqdm
        self._bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", unit="step", leave=True,
                         dynamic_ncols=True)

    def update(self, i, loss_sum, correct, seen) -> None:
        if self._bar is not None:
            seen = max(int(seen), 1)
            self._bar.n = int(i) + 1
            self._show(float(loss_sum) / seen, int(correct) / seen, refresh=False)
            self._bar.refresh()

    def close(self, steps: int, loss: float, accuracy: float) -> None:
        if self._bar is not None:
            self._bar.n = steps
            self._show(loss, accuracy, refresh=True)
            self._bar.close()
            self._bar = None

    def _show(self, loss, accuracy, refresh):
        self._bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.4f}", refresh=refresh)


@dataclasses.dataclass(frozen=True)
class DefaultLoss:
    """The trainer's loss where none is given: cross-entropy per example with the config's
    ``label_smoothing`` and ``vjp``. A value, not a closure, so that a config copied with
    ``dataclasses.replace`` derives it again from its own settings."""

    vjp: str
    label_smoothing: float

    def __call__(self, logits, labels):
        return cross_entropy(logits, labels, reduction="none",
                             label_smoothing=self.label_smoothing, vjp=self.vjp)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_config(batch_size, reduction, eval_batch_size, steps_per_epoch):
    if not _positive_int(batch_size):
        raise ValueError(f"make_trainer: expected batch_size a positive int, got {batch_size!r}")
    if steps_per_epoch is not None and not _positive_int(steps_per_epoch):
        raise ValueError(f"make_trainer: expected steps_per_epoch None or a positive int, got "
                         f"{steps_per_epoch!r}")
    if not _positive_int(eval_batch_size):
        raise ValueError(f"make_trainer: expected eval_batch_size a positive int, got "
                         f"{eval_batch_size!r}")
    if reduction not in BATCH_REDUCTIONS:
        raise ValueError(f"make_trainer: expected reduction in {BATCH_REDUCTIONS}, got "
                         f"{reduction!r}")


# sync_batch_norm=False: the fewest examples a device's BatchNorm normalizes by themselves
MIN_SHARD = 2


def _check_sync_batch_norm(cfg: TrainConfig):
    if not isinstance(cfg.sync_batch_norm, bool):
        raise ValueError(f"make_trainer: expected sync_batch_norm True or False, got "
                         f"{cfg.sync_batch_norm!r}")
    if cfg.per_device_batch_norm and not cfg.splits_per_device(cfg.batch_size):
        n = cfg.mesh.size
        raise ValueError(
            f"make_trainer: sync_batch_norm=False normalizes each device's shard by its own "
            f"statistics, which needs at least {MIN_SHARD} examples per device; batch_size "
            f"{cfg.batch_size} over {n} devices gives {cfg.batch_size // n}. Use a batch size "
            f"of at least {MIN_SHARD * n}, fewer devices, or sync_batch_norm=True")


# The formulation pins in a layer's name (conv2d's, for training or evaluation) change the
# speed and the rounding only, as compiler options do: a checkpoint resumes across them.
_PINS = re.compile(r", (?:train|eval)_formulation=(?:None|'\w+')")


def network_text(net: Layer) -> str:
    """``repr(net)``, the calls that built it, without formulation pins: what a checkpoint's
    fingerprint records of the network. (Layers built from bare ``(init, apply)`` functions
    are named ``Layer`` only.)"""
    return _PINS.sub("", repr(net))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training configuration, frozen; :func:`make_trainer` documents the fields.

    ``optimizer=None`` becomes :func:`adamw` and ``loss=None`` the cross-entropy with
    ``label_smoothing`` (:class:`DefaultLoss`), which smooths that loss only: with a loss of
    one's own it must stay 0. The batch sizes, ``reduction`` and the mesh are checked here.
    """

    net: Layer
    optimizer: optax.GradientTransformation | None
    batch_size: int
    loss: Callable | None = None
    reduction: str = "mean"
    label_smoothing: float = 0.0
    preprocess: Callable = normalize
    augment: Callable | None = None
    shuffle: bool = True
    steps_per_epoch: int | None = None
    vjp: str = "custom"
    eval_batch_size: int = 1000
    scan: bool = True
    mesh: object = None  # a 1-D jax.sharding.Mesh, or None: one device
    sync_batch_norm: bool = True  # with a mesh: BatchNorm over the global batch
    progress: object = None  # a ProgressBar (or alike), or None: no callbacks in compiled code
    # XLA's options for the trainer's programs: a mapping, kept as sorted (name, value) pairs
    # (frozen and hashable)
    compiler_options: Mapping | tuple | None = None

    def __post_init__(self):
        _check_config(self.batch_size, self.reduction, self.eval_batch_size,
                      self.steps_per_epoch)
        object.__setattr__(self, "compiler_options",
                           tuple(sorted(dict(self.compiler_options or {}).items())))
        dataparallel.check_divides(self.batch_size, self.mesh)
        _check_sync_batch_norm(self)
        if self.optimizer is None:  # frozen: the defaults are resolved once, here
            object.__setattr__(self, "optimizer", adamw())
        if self.loss is None or isinstance(self.loss, DefaultLoss):
            object.__setattr__(self, "loss", DefaultLoss(self.vjp, self.label_smoothing))
        elif self.label_smoothing != 0:
            raise ValueError(f"make_trainer: label_smoothing smooths the default loss only; got "
                             f"a loss of your own and label_smoothing={self.label_smoothing!r}. "
                             f"Smooth inside your loss, and leave label_smoothing at 0")

    def fingerprint(self) -> dict:
        """The settings a checkpoint must have been written with to be resumed, the network
        (:func:`network_text`) among them."""
        settings = {"network": network_text(self.net),
                    "batch_size": self.batch_size, "reduction": self.reduction,
                    "vjp": self.vjp, "label_smoothing": self.label_smoothing,
                    "shuffle": self.shuffle, "augment": self.augment is not None,
                    "scan": self.scan, "steps_per_epoch": self.steps_per_epoch}
        if self.per_device_batch_norm:  # the result depends on the number of devices
            settings["per_device_batch_norm"] = self.mesh.size
        return settings  # otherwise as before the option: their checkpoints still resume

    @property
    def per_device_batch_norm(self) -> bool:
        """Whether each device trains on its shard alone (``sync_batch_norm=False`` over
        several devices)."""
        return not self.sync_batch_norm and self.mesh is not None and self.mesh.size > 1

    def splits_per_device(self, batch_size: int) -> bool:
        """Whether a batch of ``batch_size`` runs shard by shard (per-device BatchNorm, and
        equal shards of at least :data:`MIN_SHARD` examples)."""
        if not self.per_device_batch_norm:
            return False
        n = self.mesh.size
        return batch_size % n == 0 and batch_size >= MIN_SHARD * n

    @property
    def wait_each_call(self) -> bool:
        """XLA:CPU with several (forced host) devices can deadlock when several steps with
        all-reduces are in flight at once (the devices' rendezvous of different steps
        interleave on a small thread pool): there the host waits for each call. One program
        (scan) is not affected."""
        mesh = self.mesh
        return mesh is not None and mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


class Trainer(NamedTuple):
    """Compiled functions of one :class:`TrainConfig`.

    ``init(key, input_shape) -> TrainState``; ``epoch(ts, images, labels) -> (ts, metrics)``
    (jitted, ``ts`` donated); ``predict(params, state, images) -> logits`` (eval mode, jitted
    per chunk of ``eval_batch_size``); ``place(tree)`` puts a pytree (a :class:`TrainState`, a
    :class:`~functional_cnn.data.Dataset`) replicated on the mesh (identity without a mesh).
    """

    config: TrainConfig
    init: Callable
    epoch: Callable
    predict: Callable
    scores: Callable | None = None  # (logits, labels) -> (mean loss, predictions); None: jitted

    @property
    def mesh(self):
        """The jax.sharding.Mesh the batches are split over, or None."""
        return self.config.mesh

    def place(self, tree):
        return dataparallel.replicate(tree, self.config.mesh)


# ----------------------------------------------------------------------------- the pieces

def _jit_with(compiler_options: tuple):
    """``jax.jit`` with XLA's ``compiler_options`` (``TrainConfig.compiler_options``' pairs)."""
    return functools.partial(jax.jit, compiler_options=dict(compiler_options) or None)


def _jit(cfg: TrainConfig):
    """``jax.jit`` with the trainer's XLA options; with a mesh every result is replicated:
    identical on every device (and process), so the host can read metrics and checkpoints
    from any of them."""
    jit = _jit_with(cfg.compiler_options)
    if cfg.mesh is None:
        return jit
    return functools.partial(jit, out_shardings=dataparallel.replicated(cfg.mesh))


def _fresh_state(cfg: TrainConfig, key, input_shape) -> TrainState:
    init_key, train_key = jax.random.split(key)
    _, params, state = cfg.net.init(init_key, input_shape)
    return TrainState(params, state, cfg.optimizer.init(params), jnp.zeros((), jnp.int32),
                      train_key)


def _init(cfg: TrainConfig, fresh_state: Callable, key, input_shape) -> TrainState:
    return dataparallel.replicate(fresh_state(key, tuple(input_shape)), cfg.mesh)


def _objective(cfg: TrainConfig, model_state, x, labels, drop_key, params):
    """The batch's reduced loss, and (new model state, loss sum, correct count)."""
    logits, new_state = cfg.net.apply(params, model_state, x, train=True, key=drop_key,
                                      vjp=cfg.vjp)
    per_example = cfg.loss(logits, labels)
    if per_example.shape != labels.shape:  # a mean already: reduced twice, in silence
        raise ValueError(f"make_trainer: expected loss(logits, labels) to return one loss per "
                         f"example, shape {labels.shape}; got shape {per_example.shape} (the "
                         f"trainer reduces them itself, by reduction={cfg.reduction!r})")
    total = per_example.sum() if cfg.reduction == "sum" else per_example.mean()
    correct = (logits.argmax(-1) == labels).sum()
    return total, (new_state, per_example.sum(), correct)


def _batch_gradients(cfg: TrainConfig, params, model_state, x, labels, drop_key):
    """The objective's gradient on one batch, and (new model state, loss sum, correct)."""
    objective = functools.partial(_objective, cfg, model_state, x, labels, drop_key)
    return jax.grad(objective, has_aux=True)(params)


def _gradients(cfg: TrainConfig, batch_size: int) -> Callable:
    """:func:`_batch_gradients`, on each device's shard where the trainer asks for per-device
    BatchNorm statistics (``sync_batch_norm=False``) and the batch splits evenly into shards
    of at least :data:`MIN_SHARD` examples; a ragged tail that does not is computed as one
    batch, replicated (with the whole tail's statistics)."""
    gradients = functools.partial(_batch_gradients, cfg)
    if not cfg.splits_per_device(batch_size):
        return gradients
    return dataparallel.per_device_gradients(gradients, cfg.mesh, cfg.reduction)


def _train_step(cfg: TrainConfig, ts: TrainState, images, labels, key):
    """One optimizer step on one batch: (new state, (loss sum, correct count))."""
    images, labels = dataparallel.constrain_batch(cfg.mesh, images, labels)
    aug_key, drop_key = jax.random.split(key)
    x = cfg.preprocess(images)
    if cfg.augment is not None:
        x = cfg.augment(aug_key, x)
    grads, (new_state, loss_sum, correct) = _gradients(cfg, x.shape[0])(
        ts.params, ts.state, x, labels, drop_key)
    updates, opt_state = cfg.optimizer.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    return (TrainState(params, new_state, opt_state, ts.step + 1, ts.key),
            (loss_sum.astype(jnp.float32), correct.astype(jnp.int32)))


def _epoch_start(cfg: TrainConfig, ts: TrainState, labels):
    """The epoch's key split and batch order; the state's key moves on to the next epoch.
    With ``steps_per_epoch`` the epoch is the first that many full batches of the order."""
    next_key, perm_key, step_key = jax.random.split(ts.key, 3)
    full, tail = batch_indices(perm_key, labels.shape[0], cfg.batch_size, cfg.shuffle)
    if cfg.steps_per_epoch is not None:
        full, tail = full[:cfg.steps_per_epoch], tail[:0]
    return ts._replace(key=next_key), full, tail, step_key


def epoch_examples(cfg: TrainConfig, n: int) -> int:
    """How many of ``n`` examples one epoch trains on: all, or ``steps_per_epoch`` full
    batches (``ValueError`` if the data set has fewer)."""
    if cfg.steps_per_epoch is None:
        return n
    if cfg.steps_per_epoch > n // cfg.batch_size:
        raise ValueError(f"epoch: steps_per_epoch={cfg.steps_per_epoch} needs "
                         f"{cfg.steps_per_epoch * cfg.batch_size} examples (batch_size "
                         f"{cfg.batch_size}), got a data set of {n}")
    return cfg.steps_per_epoch * cfg.batch_size


def _step_at(cfg: TrainConfig, ts, totals, images, labels, idx, i, step_key):
    """Step ``i`` on the examples ``idx``, its key folded from ``step_key``; totals summed."""
    ts, (loss_sum, correct) = _train_step(cfg, ts, images[idx], labels[idx],
                                          jax.random.fold_in(step_key, i))
    return ts, (totals[0] + loss_sum, totals[1] + correct)


def _zero_totals(xp=jnp):
    """The loss sum and correct count before an epoch's first step (``xp``: the array module)."""
    return xp.zeros((), xp.float32), xp.zeros((), xp.int32)


def _placed_zero_totals(cfg: TrainConfig):
    """:func:`_zero_totals` for the per-step loop, placed as each step returns its totals
    (replicated over the mesh): the first step's call otherwise has other input types than the
    second's, which compiled the step again (0.8 s for LeNet on the AMD EPYC of
    docs/BENCHMARKS.md), and eager zeros compile programs of their own."""
    return dataparallel.put(_zero_totals(np), cfg.mesh)


def _epoch_metrics(totals, n):
    """Mean loss and accuracy from the totals, in float32: inside the epoch's program, or on
    the host (numpy: an eager division compiles a program of its own)."""
    return {"loss": totals[0] / np.float32(n),
            "accuracy": totals[1].astype(np.float32) / np.float32(n)}


def _report_every(cfg: TrainConfig, n: int) -> int:
    return cfg.progress.every(-(-epoch_examples(cfg, n) // cfg.batch_size))


def _scan_epoch(cfg: TrainConfig, ts: TrainState, images, labels):
    """The whole epoch as one program: a ``lax.scan`` over the full batches, then the tail."""
    check_pairs("trainer.epoch", images, labels)
    ts, full, tail, step_key = _epoch_start(cfg, ts, labels)
    every = None if cfg.progress is None else _report_every(cfg, labels.shape[0])

    def body(carry, idx):
        ts, i, totals = carry
        ts, totals = _step_at(cfg, ts, totals, images, labels, idx, i, step_key)
        if every is not None:
            seen = jnp.minimum((i + 1) * cfg.batch_size, 2 ** 31 - 1)
            lax.cond(i % every == 0,
                     lambda: jax.debug.callback(cfg.progress.update, i, *totals, seen),
                     lambda: None)
        return (ts, i + 1, totals), None

    (ts, i, totals), _ = lax.scan(body, (ts, jnp.zeros((), jnp.int32), _zero_totals()), full)
    if tail.shape[0]:  # the ragged last batch: its own (static) shape, never dropped
        ts, totals = _step_at(cfg, ts, totals, images, labels, tail, i, step_key)
    return ts, _epoch_metrics(totals, epoch_examples(cfg, labels.shape[0]))


def _step_row(cfg: TrainConfig, ts, totals, images, labels, batches, row, i, step_key):
    return _step_at(cfg, ts, totals, images, labels, batches[row], i, step_key)


def _loop_epoch_start(cfg: TrainConfig, ts: TrainState, labels):
    """:func:`_epoch_start`, its tail a row of batches as :func:`_step_row` takes them (cut
    here: eagerly, ``tail[None]`` compiled a program of its own)."""
    ts, full, tail, step_key = _epoch_start(cfg, ts, labels)
    return ts, full, tail[None], step_key


def _loop_epoch(cfg: TrainConfig, start: Callable, step: Callable, ts: TrainState, images,
                labels):
    """The same steps, each a jitted call from Python (``start``, ``step``: the jitted
    :func:`_loop_epoch_start` and :func:`_step_row`): XLA:CPU runs NCHW convolutions inside a
    while loop (``lax.scan``) several times slower than outside one (jax issue #12868)."""
    check_pairs("trainer.epoch", images, labels)
    examples = epoch_examples(cfg, labels.shape[0])  # before a step donates ts, as the scan
    ts, full, tail, step_key = start(ts, labels)
    every = None if cfg.progress is None else _report_every(cfg, labels.shape[0])
    totals = _placed_zero_totals(cfg)
    for i in range(full.shape[0]):  # numpy ints: typed as precompile's programs take them
        ts, totals = step(ts, totals, images, labels, full, np.int32(i), np.int32(i), step_key)
        if cfg.wait_each_call:
            jax.block_until_ready(totals)
        if every is not None and i % every == 0:
            cfg.progress.update(i, *totals, (i + 1) * cfg.batch_size)
    if tail.shape[1]:
        ts, totals = step(ts, totals, images, labels, tail, np.int32(0),
                          np.int32(full.shape[0]), step_key)
    metrics = _epoch_metrics(jax.device_get(totals), examples)
    return ts, dataparallel.put(metrics, cfg.mesh)  # arrays, as the scanned epoch returns


def _placed_epoch(cfg: TrainConfig, epoch: Callable, ts: TrainState, images, labels):
    # a no-op for arrays already replicated on the mesh (fit places them once)
    return epoch(*dataparallel.replicate((ts, images, labels), cfg.mesh))


def _logits(cfg: TrainConfig, size: int, params, state, images, start):
    """Eval-mode logits of ``images[start:start + size]``, the chunk cut inside the program:
    an eager slice is a program of its own, compiled on the first evaluation (55 ms, after
    training, on the AMD EPYC of docs/BENCHMARKS.md)."""
    chunk, = dataparallel.constrain_batch(cfg.mesh, lax.dynamic_slice_in_dim(images, start,
                                                                             size))
    return cfg.net.apply(params, state, cfg.preprocess(chunk), train=False, vjp=cfg.vjp)[0]


def _concatenate(chunks):
    """The chunks' logits as one array (jitted, :func:`_evaluation_programs`, so that it can be
    compiled ahead: eagerly, a first concatenation of 20 chunks compiled for 28 ms after
    training)."""
    return jnp.concatenate(chunks)


def eval_chunks(cfg: TrainConfig, n: int) -> list[tuple[int, int]]:
    """``(start, size)`` of each chunk :func:`_predict` splits ``n`` examples into: chunks of
    ``eval_batch_size``, the last possibly shorter, as torch's ``DataLoader`` batches them
    (the last one does not overlap the one before, which would save its program's compilation:
    a BatchNorm without running statistics normalizes each chunk with its own); no example,
    one empty chunk (an empty output, as torch's)."""
    if n == 0:
        return [(0, 0)]
    return [(start, min(cfg.eval_batch_size, n - start))
            for start in range(0, n, cfg.eval_batch_size)]


def _predict(cfg: TrainConfig, logits: Callable, concatenate: Callable, params, state, images):
    # Chunks from Python rather than lax.map: convolutions are slow inside XLA:CPU loops.
    chunks = []
    for start, size in eval_chunks(cfg, images.shape[0]):
        chunks.append(logits(size, params, state, images, np.int32(start)))
        if cfg.wait_each_call:
            jax.block_until_ready(chunks[-1])
    return concatenate(chunks)


def make_trainer(net: Layer, optimizer: optax.GradientTransformation | None = None,
                 **options) -> Trainer:
    """Build the jitted epoch and prediction functions of ``TrainConfig(net, optimizer,
    **options)``; ``batch_size`` is required.

    * ``optimizer``: any optax transform; default :func:`adamw` (torch's defaults).
    * ``loss(logits, labels) -> per-example losses (N,)``, else ``ValueError``; by default
      cross-entropy with ``label_smoothing`` (only then). The objective is their ``reduction``
      (``"mean"`` or ``"sum"``) over each batch, a ragged last batch over its own size (torch's).
    * ``preprocess(uint8 images) -> float NCHW`` (default :func:`~functional_cnn.data.normalize`),
      on the device; ``augment(key, x) -> x`` is applied to training batches only;
      ``shuffle=False`` keeps the data's order every epoch; ``steps_per_epoch=S`` makes an
      epoch the first ``S`` batches of the (reshuffled) order: a fraction of the data, no
      ragged tail (what a time-to-accuracy recipe wants: one compiled step, not two).
      ``vjp``: ``"custom"`` or ``"autodiff"``; ``eval_batch_size``: the chunk :func:`evaluate`
      predicts at once (1000).
    * ``progress``: a :class:`ProgressBar` (or an object with its methods), shown by :func:`fit`
      and updated from the compiled epoch by host callbacks; ``None`` (default): no callbacks
      in the compiled code.
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
    * ``sync_batch_norm=False`` (with a mesh): each device runs the network on its shard of
      every batch alone, so BatchNorm normalizes with the shard's statistics (torch's
      ``DistributedDataParallel`` without ``SyncBatchNorm``) and the result depends on the
      number of devices; the gradients, running statistics and metrics are combined by one
      all-reduce per step (:func:`~functional_cnn.dataparallel.per_device_gradients`). What
      it buys is speed where collectives are dear: two host devices on a 2-core CPU run the
      race network of ``experiments/time_to_accuracy.py`` 1.2-1.4x faster than one device
      (docs/SPEED_LOG.md, session 11). The batch size must give each device at least 2 examples
      (``ValueError`` otherwise); a ragged tail that does not split evenly into such shards
      is computed as one batch, replicated. Without a mesh, or over one device, it changes
      nothing.
    * ``compiler_options``: ``jax.jit``'s, for every program of the trainer; e.g. XLA:CPU's
      loop emitters (``{"xla_cpu_use_fusion_emitters": False}``) halve a short run's
      compilation, for slower steps (``experiments/time_to_accuracy.py``). They change speed
      and rounding only, and are not in the checkpoint's fingerprint.
    """
    cfg = TrainConfig(net, optimizer, **options)
    fresh_state = _fresh_state_program(cfg)
    if cfg.scan:
        epoch = _scan_epoch_program(cfg)
    else:
        epoch = functools.partial(_loop_epoch, cfg, *_loop_programs(cfg))
    if cfg.mesh is not None:
        epoch = functools.partial(_placed_epoch, cfg, epoch)
    concatenate, scores = _evaluation_programs(cfg.compiler_options)
    predict = functools.partial(_predict, cfg, _logits_program(cfg), concatenate)
    return Trainer(cfg, functools.partial(_init, cfg, fresh_state), epoch, predict, scores)


def _fresh_state_program(cfg: TrainConfig):
    # One compiled program, not an eager op (and a compilation) per parameter and optimizer
    # slot. It runs once, so its code may be slower if it compiles faster: LLVM's optimization
    # level 1 (its random bits compile 3x faster than at the default level, to the same values:
    # 2.2 s -> 0.6 s at start-up on one Xeon) and XLA:CPU's older loop emitters (1.5 -> 0.9 s
    # on another, the same values; a GPU ignores the option).
    return jax.jit(functools.partial(_fresh_state, cfg), static_argnums=1,
                   compiler_options={**dict(cfg.compiler_options),
                                     "xla_backend_optimization_level": 1,
                                     "xla_cpu_use_fusion_emitters": False})


def _loop_programs(cfg: TrainConfig):
    """The jitted :func:`_loop_epoch_start` and :func:`_step_row` of a per-step epoch."""
    jit = _jit(cfg)
    return (jit(functools.partial(_loop_epoch_start, cfg), donate_argnums=0),
            jit(functools.partial(_step_row, cfg), donate_argnums=(0, 1)))


def _scan_epoch_program(cfg: TrainConfig):
    return _jit(cfg)(functools.partial(_scan_epoch, cfg), donate_argnums=0)


def _logits_program(cfg: TrainConfig):
    return _jit(cfg)(functools.partial(_logits, cfg), static_argnums=0)


# ----------------------------------------------------------------------------- evaluation, fit

class Evaluation(NamedTuple):
    accuracy: float
    loss: float
    predictions: np.ndarray
    labels: np.ndarray


def _scores(logits, labels):
    """Mean cross-entropy and predicted classes: one compiled program (eagerly, the loss alone
    takes 0.25 s of compilations on the first evaluation)."""
    return cross_entropy(logits, labels, reduction="mean"), logits.argmax(-1)


@functools.lru_cache(maxsize=None)
def _evaluation_programs(compiler_options: tuple = ()):
    """:func:`_concatenate` and :func:`_scores` jitted with ``compiler_options``
    (:func:`_jit_with`): one pair of programs for every trainer with the same options, so that
    each shape compiles once for all of them."""
    jit = _jit_with(compiler_options)
    return jit(_concatenate), jit(_scores)


def evaluate(trainer: Trainer, ts: TrainState, data: Dataset) -> Evaluation:
    """Accuracy and mean (unsmoothed) cross-entropy of ``data`` in eval mode (``train=False``)."""
    check_pairs("evaluate", data.images, data.labels)
    if len(data) == 0:
        raise ValueError("evaluate: expected a data set with examples, got an empty one (no "
                         "accuracy to compute)")
    data = trainer.place(data)
    logits = trainer.predict(*trainer.place((ts.params, ts.state)), data.images)
    labels = np.asarray(data.labels)  # read once: for the check and for the accuracy
    check_labels(logits.shape[-1], "evaluate", data=Dataset(data.images, labels))  # else NaN
    loss, predictions = (trainer.scores or _evaluation_programs()[1])(logits, data.labels)
    loss, predictions = float(loss), np.asarray(predictions)
    return Evaluation(float((predictions == labels).mean()), loss, predictions, labels)


class FitResult(NamedTuple):
    train_state: TrainState
    history: list  # one dict per epoch: train_loss, train_accuracy, [eval_accuracy], seconds
    train_seconds: float
    resumed_from_epoch: int
    evaluation: Evaluation | None = None  # eval_data's, of train_state, if the last epoch had one


def _restore(path, ts, fingerprint):
    """Load a checkpoint into ``ts``'s structure; refuse one written by another configuration."""
    ts, meta = ckpt.load(path, ts)
    saved = meta.get("fingerprint") or {}
    if "network" not in saved:  # written before the network was in it: the rest must match
        fingerprint = {k: v for k, v in fingerprint.items() if k != "network"}
    if saved != fingerprint:
        diff = {k: (fingerprint.get(k), saved.get(k)) for k in {**fingerprint, **saved}
                if fingerprint.get(k) != saved.get(k)}
        raise ckpt.CheckpointError(
            f"checkpoint {path}: written by another configuration; (expected, saved) differ in "
            f"{diff}. Remove it or pick another directory")
    return ts, meta


def _train_epoch(trainer: Trainer, ts: TrainState, data: Dataset, epoch: int, epochs: int):
    """Epoch ``epoch`` of ``epochs``, shown on the trainer's progress: (ts, history record)."""
    progress = trainer.config.progress
    steps = math.ceil(epoch_examples(trainer.config, len(data)) / trainer.config.batch_size)
    if progress is not None:
        progress.open(epoch, epochs, steps)
    t0 = time.perf_counter()
    ts, metrics = trainer.epoch(ts, data.images, data.labels)
    record = {"epoch": epoch, "train_loss": float(metrics["loss"]),
              "train_accuracy": float(metrics["accuracy"])}
    record["seconds"] = time.perf_counter() - t0
    if progress is not None:
        progress.close(steps, record["train_loss"], record["train_accuracy"])
    return ts, record


def fit(trainer: Trainer, ts: TrainState, train_data: Dataset, *, epochs: int,
        eval_data: Dataset | None = None, eval_each_epoch: bool = True,
        checkpoint_path: str | None = None, resume: bool = False, fingerprint: dict | None = None,
        log: Callable = print, stop_after: int | None = None) -> FitResult:
    """Run ``epochs`` epochs of ``trainer.epoch`` from ``ts``, with the trainer's progress.

    With ``checkpoint_path`` the train state and history are saved (atomically) after every
    epoch; ``resume=True`` continues from that file, which gives exactly the result of an
    uninterrupted run (same seed, same compiled step, the key is part of the state). To
    resume, the trainer's settings and network (:meth:`TrainConfig.fingerprint`) and
    ``fingerprint`` (any JSON dict: data range, seed, protocol) must match the checkpoint's;
    the optimizer, a loss of one's own and the preprocessing are functions fit cannot compare,
    so name them in ``fingerprint``. Without ``resume`` an existing checkpoint is replaced (and
    the log says so); one saved past ``epochs`` is an error. ``stop_after=k`` stops after epoch
    ``k`` of the ``epochs`` planned (as an interruption would: schedules still span ``epochs``).
    """
    last = _checked_fit_args(trainer, ts, train_data, eval_data, epochs, stop_after)
    fingerprint = {**trainer.config.fingerprint(), **(fingerprint or {}),
                   "examples": len(train_data)}
    fingerprint = _json_round_trip(fingerprint)
    ts, history, start = _starting_point(checkpoint_path, resume, ts, fingerprint, epochs,
                                         last, log)
    # replicated on the trainer's mesh once, not on every epoch (identity without a mesh)
    ts, train_data = trainer.place((ts, train_data))
    if eval_data is not None:
        eval_data = trainer.place(eval_data)
    evaluation = None
    for e in range(start, last):
        ts, record = _train_epoch(trainer, ts, train_data, e + 1, epochs)
        evaluation = None
        if eval_data is not None and (eval_each_epoch or e == epochs - 1):
            evaluation = evaluate(trainer, ts, eval_data)
            record["eval_accuracy"] = evaluation.accuracy
        history.append(record)
        if checkpoint_path and dataparallel.is_main_process():  # one writer in a multi-host run
            ckpt.save(checkpoint_path, ts, {"epoch": e + 1, "history": history,
                                            "fingerprint": fingerprint})
    return FitResult(ts, history, sum(h["seconds"] for h in history), start, evaluation)


def _checked_fit_args(trainer: Trainer, ts: TrainState, train_data: Dataset,
                      eval_data: Dataset | None, epochs, stop_after) -> int:
    """What :func:`fit` checks before it trains, so that nothing fails after an epoch (whose
    state a failure would lose): the counts, that the network takes the training and the
    evaluation images (the layer's error), the labels' range. Returns the last epoch to run."""
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"fit: expected epochs a non-negative int, got {epochs!r}")
    if stop_after is not None and (not isinstance(stop_after, int) or isinstance(stop_after, bool)
                                   or stop_after < 0):
        raise ValueError(f"fit: expected stop_after None or a non-negative int (the epoch to "
                         f"stop after), got {stop_after!r}")
    for name, data in (("train_data", train_data), ("eval_data", eval_data)):
        if data is not None:
            check_pairs(f"fit: {name}", data.images, data.labels)
    if len(train_data) == 0:
        raise ValueError("fit: expected train_data with examples, got an empty data set")
    classes = _outputs(trainer, ts, train_data)
    if eval_data is not None and eval_data.images.shape[1:] != train_data.images.shape[1:]:
        _outputs(trainer, ts, eval_data)
    check_labels(classes, "fit", train_data=train_data, eval_data=eval_data)
    return epochs if stop_after is None else min(epochs, stop_after)


def _outputs(trainer: Trainer, ts: TrainState, data: Dataset) -> int:
    """The network's outputs for one of ``data``'s images, found abstractly (nothing runs)."""
    one = jax.ShapeDtypeStruct((1, *data.images.shape[1:]), data.images.dtype)
    return jax.eval_shape(trainer.predict, ts.params, ts.state, one).shape[-1]


def _starting_point(path, resume: bool, ts: TrainState, fingerprint: dict, epochs: int,
                    last: int, log):
    """``(ts, history, epochs done)``: resumed from the checkpoint at ``path`` if asked for and
    there is one, else from scratch (saying so where an epoch up to ``last`` will replace a
    checkpoint)."""
    if not (path and os.path.exists(path)):
        if resume:
            log(f"resume: no checkpoint at {path}, starting from scratch" if path else
                "resume: no checkpoint path given, starting from scratch")
        return ts, [], 0
    if not resume:
        if last > 0:
            log(f"{path} exists: this run starts from scratch and replaces it after its first "
                f"epoch (resume=True continues it)")
        return ts, [], 0
    ts, meta = _restore(path, ts, fingerprint)
    if meta["epoch"] > epochs:
        raise ValueError(f"fit: the checkpoint {path} was saved after epoch {meta['epoch']}, "
                         f"past epochs={epochs}; pass epochs >= {meta['epoch']} to continue "
                         f"it, or another checkpoint path")
    log(f"resumed from {path} after epoch {meta['epoch']}")
    return ts, meta["history"], meta["epoch"]


def _json_round_trip(d: dict) -> dict:
    """``d`` as it reads back from JSON (tuples become lists), so fingerprints compare equal."""
    return json.loads(json.dumps(d))
