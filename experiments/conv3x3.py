"""Articles 000/003: Conv 3x3 x8 (no bias), MaxPool 2, Linear 10 + softmax; pixels x/255 - 0.5;
the first 1000 training images, 3 epochs of batch-size-1 SGD (lr 0.005), one ``lax.scan`` per
epoch; accuracy on the first 1000 test images (the articles' figure) and on all 10000.

    python -m experiments.conv3x3 --json runs/conv3x3.json --plot docs/figures/conv3x3.png
"""
import jax
import optax

import functional_cnn as fcn
from experiments._common import Protocol, run


def net():
    """The articles' network, initialized as they do: filters U(-1, 1) (their numpy code does
    not scale by fan-in), softmax weights N(0, 1) / 1352, biases zero."""
    base = fcn.serial(fcn.Conv2d(8, 3, bias=False), fcn.MaxPool2d(2), fcn.Flatten(),
                      fcn.Linear(10))

    def init(key, input_shape):
        out_shape, params, state = base.init(key, input_shape)
        k_conv, k_fc = jax.random.split(jax.random.fold_in(key, 1))
        conv, _, _, fc = params
        conv = {"weight": jax.random.uniform(k_conv, conv["weight"].shape, minval=-1, maxval=1)}
        fan_in = fc["weight"].shape[1]
        fc = {"weight": jax.random.normal(k_fc, fc["weight"].shape) / fan_in,
              "bias": fc["bias"] * 0}
        return out_shape, (conv, {}, {}, fc), state

    return fcn.Layer(init, base.apply)


PROTOCOL = Protocol(
    name="conv3x3", net=net, optimizers={"sgd": lambda steps: optax.sgd(0.005)},
    train_range=("train", 0, 1000),
    eval_ranges={"test[0,1000)": ("test", 0, 1000), "test[0,10000)": ("test", 0, 10000)},
    batch_size=1, epochs=3, mean=0.5, std=1.0, reduction="sum",
    article={"accuracy": "about 0.8-0.9 on test[0,1000) (3 epochs; 003's log reaches 90-94% "
             "on the last 100 training images)", "implementation": "numpy loops"})

if __name__ == "__main__":
    run(PROTOCOL)
