"""Which formulation computes an op, chosen by static shape rules or by measuring it here.

An op such as conv2d can compute the same sums several ways (``conv.py``: a banded matrix
product, im2col, XLA's convolution); which is fastest depends on the shape *and* the CPU (static
gates tuned on one Intel Xeon were wrong on an AMD EPYC). The mode comes from
``$FUNCTIONAL_CNN_CONV``, or from the innermost :func:`conv_formulation` context, read when
the op is traced:

* ``"gates"`` (the default): the static shape rules each op states (no measurement), on a
  CPU; elsewhere XLA's convolution, as below.
* ``"auto"``: the first time a shape and dtype is traced, every applicable formulation is
  compiled on random inputs of exactly that shape and dtype -- its forward, input gradient and
  weight gradient in one program, as a training step runs them -- and timed (the best of a few
  repeats, each long enough to exceed a few ms); XLA's own convolution (``"lax"``) is kept
  unless another is faster by :data:`MARGIN`, so the choice is never slower than XLA's
  convolution *as measured*. The result is cached in memory and in a small JSON file
  (:func:`cache_file`), so later traces and later processes reuse it. Measuring uses compiled
  executables called on concrete arrays, so it works while an outer ``jax.jit`` is tracing.
  On a non-CPU backend (GPU, TPU) ``"auto"``, like ``"gates"``, means ``"lax"``: the
  formulations were written for XLA:CPU, and nothing has measured them elsewhere.
* ``"lax"``: XLA's convolution always.

A formulation pinned at the call (``conv2d(..., formulation=...)``, in training
``Conv2d(train_formulation=...)``, in evaluation ``Conv2d(eval_formulation=...)``) overrides
the mode for that call. ``"auto"`` never times
conv2d's ``"taps"``, which runs only where asked for: timed alone its forward wins, inside a
step it can lose twice over (its docstring says where); its gradients follow the mode.

Why ``"gates"`` is the default: a convolution timed alone does not predict the training step
it sits in. XLA fuses each formulation's copies (row blocks, patches, transposes) with the
layers around it, so on an Intel Xeon (2 cores) the measured choices made LeNet's step at
batch 256 take 64-68 ms against the gates' 35 ms, even measured on all three parts together
(first measured part by part, which was worse still: banded's forward and weight gradient
share their row blocks, im2col's their patches). ``"auto"`` stays for experiments on other
machines. A choice made in the context of the whole step is :mod:`functional_cnn.tuning`'s: it
times a network's training step with its convolutions pinned (per layer, in training), and
caches the pins in the same file (:func:`cached`, :func:`remember`), keyed by the network.

A choice only affects speed, never the numbers beyond float rounding: every candidate computes
the same sums, and a cache entry naming a formulation that does not apply to its shape is
ignored. A function already traced keeps its choice (jit caches the trace); the mode is read
when tracing.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import math
import os
import platform
import tempfile
import time
import warnings
from typing import Callable, Mapping

import jax
import numpy as np

MODES = ("auto", "gates", "lax")
MODE_ENV = "FUNCTIONAL_CNN_CONV"
CACHE_DIR_ENV = "FUNCTIONAL_CNN_CACHE_DIR"
CACHE_NAME = "conv_formulations.json"
MARGIN = 0.05  # another formulation replaces XLA's only if at least 5% faster
REPEATS = 5  # the best of these many timings (the others are noise: other processes, caches)
TARGET_SECONDS = 0.003  # each timing runs enough calls to last at least this long
_FORMAT = 1  # the cache file's layout version
# functional_cnn.tuning's entries (pins for a whole training step) share the file; their keys
# start with this, conv2d's per-shape ones with the part's name
STEP_KEY_PREFIX = "training step | "

_MODE_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "functional_cnn_conv_formulation", default=None)
_MEMORY: dict[str, dict] = {}  # cache file path -> its entries by machine, as last read/written


def _check_mode(mode, where: str) -> str:
    if mode not in MODES:
        raise ValueError(f"{where}: the convolution formulation mode must be one of {MODES}, "
                         f"got {mode!r}")
    return mode


def mode() -> str:
    """The mode in force: the innermost :func:`conv_formulation`, else ``$FUNCTIONAL_CNN_CONV``,
    else ``"gates"``. An unknown value raises ``ValueError`` rather than quietly picking one."""
    override = _MODE_OVERRIDE.get()
    if override is not None:
        return override
    return _check_mode(os.environ.get(MODE_ENV, "gates"), f"${MODE_ENV}")


@contextlib.contextmanager
def conv_formulation(mode: str):
    """``with conv_formulation("lax"): ...``: the mode for convolutions traced inside (over
    ``$FUNCTIONAL_CNN_CONV``); one of ``"auto"``, ``"gates"``, ``"lax"``."""
    token = _MODE_OVERRIDE.set(_check_mode(mode, "conv_formulation"))
    try:
        yield
    finally:
        _MODE_OVERRIDE.reset(token)


# ------------------------------------------------------------------------ the machine's name

def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU's name: Linux's first ``model name`` line (x86), else :func:`platform.processor`,
    else the architecture. (``experiments/_machine.py`` has a fuller one for reports; the
    library cannot import experiments.)"""
    try:
        with open(path) as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip().lower() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _isa_digest(path: str = "/proc/cpuinfo") -> str:
    """8 hex digits of the first CPU's vector-ISA flags: two CPUs with one model name can differ
    in them (and XLA:CPU compiles for what the host has), so they are in the key too."""
    flags = ""
    try:
        with open(path) as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip().lower() in ("flags", "features"):
                    flags = " ".join(sorted(v for v in value.split()
                                            if v.startswith(("sse", "avx", "fma", "amx", "asimd",
                                                             "sve", "neon"))))
                    break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def usable_cores() -> int:
    """Cores this process may use: XLA:CPU splits a convolution over them, so the fastest
    formulation on 2 cores need not be the fastest on 16 (and experiments/time_to_accuracy
    makes at most one host device per core)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _cpu() -> str:
    return f"{cpu_model()} | isa {_isa_digest()}"  # read once: it does not change


# The formulations' own version: bump it when one of them changes how it computes (the band's
# column tiles: 2; tiles at every size, row blocks cut tile-first: 3; im2col's input gradient
# by XLA's convolution: 4), so that choices measured on the old code are measured again.
FORMULATIONS_VERSION = 4


def machine_key() -> str:
    """What a measurement holds for: CPU model, ISA flags, cores, jax version, backend and
    :data:`FORMULATIONS_VERSION`."""
    return (f"{_cpu()} | {usable_cores()} cores | jax {jax.__version__} | "
            f"{jax.default_backend()} | formulations {FORMULATIONS_VERSION}")


# --------------------------------------------------------------------------------- the cache

def cache_file() -> str:
    """``$FUNCTIONAL_CNN_CACHE_DIR/conv_formulations.json``, by default under
    ``~/.cache/functional_cnn`` (``$XDG_CACHE_HOME`` where set)."""
    root = os.environ.get(CACHE_DIR_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "functional_cnn")
    return os.path.join(root, CACHE_NAME)


def _read(path: str, warn: bool = True) -> dict:
    """The file's entries by machine; ``{}`` (with a warning) if it is unreadable or not ours.
    A bad cache costs a re-measurement, never an error or a wrong number."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        problem = f"unreadable cache {path} ({e})"
    else:
        if (isinstance(data, dict) and data.get("format") == _FORMAT
                and isinstance(data.get("machines"), dict)
                and all(isinstance(v, dict) for v in data["machines"].values())):
            return data["machines"]
        problem = f"cache {path} (not a format-{_FORMAT} cache)"
    if warn:
        warnings.warn(f"conv formulations: ignoring {problem}", stacklevel=4)
    return {}


