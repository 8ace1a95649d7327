"""Wall time from process start to 99.0% MNIST test accuracy, with our fastest recipe.

    python -m experiments.time_to_accuracy [--target 0.99] [--max-epochs 4] [--vjp custom]
        [--compile-cache DIR]

A small LeNet-shaped network with BatchNorm (8 and 16 channels), batch 128, AdamW with a
one-cycle learning rate peaking at 3e-2, planned for ``--epochs`` (2) epochs; the whole test
set is evaluated after each epoch from ``--eval-from`` (default: the schedule's end) on, and
the run stops as soon as it reaches ``--target``. The time printed counts from the start of the
interpreter (imports, data loading and compilation included): a cold start, unless
``--compile-cache DIR`` lets a second run reuse the first one's compiled programs (JAX's
persistent compilation cache). ``benchmarks/time_to_accuracy_torch.py`` is the same recipe in
plain PyTorch.
"""
import time

START = time.perf_counter()  # first statement: imports below count

from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import jax  # noqa: E402

import functional_cnn as fcn  # noqa: E402
from experiments._common import one_cycle_adamw  # noqa: E402
from experiments._tta_common import Record, first_evaluated_epoch, recipe_parser  # noqa: E402
from functional_cnn import data, train  # noqa: E402

MEAN, STD = 0.1307, 0.3081
TRAIN_SIZE = 60000  # MNIST's training set (the schedule is planned before it has loaded)


def net():
    def stage(channels):
        return [fcn.Conv2d(channels, 5, bias=False), fcn.BatchNorm2d(), fcn.ReLU(),
                fcn.MaxPool2d(2)]

    return fcn.serial(*stage(8), *stage(16), fcn.Flatten(), fcn.Linear(10))


def _background(fn, *args):
    """Run ``fn(*args)`` on a thread; ``.result()`` waits for it (and re-raises its error)."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future


def main(argv=None):
    parser = recipe_parser(__doc__.splitlines()[0])
    parser.add_argument("--compile-cache", metavar="DIR",
                        help="JAX's persistent compilation cache (a warm start on the next run)")
    parser.add_argument("--vjp", default="custom", choices=fcn.VJP_MODES)
    args = parser.parse_args(argv)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    eval_from = first_evaluated_epoch(args)

    # The data sets load on a thread (gzip releases the GIL) while the initial state compiles.
    loading = _background(lambda: (data.load("MNIST", "train", args.data_dir),
                                   data.load("MNIST", "test", args.data_dir)))
    steps = args.epochs * -(-TRAIN_SIZE // args.batch_size)
    trainer = train.make_trainer(
        net(), one_cycle_adamw(steps, args.peak_lr), batch_size=args.batch_size,
        vjp=args.vjp, preprocess=lambda u8: data.normalize(u8, MEAN, STD))
    ts = trainer.init(jax.random.key(args.seed), (-1, 1, 28, 28))
    train_set, test_set = loading.result()
    if len(train_set) != TRAIN_SIZE:
        raise SystemExit(f"expected {TRAIN_SIZE} MNIST training images, got {len(train_set)}")
    record = Record(START, args.target)
    for epoch in range(1, args.max_epochs + 1):
        ts, _ = trainer.epoch(ts, train_set.images, train_set.labels)
        if epoch < eval_from:
            continue
        if record.epoch(epoch, train.evaluate(trainer, ts, test_set).accuracy):
            break
    return record.finish(args.json, framework="functional_cnn", vjp=args.vjp,
                         compile_cache=bool(args.compile_cache))


if __name__ == "__main__":
    raise SystemExit(main())
