"""Wall time from process start to 99.0% MNIST test accuracy, with our fastest recipe.

    python -m experiments.time_to_accuracy [--steps N] [--batch-size B] [--vjp custom]
        [--compile-cache DIR] [--json PATH] ...

A small BatchNorm CNN -- conv(``--kernel``, ``--padding``, no bias) -> BatchNorm ->
``--activation`` -> max-pool 2, twice (``--widths`` channels; each convolution trained by
conv2d's formulation in ``--formulations``: by default as measured in the training step on
this machine, if it has been, see :func:`formulations`; evaluated by ``--eval-formulations``,
by default the recipe's, :func:`evaluation_pins`), then a ``--hidden``-wide layer (0:
none) with the same activation; the first convolution frozen (``--first-conv pca``, the
default: ``fcn.frozen``) at the leading principal components of the training images' patches,
computed while they load (``_tta_common.pca_filters``), its BatchNorm without affine
parameters, so that nothing before the second convolution is trained -- trained with AdamW
with Nesterov momentum (``--optimizer``; ``adamw``: without; weight decay 5e-4, label
smoothing) under a one-cycle learning rate over ``--steps`` batches (a fraction of an epoch:
``train.make_trainer(steps_per_epoch=...)``), then the whole test set is evaluated; if it is
under ``--target``, up to ``--extra-rounds`` more rounds of ``--steps`` run at the schedule's
final rate, each evaluated. The time printed counts from the start of the interpreter
(imports, data loading, compilation, training, evaluation): a cold start, unless
``--compile-cache DIR`` lets a run reuse an earlier run's compiled programs (JAX's
persistent compilation cache).

On a CPU the batches are split over ``--devices`` host devices (default two, one per core:
:func:`host_mesh`), each normalizing its share with its own BatchNorm statistics; the test set
is evaluated on one device; the formulations are measured (``tuned``) on the devices it trains on.

Start-up is most of the race, so every program compiles ahead of time on two threads
(:func:`functional_cnn.precompile.precompile`) while the data sets load, on a CPU with XLA's
loop emitters (:data:`LOOP_EMITTERS`: half the compilation, slightly slower steps), and the
recipe needs one training program only (no ragged tail: ``--steps`` full batches). The
plain-PyTorch script it races is ``benchmarks/time_to_accuracy_torch.py`` (torch's own best
recipe).
"""
import time

START = time.perf_counter()  # first statement: imports below count

import argparse  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
from jax import numpy as jnp  # noqa: E402

import functional_cnn as fcn  # noqa: E402
from experiments._common import one_cycle_adamw  # noqa: E402
from experiments._tta_common import (TRAIN_SIZE, Record, pca_filters, plan,  # noqa: E402
                                     recipe_parser)
from functional_cnn import data, dataparallel, prng, train, tuning  # noqa: E402
from functional_cnn.functional._formulation import usable_cores  # noqa: E402
from functional_cnn.precompile import precompile  # noqa: E402

MEAN, STD = 0.1307, 0.3081
TEST_SIZE = 10000
INPUT_SHAPE = (-1, 1, 28, 28)
EXAMPLE = jax.ShapeDtypeStruct((28, 28), jnp.uint8)  # one training image, as the epoch indexes it
# The test set is predicted in 20 calls of 500 images (both convolutions as the band, session
# 14): 0.21 s on the AMD EPYC of docs/BENCHMARKS.md, 0.35-0.40 s in chunks of 1000 to 10000,
# whose row blocks (230 MB for the first convolution at 10000) overflow the caches (0.16
# against 0.33 s on the Xeon with AMX).
EVAL_CHUNK = 500
# Our fastest on the AMD EPYC of docs/BENCHMARKS.md: few channels, batch 64, SiLU, AdamW with
# Nesterov momentum and b2 0.99, and the first convolution frozen at the 8 leading principal
# components of the training images' patches (``--first-conv pca``, a BatchNorm without affine
# parameters after it): nothing before the second convolution is trained, so the step has no
# backward pass there and took 0.51 of the time (one process, alternating), for less learned a
# step. 800 steps (0.85 of an epoch) made 99.0% on 55 of seeds 0-59 (mean 99.08%; seeds 0-4
# 5 of 5) with the second convolution as XLA's (:data:`FORMULATIONS`), whose 750 made 53 of 60
# (99.07%, seed 0 98.99%); the race reached 99% in 0.97 of the time of 750 steps with the band
# (10 alternating processes, session 18). With the band, 750 steps had made 55 of 60 (99.07%),
# as batch 48's 1000 steps did, in 0.93 of the time (700 steps: 28 of 40); the trained first
# convolution's 650 steps of 48 made 51 of 60 (99.06%) in 1.2x the time of batch 48's 1000
# (session 17). Before it (session 16): b2 0.99
# made 51 of 60 at 650 steps as b2 0.999 at 700 (49 of 60); batch 32 needed 1000 steps (32 of
# 40) in 1.03x the time. SiLU learns more a step (at 1300 steps of 32, seeds 0-9: 99.13% mean
# against ReLU's 99.03%) for steps 1.13x as long and 0.2 CPU-s more to compile: 99% 0.4 s
# sooner (session 15).
RECIPE = {"steps": 800, "batch_size": 64, "peak_lr": 1.6e-2, "label_smoothing": 0.1,
          "widths": (8, 16), "kernel": 5, "padding": 0, "hidden": 128, "activation": "silu",
          "optimizer": "nadamw", "weight_decay": 5e-4, "b2": 0.99, "first_conv": "pca"}
