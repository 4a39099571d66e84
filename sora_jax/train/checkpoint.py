"""Orbax checkpoints of a workdir: train state, data-iterator state and the config, saved async, kept N.

Layout: ``<workdir>/checkpoints/<step>/{state,data_iter,config,datacard}``; ``datacard`` ({"hash", "summary"}
of the training data's card, ``sora_jax.data.datacard``) is absent from checkpoints made before data cards
or from data without one. Orbax writes each step into a temporary folder and renames it when complete, so
a crash mid-save never leaves a checkpoint that looks complete.
Kept: the last ``keep`` plus every ``keep_every``-th step.

Resuming (``restore_latest_good``) checks the newest checkpoint against the state the config builds (a
different model is one line naming the config keys and parameters that differ), and when its files are
unreadable (truncated, deleted, corrupted) moves it to ``<workdir>/checkpoints_corrupt/`` with a one-line
warning and takes the previous one. ``list_checkpoints`` lists a workdir's checkpoints (``sora-jax checkpoints``).

The best checkpoint (evaluation during training, ``config.eval.best_metric``) has the same items in
``<workdir>/checkpoints_best/<step>/`` (one kept) beside ``best.json`` ({"step", "metric", "value",
"higher_is_better"}), written once the save is complete (``save_best``); the readers take ``step="best"``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from sora_jax.errors import UserError

log = logging.getLogger("sora_jax.train")


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was required (one line on the CLI)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint holds a different state (model, optimizer) than the config builds."""


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def manager(
    workdir: str | Path, *, keep: int = 2, keep_every: int = 0, read_only: bool = False
) -> ocp.CheckpointManager:
    """Orbax manager of ``<workdir>/checkpoints``: keeps the last ``keep`` and every ``keep_every``-th step."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every or None, create=not read_only, read_only=read_only
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


BEST = "best"  # the ``step`` that names a workdir's best checkpoint
DATACARD = "datacard"  # the checkpoint item holding the training data card's {"hash", "summary"}
BEST_FILE = "best.json"


def best_dir(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints_best"


def best_manager(workdir: str | Path, *, read_only: bool = False) -> ocp.CheckpointManager:
    """Orbax manager of ``<workdir>/checkpoints_best``: the best step alone (``max_to_keep=1``)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(best_dir(workdir), options=options)


def read_best(workdir: str | Path) -> dict | None:
    """``best.json`` of ``workdir`` ({"step", "metric", "value", "higher_is_better"}), or None."""
    path = best_dir(workdir) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def save_best(
    mgr: ocp.CheckpointManager,
    step: int,
    state: Any,
    config: ml_collections.ConfigDict,
    info: dict,
    data_iter: Any | None = None,
    datacard: dict | None = None,
) -> None:
    """Saves ``state`` at ``step`` through ``best_manager``'s ``mgr`` (the items of ``save``), waits for it,
    then writes ``best.json`` = {"step": step, **info} atomically (process 0): best.json only ever names a
    complete checkpoint. A kept step at or after ``step`` (a run resumed before it) is deleted first."""
    for old in mgr.all_steps():
        if old >= step:
            mgr.delete(old)
    save(mgr, step, state, config, data_iter, force=True, datacard=datacard)
    mgr.wait_until_finished()
    if jax.process_index() == 0:
        path = Path(mgr.directory) / BEST_FILE
        tmp = path.with_name(BEST_FILE + ".tmp")
        tmp.write_text(json.dumps({"step": step, **info}))
        os.replace(tmp, path)


@contextlib.contextmanager
def _reader(workdir: str | Path, step: int | str | None) -> Iterator[tuple[ocp.CheckpointManager, int]]:
    """(read-only manager, step) of what ``step`` names: a step of ``<workdir>/checkpoints`` (None: the
    latest), or ``"best"``: the step best.json names in ``checkpoints_best``. CheckpointError when absent."""
    if step == BEST:
        info = read_best(workdir)
        if info is None:
            raise CheckpointError(
                f"no best checkpoint in {workdir} (no {best_dir(workdir) / BEST_FILE}): train with "
                "config.eval.every_steps > 0 and config.eval.best_metric set"
            )
        with best_manager(workdir, read_only=True) as mgr:
            if info["step"] not in mgr.all_steps():
                raise CheckpointError(
                    f"{best_dir(workdir) / BEST_FILE} names step {info['step']}, which {mgr.directory} "
                    "does not hold"
                )
            yield mgr, info["step"]
        return
    if isinstance(step, str):
        raise CheckpointError(f"step {step!r}: give a step number, or {BEST!r}")
    train_first = f"no checkpoints in {workdir} (train first: sora-jax train --workdir {workdir})"
    if not checkpoint_dir(workdir).is_dir():
        raise CheckpointError(train_first)
    with manager(workdir, read_only=True) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(train_first)
        yield mgr, step


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
    datacard: dict | None = None,
) -> None:
    """Starts an async save of ``state`` (+ the grain iterator, + the config as JSON, + ``datacard``: the
    training data card's {"hash", "summary"}) at ``step``."""
    items = {
        "state": ocp.args.StandardSave(state),
        "config": ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
    }
    if datacard is not None:
        items[DATACARD] = ocp.args.JsonSave({"hash": datacard["hash"], "summary": datacard["summary"]})
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    mgr.save(step, args=ocp.args.Composite(**items), force=force)


