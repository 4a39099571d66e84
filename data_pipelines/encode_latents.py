"""Precompute VAE latents of a clip dataset, so DiT training does not pay for the encoder every step.

    python -m data_pipelines.encode_latents --vae runs/vae_digits --data runs/vae_digits/data --out data/lat
    sora-jax train --config configs/digits_latent.py --workdir runs/latent \\
        --config.autoencoder.path=runs/vae_digits --config.data.path=data/lat --config.data.content=latents

Reads every split of ``--data`` in order, encodes the clips with the VAE's EMA weights (posterior means,
normalised by the VAE's ``latent_stats.json``) and writes the same records with float16 latents in place of
the video (``sora_jax.data.records``; captions and labels kept) into ArrayRecord shards of ``--out``, plus a
``metadata.json`` naming the VAE and its checkpoint step. Text is not embedded here: the bundled text encoder
trains jointly with the DiT (a frozen encoder's embeddings belong here once one is configured). The output
folder appears atomically: a crash leaves no half-written dataset.

Wan 2.1 (``configs/wan_t2v_1_3b.py``): ``--vae`` a Wan workdir (``sora-jax import-diffusers``) encodes with its
VAE (normalised by the VAE's ``latents_mean`` / ``latents_std``, as ``WanPipeline`` does); ``--text_encoder
t5`` then takes the workdir's UMT5 folder, tokenizer and dtype. Clips of any size (``sora-jax ingest``) are
cut to one shape with ``--clip TxHxW`` at ``--fps`` (``sora_jax.data.buckets.load_clip``: a seeded start,
resized to cover, centre-cropped; clips too short are skipped and counted), as latent records have one shape::

    python -m data_pipelines.encode_latents --vae runs/wan --data data/mine --out data/mine_wan \
        --clip 33x480x832 --fps 16 --text_encoder t5 --max_length 512 --batch_size 1
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


def parse_clip(spec: str) -> tuple[int, int, int]:
    """``"TxHxW"`` -> (T, H, W)."""
    try:
        t, h, w = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"--clip {spec!r}: give frames x height x width, e.g. 33x480x832") from None
    return t, h, w


def _fitted_batches(
    data: Path, split: str, clip: tuple[int, int, int], fps: float, batch_size: int, seed: int, skipped: dict
):
    """Batches {video uint8 [b, T, H, W, 3], caption [b]} of a split's clips cut to ``clip`` (in stored
    order; ``load_clip`` with a start seeded by (seed, record)); clips too short are counted in
    ``skipped[split]``."""
    from sora_jax.data import pipeline
    from sora_jax.data.buckets import Bucket, load_clip

    source, bucket = pipeline.open_source(data, split), Bucket(*clip)
    videos, captions = [], []
    for i in range(len(source)):
        try:
            video, caption = load_clip(
                source[i], bucket, target_fps=fps, rng=np.random.default_rng([seed, i])
            )
        except ValueError:  # too short for the clip at this fps
            skipped[split] += 1
            continue
        videos.append(video)
        captions.append(caption)
        if len(videos) == batch_size:
            yield {"video": np.stack(videos), "caption": np.asarray(captions, object)}
            videos, captions = [], []
    if videos:
        yield {"video": np.stack(videos), "caption": np.asarray(captions, object)}


def encode_dataset(
    vae: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    clip: tuple[int, int, int] | None = None,
    fps: float = 0.0,
    seed: int = 0,
    progress=True,
):
    """Writes ``out`` (shards + metadata.json) from ``data`` through the VAE of workdir ``vae`` (a trained
    VAE's or a Wan workdir's); ``clip`` (T, H, W): every clip cut to that shape at ``fps`` first (0: the
    source's). Returns ``out``."""
    import jax
    import jax.numpy as jnp
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm.auto import tqdm

    from sora_jax.data import pipeline
    from sora_jax.data.records import encode_clip
    from sora_jax.models.autoencoder import video_to_float

    data, out = Path(data), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out (latents are never overwritten)")
    meta = pipeline.read_metadata(data)
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
            if clip is None:
                ds = pipeline.in_order(data, split, batch_size)
            else:
                ds = _fitted_batches(data, split, clip, fps, batch_size, seed, skipped)
            written = 0
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
            bar.close()
            writer.close()
            # the pixel-clip index (sizes per record) does not describe latents: dropped
            info = {k: v for k, v in info.items() if k != "index"}
            splits[split] = {**info, "num_clips": written, "shards": [name]}
        new_meta = {
            **{k: v for k, v in meta.items() if k != "splits"},
            "content": "latents",
            "latent_shape": latent_shape,
            "latent_dtype": "float16",
            "vae": str(Path(vae).absolute()),
            "vae_kind": kind,
            "vae_step": int(vae_step),
            "clip": list(clip) if clip else None,
            "fps": fps if clip and fps else meta.get("fps"),
            "skipped_short": skipped,
            "source": str(data.absolute()),
            "splits": splits,
        }
        (tmp / "metadata.json").write_text(json.dumps(new_meta))
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
    p.add_argument("--clip", default="", help="TxHxW: cut every clip to this shape first (ingested videos)")
    p.add_argument(
        "--fps", type=float, default=0.0, help="with --clip: frame rate to sample at (0: source's)"
    )
    p.add_argument("--seed", type=int, default=0, help="with --clip: seeds each clip's start")
    args = p.parse_args(argv)
    try:
        clip = parse_clip(args.clip) if args.clip else None
        path = encode_dataset(
            args.vae, args.data, args.out, batch_size=args.batch_size, clip=clip, fps=args.fps, seed=args.seed
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
