"""The trainer, one ordered script: mesh -> data -> abstract init -> shardings -> jit(init) -> jit(step)
-> resume -> compile (memory analysis) -> loop -> checkpoints. Extend through config, not forks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sora_jax import factory, loading
from sora_jax.data import buckets as buckets_lib
from sora_jax.data import pipeline
from sora_jax.parallel import sharding
from sora_jax.parallel.mesh import make_mesh
from sora_jax.train import checkpoint, metrics
from sora_jax.train.preemption import PreemptionWatch
from sora_jax.train.state import init_state, learning_rate, make_optimizer
from sora_jax.train.step import make_step, make_train_step, make_vae_gan_step, make_vae_loss_fn

log = logging.getLogger("sora_jax.train")


def task(cfg: ml_collections.ConfigDict) -> str:
    """What a config trains: ``"t2v"`` (the text-to-video DiT, default) or ``"vae"`` (the video VAE)."""
    return cfg.get("task", "t2v")


def abstract_batch(
    cfg: ml_collections.ConfigDict, mesh, video_shape: tuple[int, int, int, int] | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes; ``video_shape`` (B, T, H, W) overrides the config's (buckets)."""
    d, b, length = cfg.data, cfg.data.batch_size, cfg.text.max_length
    if video_shape is not None:
        b = video_shape[0]
    if d.get("content", "video") == "latents":
        shapes = {"latents": ((b, *factory.latent_shape(cfg)), jnp.float32)}
    else:
        t, h, w = video_shape[1:] if video_shape is not None else (d.num_frames, d.height, d.width)
        shapes = {"video": ((b, t, h, w, 3), jnp.uint8)}
    if task(cfg) == "t2v" and cfg.text.encoder == "trainable":
        shapes |= {"tokens": ((b, length), jnp.int32), "text_mask": ((b, length), jnp.bool_)}
    elif task(cfg) == "t2v":  # a frozen encoder's features, looked up in the dataset's embedding table
        shapes |= {
            "text_emb": ((b, length, factory.frozen_dim(cfg)), jnp.float32),
            "text_mask": ((b, length), jnp.bool_),
        }
    return {
        k: jax.ShapeDtypeStruct(s, dt, sharding=sharding.batch_sharding(mesh, len(s)))
        for k, (s, dt) in shapes.items()
    }


def _batch_key(batch: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))


def _bucket_plan(
    cfg: ml_collections.ConfigDict, mesh, index, check_batches: bool = True
) -> buckets_lib.BucketPlan:
    d = cfg.data
    if d.get("content", "video") != "video":
        raise ValueError("config.data.buckets needs data.content = 'video' (latent records have one shape)")
    batch_axes = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    return buckets_lib.BucketPlan(
        index,
        buckets_lib.parse_buckets(d.buckets),
        token_budget=int(d.get("token_budget", 0)),
        tokens_fn=lambda b: factory.tokens_per_clip(cfg, *b.shape),
        batch_multiple=math.lcm(batch_axes, jax.process_count()),
        default_batch=d.batch_size,
        target_fps=float(d.get("fps", 0) or 0),
        max_upscale=float(d.get("max_upscale", 1.0)),
        image_fraction=float(d.get("image_fraction", 0.0)),
        seed=d.shuffle_seed,
        check_batches=check_batches,
    )


def bucket_batch_shapes(cfg: ml_collections.ConfigDict, mesh) -> dict[tuple[int, int, int], int]:
    """{(T, H, W): global batch} of the config's buckets (checks every bucket against the model)."""
    plan = _bucket_plan(cfg, mesh, np.zeros((0, 4)), check_batches=False)
    return {b.shape: n for b, n in zip(plan.buckets, plan.batch_sizes)}


def train_source(cfg: ml_collections.ConfigDict, workdir: str | Path) -> tuple:
    """(random-access source of the train records, clip index [N, 4] or None): the TFDS dataset that
    ``data.tfds.name`` names, else the ArrayRecord folder ``data.path`` (index from its metadata)."""
    t = cfg.data.get("tfds")
    if t is not None and t.name:
        from sora_jax.data.tfds_source import open_tfds_source

        source = open_tfds_source(
            t.name,
            t.split,
            t.data_dir or None,
            video_key=t.video_key or None,
            caption_key=t.caption_key or None,
            caption=t.caption,
            fps=float(t.fps),
        )
        return source, None
    path = pipeline.ensure_dataset(cfg, workdir)
    entry = pipeline.read_metadata(path)["splits"].get("train", {})
    index = np.load(Path(path) / entry["index"]) if entry.get("index") else None
    return pipeline.open_source(path, "train"), index


