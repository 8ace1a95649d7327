"""The runner every experiment shares: a :class:`Protocol` says *what* (network, data ranges,
scaling, optimizer, epochs); :func:`main` does the rest with :mod:`functional_cnn.train`
(CLI, data, training, evaluation, JSON, plot).

Flags: ``--data-dir --epochs --seed --json PATH --plot PATH --checkpoint DIR --resume
--vjp custom|autodiff --optimizer NAME``; ``--formulations PINS|tuned`` pins the
convolutions' formulations in training (``tuned``: measured on this machine); for quick runs
``--train-range START STOP`` and ``--eval-limit N`` shrink the data, ``--no-progress``
silences the bars. Each epoch is one
``lax.scan``, but for the conv protocols under ``--vjp autodiff`` and with ``--per-step``: a
jitted call per step (:attr:`Protocol.autodiff_per_step` says why).

Scaling out (:mod:`functional_cnn.dataparallel`): ``--devices N`` splits each (global) batch over
N devices (default: all; ``--batch-size`` overrides the protocol's global batch, which must
divide by N); ``--coordinator HOST:PORT --num-processes P --process-id I`` (or
``$FUNCTIONAL_CNN_COORDINATOR``, ``$FUNCTIONAL_CNN_NUM_PROCESSES``, ``$FUNCTIONAL_CNN_PROCESS_ID``)
join a multi-host run; only process 0 writes the JSON, plot and checkpoints.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from typing import Callable, NamedTuple

import jax
import numpy as np
import optax

from experiments._machine import machine
from functional_cnn import data, dataparallel, train, tuning


class Protocol(NamedTuple):
    """One experiment: what the article did (or what we choose), in data."""

    name: str
    net: Callable  # () -> Layer; with convolutions, also (formulations) -> Layer
    optimizers: dict  # name -> (lr_steps_total -> optax transform); the first is the default
    train_range: tuple  # (split, start, stop)
    eval_ranges: dict  # name -> (split, start, stop); the first is the reported test_accuracy
    batch_size: int
    epochs: int
    mean: float = 0.0
    std: float = 1.0
    reduction: str = "mean"
    label_smoothing: float = 0.0
    augment: Callable | None = None
    shuffle: bool = True  # reshuffle the training range every epoch (False: a fixed order)
    # Under vjp="autodiff", a jitted call per step instead of one lax.scan per epoch (True for
    # conv nets): JAX's own transposes of NCHW convolutions take XLA:CPU's slow path inside
    # loops (jax #12868; the best network at batch 128: 71 against 35 ms a step). The
    # hand-written rules write every convolution canonically and run fastest as one scan: on
    # the AMD EPYC of docs/BENCHMARKS.md LeNet 3.21 against 3.73 ms a step at batch 64,
    # article 001's Net 0.69 against 0.88 at batch 10, the best network 18.5 against 19.6.
    autodiff_per_step: bool = False
    article: dict = {}  # the article's figures, copied into the JSON
    eval_each_epoch: bool = True  # False where the evaluation set dwarfs the training set
    # How many convolutions net(formulations) pins in training, one formulation (or None)
    # each (--formulations); 0: net() takes none
    convolutions: int = 0



# ---------------------------------------------------------------- optimizers protocols share

def article004_optimizers(peak_lr: float) -> dict:
    """LeNet's and the MLP's choices (name -> (total steps -> optax transform)). The default,
    ``adamw-cosine``: AdamW (torch's defaults) with the learning rate decayed from ``peak_lr``
    to 0 along a cosine over the run; ``adamw``: torch's constant 1e-3; ``sgd``: the article's
    (lr 0.01, momentum 0.5)."""
    return {"adamw-cosine": lambda steps: train.adamw(optax.cosine_decay_schedule(peak_lr, steps)),
            "adamw": lambda steps: train.adamw(),
            "sgd": lambda steps: optax.sgd(0.01, momentum=0.5)}


def one_cycle_adamw(steps: int, peak_lr: float, weight_decay: float = 5e-4, *,
                    b2: float = 0.999, nesterov: bool = False) -> optax.GradientTransformation:
    """AdamW with a one-cycle cosine learning rate over ``steps``, peaking at ``peak_lr`` a
    quarter of the way in (``best`` and ``time_to_accuracy``; the torch side of the race
    writes the same rate out as ``_tta_common.one_cycle``); ``b2`` and ``nesterov``: as
    :func:`functional_cnn.train.adamw`'s."""
    schedule = optax.cosine_onecycle_schedule(steps, peak_value=peak_lr, pct_start=0.25)
    return train.adamw(schedule, weight_decay=weight_decay, b2=b2, nesterov=nesterov)


def parse_args(p: Protocol, argv=None):
    ap = argparse.ArgumentParser(prog=f"python -m experiments.{p.name}",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None,
                    help=f"dir containing MNIST/raw (default ${data.ENV_VAR}, else ./data)")
    ap.add_argument("--dataset", default="MNIST", choices=data.DATASETS)
    ap.add_argument("--epochs", type=int, default=p.epochs)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--plot", default=None, help="write a PNG report here")
    ap.add_argument("--checkpoint", default=None, help="dir for NAME.npz, saved every epoch")
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    ap.add_argument("--vjp", default="custom", choices=("custom", "autodiff"))
    ap.add_argument("--optimizer", default=next(iter(p.optimizers)), choices=list(p.optimizers))
    ap.add_argument("--train-range", type=int, nargs=2, default=None, metavar=("START", "STOP"))
    ap.add_argument("--eval-limit", type=int, default=None,
                    help="evaluate on at most this many examples of each evaluation range")
    ap.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                    help="stop after this epoch, as an interruption would (to test --resume)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--formulations", metavar="PINS|tuned",
                    help="each convolution's conv2d formulation in training, e.g. banded,none "
                         "('none': as conv2d chooses), or 'tuned': measured in the training "
                         "step on this machine, cached (functional_cnn.tuning; the first run "
                         "measures for about half a minute); default: as conv2d chooses")
    ap.add_argument("--per-step", action="store_true",
                    help="a jitted call per training step instead of one lax.scan per epoch "
                         "(the conv protocols' choice under --vjp autodiff; a checkpoint "
                         "resumes only in the mode that wrote it)")
    ap.add_argument("--devices", type=int, default=None, metavar="N",
                    help="split each batch over N devices (default: all devices of the run)")
    ap.add_argument("--batch-size", type=int, default=None, metavar="B",
                    help=f"global batch size (default {p.batch_size}); must divide by --devices")
    ap.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help=f"multi-host: process 0's address (or ${dataparallel.ENV_COORDINATOR})")
    ap.add_argument("--num-processes", type=int, default=None, metavar="P",
                    help=f"multi-host: number of processes (or ${dataparallel.ENV_NUM_PROCESSES})")
    ap.add_argument("--process-id", type=int, default=None, metavar="I",
                    help=f"multi-host: this process, 0..P-1 (or ${dataparallel.ENV_PROCESS_ID})")
    args = ap.parse_args(argv)
    if args.epochs < 0 or (args.stop_after is not None and args.stop_after < 1):
        ap.error(f"expected --epochs >= 0 and --stop-after >= 1, got {args.epochs}, "
                 f"{args.stop_after}")
    if args.resume and not args.checkpoint:
        ap.error("--resume needs --checkpoint DIR")
    if args.batch_size is not None and args.batch_size < 1:
        ap.error(f"expected --batch-size >= 1, got {args.batch_size}")
    return args


