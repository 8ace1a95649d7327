"""2-D convolution (cross-correlation, as in PyTorch): ``conv2d``."""
from __future__ import annotations

from typing import NamedTuple

from jax import lax
from jax import numpy as jnp

from .. import _checks
from ._registry import check_vjp, register, two_gradients
from ._windows import Axis, add_window_views, make_axis, pad_spatial, unpad_spatial, window_views

# XLA:CPU runs a convolution on its fast (Eigen) path only in the canonical layout: input
# NHWC, kernel HWIO, output NHWC. Outside loops its layout pass rewrites other layouts, but inside
# a while loop (lax.scan) it does not, and an NCHW convolution there runs 5-15x slower. So every
# convolution below is written canonically, with explicit transposes from and to PyTorch's NCHW.
_CANONICAL = ("NHWC", "HWIO", "NHWC")


class ConvConfig(NamedTuple):
    axes: tuple[Axis, Axis]  # (height, width) geometry, pad_hi adjusted to the windows' reach
    groups: int


def _strides(cfg):
    return tuple(a.stride for a in cfg.axes)


def _dilations(cfg):
    return tuple(a.dilation for a in cfg.axes)


def _nhwc(x):
    return x.transpose(0, 2, 3, 1)


def _nchw(x):
    return x.transpose(0, 3, 1, 2)


def _hwio(weight):
    return weight.transpose(2, 3, 1, 0)


def _single_channel(cfg, in_channels: int) -> bool:
    """The fast path: one input channel (first layers on images like MNIST), no groups.

    There a convolution is a tiny contraction (kh*kw terms), which XLA:CPU's convolution handles
    poorly; as a batched matrix product over im2col patches it runs about twice as fast (measured
    in ``experiments.bench``: LeNet's first layer, forward + weight gradient, 1.8-2.2x).
    """
    return cfg.groups == 1 and in_channels == 1


def _patches(cfg, x):
    """im2col: ``(N, C*kh*kw, H_out*W_out)``, rows in the weight's (c, a, b) order."""
    views = jnp.stack(window_views(pad_spatial(x, cfg.axes, 0), cfg.axes), axis=2)
    return views.reshape(x.shape[0], -1, cfg.axes[0].out_size * cfg.axes[1].out_size)


def _matmul_per_sample(w2, m):
    """``w2 @ m[n]`` for every sample ``n``: ``(r, k) x (N, k, c) -> (N, r, c)``."""
    return lax.dot_general(jnp.broadcast_to(w2, (m.shape[0],) + w2.shape), m,
                           (((2,), (1,)), ((0,), (0,))))


def _forward(cfg, x, weight, bias):
    if _single_channel(cfg, x.shape[1]):
        # y[n] = W (O, kh*kw) @ patches[n]: already NCHW, no transposes
        y = _matmul_per_sample(weight.reshape(weight.shape[0], -1), _patches(cfg, x))
        y = y.reshape(x.shape[0], -1, cfg.axes[0].out_size, cfg.axes[1].out_size)
    else:
        y = _nchw(lax.conv_general_dilated(
            _nhwc(x), _hwio(weight), window_strides=_strides(cfg),
            padding=[(a.pad_lo, a.pad_hi) for a in cfg.axes],
            rhs_dilation=_dilations(cfg), dimension_numbers=_CANONICAL,
            feature_group_count=cfg.groups))
    return y if bias is None else y + bias[None, :, None, None]


def _fwd(cfg, x, weight, bias):
    return _forward(cfg, x, weight, bias), (x, weight, bias is None)


