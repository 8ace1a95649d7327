"""2-D convolution (cross-correlation, as in PyTorch): ``conv2d``, and its transpose
``conv_transpose2d``."""
from __future__ import annotations

import functools
import operator
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax import lax
from jax import numpy as jnp

from .. import _checks
from . import _formulation
from . import _spaces as S
from ._precision import accumulating
from ._registry import check_vjp, register, two_gradients
from ._windows import (Axis, add_window_views, check_window_fits, make_axis, pad_spatial,
                       transposed_axis, unpad_spatial, whole_axis, window_views)

# XLA:CPU runs a convolution on its fast (Eigen) path only in the canonical layout: input
# NHWC, kernel HWIO, output NHWC. Outside loops its layout pass rewrites other layouts, but inside
# a while loop (lax.scan) it does not, and an NCHW convolution there runs 5-15x slower. So every
# convolution below is written canonically, with explicit transposes from and to PyTorch's NCHW.
_CANONICAL = ("NHWC", "HWIO", "NHWC")

class ConvConfig(NamedTuple):
    axes: tuple[Axis, Axis]  # (height, width) geometry, pad_hi adjusted to the windows' reach
    groups: int
    mode: str = "gates"  # how each part's formulation is chosen: _formulation.mode() at the call
    formulation: str | None = None  # the caller's choice for all three parts, over the mode
    narrow_tiles: bool = False  # the band's tiles of 2 columns: _tiles, _differentiated

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

def _oihw(weight):
    """The inverse of :func:`_hwio`."""
    return weight.transpose(3, 2, 0, 1)

# ------------------------------------------- im2col: the patches as one matrix per sample

def _single_channel(cfg, in_channels: int) -> bool:
    """The im2col gate: one input channel (first layers on images like MNIST), no groups.

    There a convolution is a tiny contraction (kh*kw terms), which XLA:CPU's convolution handles
    poorly; as a batched matrix product over im2col patches it runs about twice as fast (article
    001's first layer, 1->32 k3 s2, forward + weight gradient).
    """
    return cfg.groups == 1 and in_channels == 1

def _im2col_applies(cfg, x_shape, weight_shape) -> bool:
    """Where im2col can run at all (a candidate to measure): no groups, and patches of at most
    :data:`_IM2COL_MAX_ELEMENTS` (they hold ``kh*kw`` copies of the input)."""
    patches = x_shape[0] * x_shape[1] * _kernel_taps(cfg) * _out_pixels(cfg)
    return cfg.groups == 1 and patches <= _IM2COL_MAX_ELEMENTS

_IM2COL_MAX_ELEMENTS = 1 << 25  # 128 MiB of float32 patches
_IM2COL_REQUIRES = (f"groups=1 and patches of at most {_IM2COL_MAX_ELEMENTS} entries "
                    "(they grow with the batch)")  # what _im2col_applies asks, in words

def _patches(cfg, x):
    """im2col: ``(N, C*kh*kw, H_out*W_out)``, rows in the weight's (c, a, b) order.

    Every reshape here spells its sizes out: with ``-1`` an empty batch (N = 0) has no size to
    infer."""
    views = jnp.stack(window_views(pad_spatial(x, cfg.axes, 0), cfg.axes), axis=2)
    return views.reshape(x.shape[0], x.shape[1] * _kernel_taps(cfg), _out_pixels(cfg))

def _kernel_taps(cfg) -> int:
    return cfg.axes[0].kernel * cfg.axes[1].kernel

def _out_pixels(cfg) -> int:
    return cfg.axes[0].out_size * cfg.axes[1].out_size

def _pixels_flat(cfg, g):
    """``(N, O, H_out, W_out) -> (N, O, H_out*W_out)``."""
    return g.reshape(g.shape[0], g.shape[1], _out_pixels(cfg))

def _matmul_per_sample(w2, m):
    return lax.dot_general(jnp.broadcast_to(w2, (m.shape[0],) + w2.shape), m,
                           (((2,), (1,)), ((0,), (0,))))

def _im2col_forward(cfg, x, weight):
    """``y[n] = W (O, C*kh*kw) @ P[n]``: already NCHW, no transposes."""
    y = _matmul_per_sample(weight.reshape(weight.shape[0], -1), _patches(cfg, x))
    return y.reshape(x.shape[0], weight.shape[0], cfg.axes[0].out_size, cfg.axes[1].out_size)

def _im2col_weight_grad(cfg, x, g):
    """``dW = sum_n g[n] P[n]^T``."""
    dw = lax.dot_general(_pixels_flat(cfg, g), _patches(cfg, x), (((2,), (2,)), ((0,), (0,))))
    return dw.sum(axis=0).reshape(g.shape[1], x.shape[1], *(a.kernel for a in cfg.axes))

# ----------------------------- im2col_nhwc: the patches channels-last, one matrix product

def _patches_nhwc(cfg, x):
    """im2col channels-last: ``(N*H_out*W_out, kh*kw*C)``, columns in the (a, b, c) order of
    :func:`_weight_rows`; the channels are read whole by every view."""
    axes = (*cfg.axes, whole_axis(x.shape[1]))
    views = jnp.stack(window_views(pad_spatial(_nhwc(x), axes, 0), axes), axis=3)
    return views.reshape(x.shape[0] * _out_pixels(cfg), _kernel_taps(cfg) * x.shape[1])

def _few_pixels(cfg, x_shape, weight_shape) -> bool:
    """The channels-last im2col's gate: an output of at most :data:`_FEW_PIXELS` pixels a
    sample, where XLA:CPU's convolution has little to tile and the patches are small (article
    001's second convolution, 32->64 k3 s2 on 6x6: 3x3 pixels, patches 2.25 times its input).
    In the Net's training step its forward and weight gradient as one matrix product each
    (the input gradient stays XLA's) took 0.92-0.99 of the time at batch 128 and 256 (six
    runs, median 0.93), 0.97-0.98 at 64 (one process, 13-17 alternating rounds each; an AMD
    EPYC only). Timed alone it was 1.05x XLA's at batch 128: the gain is in the step, where
    XLA's transposes around its convolution go."""
    return (_im2col_applies(cfg, x_shape, weight_shape)
            and _out_pixels(cfg) <= _FEW_PIXELS)

_FEW_PIXELS = 16  # 4x4 output pixels

