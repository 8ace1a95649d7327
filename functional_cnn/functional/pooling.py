"""2-D pooling: ``max_pool2d`` and ``avg_pool2d`` over sliding windows, sharing one window
geometry, and ``adaptive_max_pool2d`` and ``adaptive_avg_pool2d`` over PyTorch's adaptive
windows. Both max pools share one first-maximum machinery: a config only says which input
every window offset reads (``views``) and how cotangents go back to those positions."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np
from jax import lax
from jax import numpy as jnp

from .. import _checks
from . import _spaces as S
from ._precision import accumulating
from ._registry import check_vjp, register, two_gradients
from ._windows import (Axis, Taps, adaptive_taps, add_window_views, check_window_fits,
                       kernel_offsets, make_axis, pad_spatial, separable_product, tap_views, tiles,
                       unpad_spatial, whole_axis, window_views)


class PoolConfig(NamedTuple):
    """Sliding windows (max_pool2d, avg_pool2d)."""

    axes: tuple[Axis, Axis]  # (height, width) geometry, pad_hi adjusted to the windows' reach
    count_include_pad: bool = True  # avg_pool2d only
    divisor_override: int | None = None  # avg_pool2d only: every window's divisor

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(a.out_size for a in self.axes)

    def views(self, x, fill):
        """Per kernel offset (row-major), the input padded with ``fill`` it sees in every
        window."""
        return window_views(pad_spatial(x, self.axes, fill), self.axes)

    def to_first(self, first, g):
        """Each window's cotangent added at its offset ``first``, padding cropped."""
        route = _interleave_to_first if tiles(self.axes) else _scatter_to_first
        return unpad_spatial(route(self, first, g), self.axes)


class AdaptiveConfig(NamedTuple):
    """PyTorch's adaptive windows ``[floor(i H / H_out), ceil((i + 1) H / H_out))`` on each
    axis: where ``H_out`` does not divide ``H`` they vary in size and may overlap (7 -> 3:
    rows 0-2, 2-4, 4-6)."""

    in_size: tuple[int, int]
    out_size: tuple[int, int]

    @property
    def taps(self) -> tuple[Taps, Taps]:
        return tuple(adaptive_taps(n, o) for n, o in zip(self.in_size, self.out_size))

    def views(self, x, fill=None):
        """Per window offset ``(a, b)``, row-major: ``x[..., rows[a, i], cols[b, j]]``. A window
        shorter than the longest repeats its last row or column (``fill`` is not needed): a
        repeat never changes a maximum, and comes after the original in scan order, so it never
        wins a tie (among NaNs, where the last wins, it may: it is the same input element)."""
        taps_h, taps_w = self.taps
        return [view for rows in tap_views(x, taps_h, 2) for view in tap_views(rows, taps_w, 3)]

    def to_first(self, first, g):
        """Each window's cotangent added at the input position of its offset ``first``."""
        taps_h, taps_w = self.taps
        offset_rows, offset_cols = jnp.divmod(first, taps_w.index.shape[0])
        rows = jnp.asarray(taps_h.index)[offset_rows, jnp.arange(g.shape[2])[:, None]]
        cols = jnp.asarray(taps_w.index)[offset_cols, jnp.arange(g.shape[3])[None, :]]
        return _scatter_add_at(rows, cols, g, self.in_size)

    def averaging(self, dtype) -> tuple[np.ndarray, np.ndarray]:
        """Per axis, ``A[i, h] = 1 / |window i|`` on window ``i``'s positions, 0 elsewhere."""
        return tuple(t.matrix(n, np.float64) / t.present.sum(axis=0)[:, None]
                     for t, n in zip(self.taps, self.in_size))


