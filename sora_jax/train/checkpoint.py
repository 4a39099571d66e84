"""Orbax checkpoints of a workdir: train state, data-iterator state and the config, saved async, kept N.

Layout: ``<workdir>/checkpoints/<step>/{state,data_iter,config}``. Orbax writes each step into a temporary
folder and renames it when complete, so a crash mid-save never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required."""


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def manager(workdir: str | Path, *, keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def latest_step(workdir: str | Path) -> int | None:
    if not checkpoint_dir(workdir).is_dir():
        return None
    with manager(workdir, read_only=True) as mgr:
        return mgr.latest_step()


def save(
    mgr: ocp.CheckpointManager,
    step: int,
    state: Any,
    config: ml_collections.ConfigDict,
    data_iter: Any | None = None,
    *,
    force: bool = False,
) -> None:
    """Starts an async save of ``state`` (+ the grain iterator, + the config as JSON) at ``step``."""
    items = {
        "state": ocp.args.StandardSave(state),
        "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    }
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    mgr.save(step, args=ocp.args.Composite(**items), force=force)


def restore(
    mgr: ocp.CheckpointManager,
    abstract_state: Any,
    *,
    step: int | None = None,
    data_iter: Any | None = None,
) -> tuple[int, Any]:
    """Restores the latest (or given) step onto the shardings carried by ``abstract_state``."""
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"no checkpoint in {mgr.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        restored = mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # truncated or foreign files: one line for the user, details chained
        raise CheckpointError(
            f"checkpoint {mgr.directory}/{step} cannot be read: {type(e).__name__}: {e}"
        ) from e
    return step, restored["state"]


def restore_config(workdir: str | Path, step: int | None = None) -> tuple[int, ml_collections.ConfigDict]:
    """The config a checkpoint was made with (for sampling/eval from a workdir alone)."""
    if not checkpoint_dir(workdir).is_dir():
        raise CheckpointError(
            f"no checkpoints in {workdir} (train first: sora-jax train --workdir {workdir})"
        )
    with manager(workdir, read_only=True) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(
                f"no checkpoints in {workdir} (train first: sora-jax train --workdir {workdir})"
            )
        try:
            cfg = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {workdir}/checkpoints/{step} has no readable config: {e}"
            ) from e
    return step, ml_collections.ConfigDict(cfg)


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with the shardings of ``state`` (concrete or abstract)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state
    )
