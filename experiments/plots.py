"""One PNG per run: loss and accuracy per epoch, the confusion matrix, misclassified digits."""
from __future__ import annotations

import os

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int = 10) -> np.ndarray:
    """``m[true, predicted]`` counts."""
    m = np.zeros((classes, classes), np.int64)
    np.add.at(m, (labels, predictions), 1)
    return m


def report_figure(path: str, title: str, history: list, labels, predictions, images,
                  grid=(3, 8)) -> str:
    """Write the four panels to ``path`` (matplotlib's Agg backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 7), dpi=72)
    outer = fig.add_gridspec(2, 3)
    epochs = [h["epoch"] for h in history]
    ax = fig.add_subplot(outer[0, 0])
    ax.plot(epochs, [h["train_loss"] for h in history], "o-")
    ax.set(xlabel="epoch", ylabel="train loss (per example)", title="loss")
    ax = fig.add_subplot(outer[0, 1])
    ax.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    if any("eval_accuracy" in h for h in history):
        ev = [(h["epoch"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
        ax.plot(*zip(*ev), "s-", label="test")
    ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax.legend()
    ax = fig.add_subplot(outer[0, 2])
    m = confusion_matrix(labels, predictions)
    ax.imshow(np.log1p(m), cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix",
           xticks=range(10), yticks=range(10))
    wrong = np.flatnonzero(labels != predictions)[: grid[0] * grid[1]]
    inner = outer[1, :].subgridspec(*grid)
    for k, idx in enumerate(wrong):
        ax = fig.add_subplot(inner[k // grid[1], k % grid[1]])
        ax.imshow(images[idx], cmap="gray_r")
        ax.set_title(f"pred {predictions[idx]} / true {labels[idx]}", fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{title}: {len(np.flatnonzero(labels != predictions))} of {len(labels)} "
                 f"evaluation digits misclassified")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def denoise_figure(path: str, title: str, history: list, clean, noisy, denoised) -> str:
    """Clean / noisy / denoised digits in three rows, and the training loss per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(clean)
    fig = plt.figure(figsize=(12, 5), dpi=72)
    outer = fig.add_gridspec(1, 2, width_ratios=(3, 1))
    grid = outer[0, 0].subgridspec(3, n)
    for row, (name, images) in enumerate((("clean", clean), ("noisy", noisy),
                                          ("denoised", denoised))):
        for k in range(n):
            ax = fig.add_subplot(grid[row, k])
            ax.imshow(np.clip(images[k, 0], 0, 1), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(name)
    ax = fig.add_subplot(outer[0, 1])
    curve = [point for h in history for point in h["curve"]]
    if curve:
        ax.plot(*zip(*curve))
    ax.set(xlabel="step", ylabel="train MSE (mean of 50 steps)", title="loss", yscale="log")
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