def _entries(path: str) -> dict:
    if path not in _MEMORY:
        _MEMORY[path] = _read(path)
    return _MEMORY[path]


def _write(path: str, machine: str, key: str, entry: dict) -> None:
    """Merge one entry into the file (re-read first: another process may have added some) and
    replace it atomically (a temp file in the same folder, then ``os.replace``), so a reader
    never sees half a file. A failure to write is a warning: the entry stays in memory."""
    machines = _read(path, warn=False)  # a bad file was reported when first read
    for name, found in _MEMORY.get(path, {}).items():
        machines.setdefault(name, {}).update(found)
    machines.setdefault(machine, {})[key] = entry
    _MEMORY[path] = machines
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".conv_formulations.")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": _FORMAT, "machines": machines}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"conv formulations: cannot write the cache {path} ({e}); the choices "
                      f"stay in memory for this process", stacklevel=3)


def cached(key: str):
    """This machine's cache entry under ``key`` (from the file or memory), or None."""
    return _entries(cache_file()).get(machine_key(), {}).get(key)


def remember(key: str, entry: dict) -> None:
    """Store ``entry`` under ``key`` for this machine, in memory and in the file."""
    _write(cache_file(), machine_key(), key, entry)


def conv_formulations(all_machines: bool = False) -> dict:
    """conv2d's per-shape choices known so far (file and memory): ``{key: {"choice",
    "seconds"}}`` for this machine (:func:`machine_key`), or ``{machine: {key: entry}}`` with
    ``all_machines``. ``seconds`` holds each candidate's measured time per call. (The pins
    :mod:`functional_cnn.tuning` measured for whole training steps are left out.)"""
    machines = {machine: {key: entry for key, entry in entries.items()
                          if not key.startswith(STEP_KEY_PREFIX)}
                for machine, entries in _entries(cache_file()).items()}
    if all_machines:
        return json.loads(json.dumps(machines))
    return json.loads(json.dumps(machines.get(machine_key(), {})))


