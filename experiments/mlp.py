"""Article 004's 784-512-256-128-64-10 ReLU network, with LeNet's data protocol (batch 64,
10 epochs, (0.1307, 0.3081), the 10k test set). Default: AdamW (torch's defaults, lr 1e-3) with its
learning rate decayed to 0 along a cosine over the run (constant AdamW ends near 97.9%);
``--optimizer adamw`` keeps it constant, ``--optimizer sgd`` is the article's.

    python -m experiments.mlp --json runs/mlp.json --plot docs/figures/mlp.png
"""
from functional_cnn import models
from experiments._common import Protocol, article004_optimizers, run

PROTOCOL = Protocol(
    name="mlp", net=models.mlp, optimizers=article004_optimizers(1e-3),
    train_range=("train", 0, 60000), eval_ranges={"test": ("test", 0, 10000)},
    batch_size=64, epochs=10, mean=0.1307, std=0.3081,
    article={"accuracy": "about 97% (SGD lr 0.01 momentum 0.5)"})

if __name__ == "__main__":
    run(PROTOCOL)
