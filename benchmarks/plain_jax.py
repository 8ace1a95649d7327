"""The article networks written the straightforward way in plain JAX: NCHW ``lax`` convolutions,
``reduce_window`` pooling, ``jax.nn.relu``, optax's cross-entropy, all differentiated by JAX.
This is the "plain JAX autodiff" baseline of ``benchmarks.bench``; it takes the parameter and
state pytrees of ``functional_cnn.models`` so that all implementations start from the same weights.
"""
import jax
import numpy as np
import optax
from jax import lax


def conv(p, x, stride=1, padding=0):
    y = lax.conv_general_dilated(x, p["weight"], (stride, stride), [(padding, padding)] * 2,
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + p["bias"][None, :, None, None]


def max_pool(x, k, s):
    return lax.reduce_window(x, -np.inf, lax.max, (1, 1, k, k), (1, 1, s, s), "VALID")


def avg_pool(x, k):
    return lax.reduce_window(x, 0.0, lax.add, (1, 1, k, k), (1, 1, k, k), "VALID") / (k * k)


def batch_norm_train(p, s, x, momentum=0.1, eps=1e-5):
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    n = x.size // x.shape[1]
    y = (x - mean[None, :, None, None]) * lax.rsqrt(var + eps)[None, :, None, None]
    new = {"running_mean": (1 - momentum) * s["running_mean"] + momentum * mean,
           "running_var": (1 - momentum) * s["running_var"] + momentum * var * n / (n - 1)}
    return y * p["weight"][None, :, None, None] + p["bias"][None, :, None, None], \
        jax.tree.map(lax.stop_gradient, new)


def dense(p, x):
    return x @ p["weight"].T + p["bias"]


def lenet(params, state, x):
    x = max_pool(jax.nn.relu(conv(params[0], x)), 2, 2)
    x = max_pool(jax.nn.relu(conv(params[3], x)), 2, 2)
    return dense(params[7], x.reshape(x.shape[0], -1)), state


def mytorch_net(params, state, x):
    x = max_pool(conv(params[0], x, 2, 1), 3, 2)
    block_p, block_s = params[2], state[2]
    x, bn_state = batch_norm_train(block_p[1], block_s[1], conv(block_p[0], x, 2, 1))
    x = avg_pool(jax.nn.relu(x), 3)
    new_state = state[:2] + ((block_s[0], bn_state, block_s[2]),) + state[3:]
    return dense(params[5], x.reshape(x.shape[0], -1)), new_state


def mlp(params, state, x):
    x = x.reshape(x.shape[0], -1)
    for i in (1, 3, 5, 7):
        x = jax.nn.relu(dense(params[i], x))
    return dense(params[9], x), state


APPLY = {"lenet": lenet, "mytorch_net": mytorch_net, "mlp": mlp}


def loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
