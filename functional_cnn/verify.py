"""How a gradient is judged right: the tolerances, the error metric and the finite-difference
skip rule that the tests, the audit (``python -m functional_cnn.audit``) and the demo share.

Error metric. For every leaf, ``err = max|actual - ref|`` and ``scale = max|ref|`` (the scale of
the whole leaf, not of each element, so single entries near 0 do not blow it up); the leaf
passes when ``err <= atol + rtol * scale``. Written as a ratio, its relative error is
``err / (scale + floor)`` with ``floor = atol / rtol``, and it passes exactly when that ratio is
at most ``rtol``. The floor keeps the ratio meaningful where a gradient is zero up to rounding
(a conv bias before BatchNorm, BatchNorm with two values per channel, dropout with p = 1).
Finite differences are compared elementwise (``scale = |fd_i|`` per entry), the same formula.

Importing this module never imports torch.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np


class Tol(NamedTuple):
    """``|actual - ref| <= atol + rtol * max|ref|`` per leaf (elementwise for finite
    differences), and why those numbers."""

    rtol: float
    atol: float
    why: str = ""

    @property
    def floor(self) -> float:
        """``atol / rtol``: the relative error is ``err / (scale + floor)``."""
        return self.atol / self.rtol if self.rtol else float("inf")

    def accepts(self, err: float, scale: float) -> bool:
        return bool(err <= self.atol + self.rtol * scale)

    def relative(self, err: float, scale: float) -> float:
        return err / (scale + self.floor) if self.rtol else (0.0 if err == 0 else float("inf"))


# The one table. None of the tests, the audit or the demo writes a tolerance of its own.
TOLERANCES: dict[str, Mapping[str, Tol]] = {
    "float32": {
        "autodiff": Tol(1e-5, 1e-5, "float32 eps is 6e-8; the two paths sum the same products in "
                                    "different orders, so sums of a few hundred terms differ by "
                                    "~1e-6 relative; 1e-5 leaves a margin of ~10"),
        "torch_forward": Tol(1e-5, 1e-5, "torch's forward, other kernels: reordered sums as "
                                         "between the two JAX paths"),
        "torch": Tol(1e-4, 1e-5, "torch uses other kernels (oneDNN convolutions, its own "
                                 "reductions): more reordering than between the two JAX paths"),
        "kink": Tol(1e-5, 1e-6, "both paths against torch at kinks and ties, where the values "
                                "are simple (0, 1, a slope, 1/2 - t) and infinities must match"),
        "network": Tol(1e-4, 1e-5, "a whole network chains ~10 ops and sums over the batch and "
                                   "28x28 positions: rounding differences compound through the "
                                   "chain rule"),
    },
    "float64": {
        "autodiff": Tol(1e-10, 1e-12, "float64 eps is 1.1e-16: reordered sums differ by "
                                      "~1e-14 relative; 1e-10 leaves a margin of 1e4"),
        "torch_forward": Tol(1e-10, 1e-12, "other kernels, at float64 eps"),
        "torch": Tol(1e-9, 1e-12, "other kernels, same reasoning as float32, at float64 eps"),
        "kink": Tol(1e-10, 1e-12, "simple values at kinks, at float64 eps"),
        "network": Tol(1e-9, 1e-12, "rounding compounds through ~10 ops, at float64 eps"),
    },
    # Central differences f'(x) ~ (f(x+e) - f(x-e)) / 2e with e = 1e-6 in float64: truncation
    # error e^2 |f'''| / 6 ~ 1e-13, rounding error ~ 1e-16 |f| / e ~ 1e-10 |f|.
    "fd": {"float64": Tol(1e-6, 1e-7, "float64, eps 1e-6: truncation eps^2 f'''/6 ~ 1e-13 and "
                                      "rounding 1e-16 |f| / eps ~ 1e-10 |f|")},
}
# The custom path's forward is the very function autodiff runs: bit for bit the same.
EXACT = Tol(0.0, 0.0, "the custom path's forward is the autodiff path's forward")
FD_EPS = 1e-6
FD_ENTRIES = 64


def tolerance(kind: str, dtype="float32") -> Tol:
    """``TOLERANCES[dtype][kind]`` (``kind="fd"`` is always float64)."""
    if kind == "fd":
        return TOLERANCES["fd"]["float64"]
    return TOLERANCES[np.dtype(dtype).name][kind]


def fd_skip_reason(config: Mapping) -> str | None:
    """Why central differences say nothing about this configuration (None: they do)."""
    if config.get("zeros"):
        return "exact zeros: relu/leaky_relu kink, no derivative to estimate"
    if config.get("ties"):
        return "tied maxima: max_pool2d kink, the derivative is a convention"
    if config.get("kinks"):
        return "inputs exactly at a kink (hardtanh's bounds, softplus's threshold, huber's delta)"
    if config.get("scale", 1) > 100:
        return "logits of 1e4: a difference of 1e-6 is below their float64 resolution"
    return None


class LeafError(NamedTuple):
    """One leaf's ``max|actual - ref|`` and ``max|ref|`` (inf/nan when shapes differ)."""

    abs: float
    scale: float


