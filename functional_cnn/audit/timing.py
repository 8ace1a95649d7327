"""The timing loop every benchmark tool shares: alternating rounds in one process, so that a
burst of load from another process hits every implementation alike."""
from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np


def race(runners: dict, rounds: int, target_s: float = 0.15) -> dict:
    """Median and min/max ms per call over alternating rounds of ``runners``.

    Each runner is ``run(n)``: make ``n`` calls and wait for them. After a warm-up, each gets
    as many calls per round as fill about ``target_s``; the order alternates every round.
    """
    reps = {}
    for name, run in runners.items():
        run(2)
        start = time.perf_counter()
        run(3)
        reps[name] = max(1, int(target_s / max((time.perf_counter() - start) / 3, 1e-7)))
    names = list(runners)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            runners[name](reps[name])
            times[name].append(1e3 * (time.perf_counter() - start) / reps[name])
    return {name: {"median_ms": float(np.median(t)), "min_ms": float(np.min(t)),
                   "max_ms": float(np.max(t))} for name, t in times.items()}


def calls(fn: Callable, *args) -> Callable:
    """A runner for :func:`race`: ``n`` calls of the (jitted) ``fn(*args)``."""
    def run(n):
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
    return run
