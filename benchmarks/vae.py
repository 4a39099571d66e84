"""VAE decode (and encode) cost versus clip length: full pass against temporal chunks with causal caches.

    python benchmarks/vae.py                                   # base VAE, 256x256, 2 / 10 / 60 s at 24 fps
    python benchmarks/vae.py --variant digits --height 32 --width 32 --seconds 1 4 16 --run

For every length it compiles the full decode of the whole latent clip and one chunk step of
``decode_chunked``, and reports XLA's per-device memory analysis (arguments + temporaries + outputs: the
peak of that computation). Chunked decoding runs the same chunk step over and over, handing frames to a sink,
so its device memory does not depend on the clip length. ``--run`` also decodes (and encodes) for real and
reports frames per second. Prints a table and writes ``benchmarks/results/vae_<variant>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models import vae as vae_lib


def _peak_gib(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (
        m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    ) / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="base", choices=sorted(vae_lib.VAE_VARIANTS))
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--seconds", type=float, nargs="+", default=[2, 10, 60])
    p.add_argument("--chunk_latents", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--run", action="store_true", help="also decode/encode for real and time it")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()

    cfg = vae_lib.vae_config(args.variant, dtype=args.dtype)
    model = vae_lib.VideoVAE(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    f, s = cfg.temporal_downsample, cfg.spatial_downsample
    h, w, zc = args.height // s, args.width // s, cfg.latent_channels
    dt = jnp.dtype(args.dtype)

    def full(st, z):
        return nnx.merge(graphdef, st).decode(z)

    step = vae_lib._jitted_decode(graphdef)
    # the steady-state chunk: chunk_latents latents plus the caches a previous chunk leaves
    first_z = jax.ShapeDtypeStruct((1, 1, h, w, zc), dt)
    _, caches = jax.eval_shape(lambda st, z: nnx.merge(graphdef, st).decode_with_caches(z), state, first_z)
    chunk_z = jax.ShapeDtypeStruct((1, args.chunk_latents, h, w, zc), dt)
    chunk_compiled = step.lower(state, chunk_z, caches).compile()
    chunk_peak = _peak_gib(chunk_compiled)

    rows = []
    for sec in args.seconds:
        frames = int(round(sec * args.fps))
        latents = 1 + -(-(frames - 1) // f)  # ceil: pad to 1 + f k frames
        frames = 1 + f * (latents - 1)
        z_abs = jax.ShapeDtypeStruct((1, latents, h, w, zc), dt)
        t0 = time.perf_counter()
        full_peak = _peak_gib(jax.jit(full).lower(state, z_abs).compile())
        compile_s = time.perf_counter() - t0
        row = {
            "seconds": sec,
            "frames": frames,
            "latent_frames": latents,
            "full_peak_gib": full_peak,
            "chunked_peak_gib": chunk_peak,
            "full_compile_s": compile_s,
        }
        if args.run:
            z = jax.random.normal(jax.random.key(0), z_abs.shape, dt)
            counted = []
            vae_lib.decode_chunked(model, z[:, : 1 + args.chunk_latents], args.chunk_latents)  # warm up
            t0 = time.perf_counter()
            vae_lib.decode_chunked(model, z, args.chunk_latents, sink=lambda fr: counted.append(fr.shape[1]))  # noqa: B023
            row["chunked_decode_fps"] = sum(counted) / (time.perf_counter() - t0)
            x = jax.random.uniform(jax.random.key(1), (1, frames, args.height, args.width, 3), dt, -1, 1)
            vae_lib.encode_chunked(model, x[:, : 1 + 4 * f], 4 * f)  # warm up
            t0 = time.perf_counter()
            jax.block_until_ready(vae_lib.encode_chunked(model, x, 4 * f))
            row["chunked_encode_fps"] = frames / (time.perf_counter() - t0)
        rows.append(row)

    device = jax.devices()[0]
    header = (
        f"VAE {args.variant} ({vae_lib.param_count(cfg) / 1e6:.0f}M params), {args.height}x{args.width}, "
    )
    header += f"{args.dtype}, {device.device_kind} ({device.platform}), chunk = {args.chunk_latents} latents"
    print(header)
    cols = ["seconds", "frames", "latent_frames", "full_peak_gib", "chunked_peak_gib"]
    cols += ["chunked_decode_fps", "chunked_encode_fps"] if args.run else []
    print(" | ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>18.3f}" if isinstance(r[c], float) else f"{r[c]:>18}" for c in cols))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "vae",
        "variant": args.variant,
        "height": args.height,
        "width": args.width,
        "dtype": args.dtype,
        "chunk_latents": args.chunk_latents,
        "device": f"{device.device_kind} ({device.platform})",
        "host": platform.node(),
        "jax": jax.__version__,
        "rows": rows,
    }
    path = out / f"vae_{args.variant}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
