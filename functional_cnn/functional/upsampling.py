"""Resizing: ``interpolate`` (``"nearest"`` and ``"bilinear"``), PyTorch's source positions.

Both modes are separable: each output row reads one (nearest) or two (bilinear) input rows
with fixed weights, and each output column likewise (:class:`_windows.Taps`), so
``y = A_h x A_w^T`` with ``A`` holding one or two nonzeros per row, and the rule is the
transposed map ``dx = A_h^T g A_w``. Nearest copies are gathers (and the rule the transposed
gathers), bilinear weights are two matrix products (see ``Taps`` for why). The positions and
weights are PyTorch's, computed in its precision (float32 for float32 input), so they agree to
the index: ``nearest`` is ``floor(i * in / out)`` with the special cases PyTorch keeps, and
``bilinear`` uses half-pixel centers (or the corners' grid with ``align_corners=True``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from jax import numpy as jnp

from .. import _checks
from . import _spaces as S
from ._registry import check_vjp, register, two_gradients
from ._windows import Taps, gather_taps, scatter_taps, separable_product

MODES = ("nearest", "bilinear")


class InterpConfig(NamedTuple):
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    scales: tuple  # (float | None, float | None): the scale_factor, None when size was given
    mode: str
    align_corners: bool
    double: bool  # float64 input: PyTorch computes bilinear positions in float64

    @property
    def taps(self) -> tuple[Taps, Taps]:
        if self.mode == "nearest":
            return tuple(nearest_taps(*axis) for axis in zip(self.in_size, self.out_size,
                                                             self.scales))
        dtype = np.float64 if self.double else np.float32
        return tuple(bilinear_taps(n, o, s, self.align_corners, dtype)
                     for n, o, s in zip(self.in_size, self.out_size, self.scales))


def nearest_taps(n_in: int, n_out: int, scale: float | None) -> Taps:
    """PyTorch's ``nearest_idx``: output ``i`` copies input ``min(floor(i * r), n_in - 1)``
    with ``r = 1 / scale`` (scale_factor given) or ``n_in / n_out``, in float32 whatever the
    dtype; exactly ``i`` when the sizes match and ``i // 2`` when the output is twice as long."""
    i = np.arange(n_out)
    if n_out == n_in:
        return Taps(i[None])
    if n_out == 2 * n_in:
        return Taps(i[None] // 2)
    ratio = np.float32(1.0 / scale) if scale else np.float32(n_in) / np.float32(n_out)
    index = np.floor(i.astype(np.float32) * ratio).astype(np.int64)
    return Taps(np.minimum(index, n_in - 1)[None])


def _source_positions(n_in, n_out, scale, align_corners, dtype):
    """PyTorch's ``area_pixel_compute_source_index``: ``i (n_in - 1) / (n_out - 1)`` on the
    corners' grid, else half-pixel centers ``(i + 1/2) r - 1/2`` clamped at 0."""
    i = np.arange(n_out, dtype=dtype)
    if align_corners:
        ratio = dtype(n_in - 1) / dtype(n_out - 1) if n_out > 1 else dtype(0)
        return ratio * i
    ratio = dtype(1.0 / scale) if scale else dtype(n_in) / dtype(n_out)
    return np.maximum(ratio * (i + dtype(0.5)) - dtype(0.5), dtype(0))


def bilinear_taps(n_in: int, n_out: int, scale: float | None, align_corners: bool,
                  dtype) -> Taps:
    """Two taps per output: ``h0 = min(floor(src), n_in - 1)`` (floored in float32, as
    PyTorch's ``floorf``), ``h1 = h0 + 1`` inside the input (else ``h0``), weights ``1 - l``
    and ``l = clip(src - h0, 0, 1)``; a plain copy when the sizes match."""
    if n_out == n_in:
        return Taps(np.arange(n_out)[None])
    src = _source_positions(n_in, n_out, scale, align_corners, dtype)
    h0 = np.minimum(np.floor(src.astype(np.float32)).astype(np.int64), n_in - 1)
    lam = np.clip(src - h0.astype(dtype), 0, 1).astype(dtype)
    h1 = h0 + (h0 < n_in - 1)
    return Taps(np.stack([h0, h1]), np.stack([dtype(1) - lam, lam]))


def _forward(cfg, x):
    taps_h, taps_w = cfg.taps
    if cfg.mode == "nearest":  # copies: gathered
        return gather_taps(gather_taps(x, taps_h, 2), taps_w, 3)
    return separable_product(x, taps_h.matrix(cfg.in_size[0], x.dtype),
                             taps_w.matrix(cfg.in_size[1], x.dtype))


def _fwd(cfg, x):
    return _forward(cfg, x), None


def _bwd(cfg, _, g):
    taps_h, taps_w = cfg.taps
    if cfg.mode == "nearest":
        along_w = scatter_taps(g, taps_w, 3, cfg.in_size[1])
        return (scatter_taps(along_w, taps_h, 2, cfg.in_size[0]),)
    return (separable_product(g, taps_h.matrix(cfg.in_size[0], g.dtype).T,
                              taps_w.matrix(cfg.in_size[1], g.dtype).T),)


_interpolate = two_gradients(_forward, _fwd, _bwd)


def _scale_pair(where: str, scale_factor) -> tuple[float, float]:
    pair = tuple(scale_factor) if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * 2
    if len(pair) != 2 or not all(isinstance(s, (int, float, np.integer, np.floating))
                                 and not isinstance(s, bool) for s in pair):
        raise TypeError(f"{where}: scale_factor must be a number or a pair of numbers, "
                        f"got {scale_factor!r}")
    if min(pair) <= 0 or not all(math.isfinite(s) for s in pair):
        raise ValueError(f"{where}: scale_factor must be positive and finite, "
                         f"got {scale_factor!r}")
    return float(pair[0]), float(pair[1])


def interp_options(where: str, size, scale_factor, mode, align_corners):
    """Validate what does not depend on the input: ``mode``, ``align_corners`` (bilinear only,
    default False), and exactly one of ``size`` (an int or a pair, at least 1) and
    ``scale_factor`` (a positive number or pair). Returns ``(size, scales, align_corners)``."""
    if mode not in MODES:
        raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")
    if mode == "nearest" and align_corners is not None:
        raise ValueError(f"{where}: align_corners can only be set with mode='bilinear' "
                         f"(as in PyTorch), got align_corners={align_corners!r}")
    if (size is None) == (scale_factor is None):
        raise ValueError(f"{where}: give exactly one of size and scale_factor, got size={size!r}, "
                         f"scale_factor={scale_factor!r}")
    if size is not None:
        return _checks.int_pair(where, "size", size), (None, None), bool(align_corners)
    return None, _scale_pair(where, scale_factor), bool(align_corners)


def interp_config(where: str, in_shape, dtype, size, scale_factor, mode,
                  align_corners) -> InterpConfig:
    """Validate an interpolation as PyTorch does and resolve its sizes: ``size``, or
    ``floor(in * scale)`` with the positions then using the scale itself
    (``recompute_scale_factor=None``)."""
    size, scales, align_corners = interp_options(where, size, scale_factor, mode, align_corners)
    _checks.check_rank(where, in_shape, (4,), "(N, C, H, W) (2-D resizing; PyTorch resizes a "
                       "3-D input along one axis, which this does not)")
    in_hw = tuple(in_shape[2:])
    if min(in_hw) < 1:
        raise ValueError(f"{where}: expected non-empty spatial axes, got input shape "
                         f"{tuple(in_shape)}")
    out = size or tuple(int(math.floor(n * s)) for n, s in zip(in_hw, scales))
    if min(out) < 1:
        raise ValueError(f"{where}: scale_factor {scale_factor!r} makes the output "
                         f"{out[0]}x{out[1]} from {in_hw[0]}x{in_hw[1]}: it must be at least 1x1")
    return InterpConfig(in_hw, out, scales, mode, align_corners, bool(dtype == jnp.float64))


@register()
def interpolate(x, size=None, scale_factor=None, mode="nearest", align_corners=None, *,
                vjp: str = "custom"):
    """Resize ``(N, C, H, W)``, ``torch.nn.functional.interpolate`` semantics for
    ``mode="nearest"`` and ``mode="bilinear"`` (``recompute_scale_factor=None``).

    Exactly one of ``size`` (int or pair) and ``scale_factor`` (number or pair; the output is
    ``floor(H * scale)``, and the source positions use ``1 / scale``, as PyTorch) is given.
    ``align_corners`` (bilinear only; default False) maps the corner pixels onto each other.

    Forward, separable along H and W (``A_h (H_out, H)``, ``A_w (W_out, W)``)::

        y[n, c] = A_h x[n, c] A_w^T
        nearest:  A[i, min(floor(i r), in - 1)] = 1,  r = 1 / scale or in / out
        bilinear: A[i, h0] = 1 - l, A[i, h1] = l  at the source position
                  src = (i + 1/2) r - 1/2 clamped at 0   (align_corners=False)
                  src = i (in - 1) / (out - 1)           (align_corners=True)
                  h0 = floor(src), h1 = min(h0 + 1, in - 1), l = src - h0

    Backward rule, the transpose of that linear map::

        dx[n, c] = A_h^T g[n, c] A_w

    ``nearest`` runs as gathers of the row (then column) each output copies, and its rule as
    the gathers of the transposed map (each input sums the cotangents of its copies), exact and
    local like PyTorch. ``bilinear`` runs as two dense matrix products each way, so a NaN or
    inf input reaches every output of its plane (``0 * inf``), where PyTorch confines it to its
    neighbours. ``A`` is a compile-time constant; nothing is saved from the forward pass.

    Linear: both paths give the one derivative, PyTorch's weights ``A`` (at a constant input,
    an output size equal to the input's, and ``align_corners`` with a 1-wide output too).
    """
    check_vjp("interpolate", vjp)
    _checks.check_floating("interpolate", x)
    cfg = interp_config("interpolate", jnp.shape(x), jnp.result_type(x), size, scale_factor, mode,
                        align_corners)
    return _interpolate(vjp, cfg, x)


# ------------------------------------------------ hyperparameter spaces (tests, audit)

def _interpolate_case(rng, c, dtype):
    kind, value = c["target"]  # ("size", int or pair) or ("scale", number or pair)
    kw = dict(size=value if kind == "size" else None,
              scale_factor=value if kind == "scale" else None, mode=c["mode"],
              align_corners=c["align_corners"])
    x = S.normal(rng, (c["batch"], c["channels"]) + tuple(c["size"]), dtype)
    return S.Case("interpolate", c, {"x": x},
                  lambda x, vjp="custom": interpolate(x, vjp=vjp, **kw),
                  lambda torch, x: torch.nn.functional.interpolate(x, **kw))


S.register_space(
    "interpolate",
    dict(batch=(2, 1), channels=(3, 1), size=((5, 4), (3, 7), (1, 1), (6, 6)),
         target=(("scale", 2), ("size", (7, 9)), ("scale", 1.7), ("scale", (0.6, 2.5)),
                 ("size", 2), ("scale", 1.1), ("size", (5, 4)), ("scale", (3, 1.5))),
         mode=("nearest", "bilinear"), align_corners=(None, False, True)),
    _interpolate_case,
    ({"target": ("size", (7, 9))}, {"target": ("scale", 1.7)},
     {"target": ("scale", (0.6, 2.5))}, {"target": ("scale", 1.1)},  # out == in, scaled
     {"mode": "bilinear", "align_corners": False},
     {"mode": "bilinear", "align_corners": True, "target": ("size", (7, 9))},
     {"mode": "bilinear", "align_corners": False, "target": ("scale", (0.6, 2.5))},
     {"mode": "bilinear", "align_corners": True, "target": ("size", (1, 3))},
     {"mode": "bilinear", "align_corners": False, "target": ("scale", 1.1)},
     {"batch": 1, "size": (1, 1), "mode": "bilinear", "align_corners": False,
      "target": ("size", (3, 2))}))