ACTIVATIONS = {"relu": fcn.ReLU, "silu": fcn.SiLU}
# The first convolution (one input channel, BatchNorm after it) trained as a sum of its 25
# shifted products (conv2d's "taps"): XLA writes the sum once and the statistics read it. On
# the AMD EPYC of docs/BENCHMARKS.md, 2.63 -> 2.20 ms a step at batch 32, the 1500 steps done
# 0.6 s sooner from a cold start (6 alternating runs). Its evaluation keeps the gates' band. On a
# CPU only: elsewhere conv2d keeps XLA's convolutions, which nothing here has measured against.
# Frozen (the recipe's ``--first-conv pca``), it runs forward only, and the tuner measured taps
# and the band alike there (1.65 and 1.66 ms a step, session 17; 1.71 and 1.73, session 18).
# The second convolution as XLA's convolution ("lax"): behind the frozen stage it computes no
# input gradient, where the band had paid most of XLA's cost, and its epoch took 0.92 of the
# band's (1.03 against 1.13 s, one process, 8 alternating rounds; its first call, compilation
# included, 1.68 against 1.94 s); the tuner chose it too (1.57 against 1.73 ms a step).
# Measured on the AMD EPYC of docs/BENCHMARKS.md only (session 18).
# The default where this machine has no measurement of its own (`--formulations tuned` makes
# one, functional_cnn.tuning, and later runs use it).
FORMULATIONS = ("taps", "lax")  # per convolution, in training; None: as conv2d chooses
# In the evaluation the second convolution as XLA's too: the test set predicted in 133 against
# 190 ms (0.72, one process, 10 alternating rounds), compiled in less (the first call 0.31
# against 0.50 s); the first as taps took 1.08x as long. On a CPU only, measured on the AMD
# EPYC of docs/BENCHMARKS.md (session 18); the tuner measures training only.
EVAL_FORMULATIONS = (None, "lax")
# The keys' generator: functional_cnn.prng's FMIX32, whose draws compile to one small kernel
# each (threefry: 20 unrolled rounds). The initial state's program: 7 kernels and 0.27-0.33
# CPU-s to compile against 97 and 0.81-0.93 (AMD EPYC of docs/BENCHMARKS.md).
PRNG = "fmix32"
# Two host devices on a CPU (functional_cnn.dataparallel.per_device_gradients): each core runs
# half of every batch, where XLA:CPU's one device gained little from the second core (a step
# of batch 32: 2.21 ms on one core, 2.15 on two). On the AMD EPYC of docs/BENCHMARKS.md the
# race network's step ran 1.2-1.4x faster (one process, alternating), its epoch up to 0.4
# CPU-s more to compile, and the race took 5.26 s median against 5.63 (10 alternating
# processes each; session 13, batch 32). Each device's BatchNorm normalizes its own half
# (the recipe's accuracy above is measured so).
DEVICES = 2
# XLA:CPU's older loop emitters for every program, on a CPU (`--fusion-emitters` keeps XLA's
# default). Compiling is most of the start, and XLA's newer fusion emitters cost
# about 20 ms of CPU a kernel: on the AMD EPYC of docs/BENCHMARKS.md the epoch's 100 kernels
# compiled in 1.2 CPU-s against 2.0, for steps 5-10% slower (their transposes and
# concatenations), and the race reached 99% sooner (docs/SPEED_LOG.md, session 14). Measured
# on that EPYC only: on an Intel Xeon in session 7, with other code, the slower steps outweighed.
LOOP_EMITTERS = {"xla_cpu_use_fusion_emitters": False}


