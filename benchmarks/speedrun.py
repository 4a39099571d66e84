"""Speedrun: quality per compute. Train a config for exactly ``--budget_s`` seconds of training, then score it.

    python benchmarks/speedrun.py --config configs/quickstart.py --budget_s 600
    python benchmarks/speedrun.py --config configs/digits_small.py --budget_s 300 --num_prompts 256 \\
        --override model.attention_impl=cudnn --out /tmp/record.json
    python benchmarks/speedrun.py --config configs/digits_latent.py --budget_s 550 \\
        --vae_config configs/vae_digits.py --vae_budget_s 300          # the latent path, VAE in the budget

Training runs through the project's trainer (``train`` with ``train.time_limit_s``), so the
budget counts training steps only: compiling the step and building the data are timed and reported apart.
The config's ``train.num_steps`` stays the learning-rate schedule's horizon (a run that gets there first
stops there). ``--sweep_cfg 3 6 9 [--sweep_steps 16 32] [--sweep_jitter 0 0.5]`` also samples the trained
checkpoint at other guidance scales / step counts / patch-grid jitter (sampling-time ablations, no retraining;
``--sweep_sheets DIR``: a contact sheet of the config's sample prompts per setting); ``--eval_only --workdir W`` scores an
existing run that way.
Then ``--num_prompts`` test-split captions (digit/direction combinations never seen in training) are sampled
with the config's sampler and read by the bundled digit reader (``sora-jax eval``'s adherence table);
``--num_prompts 0`` skips that (a throughput run); ``--split train`` (or ``paraphrase``) scores those captions
instead (the key ``adherence_<split>``).

The latent path: ``--vae_config C --vae_budget_s S`` first trains that VAE for S seconds of training (into
``<workdir>/vae``, the same trainer), scores its test reconstructions and measures the latent statistics
(``sora-jax eval``'s VAE report), then trains ``--config`` (a DiT on its latents, ``autoencoder.path`` set to
it) for ``--budget_s``; ``budget_total_s`` is the two trainings' seconds, to put against a pixel run's.

Throughput: model FLOPs per step are counted analytically (``sora_jax.models.dit.flops_per_token`` for the
DiT, the same count for a trainable text encoder; x3 for forward + backward; rematerialised recompute is not
model FLOPs), and MFU is taken against the device's matmul peak measured in this run with a large matmul in
the model's compute dtype. Prints a table and writes the JSON (``--out``, default
``benchmarks/results/speedrun.json``). Like ``sora-jax``, the script first re-executes itself with glibc's malloc
advising huge pages (``sora_jax.host_malloc``; ``SORA_JAX_HOST_MALLOC=default`` keeps it off). The records and every ablation live in ``benchmarks/SPEEDRUN.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from sora_jax import host_malloc


def matmul_peak(dtype: str, n: int | None = None, repeats: int = 10) -> dict:
    """Measured matmul throughput (TFLOP/s) of one ``[n, n] @ [n, n]`` in ``dtype`` on the default device."""
    if n is None:
        n = 8192 if jax.default_backend() == "gpu" else 1024
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    return {"dtype": dtype, "n": n, "seconds": sec, "tflops": 2.0 * n**3 / sec / 1e12}


def text_flops_per_step(cfg) -> float:
    """Forward FLOPs per batch of a trainable text encoder (frozen encoders are not trained: 0)."""
    from sora_jax.choices import TextEncoderKind

    if TextEncoderKind(cfg.text.encoder) is not TextEncoderKind.TRAINABLE:
        return 0.0
    W, L, d = cfg.text.width, cfg.text.max_length, cfg.text.depth
    per_token = d * (2 * 4 * W * W + 2 * 2 * L * W + 2 * 2 * W * 4 * W)
    return float(per_token * L * cfg.data.batch_size)


def model_flops_per_step(cfg) -> dict:
    """Analytic training FLOPs of one step (forward x3) for the config's batch and clip shape."""
    from sora_jax import factory
    from sora_jax.models.dit import flops_per_token, repa_flops_per_token
    from sora_jax.train import repa

    dit = factory.model_config(cfg)
    shape = factory.latent_shape(cfg)  # [T, H, W, C] of what the DiT sees
    pt, ph, pw = dit.patch_size
    tokens = shape[0] // pt * (shape[1] // ph) * (shape[2] // pw)
    dit_fwd = flops_per_token(dit, tokens, cfg.text.max_length) * tokens * cfg.data.batch_size
    text_fwd = text_flops_per_step(cfg)
    # REPA: the projector is trained (x3), the frozen encoder runs forward only (not in the step at all with
    # config.repa.precompute: once per train clip before the first step, its time inside the training seconds)
    # (config.repa.until < 1: the projector only in that share of the steps, so its mean per step)
    until = repa.until_step(cfg)
    share = 1.0 if until is None else until / max(1, cfg.train.num_steps)
    proj_fwd = repa_flops_per_token(dit) * tokens * cfg.data.batch_size * share
    encoder_fwd = repa.encoder_flops(cfg) * share
    return {
        "tokens_per_clip": tokens,
        "batch": int(cfg.data.batch_size),
        "dit_forward_gflop": dit_fwd / 1e9,
        "text_forward_gflop": text_fwd / 1e9,
        "repa_projector_forward_gflop": proj_fwd / 1e9,
        "repa_encoder_forward_gflop": encoder_fwd / 1e9,
        "train_gflop_per_step": (3.0 * (dit_fwd + text_fwd + proj_fwd) + encoder_fwd) / 1e9,
    }


