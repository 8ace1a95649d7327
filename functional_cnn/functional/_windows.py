"""Window geometry shared by convolution and pooling.

Every sliding-window op here (conv2d, max_pool2d, avg_pool2d) describes each spatial axis by one
:class:`Axis`: kernel size, stride, dilation, the padding on each side, and the input and output
sizes. The output size follows PyTorch (floor or ceil mode), and ``pad_hi`` is then *adjusted* so
that the padded axis is exactly as long as the windows reach::

    in_size + pad_lo + pad_hi == (out_size - 1) * stride + dilation * (kernel - 1) + 1

With that invariant the forward ops run with ``VALID`` windows on the padded input, and every
backward rule is the exact transpose of that padding: no leftover rows, no off-by-one special
cases. ``pad_hi`` is larger than the requested padding in ceil mode (the overhang) and can be
negative in floor mode (trailing rows that no window touches are cropped).

The two helpers :func:`window_views` and :func:`add_window_views` are a transpose pair: the first
reads, for every kernel offset, the strided slice of the padded input that offset sees in all
windows; the second scatters per-offset cotangents back by zero-padding with interior stride. Both
are plain ``lax.slice``/``lax.pad``, so rules built on them stay differentiable.

A transposed convolution is described by the axis of the convolution it transposes
(:func:`transposed_axis`). Windows that do not slide (adaptive pooling's, and interpolation's
source positions) are :class:`Taps`: per output, the few input positions it reads and their
weights, applied as gathers or as one dense matrix per axis.
"""
from __future__ import annotations

import functools
import operator
from typing import NamedTuple, Sequence

import numpy as np
from jax import lax
from jax import numpy as jnp


class Axis(NamedTuple):
    """Geometry of one spatial axis of a sliding-window op."""

    in_size: int
    out_size: int
    kernel: int
    stride: int
    dilation: int
    pad_lo: int
    pad_hi: int  # adjusted: see the module docstring

    @property
    def span(self) -> int:
        """Extent of one window on the input: ``dilation * (kernel - 1) + 1``."""
        return self.dilation * (self.kernel - 1) + 1

    @property
    def padded_size(self) -> int:
        return self.in_size + self.pad_lo + self.pad_hi


def torch_output_size(in_size: int, kernel: int, stride: int, dilation: int, pad_lo: int,
                      pad_hi: int, ceil_mode: bool) -> int:
    """Output length as PyTorch computes it (``pooling_output_shape`` / conv shape).

    ``floor((L + lo + hi - span) / stride) + 1``, or the ceiling in ceil mode, where a last window
    that would start inside the right padding is dropped; 0 where no window fits. In ceil mode
    a window wider than the padded input still gives one output, as in torch (its division
    rounds towards minus infinity, as ``//`` does): the first window, read past the end.
    """
    span = dilation * (kernel - 1) + 1
    reach = in_size + pad_lo + pad_hi - span
    out = (reach + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= in_size + pad_lo:
        out -= 1
    return max(out, 0)


def whole_axis(size: int) -> Axis:
    """An axis every window reads whole (one window, no stride, no padding): appended after the
    spatial axes of a channels-last array, each view of :func:`window_views` takes whole
    channel vectors."""
    return Axis(size, size, 1, 1, 1, 0, 0)


def make_axis(in_size: int, kernel: int, stride: int, dilation: int, pad_lo: int, pad_hi: int,
              ceil_mode: bool = False) -> Axis:
    """Resolve one axis: PyTorch's output size, and ``pad_hi`` adjusted to the windows' reach."""
    out = torch_output_size(in_size, kernel, stride, dilation, pad_lo, pad_hi, ceil_mode)
    span = dilation * (kernel - 1) + 1
    exact_hi = (out - 1) * stride + span - in_size - pad_lo
    return Axis(in_size, out, kernel, stride, dilation, pad_lo, exact_hi)


def check_window_fits(where: str, in_shape, axes: Sequence[Axis], pads) -> None:
    """Raise when a window is larger than the padded input (no output position on an axis).

    ``pads``: the requested ``(lo, hi)`` padding of each spatial axis (``axes`` hold ``pad_hi``
    adjusted to the windows' reach, which is not what the message should report)."""
    if any(a.out_size < 1 for a in axes):
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(in_shape[2:], pads))
        window = tuple(a.span for a in axes)
        dilated = " (kernel with dilation)" if any(a.dilation > 1 for a in axes) else ""
        raise ValueError(f"{where}: the window {window[0]}x{window[1]}{dilated} is larger than "
                         f"the padded input {padded[0]}x{padded[1]} (input shape "
                         f"{tuple(in_shape)})")


def pad_spatial(x, axes: Sequence[Axis], value):
    """Pad (or crop, where ``pad_hi < 0``) the trailing spatial axes of an NC... array."""
    config = [(0, 0, 0)] * (x.ndim - len(axes)) + [(a.pad_lo, a.pad_hi, 0) for a in axes]
    return lax.pad(x, np.array(value, x.dtype), config)


