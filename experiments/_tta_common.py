"""What the two time-to-accuracy scripts (``experiments/time_to_accuracy.py`` and the plain
PyTorch one, ``benchmarks/time_to_accuracy_torch.py``) share: the command line of a recipe
(each script passes its own defaults: the recipes are free, each side runs its best), the
one-cycle learning rate both compute, and the record they print and write. Plain Python:
importing it adds nothing to either side's start-up time (numpy: both have imported it)."""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from experiments._machine import machine

TRAIN_SIZE = 60000  # MNIST's training set: the plan is made before the data has loaded
ACTIVATIONS = ("relu", "silu")  # each side maps the names to its own layers
# AdamW, and AdamW with Nesterov momentum (optax.nadamw's update: the first moment's
# bias-corrected next value, ``b1 m_t / (1 - b1^(t+1)) + (1 - b1) g_t / (1 - b1^t)``, in place
# of ``m_t / (1 - b1^t)``; not torch.optim.NAdam, whose momentum decays on a schedule)
OPTIMIZERS = ("adamw", "nadamw")
# The first convolution: trained, or frozen at the leading principal components of the training
# images' patches (pca_filters) with a BatchNorm without affine parameters after it
FIRST_CONVS = ("trained", "pca")
PCA_IMAGES = 2000  # the training images whose patches pca_filters reads: the first ones