def _captions(cfg: ml_collections.ConfigDict, workdir, source) -> list[str]:
    """Every caption of the train split (from the metadata when it lists them, else from the records)."""
    t = cfg.data.get("tfds")
    if not (t is not None and t.name):
        from sora_jax.data.pipeline import split_captions

        return split_captions(pipeline.dataset_dir(cfg, workdir), "train")
    from sora_jax.data.records import read_record

    return [read_record(source[i])[0]["caption"] for i in range(len(source))]


def train_text_input(cfg: ml_collections.ConfigDict, workdir, source):
    """captions -> the model's text input for training: the tokenizer (trainable encoder), or a lookup in the
    train split's caption-embedding table (frozen encoder): ``<data>/text_emb-*.npz`` written by
    ``data_pipelines/encode_text.py``, else computed once here and kept in ``<workdir>/text_cache/``."""
    tok = factory.make_text_input(cfg)
    if cfg.text.encoder == "trainable":
        return tok.encode
    from sora_jax.text.frozen import EmbeddingTable, table_file

    t = cfg.data.get("tfds")
    places = (
        [] if (t is not None and t.name) else [table_file(pipeline.dataset_dir(cfg, workdir), tok, "train")]
    )
    places.append(table_file(Path(workdir) / "text_cache", tok, "train"))
    for f in places:
        if f.is_file():
            log.info("caption embeddings from %s", f)
            return EmbeddingTable.load(f).encode
    table = tok.table(_captions(cfg, workdir, source), progress=jax.process_index() == 0)
    if jax.process_index() == 0:
        table.save(places[-1])
    log.info("embedded %d distinct captions with %s", len(table.captions), tok.name)
    return table.encode


def make_bucketed_train_data(cfg: ml_collections.ConfigDict, source, index, mesh, tokenize):
    """The bucketed train stream of ``source`` (``index`` None: from the source or the record headers)."""
    if index is None:
        index = source.clip_index() if hasattr(source, "clip_index") else buckets_lib.scan_index(source)
    plan = _bucket_plan(cfg, mesh, index)
    log.info(
        "buckets (clips per bucket): %s; batches %s; %d batches per epoch",
        plan.counts(),
        dict(zip(map(str, plan.buckets), plan.batch_sizes)),
        plan.batches_per_epoch,
    )
    return buckets_lib.make_bucketed_dataset(
        source, plan, tokenize=tokenize, num_workers=cfg.data.num_workers
    )


