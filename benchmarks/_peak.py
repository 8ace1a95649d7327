"""The machine's measured matmul peak: what one ``n x n`` float32 matrix product achieves in
JAX (jitted) and in PyTorch, in GFLOP/s (``2 n^3`` FLOPs, median of a few calls after a warm-up
call). A training step's GFLOP/s divided by it says how much of what the cores can do on dense
float32 work the step uses; the tables state it beside the CPU model, since both change from
machine to machine.
"""
from __future__ import annotations

import statistics
import time

import jax
from jax import numpy as jnp

from experiments._machine import machine


def _median_gflops(matmul, n: int, repeats: int) -> float:
    """GFLOP/s of ``matmul()`` (a blocking ``n x n`` product), median over ``repeats`` calls."""
    matmul()  # compile / warm the thread pool
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul()
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds) / 1e9


def jax_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32)
    product = jax.jit(jnp.matmul)
    return _median_gflops(lambda: product(a, b).block_until_ready(), n, repeats)


def torch_matmul_gflops(torch, n: int = 2048, repeats: int = 5) -> float:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, n, n, generator=generator, dtype=torch.float32)
    return _median_gflops(lambda: torch.mm(a, b), n, repeats)  # CPU: returns when done


def matmul_peak(torch=None, n: int = 2048, repeats: int = 5) -> dict:
    """``{"n", "repeats", "jax_gflop_s", "torch_gflop_s", "peak_gflop_s"}``; the peak is the
    better of the two (torch's is None without torch)."""
    jax_rate = jax_matmul_gflops(n, repeats)
    torch_rate = None if torch is None else torch_matmul_gflops(torch, n, repeats)
    return {"n": n, "repeats": repeats, "jax_gflop_s": jax_rate, "torch_gflop_s": torch_rate,
            "peak_gflop_s": max(r for r in (jax_rate, torch_rate) if r is not None)}


def peak_text(peak: dict) -> str:
    """``matmul peak 122.8 GFLOP/s (float32 2048x2048 matmul, median of 5: JAX 83.4, ...)``."""
    rates = f"JAX {peak['jax_gflop_s']:.1f}" + (
        "" if peak["torch_gflop_s"] is None else f", torch {peak['torch_gflop_s']:.1f}")
    return (f"matmul peak {peak['peak_gflop_s']:.1f} GFLOP/s (float32 {peak['n']}x{peak['n']} "
            f"matmul, median of {peak['repeats']}: {rates})")


def machine_text(peak: dict) -> str:
    """``Intel(R) Xeon(R) Processor @ 2.50GHz, 2 CPUs; matmul peak 122.8 GFLOP/s (...)``."""
    info = machine()
    return f"{info['cpu_model']}, {info['cpu_count']} CPUs; {peak_text(peak)}"