def net(widths=RECIPE["widths"], kernel=RECIPE["kernel"], padding=RECIPE["padding"],
        hidden=RECIPE["hidden"], formulations=FORMULATIONS, activation=RECIPE["activation"],
        first_conv=RECIPE["first_conv"], eval_formulations=()):
    """Conv -> BatchNorm -> activation -> max-pool stages, then ``hidden`` units (if any);
    stage ``i``'s convolution trained by ``formulations[i]`` and evaluated by
    ``eval_formulations[i]`` (None, or none given: as conv2d chooses); ``first_conv="pca"``:
    the first convolution frozen (its filters set after init: :func:`with_first_filters`) and
    its BatchNorm without affine parameters."""
    layers, act = [], ACTIVATIONS[activation]
    for stage, width in enumerate(widths):
        formulation, eval_formulation = (pins[stage] if stage < len(pins) else None
                                         for pins in (formulations, eval_formulations))
        conv = fcn.Conv2d(width, kernel, padding=padding, bias=False,
                          train_formulation=formulation, eval_formulation=eval_formulation)
        fixed = stage == 0 and first_conv == "pca"
        layers += [fcn.frozen(conv) if fixed else conv, fcn.BatchNorm2d(affine=not fixed),
                   act(), fcn.MaxPool2d(2)]
    layers.append(fcn.Flatten())
    if hidden:
        layers += [fcn.Linear(hidden), act()]
    return fcn.serial(*layers, fcn.Linear(10))


def load_training_set(args, mesh=None):
    """``(train_set, filters)``: the training set on the devices (replicated over ``mesh``),
    and for ``--first-conv pca`` the frozen first convolution's filters, the principal
    components of its images' patches (``_tta_common.pca_filters``; else None)."""
    images, labels = data.load_numpy("MNIST", "train", args.data_dir)
    filters = (pca_filters(images, args.widths[0], args.kernel, MEAN, STD)
               if args.first_conv == "pca" else None)
    return data.to_device(images, labels, mesh), filters


def with_first_filters(ts: train.TrainState, filters, mesh=None) -> train.TrainState:
    """``ts`` with the frozen first convolution's ``filters`` (None: ``ts`` as it is), placed
    as the rest of the state (replicated over ``mesh``)."""
    if filters is None:
        return ts
    state = list(ts.state)
    state[0] = {**state[0], "weight": dataparallel.put(filters, mesh)}
    return ts._replace(state=tuple(state))


def trainer_for(args, mesh=None, eval_pins=()) -> Callable[[tuple], train.Trainer]:
    """``pins -> Trainer``: the recipe's trainer, its convolutions trained by ``pins`` and
    evaluated by ``eval_pins`` (none by default: the tuner, which times training, keys its
    measurements on the network without them); over ``mesh`` (:func:`host_mesh`) each device
    trains on its shard of every batch, with its own BatchNorm statistics
    (``sync_batch_norm=False``)."""
    def make(pins):
        return train.make_trainer(
            net(args.widths, args.kernel, args.padding, args.hidden, pins, args.activation,
                args.first_conv, eval_pins),
            # AdamW over one flat vector: one update instead of one per parameter, 0.4 s less
            # to compile (the same update; XLA fuses it otherwise, so the last bits may differ)
            optax.flatten(one_cycle_adamw(args.steps, args.peak_lr, args.weight_decay,
                                          b2=args.b2, nesterov=args.optimizer == "nadamw")),
            batch_size=args.batch_size, steps_per_epoch=args.steps, vjp=args.vjp,
            label_smoothing=args.label_smoothing, eval_batch_size=EVAL_CHUNK,
            preprocess=lambda u8: data.normalize(u8, MEAN, STD), mesh=mesh,
            sync_batch_norm=mesh is None, compiler_options=compiler_options(args))
    return make


def compiler_options(args) -> dict | None:
    """:data:`LOOP_EMITTERS` on a CPU, unless ``--fusion-emitters``; else XLA's defaults."""
    if args.fusion_emitters or jax.default_backend() != "cpu":
        return None
    return LOOP_EMITTERS


