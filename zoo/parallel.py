"""Data parallelism: sharded `jax.jit` over a device mesh (main path) and `pmap` (equivalent).

Both compile the same `zoo.training.train_step`. Under jit the batch is one global array split
on the mesh axis 'data' and XLA inserts the gradient all-reduce; BatchNorm statistics are then
global-batch statistics by construction. Under pmap each device sees its slice, gradients are
`lax.pmean`-ed over the named axis 'batch', and models built with `axis_name='batch'` average
their BatchNorm statistics across devices, so both paths compute the same update.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PMAP_AXIS = "batch"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Starts jax.distributed for multi-host runs.

    Explicit arguments win; otherwise JAX's auto-detection covers SLURM, Open MPI and Cloud TPU
    launchers (and JAX_COORDINATOR_ADDRESS). A plain single-process run does nothing.
    """
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
                                       "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")):
        jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices with axis 'data'."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, batch-split) shardings of a mesh."""
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Assembles each process's local numpy batch into one global array per key."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def jit_step(step_fn: Callable, mesh: Mesh, donate: bool = True) -> Callable:
    """`step_fn(state, batch)` compiled with replicated state and a batch split on 'data'."""
    replicated, split = shardings(mesh)
    return jax.jit(step_fn, in_shardings=(replicated, split),
                   out_shardings=(replicated, replicated), donate_argnums=(0,) if donate else ())


def pmap_step(step_fn: Callable, donate: bool = True) -> Callable:
    """`step_fn(state, batch, axis_name=...)` mapped over local devices on axis 'batch'."""
    return jax.pmap(functools.partial(step_fn, axis_name=PMAP_AXIS), axis_name=PMAP_AXIS,
                    donate_argnums=(0,) if donate else ())


def replicate(tree: Any, num_devices: int) -> Any:
    """Stacks a pytree `num_devices` times (leading device axis) for the pmap path."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num_devices, *np.shape(x))),
                        tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a replicated pytree."""
    return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch: dict, num_devices: int) -> dict:
    """(B, ...) -> (devices, B / devices, ...)."""
    return {k: v.reshape(num_devices, -1, *v.shape[1:]) for k, v in batch.items()}