# ---------------------------------------------------------------------------- measuring

def _device_arrays(specs, seed: int = 0):
    """Random normal inputs of exactly these shapes and dtypes, on the device. Made by a
    compiled executable from numpy: under an outer trace ``jax.device_put`` would stage out a
    tracer, while an executable called on concrete arrays runs."""
    rng = np.random.default_rng(seed)
    host = tuple(rng.standard_normal(s.shape).astype(s.dtype) for s in specs)
    return jax.jit(lambda *a: a).lower(*host).compile()(*host)


def _seconds_per_call(executable, inputs) -> float:
    """The best of :data:`REPEATS` timings, each of enough calls to last :data:`TARGET_SECONDS`
    (every call waited for: the time is the computation's, not its dispatch's)."""
    jax.block_until_ready(executable(*inputs))  # warm-up: first-call allocations
    start = time.perf_counter()
    jax.block_until_ready(executable(*inputs))
    calls = max(1, math.ceil(TARGET_SECONDS / max(time.perf_counter() - start, 1e-7)))
    best = math.inf
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(executable(*inputs))
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def measure(candidates: Mapping[str, Callable], specs) -> dict[str, float]:
    """Seconds per call of each candidate, compiled for and run on inputs of ``specs``
    (``jax.ShapeDtypeStruct``-likes)."""
    inputs, seconds = _device_arrays(specs), {}
    for name, fn in candidates.items():
        try:
            seconds[name] = _seconds_per_call(jax.jit(fn).lower(*inputs).compile(), inputs)
        except Exception as e:  # noqa: BLE001 -- a candidate that fails is not chosen
            warnings.warn(f"conv formulations: {name!r} failed to run ({e!r}); not a candidate",
                          stacklevel=3)
    return seconds


def fastest(seconds: Mapping[str, float], default: str = "lax") -> str:
    """``default`` unless another is faster by :data:`MARGIN` (measurements are noisy, and XLA's
    own convolution is the one to keep when in doubt); then the fastest."""
    if not seconds:
        return default
    best = min(seconds, key=seconds.get)
    if default in seconds and seconds[best] >= (1 - MARGIN) * seconds[default]:
        return default
    return best


def choose(mode: str, key: str, candidates: Mapping[str, Callable], specs, gate: str) -> str:
    """The formulation (a name in ``candidates``, or ``"lax"``) that computes one part.

    ``candidates`` maps each formulation that applies to this shape to a function of arrays
    shaped as ``specs``; ``gate`` is what the static rules pick (mode ``"gates"``); ``key``
    names the part, shape, configuration and dtype (:func:`machine_key` is added here). Only
    mode ``"auto"`` on a CPU measures, and only for keys not yet in the cache and shapes with
    something to compute.
    """
    if jax.default_backend() != "cpu":
        return "lax"
    if mode == "gates":
        return gate
    if (mode == "lax" or set(candidates) <= {"lax"}
            or any(math.prod(s.shape) == 0 for s in specs)):
        return "lax"
    entry = cached(key)
    if isinstance(entry, dict) and entry.get("choice") in candidates:
        return entry["choice"]
    seconds = measure(candidates, specs)
    choice = fastest(seconds)
    if seconds:
        remember(key, {"choice": choice, "seconds": seconds})
    return choice


def forget() -> None:
    """Drop the in-memory copy of every cache file (the next lookup reads the file again)."""
    _MEMORY.clear()