def formulations(args, mesh=None) -> tuple[tuple, str]:
    """The convolutions' training pins and where they come from: ``--formulations`` as given;
    ``tuned``: measured in the training step on this machine, over ``mesh`` as the run trains
    (:mod:`functional_cnn.tuning`, cached; if not cached yet it is measured now, and its half
    minute counts in this run's time); by default the cached measurement where there is one,
    else :data:`FORMULATIONS` (on a CPU)."""
    stages = len(args.widths)
    if args.formulations is not None:
        return tuning.requested_pins(args.formulations, trainer_for(args, mesh), stages,
                                     INPUT_SHAPE, EXAMPLE)
    # unchecked (0.08 s): where a cached pin cannot run, main falls back to the recipe's
    cached = tuning.cached_formulations(trainer_for(args, mesh), stages, INPUT_SHAPE, EXAMPLE,
                                        check=False)
    if cached is not None:
        return cached, tuning.CACHED
    return recipe_formulations(), "recipe"


def compiled_trainer(args, pins, pins_from: str, mesh=None):
    """``(trainer, evaluator, pins, pins_from)``: the trainer (over ``mesh``) and the one
    evaluating on one device, their programs compiling on two threads from here on; with the
    recipe's pins instead where cached ones cannot run (a layer's abstract init refuses them:
    a cache written by other code)."""
    images = {n: jax.ShapeDtypeStruct((n, 28, 28), jnp.uint8) for n in (TRAIN_SIZE, TEST_SIZE)}
    evaluating = evaluation_pins(args)  # a wrong --eval-formulations is no cached pin's fault
    try:
        trainer = precompile(trainer_for(args, mesh, evaluating)(pins), INPUT_SHAPE,
                             train_images=images[TRAIN_SIZE],
                             eval_images=None if mesh else images[TEST_SIZE],
                             key=jax.eval_shape(lambda: seed_key(args, 0)))
        if mesh is None:
            return trainer, trainer, pins, pins_from
        # the test set split over two host devices took 0.05 s longer than on one, and its
        # partitioned programs more to compile (AMD EPYC of docs/BENCHMARKS.md)
        evaluator = precompile(trainer_for(args, None, evaluating)(pins), INPUT_SHAPE,
                               init=False, eval_images=images[TEST_SIZE], workers=1)
        return trainer, evaluator, pins, pins_from
    except ValueError as err:
        if pins_from != tuning.CACHED:
            raise
        print(f"the cached formulations {tuning.pins_text(pins)} cannot run ({err}); training "
              f"with the recipe's (the cache: {tuning.cache_file()})")
        return compiled_trainer(args, recipe_formulations(), "recipe (the cached pins failed)",
                                mesh)


def seed_key(args, seed: int):
    """The run's key: ``--prng``'s generator (fmix32: the initial state's program compiles in
    a third of threefry's CPU time, and its key is hashed on the host: functional_cnn.prng)."""
    return prng.key(seed) if args.prng == "fmix32" else jax.random.key(seed)


def host_mesh(devices: int | None):
    """The mesh the race trains over: on a CPU, ``devices`` host devices (default: two, or one
    on a one-core machine), each running its shard of every batch on one core; elsewhere, or
    with one device, none. Call it first: JAX splits the CPU into devices only before it
    first touches one (where it already has, as in a test's process, the devices it has)."""
    if devices is None:
        devices = min(DEVICES, usable_cores())
    if devices > 1:
        try:
            jax.config.update("jax_num_cpu_devices", devices)
        except RuntimeError:  # the backend is up already: keep its devices
            pass
    if jax.default_backend() != "cpu":
        return None
    if devices > jax.device_count():
        print(f"asked for {devices} host devices, but JAX's CPU backend started with "
              f"{jax.device_count()} before this run could split it: training on those")
        devices = jax.device_count()
    return dataparallel.make_mesh(devices) if devices > 1 else None


def on_one_device(tree):
    """``tree`` on the default device: one replica of a tree replicated over a mesh."""
    return jax.device_put(tree, jax.devices()[0])


def recipe_formulations() -> tuple:
    """:data:`FORMULATIONS` on a CPU; elsewhere none (conv2d keeps XLA's convolutions)."""
    return FORMULATIONS if jax.default_backend() == "cpu" else ()


