"""What the trainer reads: the step's batch shapes (from the config alone, so a step compiles for a target
without its data) and the train stream (the split's records, the caption -> text-input mapping, buckets).

``batch_specs(cfg, mesh)`` lists one abstract global batch per bucket (or the config's one shape);
``open_train_stream(cfg, workdir, mesh)`` builds the dataset folder when it is the bundled digits and missing,
and returns the grain iterator of global batches' host parts.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import factory
from sora_jax.choices import DataContent, Task, TextEncoderKind
from sora_jax.config import task
from sora_jax.data import buckets as buckets_lib
from sora_jax.data import pipeline
from sora_jax.parallel import sharding
from sora_jax.train import repa

log = logging.getLogger("sora_jax.train")


def abstract_batch(
    cfg: ml_collections.ConfigDict, mesh, video_shape: tuple[int, int, int, int] | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the step takes; ``video_shape`` (B, T, H, W) overrides the config's (buckets)."""
    d, b, length = cfg.data, cfg.data.batch_size, factory.text_length(cfg)
    if video_shape is not None:
        b = video_shape[0]
    if DataContent(d.get("content", "video")) is DataContent.LATENTS:  # a bucket's, or the config's clip
        latent = factory.latent_shape(cfg)
        if video_shape is not None:
            latent = factory.make_autoencoder(cfg).latent_shape(*video_shape[1:])
        shapes = {"latents": ((b, *latent), jnp.float32)}
    else:
        t, h, w = video_shape[1:] if video_shape is not None else (d.num_frames, d.height, d.width)
        shapes = {"video": ((b, t, h, w, 3), jnp.uint8)}
    if task(cfg) is Task.T2V and TextEncoderKind(cfg.text.encoder) is TextEncoderKind.TRAINABLE:
        shapes |= {"tokens": ((b, length), jnp.int32), "text_mask": ((b, length), jnp.bool_)}
    elif task(cfg) is Task.T2V:  # a frozen encoder's features, looked up in the dataset's embedding table
        shapes |= {
            "text_emb": ((b, length, factory.frozen_dim(cfg)), jnp.float32),
            "text_mask": ((b, length), jnp.bool_),
        }
    if video_shape is None:  # buckets resize clips, so targets per record do not apply (config checks)
        shapes |= repa.batch_shapes(cfg, b)
    return {
        k: jax.ShapeDtypeStruct(s, dt, sharding=sharding.batch_sharding(mesh, len(s)))
        for k, (s, dt) in shapes.items()
    }


def _bucket_plan(
    cfg: ml_collections.ConfigDict, mesh, index, check_batches: bool = True
) -> buckets_lib.BucketPlan:
    d = cfg.data  # latent records: index rows are their buckets (data_pipelines/encode_latents.py --clip)
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


def batch_specs(cfg: ml_collections.ConfigDict, mesh) -> list[dict[str, jax.ShapeDtypeStruct]]:
    """The abstract global batches the step will see: one per bucket, or the config's one shape."""
    if not cfg.data.get("buckets"):
        return [abstract_batch(cfg, mesh)]
    specs = []
    for (t, h, w), b in bucket_batch_shapes(cfg, mesh).items():
        log.info("bucket %dx%dx%d: global batch %d", t, h, w, b)
        specs.append(abstract_batch(cfg, mesh, video_shape=(b, t, h, w)))
    return specs


def open_train_stream(cfg: ml_collections.ConfigDict, workdir: str | Path, mesh, timings: dict | None = None):
    """The train split as an iterator of host batches (dicts of numpy arrays), sharded over processes:
    the config's one shape, or buckets. Builds the bundled digits first when they are the data and missing.
    With ``repa.precomputed(cfg)`` the batches carry their clips' REPA targets, computed here once
    (``timings["repa_precompute_seconds"]`` says how long: training work, the trainer counts it so)."""
    source, index = train_source(cfg, workdir)
    text_input = train_text_input(cfg, workdir, source) if task(cfg) is Task.T2V else pipeline.no_tokens
    if cfg.data.get("buckets"):
        return make_bucketed_train_data(cfg, source, index, mesh, text_input)
    lookup = None
    if repa.precomputed(cfg):
        t0 = time.perf_counter()
        lookup = repa_lookup(cfg, source)
        (timings if timings is not None else {})["repa_precompute_seconds"] = time.perf_counter() - t0
    ds = pipeline.make_dataset(
        None,
        "train",
        source=source,
        global_batch_size=cfg.data.batch_size,
        tokenize=text_input,
        seed=cfg.data.shuffle_seed,
        num_workers=cfg.data.num_workers,
        with_index=lookup is not None,
    )
    return ds if lookup is None else ds.map(lookup)


