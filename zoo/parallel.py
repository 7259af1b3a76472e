"""Data parallelism: sharded `jax.jit` over a device mesh (main path) and `pmap` (equivalent).

Both compile the same `zoo.training.train_step`:

- jit: the batch is one global array split on the mesh axis 'data' and the state is replicated;
  XLA inserts the gradient all-reduce, and BatchNorm statistics are global-batch statistics by
  construction (the model sees the whole batch as one array).
- pmap: each local device gets its slice of the process's batch; the step `psum`s gradients and
  metric sums over the named axis 'batch', and models built with `axis_name='batch'` average
  their BatchNorm statistics across devices. Both paths compute the same update.

Multi-host: every process runs the same program on its own share of the data;
`jax.make_array_from_process_local_data` assembles the global batch, and a replicated state is
one global array per leaf. Checkpoints always hold that canonical replicated form, so a run can
be resumed on another device count or with the other parallel path.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
PMAP_AXIS = "batch"


# ---------------------------------------------------------------- multi-host set-up

def _launcher_env() -> str | None:
    """The cluster launcher this process runs under, if JAX can read its settings."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        return "JAX_COORDINATOR_ADDRESS"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU"
    return None


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Starts `jax.distributed` for a multi-process run; returns whether it did.

    Explicit arguments (train.py's `--coordinator --num-processes --process-id`) win. Otherwise
    a multi-process launcher is detected from its environment (SLURM with several tasks, Open
    MPI's mpirun, Cloud TPU pods, or JAX_COORDINATOR_ADDRESS) and JAX reads the rest from it. A
    plain single-process run does nothing. Must run before anything touches the devices.

    Raises:
      ValueError: incomplete or inconsistent explicit arguments.
    """
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("multi-host runs need all of --coordinator HOST:PORT, "
                             "--num-processes N and --process-id I")
        if ":" not in coordinator:
            raise ValueError(f"--coordinator {coordinator!r} must be HOST:PORT")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
        return True
    if _launcher_env() is not None:
        jax.distributed.initialize()
        return True
    return False


def is_lead() -> bool:
    """Process 0 writes logs, metrics and exported models; every process saves checkpoints."""
    return jax.process_index() == 0


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective where processes > 1)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


# ---------------------------------------------------------------- mesh, shardings, placement

def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices, axis 'data'."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-split) shardings of a mesh."""
    return NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Assembles each process's local numpy batch into one global array per key."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def replicated(tree: Any, sharding: NamedSharding) -> Any:
    """A pytree (numpy or single-device arrays, equal on every process) as global replicated
    arrays on `sharding`'s mesh."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x)), tree)


def check_batch_size(global_batch_size: int, num_devices: int | None = None) -> None:
    """Raises ValueError unless the global batch splits evenly over the devices."""
    n = jax.device_count() if num_devices is None else num_devices
    if global_batch_size < 1 or global_batch_size % n:
        raise ValueError(f"batch size {global_batch_size} is not divisible by the {n} devices "
                         f"(use a multiple of {n})")


# ---------------------------------------------------------------- compiled steps

# XLA:CPU hands convolutions to YNNPACK fusions by default, which keep about one of the cores
# busy on these models; with those fusions off, XLA's own (Eigen) convolutions run on every
# core. The README's Benchmarks section has the measurements; the arithmetic is the same up to
# float rounding order.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_options_accepted() -> bool:
    """Whether this jaxlib knows the CPU options (older ones have no YNNPACK and reject them)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
            np.float32(0)).compile()
    except jax.errors.JaxRuntimeError:  # "No such compile option" / "not a valid enum value"
        return False
    return True


# mallopt's parameters (glibc's malloc.h): the size above which freed memory at the heap's top
# goes back to the kernel, and the most chunks served by mmap; `keep_host_memory`'s settings of
# them: no mmap'd chunks, no trimming.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEPT_MALLOC = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def keep_host_memory() -> bool:
    """Sets this process up so that XLA:CPU's runs reuse their memory instead of faulting it in
    from the kernel again at every step; call it before the first JAX computation (`train.py`,
    `evaluate.py` and `python -m zoo` do). Returns whether glibc's malloc was tuned.

    XLA:CPU allocates a run's temporaries as one block. glibc's malloc maps a block above 32 MiB
    afresh and unmaps it when freed, and a worker thread's arena does so for any block it
    cannot hold, so every train step whose activations outgrow that paid a page fault per 4 KiB
    of them. Here CPU executions run on the calling thread (JAX's CPU async dispatch off: the
    dispatch mode is fixed when JAX makes its CPU client), whose allocations come from the main
    arena, and that arena neither maps chunks of its own nor trims freed memory: the process
    keeps its peak host memory for reuse. Other backends' executions are not affected."""
    import ctypes
    import platform

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return all(mallopt(option, value) for option, value in KEPT_MALLOC)


def compiler_options(devices=None) -> dict | None:
    """The XLA options every program the zoo compiles for `devices` (default: all) gets:
    `CPU_COMPILER_OPTIONS` on CPU, none elsewhere, and none where XLA_FLAGS already sets
    the YNNPACK fusions (an explicit choice wins). Pass it to your own `jax.jit` as
    `compiler_options=` to get the same speed."""
    devices = jax.devices() if devices is None else list(devices)
    if (jax.default_backend() != "cpu" or any(d.platform != "cpu" for d in devices)
            or "ynn_fusion_type" in os.environ.get("XLA_FLAGS", "")):
        return None
    return dict(CPU_COMPILER_OPTIONS) if _cpu_options_accepted() else None


def jit(fun: Callable, devices=None, **kwargs) -> Callable:
    """`jax.jit(fun, **kwargs)` with the `compiler_options` of `devices` (default: all): how
    every program of the zoo is compiled."""
    return jax.jit(fun, compiler_options=compiler_options(devices), **kwargs)


def jit_step(step_fn: Callable, mesh: Mesh, donate: bool = True) -> Callable:
    """`step_fn(state, batch)` compiled with the state replicated, the batch split on 'data'
    and the incoming state's buffers donated (updated in place; `bench --no-donate` turns
    that off to measure what it saves), compiled by `jit` for the mesh's devices."""
    rep, split = shardings(mesh)
    return jit(step_fn, mesh.devices.flat, in_shardings=(rep, split), out_shardings=(rep, rep),
               donate_argnums=(0,) if donate else ())


def pmap_step(step_fn: Callable) -> Callable:
    """`step_fn(state, batch, axis_name='batch')` mapped over this process's devices, the
    incoming state donated. `jax.pmap` takes no compiler options: this path compiles with
    XLA's defaults (set XLA_FLAGS for the CPU ones)."""
    return jax.pmap(functools.partial(step_fn, axis_name=PMAP_AXIS), axis_name=PMAP_AXIS,
                    donate_argnums=(0,))


def replicate(tree: Any) -> Any:
    """A copy of `tree` on each local device (leading device axis), the pmap path's state."""
    n = jax.local_device_count()
    sharding = NamedSharding(_local_mesh(), P(PMAP_AXIS))
    return jax.tree.map(lambda x: jax.device_put(
        np.broadcast_to(np.asarray(x), (n, *np.shape(x))), sharding), tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated (pmap) pytree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch: dict) -> dict:
    """(B, ...) -> (devices, B / devices, ...) on this process's devices."""
    n = jax.local_device_count()
    sharding = NamedSharding(_local_mesh(), P(PMAP_AXIS))
    return {k: jax.device_put(np.reshape(v, (n, -1, *np.shape(v)[1:])), sharding)
            for k, v in batch.items()}


def _local_mesh() -> Mesh:
    return Mesh(np.asarray(jax.local_devices()), (PMAP_AXIS,))


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """One train step compiled for a parallel path, with the layout conversions around it, so
    that the loop is the same for both paths.

    step(state, batch) -> (state, metrics) on `place`d batches and a `prepare`d state;
    canonical(state): the replicated form checkpoints and evaluation use; local(tree): one
    device's copy of what the step returns (its metrics, its step counter).
    """

    step: Callable
    place: Callable
    prepare: Callable
    canonical: Callable
    local: Callable


def compile_step(step_fn: Callable, mesh: Mesh, path: str = "jit") -> CompiledStep:
    """`step_fn` compiled with sharded `jax.jit` over `mesh` ('jit') or with `pmap` ('pmap')."""
    rep, split = shardings(mesh)
    if path == "pmap":
        return CompiledStep(
            step=pmap_step(step_fn), place=split_for_pmap,
            prepare=lambda s: replicate(jax.device_get(s)),
            canonical=lambda s: replicated(jax.device_get(unreplicate(s)), rep),
            local=unreplicate)
    if path != "jit":
        raise ValueError(f"unknown parallel mode {path!r}; use jit or pmap")
    same = lambda tree: tree
    return CompiledStep(step=jit_step(step_fn, mesh),
                        place=functools.partial(global_batch, sharding=split),
                        prepare=same, canonical=same, local=same)


def prefetch(batches: Iterable, place: Callable, size: int = 2) -> Iterator:
    """Places batches `size` steps ahead, so host input and transfers overlap the step."""
    queue = collections.deque()
    for b in batches:
        queue.append(place(b))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