def pool_axes(where: str, in_shape, kernel_size, stride, padding, dilation,
              ceil_mode: bool) -> tuple[Axis, Axis]:
    """Validate pooling hyperparameters as PyTorch does and resolve both spatial axes."""
    _checks.check_rank(where, in_shape, (4,), "(N, C, H, W)")
    kernel = _checks.int_pair(where, "kernel_size", kernel_size)
    stride = kernel if stride is None else _checks.int_pair(where, "stride", stride)
    pads = _checks.int_pair(where, "padding", padding, minimum=0)
    dilation = _checks.int_pair(where, "dilation", dilation)
    if any(p > k // 2 for p, k in zip(pads, kernel)):
        raise ValueError(f"{where}: padding must be at most half the kernel size "
                         f"(as in PyTorch), got padding {pads} for kernel {kernel}")
    axes = tuple(make_axis(n, k, s, d, p, p, bool(ceil_mode))
                 for n, k, s, d, p in zip(in_shape[2:], kernel, stride, dilation, pads))
    check_window_fits(where, in_shape, axes, [(p, p) for p in pads])
    return axes


def _unbatched(op, x, *args, **kwargs):
    """Run a 4-D op on an unbatched ``(C, H, W)`` input, as PyTorch accepts."""
    return op(x[None], *args, **kwargs)[0]


# ----------------------------------------------------------------------------- max pooling

def _at_offset(views, first):
    """``views[first]`` elementwise: the value of each window at offset ``first``, as a sum of
    one-hot selects (linear in ``views``, so it is also how tangents and gradients route)."""
    zero = jnp.zeros((), views[0].dtype)
    return sum(jnp.where(first == k, view, zero) for k, view in enumerate(views))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _window_maxima(cfg, x):
    """Each window's maximum and the offset ``first`` of its first maximum (row-major window
    order; a NaN wins, the last of several, as in PyTorch), both from one variadic reduction
    (:func:`_first_max` over :func:`_nan_keyed` pairs): neither is recomputed where XLA fuses the
    pool into its consumer (the custom rule's forward; 1.2-1.5x faster steps than gathering
    the value at ``first``). Windows that do not tile, over many channels, fold channels-last
    instead (:func:`_channels_last_maxima`), to the same choice."""
    maxima = _stacked_maxima
    if isinstance(cfg, PoolConfig) and not tiles(cfg.axes):
        if _channels_last_fits(cfg, x):
            maxima = _channels_last_maxima
        elif _positions_fit(cfg):
            maxima = _sliding_maxima
    value, first = maxima(cfg, x)
    return value, _padding_never_wins(cfg, value, first)


def _channels_last_fits(cfg: PoolConfig, x) -> bool:
    """Where :func:`_channels_last_maxima` runs: at least 8 channels, whose vectors it works
    on, and a window of at most 25 elements, each a term of its unrolled fold. Measured alone
    (NCHW in and out, AMD EPYC): 2-3x faster than :func:`_sliding_maxima` for 3x3/2, 3x3/1,
    2x2/1 and 5x5/2 windows from 8 channels on, slower or erratic below."""
    height, width = cfg.axes
    return x.shape[1] >= 8 and height.kernel * width.kernel <= 25


def _channels_last_maxima(cfg: PoolConfig, x):
    """Windows that do not tile, over many channels: the window views of the input transposed
    channels-last, folded elementwise in scan order (:func:`_fold_first_max`), then transposed
    back. Each step works on whole channel vectors, which XLA:CPU vectorizes; the variadic
    ``reduce_window`` of :func:`_sliding_maxima` is not vectorized, and needs its input and
    the positions' keys written out first. XLA fuses the value and the offset apart (the fold
    runs twice) and the transposes into their producer and consumers. Article 001's Net (its
    3x3/2 pool on 32 channels): the training step in 0.91 of the time at batch 64, 0.88 at 128
    and 256 (one process, 11 alternating rounds; an AMD EPYC only)."""
    xt = pad_spatial(x, cfg.axes, -jnp.inf).transpose(0, 2, 3, 1)  # (N, H_pad, W_pad, C)
    value, first = _fold_first_max(window_views(xt, (*cfg.axes, whole_axis(x.shape[1]))))
    return value.transpose(0, 3, 1, 2), first.transpose(0, 3, 1, 2)


def _fold_first_max(views):
    """The maximum of the views, elementwise, and the index of the view it came from, in
    PyTorch's scan: a later view replaces the running maximum where it is larger or a NaN.
    That is :func:`_first_max`'s choice (the first of equal numbers, the last of several
    NaNs), here with the sign of a zero maximum PyTorch's too (its first zero's)."""
    value, first = views[0], jnp.zeros(views[0].shape, jnp.int32)
    for k, view in enumerate(views[1:], 1):
        later = (view > value) | (view != view)
        value, first = jnp.where(later, view, value), jnp.where(later, np.int32(k), first)
    return value, first


def _stacked_maxima(cfg, x):
    """Reduced over the window views stacked last: XLA fuses the views into the reduction
    where the windows tile the input (LeNet's and the race network's 2x2 pools)."""
    views = cfg.views(x, -jnp.inf)
    # values and keys stacked apart: one stack read twice would be written out whole first
    keys = jnp.stack([_nan_keyed(view, np.int32(k)) for k, view in enumerate(views)], axis=-1)
    value, key = lax.reduce((jnp.stack(views, axis=-1), keys),
                            (np.array(-np.inf, x.dtype), _NO_POSITION), _first_max,
                            (keys.ndim - 1,))
    return value, _unkeyed(key)


_NO_POSITION = np.int32(np.iinfo(np.int32).max)  # the reductions' start: loses every tie


def _positions_fit(cfg: PoolConfig) -> bool:
    """Whether a padded plane's positions fit :func:`_sliding_maxima`'s int32 keys (a wrapped,
    negative position would read as a NaN's key); past that, the stacked views take over."""
    height, width = cfg.axes
    return height.padded_size * width.padded_size < _NO_POSITION


def _sliding_maxima(cfg: PoolConfig, x):
    """Overlapping windows: one variadic ``reduce_window`` over the padded input and its
    positions ``p = row W_pad + col`` (a NaN's keyed, :func:`_nan_keyed`; int32, so planes of
    up to ``2^31 - 1`` elements: :func:`_positions_fit`), the offset recovered from the
    winner's position,
    ``(a, b) = ((row - i s_h) / d_h, (col - j s_w) / d_w)``. Stacked, XLA copied the 9 views
    of article 001's 3x3/2 pool one by one and then into the stack (1.1 ms a step at batch
    64, by the profiler): 10% faster steps at batch 64 and 256 (AMD EPYC). Where windows tile
    the input the stack fuses, and it is the faster (LeNet 3.6 against 4.0 ms at 64)."""
    xp = pad_spatial(x, cfg.axes, -jnp.inf)
    height, width = cfg.axes
    row, col = (lax.broadcasted_iota(jnp.int32, xp.shape, axis) for axis in (2, 3))
    value, key = lax.reduce_window(
        (xp, _nan_keyed(xp, row * xp.shape[3] + col)), (np.array(-np.inf, x.dtype), _NO_POSITION),
        _first_max, (1, 1, height.kernel, width.kernel), (1, 1, height.stride, width.stride),
        "VALID", window_dilation=(1, 1, height.dilation, width.dilation))
    position = _unkeyed(key)
    i, j = (lax.broadcasted_iota(jnp.int32, value.shape, axis) for axis in (2, 3))
    a = (position // xp.shape[3] - i * height.stride) // height.dilation
    b = (position % xp.shape[3] - j * width.stride) // width.dilation
    return value, a * width.kernel + b


def _first_inside(a: Axis) -> np.ndarray:
    """Per output position of one axis, the first kernel offset inside the unpadded input."""
    positions = ((np.arange(a.out_size) * a.stride - a.pad_lo)[:, None]
                 + np.arange(a.kernel)[None, :] * a.dilation)
    return np.argmax((positions >= 0) & (positions < a.in_size), axis=1)


def _padding_never_wins(cfg, value, first):
    """PyTorch's choice for a window whose maximum is ``-inf`` (all its input elements are
    ``-inf``): its first element inside the input, never the ``-inf`` padding (which would
    swallow the gradient). A constant per window, and no work when no window starts in the
    padding. Adaptive windows have no padding: their offset 0 (``argmax``'s pick) is inside."""
    if not isinstance(cfg, PoolConfig):
        return first
    height, width = (_first_inside(a) for a in cfg.axes)
    inside = (height[:, None] * cfg.axes[1].kernel + width[None, :]).astype(np.int32)
    if not inside.any():
        return first
    return jnp.where(value == -jnp.inf, inside, first)


@_window_maxima.defjvp
def _window_maxima_jvp(cfg, primals, tangents):
    """The maximum moves with its element: ``dvalue = dx[first]`` (so rules built on this stay
    differentiable, e.g. for Hessian-vector products); ``first`` is piecewise constant."""
    (x,), (dx,) = primals, tangents
    value, first = _window_maxima(cfg, x)
    d_value = _at_offset(cfg.views(dx, 0), first)
    return (value, first), (d_value, np.zeros(first.shape, jax.dtypes.float0))


def _nan_keyed(x, keys):
    """Each element's key for :func:`_first_max`: its offset (or position) ``k``, or ``-1 - k``
    for a NaN. Negative keys make PyTorch's scan an order-free rule: a NaN beats any number,
    and of several NaNs the *last* wins (torch's CPU and CUDA kernels replace their running
    maximum at every NaN they meet)."""
    return jnp.where(x != x, -1 - keys, keys)


def _unkeyed(key):
    """The offset (or position) behind a :func:`_nan_keyed` key."""
    return jnp.where(key < 0, -1 - key, key)


def _first_max(candidate, best):
    """The reducer: the maximum (``lax.max``, NaN-propagating) and the key of the winning pair:
    the larger value, and where neither is larger -- equal values, or a NaN on either side
    (every comparison with a NaN is false) -- the smaller key. A number's key is its offset
    (the earlier one wins a tie), a NaN's is negative (:func:`_nan_keyed`: below every
    number's, and the later NaN's the smaller). That is the largest pair in a total order, so
    XLA may combine a window's pairs in any order and pick the same one; only the sign of a
    zero maximum may differ from PyTorch's (its first element's), as the autodiff path's may.

    Three comparisons, the value by ``lax.max``: the reduction is most of a max pool's forward
    and is not vectorized, so every operation shows. Selecting the value by the key's test
    made article 001's 3x3/2 pool 2x slower (1.48 against 0.74 ms a step at batch 64); a
    fourth comparison (``key < 0`` for the NaNs) cost 0.61-0.69 against 0.44-0.48 ms there.
    Against the first-NaN reducer before it: 0.44-0.48 against 0.89-1.19 ms for that pool,
    the race network's pools 0.17-0.23 against 0.24 (the profiler, interleaved runs, AMD
    EPYC)."""
    (value, key), (best_value, best_key) = candidate, best
    take = (value > best_value) | (~(value < best_value) & (key < best_key))
    return lax.max(value, best_value), lax.select(take, key, best_key)


def _max_forward(cfg, x):
    """The forward JAX differentiates (``vjp="autodiff"``, and the plain call): every window
    at the offset of its first maximum, so autodiff routes each window's gradient to exactly
    that element, like the rule. (JAX's reduce_max rule splits ties, and it cannot
    differentiate a dilated reduce_window max at all.) The selects fuse into the pool's
    consumers, which XLA:CPU runs faster than a gather (LeNet's step and evaluation). A
    window with NaNs takes its last NaN, as PyTorch does (``argmax`` alone takes the first)."""
    views = cfg.views(x, -jnp.inf)
    first = _argmax_last_nan(jnp.stack(views, axis=-1))
    first = _padding_never_wins(cfg, lax.stop_gradient(_at_offset(views, first)), first)
    return _at_offset(views, first)


def _argmax_last_nan(stacked):
    """Per window (the last axis), the offset of the first maximum; of the last NaN where the
    window has one."""
    nans = jnp.isnan(stacked)
    last_nan = stacked.shape[-1] - 1 - jnp.argmax(nans[..., ::-1], axis=-1)
    return jnp.where(nans.any(axis=-1), last_nan, jnp.argmax(stacked, axis=-1))


def _max_fwd(cfg, x):
    return _window_maxima(cfg, x)


def _max_bwd(cfg, first, g):
    return (cfg.to_first(first, g),)


def _interleave_to_first(cfg, first, g):
    """Tiling windows: per offset, the cotangent where that offset won, interleaved back."""
    zero = jnp.zeros((), g.dtype)
    return add_window_views([jnp.where(first == k, g, zero)
                             for k in range(len(kernel_offsets(cfg.axes)))], cfg.axes)


def _scatter_to_first(cfg, first, g):
    """General windows: one scatter-add of every window's cotangent to the padded-input position
    of its first maximum, ``(i s + a d, j s + b d)`` with ``(a, b) = divmod(first, kw)`` (4x
    faster here than one strided ``lax.pad`` per offset, measured with overlapping 3x3/2)."""
    height, width = cfg.axes
    a, b = jnp.divmod(first, width.kernel)
    rows = jnp.arange(g.shape[2])[:, None] * height.stride + a * height.dilation
    cols = jnp.arange(g.shape[3])[None, :] * width.stride + b * width.dilation
    return _scatter_add_at(rows, cols, g, (height.padded_size, width.padded_size))


def _scatter_add_at(rows, cols, g, size):
    """``dx[n, c, rows[n, c, i, j], cols[n, c, i, j]] += g[n, c, i, j]`` into a zero ``dx`` of
    spatial ``size``: one scatter-add (sizes spelled out, so an empty batch reshapes too)."""
    n, c, h_out, w_out = g.shape
    height, width = size
    flat = jnp.broadcast_to(rows * width + cols, g.shape).reshape(n * c, h_out * w_out)
    dx = jnp.zeros((n * c, height * width), g.dtype)
    dx = dx.at[jnp.arange(n * c)[:, None], flat].add(g.reshape(n * c, h_out * w_out))
    return dx.reshape(n, c, height, width)


def _max_primal(cfg, x):
    return _window_maxima(cfg, x)[0]


_max_pool2d = two_gradients(_max_forward, _max_fwd, _max_bwd, primal=_max_primal)


@register()
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, *,
               vjp: str = "custom"):
    """Max over sliding windows, ``torch.nn.functional.max_pool2d`` semantics.

    ``stride`` defaults to ``kernel_size``; padding counts as ``-inf`` and is at most half the
    kernel; ``ceil_mode`` keeps a last partial window unless it would start in the padding.

    Backward rule: each window passes its whole cotangent to one input, the *first* maximum in
    row-major window order (PyTorch's choice; ties are common after ReLU). With ``k*`` that
    offset and the windows' padded-input positions ``(i s + a d, j s + b d)``::

        dxp[n, c, i s + a d, j s + b d] += g[n, c, i, j]   if (a, b) == k*[n, c, i, j]
        dx = dxp without its padding

    Only the winning offsets are saved. The scatter is an interleave when the windows tile the
    input (stride == kernel) and one scatter-add otherwise.

    Both paths (the rule and autodiff) take PyTorch's subgradient at ties: the first maximum;
    a window whose input elements are all ``-inf`` passes its cotangent to its first element
    inside the input, never to the padding; a NaN is the maximum of its window, and of several
    NaNs the last in row-major order takes the cotangent (as PyTorch's kernels, which replace
    their running maximum at every NaN).
    """
    check_vjp("max_pool2d", vjp)
    _checks.check_floating("max_pool2d", x)
    if jnp.ndim(x) == 3:
        return _unbatched(max_pool2d, x, kernel_size, stride, padding, dilation, ceil_mode,
                          vjp=vjp)
    axes = pool_axes("max_pool2d", jnp.shape(x), kernel_size, stride, padding, dilation,
                     ceil_mode)
    return _max_pool2d(vjp, PoolConfig(axes), x)


# ----------------------------------------------------------------------------- avg pooling

def _divisor_1d(a: Axis, count_include_pad: bool) -> np.ndarray:
    # PyTorch: a window is clipped to the padded input (in ceil mode it can overhang it); with
    # count_include_pad=False it is clipped to the unpadded input as well. pad_lo == requested pad.
    starts = np.arange(a.out_size) * a.stride - a.pad_lo
    ends = np.minimum(starts + a.kernel, a.in_size + a.pad_lo)
    if count_include_pad:
        return ends - starts
    return np.minimum(ends, a.in_size) - np.maximum(starts, 0)


def avg_divisor(cfg: PoolConfig, dtype) -> np.ndarray:
    """How many elements each output averages, shape ``(H_out, W_out)`` (the override if any)."""
    if cfg.divisor_override is not None:
        return np.full(cfg.out_size, cfg.divisor_override, dtype)
    h, w = (_divisor_1d(a, cfg.count_include_pad) for a in cfg.axes)
    return np.outer(h, w).astype(dtype)


def _avg_forward(cfg, x):
    total = accumulating(x.dtype)
    xp = pad_spatial(x.astype(total), cfg.axes, 0)
    (kh, kw), (sh, sw) = zip(*((a.kernel, a.stride) for a in cfg.axes))
    sums = lax.reduce_window(xp, np.array(0, total), lax.add, (1, 1, kh, kw), (1, 1, sh, sw),
                             "VALID")
    return (sums / avg_divisor(cfg, total)).astype(x.dtype)


def _avg_fwd(cfg, x):
    return _avg_forward(cfg, x), None


def _avg_bwd(cfg, _, g):
    total = accumulating(g.dtype)  # overlapping windows' shares add up
    share = g.astype(total) / avg_divisor(cfg, total)
    per_offset = [share] * len(kernel_offsets(cfg.axes))
    return (unpad_spatial(add_window_views(per_offset, cfg.axes), cfg.axes).astype(g.dtype),)


_avg_pool2d = two_gradients(_avg_forward, _avg_fwd, _avg_bwd)


@register()
def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None, *, vjp: str = "custom"):
    """Mean over sliding windows, ``torch.nn.functional.avg_pool2d`` semantics.

    ``y[i, j] = sum_window xp / N[i, j]`` where ``N`` counts the window's elements inside the
    padded input (``count_include_pad=True``) or inside the unpadded input (``False``); a ceil-mode
    overhang past the padding never counts. ``divisor_override`` (a nonzero int), if given, is
    every window's ``N``.

    Backward rule: every element of a window receives an equal share of its cotangent::

        dxp[n, c, i s + a, j s + b] += g[n, c, i, j] / N[i, j]   for all offsets (a, b)
        dx = dxp without its padding

    ``N`` is a compile-time constant, so nothing is saved from the forward pass. Linear: both
    paths give the one derivative, with PyTorch's ``N`` at the padded and overhanging edges.
    """
    check_vjp("avg_pool2d", vjp)
    _checks.check_floating("avg_pool2d", x)
    if divisor_override is not None and (isinstance(divisor_override, bool) or not isinstance(
            divisor_override, (int, np.integer)) or divisor_override == 0):
        raise ValueError(f"avg_pool2d: expected divisor_override None or a nonzero int, got "
                         f"{divisor_override!r}")
    if jnp.ndim(x) == 3:
        return _unbatched(avg_pool2d, x, kernel_size, stride, padding, ceil_mode,
                          count_include_pad, divisor_override, vjp=vjp)
    axes = pool_axes("avg_pool2d", jnp.shape(x), kernel_size, stride, padding, 1, ceil_mode)
    override = None if divisor_override is None else int(divisor_override)
    return _avg_pool2d(vjp, PoolConfig(axes, bool(count_include_pad), override), x)