def evaluation_pins(args) -> tuple:
    """One evaluation pin per convolution: ``--eval-formulations`` as given, else
    :data:`EVAL_FORMULATIONS` on a CPU (elsewhere none: conv2d keeps XLA's convolutions).
    Touches the backend: call it after :func:`host_mesh`."""
    stages = len(args.widths)
    if args.eval_formulations is not None:
        return tuning.parse_pins(args.eval_formulations, stages)
    recipe = EVAL_FORMULATIONS if jax.default_backend() == "cpu" else ()
    return tuple(recipe[i] if i < len(recipe) else None for i in range(stages))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of devices, got {value}")
    return value


def parser():
    """This script's command line: the recipe's flags (its defaults) and its own."""
    parser = recipe_parser(__doc__.splitlines()[0], **RECIPE)
    parser.add_argument("--compile-cache", metavar="DIR",
                        help="JAX's persistent compilation cache (a warm start on the next run)")
    parser.add_argument("--vjp", default="custom", choices=fcn.VJP_MODES)
    parser.add_argument("--formulations",
                        help="each convolution's conv2d formulation in training, e.g. taps,none "
                             "('none': as conv2d chooses), or 'tuned': measured in the "
                             "training step on this machine and cached; default: the cached "
                             "measurement if any, else the recipe's")
    parser.add_argument("--eval-formulations",
                        help="each convolution's conv2d formulation in the evaluation, e.g. "
                             "none,lax ('none': as conv2d chooses); default: the recipe's "
                             "(on a CPU), measured by hand on one machine: the tuner times "
                             "training only")
    parser.add_argument("--devices", type=positive_int, metavar="N",
                        help=f"on a CPU: N host devices, each training on its share of every "
                             f"batch with its own BatchNorm statistics (default: "
                             f"{DEVICES}, at most the cores; 1: one device, the global batch)")
    parser.add_argument("--fusion-emitters", action="store_true",
                        help="compile with XLA:CPU's default fusion emitters (faster steps, "
                             "slower compilation) instead of its loop emitters")
    parser.add_argument("--prng", default=PRNG, choices=("fmix32", "threefry"),
                        help="the generator of the run's keys (default %(default)s)")
    return parser


def main(argv=None):
    args = parser().parse_args(argv)
    evaluate_at = plan(args)  # the recipe checked before the devices are split
    mesh = host_mesh(args.devices)  # before anything touches a device
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:  # here, not where the formulations' fallback would take it for theirs
        dataparallel.check_divides(args.batch_size, mesh, where="time_to_accuracy")
    except ValueError as err:
        raise SystemExit(str(err)) from None
    pins, pins_from = formulations(args, mesh)
    with ThreadPoolExecutor(1) as loader:  # the data sets load while the programs compile
        # the training set replicated over the mesh here, beside the compilations
        loading = [loader.submit(load_training_set, args, mesh),
                   loader.submit(data.load, "MNIST", "test", args.data_dir)]
        trainer, evaluator, pins, pins_from = compiled_trainer(args, pins, pins_from, mesh)
        (train_set, filters), test_set = (job.result() for job in loading)
    if (len(train_set), len(test_set)) != (TRAIN_SIZE, TEST_SIZE):
        raise SystemExit(f"expected {TRAIN_SIZE} + {TEST_SIZE} MNIST images, got "
                         f"{len(train_set)} + {len(test_set)}")
    ts = with_first_filters(trainer.init(seed_key(args, args.seed), INPUT_SHAPE), filters,
                            mesh)
    record = Record(START, args.target)
    for steps in evaluate_at:
        ts, _ = trainer.epoch(ts, train_set.images, train_set.labels)
        accuracy = train.evaluate(evaluator, on_one_device(ts), test_set).accuracy
        if record.evaluated(steps, steps * args.batch_size, accuracy):
            break
    return record.finish(args.json, framework="functional_cnn", vjp=args.vjp,
                         compile_cache=bool(args.compile_cache),
                         recipe={k: getattr(args, k) for k in RECIPE},
                         formulations=list(pins), formulations_from=pins_from,
                         eval_formulations=list(evaluation_pins(args)),
                         prng=args.prng, devices=1 if mesh is None else mesh.size,
                         fusion_emitters=compiler_options(args) is None)


if __name__ == "__main__":
    raise SystemExit(main())
