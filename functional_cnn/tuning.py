"""Each convolution's formulation chosen inside the whole training step, on the running machine.

conv2d computes its sums several ways (``functional/conv.py``: a banded product, im2col, XLA's
convolution, a sum of shifted taps), and which trains a network fastest depends on the CPU and
on what XLA fuses each one with: timed alone, a convolution's formulation does not predict the
step it sits in (``functional/_formulation.py`` says by how much). So :func:`tune_formulations`
times the step itself: given ``make(pins) -> Trainer``, a trainer whose convolutions are pinned
in training by ``pins`` (one per convolution, in order: a name of
:data:`functional_cnn.functional.CONV_FORMULATIONS`, or None for conv2d's own choice), it races
compiled epochs of ``steps`` training steps on random data::

    def make(pins):
        net = fcn.serial(fcn.Conv2d(8, 5, train_formulation=pins[0]), fcn.ReLU(), ...)
        return train.make_trainer(net, optimizer, batch_size=32)

    pins = tune_formulations(make, 2, (-1, 1, 28, 28), jax.ShapeDtypeStruct((28, 28), jnp.uint8))

One convolution at a time (coordinate descent, first to last): every formulation that can run
its shape is raced against conv2d's own choice, the others kept as chosen so far, in alternating
rounds of one process (:func:`functional_cnn.audit.timing.race`), each variant's time the best
of its rounds (as conv2d's own measurement: the other rounds are other processes' noise); a pin
replaces conv2d's choice only if its step is faster by
:data:`~functional_cnn.functional._formulation.MARGIN`. Variants that compile to the same
program are timed once (pinning the formulation conv2d would pick anyway). The
result is cached beside conv2d's per-shape choices (``conv_formulations.json``, by machine: CPU
model and flags, cores, jax version), keyed by the network's ``repr``, the input, the batch size
and the gradient mode, so a later process looks it up instead of measuring (about 25 s for the
network of ``experiments/time_to_accuracy.py`` on a 2-core AMD EPYC). A choice changes the speed
only, never the numbers beyond float rounding; a cached choice that cannot run is measured again.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax import numpy as jnp

from . import train
from .functional import CONV_FORMULATIONS
from .functional import _formulation

Pins = tuple  # one entry per convolution: a formulation's name, or None (conv2d's choice)
AS_CHOSEN = "none"  # the name of conv2d's own choice in timings and on command lines


class Tuning(NamedTuple):
    """What :func:`tune_formulations` found: the ``pins``, the ms of each variant's step
    (``"conv2 taps"``: the second convolution pinned to taps, the earlier ones as already
    chosen), and whether they were ``measured`` now (False: read from the cache)."""

    pins: Pins
    ms: dict
    measured: bool


def cache_key(trainer: train.Trainer, input_shape, example) -> str:
    """The context a choice holds for: the unpinned network, its input, batch and vjp mode."""
    cfg = trainer.config
    return (f"training step | {cfg.net!r} | input {tuple(input_shape[1:])} | example "
            f"{tuple(example.shape)} {np.dtype(example.dtype).name} | batch {cfg.batch_size} "
            f"| vjp {cfg.vjp}")


def _can_run(trainer: train.Trainer, input_shape) -> bool:
    """Whether every pin can run its convolution: the layers' init refuses one that cannot (a
    ValueError), checked abstractly, before anything is compiled."""
    try:
        jax.eval_shape(lambda key: trainer.config.net.init(key, input_shape)[1:],
                       jax.random.key(0))
    except ValueError:
        return False
    return True


def _valid(pins, convolutions: int) -> bool:
    return (isinstance(pins, (list, tuple)) and len(pins) == convolutions
            and all(p is None or p in CONV_FORMULATIONS for p in pins))


def cached_formulations(make: Callable[[Pins], train.Trainer], convolutions: int, input_shape,
                        example, check: bool = True) -> Pins | None:
    """The pins cached for this machine and context, else None. Reads a small JSON file and
    compiles nothing. ``check``: pins that cannot run their convolutions count as not cached
    (an abstract trace of the network's init: 0.08 s at a cold start, where the trainer's own
    init refuses such a pin anyway, naming the layer)."""
    key = cache_key(make((None,) * convolutions), input_shape, example)
    entry = _formulation.cached(key)
    if not isinstance(entry, dict) or not _valid(entry.get("choice"), convolutions):
        return None
    pins = tuple(entry["choice"])
    return pins if not check or _can_run(make(pins), input_shape) else None


def _random_data(example, size: int, num_classes: int, seed: int = 0):
    """``size`` random examples shaped as ``example`` (bytes for integer dtypes) and labels."""
    rng = np.random.default_rng(seed)
    shape, dtype = (size, *example.shape), np.dtype(example.dtype)
    images = (rng.integers(0, 256, shape).astype(dtype) if np.issubdtype(dtype, np.integer)
              else rng.standard_normal(shape).astype(dtype))
    labels = rng.integers(0, num_classes, size).astype(np.int32)
    return jax.device_put(images), jax.device_put(labels)


def _lowered_epoch(trainer: train.Trainer, steps: int, ts, images, labels):
    """The trainer's epoch of ``steps`` steps, lowered for ``ts`` and the data."""
    cfg = dataclasses.replace(trainer.config, steps_per_epoch=steps, scan=True, progress=None)
    return train._scan_epoch_program(cfg).lower(ts, images, labels)


