"""The device mesh from config (axes data, fsdp, tensor, seq) and the multi-process start."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sora_jax.errors import UserError
from sora_jax.parallel.sharding import MESH_AXES


class MeshError(UserError):
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


def dcn_shape(mesh_cfg) -> tuple[int, ...]:
    """``mesh.dcn.{data,fsdp,tensor,seq}``: how much of each axis goes across slices (1s when absent)."""
    dcn = mesh_cfg.get("dcn") if hasattr(mesh_cfg, "get") else None
    return tuple(int(dcn.get(a, 1)) if dcn else 1 for a in MESH_AXES)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor, seq) in Auto mode, over ``devices`` (default: all).

    ``mesh_cfg.{data,fsdp,tensor,seq}`` are the axis sizes (one may be -1). Multi-slice jobs (TPU slices over
    the data-center network, or GPU hosts over Ethernet/IB) also give ``mesh_cfg.dcn.<axis>``: the factor of
    that axis that spans slices; the rest stays inside a slice (ICI/NVLink). Usually only ``dcn.data`` (pure
    data parallelism across slices) or ``dcn.fsdp`` (HSDP) is > 1. Slices are ``device.slice_index`` on TPU;
    elsewhere each process is one slice, which is how tests run it on CPU processes.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape([mesh_cfg[a] for a in MESH_AXES], len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    dcn = dcn_shape(mesh_cfg)
    if math.prod(dcn) > 1:
        if any(s % d for s, d in zip(shape, dcn)):
            raise MeshError(
                f"mesh.dcn {dict(zip(MESH_AXES, dcn))} must divide the axes {dict(zip(MESH_AXES, shape))}"
            )
        ici = tuple(s // d for s, d in zip(shape, dcn))
        from jax.experimental import mesh_utils

        granule_is_process = not hasattr(devices[0], "slice_index") or devices[0].platform == "cpu"
        try:
            grid = mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, process_is_granule=granule_is_process, allow_split_physical_axes=True
            )
        except (ValueError, AssertionError) as e:
            raise MeshError(
                f"mesh ici {ici} x dcn {dcn} does not fit the slices of these devices: {e}"
            ) from e
        return Mesh(grid, MESH_AXES, axis_types=auto)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _auto_cluster() -> str | None:
    """The cluster ``jax.distributed.initialize()`` can discover by itself, if this process runs in one."""
    env = os.environ
    if env.get("SORA_JAX_AUTO_DISTRIBUTED") == "1":
        return "requested"
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # inside `srun` with several tasks
        return "slurm"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu-multislice"
    if "OMPI_COMM_WORLD_SIZE" in env and int(env["OMPI_COMM_WORLD_SIZE"]) > 1:
        return "mpi"
    return None


def initialize_distributed(
    num_processes: int | None = None, process_id: int | None = None, coordinator_address: str | None = None
) -> None:
    """Starts ``jax.distributed`` when more than one process is asked for (flags, then environment).

    Order: explicit flags; then ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` / ``JAX_COORDINATOR_ADDRESS``; then
    clusters that ``jax.distributed.initialize()`` discovers by itself: a multi-task SLURM step
    (``SLURM_NTASKS`` > 1), a multi-host TPU VM (``TPU_WORKER_HOSTNAMES``, multislice ``MEGASCALE_*``), Open
    MPI; ``SORA_JAX_AUTO_DISTRIBUTED=1`` forces that discovery. A single process starts nothing.
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
    elif _auto_cluster() is not None:
        jax.distributed.initialize()