def _mesh(p: Protocol, args):
    """Join the multi-host run if asked, then the device mesh; exits saying what to change."""
    try:
        dataparallel.initialize_distributed(args.coordinator, args.num_processes,
                                            args.process_id)
        mesh = dataparallel.make_mesh(args.devices)
        dataparallel.check_divides(args.batch_size or p.batch_size, mesh,
                                   where=f"experiments.{p.name}")
    except ValueError as err:
        raise SystemExit(f"python -m experiments.{p.name}: error: {err}") from None
    return mesh


def _ranges(p: Protocol, args):
    """The train and evaluation (split, start, stop) after the command-line overrides."""
    split, start, stop = p.train_range
    if args.train_range:
        start, stop = args.train_range
    evals = {}
    for name, (esplit, estart, estop) in p.eval_ranges.items():
        if args.eval_limit:
            estop = min(estop, estart + args.eval_limit)
        evals[name] = (esplit, estart, estop)
    return (split, start, stop), evals


def _load(args, ranges, mesh):
    """The training and evaluation sets, each cut from its split (read once) on the host and
    put on the devices as the trainer places them (replicated over ``mesh``: on one device
    first, they went to the devices a second time)."""
    cache = {}

    def get(split, start, stop):
        if split not in cache:
            cache[split] = data.Dataset(*data.load_numpy(args.dataset, split, args.data_dir))
        return data.to_device(*cache[split].range(start, stop), mesh=mesh)

    train_range, eval_ranges = ranges
    return get(*train_range), {k: get(*r) for k, r in eval_ranges.items()}