def recipe_parser(description: str, **defaults) -> argparse.ArgumentParser:
    """The flags both scripts take; ``defaults`` (keyed by the flags' dest) set the recipe."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--steps", type=int, help="the one-cycle schedule's length in steps; "
                        "the test set is evaluated after it")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--peak-lr", type=float)
    parser.add_argument("--weight-decay", type=float, help="AdamW's decoupled weight decay")
    parser.add_argument("--b2", type=float, help="the second moment's decay (torch's default: "
                        "0.999)")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--widths", type=lambda s: tuple(int(w) for w in s.split(",")),
                        help="the two convolutions' output channels, e.g. 16,32")
    parser.add_argument("--kernel", type=int, help="both convolutions' kernel size")
    parser.add_argument("--padding", type=int, help="both convolutions' zero padding")
    parser.add_argument("--hidden", type=int, help="the hidden linear layer's width (0: none)")
    parser.add_argument("--activation", choices=ACTIVATIONS,
                        help="after each BatchNorm and the hidden layer")
    parser.add_argument("--optimizer", choices=OPTIMIZERS,
                        help="AdamW, or AdamW with Nesterov momentum (optax.nadamw's update; "
                             "default: %(default)s)")
    parser.add_argument("--first-conv", choices=FIRST_CONVS,
                        help="the first convolution trained, or frozen at the principal "
                             "components of the training images' patches (then its BatchNorm "
                             "has no affine parameters and nothing before the second "
                             "convolution is trained: no backward pass there)")
    parser.add_argument("--extra-rounds", type=int, default=0,
                        help="if the target is missed: rounds of --steps more steps at the "
                             "schedule's final rate, each evaluated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir")
    parser.add_argument("--json")
    parser.set_defaults(**defaults)
    return parser


def feature_size(kernel: int, padding: int, stages: int = 2, size: int = 28) -> int:
    """The side of the feature map after ``stages`` conv (stride 1) + max-pool 2 stages."""
    for _ in range(stages):
        size = (size + 2 * padding - kernel + 1) // 2
    return size


def check_pca_filters(channels: int, kernel: int) -> None:
    """``ValueError`` unless :func:`pca_filters` can make ``channels`` filters of ``kernel``:
    checked before a run loads and compiles anything (``--first-conv pca``)."""
    if not 1 <= channels <= kernel * kernel:
        raise ValueError(f"pca_filters: {kernel}x{kernel} patches have {kernel * kernel} "
                         f"principal components; asked for {channels} filters")


def pca_filters(images, channels: int, kernel: int, mean: float, std: float,
                count: int = PCA_IMAGES) -> np.ndarray:
    """``(channels, 1, kernel, kernel)`` float32 filters: the ``channels`` leading principal
    components of the ``kernel x kernel`` patches of the first ``count`` of ``images`` (uint8
    ``(N, H, W)``, normalized as the networks see them: ``(x/255 - mean)/std``; the patches at
    every other row and column), largest variance first. Each is signed so that its entry of
    largest magnitude is positive: an eigensolver's signs are arbitrary, and SiLU after the
    filter is not odd, so every machine and both sides must get the same signs (the values
    agree to rounding: on MNIST the largest entry of each of the leading 9 beats any entry of
    the other sign by 1e-3 or more, and their eigenvalues are 9.6% apart or more).

    A frozen first convolution with these filters is the patch-PCA ("whitening") start of fast
    CIFAR-10 training recipes (hlb-CIFAR10, airbench), whitened here by the BatchNorm after it.
    """
    check_pca_filters(channels, kernel)
    x = (np.asarray(images[:count], np.float32) / 255 - mean) / std
    windows = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(1, 2))
    patches = windows[:, ::2, ::2].reshape(-1, kernel * kernel)
    _, vectors = np.linalg.eigh(np.cov(patches, rowvar=False))  # eigenvalues ascending
    leading = vectors[:, ::-1][:, :channels].T
    signs = np.sign(leading[np.arange(len(leading)), np.abs(leading).argmax(axis=1)])
    return (leading * signs[:, None]).reshape(-1, 1, kernel, kernel).astype(np.float32)


def plan(args) -> list[int]:
    """Where the test set is evaluated: after ``--steps``, then after each extra round (and
    the recipe checked first: its length, the frozen first convolution's filters)."""
    if args.steps * args.batch_size > TRAIN_SIZE * 10:
        raise SystemExit(f"--steps {args.steps} x --batch-size {args.batch_size} is over ten "
                         "epochs: not a time-to-accuracy recipe")
    if args.first_conv == "pca":
        try:
            check_pca_filters(args.widths[0], args.kernel)
        except ValueError as err:
            raise SystemExit(f"--first-conv pca: {err}") from None
    return [args.steps * (1 + r) for r in range(1 + args.extra_rounds)]


def one_cycle(step: int, steps: int, peak: float, pct_start: float = 0.25) -> float:
    """``optax.cosine_onecycle_schedule(steps, peak, pct_start)`` at ``step`` (after the end:
    its final value), written out so the torch side needs neither optax nor ``torch.optim``:
    a cosine rise from ``peak / 25`` to ``peak`` over the first ``int(pct_start * steps)``
    steps, then a cosine fall to ``peak / 25 / 1e4``."""
    rise = int(pct_start * steps)
    start, end = peak / 25, peak / 25 / 1e4
    if step < rise:
        return start + (peak - start) * (1 - math.cos(math.pi * step / rise)) / 2
    fall = min(step - rise, steps - rise) / (steps - rise)
    return end + (peak - end) * (1 + math.cos(math.pi * fall)) / 2


class Record:
    """The evaluations of one run, timed from ``start`` (the process's first statement)."""

    def __init__(self, start: float, target: float):
        self.start, self.target, self.history = start, target, []

    def evaluated(self, steps: int, images: int, accuracy: float) -> bool:
        """Record and print one evaluation after ``steps`` steps (``images`` training images
        seen); True once the target is reached."""
        self.history.append({"steps": steps, "images": images, "epochs": images / TRAIN_SIZE,
                             "test_accuracy": accuracy,
                             "seconds": time.perf_counter() - self.start})
        print(f"after {steps} steps ({images / TRAIN_SIZE:.2f} epochs): test accuracy "
              f"{accuracy:.4f} at {self.history[-1]['seconds']:.2f} s", flush=True)
        return accuracy >= self.target

    def finish(self, json_path: str | None, **fields) -> int:
        """Print the summary, write the JSON (with ``fields``); the exit code (0: reached)."""
        reached = bool(self.history) and self.history[-1]["test_accuracy"] >= self.target
        seconds = self.history[-1]["seconds"] if self.history else None
        result = {**fields, **machine(), "target": self.target, "reached": reached,
                  "seconds": seconds, "history": self.history}
        print(f"{'reached' if reached else 'did NOT reach'} {self.target:.1%}"
              + (f" in {seconds:.2f} s from process start" if seconds is not None else ""))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)
        return 0 if reached else 1