def run(args: argparse.Namespace) -> dict:
    from sora_jax.config import load_config
    from sora_jax.train.loop import train

    cfg = load_config(args.config, args.override)
    # the budget ends the run; the config's train.num_steps stays the schedule's horizon (warmup + cosine),
    # so a run that reaches it before the budget ends there
    cfg.train.time_limit_s = float(args.budget_s)
    cfg.train.ckpt_every = 10_000_000  # one checkpoint, at the end
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="speedrun_"))
    vae = None
    if args.vae_config and not args.eval_only:
        vae = train_vae(args, workdir / "vae")
        from sora_jax.loading import resolve_autoencoder

        cfg.autoencoder.path = str(workdir / "vae")
        cfg = resolve_autoencoder(cfg)  # its architecture and latent statistics, for the FLOP count
    if args.eval_only:
        return {
            "config": args.config,
            "overrides": list(args.override),
            "workdir": str(workdir),
            **evaluate(workdir, args),
        }
    device = jax.devices()[0]
    dtype = cfg.model.dtype
    peak = matmul_peak(dtype)
    flops = model_flops_per_step(cfg)

    t0 = time.perf_counter()
    out = train(cfg, workdir, progress=args.progress, devices=jax.devices()[:1])
    total_train_call = time.perf_counter() - t0
    steps, train_s = int(out["steps_run"]), float(out["train_seconds"])
    steps_per_s = steps / train_s
    tflops = flops["train_gflop_per_step"] * steps_per_s / 1e3
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "config": args.config,
        "overrides": list(args.override),
        "device": f"{device.platform}: {device.device_kind}",
        "jax": jax.__version__,
        "host": platform.node(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # sora_jax.host_malloc (huge pages) or not
        "budget_s": float(args.budget_s),
        "steps": steps,
        "steps_per_s": steps_per_s,
        "tokens_per_s": steps_per_s * flops["tokens_per_clip"] * flops["batch"],
        "final_loss": out.get("loss"),
        **flops,
        "model_tflops": tflops,
        "peak_matmul": peak,
        "mfu": tflops / peak["tflops"],
        "seconds": {
            "compile": float(out["compile_seconds"]),
            "train": train_s,
            "input_wait": float(out["input_seconds"]),
            # config.repa.precompute: the encoder's pass over the train clips, inside "train" (it is training)
            "repa_precompute": float(out.get("repa_precompute_seconds", 0.0)),
            "data_and_setup": total_train_call - train_s - float(out["compile_seconds"]),
        },
        "workdir": str(workdir),
    }
    if vae is not None:
        result["vae"] = vae
        result["budget_total_s"] = vae["seconds"]["train"] + train_s
    if args.num_prompts:
        result |= evaluate(workdir, args)
        result["seconds"]["eval"] = result.pop("eval_seconds")
    return result