def unpad_spatial(xp, axes: Sequence[Axis]):
    """Transpose of :func:`pad_spatial` (for the padded values' cotangent: drop it)."""
    config = [(0, 0, 0)] * (xp.ndim - len(axes)) + [(-a.pad_lo, -a.pad_hi, 0) for a in axes]
    return lax.pad(xp, np.array(0, xp.dtype), config)


def kernel_offsets(axes: Sequence[Axis]):
    """All kernel offsets in row-major window order (the order PyTorch scans a window)."""
    return list(np.ndindex(*(a.kernel for a in axes)))


def window_views(xp, axes: Sequence[Axis]):
    """For each kernel offset, the strided slice of padded ``xp`` it covers in every window.

    ``views[k][..., i, j] == xp[..., i*s_h + a*d_h, j*s_w + b*d_w]`` for offset ``k = (a, b)``;
    each view has the output's spatial shape.
    """
    lead = xp.ndim - len(axes)
    views = []
    for offset in kernel_offsets(axes):
        start = [0] * lead + [o * a.dilation for o, a in zip(offset, axes)]
        limit = list(xp.shape[:lead]) + [
            o * a.dilation + (a.out_size - 1) * a.stride + 1 for o, a in zip(offset, axes)]
        strides = [1] * lead + [a.stride for a in axes]
        views.append(lax.slice(xp, start, limit, strides))
    return views


def tiles(axes: Sequence[Axis]) -> bool:
    """Whether the windows tile the padded input: no overlap, no gaps (stride == kernel,
    dilation 1), as in ``MaxPool2d(2)``."""
    return all(a.stride == a.kernel and a.dilation == 1 for a in axes)


def add_window_views(view_cotangents, axes: Sequence[Axis]):
    """Transpose of :func:`window_views`: scatter-add per-offset cotangents onto the padded input.

    Each cotangent is placed back on its strided grid by ``lax.pad`` with interior padding
    ``stride - 1``, shifted by its offset; overlapping windows simply add. When the windows tile
    the input (:func:`tiles`) nothing overlaps and the scatter is a pure interleave instead.
    """
    if len(axes) == 2 and tiles(axes):
        return _interleave(view_cotangents, axes)
    total = None
    for offset, ct in zip(kernel_offsets(axes), view_cotangents):
        lead = ct.ndim - len(axes)
        config = [(0, 0, 0)] * lead
        for o, a in zip(offset, axes):
            lo = o * a.dilation
            covered = (a.out_size - 1) * a.stride + 1
            config.append((lo, a.padded_size - lo - covered, a.stride - 1))
        placed = lax.pad(ct, np.array(0, ct.dtype), config)
        total = placed if total is None else total + placed
    return total


def _interleave(view_cotangents, axes):
    """Tiling windows: element ``(i, a), (j, b)`` of the padded input is offset ``(a, b)`` of
    window ``(i, j)``, so stacking the offsets and reshaping puts every value in place."""
    (kh, kw), (ho, wo) = ((a.kernel for a in axes), (a.out_size for a in axes))
    lead = view_cotangents[0].shape[:-2]
    stacked = jnp.stack(view_cotangents, axis=-1).reshape(*lead, ho, wo, kh, kw)
    n = len(lead)
    order = tuple(range(n)) + (n, n + 2, n + 1, n + 3)
    return stacked.transpose(order).reshape(*lead, ho * kh, wo * kw)


# ------------------------------------------------------------------------ transposed convolution

def transposed_axis(in_size: int, kernel: int, stride: int, dilation: int, padding: int,
                    output_padding: int) -> Axis:
    """The axis of the convolution whose input gradient a transposed convolution computes.

    That convolution maps the transposed convolution's *output* (length
    ``(in_size - 1) s - 2 p + d (k - 1) + 1 + output_padding``, PyTorch's formula) back to
    ``in_size`` windows, so ``in_size`` and ``out_size`` swap roles. ``pad_hi = p -
    output_padding`` keeps the exact-reach invariant: the ``output_padding`` extra rows lie past
    the last window (the convolution crops them; its transpose leaves them zero).
    """
    span = dilation * (kernel - 1) + 1
    length = (in_size - 1) * stride - 2 * padding + span + output_padding
    return Axis(length, in_size, kernel, stride, dilation, padding, padding - output_padding)


# ------------------------------------ per-output taps (adaptive pooling, interpolation)