def _weight_rows(weight):
    """``(O, C, kh, kw) -> (kh*kw*C, O)``, rows in the patches' (a, b, c) order."""
    return _hwio(weight).reshape(-1, weight.shape[0])

def _im2col_nhwc_forward(cfg, x, weight):
    """``Y = P @ W_rows``: all samples' pixels in one matrix product, ``(N*H_out*W_out, O)``,
    channels-last."""
    y = _patches_nhwc(cfg, x) @ _weight_rows(weight)
    return _nchw(y.reshape(x.shape[0], cfg.axes[0].out_size, cfg.axes[1].out_size,
                           weight.shape[0]))

def _im2col_nhwc_weight_grad(cfg, x, g):
    """``dW_rows = P^T @ G``, ``G`` the cotangent channels-last, one pixel a row."""
    g_rows = _nhwc(g).reshape(g.shape[0] * _out_pixels(cfg), g.shape[1])
    dw = lax.dot_general(_patches_nhwc(cfg, x), g_rows, (((0,), (0,)), ((), ())))
    kh, kw = (a.kernel for a in cfg.axes)
    return _oihw(dw.reshape(kh, kw, x.shape[1], g.shape[1]))

# ------------------------------------------- taps: a sum of shifted products, on request

def _taps_applies(cfg, x_shape, weight_shape) -> bool:
    """Where taps can run: no groups, and at most :data:`_TAPS_MAX_TERMS` products per output
    element (``C*kh*kw``: each is a term of the program, unrolled)."""
    return cfg.groups == 1 and x_shape[1] * _kernel_taps(cfg) <= _TAPS_MAX_TERMS

_TAPS_MAX_TERMS = 64

def _taps_forward(cfg, x, weight):
    """``y[n, o] = sum_{c, (a, b)} W[o, c, a, b] V_ab[n, c]``, ``V_ab`` the input window view
    of kernel offset ``(a, b)`` (:func:`window_views`): one elementwise sum, no copy of the
    input and no transposes, already NCHW.

    Only on request (``conv2d(..., formulation="taps")``), never by the gates nor by "auto":
    it is fast only where XLA writes its sum once, where a reduction reads it (a BatchNorm's
    statistics: the first convolution of ``experiments/time_to_accuracy`` at batch 32, 2.20
    against the band's 2.63 ms a training step, AMD EPYC). Where XLA fuses the sum into its
    consumers instead, it is recomputed in each, without vectors inside a max pool's
    reduction: LeNet's first layer (ReLU, max pool) made the step 2x slower (9.7 against 5.1
    ms at batch 64). Timed alone, its forward beat the band's on that first convolution (0.13
    against 0.30-0.46 ms at batch 32), which is why "auto", which times convolutions alone,
    never times it.

    The products are added in float32 at least (one rounding to a narrower dtype at the end,
    as the matrix products of the other formulations do), not one rounding per term."""
    total = accumulating(x.dtype)
    views = window_views(pad_spatial(x.astype(total), cfg.axes, 0), cfg.axes)  # row-major
    taps = weight.astype(total).reshape(weight.shape[0], weight.shape[1], len(views))
    terms = (view[:, c:c + 1] * taps[None, :, c, k, None, None]  # W[o, c, (a, b)] V_ab[n, c]
             for c in range(x.shape[1]) for k, view in enumerate(views))
    return functools.reduce(operator.add, terms).astype(x.dtype)

def _unpinned_input_grad(cfg, weight, g):
    """The input gradient as an unpinned call computes it: by the mode (the gates, "auto"'s
    measured choice or XLA's)."""
    x_shape = _conv_input_shape(cfg, g.shape, weight.shape)
    return _unpinned("dx", cfg, x_shape, weight.shape, g.dtype)(cfg, weight, g)

