"""Data-parallel training with JAX's own sharding and multi-host runtime (no home-made engine).

The network code does not change. A 1-D :class:`jax.sharding.Mesh` with one axis, ``"batch"``,
spans the devices; parameters, model state (BatchNorm running statistics), optimizer state, the
PRNG key and the uint8 data set are *replicated* over it (``P()``), and inside the jitted step
each training batch is constrained to be *sharded* along its first dimension (``P("batch")``).
The network still computes on the **global** batch; XLA's SPMD partitioner splits that
computation over the devices and inserts the all-reduces where a value needs the whole batch:
the gradient of the batch-mean loss, and BatchNorm's batch mean and variance. BatchNorm in
data-parallel training therefore normalizes with the statistics of the global batch, exactly as
on one device, and the result does not depend on the number of devices (up to float rounding of
the reductions; ``tests/test_parallel.py`` checks 4 devices against 1). The exception is asked
for by name: with ``make_trainer(sync_batch_norm=False)`` each device runs its shard alone
(:func:`per_device_gradients`), its BatchNorm with its shard's statistics, and the result
depends on the number of devices.

Multi-host: every process runs the same script. :func:`initialize_distributed` calls
:func:`jax.distributed.initialize` only when asked, by flags or by the environment variables
``FUNCTIONAL_CNN_COORDINATOR`` (``host:port`` of process 0), ``FUNCTIONAL_CNN_NUM_PROCESSES`` and
``FUNCTIONAL_CNN_PROCESS_ID``. Each process loads the whole data set and contributes it as its
addressable (replicated) part of the global array (:func:`replicate`); each device then gathers
its own rows of every batch (``tests/test_parallel.py`` runs two processes on localhost against
one). Nothing here runs at import.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax import numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._keys import is_prng_key

AXIS = "batch"
ENV_COORDINATOR = "FUNCTIONAL_CNN_COORDINATOR"
ENV_NUM_PROCESSES = "FUNCTIONAL_CNN_NUM_PROCESSES"
ENV_PROCESS_ID = "FUNCTIONAL_CNN_PROCESS_ID"
FORCE_HINT = ("on a CPU, start python with XLA_FLAGS=--xla_force_host_platform_device_count=N "
              "to get N host devices")


def distributed_config(coordinator=None, num_processes=None, process_id=None, environ=None):
    """The arguments of :func:`jax.distributed.initialize` from flags, else the environment, or
    ``None`` when neither asks for a multi-process run. Raises ``ValueError`` on a partial or
    inconsistent request, naming what is missing."""
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else env.get(ENV_PROCESS_ID)
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"initialize_distributed: a multi-process run needs the coordinator address, the "
            f"number of processes and this process's id; missing {missing}. Pass --coordinator "
            f"HOST:PORT --num-processes N --process-id I, or set ${ENV_COORDINATOR}, "
            f"${ENV_NUM_PROCESSES} and ${ENV_PROCESS_ID}")
    try:
        num_processes, process_id = int(num_processes), int(process_id)
    except ValueError:
        raise ValueError(f"initialize_distributed: expected integer num_processes and process_id, "
                         f"got {num_processes!r}, {process_id!r}") from None
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"initialize_distributed: expected num_processes >= 1 and 0 <= "
                         f"process_id < num_processes, got {num_processes}, {process_id}")
    return {"coordinator_address": coordinator, "num_processes": num_processes,
            "process_id": process_id}


def initialize_distributed(coordinator=None, num_processes=None, process_id=None) -> bool:
    """Join a multi-process (multi-host) run with :func:`jax.distributed.initialize` when flags
    or ``$FUNCTIONAL_CNN_*`` ask for one; do nothing otherwise. Call it before anything touches
    a device. Returns whether it initialized."""
    config = distributed_config(coordinator, num_processes, process_id)
    if config is None:
        return False
    jax.distributed.initialize(**config)
    return True


def make_mesh(devices: int | None = None) -> Mesh:
    """A 1-D mesh (axis ``"batch"``) over ``devices`` devices: all of them when ``None``.

    ``devices`` counts every device of the run (on one host: the local devices). With several
    processes each contributes ``devices / process_count`` of its local devices.
    """
    available = jax.device_count()
    n = available if devices is None else devices
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"make_mesh: expected devices a positive int or None, got {devices!r}")
    if n > available:
        raise ValueError(
            f"make_mesh: asked for {n} devices but this run has {available} "
            f"({jax.default_backend()}: {jax.devices()[:4]}{'...' if available > 4 else ''}); "
            f"pass --devices {available} or fewer, or {FORCE_HINT}")
    procs = jax.process_count()
    if n % procs:
        raise ValueError(f"make_mesh: {n} devices do not split evenly over {procs} processes; "
                         f"pass a multiple of {procs}")
    per = n // procs
    chosen = [d for p in range(procs)
              for d in sorted((d for d in jax.devices() if d.process_index == p),
                              key=lambda d: d.id)[:per]]
    return Mesh(np.array(chosen), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value (``P()``)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Split along the first dimension over the mesh (``P("batch")``)."""
    return NamedSharding(mesh, P(AXIS))


def check_divides(batch_size: int, mesh: Mesh | None, where="make_trainer"):
    """Raise a ``ValueError`` saying what to change when ``batch_size`` does not split evenly."""
    n = 1 if mesh is None else mesh.size
    if batch_size % n:
        divisors = [d for d in range(n, 0, -1) if batch_size % d == 0][:3]
        raise ValueError(
            f"{where}: the global batch size {batch_size} does not divide evenly over {n} "
            f"devices (each device takes an equal slice of every batch). Use fewer devices, "
            f"--devices {' or '.join(map(str, divisors))} (divisors of {batch_size}), or a "
            f"batch size that is a multiple of {n}, e.g. --batch-size "
            f"{-(-batch_size // n) * n} (in code: make_mesh(devices=...), "
            f"make_trainer(batch_size=...))")


