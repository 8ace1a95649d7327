"""Statistical checks the random-order and generator tests share."""
import math
from collections import Counter

import numpy as np

Z_0999 = 3.09  # the standard normal's 0.999 quantile


def chi_square_quantile(dof: int, z: float = Z_0999) -> float:
    """Chi-square(dof)'s quantile at the normal quantile ``z`` (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_uniform_counts(counts, cells: int) -> None:
    """Pearson's test that ``counts`` (of ``cells`` equally likely outcomes, missing ones
    counting zero) are uniform, at the 0.999 level: with fixed keys it never flakes, and a
    skewed generator lands far above."""
    counts = np.asarray(list(counts), float)
    expected = counts.sum() / cells
    statistic = ((counts - expected) ** 2 / expected).sum() + (cells - len(counts)) * expected
    assert statistic < chi_square_quantile(cells - 1), (statistic, cells - 1)


def assert_uniform_orders(orders: np.ndarray) -> None:
    """Each row a permutation of ``0 .. n-1``, and each of the ``n!`` orders equally often."""
    n = orders.shape[1]
    assert (np.sort(orders, axis=1) == np.arange(n)).all()
    assert_uniform_counts(Counter(map(tuple, orders.tolist())).values(), math.factorial(n))