def _unpinned_weight_grad(cfg, x, g):
    """The weight gradient as an unpinned call computes it: by the mode."""
    weight_shape = (g.shape[1], x.shape[1] // cfg.groups) + tuple(a.kernel for a in cfg.axes)
    return _unpinned("dw", cfg, x.shape, weight_shape, x.dtype)(cfg, x, g)

def _unpinned(part, cfg, x_shape, weight_shape, dtype):
    cfg = cfg._replace(formulation=None)
    return _chosen(part, cfg, x_shape, weight_shape, dtype, _path(cfg, x_shape, weight_shape))

# ------------------------------------------------------- banded: few channels, narrow rows

def _banded_applies(cfg, x_shape, weight_shape) -> bool:
    """Where the band can run at all (a candidate to measure): no groups, no dilation along the
    width, a band of at most :data:`_BAND_MAX_ELEMENTS` entries (it is built every step:
    ``kh * C * span * O * w`` for tiles of ``w`` output columns reading ``span`` input
    columns) and row blocks of at most :data:`_IM2COL_MAX_ELEMENTS` (``N * H_out * tiles *
    kh * C * span``: about ``2 kh`` copies of the input, as im2col's patches hold ``kh kw``).

    An output row ``i`` is then one matrix product of the ``kh`` padded input rows it reads
    with a *banded* weight matrix (:func:`_band`), so the whole convolution is one large
    matmul over row blocks copied whole, not an im2col of ``kh*kw`` small windows. Over whole
    rows the band costs ``W_pad / kw`` times the multiplies of a direct convolution; cut into
    tiles of a few columns (:func:`_tiles`), ``((w - 1) s + kw) / kw`` times.
    """
    tiles, kh, channels = _tiles(cfg), cfg.axes[0].kernel, x_shape[1]
    band_size = kh * channels * tiles.span * weight_shape[0] * tiles.width
    rows_size = x_shape[0] * cfg.axes[0].out_size * tiles.count * kh * channels * tiles.span
    return (cfg.groups == 1 and cfg.axes[1].dilation == 1 and band_size <= _BAND_MAX_ELEMENTS
            and rows_size <= _IM2COL_MAX_ELEMENTS)

def _banded(cfg, x_shape, weight_shape) -> bool:
    """The band's gate: where it applies, with few input channels and narrow enough rows, like
    both convolutions of LeNet and of experiments/time_to_accuracy, where XLA:CPU's convolution
    handles few channels poorly and its matrix product pays for the band's extra multiplies
    (the bounds measured on an Intel Xeon with whole rows, the 13-24 channels on an AMD EPYC
    with tiles only, below; mode "auto" measures instead)."""
    width = cfg.axes[1]
    return (_banded_applies(cfg, x_shape, weight_shape) and x_shape[1] <= _BAND_MAX_CHANNELS
            and width.padded_size <= _BAND_MAX_RATIO * width.kernel)

# Where the band wins, forward + backward (the shapes in tests/functional/test_conv.py and more).
# On an Intel Xeon (2 cores, batch 128, whole rows): 1.3-2x faster than the next best on LeNet's
# 1->10 k5 on 28x28 (W_pad/kw 5.6) and 10->20 k5 on 12x12 (2.4), 8->16 k5 on 24x24 (4.8);
# slower on article 001's 1->32 k3 s2 on 28x28 (W_pad/kw 10: 2x slower than im2col). On the AMD
# EPYC (Zen 4) of docs/BENCHMARKS.md (2 cores, batch 64, tiles): 1.5-1.8x faster than XLA's on
# 10->20, 12->24, 16->32 and 24->48 k5 on 12x12, 1.1x on 16->32 k3 on 14x14 (2.3x slower on the
# Xeon with whole rows); slower than XLA's on article 001's 32->64 k3 s2 on 6x6 (1.2 against
# 0.9 ms), where 32 channels are past the gate.
_BAND_MAX_CHANNELS = 24
_BAND_MAX_RATIO = 6
_BAND_MAX_ELEMENTS = 1 << 22  # the band's entries (16 MiB in float32): it is built every step

class _Tiles(NamedTuple):
    """How the band splits each output row into ``count`` tiles of ``width`` columns: tile
    ``t`` reads the ``span`` contiguous padded input columns from ``t * step`` on (``step =
    width * stride``); ``conv`` is the convolution inside one tile (``span`` columns in,
    ``width`` out), whose band :func:`_band` builds. One tile is the whole row."""

    count: int
    width: int
    step: int
    span: int
    conv: Axis


def _tiles(cfg) -> _Tiles:
    """The narrowest tiling that copies every input column at most twice: the smallest divisor
    ``w`` of the output width whose tiles overlap by no more than they step (``kw - s <= w s``);
    one tile, the whole row, if no divisor smaller than the row qualifies. With
    ``cfg.narrow_tiles`` (:func:`_differentiated`), the smallest divisor from 2 up, however
    many times the tiles copy a column.

    A band over a whole row multiplies ``W_pad / kw`` times as much as a direct convolution
    (LeNet's first layer: 28 / 5 = 5.6x); over tiles of ``w`` output columns,
    ``((w - 1) s + kw) / kw`` times (tiles of 4, k5: 1.6x), for copying the columns where tiles
    overlap twice. The tiling depends on the geometry only, so every part of one convolution
    tiles alike.
    """
    width = cfg.axes[1]
    s, k, out = width.stride, width.kernel, width.out_size
    fits = (lambda d: d >= 2) if cfg.narrow_tiles else (lambda d: k - s <= d * s)
    w = next(d for d in range(1, out + 1) if out % d == 0 and (fits(d) or d == out))
    span = (w - 1) * s + k
    return _Tiles(out // w, w, w * s, span, Axis(span, w, k, s, 1, 0, 0))

# Tiles against whole rows, one training step (tests/functional/test_conv.py has the shapes):
# on the AMD EPYC (Zen 4) of docs/BENCHMARKS.md, LeNet 1.3x faster at batch 128 and 256, the
# race network of experiments/time_to_accuracy level at 32 and 1.3x faster at 128; on the Intel
# Xeon with AMX, 25% faster at 32, but 1.7x slower for LeNet at 256 while the row blocks were
# built tile-major and transposed for the weight gradient (copied twice), which :func:`_rows`
# and :func:`_banded_weight_grad` no longer do. Tiles of 3 (the copies) and of 8 or more (the
# band's waste) were slower than 4 on the Xeon.


def _whole_axes(cfg, *whole: int) -> tuple[Axis, ...]:
    """Window geometry over ``(H_pad, *whole)``: the height axis as it is, the axes after it
    read whole, so :func:`window_views` gives, for each kernel row ``a``, the input rows it
    sees, and :func:`add_window_views` adds their cotangents back."""
    return (cfg.axes[0],) + tuple(whole_axis(n) for n in whole)

def _rows(cfg, xp, tiles: _Tiles):
    """``R[n, i, t, a, c, w] = xp[n, c, i s_h + a d_h, t step + w]``: for output row ``i``
    and tile ``t``, the ``kh`` input rows and ``span`` columns the tile reads, channels side by
    side, so every (row, tile) is one contiguous block of the matrix product.

    The tiles are cut from the input (a copy of ``count span / W_pad`` times its size, at most
    about twice) and the ``kh`` row views stacked last, so the one large copy, ``kh`` times the
    input, writes ``R`` in the layout both matrix products read (the forward's and the weight
    gradient's): cut the other way, XLA copied it twice more, once per product."""
    tiled = _cut_tiles(xp, tiles).transpose(0, 2, 3, 1, 4)  # (n, hp, t, c, span)
    return jnp.stack(window_views(tiled, _whole_axes(cfg, *tiled.shape[2:])), axis=3)

def _pieces(tiles: _Tiles) -> list[tuple[int, int]]:
    """Tile ``t`` is the blocks ``t, t + 1, ...`` of ``step`` columns, the last cut short:
    ``(block offset, columns)`` of each piece (``ceil(span / step)`` of them)."""
    step, span = tiles.step, tiles.span
    return [(p, min(step, span - p * step)) for p in range(-(-span // step))]

def _cut_tiles(x, tiles: _Tiles):
    """``x[..., w]`` as ``[..., t, w']`` (tile ``t``'s column ``w'``). The row is cut into
    blocks of ``step`` columns, and tile ``t`` is block ``t`` with the heads of the blocks after
    it (:func:`_pieces`): one slice a piece, whatever the number of tiles."""
    step, count = tiles.step, tiles.count
    if count == 1:
        return x[..., None, :]
    pieces = _pieces(tiles)
    n_blocks = count + len(pieces) - 1
    widths = [(0, 0, 0)] * (x.ndim - 1) + [(0, n_blocks * step - x.shape[-1], 0)]
    blocks = lax.pad(x, np.array(0, x.dtype), widths)
    blocks = blocks.reshape(*x.shape[:-1], n_blocks, step)
    return jnp.concatenate([blocks[..., p:p + count, :cols] for p, cols in pieces], axis=-1)

def _join_tiles(d_tiles, tiles: _Tiles, row_length: int):
    """Transpose of :func:`_cut_tiles`: each tile's cotangent added back onto its columns."""
    step, count = tiles.step, tiles.count
    if count == 1:
        return d_tiles[..., 0, :]
    pieces = _pieces(tiles)
    n_blocks, zero = count + len(pieces) - 1, np.array(0, d_tiles.dtype)
    lead, start, d_blocks = [(0, 0, 0)] * (d_tiles.ndim - 2), 0, 0
    for p, cols in pieces:
        d_blocks += lax.pad(d_tiles[..., start:start + cols], zero,
                            lead + [(p, n_blocks - count - p, 0), (0, step - cols, 0)])
        start += cols
    return d_blocks.reshape(*d_blocks.shape[:-2], n_blocks * step)[..., :row_length]

def _unrows(cfg, d_rows, padded_shape, tiles: _Tiles):
    """Transpose of :func:`_rows`: each (row, tile)'s cotangent added back where it was read."""
    n, c, hp, wp = padded_shape
    views = [d_rows[:, :, :, a] for a in range(cfg.axes[0].kernel)]  # each (n, ho, t, c, span)
    d_tiled = add_window_views(views, _whole_axes(cfg, tiles.count, c, tiles.span))
    return _join_tiles(d_tiled.transpose(0, 3, 1, 2, 4), tiles, wp)  # (n, c, hp, wp)

def _band_selector(axis: Axis, dtype):
    """``S[b, w, j] = 1`` where column ``w`` of ``axis``'s input is tap ``b`` of output
    column ``j``."""
    s = np.zeros((axis.kernel, axis.padded_size, axis.out_size), dtype)
    for b in range(axis.kernel):
        for j in range(axis.out_size):
            s[b, j * axis.stride + b, j] = 1
    return s

def _band(tiles: _Tiles, weight):
    """The weight as the banded matrix of one tile,
    ``T[a, c, w, o, j] = sum_b S[b, w, j] W[o, c, a, b]``."""
    return jnp.einsum("bwj,ocab->acwoj", _band_selector(tiles.conv, weight.dtype), weight)

def _unband(tiles: _Tiles, d_band):
    """Transpose of :func:`_band`, for the band's cotangent laid out as ``dT[o, j, a, c, w]``:
    ``dW[o, c, a, b] = sum_{w,j} S[b, w, j] dT[o, j, a, c, w]`` (every weight sits on the band
    once per output column, so its cotangents add)."""
    return jnp.einsum("bwj,ojacw->ocab", _band_selector(tiles.conv, d_band.dtype), d_band)

def _banded_forward(cfg, x, weight):
    """``y[n, o, i, (t, j)] = sum_{a,c,w} R[n, i, t, a, c, w] T[a, c, w, o, j]``."""
    tiles = _tiles(cfg)
    rows = _rows(cfg, pad_spatial(x, cfg.axes, 0), tiles)
    y = lax.dot_general(rows, _band(tiles, weight), (((3, 4, 5), (0, 1, 2)), ((), ())))
    n, ho, count, o, width = y.shape
    return y.transpose(0, 3, 1, 2, 4).reshape(n, o, ho, count * width)  # -> NCHW

def _g_rows(tiles: _Tiles, g):
    """The cotangent as ``G[n, i, t, o, j]``: (row, tile) ``(i, t)`` beside ``R[n, i, t]``."""
    n, o, ho, wo = g.shape
    return g.reshape(n, o, ho, tiles.count, tiles.width).transpose(0, 2, 3, 1, 4)

def _banded_input_grad(cfg, weight, g):
    """``dR = G T^T``, each (row, tile)'s cotangent added back where it was read
    (:func:`_unrows`)."""
    tiles = _tiles(cfg)
    d_rows = lax.dot_general(_g_rows(tiles, g), _band(tiles, weight),
                             (((3, 4), (3, 4)), ((), ())))
    padded_shape = (g.shape[0], weight.shape[1]) + tuple(a.padded_size for a in cfg.axes)
    return unpad_spatial(_unrows(cfg, d_rows, padded_shape, tiles), cfg.axes)

def _banded_weight_grad(cfg, x, g):
    """``dT^T = G^T R``, summed over images, rows and tiles, folded back onto the weight by
    :func:`_unband`. Written as ``G^T R``, not ``R^T G``: XLA:CPU transposes the left operand
    of a product summed over its leading axes, and ``R``, the forward's row blocks, is the one
    to keep as it was built (``G`` is usually the smaller: ``O w`` against ``kh C span`` per
    block, 64 against 320 for the race network's second convolution)."""
    tiles = _tiles(cfg)
    rows = _rows(cfg, pad_spatial(x, cfg.axes, 0), tiles)
    d_band = lax.dot_general(_g_rows(tiles, g), rows, (((0, 1, 2), (0, 1, 2)), ((), ())))
    return _unband(tiles, d_band)

# ------------------------------------------- lax: XLA's convolution, the general rule

def _lax_forward(cfg, x, weight):
    return _nchw(lax.conv_general_dilated(
        _nhwc(x), _hwio(weight), window_strides=_strides(cfg),
        padding=[(a.pad_lo, a.pad_hi) for a in cfg.axes],
        rhs_dilation=_dilations(cfg), dimension_numbers=_CANONICAL,
        feature_group_count=cfg.groups))

def _flipped_transposed_kernel(weight, groups):
    """``(O, I/g, kh, kw) -> (I, O/g, kh, kw)`` per group, spatially flipped by 180 degrees."""
    out_ch, in_per_group, kh, kw = weight.shape
    w = weight.reshape(groups, out_ch // groups, in_per_group, kh, kw)
    w = w.transpose(0, 2, 1, 3, 4).reshape(groups * in_per_group, out_ch // groups, kh, kw)
    return jnp.flip(w, (2, 3))

def _lax_input_grad(cfg, weight, g):
    """``dx``: full correlation of the stride-dilated cotangent with the flipped kernel. The
    padding ``d(k-1) - pad`` on each side is exact because pad_hi reaches exactly the last
    window. (Also conv_transpose2d's forward: a transposed convolution *is* this map.)"""
    return _nchw(lax.conv_general_dilated(
        _nhwc(g), _hwio(_flipped_transposed_kernel(weight, cfg.groups)), window_strides=(1, 1),
        padding=[(a.span - 1 - a.pad_lo, a.span - 1 - a.pad_hi) for a in cfg.axes],
        lhs_dilation=_strides(cfg), rhs_dilation=_dilations(cfg),
        dimension_numbers=_CANONICAL, feature_group_count=cfg.groups))

def _lax_weight_grad(cfg, x, g):
    """``dW``: correlate the padded input with the cotangent used as a kernel dilated by the
    stride, stepping by the dilation. The roles swap: x's channels act as the batch and its
    samples as the features summed over, so x goes in as (C, H, W, N), g as the kernel
    (Ho, Wo, N, O), and the result (C, kh, kw, O) is the weight transposed. Groups split x's
    channel axis."""
    dw = lax.conv_general_dilated(
        x.transpose(1, 2, 3, 0), g.transpose(2, 3, 0, 1), window_strides=_dilations(cfg),
        padding=[(a.pad_lo, a.pad_hi) for a in cfg.axes],
        rhs_dilation=_strides(cfg), dimension_numbers=_CANONICAL,
        batch_group_count=cfg.groups)
    return dw.transpose(3, 0, 1, 2)

# ---------------------------------------------------------------- one op, five formulations

class Formulation(NamedTuple):
    """One way to compute a convolution's three sums, each usable alone (they are independent:
    a forward of one formulation and gradients of another are exact together)."""

    applies: Callable  # (cfg, x_shape, weight_shape) -> bool: can it run this shape at all
    forward: Callable  # (cfg, x, weight) -> y, without bias
    dx: Callable  # (cfg, weight, g) -> the input gradient
    dw: Callable  # (cfg, x, g) -> the weight gradient
    requires: str  # what ``applies`` asks, in words (for the error of a pinned formulation)
    measured: bool = True  # a candidate of mode "auto" (False: only where the caller asks)

def _always(cfg, x_shape, weight_shape) -> bool:
    return True

_FORMULATIONS = {
    "banded": Formulation(_banded_applies, _banded_forward, _banded_input_grad,
                          _banded_weight_grad,
                          "groups=1, no dilation along the width, a band of at most "
                          f"{_BAND_MAX_ELEMENTS} entries and row blocks of at most "
                          f"{_IM2COL_MAX_ELEMENTS} (both grow with the batch)"),
    # im2col's input gradient is XLA's convolution, not col2im: col2im's kh*kw shifted pads, one
    # sum, fuse into the layer before's backward and are recomputed at every read there (a max
    # pool's gradient reads each 4 times): in context 1.9 ms more a step on the race network's
    # 8->16 convolution, 0.35 ms more with XLA's (AMD EPYC, 2 cores). Timed alone the fused sum
    # looked cheap, so "auto" chose im2col there and made the step 1.7x slower.
    "im2col": Formulation(_im2col_applies, _im2col_forward, _lax_input_grad,
                          _im2col_weight_grad, _IM2COL_REQUIRES),
    "im2col_nhwc": Formulation(_im2col_applies, _im2col_nhwc_forward, _lax_input_grad,
                               _im2col_nhwc_weight_grad, _IM2COL_REQUIRES),
    "lax": Formulation(_always, _lax_forward, _lax_input_grad, _lax_weight_grad, "nothing"),
    "taps": Formulation(_taps_applies, _taps_forward, _unpinned_input_grad,
                        _unpinned_weight_grad,
                        f"groups=1 and at most {_TAPS_MAX_TERMS} products (C*kh*kw) per output",
                        measured=False)}
FORMULATIONS = tuple(_FORMULATIONS)  # what conv2d(..., formulation=) takes

def _all_parts(formulation: Formulation, cfg, x, weight, g):
    """What a measurement runs: the three parts of one formulation in one program, as a
    training step runs them. Measured apart, the parts mislead: banded's forward and weight
    gradient read the same row blocks of ``x`` and im2col's the same patches, which XLA builds
    once when both are in one program, so the fastest parts one by one made a slower step
    (LeNet at batch 256 on an Intel Xeon: 64 ms against the gates' 35 ms)."""
    return (formulation.forward(cfg, x, weight), formulation.dx(cfg, weight, g),
            formulation.dw(cfg, x, g))

def _path(cfg, x_shape, weight_shape) -> str:
    """The gates (mode ``"gates"``; every part alike): ``"banded"`` (few channels, narrow
    rows: :func:`_banded`), else ``"im2col"`` (one input channel: :func:`_single_channel`),
    else ``"im2col_nhwc"`` (a few output pixels: :func:`_few_pixels`), else ``"lax"`` (XLA's
    convolution: the general rule)."""
    if _banded(cfg, x_shape, weight_shape):
        return "banded"
    if _single_channel(cfg, x_shape[1]):
        return "im2col"
    return "im2col_nhwc" if _few_pixels(cfg, x_shape, weight_shape) else "lax"

def _signature(part, cfg, x_shape, weight_shape, dtype) -> str:
    """The cache key of one part: every shape, the whole geometry and the dtype."""
    h, w = cfg.axes
    return (f"conv2d.{part} x={tuple(map(int, x_shape))} w={tuple(map(int, weight_shape))} "
            f"{jnp.dtype(dtype).name} stride=({h.stride},{w.stride}) "
            f"dilation=({h.dilation},{w.dilation}) "
            f"pad=(({h.pad_lo},{h.pad_hi}),({w.pad_lo},{w.pad_hi})) groups={cfg.groups}")

def _candidates(cfg, x_shape, weight_shape) -> list[str]:
    """The formulations mode "auto" times for a shape: those that apply, except the ones that
    run only where asked for (``measured=False``)."""
    return [name for name, f in _FORMULATIONS.items()
            if f.measured and f.applies(cfg, x_shape, weight_shape)]

def _chosen(part: str, cfg, x_shape, weight_shape, dtype, gate: str):
    """The function ``(cfg, *arrays)`` that computes ``part`` of the convolution with input
    ``x_shape``: the caller's ``cfg.formulation`` if any, else the part of the formulation
    :func:`_formulation.choose` picks among those that apply, by ``cfg.mode`` (``gate`` in mode
    "gates"). One choice serves all three parts of a shape: it is measured on all three
    together (:func:`_all_parts`)."""
    if cfg.formulation is not None:
        return getattr(_FORMULATIONS[cfg.formulation], part)
    g_shape = (x_shape[0], weight_shape[0]) + tuple(a.out_size for a in cfg.axes)
    specs = tuple(jax.ShapeDtypeStruct(shape, dtype)
                  for shape in (tuple(x_shape), tuple(weight_shape), g_shape))
    candidates = {name: functools.partial(_all_parts, _FORMULATIONS[name], cfg)
                  for name in _candidates(cfg, x_shape, weight_shape)}
    key = _signature("all", cfg, x_shape, weight_shape, dtype)
    name = _formulation.choose(cfg.mode, key, candidates, specs, gate)
    return getattr(_FORMULATIONS[name], part)

def _with_bias(y, bias):
    return y if bias is None else y + bias[None, :, None, None]

def _forward(cfg, x, weight, bias):
    gate = _path(cfg, x.shape, weight.shape)
    forward = _chosen("forward", cfg, x.shape, weight.shape, x.dtype, gate)
    return _with_bias(forward(cfg, x, weight), bias)

def _differentiated(cfg, in_channels: int):
    """How the forward and the weight gradient run where a gradient is taken: one input
    channel's band in tiles of 2 columns. There its products shrink (LeNet's first layer:
    ``kh*span = 30`` by ``O*w = 20`` against 40 by 40, 1.2x a direct convolution's multiplies
    against 1.6x) for row blocks copied three times instead of twice: LeNet's training step in
    0.91 of the time at batch 64, 0.94-0.955 at 128, 0.95-0.96 at 256 (one process,
    alternating; an AMD EPYC only). A forward alone keeps the usual tiles: the race network's
    frozen first convolution took 1.15x as long in tiles of 2, and an evaluation is a forward
    alone."""
    return cfg._replace(narrow_tiles=True) if in_channels == 1 else cfg

def _fwd(cfg, x, weight, bias):
    y = _forward(_differentiated(cfg, x.shape[1]), x, weight, bias)
    return y, (x, weight, bias is None)

def _bwd(cfg, residuals, g):
    """Each gradient by its own choice (a first layer's dx, unused, is removed by XLA)."""
    x, weight, no_bias = residuals
    gate = _path(cfg, x.shape, weight.shape)
    dx = _chosen("dx", cfg, x.shape, weight.shape, x.dtype, gate)(cfg, weight, g)
    as_forward = _differentiated(cfg, x.shape[1])
    gate = _path(as_forward, x.shape, weight.shape)
    dw = _chosen("dw", as_forward, x.shape, weight.shape, x.dtype, gate)(as_forward, x, g)
    return dx, dw, None if no_bias else g.sum(axis=(0, 2, 3))

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
    _checks.check_spatial_nonempty(where, in_shape)
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

@register()
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           vjp: str = "custom", formulation: str | None = None):
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

    Five formulations compute the same sums (``_FORMULATIONS``: each one's forward, dx and dW,
    each usable alone). ``formulation`` (one of :data:`FORMULATIONS`) pins one for all three
    parts, or raises ``ValueError`` where it cannot run the shape; by default (None) by the
    mode of ``functional/_formulation.py`` (``$FUNCTIONAL_CNN_CONV``, :func:`conv_formulation`):
    ``"gates"`` (default) takes the static rules of ``_path`` (measured on an Intel Xeon and an
    AMD EPYC); ``"auto"`` times the candidates on this machine once per shape and caches the
    fastest, keeping XLA's unless another is 5% faster; ``"lax"`` XLA's always (and every
    mode off the CPU):

    * *lax*: XLA's convolution, the rule above, for every shape;
    * *banded* (no groups, no dilation along the width, a band of at most 4M entries; gate: at
      most 24 input channels and ``W_pad <= 6 kw``): each output row cut into tiles ``t`` of
      ``w`` columns, the weight laid out as a banded matrix
      ``T[a, (c, w'), o, j] = W[o, c, a, w' - j s]`` (zero off the band) over the input rows
      ``R[n, i, t, a, (c, w')] = xp[n, c, i s_h + a d_h, t w s + w']``: ``y = R T``,
      ``dR = g T^T`` added back row by row and tile by tile, and ``dW`` the band of
      ``g^T R`` summed along each diagonal;
    * *im2col* (no groups, patches of at most 32M entries; gate: one input channel, rows too
      wide for the band): batched matrix products over the patches
      ``P[n] (C*kh*kw, H_out*W_out)``: ``y[n] = W P[n]``, ``dW = sum_n g[n] P[n]^T``; ``dx``
      XLA's, as *lax* (col2im would fuse into the layer before's backward, recomputed there);
    * *im2col_nhwc* (as *im2col*; gate: several input channels, at most 16 output pixels):
      one product over channels-last patches ``P (N*H_out*W_out, kh*kw*C)``: ``y = P W_r``,
      ``dW_r = P^T g`` (``W_r (kh*kw*C, O)``); ``dx`` XLA's, as *im2col*;
    * *taps* (only when asked for; no groups, at most 64 products ``C*kh*kw`` per output): the
      forward as one sum of the shifted input views times their weights; both gradients by
      the mode, as unpinned (:func:`_taps_forward` says where it is fast).

    Linear in ``x`` and in ``W``: no kinks, both paths give the one derivative.
    """
    check_vjp("conv2d", vjp)
    _checks.check_weighted_input("conv2d", x, weight, bias)
    if jnp.ndim(x) == 3:
        return conv2d(x[None], weight, bias, stride, padding, dilation, groups, vjp=vjp,
                      formulation=formulation)[0]
    cfg = conv_config("conv2d", jnp.shape(x), jnp.shape(weight), stride, padding, dilation,
                      groups)._replace(mode=_formulation.mode())
    _check_bias("conv2d", bias, weight.shape[0])
    cfg = with_formulation("conv2d", cfg, jnp.shape(x), jnp.shape(weight), formulation)
    return _conv2d(vjp, cfg, x, weight, bias)

def with_formulation(where: str, cfg: ConvConfig, x_shape, weight_shape,
                     formulation: str | None, name: str = "formulation") -> ConvConfig:
    """``cfg`` computing all three parts by ``formulation`` (one of :data:`FORMULATIONS`; None:
    by the mode), or ``ValueError`` naming what does not fit (the argument as ``name``)."""
    if formulation is None:
        return cfg
    if not isinstance(formulation, str) or formulation not in _FORMULATIONS:
        raise ValueError(f"{where}: {name} must be None or one of {FORMULATIONS}, "
                         f"got {formulation!r}")
    chosen = _FORMULATIONS[formulation]
    if not chosen.applies(cfg, x_shape, weight_shape):
        raise ValueError(f"{where}: {name} {formulation!r} cannot run input "
                         f"{tuple(x_shape)} with weight {tuple(weight_shape)} (groups="
                         f"{cfg.groups}, dilation {_dilations(cfg)}): it needs "
                         f"{chosen.requires}")
    return cfg._replace(formulation=formulation)

def _check_bias(where: str, bias, out_channels: int) -> None:
    if bias is not None and tuple(jnp.shape(bias)) != (out_channels,):
        raise ValueError(f"{where}: expected bias of shape ({out_channels},), "
                         f"got {tuple(jnp.shape(bias))}")

# ------------------------------------------------------------------- transposed convolution
#
# conv_transpose2d is the input gradient of the conv2d that maps its output back to its input
# (same weight, stride, padding, dilation, groups; cfg describes *that* convolution, with the
# transposed convolution's output as its input). So its forward is that convolution's dx, and
# its rule uses the convolution's forward (for dx) and its weight gradient (for dW).

def _conv_input_shape(cfg, x_shape, weight_shape):
    """The shape of the input of the convolution a transposed one transposes: its output."""
    return (x_shape[0], weight_shape[1] * cfg.groups) + tuple(a.in_size for a in cfg.axes)

def _transpose_forward(cfg, x, weight, bias):
    """The convolution's dx at cotangent ``x`` (gate: XLA's)."""
    conv_x_shape = _conv_input_shape(cfg, x.shape, weight.shape)
    input_grad = _chosen("dx", cfg, conv_x_shape, weight.shape, x.dtype, "lax")
    return _with_bias(input_grad(cfg, weight, x), bias)

def _transpose_fwd(cfg, x, weight, bias):
    return _transpose_forward(cfg, x, weight, bias), (x, weight, bias is None)

def _transpose_bwd(cfg, residuals, g):
    """The convolution's forward at input ``g`` (dx), its dW at input ``g`` and cotangent ``x``
    (gates: the forward's own, and XLA's for dW)."""
    x, weight, no_bias = residuals
    gate = _path(cfg, g.shape, weight.shape)
    forward = _chosen("forward", cfg, g.shape, weight.shape, x.dtype, gate)
    weight_grad = _chosen("dw", cfg, g.shape, weight.shape, x.dtype, "lax")
    return (forward(cfg, g, weight), weight_grad(cfg, g, x),
            None if no_bias else g.sum(axis=(0, 2, 3)))

_conv_transpose2d = two_gradients(_transpose_forward, _transpose_fwd, _transpose_bwd)

def conv_transpose_config(where: str, in_shape, weight_shape, stride, padding, output_padding,
                          groups, dilation) -> ConvConfig:
    """Validate a transposed convolution as PyTorch does; the geometry of the convolution it
    transposes (:func:`_windows.transposed_axis`)."""
    _checks.check_rank(where, in_shape, (4,), "(N, C, H, W)")
    _checks.check_spatial_nonempty(where, in_shape)
    if len(weight_shape) != 4:
        raise ValueError(f"{where}: expected a 4-D weight (C_in, C_out/groups, kh, kw), "
                         f"got shape {tuple(weight_shape)}")
    if not isinstance(groups, int) or groups < 1 or in_shape[1] % groups:
        raise ValueError(f"{where}: groups={groups!r} must be a positive int dividing "
                         f"in_channels={in_shape[1]}")
    _checks.check_channels(where, in_shape, weight_shape[0],
                           context=f"(weight {tuple(weight_shape)}: C_in first)")
    stride = _checks.int_pair(where, "stride", stride)
    dilation = _checks.int_pair(where, "dilation", dilation)
    pads = _checks.int_pair(where, "padding", padding, minimum=0)
    out_pads = _checks.int_pair(where, "output_padding", output_padding, minimum=0)
    if any(o >= s and o >= d for o, s, d in zip(out_pads, stride, dilation)):
        raise ValueError(f"{where}: output_padding must be smaller than either stride or "
                         f"dilation (as in PyTorch), got output_padding {out_pads} for stride "
                         f"{stride} and dilation {dilation}")
    axes = tuple(transposed_axis(n, k, s, d, p, o) for n, k, s, d, p, o
                 in zip(in_shape[2:], weight_shape[2:], stride, dilation, pads, out_pads))
    if any(a.in_size < 1 for a in axes):
        raise ValueError(f"{where}: the output would be {axes[0].in_size}x{axes[1].in_size}: "
                         f"padding {pads} crops more than the input {tuple(in_shape)} spreads "
                         f"to (kernel {tuple(weight_shape[2:])}, stride {stride}, dilation "
                         f"{dilation})")
    return ConvConfig(axes, groups)

@register()
def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1, *, vjp: str = "custom"):
    """2-D transposed convolution, ``torch.nn.functional.conv_transpose2d`` semantics and layouts.

    ``x (N, C_in, H, W)`` (or unbatched), ``weight (C_in, C_out/groups, kh, kw)``,
    ``bias (C_out,)``; the output is ``(H - 1) s - 2 p + d (k - 1) + 1 + output_padding`` high
    (and wide), with ``output_padding`` smaller than the stride or the dilation.

    Forward: every input scatters its kernel-weighted value over a window of the output,
    ``y[n, o, i s + a d - p, j s + b d - p] += W[c, o', a, b] x[n, c, i, j]`` (``o`` the
    ``o'``-th output channel of ``c``'s group): the input gradient of ``conv2d(., W)`` taken at
    the cotangent ``x``. With ``C_W`` that convolution (``conv2d(z, W) = C_W z``),
    ``y = C_W^T x + b``.

    Backward rule, by the adjoint of ``C_W`` and the bilinearity of ``C_W z`` in ``(W, z)``::

        dx = C_W g = conv2d(g, W, stride, padding, dilation, groups)         a forward conv
        dW = conv2d's weight gradient at input g and cotangent x
           : dW[c, o', a, b] = sum_{n,i,j} x[n, c, i, j] gp[n, o, i s + a d, j s + b d]
        db[o] = sum_{n,i,j} g[n, o, i, j]

    where ``gp`` is ``g`` padded by ``p`` (and cropped by ``output_padding``). Both are
    correlations written like conv2d's forward, so the rule is differentiable again. The
    forward, dx and dW are conv2d's dx, forward and dW parts, each chosen as conv2d chooses
    them (in mode "gates": XLA's for the forward and dW, conv2d's gate for dx).

    Linear in ``x`` and in ``W``: no kinks, both paths give the one derivative (a zero weight
    included).
    """
    check_vjp("conv_transpose2d", vjp)
    _checks.check_weighted_input("conv_transpose2d", x, weight, bias)
    if jnp.ndim(x) == 3:
        return conv_transpose2d(x[None], weight, bias, stride, padding, output_padding, groups,
                                dilation, vjp=vjp)[0]
    cfg = conv_transpose_config("conv_transpose2d", jnp.shape(x), jnp.shape(weight), stride,
                                padding, output_padding, groups, dilation)
    cfg = cfg._replace(mode=_formulation.mode())
    _check_bias("conv_transpose2d", bias, weight.shape[1] * groups)
    return _conv_transpose2d(vjp, cfg, x, weight, bias)

# ------------------------------------------------ hyperparameter spaces (tests, audit)

def _conv_inputs(rng, c, dtype, weight_channels: tuple[int, int], out_channels: int):
    """A case's ``x`` (``in_per_group * groups`` channels), ``weight`` (``weight_channels``
    then the kernel) and, if the case has one, ``bias`` (``out_channels``)."""
    x = S.normal(rng, (c["batch"], c["in_per_group"] * c["groups"]) + tuple(c["size"]), dtype)
    kernel = c["kernel"] if isinstance(c["kernel"], tuple) else (c["kernel"],) * 2
    inputs = {"x": x, "weight": S.normal(rng, weight_channels + kernel, dtype)}
    if c["bias"]:
        inputs["bias"] = S.normal(rng, (out_channels,), dtype)
    return inputs

def _conv2d_case(rng, c, dtype):
    g = c["groups"]
    out = c["out_per_group"] * g
    inputs = _conv_inputs(rng, c, dtype, (out, c["in_per_group"]), out)
    kw = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=g)
    return S.Case("conv2d", c, inputs,
                lambda x, w, b=None, vjp="custom": conv2d(x, w, b, vjp=vjp, **kw),
                lambda torch, x, w, b=None: torch.nn.functional.conv2d(x, w, b, **kw))

S.register_space(
    "conv2d",
    dict(batch=(2, 1), in_per_group=(3, 1, 2), out_per_group=(2, 1), groups=(1, 2, 3),
         size=((8, 7), (5, 5), (9, 6)), kernel=(3, 1, 2, (3, 2)),
         stride=(1, 2, 3, (2, 1)), padding=(0, 1, 2, (1, 0), "same", "valid"),
         dilation=(1, 2, (1, 2), (2, 1)), bias=(True, False)),
    _conv2d_case,
    ({"kernel": 2, "stride": 3}, {"padding": "same", "dilation": 2},
     {"padding": "same", "kernel": 2}, {"groups": 3, "stride": 2, "padding": 1},
     {"batch": 1, "size": (5, 5), "kernel": 3, "padding": 2, "stride": 2},
     {"dilation": (1, 2), "stride": (2, 1), "kernel": (3, 2)},
     {"in_per_group": 1, "groups": 1},  # the single-channel (im2col) fast path
     {"in_per_group": 1, "groups": 1, "stride": 2, "padding": 1, "dilation": 2,
      "kernel": (3, 2), "batch": 1},
     # the banded fast path (several channels, narrow): stride and dilation on the height,
     # stride on the width, "same" padding
     {"in_per_group": 3, "groups": 1, "kernel": 3, "size": (9, 6), "stride": (2, 1),
      "dilation": (2, 1), "padding": (1, 0)},
     {"in_per_group": 2, "groups": 1, "kernel": (3, 2), "size": (5, 5), "stride": (1, 2),
      "padding": 0, "dilation": 1},
     {"in_per_group": 2, "groups": 1, "kernel": 3, "size": (5, 5), "padding": "same",
      "stride": 1, "dilation": 1}))

def _conv_transpose2d_case(rng, c, dtype):
    g = c["groups"]
    inputs = _conv_inputs(rng, c, dtype, (c["in_per_group"] * g, c["out_per_group"]),
                          c["out_per_group"] * g)
    kw = dict(stride=c["stride"], padding=c["padding"], output_padding=c["output_padding"],
              groups=g, dilation=c["dilation"])
    return S.Case("conv_transpose2d", c, inputs,
                  lambda x, w, b=None, vjp="custom": conv_transpose2d(x, w, b, vjp=vjp, **kw),
                  lambda torch, x, w, b=None: torch.nn.functional.conv_transpose2d(x, w, b, **kw))

S.register_space(
    "conv_transpose2d",
    dict(batch=(2, 1), in_per_group=(2, 1, 3), out_per_group=(3, 1, 2), groups=(1, 2),
         size=((4, 3), (3, 3), (5, 4), (1, 1)), kernel=(3, 1, 2, (3, 2)),
         stride=(1, 2, 3, (2, 1)), padding=(0, 1, 2, (1, 0)), output_padding=(0, 1, (1, 0)),
         dilation=(1, 2, (1, 2)), bias=(True, False)),
    _conv_transpose2d_case,
    ({"stride": 2, "output_padding": 1, "padding": 1},
     {"stride": 3, "kernel": 2},  # stride above kernel: rows no window writes
     {"output_padding": 1, "dilation": 2},  # output_padding < dilation (stride 1)
     {"padding": 2, "kernel": 1, "stride": 2},  # padding past the kernel's reach
     {"groups": 2, "stride": 2, "padding": 1, "output_padding": (1, 0), "kernel": (3, 2)},
     {"batch": 1, "size": (1, 1), "kernel": 3, "padding": 1},
     # the rule's dx is a conv2d forward: its im2col path (one output channel, wide rows)
     # and its lax path (wide rows, several channels)
     {"out_per_group": 1, "size": (3, 9), "kernel": 1, "stride": 2},
     {"out_per_group": 3, "size": (3, 9), "kernel": (2, 1), "stride": (1, 3)}))