def run(p: Protocol, argv=None) -> dict:
    """Train and evaluate ``p`` as the command line says; returns (and writes) the results."""
    args = parse_args(p, argv)
    mesh = _mesh(p, args)  # before anything touches a device (jax.distributed needs that)
    main = dataparallel.is_main_process()
    batch_size = args.batch_size or p.batch_size
    ranges = _ranges(p, args)
    train_set, eval_sets = _load(args, ranges, mesh)
    steps = math.ceil(len(train_set) / batch_size)
    optimizer = p.optimizers[args.optimizer](steps * max(args.epochs, 1))

    def make(pins, scan=_scans(p, args), progress=None):
        return train.make_trainer(
            p.net(pins) if pins is not None else p.net(), optimizer, batch_size=batch_size,
            reduction=p.reduction, label_smoothing=p.label_smoothing,
            preprocess=functools.partial(data.normalize, mean=p.mean, std=p.std),
            augment=p.augment, shuffle=p.shuffle, vjp=args.vjp, scan=scan, mesh=mesh,
            progress=progress)
    pins = _formulations(p, args, make, train_set)
    trainer = make(pins, progress=None if args.no_progress or not main else train.ProgressBar())
    ts = trainer.init(jax.random.key(args.seed), (-1, 1) + train_set.images.shape[1:])
    primary, primary_set = next(iter(eval_sets.items()))
    ckpt = os.path.join(args.checkpoint, f"{p.name}.npz") if args.checkpoint else None
    fit = train.fit(trainer, ts, train_set, epochs=args.epochs, eval_data=primary_set,
                    eval_each_epoch=p.eval_each_epoch,
                    checkpoint_path=ckpt, resume=args.resume,
                    fingerprint={"experiment": p.name, "seed": args.seed,
                                 "optimizer": args.optimizer, "train_range": ranges[0],
                                 "dataset": args.dataset, "epochs": args.epochs},
                    log=lambda m: print(m, file=sys.stderr), stop_after=args.stop_after)
    evals = {k: fit.evaluation if k == primary and fit.evaluation is not None
             else train.evaluate(trainer, fit.train_state, d) for k, d in eval_sets.items()}
    result = _record(p, args, ranges, fit, evals, primary, batch_size, mesh, pins)
    if not main:  # one writer and one summary in a multi-host run
        return result
    _summary(p, result)
    if args.json:
        write_json(args.json, result)
    if args.plot:
        from experiments.plots import report_figure
        ev = evals[primary]
        report_figure(args.plot, f"{p.name} ({args.vjp}, {args.optimizer})", fit.history,
                      ev.labels, ev.predictions, np.asarray(eval_sets[primary].images))
    return result


def _formulations(p: Protocol, args, make: Callable, train_set) -> tuple | None:
    """The convolutions' training pins ``--formulations`` asks for: None (conv2d's choice),
    as given, or ``tuned``: measured in the training step on this machine (a scanned epoch,
    whichever way the run's epochs go) and cached by :mod:`functional_cnn.tuning`, so that
    a later run reads them back. Exits saying what to change where they cannot be had."""
    if args.formulations is None:
        return None
    where = f"python -m experiments.{p.name}: error: --formulations"
    if not p.convolutions:
        raise SystemExit(f"{where}: {p.name}'s network takes no formulations to pin")
    example = jax.ShapeDtypeStruct(train_set.images.shape[1:], train_set.images.dtype)
    try:
        pins, source = tuning.requested_pins(args.formulations,
                                             lambda pins: make(pins, scan=True),
                                             p.convolutions, (-1, 1) + example.shape, example)
    except ValueError as err:
        raise SystemExit(f"{where}: {err}") from None
    if args.formulations == "tuned":
        print(f"{p.name}: training formulations {tuning.pins_text(pins)} ({source})",
              file=sys.stderr)
    return pins


def _scans(p: Protocol, args) -> bool:
    """One ``lax.scan`` per epoch, unless ``--per-step`` asks for a call per step or the
    protocol calls autodiff's steps one at a time (:attr:`Protocol.autodiff_per_step`)."""
    return not (args.per_step or (p.autodiff_per_step and args.vjp == "autodiff"))


def _record(p, args, ranges, fit, evals, primary, batch_size, mesh, pins) -> dict:
    return {
        "experiment": p.name, "test_accuracy": evals[primary].accuracy,
        "test_set": primary, "accuracies": {k: e.accuracy for k, e in evals.items()},
        "test_loss": evals[primary].loss,
        "final_train_loss": fit.history[-1]["train_loss"] if fit.history else None,
        "train_seconds": fit.train_seconds, "epochs": len(fit.history), "vjp": args.vjp,
        "scan": _scans(p, args), "formulations": None if pins is None else list(pins),
        "optimizer": args.optimizer, "seed": args.seed, "batch_size": batch_size,
        "devices": int(mesh.size), "processes": jax.process_count(),
        "device_kind": mesh.devices.flat[0].device_kind,
        "train_range": list(ranges[0]), "eval_ranges": {k: list(v) for k, v in ranges[1].items()},
        "resumed_from_epoch": fit.resumed_from_epoch, "history": fit.history,
        "article": p.article, "jax_backend": jax.default_backend(),
        "jax_version": jax.__version__, **machine(),  # float rounding depends on the CPU
        "command": "python -m experiments." + p.name + " " + " ".join(sys.argv[1:]),
    }


def _summary(p, r):
    accs = ", ".join(f"{k} {v:.2%}" for k, v in r["accuracies"].items())
    loss = r["final_train_loss"]
    print(f"{p.name}: {accs} | final train loss {'-' if loss is None else f'{loss:.4f}'} | "
          f"{r['epochs']} epochs in {r['train_seconds']:.1f} s | vjp={r['vjp']} "
          f"optimizer={r['optimizer']} devices={r['devices']}")


def write_json(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
