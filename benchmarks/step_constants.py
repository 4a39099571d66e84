"""What a latent DiT's compiled train step carries baked in: its largest constant and its program size, with
the frozen VAE passed as an argument (the trainer's way) next to the VAE's encoder with its weights closed
over (how a frozen model becomes a compiled constant).

    python benchmarks/step_constants.py --vae_variant base --frames 9 --size 64

The VAE's weights are random (sizes are what matter); the DiT is ``configs/digits_latent.py``'s. Prints a
table and writes ``benchmarks/results/step_constants.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np


def measure(vae_variant: str, frames: int, size: int) -> dict:
    from flax import nnx

    from sora_jax import factory, loading
    from sora_jax.config import load_config
    from sora_jax.models.vae import VideoVAE
    from sora_jax.train.loop import largest_constant, train

    vcfg = factory.vae_config(
        load_config(
            "configs/vae_digits.py",
            [f"vae.variant={vae_variant}", "vae.base_width=0", "vae.latent_channels=0"],
        )
    )
    t0 = time.perf_counter()
    params = nnx.state(VideoVAE(vcfg, rngs=nnx.Rngs(0)), nnx.Param)
    init_s = time.perf_counter() - t0
    leaves = jax.tree.leaves(params)
    codec = factory.vae_codec(vcfg, 0.0, 1.0).with_params(params)
    loading.load_autoencoder = lambda cfg: codec  # the VAE "loaded" (random weights)
    cfg = ml_collections.ConfigDict(
        load_config(
            "configs/digits_latent.py",
            [
                "mesh.data=1",
                "data.batch_size=1",
                f"data.num_frames={frames}",
                f"data.height={size}",
                f"data.width={size}",
            ],
        ).to_dict()
    )
    cfg.autoencoder.vae = dataclasses.asdict(vcfg)
    cfg.autoencoder.shift, cfg.autoencoder.scale, cfg.autoencoder.vae_step = 0.0, 1.0, 0
    t0 = time.perf_counter()
    out = train(cfg, tempfile.mkdtemp(), compile_only=True, progress=False, devices=jax.devices()[:1])
    compile_s = time.perf_counter() - t0
    video = jax.ShapeDtypeStruct((1, frames, size, size, 3), np.float32)
    closed = jax.jit(lambda v: codec.encode(v)).lower(video).as_text()
    closed_bytes, closed_type = largest_constant(closed)
    return {
        "vae_variant": vae_variant,
        "vae_params": int(sum(x.size for x in leaves)),
        "vae_param_bytes": int(sum(x.nbytes for x in leaves)),
        "vae_largest_kernel_bytes": int(max(x.nbytes for x in leaves)),
        "clip": f"{frames}x{size}x{size}",
        "step_largest_constant_bytes": int(out["largest_constant_bytes"]),
        "step_largest_constant": out["largest_constant"],
        "step_peak_gib": out.get("peak_gib"),
        "encoder_closed_over_largest_constant_bytes": closed_bytes,
        "encoder_closed_over_largest_constant": closed_type,
        "encoder_closed_over_hlo_chars": len(closed),
        "seconds": {"vae_init": init_s, "build_and_compile_step": compile_s},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae_variant", default="base")
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/step_constants.json")
    args = p.parse_args(argv)
    r = measure(args.vae_variant, args.frames, args.size)
    rows = [
        (
            "VAE",
            f"{r['vae_variant']}: {r['vae_params'] / 1e6:.1f}M params, largest kernel "
            f"{r['vae_largest_kernel_bytes'] / 2**20:.2f} MiB",
        ),
        (
            "train step (VAE as argument)",
            f"largest constant {r['step_largest_constant_bytes']} bytes ({r['step_largest_constant']})",
        ),
        (
            "encoder, weights closed over",
            f"largest constant {r['encoder_closed_over_largest_constant_bytes']} "
            f"bytes ({r['encoder_closed_over_largest_constant']})",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
