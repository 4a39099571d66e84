"""Export parity on a trained model: ``sora-jax export``, then the same prompts from the same initial noise
through the JAX sampler and through the exported ``SoraPipeline`` (PyTorch + diffusers, in a child process
without JAX), then ``sora-jax import`` back and a bitwise comparison of the parameters.

    python benchmarks/export_parity.py --workdir runs/demo --out benchmarks/results/export_parity_demo.json

Prints a table and writes JSON: export seconds and size, sampling seconds on each side, the frames' mean and
largest absolute difference in [-1, 1], the share of equal uint8 pixels, and whether the import restored every
parameter bitwise. Prompts: the config's ``sample.prompts`` (the demo's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, sys, time
import numpy as np, torch
folder, tmp = sys.argv[1], sys.argv[2]
sys.path.insert(0, folder)
from sora_torch import SoraPipeline
assert "jax" not in sys.modules
prompts = json.load(open(tmp + "/prompts.json"))
pipe = SoraPipeline.from_pretrained(folder)
noise = torch.from_numpy(np.load(tmp + "/noise.npy")).permute(0, 4, 1, 2, 3)
pipe(prompts, latents=noise, output_type="np")  # warm-up, as on the JAX side
t0 = time.perf_counter()
out = pipe(prompts, latents=noise, output_type="np")
seconds = time.perf_counter() - t0
np.save(tmp + "/frames.npy", out.frames)
json.dump({"seconds": seconds, "torch": torch.__version__}, open(tmp + "/child.json", "w"))
"""


def run(args: argparse.Namespace) -> dict:
    from sora_jax import api, loading
    from sora_jax.export.importer import import_folder
    from sora_jax.export.writer import export
    from sora_jax.models.autoencoder import float_to_video

    tmp = Path(tempfile.mkdtemp(prefix="export_parity_"))
    folder = tmp / "exported"
    exp = export(args.workdir, folder, dtype="float32")

    pipe = api.load_pipeline(args.workdir)
    prompts = list(pipe.config.sample.prompts)[: args.num_prompts]
    noise = np.random.default_rng(args.seed).standard_normal((len(prompts), *pipe.sampler.latent_shape))
    noise = noise.astype(np.float32)
    pipe.generate_latents(prompts, noise=noise)  # compile (for this batch shape) outside the timing
    t0 = time.perf_counter()
    latents = pipe.generate_latents(prompts, noise=noise)
    jax_seconds = time.perf_counter() - t0
    videos = np.asarray(pipe.autoencoder.decode(latents))  # float32 [B, T, H, W, 3] in [-1, 1]

    np.save(tmp / "noise.npy", noise)
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp)], check=True)
    child = json.loads((tmp / "child.json").read_text())
    frames = np.load(tmp / "frames.npy") * 2.0 - 1.0
    diff = np.abs(frames - videos)

    imported = tmp / "imported"
    import_folder(folder, imported)
    _, _, _, a = loading.restore(args.workdir)
    _, _, _, b = loading.restore(imported)
    bitwise = all(
        np.array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()))
        for (_, x), (_, y) in zip(a.flat_state(), b.flat_state())
    )
    cfg = pipe.config.diffusion
    return {
        "date": time.strftime("%Y-%m-%d"),
        "workdir": str(args.workdir),
        "step": int(exp["step"]),
        "parameters": int(exp["parameters"]),
        "export_seconds": float(exp["seconds"]),
        "export_files": int(exp["files"]),
        "sampler": f"{cfg.sampler}, {cfg.sample_steps} steps, guidance {cfg.cfg_scale:g}",
        "prompts": prompts,
        "jax_sample_seconds": jax_seconds,
        "torch_sample_seconds": float(child["seconds"]),
        "torch": child["torch"],
        "frames_mean_abs_diff": float(diff.mean()),
        "frames_max_abs_diff": float(diff.max()),
        "uint8_equal_fraction": float((float_to_video(frames) == float_to_video(videos)).mean()),
        "import_params_bitwise": bool(bitwise),
    }


def table(r: dict) -> str:
    rows = [
        ("model", f"{r['workdir']} step {r['step']} ({r['parameters']:,} parameters)"),
        ("export", f"{r['export_seconds']:.1f} s, {r['export_files']} files"),
        ("sampler", r["sampler"]),
        (
            f"sampling {len(r['prompts'])} prompts",
            f"JAX {r['jax_sample_seconds']:.2f} s, PyTorch {r['torch_sample_seconds']:.2f} s",
        ),
        (
            "frames |JAX - PyTorch| in [-1, 1]",
            f"mean {r['frames_mean_abs_diff']:.2e}, max {r['frames_max_abs_diff']:.2e}",
        ),
        ("uint8 pixels equal", f"{r['uint8_equal_fraction']:.4f}"),
        ("import: parameters bitwise", str(r["import_params_bitwise"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a trained text-to-video workdir")
    p.add_argument("--num_prompts", type=int, default=8, help="how many of the config's sample prompts")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--out", default="benchmarks/results/export_parity.json")
    args = p.parse_args(argv)
    if not (Path(args.workdir) / "checkpoints").is_dir():
        print(f"export_parity: {args.workdir} has no checkpoints (train first)", file=sys.stderr)
        return 2
    r = run(args)
    print(table(r))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
