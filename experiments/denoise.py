"""Denoise MNIST with a small U-Net: Gaussian noise of sigma 0.5 on pixels in [0, 1], MSE loss.

    python -m experiments.denoise --json runs/denoise.json --plot runs/denoise.png [--vjp autodiff]

The network is an encoder-decoder with skip connections (``fan_out`` / ``fan_in_concat``):
two stride-2 convolutions down (28 -> 14 -> 7), ``ConvTranspose2d`` back up, ``GroupNorm`` and
``SiLU`` (``GELU`` in the bottleneck) after every convolution, and a 1x1 convolution to one
channel. It predicts the noise, and the denoised image is ``noisy - predicted noise`` (the
residual form trains faster than predicting the clean digit directly).

Noise is drawn on the device from the run's key: a fresh draw for every training batch, and one
fixed draw (the key folded with the image count) for the test set, so the test figures are
reproducible. ``test_psnr_db`` is the PSNR of the whole denoised test set,
``10 log10(1 / MSE)`` with the MSE over every pixel of the 10000 images and the output clipped
to [0, 1]; ``noisy_psnr_db`` is the same for the noisy input (unclipped, about 6 dB for sigma
0.5). Training is a jitted AdamW step per batch (one-cycle learning rate) for ``--epochs``,
sized to stay within 2 minutes of training on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import numpy as np
import optax
from jax import numpy as jnp

import functional_cnn as fcn
from experiments._common import write_json
from experiments._machine import machine
from functional_cnn import data, train

SIGMA = 0.5


def conv_block(channels, act=fcn.SiLU):
    return [fcn.Conv2d(channels, 3, padding=1), fcn.GroupNorm(4), act()]


def unet(width: int = 8) -> fcn.Layer:
    """Two levels of a U-Net on 28x28: ``width`` channels at full size, ``2 width`` at 14x14,
    ``4 width`` at 7x7; each skip concatenates the encoder's features with the decoder's."""
    def skip(*inner):
        return [fcn.fan_out(2), fcn.parallel(fcn.serial(*inner), fcn.Identity()),
                fcn.fan_in_concat()]

    bottom = [fcn.Conv2d(4 * width, 3, stride=2, padding=1), fcn.GroupNorm(4), fcn.GELU(),
              *conv_block(4 * width, fcn.GELU),
              fcn.ConvTranspose2d(2 * width, 2, stride=2)]                # 7 -> 14
    middle = [fcn.Conv2d(2 * width, 3, stride=2, padding=1), fcn.GroupNorm(4), fcn.SiLU(),
              *skip(*bottom), *conv_block(2 * width),
              fcn.ConvTranspose2d(width, 2, stride=2)]                    # 14 -> 28
    return fcn.serial(*conv_block(width), *skip(*middle), *conv_block(width),
                      fcn.Conv2d(1, 1))


def add_noise(key, clean):
    return clean + SIGMA * jax.random.normal(key, clean.shape, clean.dtype)




def psnr_db(mse) -> float:
    return float(10 * math.log10(1.0 / float(mse)))


def make_step(net, optimizer, vjp):
    """One jitted AdamW step on a batch of clean uint8 images; returns the batch's mean loss."""

    def objective(params, state, noisy, clean):
        noise, new_state = net.apply(params, state, noisy, train=True, vjp=vjp)
        return fcn.mse_loss(noisy - noise, clean, vjp=vjp), new_state

    @jax.jit
    def step(params, state, opt_state, key, images_u8):
        clean = data.normalize(images_u8)
        noisy = add_noise(key, clean)
        (loss, state), grads = jax.value_and_grad(objective, has_aux=True)(
            params, state, noisy, clean)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    return step


def make_denoiser(net, vjp, chunk=1000):
    """``denoise(params, state, key, images_u8) -> (clean, noisy, denoised)`` in eval mode."""

    @jax.jit
    def one_chunk(params, state, key, images_u8):
        clean = data.normalize(images_u8)
        noisy = add_noise(key, clean)
        noise, _ = net.apply(params, state, noisy, train=False, vjp=vjp)
        return clean, noisy, jnp.clip(noisy - noise, 0.0, 1.0)

    def denoise(params, state, key, images_u8):
        parts = [one_chunk(params, state, jax.random.fold_in(key, i), images_u8[i:i + chunk])
                 for i in range(0, images_u8.shape[0], chunk)]
        return tuple(jnp.concatenate(p) for p in zip(*parts))

    return denoise


