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
"""
from __future__ import annotations

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
    that would start inside the right padding is dropped.
    """
    span = dilation * (kernel - 1) + 1
    reach = in_size + pad_lo + pad_hi - span
    if reach < 0:
        return 0
    out = (reach + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= in_size + pad_lo:
        out -= 1
    return out


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
        raise ValueError(f"{where}: the window {window[0]}x{window[1]} (kernel with dilation) "
                         f"is larger than the padded input {padded[0]}x{padded[1]} "
                         f"(input shape {tuple(in_shape)})")


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