class _Epochs:
    """A runner for :func:`race`: ``n`` calls of one compiled epoch, each from the same initial
    state ``ts``: every variant computes on the same values (a state trained on, on random
    labels, drifts towards values that make some CPUs' arithmetic slow, such as subnormal
    floats)."""

    def __init__(self, lowered, ts, images, labels):
        self.epoch, self.ts, self.data = lowered.compile(), ts, (images, labels)

    def __call__(self, n: int) -> None:
        for _ in range(n):
            _, metrics = self.epoch(jax.tree.map(jnp.copy, self.ts), *self.data)
        jax.block_until_ready(metrics)


def _variant_name(stage: int, formulation: str | None) -> str:
    return f"conv{stage + 1} {formulation or AS_CHOSEN}"


def _tune_stage(make, pins: list, stage: int, input_shape, steps, ts, data, rounds):
    """Race every formulation of convolution ``stage`` (the others as in ``pins``): the
    chosen one, and ms a step by variant name. Variants that lower to the same program (a
    pin of the formulation conv2d would choose anyway) are compiled and timed once: they
    share one time, so noise cannot choose between them."""
    from .audit.timing import race  # only when measuring: a cache lookup imports nothing more

    programs, runners = {}, {}
    for formulation in (None, *CONV_FORMULATIONS):
        trainer = make(tuple(pins[:stage] + [formulation] + pins[stage + 1:]))
        if _can_run(trainer, input_shape):
            lowered = _lowered_epoch(trainer, steps, ts, *data)
            program = hashlib.sha256(lowered.as_text().encode()).hexdigest()
            programs[formulation] = program
            if program not in runners:
                runners[program] = _Epochs(lowered, ts, *data)
    timing = race(runners, rounds)
    ms = {f or AS_CHOSEN: timing[p]["min_ms"] / steps for f, p in programs.items()}
    choice = _formulation.fastest(ms, default=AS_CHOSEN)
    return (None if choice == AS_CHOSEN else choice), {
        _variant_name(stage, None if f == AS_CHOSEN else f): t for f, t in ms.items()}


def _check_arguments(make, convolutions) -> None:
    if not isinstance(convolutions, int) or convolutions < 1:
        raise ValueError(f"tune_formulations: expected convolutions a positive int, got "
                         f"{convolutions!r}")
    trainer = make((None,) * convolutions)
    if not isinstance(trainer, train.Trainer):
        raise TypeError(f"tune_formulations: make(pins) must return a train.Trainer, got "
                        f"{type(trainer).__name__}")
    if trainer.config.mesh is not None:
        raise ValueError("tune_formulations: expected a one-device trainer (mesh=None): the "
                         "timings run its epoch on one device")


def tune_formulations(make: Callable[[Pins], train.Trainer], convolutions: int, input_shape,
                      example, *, num_classes: int = 10, steps: int = 50, rounds: int = 7,
                      remeasure: bool = False) -> Tuning:
    """The fastest training pins of ``make``'s ``convolutions`` convolutions on this machine.

    ``make(pins) -> Trainer``: the trainer to tune, its i-th convolution built with
    ``Conv2d(..., train_formulation=pins[i])``; ``input_shape`` as for ``trainer.init``;
    ``example``: one training example's shape and dtype (what ``trainer.epoch`` indexes:
    uint8 images for the default preprocessing), ``num_classes`` its labels' range. Read from
    the cache where measured before (unless ``remeasure``), else measured (see the module
    docstring: ``steps`` steps a timing, ``rounds`` alternating rounds) and cached.
    """
    _check_arguments(make, convolutions)
    if not remeasure and (pins := cached_formulations(make, convolutions, input_shape,
                                                      example)) is not None:
        key = cache_key(make((None,) * convolutions), input_shape, example)
        return Tuning(pins, _formulation.cached(key).get("ms_per_step", {}), False)
    unpinned = make((None,) * convolutions)
    data = _random_data(example, steps * unpinned.config.batch_size, num_classes)
    ts = unpinned.init(jax.random.key(0), input_shape)
    pins, ms = [None] * convolutions, {}
    for stage in range(convolutions):
        pins[stage], stage_ms = _tune_stage(make, pins, stage, input_shape, steps, ts, data,
                                            rounds)
        ms.update(stage_ms)
    _formulation.remember(cache_key(unpinned, input_shape, example),
                          {"choice": list(pins), "ms_per_step": ms})
    return Tuning(tuple(pins), ms, True)


def pins_text(pins: Sequence[str | None]) -> str:
    """``"taps,none"``: pins as the experiments' command lines write them."""
    return ",".join(p or AS_CHOSEN for p in pins)
