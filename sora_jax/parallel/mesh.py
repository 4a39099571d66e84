"""The device mesh from config (axes data, fsdp, tensor, seq) and the multi-process start."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sora_jax.parallel.sharding import MESH_AXES


class MeshError(ValueError):
    """The requested mesh does not fit the devices."""


def resolve_mesh_shape(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills one ``-1`` entry with what the others leave; checks the product equals ``num_devices``."""
    sizes = list(sizes)
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fills:
        if num_devices % known:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[fills[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {num_devices}"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor, seq) in Auto mode, over ``devices`` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape([mesh_cfg[a] for a in MESH_AXES], len(devices))
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def initialize_distributed(
    num_processes: int | None = None, process_id: int | None = None, coordinator_address: str | None = None
) -> None:
    """Starts ``jax.distributed`` when more than one process is asked for (flags, then environment).

    Environment fallbacks: ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_COORDINATOR_ADDRESS``; on TPU pods and
    SLURM, ``jax.distributed.initialize()`` discovers everything itself (``SORA_JAX_AUTO_DISTRIBUTED=1``).
    """
    env = os.environ
    num_processes = num_processes or (int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None)
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes and num_processes > 1:
        if process_id is None or not coordinator_address:
            raise MeshError(
                "a multi-process run needs --process_id and --coordinator_address (or JAX_* variables)"
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    elif env.get("SORA_JAX_AUTO_DISTRIBUTED") == "1":
        jax.distributed.initialize()
