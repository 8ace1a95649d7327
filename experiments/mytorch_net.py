"""Article 001: its ``Net`` (Conv(32,3,s2,p1) MaxPool(3,s2) Conv(64,3,s2,p1)+BN+ReLU AvgPool(3)
Linear 10); pixels (x/255 - 0.5)/0.5; AdamW lr 0.01, sum-reduced cross-entropy, batch 10,
30 epochs on training images [0, 1500); accuracy on training images [1500, 60000).

    python -m experiments.mytorch_net --json runs/mytorch_net.json \
        --plot docs/figures/mytorch_net.png
"""
from functional_cnn import models, train
from experiments._common import Protocol, run

PROTOCOL = Protocol(
    name="mytorch_net", net=models.mytorch_net,
    optimizers={"adamw": lambda steps: train.adamw(0.01, weight_decay=1e-2)},
    train_range=("train", 0, 1500), eval_ranges={"train[1500,60000)": ("train", 1500, 60000)},
    batch_size=10, epochs=30, mean=0.5, std=0.5, reduction="sum", scan=False,
    shuffle=False,  # the article's DataLoader(sampler=range(1500)): the same order every epoch
    eval_each_epoch=False,  # 58500 evaluation images after each of 30 epochs of 1500
    article={"accuracy_numpy": 0.924752, "accuracy_torch": 0.9153,
             "final_train_loss_numpy": 0.0003739})

if __name__ == "__main__":
    run(PROTOCOL)