def _curve(losses, first_step, every=50):
    """``[step, mean loss of the ``every`` steps ending there]`` pairs, for the loss plot."""
    return [[first_step + i + len(chunk), float(chunk.mean())]
            for i in range(0, len(losses), every) for chunk in [losses[i:i + every]]]


def train_epochs(args, net, train_set, key):
    """The training loop: a fresh shuffle and noise key per epoch, one jitted step per batch."""
    steps_per_epoch = len(train_set) // args.batch_size
    schedule = optax.cosine_onecycle_schedule(steps_per_epoch * args.epochs, args.peak_lr,
                                              pct_start=0.25)
    optimizer = train.adamw(schedule, weight_decay=1e-4)
    init_key, key = jax.random.split(key)
    _, params, state = net.init(init_key, (-1, 1, 28, 28))
    opt_state = optimizer.init(params)
    step = make_step(net, optimizer, args.vjp)
    history, start = [], time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        key, perm_key, noise_key = jax.random.split(key, 3)
        batches, _ = data.batch_indices(perm_key, len(train_set), args.batch_size)
        losses = []
        for i in range(batches.shape[0]):
            params, state, opt_state, loss = step(params, state, opt_state,
                                                  jax.random.fold_in(noise_key, i),
                                                  train_set.images[batches[i]])
            losses.append(loss)
        losses = np.asarray(jnp.stack(losses))
        history.append({"epoch": epoch, "train_loss": float(losses.mean()),
                        "seconds": time.perf_counter() - start,
                        "curve": _curve(losses, (epoch - 1) * batches.shape[0])})
        print(f"epoch {epoch}: train MSE {history[-1]['train_loss']:.5f} "
              f"({history[-1]['seconds']:.1f} s)", flush=True)
    return params, state, history, time.perf_counter() - start


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.denoise",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--peak-lr", type=float, default=3e-3)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--train-limit", type=int, default=None, help="train on the first N images")
    ap.add_argument("--test-limit", type=int, default=None, help="evaluate the first N images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vjp", default="custom", choices=fcn.VJP_MODES)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    train_set = data.load("MNIST", "train", args.data_dir)
    test_set = data.load("MNIST", "test", args.data_dir)
    if args.train_limit:
        train_set = train_set.range(0, args.train_limit)
    if args.test_limit:
        test_set = test_set.range(0, args.test_limit)
    net = unet(args.width)
    train_key, test_key = jax.random.split(jax.random.key(args.seed))
    params, state, history, seconds = train_epochs(args, net, train_set, train_key)
    clean, noisy, denoised = make_denoiser(net, args.vjp)(params, state, test_key,
                                                           test_set.images)
    result = {
        "experiment": "denoise", "sigma": SIGMA, "seed": args.seed, "vjp": args.vjp,
        "test_psnr_db": psnr_db(jnp.mean((denoised - clean) ** 2)),
        "noisy_psnr_db": psnr_db(jnp.mean((noisy - clean) ** 2)),
        "test_mse": float(jnp.mean((denoised - clean) ** 2)),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "train_seconds": seconds, "epochs": args.epochs, "batch_size": args.batch_size,
        "width": args.width, "params": sum(int(np.prod(x.shape))
                                           for x in jax.tree.leaves(params)),
        "test_images": len(test_set), "history": history,
        "jax_backend": jax.default_backend(), "jax_version": jax.__version__, **machine(),
        "command": "python -m experiments.denoise " + " ".join(sys.argv[1:]),
    }
    print(f"denoise: test PSNR {result['test_psnr_db']:.2f} dB (noisy input "
          f"{result['noisy_psnr_db']:.2f} dB) after {args.epochs} epochs in {seconds:.1f} s, "
          f"vjp={args.vjp}")
    if args.json:
        write_json(args.json, result)
    if args.plot:
        from experiments.plots import denoise_figure
        denoise_figure(args.plot, f"denoise ({args.vjp})", history, np.asarray(clean[:8]),
                       np.asarray(noisy[:8]), np.asarray(denoised[:8]))
    return result


if __name__ == "__main__":
    main()
