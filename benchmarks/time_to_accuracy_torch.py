"""Wall time from process start to 99.0% MNIST test accuracy, the same recipe in plain PyTorch.

    python benchmarks/time_to_accuracy_torch.py [--target 0.99] [--max-epochs 4] [--json PATH]

The PyTorch twin of ``experiments/time_to_accuracy.py``: the same LeNet-shaped network with
BatchNorm (``benchmarks.torch_twins.time_to_accuracy``), batch 128, AdamW (weight decay 5e-4)
with a one-cycle learning rate peaking at 3e-2, planned for ``--epochs`` (2) epochs, the whole
test set evaluated after each epoch from ``--eval-from`` (default: the schedule's end) on and the
run stopping as soon as it reaches ``--target``. The time printed counts
from the start of the interpreter (imports, data loading included). It is the fastest fair torch
version: the data set is read once into uint8 tensors, normalized once to float32
``(N, 1, 28, 28)`` (mean 0.1307, std 0.3081), reshuffled every epoch with ``torch.randperm`` (a
generator seeded by ``--seed``) and sliced into batches in memory (no ``DataLoader``); the ragged
last batch is kept, as on the JAX side. Data: ``--data-dir``, else ``$FUNCTIONAL_CNN_DATA``, else
``./data``, in torchvision's layout ``ROOT/MNIST/raw``.

The learning rate is ``torch.optim.lr_scheduler.OneCycleLR`` (cosine, ``div_factor=25``,
``final_div_factor=1e4``, two phases, no momentum cycling) stepped every batch, set up to give the
same value at every step as ``optax.cosine_onecycle_schedule(steps, peak, pct_start=0.25)``.
The two do not line up with the same arguments: optax peaks at step ``int(0.25 * steps)`` and
reaches its final value ``peak / 25 / 1e4`` at step ``steps`` (then holds it), while OneCycleLR
peaks at ``pct_start * total_steps - 1`` and ends at ``total_steps - 1``. So this script passes
``total_steps = steps + 1`` and ``pct_start = (int(0.25 * steps) + 1) / (steps + 1)``; the values
then agree to float32 rounding (optax computes in float32), and once the schedule is over (a run
that goes past ``--epochs``) the scheduler is no longer stepped, holding the final value as optax
does. (With the literal ``total_steps=steps, pct_start=0.25`` the warmup would end up to a step
early and the decay one step early, the last update using ``peak / 25 / 1e4`` instead of about
twice that, and stepping past the end would raise.)

Where the raw IDX files are only there gzipped (``*.gz``), they are read directly like
``functional_cnn.data`` does, instead of letting torchvision extract them next to the archives
(the shared data directory may be read-only); with the uncompressed files present, or none at
all, ``torchvision.datasets.MNIST(root, train=..., download=True)`` loads (or fetches) them.
"""
import time

START = time.perf_counter()  # first statement: imports below count

import argparse  # noqa: E402
import gzip  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torchvision  # noqa: E402

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``experiments`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.torch_twins import time_to_accuracy as twin  # noqa: E402
from experiments._tta_common import Record, first_evaluated_epoch, recipe_parser  # noqa: E402

MEAN, STD = 0.1307, 0.3081
ENV_VAR = "FUNCTIONAL_CNN_DATA"
_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx_gz(path, ndim):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise ValueError(f"{path}: not an IDX uint8 file with {ndim} dimensions")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=4 + 4 * ndim).view(shape)


def load_mnist(root, train):
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of the train or test split."""
    raw = os.path.join(root, "MNIST", "raw")
    stems = _FILES[train]
    if (not all(os.path.exists(os.path.join(raw, s)) for s in stems)
            and all(os.path.exists(os.path.join(raw, s + ".gz")) for s in stems)):
        return (_read_idx_gz(os.path.join(raw, stems[0] + ".gz"), 3),
                _read_idx_gz(os.path.join(raw, stems[1] + ".gz"), 1).long())
    ds = torchvision.datasets.MNIST(root, train=train, download=True)
    return ds.data, ds.targets


def onecycle(optimizer, peak_lr, steps, pct_start=0.25):
    """OneCycleLR giving ``optax.cosine_onecycle_schedule(steps, peak_lr, pct_start)``'s values
    (see the module docstring); step it after each of the first ``steps`` updates only."""
    warmup = int(pct_start * steps)  # optax's peak step
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=peak_lr, total_steps=steps + 1, pct_start=(warmup + 1) / (steps + 1),
        anneal_strategy="cos", div_factor=25, final_div_factor=1e4, three_phase=False,
        cycle_momentum=False)


def normalize(images):
    """uint8 ``(N, H, W)`` -> float32 ``(N, 1, H, W)``: ``(x / 255 - MEAN) / STD``."""
    return ((images.float() / 255 - MEAN) / STD).unsqueeze(1).contiguous()


def evaluate(model, images, labels, batch_size=1000):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), batch_size):
            logits = model(images[i:i + batch_size])
            correct += int((logits.argmax(-1) == labels[i:i + batch_size]).sum())
    model.train()
    return correct / len(labels)


def main(argv=None):
    parser = recipe_parser(__doc__.splitlines()[0])
    # tests only: train on the first N training images
    parser.add_argument("--train-limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    root = args.data_dir or os.environ.get(ENV_VAR) or "data"
    train_images, train_labels = load_mnist(root, train=True)
    test_images, test_labels = load_mnist(root, train=False)
    if args.train_limit is not None:
        train_images, train_labels = (train_images[:args.train_limit],
                                      train_labels[:args.train_limit])
    train_x, test_x = normalize(train_images), normalize(test_images)
    n = len(train_labels)
    steps = args.epochs * -(-n // args.batch_size)
    if steps < 4:
        parser.error(f"the one-cycle schedule needs at least 4 steps, got {steps}")

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = twin(torch.nn)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.peak_lr, weight_decay=5e-4)
    scheduler = onecycle(optimizer, args.peak_lr, steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    record = Record(START, args.target)
    for epoch in range(1, args.max_epochs + 1):
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = loss_fn(model(train_x[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler.last_epoch < steps:  # past the plan: hold the final value, as optax
                scheduler.step()
        if (epoch >= first_evaluated_epoch(args)
                and record.epoch(epoch, evaluate(model, test_x, test_labels))):
            break
    return record.finish(args.json, framework="torch", threads=torch.get_num_threads())


if __name__ == "__main__":
    raise SystemExit(main())