@contextlib.contextmanager
def _quiet_io_errors():
    """A broken checkpoint makes every pending TensorStore read log its own traceback (asyncio, absl); the
    restore raises one CheckpointError instead, so those logs are muted while it runs."""
    loggers = [logging.getLogger(n) for n in ("asyncio", "absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def restore_train_state(
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
        with _quiet_io_errors():
            restored = mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # truncated or foreign files: one line for the user, details chained
        raise CheckpointError(
            f"checkpoint {mgr.directory}/{step} cannot be read: {type(e).__name__}: {e}"
        ) from e
    return step, restored["state"]


# config groups that decide the shapes of the train state; a difference there explains a mismatch
_STATE_KEYS = ("task", "model", "text", "vae", "autoencoder", "optim.ema_decay")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: d}


def _config_diff(saved: dict, current: ml_collections.ConfigDict) -> list[str]:
    a, b = _flat(saved), _flat(json.loads(current.to_json_best_effort()))
    keys = sorted(k for k in a.keys() | b.keys() if k.split(".")[0] in _STATE_KEYS and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k, '(absent)')!r} in the checkpoint, {b.get(k, '(absent)')!r} now" for k in keys]


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """{"params/dit/x_embedder/kernel/value": shape} (NNX variables and orbax metadata spell paths alike)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in p): tuple(getattr(x, "shape", ())) for p, x in flat}


def check_compatible(
    mgr: ocp.CheckpointManager, step: int, abstract_state: Any, config: ml_collections.ConfigDict
) -> None:
    """Raises CheckpointMismatchError naming the differing config keys and state leaves when checkpoint
    ``step`` does not hold the state ``abstract_state`` describes (unreadable metadata is left to restore)."""
    try:
        with _quiet_io_errors():  # (absl notes the optional _CHECKPOINT_METADATA file it does not find)
            meta = ocp.StandardCheckpointer().metadata(Path(mgr.directory) / str(step) / "state")
        saved = getattr(meta, "item_metadata", meta)
    except Exception:  # missing/corrupt metadata: restore reports it (and falls back)
        return
    if saved is None:
        return
    want, have = _leaf_shapes(abstract_state), _leaf_shapes(saved)
    if want == have:
        return
    leaves = [
        f"{k}: {have.get(k, 'absent')} saved, {want.get(k, 'absent')} now"
        for k in sorted(want.keys() | have.keys())
        if want.get(k) != have.get(k)
    ]
    try:
        saved_cfg = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        keys = _config_diff(saved_cfg, config)
    except Exception:  # the mismatch is reported without the key list
        keys = []
    raise CheckpointMismatchError(
        f"checkpoint {mgr.directory}/{step} was made by a different model: "
        + (f"config {'; '.join(keys[:6])}" if keys else "no state-defining config key differs")
        + f"; {len(leaves)} state leaves differ, e.g. {'; '.join(leaves[:3])}. Use a new --workdir, or the "
        "config the checkpoint was made with"
    )


def quarantine(workdir: str | Path, step: int) -> Path:
    """Moves checkpoint ``step`` out of the way (``<workdir>/checkpoints_corrupt/<step>-<time>``)."""
    dest = Path(workdir).absolute() / "checkpoints_corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(checkpoint_dir(workdir) / str(step)), dest)
    return dest


def restore_latest_good(
    workdir: str | Path,
    mgr: ocp.CheckpointManager,
    abstract_state: Any,
    config: ml_collections.ConfigDict,
    *,
    data_iter: Any | None = None,
) -> tuple[int, Any] | None:
    """(step, state) of the newest readable checkpoint, or None when there is none.

    Checkpoints whose files cannot be read are skipped; once an older one restores, they are moved aside
    with a one-line warning each. When none restores, CheckpointError and nothing is moved. One that holds a
    different model raises CheckpointMismatchError (nothing is moved).
    """
    steps = sorted(mgr.all_steps(), reverse=True)
    failed: list[tuple[int, str]] = []
    for step in steps:
        check_compatible(mgr, step, abstract_state, config)
        try:
            restored = restore_train_state(mgr, abstract_state, step=step, data_iter=data_iter)
        except CheckpointError as e:
            failed.append((step, str(e).splitlines()[0].split(" See full TensorStore details")[0][:240]))
            continue
        # an older checkpoint of the same state reads: the newer ones are damaged; move them out of the way
        for bad, reason in failed:
            if jax.process_index() == 0:
                dest = quarantine(workdir, bad)
                log.warning(
                    "checkpoint %d is unreadable (%s); moved to %s, resuming from %d", bad, reason, dest, step
                )
        if failed:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("quarantined damaged checkpoints")
            mgr.reload()
        return restored
    if failed:  # nothing reads: leave every file where it is, and say so
        raise CheckpointError(
            f"no checkpoint in {mgr.directory} can be restored (steps {steps}); the newest says: {failed[0][1]}"
        )
    return None


def _read_datacard(mgr: ocp.CheckpointManager, step: int) -> dict | None:
    if not (Path(mgr.directory) / str(step) / DATACARD).is_dir():
        return None
    card = mgr.restore(step, args=ocp.args.Composite(**{DATACARD: ocp.args.JsonRestore()}))[DATACARD]
    return {"hash": str(card["hash"]), "summary": str(card["summary"])}


def read_datacard(workdir: str | Path, step: int | str | None = None) -> dict | None:
    """{"hash", "summary"} of the data card checkpoint ``step`` (as ``restore_subtree``'s) was trained on, or
    None (made before data cards, or trained on data without one)."""
    with _reader(workdir, step) as (mgr, step):
        try:
            return _read_datacard(mgr, step)
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {mgr.directory}/{step} has an unreadable data card: {e}"
            ) from e


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def list_checkpoints(workdir: str | Path) -> list[dict[str, Any]]:
    """One dict per checkpoint folder of ``workdir``: step, time, bytes, complete, config summary, datacard
    ({"hash", "summary"} of the training data's card, or None)."""
    root = checkpoint_dir(workdir)
    if not root.is_dir():
        raise CheckpointError(f"no checkpoints in {workdir} (no folder {root})")
    rows = []
    with manager(workdir, read_only=True) as mgr:
        complete = set(mgr.all_steps())
        for entry in sorted(root.iterdir(), key=lambda p: (len(p.name), p.name)):
            if not entry.is_dir():
                continue
            step = int(entry.name) if entry.name.isdigit() else None
            row: dict[str, Any] = {
                "step": step,
                "name": entry.name,
                "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.stat().st_mtime)),
                "bytes": _dir_bytes(entry),
                "complete": step in complete,
                "datacard": None,
            }
            if row["complete"]:
                try:
                    c = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
                    d, m = c.get("data", {}), c.get("model", {})
                    shape = f"{d.get('num_frames')}x{d.get('height')}x{d.get('width')}"
                    if d.get("buckets"):
                        shape = f"buckets {d['buckets']}"
                    mesh = ",".join(
                        f"{k}={v}" for k, v in c.get("mesh", {}).items() if not isinstance(v, dict)
                    )
                    task = c.get("task", "t2v")
                    variant = c.get("vae", {}).get("variant") if task == "vae" else m.get("variant")
                    row["config"] = f"{task} {variant}, {shape}, batch {d.get('batch_size')}, mesh {mesh}"
                except Exception as e:  # listed, not fatal
                    row["config"] = f"(config unreadable: {type(e).__name__})"
                try:
                    row["datacard"] = _read_datacard(mgr, step)
                except Exception as e:  # listed, not fatal
                    row["datacard"] = {"hash": "", "summary": f"(data card unreadable: {type(e).__name__})"}
            else:
                row["config"] = "(incomplete: a save in progress or interrupted)"
            rows.append(row)
    corrupt = Path(workdir).absolute() / "checkpoints_corrupt"
    if corrupt.is_dir():
        for entry in sorted(corrupt.iterdir()):
            rows.append(
                {
                    "step": None,
                    "name": f"checkpoints_corrupt/{entry.name}",
                    "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.stat().st_mtime)),
                    "bytes": _dir_bytes(entry),
                    "complete": False,
                    "config": "(moved aside: unreadable)",
                    "datacard": None,
                }
            )
    return rows


def restore_subtree(
    workdir: str | Path, key: str, abstract: Any, *, step: int | str | None = None
) -> tuple[int, Any]:
    """(step, ``state[key]``) read alone (e.g. ``"ema"`` or ``"params"`` for inference: no optimizer state is
    read or held), onto the shardings ``abstract`` carries. ``step``: a number, None (the latest) or
    ``"best"``."""
    item = {key: abstract}
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    with _reader(workdir, step) as (mgr, step):
        try:
            with _quiet_io_errors():
                restored = mgr.restore(step, args=ocp.args.Composite(state=args))
        except Exception as e:
            first = str(e).splitlines()[0].split(" See full TensorStore details")[0][:300]
            raise CheckpointError(f"checkpoint {mgr.directory}/{step} cannot be read: {first}") from e
    return step, restored["state"][key]


def restore_config(
    workdir: str | Path, step: int | str | None = None
) -> tuple[int, ml_collections.ConfigDict]:
    """The config a checkpoint was made with (for sampling/eval from a workdir alone); ``step`` as
    ``restore_subtree``'s."""
    with _reader(workdir, step) as (mgr, step):
        try:
            cfg = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {mgr.directory}/{step} has no readable config: {e}") from e
    return step, ml_collections.ConfigDict(cfg)


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with the shardings of ``state`` (concrete or abstract)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state
    )