def train_vae(args: argparse.Namespace, vae_dir: Path) -> dict:
    """Trains ``--vae_config`` for ``--vae_budget_s`` seconds into ``vae_dir``, then scores it on test clips
    (PSNR / SSIM, EMA weights) and writes the latent statistics a latent DiT reads."""
    from sora_jax.config import load_config
    from sora_jax.eval.reconstruction import evaluate_vae
    from sora_jax.train.loop import train

    vcfg = load_config(args.vae_config, args.vae_override)
    vcfg.train.time_limit_s = float(args.vae_budget_s)
    vcfg.train.ckpt_every = 10_000_000
    t0 = time.perf_counter()
    out = train(vcfg, vae_dir, progress=args.progress, devices=jax.devices()[:1])
    call = time.perf_counter() - t0
    train_s, compile_s = float(out["train_seconds"]), float(out["compile_seconds"])
    t1 = time.perf_counter()
    rec = evaluate_vae(vae_dir, num_clips=256, split="test", progress=False)
    return {
        "config": args.vae_config,
        "overrides": list(args.vae_override),
        "steps": int(out["steps_run"]),
        "steps_per_s": int(out["steps_run"]) / train_s,
        "final_loss": out.get("loss"),
        "psnr_db": rec["psnr_db"],
        "ssim": rec["ssim"],
        "latent_shape": rec["latent_shape"],
        "seconds": {
            "compile": compile_s,
            "train": train_s,
            "data_and_setup": call - train_s - compile_s,
            "eval": time.perf_counter() - t1,
        },
    }


def by_objects(rows: list[dict]) -> dict:
    """The adherence of one-digit and two-digit prompts apart: {"1": {prompts, digits, both, object_directions},
    "2": ...} from ``evaluate_prompts``'s per-video rows; ``object_directions``: of the objects of the videos
    whose digits are right, the share read moving in their asked direction (None without such videos). Two
    objects also: ``object_swapped``, of those objects whose two asked directions differ, the share read moving
    the *other* object's way, and ``pair_same_direction``, of those videos, the share whose two digits are read
    moving the same way (one blob moving together)."""
    out = {}
    for n in sorted({len(r["intended"]) for r in rows}):
        part = [r for r in rows if len(r["intended"]) == n]
        asked = [(d, k, r["read"]) for r in part if r["digits_ok"] for d, k in r["intended"]]
        right = sum(any(rd == d and rk == k for rd, rk in read) for d, k, read in asked)
        out[str(n)] = {
            "prompts": len(part),
            "digits": sum(r["digits_ok"] for r in part) / len(part),
            "both": sum(r["both_ok"] for r in part) / len(part),
            "object_directions": right / len(asked) if asked else None,
        }
        if n == 2:
            pairs = [r for r in part if r["digits_ok"] and r["intended"][0][1] != r["intended"][1][1]]
            swapped = sum(
                any(rd == d and rk == other for rd, rk in r["read"])
                for r in pairs
                for (d, _), (_, other) in (r["intended"], r["intended"][::-1])
            )
            same = sum(len({k for _, k in r["read"]}) == 1 for r in pairs)
            out["2"]["object_swapped"] = swapped / (2 * len(pairs)) if pairs else None
            out["2"]["pair_same_direction"] = same / len(pairs) if pairs else None
    return out