def _leaves(tree):
    import jax  # jax.tree: numpy-only callers pass plain arrays as well
    return jax.tree.leaves(tree)


def leaf_errors(actual, expected) -> list[LeafError]:
    """Per matching leaf of two pytrees: max abs error and the reference's max magnitude."""
    rows = []
    for a, e in zip(_leaves(actual), _leaves(expected)):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if a.shape != e.shape:
            rows.append(LeafError(float("inf"), float("nan")))
            continue
        err = float(np.max(np.abs(a - e))) if e.size else 0.0
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        rows.append(LeafError(err if np.isfinite(err) else float("inf"), scale))
    return rows


def worst(rows, tol: Tol) -> tuple[float, float]:
    """``(max abs error, max relative error)`` over leaf rows, relative as ``tol`` measures."""
    return (max((r.abs for r in rows), default=0.0),
            max((tol.relative(r.abs, r.scale) for r in rows), default=0.0))


def max_errors(a, b) -> tuple[float, float]:
    """Max absolute and max relative error over matching leaves (relative to max |b|)."""
    return worst(leaf_errors(a, b), Tol(1.0, 1e-30))


def elementwise_errors(actual, expected, tol: Tol) -> tuple[float, float]:
    """``(max |a - e|, max |a - e| / (|e| + floor))`` entry by entry (finite differences)."""
    diff = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
    if not diff.size:
        return 0.0, 0.0
    rel = diff / (np.abs(np.asarray(expected, np.float64)) + tol.floor)
    return float(np.max(diff)), float(np.max(rel))


def _split_nonfinite(a, e, what):
    """The finite entries of ``a`` and ``e``, after checking their infinities and nans match."""
    finite = np.isfinite(e)
    np.testing.assert_array_equal(a[~finite], e[~finite], err_msg=what)
    return a[finite], e[finite]


def assert_close(actual, expected, tol, atol=None, what: str = "", *,
                 nonfinite: str = "fail", elementwise: bool = False):
    """Assert ``max|a - e| <= atol + rtol * max|e|`` for every leaf of two pytrees.

    ``tol`` is a :class:`Tol` (``assert_close(a, e, tolerance("torch"), what="...")``) or an
    ``rtol`` with ``atol`` beside it. ``nonfinite="match"``: infinities and nans must sit in the
    same places and the finite rest is compared. ``elementwise``: ``max|e|`` becomes ``|e_i|``.
    """
    tol = tol if isinstance(tol, Tol) else Tol(tol, atol)
    for i, (a, e) in enumerate(zip(_leaves(actual), _leaves(expected))):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        label = f"{what} leaf {i}"
        assert a.shape == e.shape, f"{label}: shape {a.shape} != {e.shape}"
        if nonfinite == "match":
            a, e = _split_nonfinite(a, e, label)
        if elementwise:
            np.testing.assert_allclose(a, e, rtol=tol.rtol, atol=tol.atol, err_msg=label)
            continue
        (row,) = leaf_errors([a], [e])
        assert tol.accepts(row.abs, row.scale), (
            f"{label}: max abs error {row.abs:.3g} > {tol.atol} + {tol.rtol} * {row.scale:.3g}")