def _flipped_transposed_kernel(weight, groups):
    """``(O, I/g, kh, kw) -> (I, O/g, kh, kw)`` per group, spatially flipped by 180 degrees."""
    out_ch, in_per_group, kh, kw = weight.shape
    w = weight.reshape(groups, out_ch // groups, in_per_group, kh, kw)
    w = w.transpose(0, 2, 1, 3, 4).reshape(groups * in_per_group, out_ch // groups, kh, kw)
    return jnp.flip(w, (2, 3))


def _input_grad(cfg, g, weight):
    if _single_channel(cfg, weight.shape[1]):
        # col2im: dP[n] = W^T (kh*kw, O) @ g[n], each patch row scattered back to its window offset
        n = g.shape[0]
        w2 = weight.reshape(weight.shape[0], -1)
        d_patches = _matmul_per_sample(w2.T, g.reshape(n, g.shape[1], -1))
        d_patches = d_patches.reshape(n, 1, -1, *g.shape[2:])
        views = [d_patches[:, :, k] for k in range(d_patches.shape[2])]
        return unpad_spatial(add_window_views(views, cfg.axes), cfg.axes)
    # Full correlation of the stride-dilated cotangent with the flipped kernel. The padding
    # d(k-1) - pad on each side is exact because pad_hi reaches exactly the last window.
    dx = lax.conv_general_dilated(
        _nhwc(g), _hwio(_flipped_transposed_kernel(weight, cfg.groups)), window_strides=(1, 1),
        padding=[(a.span - 1 - a.pad_lo, a.span - 1 - a.pad_hi) for a in cfg.axes],
        lhs_dilation=_strides(cfg), rhs_dilation=_dilations(cfg),
        dimension_numbers=_CANONICAL, feature_group_count=cfg.groups)
    return _nchw(dx)


def _weight_grad(cfg, x, g):
    if _single_channel(cfg, x.shape[1]):  # dW = sum_n g[n] (O, HW) @ patches[n]^T (HW, kh*kw)
        g2 = g.reshape(g.shape[0], g.shape[1], -1)
        dw = lax.dot_general(g2, _patches(cfg, x), (((2,), (2,)), ((0,), (0,)))).sum(axis=0)
        return dw.reshape(g.shape[1], 1, *(a.kernel for a in cfg.axes))
    # Correlate the padded input with the cotangent used as a kernel dilated by the stride,
    # stepping by the dilation. The roles swap: x's channels act as the batch and its samples
    # as the features summed over, so x goes in as (C, H, W, N), g as the kernel (Ho, Wo, N, O),
    # and the result (C, kh, kw, O) is the weight transposed. Groups split x's channel axis.
    dw = lax.conv_general_dilated(
        x.transpose(1, 2, 3, 0), g.transpose(2, 3, 0, 1), window_strides=_dilations(cfg),
        padding=[(a.pad_lo, a.pad_hi) for a in cfg.axes],
        rhs_dilation=_strides(cfg), dimension_numbers=_CANONICAL,
        batch_group_count=cfg.groups)
    return dw.transpose(3, 0, 1, 2)


def _bwd(cfg, residuals, g):
    x, weight, no_bias = residuals
    dbias = None if no_bias else g.sum(axis=(0, 2, 3))
    return _input_grad(cfg, g, weight), _weight_grad(cfg, x, g), dbias


_conv2d = two_gradients(_forward, _fwd, _bwd)


def conv_padding(where: str, padding, kernel: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch's conv padding argument as ``((lo, hi), (lo, hi))`` for height and width.

    ``"same"`` pads ``d(k-1)`` in total, the odd element on the high side (as PyTorch does) and
    is only defined for stride 1; ``"valid"`` is no padding.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(f"{where}: padding must be an int, a pair, 'same' or 'valid', "
                             f"got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"{where}: padding='same' needs stride 1 (as in PyTorch), "
                             f"got stride {stride}")
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    ph, pw = _checks.int_pair(where, "padding", padding, minimum=0)
    return (ph, ph), (pw, pw)


def conv_config(where: str, in_shape, weight_shape, stride, padding, dilation,
                groups) -> ConvConfig:
    """Validate a convolution against PyTorch's rules and resolve its geometry."""
    _checks.check_rank(where, in_shape, (4,), "(N, C, H, W)")
    if len(weight_shape) != 4:
        raise ValueError(f"{where}: expected a 4-D weight (O, I/groups, kh, kw), "
                         f"got shape {tuple(weight_shape)}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{where}: groups must be a positive int, got {groups!r}")
    in_ch, out_ch = in_shape[1], weight_shape[0]
    if in_ch % groups or out_ch % groups:
        raise ValueError(f"{where}: groups={groups} must divide both in_channels={in_ch} "
                         f"and out_channels={out_ch}")
    _checks.check_channels(where, in_shape, weight_shape[1] * groups,
                           context=f"(weight {tuple(weight_shape)} with groups={groups})")
    kernel = tuple(weight_shape[2:])
    stride = _checks.int_pair(where, "stride", stride)
    dilation = _checks.int_pair(where, "dilation", dilation)
    pads = conv_padding(where, padding, kernel, stride, dilation)
    axes = tuple(make_axis(n, k, s, d, lo, hi)
                 for n, k, s, d, (lo, hi) in zip(in_shape[2:], kernel, stride, dilation, pads))
    check_window_fits(where, in_shape, axes, pads)
    return ConvConfig(axes, groups)


def check_window_fits(where: str, in_shape, axes, pads) -> None:
    if any(a.out_size < 1 for a in axes):
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(in_shape[2:], pads))
        window = tuple(a.span for a in axes)
        raise ValueError(f"{where}: the window {window[0]}x{window[1]} (kernel with dilation) "
                         f"is larger than the padded input {padded[0]}x{padded[1]} "
                         f"(input shape {tuple(in_shape)})")


@register()
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           vjp: str = "custom"):
    """2-D cross-correlation, ``torch.nn.functional.conv2d`` semantics and layouts.

    ``x (N, C, H, W)`` (or unbatched ``(C, H, W)``), ``weight (O, C/groups, kh, kw)``,
    ``bias (O,)``; padding is an int, a pair, ``"same"`` or ``"valid"``.

    Forward, with padded input ``xp``, stride ``s`` and dilation ``d``::

        y[n, o, i, j] = b[o] + sum_{c in group(o), a, b'}
                               W[o, c, a, b'] xp[n, c, i s + a d, j s + b' d]

    Backward rule (each a convolution again, so it is itself differentiable)::

        dx = conv(dilate_s(g), flip180(W^T per group), padding d(k-1) - pad)   full correlation
        dW[o, c, a, b'] = sum_{n,i,j} g[n, o, i, j] xp[n, c, i s + a d, j s + b' d]
                        = conv over samples of xp with g as a kernel dilated by s, stride d
        db[o] = sum_{n,i,j} g[n, o, i, j]

    With a single input channel (and no groups) all three run as batched matrix products over
    im2col patches ``P[n] (kh*kw, H_out*W_out)``: ``y[n] = W P[n]``, ``dW = sum_n g[n] P[n]^T``,
    ``dx = col2im(W^T g[n])`` -- the same sums, in a form XLA:CPU runs about twice as fast.
    """
    check_vjp("conv2d", vjp)
    _checks.check_floating("conv2d", x)
    if jnp.ndim(x) == 3:
        return conv2d(x[None], weight, bias, stride, padding, dilation, groups, vjp=vjp)[0]
    cfg = conv_config("conv2d", jnp.shape(x), jnp.shape(weight), stride, padding, dilation,
                      groups)
    if bias is not None and tuple(jnp.shape(bias)) != (weight.shape[0],):
        raise ValueError(f"conv2d: expected bias of shape ({weight.shape[0]},), "
                         f"got {tuple(jnp.shape(bias))}")
    return _conv2d(vjp, cfg, x, weight, bias)