def evaluate(workdir: Path, args: argparse.Namespace) -> dict:
    """The ``--split`` adherence table of the workdir's checkpoint (and apart by digits per prompt), and the
    sampling sweep."""
    from sora_jax.eval.evaluate import evaluate_workdir

    t0 = time.perf_counter()
    use_ema = False if args.raw_params else None  # None: the config's sample.use_ema (EMA)
    ev = evaluate_workdir(workdir, num_prompts=args.num_prompts, split=args.split, use_ema=use_ema)
    out = {
        f"adherence_{args.split}": ev["metrics"],
        "weights": "raw" if args.raw_params else "config (sample.use_ema)",
        "adherence_by_objects": by_objects(ev["per_video"]),
        "eval_seconds": time.perf_counter() - t0,
    }
    return out | {"sampling_sweep": sampling_sweep(workdir, args)}


def sampling_sweep(workdir: Path, args: argparse.Namespace) -> list[dict]:
    """The same checkpoint sampled at other guidance scales / step counts (sampling-time ablations: no
    retraining), each on the same test prompts and seeds."""
    from sora_jax.eval.evaluate import evaluate_workdir
    from sora_jax.sample.pipeline import load_pipeline
    from sora_jax.sample.video_io import contact_sheet

    rows = []
    grid = itertools.product(
        args.sweep_cfg or [None], args.sweep_steps or [None], args.sweep_jitter or [None]
    )
    for scale, steps, jitter in grid if args.sweep_cfg or args.sweep_steps or args.sweep_jitter else []:
        pipe = load_pipeline(workdir, cfg_scale=scale, sample_steps=steps, sample_jitter=jitter)
        ev = evaluate_workdir(
            workdir, num_prompts=args.num_prompts, split=args.split, pipeline=pipe, out=workdir / "sweep"
        )
        m, d = ev["metrics"], pipe.config.diffusion
        row = {
            "cfg_scale": d.cfg_scale,
            "sample_steps": d.sample_steps,
            "jitter": d.get("sample_jitter", 0.0),
        }
        if args.sweep_sheets:  # the config's sample prompts (the demo's), seed 0, one PNG per row
            prompts = list(pipe.config.sample.prompts)
            name = "_".join(f"{k}{v:g}" for k, v in row.items())
            row["sheet"] = str(Path(args.sweep_sheets) / f"{Path(args.out).stem}_{name}.png")
            contact_sheet(pipe.generate(prompts, seed=0), prompts, row["sheet"], scale=3)
        by = {k: m[k] for k in ("digit_accuracy", "direction_accuracy", "both_accuracy")}
        rows.append(row | by | {"by_objects": by_objects(ev["per_video"])})
    return rows


