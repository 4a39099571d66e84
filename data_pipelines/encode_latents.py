"""Precompute VAE latents of a clip dataset, so DiT training does not pay for the encoder every step.

    python -m data_pipelines.encode_latents --vae runs/vae_digits --data runs/vae_digits/data --out data/lat
    sora-jax train --config configs/digits_latent.py --workdir runs/latent \\
        --config.autoencoder.path=runs/vae_digits --config.data.path=data/lat --config.data.content=latents

Reads every split of ``--data`` in order, encodes the clips with the VAE's EMA weights (posterior means,
normalised by the VAE's ``latent_stats.json``) and writes the same records with float16 latents in place of
the video (``sora_jax.data.records``; captions and labels kept) into ArrayRecord shards of ``--out``, plus a
``metadata.json`` naming the VAE and its checkpoint step. ``--text_encoder minilm | t5`` also writes the
captions' embedding table for a frozen encoder (``data_pipelines/encode_text.py``). The source's data card
(``datacard.json`` + ``datacard.md``, ``sora_jax.data.datacard``) is copied unchanged, so the latents train under
the same card hash. The output folder appears atomically: a crash leaves no half-written dataset.

Wan 2.1 (``configs/wan_t2v_1_3b.py``): ``--vae`` a Wan workdir (``sora-jax import-diffusers``) encodes with its
VAE (normalised by the VAE's ``latents_mean`` / ``latents_std``, as ``WanPipeline`` does); ``--text_encoder
t5`` then takes the workdir's UMT5 folder, tokenizer and dtype. Clips of any size (``sora-jax ingest``) are
cut to buckets first: ``--clip TxHxW[,TxHxW...]`` at ``--fps``, each clip to the bucket it fits best
(``sora_jax.data.buckets``: closest aspect ratio, no upscaling; a seeded start, resized to cover,
centre-cropped; clips that fit none are skipped and counted). ``<split>.index.npy`` then lists each record's
bucket, so the trainer batches them by bucket (``config.data.buckets`` = the same list)::

    python -m data_pipelines.encode_latents --vae runs/wan --data data/mine --out data/mine_wan \\
        --clip 33x480x832,33x832x480 --fps 16 --text_encoder t5 --max_length 512 --batch_size 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np


def load_codec(vae: str | Path):
    """(codec with weights, its checkpoint step, its kind) of ``vae``: a trained VAE workdir (with
    ``latent_stats.json``), or a Wan workdir (its Wan VAE)."""
    from sora_jax import loading
    from sora_jax.choices import AutoencoderKind
    from sora_jax.models.vae import LATENT_STATS

    if (Path(vae) / LATENT_STATS).is_file():
        codec = loading.load_vae_codec(vae)
        return codec, codec.step, AutoencoderKind.VAE.value
    step, cfg = loading.saved_config(vae)
    if cfg.autoencoder.kind != AutoencoderKind.WAN_VAE:
        raise FileNotFoundError(
            f"--vae {vae}: neither a VAE workdir with latent statistics nor a Wan workdir (import-diffusers)"
        )
    return loading.load_autoencoder(cfg), step, AutoencoderKind.WAN_VAE.value


def parse_clips(spec: str) -> list[tuple[int, int, int]]:
    """``"TxHxW[,TxHxW...]"`` -> [(T, H, W), ...] (the buckets of a latent dataset)."""
    from sora_jax.data.buckets import parse_buckets
    from sora_jax.errors import UserError

    try:
        return [b.shape for b in parse_buckets(spec)]
    except UserError as e:
        raise ValueError(f"--clip {spec!r}: {str(e).removeprefix('data.buckets: ')}") from None


def _fitted_batches(
    data: Path,
    split: str,
    clips: list[tuple[int, int, int]],
    fps: float,
    batch_size: int,
    seed: int,
    skipped: dict,
):
    """Batches {video uint8 [b, T, H, W, 3], caption [b], bucket [b]} of a split's clips, each cut to the
    bucket of ``clips`` it fits best (``BucketPlan``'s choice: closest aspect ratio, no upscaling; then
    ``load_clip``: a start seeded by (seed, record), resize to cover, centre crop); one bucket per batch, the
    buckets in turn, records in stored order within each. Clips that fit none are counted in
    ``skipped[split]``."""
    from sora_jax.data import pipeline
    from sora_jax.data.buckets import Bucket, BucketPlan, load_clip, scan_index

    source, buckets = pipeline.open_source(data, split), [Bucket(*c) for c in clips]
    entry = pipeline.read_metadata(data)["splits"][split]
    index = np.load(data / entry["index"]) if entry.get("index") else scan_index(source)
    plan = BucketPlan(
        index, buckets, token_budget=0, tokens_fn=lambda b: 1, default_batch=1, target_fps=fps,
        check_batches=False,
    )  # fmt: skip
    skipped[split] = int(np.sum(plan.assignment < 0))
    for k, bucket in enumerate(buckets):
        members = plan.members[k]
        for j in range(0, len(members), batch_size):
            pairs = [
                load_clip(source[int(i)], bucket, target_fps=fps, rng=np.random.default_rng([seed, int(i)]))
                for i in members[j : j + batch_size]
            ]
            yield {
                "video": np.stack([v for v, _ in pairs]),
                "caption": np.asarray([c for _, c in pairs], object),
                "bucket": np.full(len(pairs), k),
            }


def encode_dataset(
    vae: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    clips: list[tuple[int, int, int]] | None = None,
    fps: float = 0.0,
    seed: int = 0,
    progress=True,
):
    """Writes ``out`` (shards + metadata.json) from ``data`` through the VAE of workdir ``vae`` (a trained
    VAE's or a Wan workdir's); ``clips`` [(T, H, W), ...]: every clip cut first, at ``fps`` (0: the source's),
    to the one of these buckets it fits best (``<split>.index.npy`` then gives each record's bucket as
    (T, H, W, fps), for ``config.data.buckets``). Returns ``out``."""
    import jax
    import jax.numpy as jnp
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm.auto import tqdm

    from sora_jax.data import datacard, pipeline
    from sora_jax.data.records import encode_clip
    from sora_jax.models.autoencoder import video_to_float

    data, out = Path(data), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out (latents are never overwritten)")
    meta = pipeline.read_metadata(data)
    card = datacard.find_card(data)  # a damaged card stops here, before any encoding
    codec, vae_step, kind = load_codec(vae)
    # the VAE's weights are an argument of the compiled encoder, not constants baked into it
    encode_fn = jax.jit(lambda p, v: codec.with_params(p).encode(video_to_float(v)))
    params = jax.device_put(codec.params)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        splits = {}
        skipped = {}
        for split, info in meta["splits"].items():
            skipped[split] = 0
            if clips is None:
                ds = pipeline.in_order(data, split, batch_size)
            else:
                ds = _fitted_batches(data, split, clips, fps, batch_size, seed, skipped)
            written, index = 0, []
            name = f"{split}-00000-of-00001.array_record"
            writer = ArrayRecordWriter(str(tmp / name), "group_size:1")
            bar = tqdm(total=info["num_clips"], desc=f"encode {split}", disable=not progress)
            for batch in ds:
                latents = np.asarray(encode_fn(params, jnp.asarray(batch["video"]))).astype(np.float16)
                for i in range(len(latents)):
                    labels = [batch[k][i] if k in batch else None for k in ("digits", "directions")]
                    writer.write(encode_clip(latents[i], str(batch["caption"][i]), *labels))
                bar.update(len(latents))
                written += len(latents)
                latent_shape = list(latents.shape[1:])
                if clips is not None:
                    index += [(*clips[int(k)], fps) for k in batch["bucket"]]
            bar.close()
            writer.close()
            # the pixel-clip index (sizes per record) and provenance codes (record order) do not describe
            # latents: dropped (the card keeps the counts), or the buckets'
            info = {k: v for k, v in info.items() if k not in ("index", "provenance")}
            splits[split] = {**info, "num_clips": written, "shards": [name]}
            if clips is not None:
                np.save(tmp / f"{split}.index.npy", np.asarray(index, np.float32).reshape(-1, 4))
                splits[split]["index"] = f"{split}.index.npy"
        new_meta = {
            **{k: v for k, v in meta.items() if k != "splits"},
            "content": "latents",
            "latent_shape": latent_shape,
            "latent_dtype": "float16",
            "vae": str(Path(vae).absolute()),
            "vae_kind": kind,
            "vae_step": int(vae_step),
            "buckets": [list(c) for c in clips] if clips else None,
            "fps": fps if clips and fps else meta.get("fps"),
            "skipped_short": skipped,
            "source": str(data.absolute()),
            "splits": splits,
        }
        (tmp / "metadata.json").write_text(json.dumps(new_meta))
        if card is not None:
            datacard.write_card(tmp, card)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _text_settings(vae: str, encoder: str, text_path: str) -> dict:
    """encode_text's path / tokenizer_path / dtype: ``--text_path``, else a Wan workdir's UMT5 (as the
    fine-tuning config resolves it from ``model.init_from``: the table's name must match)."""
    from sora_jax.models.vae import LATENT_STATS

    if text_path or encoder != "t5" or (Path(vae) / LATENT_STATS).is_file():
        return {"path": text_path}
    from sora_jax import loading

    t = loading.saved_config(vae)[1].text
    return {"path": t.path, "tokenizer_path": t.get("tokenizer_path", ""), "dtype": t.get("dtype", "float32")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", required=True, help="a trained VAE's workdir (with latent_stats.json)")
    p.add_argument("--data", required=True, help="clip dataset folder (ArrayRecord shards + metadata.json)")
    p.add_argument("--out", required=True, help="new folder for the latent dataset")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument(
        "--text_encoder",
        default="",
        choices=["", "minilm", "t5"],
        help="also precompute caption embeddings with this frozen encoder (data_pipelines/encode_text.py)",
    )
    p.add_argument(
        "--text_path", default="", help="t5: the Hugging Face folder (default a Wan workdir's UMT5)"
    )
    p.add_argument("--max_length", type=int, default=24, help="tokens per caption (config.text.max_length)")
    p.add_argument(
        "--clip", default="", help="TxHxW[,TxHxW...]: cut every clip to (the best of) these shapes first"
    )
    p.add_argument(
        "--fps", type=float, default=0.0, help="with --clip: frame rate to sample at (0: source's)"
    )
    p.add_argument("--seed", type=int, default=0, help="with --clip: seeds each clip's start")
    args = p.parse_args(argv)
    try:
        clips = parse_clips(args.clip) if args.clip else None
        path = encode_dataset(
            args.vae,
            args.data,
            args.out,
            batch_size=args.batch_size,
            clips=clips,
            fps=args.fps,
            seed=args.seed,
        )
        if args.text_encoder:
            from data_pipelines.encode_text import encode_text

            splits = list(json.loads((Path(path) / "metadata.json").read_text())["splits"])
            encode_text(
                path,
                encoder=args.text_encoder,
                max_length=args.max_length,
                splits=splits,
                **_text_settings(args.vae, args.text_encoder, args.text_path),
            )
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, KeyError) as e:
        print(f"encode_latents: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