class Taps(NamedTuple):
    """One axis where each output reads a few input positions of its own, not a sliding window.

    ``out[i] = sum_t weight[t, i] * in[index[t, i]]`` over the taps ``t`` that are ``present``
    (``None``: all weights 1, all taps present), i.e. ``out = A in`` with the sparse matrix
    :meth:`matrix`. Two ways to apply it, chosen per op:

    * gathers (:func:`gather_taps`): only what each output reads, so a NaN or inf stays in the
      outputs that read it, as in PyTorch; right for copies (nearest, max), whose gathers XLA
      runs well;
    * the dense matrix (:func:`separable_product`): one matmul per axis. Weighted sums
      (bilinear, adaptive averages) gathered tap by tap fuse badly on XLA:CPU: forward plus
      backward ran 3-7x slower than the matmuls (bilinear x2 on 32x16x16x16, average 28 -> 6
      on 32x16x28x28, 2-core CPU). The price: ``0 * inf = NaN`` carries a non-finite input to
      every output of its plane.
    """

    index: np.ndarray  # (T, out) int
    weight: np.ndarray | None = None  # (T, out) float
    present: np.ndarray | None = None  # (T, out) bool

    @property
    def out_size(self) -> int:
        return self.index.shape[1]

    def matrix(self, in_size: int, dtype) -> np.ndarray:
        """``A (out, in)``: ``A[i, index[t, i]] += weight[t, i]`` over present taps."""
        a = np.zeros((self.out_size, in_size), np.float64)
        present = np.ones(self.index.shape, bool) if self.present is None else self.present
        weight = np.ones(self.index.shape) if self.weight is None else self.weight
        t, i = np.nonzero(present)
        np.add.at(a, (i, self.index[t, i]), weight[t, i])
        return a.astype(dtype)


def separable_product(x, a_h, a_w):
    """``y[n, c] = a_h x[n, c] a_w^T``: ``(H_out, H)`` along the height, ``(W_out, W)`` along
    the width, one ``dot_general`` each (the transpose is the same with ``a_h^T``, ``a_w^T``)."""
    along_w = lax.dot_general(x, jnp.asarray(a_w, x.dtype), (((3,), (1,)), ((), ())))
    y = lax.dot_general(along_w, jnp.asarray(a_h, x.dtype), (((2,), (1,)), ((), ())))
    return y.transpose(0, 1, 3, 2)


def adaptive_taps(in_size: int, out_size: int) -> Taps:
    """PyTorch's adaptive windows ``[floor(i L / n), ceil((i + 1) L / n))`` along one axis, as
    taps: tap ``t`` of window ``i`` is input ``start_i + t``; shorter windows repeat their last
    position (``present`` False there), so offsets stay in PyTorch's scan order."""
    i = np.arange(out_size)
    starts = (i * in_size) // out_size
    ends = -((-(i + 1) * in_size) // out_size)
    t = np.arange(int(np.max(ends - starts, initial=1)))[:, None]  # output 0: one empty tap
    return Taps(np.minimum(starts + t, ends - 1), None, starts + t < ends)


def _on_axis(values, axis: int, ndim: int):
    """A per-position vector shaped to broadcast along ``axis`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(values, shape)


def tap_views(x, taps: Taps, axis: int):
    """Per tap ``t``: ``x`` gathered along ``axis`` at ``index[t]`` (one gather for all taps)."""
    gathered = jnp.take(x, taps.index.reshape(-1), axis=axis, mode="clip")  # in bounds
    return jnp.split(gathered, taps.index.shape[0], axis=axis)


def _masked(view, taps: Taps, t: int, axis: int):
    """Tap ``t``'s weight applied and its absent entries zeroed (by a select, so ``inf`` and
    NaN there vanish instead of giving ``0 * inf``)."""
    if taps.weight is not None:
        view = view * _on_axis(taps.weight[t].astype(view.dtype), axis, view.ndim)
    if taps.present is not None and not taps.present[t].all():
        view = jnp.where(_on_axis(taps.present[t], axis, view.ndim), view,
                         jnp.zeros((), view.dtype))
    return view


def gather_taps(x, taps: Taps, axis: int):
    """``out[..., i, ...] = sum_t weight[t, i] x[..., index[t, i], ...]`` over present taps."""
    views = [_masked(view, taps, t, axis) for t, view in enumerate(tap_views(x, taps, axis))]
    return functools.reduce(operator.add, views)


def transposed_taps(taps: Taps, in_size: int) -> Taps:
    """The taps of the transposed map: input ``h`` reads ``weight[t, i] g[i]`` for every
    present tap ``(t, i)`` with ``index[t, i] == h`` (none: an absent tap, so ``dx[h] = 0``).
    Static, so the transpose of a gather is again a gather, no scatter."""
    weight = np.ones(taps.index.shape) if taps.weight is None else taps.weight
    present = np.ones(taps.index.shape, bool) if taps.present is None else taps.present
    readers = [[] for _ in range(in_size)]
    for t, i in zip(*np.nonzero(present)):
        readers[taps.index[t, i]].append((i, weight[t, i]))
    depth = max(1, max(len(r) for r in readers))
    index, new_weight = np.zeros((depth, in_size), np.int64), np.zeros((depth, in_size))
    new_present = np.zeros((depth, in_size), bool)
    for h, reads in enumerate(readers):
        for m, (i, w) in enumerate(reads):
            index[m, h], new_weight[m, h], new_present[m, h] = i, w, True
    return Taps(index, None if taps.weight is None else new_weight.astype(weight.dtype),
                new_present)


def scatter_taps(g, taps: Taps, axis: int, in_size: int):
    """Transpose of :func:`gather_taps`: ``dx[h] = sum_{t, i: index[t, i] = h} weight[t, i]
    g[i]`` over present taps, computed as the gather of :func:`transposed_taps`."""
    return gather_taps(g, transposed_taps(taps, in_size), axis)