# ------------------------------------------------------------------------- adaptive pooling

def adaptive_config(where: str, in_shape, output_size) -> PoolConfig | AdaptiveConfig:
    """Validate an adaptive pool's input and ``output_size`` as PyTorch does: an int or a pair,
    where ``None`` keeps that axis' input size; every axis but the batch must be non-empty.

    Where the output sizes divide the input's, PyTorch's windows are ``[i k, (i + 1) k)`` with
    ``k = H / H_out``: they tile the input, and the pool is the sliding-window pool with kernel
    and stride ``k`` (a :class:`PoolConfig`: same rules, its fast paths, no dense matrix).
    """
    _checks.check_rank(where, in_shape, (4,), "(N, C, H, W)")
    if min(in_shape[1:]) < 1:
        raise ValueError(f"{where}: expected non-empty channel and spatial axes (as PyTorch), "
                         f"got input shape {tuple(in_shape)}")
    pair = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size,) * 2
    valid = len(pair) == 2 and all(
        v is None or (isinstance(v, (int, np.integer)) and not isinstance(v, bool)) for v in pair)
    if not valid:
        raise TypeError(f"{where}: output_size must be an int or a pair of ints or None, "
                        f"got {output_size!r}")
    in_hw = tuple(in_shape[2:])
    out = tuple(n if v is None else int(v) for v, n in zip(pair, in_hw))
    if min(out) < 0:
        raise ValueError(f"{where}: output_size must be >= 0, got {output_size!r}")
    if all(o > 0 and n % o == 0 for n, o in zip(in_hw, out)):
        return PoolConfig(tuple(make_axis(n, n // o, n // o, 1, 0, 0) for n, o in zip(in_hw, out)))
    return AdaptiveConfig(in_hw, out)


def _adaptive_avg_forward(cfg, x):
    total = accumulating(x.dtype)
    return separable_product(x.astype(total), *cfg.averaging(total)).astype(x.dtype)


def _adaptive_avg_fwd(cfg, x):
    return _adaptive_avg_forward(cfg, x), None


def _adaptive_avg_bwd(cfg, _, g):
    total = accumulating(g.dtype)
    a_h, a_w = cfg.averaging(total)
    return (separable_product(g.astype(total), a_h.T, a_w.T).astype(g.dtype),)


_adaptive_avg_pool2d = two_gradients(_adaptive_avg_forward, _adaptive_avg_fwd,
                                     _adaptive_avg_bwd)


@register()
def adaptive_avg_pool2d(x, output_size, *, vjp: str = "custom"):
    """Mean over adaptive windows, ``torch.nn.functional.adaptive_avg_pool2d`` semantics.

    ``output_size`` is an int or a pair (``None`` keeps the input size). Output ``(i, j)``
    averages rows ``[floor(i H / H_out), ceil((i + 1) H / H_out))`` and likewise columns, so
    windows differ in size and overlap when the sizes do not divide (7 -> 3: rows 0-2, 2-4,
    4-6), and repeat inputs when the output is larger. Separable, with the averaging matrices
    ``A_h[i, h] = 1 / |rows_i|`` on window ``i``'s rows (0 elsewhere) and ``A_w`` alike::

        y[n, c] = A_h x[n, c] A_w^T

    Backward rule: every element of a window receives an equal share of its cotangent, the
    transposed map::

        dx[n, c] = A_h^T g[n, c] A_w

    Where the sizes divide, the windows tile the input and this is ``avg_pool2d`` with kernel
    and stride ``H / H_out`` (its rule, no matrices). Otherwise the matrices are dense
    (:class:`_windows.Taps`): a NaN or inf input then reaches every output of its plane
    (``0 * inf``), where PyTorch confines it to the windows holding it. ``A`` is a
    compile-time constant, so nothing is saved from the forward pass.

    Linear: both paths give the one derivative, PyTorch's equal shares, also where windows
    overlap or repeat an input (a constant input included).
    """
    check_vjp("adaptive_avg_pool2d", vjp)
    _checks.check_floating("adaptive_avg_pool2d", x)
    if jnp.ndim(x) == 3:
        return _unbatched(adaptive_avg_pool2d, x, output_size, vjp=vjp)
    cfg = adaptive_config("adaptive_avg_pool2d", jnp.shape(x), output_size)
    op = _avg_pool2d if isinstance(cfg, PoolConfig) else _adaptive_avg_pool2d
    return op(vjp, cfg, x)


@register()
def adaptive_max_pool2d(x, output_size, *, vjp: str = "custom"):
    """Max over adaptive windows, ``torch.nn.functional.adaptive_max_pool2d`` semantics
    (``return_indices=False``: values only).

    The windows are :func:`adaptive_avg_pool2d`'s, their offsets in PyTorch's scan order
    (row-major); shorter windows repeat their last row or column, which never changes a
    maximum or wins a tie. Where the sizes divide, this is ``max_pool2d`` with kernel and
    stride ``H / H_out``.

    Backward rule: as :func:`max_pool2d` (the same functions, over this config's windows),
    each window passes its whole cotangent to its *first* maximum (PyTorch's choice), at input
    position ``(rows[a*, i], cols[b*, j])`` for the winning offset ``(a*, b*)``::

        dx[n, c, rows[a*, i], cols[b*, j]] += g[n, c, i, j]       one scatter-add

    Only the winning offsets are saved.

    Both paths (the rule and autodiff) take PyTorch's subgradient at ties: the first maximum
    in scan order (a constant input, overlapping windows); a window whose elements are all
    ``-inf`` passes its cotangent to its first element; a NaN is the maximum of its window,
    the last of several taking the cotangent (a repeated row or column may then win, but it
    is the same input element as the last NaN of the window itself).
    """
    check_vjp("adaptive_max_pool2d", vjp)
    _checks.check_floating("adaptive_max_pool2d", x)
    if jnp.ndim(x) == 3:
        return _unbatched(adaptive_max_pool2d, x, output_size, vjp=vjp)
    cfg = adaptive_config("adaptive_max_pool2d", jnp.shape(x), output_size)
    return _max_pool2d(vjp, cfg, x)


# ------------------------------------------------ hyperparameter spaces (tests, audit)

def _pool_input(rng, c, dtype):
    x = S.normal(rng, (c["batch"], c["channels"]) + tuple(c["size"]), dtype)
    return S.ties(x) if c.get("ties") else x


def _pool_case(name, extra):
    """Builder for a pooling op: the shared hyperparameters plus its own (``extra``)."""
    def build(rng, c, dtype):
        kw = dict(kernel_size=c["kernel"], stride=c["stride"], padding=c["padding"],
                  ceil_mode=c["ceil_mode"], **{k: c[k] for k in extra})
        fn = S.op(name)
        return S.Case(name, c, {"x": _pool_input(rng, c, dtype)},
                    lambda x, vjp="custom": fn(x, vjp=vjp, **kw),
                    lambda torch, x: getattr(torch.nn.functional, name)(x, **kw))
    return build


_POOL = dict(batch=(2, 1), channels=(3, 1), size=((7, 6), (5, 5), (9, 8), (6, 9)),
             kernel=(3, 2, 1, (2, 3)), stride=(None, 1, 2, 3, (1, 2)), padding=(0, 1, (1, 0)),
             ceil_mode=(False, True))


S.register_space(
    "max_pool2d",
    # 8 channels: overlapping windows fold channels-last there (_channels_last_fits)
    dict(_POOL, channels=(3, 1, 8), dilation=(1, 2, (2, 1)), ties=(False, True)),
    _pool_case("max_pool2d", ["dilation"]),
    ({"kernel": 2, "stride": 3}, {"ceil_mode": True, "stride": 2, "size": (6, 9)},
     {"channels": 8, "kernel": 3, "stride": 2, "ties": True},
     {"channels": 8, "kernel": 3, "stride": 1, "padding": 1, "dilation": 2},
     {"ties": True}, {"ties": True, "stride": 1, "padding": 1}, {"dilation": 2},
     {"kernel": 3, "stride": 2, "size": (28, 28), "batch": 1},
     {"batch": 1, "kernel": (2, 3), "ceil_mode": True, "padding": 1, "stride": 2}))

S.register_space(
    "avg_pool2d",
    dict(_POOL, count_include_pad=(True, False)),
    _pool_case("avg_pool2d", ["count_include_pad"]),
    ({"kernel": 2, "stride": 3}, {"ceil_mode": True, "stride": 2, "padding": 1},
     {"ceil_mode": True, "stride": 2, "padding": 1, "count_include_pad": False},
     {"padding": 1, "count_include_pad": False}, {"batch": 1, "size": (5, 5)}))


def _adaptive_pool_case(name):
    """Builder for an adaptive pool: the input and ``output_size``."""
    def build(rng, c, dtype):
        fn, size = S.op(name), c["output_size"]
        return S.Case(name, c, {"x": _pool_input(rng, c, dtype)},
                      lambda x, vjp="custom": fn(x, size, vjp=vjp),
                      lambda torch, x: getattr(torch.nn.functional, name)(x, size))
    return build


# adaptive pools: sizes that do not divide (7 -> 3: overlapping windows), that do (the
# sliding-window path), outputs larger than the input, None keeping an input size
_ADAPTIVE = dict(batch=(2, 1), channels=(3, 1), size=((7, 5), (6, 6), (4, 3), (1, 1)),
                 output_size=((3, 2), 3, 1, (None, 2), (9, 4), (5, None)))
_ADAPTIVE_EDGES = ({"size": (7, 7), "output_size": 3}, {"size": (6, 6), "output_size": (3, 2)},
                   {"size": (4, 3), "output_size": (9, 4)}, {"output_size": 1},
                   {"output_size": (5, None)}, {"batch": 1, "size": (1, 1)})

S.register_space("adaptive_avg_pool2d", _ADAPTIVE, _adaptive_pool_case("adaptive_avg_pool2d"),
                 _ADAPTIVE_EDGES)

S.register_space(
    "adaptive_max_pool2d",
    dict(_ADAPTIVE, ties=(False, True)),
    _adaptive_pool_case("adaptive_max_pool2d"),
    _ADAPTIVE_EDGES + ({"ties": True}, {"ties": True, "size": (6, 6), "output_size": 2},
                       {"ties": True, "size": (4, 3), "output_size": (9, 4)}))