class RepaLookup:
    """Batch transform: index int64 [b] -> the batch plus its clips' rows of a precomputed REPA table
    (``repa_features`` float32 [b, N, D], ``repa_mass`` [b, N, K] with the class term)."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def __call__(self, batch: dict) -> dict:
        return batch | {k: v[batch["index"]] for k, v in self.table.items()}


def repa_lookup(cfg: ml_collections.ConfigDict, source) -> RepaLookup:
    """The REPA encoder's pass over every clip of the train ``source``, once (``repa.precompute_table``), as
    the stream's lookup; every process computes the whole table (its memory: clips x tokens x 96 floats)."""
    term, frozen = repa.from_config(cfg)
    t0 = time.perf_counter()
    table = repa.precompute_table(
        term, frozen["repa"], source, repa.token_grid(cfg), progress=jax.process_index() == 0
    )
    mib = sum(v.nbytes for v in table.values()) / 2**20
    log.info(
        "REPA targets of %d train clips in %.1f s (%.0f MiB)", len(source), time.perf_counter() - t0, mib
    )
    return RepaLookup(table)


def _tfds(cfg: ml_collections.ConfigDict):
    """``config.data.tfds`` when it names a TFDS dataset (the train data then comes from there), else None."""
    t = cfg.data.get("tfds")
    return t if t is not None and t.name else None


def train_source(cfg: ml_collections.ConfigDict, workdir: str | Path) -> tuple:
    """(random-access source of the train records, clip index [N, 4] or None): the TFDS dataset that
    ``data.tfds.name`` names, else the ArrayRecord folder ``data.path`` (index from its metadata)."""
    t = _tfds(cfg)
    if t is not None:
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
    if _tfds(cfg) is None:
        return pipeline.split_captions(pipeline.dataset_dir(cfg, workdir), "train")
    from sora_jax.data.records import read_record

    return [read_record(source[i])[0]["caption"] for i in range(len(source))]


def train_text_input(cfg: ml_collections.ConfigDict, workdir, source):
    """captions -> the model's text input for training: the tokenizer (trainable encoder), or a lookup in the
    train split's caption-embedding table (frozen encoder): ``<data>/text_emb-*.npz`` written by
    ``data_pipelines/encode_text.py``, else computed once here and kept in ``<workdir>/text_cache/``."""
    if TextEncoderKind(cfg.text.encoder) is TextEncoderKind.TRAINABLE:
        return factory.make_text_input(cfg).encode
    return ensure_caption_table(cfg, workdir, source).encode


def ensure_caption_table(cfg: ml_collections.ConfigDict, workdir, source=None):
    """``caption_table``, or the table computed now with the frozen encoder over the train split's captions
    (``source``: its records, default ``train_source``) and kept in ``<workdir>/text_cache/``. The trainer
    takes the empty prompt's features from it too, so a run and its resumption use the same ones."""
    table = caption_table(cfg, workdir)
    if table is not None:
        return table
    source = train_source(cfg, workdir)[0] if source is None else source
    tok = factory.make_text_input(cfg)
    table = tok.table(_captions(cfg, workdir, source), progress=jax.process_index() == 0)
    if jax.process_index() == 0:
        table.save(_table_places(cfg, workdir)[-1])
    log.info("embedded %d distinct captions with %s", len(table.captions), tok.name)
    return table


def _table_places(cfg: ml_collections.ConfigDict, workdir) -> list[Path]:
    """Where the train split's caption-embedding table may be: beside the data, then ``<workdir>/text_cache``."""
    from sora_jax.text.frozen import table_file_for

    key = (
        cfg.text.encoder,
        cfg.text.get("path", ""),
        cfg.text.max_length,
        "train",
        cfg.text.get("clauses", False),
        cfg.text.get("sentences", 0),
    )
    places = [] if _tfds(cfg) else [table_file_for(pipeline.dataset_dir(cfg, workdir), *key)]
    return [*places, table_file_for(Path(workdir) / "text_cache", *key)]


def caption_table(cfg: ml_collections.ConfigDict, workdir):
    """The train split's ``EmbeddingTable`` of a frozen text encoder when one was written (by
    ``data_pipelines/encode_text.py`` or an earlier run), else None; found by the encoder's name, so the
    encoder itself (UMT5-XXL: 11 GB) is not loaded."""
    if TextEncoderKind(cfg.text.encoder) is TextEncoderKind.TRAINABLE:
        return None
    from sora_jax.text.frozen import EmbeddingTable

    for f in _table_places(cfg, workdir):
        if f.is_file():
            log.info("caption embeddings from %s", f)
            return EmbeddingTable.load(f)
    return None


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