def build_train_fns(cfg: ml_collections.ConfigDict, mesh):
    """(init_fn jitted with out_shardings, step_fn jitted with in/out shardings, state_sharding, graphdef)."""
    tx = make_optimizer(cfg)
    make = factory.make_vae if task(cfg) == "vae" else factory.make_model

    gan = task(cfg) == "vae" and cfg.vae.get("gan_weight", 0.0) > 0
    disc_tx = make_optimizer(cfg, lr=cfg.vae.get("disc_lr", 0.0) or cfg.optim.lr) if gan else None

    def init_fn():
        state = init_state(make(cfg, cfg.seed), tx, cfg.seed)
        if gan:
            disc = nnx.state(factory.make_discriminator(cfg, cfg.seed + 1), nnx.Param)
            state |= {"disc": disc, "disc_opt_state": disc_tx.init(disc)}
        return state

    abstract_model = nnx.eval_shape(lambda: make(cfg, cfg.seed))
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    abstract_state = jax.eval_shape(init_fn)
    state_sharding = sharding.state_shardings(abstract_state, mesh)
    lr_fn = lambda s: learning_rate(cfg, s)  # noqa: E731
    perceptual = None
    if task(cfg) == "vae" and cfg.vae.get("perceptual_weight", 0.0) > 0:
        from sora_jax.models.perceptual import load_perceptual

        if not cfg.vae.get("perceptual_path"):
            raise ValueError("config.vae.perceptual_weight > 0 needs config.vae.perceptual_path (VGG16 .npz)")
        perceptual = load_perceptual(cfg.vae.perceptual_path)
    if gan:
        v = cfg.vae
        disc_graphdef, _ = nnx.split(nnx.eval_shape(lambda: factory.make_discriminator(cfg, 0)), nnx.Param)
        step = make_vae_gan_step(
            graphdef,
            disc_graphdef,
            tx,
            disc_tx,
            l1_weight=v.l1_weight,
            l2_weight=v.l2_weight,
            kl_weight=v.kl_weight,
            gan_weight=v.gan_weight,
            gan_start=v.gan_start,
            ema_decay=cfg.optim.ema_decay,
            lr_fn=lr_fn,
            perceptual=perceptual,
            perceptual_weight=v.get("perceptual_weight", 0.0),
        )
    elif task(cfg) == "vae":
        v = cfg.vae
        loss_fn = make_vae_loss_fn(
            graphdef,
            l1_weight=v.l1_weight,
            l2_weight=v.l2_weight,
            kl_weight=v.kl_weight,
            perceptual=perceptual,
            perceptual_weight=v.get("perceptual_weight", 0.0),
        )
        step = make_step(loss_fn, tx, ema_decay=cfg.optim.ema_decay, lr_fn=lr_fn)
    else:
        null_ids, null_mask = factory.make_text_input(cfg).encode([""])
        step = make_train_step(
            graphdef,
            tx,
            factory.make_process(cfg),
            loading.load_autoencoder(cfg),
            null_ids=jnp.asarray(null_ids[0]),
            null_mask=jnp.asarray(null_mask[0]),
            caption_dropout=cfg.text.caption_dropout,
            ema_decay=cfg.optim.ema_decay,
            lr_fn=lr_fn,
            mask_probs=factory.mask_probs(cfg),
            mask_max_frames=cfg.get("conditioning", {}).get("max_frames", 1),
        )

    def sharded_step(state, batch):
        with sharding.activation_sharding(mesh):
            return step(state, batch)

    batch_sharding = {k: v.sharding for k, v in abstract_batch(cfg, mesh).items()}
    init_jit = jax.jit(init_fn, out_shardings=state_sharding)
    step_jit = jax.jit(
        sharded_step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return init_jit, step_jit, state_sharding, abstract_state, graphdef


def _agree(flag: bool) -> bool:
    """True when any process says so (processes stop at the same step); a no-op with one process."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def _log_state_bytes(abstract_state, mesh) -> None:
    """Logs the train state's bytes per device; warns when FSDP leaves parameters unsharded."""
    total, local = sharding.bytes_per_device(abstract_state)
    log.info("train state: %.3f GiB in all, %.3f GiB per device", total / 2**30, local / 2**30)
    if mesh.shape["fsdp"] > 1:
        try:
            sharding.check_sufficiently_sharded(abstract_state["params"], mesh, tolerance=0.1)
        except sharding.ShardingError as e:
            log.warning("%s", e)


def _log_memory(compiled) -> dict[str, float]:
    """Logs and returns the compiled step's memory per device in GiB (empty where the backend has none)."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return {}
    if mem is None:
        return {}
    gib = 1 / 2**30
    out = {
        "argument_gib": mem.argument_size_in_bytes * gib,
        "output_gib": mem.output_size_in_bytes * gib,
        "temp_gib": mem.temp_size_in_bytes * gib,
        "alias_gib": mem.alias_size_in_bytes * gib,
    }
    # donated state: outputs alias arguments, so the peak is arguments + temporaries + non-aliased outputs
    out["peak_gib"] = out["argument_gib"] + out["temp_gib"] + out["output_gib"] - out["alias_gib"]
    log.info(
        "compiled step memory per device: args %.3f GiB, outputs %.3f GiB (%.3f aliased), temps %.3f GiB, "
        "peak about %.3f GiB",
        out["argument_gib"],
        out["output_gib"],
        out["alias_gib"],
        out["temp_gib"],
        out["peak_gib"],
    )
    return out


def train_and_evaluate(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    compile_only: bool = False,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    """Trains ``cfg`` in ``workdir`` (resuming from its latest checkpoint). Returns the last logged metrics.

    ``devices``: the mesh's devices (default: all devices of all processes).
    """
    workdir = Path(workdir)
    cfg = loading.resolve_autoencoder(cfg)
    mesh = make_mesh(cfg.mesh, devices)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    init_jit, step_jit, state_sharding, abstract_state, _ = build_train_fns(cfg, mesh)
    batch_abstract = abstract_batch(cfg, mesh)
    abstract_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding
    )
    _log_state_bytes(abstract_sharded, mesh)
    # one executable per batch shape: the config's, or every bucket's (memory checked before training)
    executables, memory = {}, {}
    compile_start = time.perf_counter()
    if cfg.data.get("buckets"):
        shapes = [(b, *shape) for shape, b in bucket_batch_shapes(cfg, mesh).items()]
    else:
        shapes = [None]
    for shape in shapes:
        abstract = abstract_batch(cfg, mesh, video_shape=shape)
        if shape is not None:
            log.info("bucket %s: global batch %d", "x".join(map(str, shape[1:])), shape[0])
        executables[_batch_key(abstract)] = compiled = step_jit.lower(abstract_sharded, abstract).compile()
        memory = _log_memory(compiled)
    compile_seconds = time.perf_counter() - compile_start
    if compile_only:
        return {"compiled": True, "compile_seconds": compile_seconds, **memory}

    source, index = train_source(cfg, workdir)
    text_input = train_text_input(cfg, workdir, source) if task(cfg) == "t2v" else pipeline.no_tokens
    if cfg.data.get("buckets"):
        dataset = make_bucketed_train_data(cfg, source, index, mesh, text_input)
    else:
        dataset = pipeline.make_dataset(
            None,
            "train",
            source=source,
            global_batch_size=cfg.data.batch_size,
            tokenize=text_input,
            seed=cfg.data.shuffle_seed,
            num_workers=cfg.data.num_workers,
        )
    data_iter = iter(dataset)

    mgr = checkpoint.manager(
        workdir, keep=cfg.train.keep_checkpoints, keep_every=cfg.train.get("keep_every", 0)
    )
    resumed = checkpoint.restore_latest_good(workdir, mgr, abstract_sharded, cfg, data_iter=data_iter)
    if resumed is not None:
        start, state = resumed
        log.info("resumed from step %d in %s", start, workdir)
    else:
        start, state = 0, init_jit()

    writer = metrics.MetricWriter(workdir)
    total = cfg.train.num_steps
    bar = tqdm(total=total, initial=start, desc="train", disable=not progress or jax.process_index() != 0)
    pending: list[tuple[int, dict]] = []
    last: dict = {}
    t0, steps_timed = time.perf_counter(), 0
    started, time_limit = t0, float(cfg.train.get("time_limit_s", 0.0))
    input_seconds = 0.0  # host time spent waiting for the next batch (the input pipeline's share)
    trained_until = started
    try:
        with PreemptionWatch() as preemption:
            for step in range(start, total):
                t_in = time.perf_counter()
                batch = pipeline.to_global(
                    {k: v for k, v in next(data_iter).items() if k in batch_abstract}, mesh
                )
                input_seconds += time.perf_counter() - t_in
                key = _batch_key(batch)
                if key not in executables:  # not expected: every shape is compiled above
                    log.warning("compiling the step for an unexpected batch shape %s", key)
                    executables[key] = step_jit.lower(state, batch).compile()
                state, step_metrics = executables[key](state, batch)
                pending.append((step + 1, step_metrics))
                steps_timed += 1
                bar.update(1)
                done = step + 1
                preempted = preemption.reached(done)
                out_of_time = False  # every process decides at the same steps (every step when alone)
                if (
                    time_limit > 0 and len(pending) > 1
                ):  # at most two steps in flight: the clock is the device's
                    jax.block_until_ready(pending[-2][1])
                if time_limit > 0 and (jax.process_count() == 1 or done % cfg.train.log_every == 0):
                    out_of_time = _agree(time.perf_counter() - started >= time_limit)
                preempted = preempted or out_of_time
                if preempted or done == total:  # training ends here: the clock stops before the last save
                    jax.block_until_ready(state)
                    trained_until = time.perf_counter()
                save_now = done % cfg.train.ckpt_every == 0 or done == total or preempted
                if done % cfg.train.log_every == 0 or done == total:
                    host = [(s, jax.device_get(m)) for s, m in pending]
                    metrics.check_finite(host)
                    coll, collection = None, metrics.collection(host[0][1])
                    for _, m in host:
                        one = collection.single_from_model_output(**m)
                        coll = one if coll is None else coll.merge(one)
                    last = {k: float(v) for k, v in coll.compute().items()}
                    dt = time.perf_counter() - t0
                    last["steps_per_sec"] = steps_timed / dt
                    writer.write_scalars(done, last)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                    pending, t0, steps_timed = [], time.perf_counter(), 0
                elif save_now:  # never save a state that a NaN/Inf step produced
                    metrics.check_finite([(s, jax.device_get(m)) for s, m in pending])
                if save_now:
                    checkpoint.save(mgr, done, state, cfg, data_iter, force=preempted)
                if preempted:
                    mgr.wait_until_finished()
                    why = f"time limit of {time_limit:g} s reached" if out_of_time else "preempted"
                    log.warning("%s: saved step %d in %s, exiting", why, done, workdir)
                    last |= {"time_limit_reached": True} if out_of_time else {"preempted": True}
                    total = done
                    break
    finally:
        bar.close()
        mgr.wait_until_finished()
        mgr.close()
        writer.close()
    last["step"] = total
    last["compiled_steps"] = len(executables)
    # wall-clock of the loop up to its last step (the final save excluded), the compile before it, and the
    # input wait inside it
    last |= {
        "steps_run": total - start,
        "train_seconds": trained_until - started,
        "compile_seconds": compile_seconds,
        "input_seconds": input_seconds,
    }
    return last