def replicate(tree, mesh: Mesh | None):
    """``tree`` with every array replicated over ``mesh`` (a no-op for arrays already there, and
    for ``mesh=None``). With several processes every process must pass the same values: each
    supplies its own addressable copy (:func:`jax.make_array_from_process_local_data`)."""
    if mesh is None:
        return tree
    target = replicated(mesh)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == target:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, target)
        if is_prng_key(x):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        local = np.asarray(x)
        return jax.make_array_from_process_local_data(target, local, local.shape)

    return jax.tree.map(put, tree)


def put(tree, mesh: Mesh | None):
    """Host values (numpy arrays, scalars) on the devices as a trainer's programs return
    theirs: replicated over ``mesh``, or on the default device; one transfer each, and no
    program to compile (``jnp.asarray`` compiles one for each array)."""
    return jax.device_put(tree) if mesh is None else replicate(tree, mesh)


def constrain_batch(mesh: Mesh | None, *arrays):
    """Inside jit: shard ``arrays`` along their first dimension over ``mesh`` when it divides
    evenly, else keep them replicated (every device computes the whole, e.g. ragged last batch).
    Either way the computation is the global batch's, so results do not depend on the mesh."""
    if mesh is None:
        return arrays
    even = arrays[0].shape[0] % mesh.size == 0
    sharding = batch_sharded(mesh) if even else replicated(mesh)
    return tuple(jax.lax.with_sharding_constraint(a, sharding) for a in arrays)


def _summed_as_one_buffer(parts: tuple, divisors: tuple) -> tuple:
    """Inside ``shard_map``: each pytree of ``parts`` summed over the devices, then divided by
    its divisor, by **one** all-reduce of one flat vector (``ravel_pytree``: mixed dtypes are
    summed in their common floating type, more exactly than alone -- bfloat16 gradients beside
    float32 statistics add in float32 -- and cast back after).

    One operand, not a tuple of them: XLA:CPU's all-reduce meets the other devices once per
    operand. On the race network (AMD EPYC of docs/BENCHMARKS.md) the gradients, running
    statistics, loss and count as four operands took 214 us a step once both devices had
    arrived, as one 105 us (the profiler); the step 1.39 and 1.51 against 1.71 and 1.57 ms
    (two runs of 12 and 8 alternating rounds in one process, faster in 12 and 6), the same
    bits. Each part's segment is divided by its scalar, fused into the part's consumers (a
    divisor vector would be a constant the size of the model in the program: with one, the
    step was 1.52 against 1.56 ms)."""
    flat, unravel = ravel_pytree(parts)
    if not jnp.issubdtype(flat.dtype, jnp.floating):
        raise TypeError(f"_summed_as_one_buffer: expected parts with a floating leaf, got a "
                        f"buffer of {flat.dtype} (integers would come back divided as floats)")
    total = jax.lax.psum(flat, AXIS)
    ends = np.cumsum([sum(np.size(leaf) for leaf in jax.tree.leaves(part)) for part in parts])
    starts = np.concatenate([[0], ends[:-1]])
    return unravel(jnp.concatenate([total[a:b] / np.asarray(d, flat.dtype)
                                    for a, b, d in zip(starts, ends, divisors)]))


def per_device_gradients(gradients, mesh: Mesh, reduction: str):
    """``gradients(params, state, x, labels, key) -> (grads, (new_state, loss_sum, correct))``
    run on each device's shard of the batch (``x``, ``labels`` split along their first
    dimension), then combined by **one** all-reduce: the gradients summed (``reduction="sum"``)
    or averaged (``"mean"``: equal shards, so the mean of the shards' mean losses is the
    batch's), the model state (BatchNorm's running statistics) moved by the devices' average
    change, the loss sums and correct counts summed. The change, not the state, is averaged so
    that a leaf no device changes (a :func:`~functional_cnn.combinators.frozen` layer's params)
    comes back bit for bit: ``n`` equal floats summed and divided by ``n`` need not give the
    float back (3, 5 and 6 host devices moved frozen filters by an ulp). ``key`` is folded
    with the device's index, so that dropout draws differ between shards.

    Each device's BatchNorm normalizes with its own shard's statistics, as torch's
    ``DistributedDataParallel`` does without ``SyncBatchNorm`` (whose running statistics are
    rank 0's, broadcast; here they are the devices' average): the result depends on the
    number of devices. What it buys is one collective per step instead of one for every
    BatchNorm statistic forward and backward and every gradient, which XLA:CPU pays for in
    rendezvous between host devices (``make_trainer(sync_batch_norm=False)``)."""
    n = mesh.size

    def local(params, state, x, labels, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        grads, (new_state, loss_sum, correct) = gradients(params, state, x, labels, key)
        change = jax.tree.map(jnp.subtract, new_state, state)
        # the count as a float (exact below 2^24 in float32), to share the one buffer
        count = correct.astype(jnp.promote_types(loss_sum.dtype, jnp.float32))
        grads, change, loss_sum, count = _summed_as_one_buffer(
            (grads, change, loss_sum, count),
            divisors=(n if reduction == "mean" else 1, n, 1, 1))
        new_state = jax.tree.map(jnp.add, state, change)
        return grads, (new_state, loss_sum, count.astype(correct.dtype))

    # check_vma=False: the hand-written rules' cotangents of the (replicated) parameters are
    # per-device values until the all-reduce, which the type check would refuse
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P()),
                         out_specs=P(), check_vma=False)


def is_main_process() -> bool:
    """Process 0 writes files and shows progress; the others compute silently."""
    return jax.process_index() == 0
