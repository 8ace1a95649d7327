"""Build article 001's Net and show its hand-written gradients beside JAX autodiff's.

    python -m experiments.demo_gradients [--batch 10] [--seed 0]

Prints, for every parameter leaf, the largest absolute and relative difference between the
gradient of the sum-reduced cross-entropy computed through the hand-written rules
(``vjp="custom"``) and through JAX autodiff (``vjp="autodiff"``), and the jitted step time of each.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from jax import numpy as jnp

import functional_cnn as fcn
from functional_cnn import verify


def gradient_fn(net, state, vjp):
    def loss(params, x, y):
        logits, new_state = net.apply(params, state, x, train=True, vjp=vjp)
        return fcn.cross_entropy(logits, y, reduction="sum", vjp=vjp), new_state

    return jax.jit(jax.grad(loss, has_aux=True))


def median_ms(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    net = fcn.models.mytorch_net()
    init_key, data_key = jax.random.split(jax.random.key(args.seed))
    _, params, state = net.init(init_key, (args.batch, 1, 28, 28))
    x = jax.random.normal(data_key, (args.batch, 1, 28, 28))
    y = jnp.arange(args.batch) % 10

    grads = {vjp: gradient_fn(net, state, vjp) for vjp in fcn.VJP_MODES}
    custom, _ = grads["custom"](params, x, y)
    autodiff, _ = grads["autodiff"](params, x, y)

    print(f"article 001 Net, batch {args.batch}: hand-written VJPs vs JAX autodiff")
    print(f"{'parameter':<14}{'shape':<18}{'max |grad|':>12}{'max |diff|':>12}")
    tol = verify.tolerance("network")  # a whole network's float32 tolerance
    agree = True
    rows = verify.leaf_errors(custom, autodiff)
    for (name, g_c), (diff, scale) in zip(fcn.named_leaves(custom).items(), rows):
        agree &= tol.accepts(diff, scale)
        note = "  (conv bias before BatchNorm: zero up to rounding)" if scale < 1e-5 else ""
        print(f"{name:<14}{str(tuple(g_c.shape)):<18}{scale:>12.2e}{diff:>12.2e}{note}")
    times = {vjp: median_ms(fn, params, x, y) for vjp, fn in grads.items()}
    print(f"jitted gradient step: custom {times['custom']:.2f} ms, "
          f"autodiff {times['autodiff']:.2f} ms (median of 20)")
    print("gradients agree within float32 tolerance" if agree else "gradients DISAGREE")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