def table(r: dict) -> str:
    s = r["seconds"]
    rows = [
        ("config", f"{r['config']} {' '.join(r['overrides'])}".strip()),
        ("device", r["device"]),
        (
            "steps in budget",
            f"{r['steps']} in {s['train']:.1f} s ({r['steps_per_s']:.2f} steps/s, batch {r['batch']})",
        ),
        ("tokens/s", f"{r['tokens_per_s']:.0f}"),
        ("model TFLOP/s", f"{r['model_tflops']:.2f} ({r['train_gflop_per_step']:.1f} GFLOP/step)"),
        (
            "matmul peak",
            f"{r['peak_matmul']['tflops']:.2f} TFLOP/s ({r['peak_matmul']['dtype']}, n={r['peak_matmul']['n']})",
        ),
        ("MFU", f"{100 * r['mfu']:.1f}%"),
        *_vae_rows(r),
        (
            "compile / setup / input wait",
            f"{s['compile']:.1f} / {s['data_and_setup']:.1f} / {s['input_wait']:.1f} s",
        ),
    ]
    split = next((k for k in r if k.startswith("adherence_") and k != "adherence_by_objects"), None)
    if split is not None:
        a = r[split]
        rows.append(
            (
                f"{a['split']} adherence ({a['count']} prompts)",
                f"digits {a['digit_accuracy']:.3f}  directions {a['direction_accuracy']:.3f}  "
                f"both {a['both_accuracy']:.3f}  (eval {s['eval']:.1f} s)",
            )
        )
        for n, b in r.get("adherence_by_objects", {}).items():
            rows.append(
                (f"  {n}-digit prompts ({b['prompts']})", f"digits {b['digits']:.3f}  both {b['both']:.3f}")
            )
    for row in r.get("sampling_sweep", []):
        rows.append(
            (
                f"  at cfg {row['cfg_scale']:g}, {row['sample_steps']} steps, jitter {row.get('jitter', 0):g}",
                f"digits {row['digit_accuracy']:.3f}  directions {row['direction_accuracy']:.3f}  "
                f"both {row['both_accuracy']:.3f}",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _vae_rows(r: dict) -> list[tuple[str, str]]:
    v = r.get("vae")
    if v is None:
        return []
    return [
        (
            "VAE (first)",
            f"{v['steps']} steps in {v['seconds']['train']:.1f} s ({v['config']}), test PSNR "
            f"{v['psnr_db']:.2f} dB, SSIM {v['ssim']:.3f}",
        ),
        ("training, VAE + DiT", f"{r['budget_total_s']:.1f} s"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="config file[:arg]")
    p.add_argument("--budget_s", type=float, default=0.0, help="seconds of training (compile excluded)")
    p.add_argument("--eval_only", action="store_true", help="score --workdir's checkpoint, no training")
    p.add_argument("--raw_params", action="store_true", help="score the trained parameters, not their EMA")
    p.add_argument("--num_prompts", type=int, default=256, help="test prompts to score (0: none)")
    p.add_argument(
        "--split",
        default="test",
        choices=("test", "train", "paraphrase"),
        help="the captions scored (default test)",
    )
    p.add_argument("--override", nargs="*", default=[], help="config overrides key=value")
    p.add_argument("--workdir", default="", help="run folder (default: a fresh temporary one)")
    p.add_argument("--out", default="benchmarks/results/speedrun.json")
    p.add_argument("--progress", action="store_true", help="show the training progress bar")
    p.add_argument(
        "--sweep_cfg", type=float, nargs="*", default=[], help="also sample at these guidance scales"
    )
    p.add_argument("--sweep_steps", type=int, nargs="*", default=[], help="... and these sampler step counts")
    p.add_argument(
        "--sweep_jitter",
        type=float,
        nargs="*",
        default=[],
        help="... and these diffusion.sample_jitter values",
    )
    p.add_argument(
        "--sweep_sheets", default="", help="a folder: a contact sheet of the sample prompts per row"
    )
    p.add_argument(
        "--vae_config", default="", help="the latent path: train this VAE first (config file[:arg])"
    )
    p.add_argument(
        "--vae_budget_s", type=float, default=0.0, help="seconds of VAE training (with --vae_config)"
    )
    p.add_argument("--vae_override", nargs="*", default=[], help="VAE config overrides key=value")
    args = p.parse_args(argv)
    if args.vae_config and args.vae_budget_s <= 0 and not args.eval_only:
        print(
            f"speedrun: --vae_budget_s must be positive with --vae_config, got {args.vae_budget_s}",
            file=sys.stderr,
        )
        return 2
    if args.eval_only:
        if not args.workdir:
            print("speedrun: --eval_only needs --workdir (a trained run)", file=sys.stderr)
            return 2
        result = run(args)
        print(json.dumps({k: result[k] for k in (f"adherence_{args.split}", "sampling_sweep")}, indent=1))
        return _write(result, args.out)
    if args.budget_s <= 0:
        print(f"speedrun: --budget_s must be positive, got {args.budget_s}", file=sys.stderr)
        return 2
    if args.workdir and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        print(
            f"speedrun: --workdir {args.workdir} is not empty (a speedrun starts from scratch)",
            file=sys.stderr,
        )
        return 2
    result = run(args)
    print(table(result))
    return _write(result, args.out)


def _write(result: dict, path: str) -> int:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    host_malloc.reexec_with_huge_pages()  # as `sora-jax` does (the demo's runtime); nothing of JAX has run yet
    sys.exit(main())
