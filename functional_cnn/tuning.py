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
:data:`~functional_cnn.functional._formulation.MARGIN`. Variants lowered to the same StableHLO
are timed once (pinning the formulation conv2d would pick anyway). The result is cached beside
conv2d's per-shape choices (``conv_formulations.json``, by machine: CPU model and flags, cores,
jax version), keyed by :func:`cache_key` (the network's ``repr``, the input, the batch size,
the gradient mode and conv2d's mode), so a later process looks it up instead of measuring
(26-34 s for the network of ``experiments/time_to_accuracy.py`` on a 2-core AMD EPYC). A choice
changes the speed only, never the numbers beyond float rounding; a cached choice that cannot
run is measured again. The trainer must have ``scan=True`` (the epoch that is timed); one over a
mesh is timed over its devices (the key names them), as it trains: on two host devices each
convolution runs half the batch, and what is fastest there need not be fastest on one.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax import numpy as jnp

from . import dataparallel, train
from .functional import CONV_FORMULATIONS
from .functional import _formulation

Pins = tuple  # one entry per convolution: a formulation's name, or None (conv2d's choice)
cache_file = _formulation.cache_file  # where the pins are kept (with conv2d's own choices)
AS_CHOSEN = "none"  # the name of conv2d's own choice in timings and on command lines
CACHED = "measured before (cached)"  # where pins read from the cache come from, as reported


class Tuning(NamedTuple):
    """What :func:`tune_formulations` found: the ``pins``, the ms of each variant's step
    (``"conv2 taps"``: the second convolution pinned to taps, the earlier ones as already
    chosen), and whether they were ``measured`` now (False: read from the cache)."""

    pins: Pins
    ms: dict
    measured: bool


# The measurement's own version, in every key: bump it when what is timed changes.
TUNING_VERSION = 1


def cache_key(trainer: train.Trainer, input_shape, example) -> str:
    """The context a choice holds for: the unpinned network, its input, batch, vjp mode,
    conv2d's mode (its own choice is the baseline; :func:`_formulation.mode`), over a mesh
    its devices and whether each normalizes its own shard, and XLA's options if any (its
    emitters change which formulation is fastest). Not the optimizer, which adds the same
    update to every variant, nor the preprocessing."""
    cfg = trainer.config
    context = "" if cfg.mesh is None else (
        f" | devices {cfg.mesh.size}" + (" per-device BatchNorm" if cfg.per_device_batch_norm
                                          else ""))
    if cfg.compiler_options:  # none: the keys as before the option, so their entries hold
        context += f" | XLA {dict(cfg.compiler_options)}"
    return (f"{_formulation.STEP_KEY_PREFIX}{cfg.net!r} | input {tuple(input_shape[1:])} | "
            f"example {tuple(example.shape)} {np.dtype(example.dtype).name} | batch "
            f"{cfg.batch_size} | vjp {cfg.vjp} | conv mode {_formulation.mode()}{context} | "
            f"tuning {TUNING_VERSION}")


def _can_run(trainer: train.Trainer, input_shape) -> bool:
    """Whether every pin can run its convolution at the trainer's batch size (the band's and
    im2col's bounds grow with it): the layers' init refuses one that cannot (a ValueError),
    checked abstractly, before anything is compiled."""
    batch_shape = (trainer.config.batch_size, *input_shape[1:])
    try:
        jax.eval_shape(lambda key: trainer.config.net.init(key, batch_shape)[1:],
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
    (an abstract trace of the network's init: 0.08 s at a cold start; unchecked, such a pin
    makes the trainer's init or first epoch raise the layer's ValueError)."""
    key = cache_key(make((None,) * convolutions), input_shape, example)
    return _cached_entry(make, key, convolutions, input_shape, check)[0]


def _cached_entry(make, key: str, convolutions, input_shape, check=True):
    """``(pins, entry)`` cached under ``key``, or ``(None, None)``."""
    entry = _formulation.cached(key)
    if not isinstance(entry, dict) or not _valid(entry.get("choice"), convolutions):
        return None, None
    pins = tuple(entry["choice"])
    if check and not _can_run(make(pins), input_shape):
        return None, None
    return pins, entry


def requested_pins(text: str, make: Callable[[Pins], train.Trainer], convolutions: int,
                   input_shape, example) -> tuple[Pins, str]:
    """The pins a command line's ``--formulations`` asks for, and where they come from:
    ``"tuned"``, :func:`tune_formulations` (``"measured now"``, or :data:`CACHED`); else the
    names themselves, :func:`parse_pins` (``"command line"``; a ``ValueError`` says what is
    wrong)."""
    if text == "tuned":
        tuned = tune_formulations(make, convolutions, input_shape, example)
        return tuned.pins, "measured now" if tuned.measured else CACHED
    return parse_pins(text, convolutions), "command line"


def parse_pins(text: str, convolutions: int) -> Pins:
    """``"taps,none"`` -> ``("taps", None)`` (as :func:`pins_text` writes them), one per
    convolution; a ``ValueError`` names a wrong count or an unknown formulation."""
    names = text.split(",")
    if len(names) != convolutions or any(n not in (AS_CHOSEN, *CONV_FORMULATIONS)
                                         for n in names):
        raise ValueError(f"expected {convolutions} comma-separated formulations, each one of "
                         f"{(AS_CHOSEN, *CONV_FORMULATIONS)}, got {text!r}")
    return tuple(_pin(n) for n in names)


def _pin(name: str) -> str | None:
    """A formulation's name as a pin (:data:`AS_CHOSEN`: None, conv2d's own choice)."""
    return None if name == AS_CHOSEN else name


def _random_data(example, size: int, num_classes: int, mesh=None, seed: int = 0):
    """``size`` random examples shaped as ``example`` (bytes for integer dtypes) and labels,
    on the device or replicated over ``mesh``."""
    rng = np.random.default_rng(seed)
    shape, dtype = (size, *example.shape), np.dtype(example.dtype)
    images = (rng.integers(0, 256, shape).astype(dtype) if np.issubdtype(dtype, np.integer)
              else rng.standard_normal(shape).astype(dtype))
    labels = rng.integers(0, num_classes, size).astype(np.int32)
    return dataparallel.put((images, labels), mesh)


def _lowered_epoch(trainer: train.Trainer, steps: int, ts, images, labels):
    """The trainer's epoch of ``steps`` steps, lowered for ``ts`` and the data."""
    cfg = dataclasses.replace(trainer.config, steps_per_epoch=steps, progress=None)
    return train._scan_epoch_program(cfg).lower(ts, images, labels)


class _Epochs:
    """A runner for :func:`race`: ``n`` calls of one compiled epoch, each from the same initial
    state ``ts``: every variant computes on the same values (a state trained on, on random
    labels, drifts towards values that make some CPUs' arithmetic slow, such as subnormal
    floats)."""

    def __init__(self, lowered, ts, images, labels):
        self.epoch, self.ts, self.data = lowered.compile(), ts, (images, labels)

    def __call__(self, n: int) -> None:
        for _ in range(n):  # the copy (the epoch donates it) is timed too: alike for all
            _, metrics = self.epoch(jax.tree.map(jnp.copy, self.ts), *self.data)
        jax.block_until_ready(metrics)


def _tune_stage(make, pins: list, stage: int, input_shape, steps, ts, data, rounds):
    """Race every formulation of convolution ``stage`` (the others as in ``pins``): the
    chosen one, and ms a step by variant name. Variants lowered to the same StableHLO (a pin
    of the formulation conv2d would choose anyway) are compiled and timed once: they share
    one time, so noise cannot choose between them."""
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
    return (_pin(_formulation.fastest(ms, default=AS_CHOSEN)),
            {f"conv{stage + 1} {name}": t for name, t in ms.items()})


def _checked_trainer(make, convolutions) -> train.Trainer:
    """``make``'s unpinned trainer, if it is one this tuner can time (else an error)."""
    if not isinstance(convolutions, int) or convolutions < 1:
        raise ValueError(f"tune_formulations: expected convolutions a positive int, got "
                         f"{convolutions!r}")
    trainer = make((None,) * convolutions)
    if not isinstance(trainer, train.Trainer):
        raise TypeError(f"tune_formulations: make(pins) must return a train.Trainer, got "
                        f"{type(trainer).__name__}")
    if not trainer.config.scan:
        raise ValueError("tune_formulations: expected a trainer with scan=True (the epoch it "
                         "times), got scan=False")
    return trainer


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
    unpinned = _checked_trainer(make, convolutions)
    key = cache_key(unpinned, input_shape, example)
    pins, entry = _cached_entry(make, key, convolutions, input_shape)
    if not remeasure and pins is not None:
        return Tuning(pins, dict(entry.get("ms_per_step", {})), False)
    data = _random_data(example, steps * unpinned.config.batch_size, num_classes,
                        unpinned.config.mesh)
    ts = unpinned.init(jax.random.key(0), input_shape)
    pins, ms = [None] * convolutions, {}
    for stage in range(convolutions):
        pins[stage], stage_ms = _tune_stage(make, pins, stage, input_shape, steps, ts, data,
                                            rounds)
        ms.update(stage_ms)
    _formulation.remember(key, {"choice": list(pins), "ms_per_step": dict(ms)})
    return Tuning(tuple(pins), ms, True)


def pins_text(pins: Sequence[str | None]) -> str:
    """``"taps,none"``: pins as the experiments' command lines write them."""
    return ",".join(p or AS_CHOSEN for p in pins)
