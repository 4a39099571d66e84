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
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np


def encode_dataset(
    vae: str | Path, data: str | Path, out: str | Path, *, batch_size: int = 32, progress=True
):
    """Writes ``out`` (shards + metadata.json) from ``data`` through the VAE of workdir ``vae``; returns it."""
    import jax
    import jax.numpy as jnp
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm.auto import tqdm

    from sora_jax.data import pipeline
    from sora_jax.data.records import encode_clip
    from sora_jax.loading import load_vae_codec
    from sora_jax.models.autoencoder import video_to_float

    data, out = Path(data), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --out (latents are never overwritten)")
    meta = pipeline.read_metadata(data)
    codec = load_vae_codec(vae)
    # the VAE's weights are an argument of the compiled encoder, not constants baked into it
    encode_fn = jax.jit(lambda p, v: codec.with_params(p).encode(video_to_float(v)))
    params = jax.device_put(codec.params)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        splits = {}
        for split, info in meta["splits"].items():
            ds = pipeline.in_order(data, split, batch_size)
            name = f"{split}-00000-of-00001.array_record"
            writer = ArrayRecordWriter(str(tmp / name), "group_size:1")
            bar = tqdm(total=info["num_clips"], desc=f"encode {split}", disable=not progress)
            for batch in ds:
                latents = np.asarray(encode_fn(params, jnp.asarray(batch["video"]))).astype(np.float16)
                for i in range(len(latents)):
                    writer.write(
                        encode_clip(
                            latents[i], str(batch["caption"][i]), batch["digits"][i], batch["directions"][i]
                        )
                    )
                bar.update(len(latents))
            bar.close()
            writer.close()
            # the pixel-clip index (sizes per record) does not describe latents: dropped
            splits[split] = {**{k: v for k, v in info.items() if k != "index"}, "shards": [name]}
            latent_shape = list(latents.shape[1:])
        new_meta = {
            **{k: v for k, v in meta.items() if k != "splits"},
            "content": "latents",
            "latent_shape": latent_shape,
            "latent_dtype": "float16",
            "vae": str(Path(vae).absolute()),
            "vae_step": codec.step,
            "source": str(data.absolute()),
            "splits": splits,
        }
        (tmp / "metadata.json").write_text(json.dumps(new_meta))
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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
    p.add_argument("--text_path", default="", help="t5: the Hugging Face folder")
    p.add_argument("--max_length", type=int, default=24, help="tokens per caption (config.text.max_length)")
    args = p.parse_args(argv)
    try:
        path = encode_dataset(args.vae, args.data, args.out, batch_size=args.batch_size)
        if args.text_encoder:
            from data_pipelines.encode_text import encode_text

            splits = list(json.loads((Path(path) / "metadata.json").read_text())["splits"])
            encode_text(
                path,
                encoder=args.text_encoder,
                path=args.text_path,
                max_length=args.max_length,
                splits=splits,
            )
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, KeyError) as e:
        print(f"encode_latents: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
