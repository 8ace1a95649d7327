"""What machine a figure was measured on, for every JSON the tools write. Standard library only
(the PyTorch twins import it too without paying for jax).

The CPU matters beyond speed: XLA:CPU compiles for the host's instruction set, and the vector
width and fused multiply-adds it picks change the order and rounding of float32 sums, so a run
of thousands of steps ends at a different accuracy on another CPU (``mytorch_net --seed 0``:
92.50% and 92.28% on two machines that both call themselves "Intel(R) Xeon(R) Processor @
2.50GHz", 92.10% on an AMD EPYC; docs/RESULTS.md). The model name alone does not tell such
machines apart, so the vector-ISA flags are recorded beside it.
"""
from __future__ import annotations

import os
import platform
import subprocess


def _from_cpuinfo(path="/proc/cpuinfo") -> str | None:
    """Linux: the first ``model name`` (x86) or ``Hardware`` / ``Processor`` (some ARM) line."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for key in ("model name", "hardware", "processor"):
        for line in lines:
            name, sep, value = line.partition(":")
            # x86's "processor : 0" is an index, not a name
            if sep and name.strip().lower() == key and value.strip() and \
                    not value.strip().isdigit():
                return value.strip()
    return None


VECTOR_FLAGS = ("sse4", "avx", "fma", "amx", "asimd", "sve", "neon")  # prefixes that change codegen


def cpu_flags(path="/proc/cpuinfo") -> list[str]:
    """Linux: the first CPU's vector-ISA flags (``avx2``, ``avx512f``, ``fma``, ``asimd`` ...),
    sorted; empty where ``path`` cannot be read."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in ("flags", "features"):  # x86, ARM
            return sorted(f for f in set(value.split()) if f.startswith(VECTOR_FLAGS))
    return []


def _from_sysctl() -> str | None:
    """macOS: ``machdep.cpu.brand_string`` (``Apple M2``, ``Intel(R) Core(TM) i7-...``)."""
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_model() -> str:
    """The CPU's marketing name, e.g. ``Intel(R) Xeon(R) Processor @ 2.50GHz``; on systems that
    do not say, :func:`platform.processor` or, last, the architecture (``x86_64``)."""
    if platform.system() == "Linux":
        found = _from_cpuinfo()
    elif platform.system() == "Darwin":
        found = _from_sysctl()
    else:
        found = None
    return found or platform.processor() or platform.machine() or "unknown"


def machine() -> dict:
    """``cpu_model``, ``cpu_flags``, ``cpu_count`` and the Python version: the fields every JSON
    records."""
    return {"cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}
