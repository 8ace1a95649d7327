"""Article 001: its ``Net`` (Conv(32,3,s2,p1) MaxPool(3,s2) Conv(64,3,s2,p1)+BN+ReLU AvgPool(3)
Linear 10); pixels (x/255 - 0.5)/0.5; AdamW lr 0.01, sum-reduced cross-entropy, batch 10,
30 epochs on training images [0, 1500); accuracy on training images [1500, 60000).

Two optimizers, both "AdamW lr 0.01" by name:

* ``--optimizer mytorch`` (default): the article's own hand-written ``AdamW`` class, the one
  behind its 92.48%, transcribed update for update by :func:`mytorch_adamw`;
* ``--optimizer adamw``: ``torch.optim.AdamW(lr=0.01)``, the one behind its torch 91.53%.

    python -m experiments.mytorch_net --json runs/mytorch_net.json \
        --plot docs/figures/mytorch_net.png
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from functional_cnn import models, train
from experiments._common import Protocol, run

BATCH_SIZE = 10


class MytorchAdamWState(NamedTuple):
    count: jax.Array  # t, the number of steps taken
    mu: optax.Params  # m_t
    nu: optax.Params  # v_t


def mytorch_adamw(learning_rate=0.01, b1=0.9, b2=0.999, eps=1e-8,
                  grad_scale=1.0) -> optax.GradientTransformation:
    """Article 001's ``mytorch.AdamW.step`` as it runs, which is not torch's AdamW.

    With ``g = grad_scale * grad`` and ``t`` counting from 1, one step is::

        w <- w - lr * g                                              # a plain SGD step
        w <- w - lr * (m_{t-1} / (1 - b1^t)) / (sqrt(v_{t-1} / (1 - b2^t)) + eps)
        m_t = b1 m_{t-1} + (1 - b1) g;   v_t = b2 v_{t-1} + (1 - b2) g^2

    Three differences from ``torch.optim.AdamW``, all in the article's code: the extra SGD
    step on the raw gradient; the Adam step uses the moments *before* this step's update (so
    the first step is SGD alone); and ``weight_decay`` is stored but never applied. Its
    ``CrossEntropyLoss(reduction="sum")`` also returns the *mean's* gradient ``(p - y)/N``
    from ``backward``: pass ``grad_scale=1/N`` when the loss here is summed over a batch of N.
    """
    def init(params):
        def zeros():  # two separate buffers: the trainer donates the state
            return jax.tree.map(jnp.zeros_like, params)
        return MytorchAdamWState(jnp.zeros((), jnp.int32), zeros(), zeros())

    def update(grads, state, params=None):
        del params
        t = state.count + 1
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        g = jax.tree.map(lambda x: grad_scale * x, grads)
        updates = jax.tree.map(
            lambda g, m, v: -learning_rate * (g + (m / c1) / (jnp.sqrt(v / c2) + eps)),
            g, state.mu, state.nu)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, g)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, g)
        return updates, MytorchAdamWState(t, mu, nu)

    return optax.GradientTransformation(init, update)


PROTOCOL = Protocol(
    name="mytorch_net", net=models.mytorch_net,
    optimizers={
        "mytorch": lambda steps: mytorch_adamw(0.01, grad_scale=1 / BATCH_SIZE),
        "adamw": lambda steps: train.adamw(0.01, weight_decay=1e-2),
    },
    train_range=("train", 0, 1500), eval_ranges={"train[1500,60000)": ("train", 1500, 60000)},
    batch_size=BATCH_SIZE, epochs=30, mean=0.5, std=0.5, reduction="sum",
    autodiff_per_step=True, convolutions=2,
    shuffle=False,  # the article's DataLoader(sampler=range(1500)): the same order every epoch
    eval_each_epoch=False,  # 58500 evaluation images after each of 30 epochs of 1500
    article={"accuracy_numpy": 0.924752, "accuracy_torch": 0.9153,
             "final_train_loss_numpy": 0.0003739})

if __name__ == "__main__":
    run(PROTOCOL)
