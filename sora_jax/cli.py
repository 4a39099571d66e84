"""The ``sora-jax`` command line: each command parses its flags and calls one library function with typed
arguments (``sora_jax.commands``, ``sora_jax.demo``, ``sora_jax.data.ingest``, ``sora_jax.train.checkpoint``).

Errors: the project's user errors (``sora_jax.errors.UserError`` and its subclasses such as ``ConfigError``,
the checkpoint errors, a NaN stop) and missing / unreadable user paths print one line,
``sora-jax: error: ...``, and exit 2 (3: a prompt the safety policy refuses, ``sora_jax.errors.PromptRefused``;
the line names the rule, never the prompt). Anything else is a bug: its traceback is printed and the exit is 1.
``SORA_JAX_DEBUG=1`` re-raises every error (tracebacks for user errors too, post-mortem debugging).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback

from sora_jax import host_malloc
from sora_jax.choices import SampleMode
from sora_jax.errors import PATH_ERRORS, UserError


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes ``main`` prints as one line (exit 2) instead of a traceback: the project's
    ``UserError`` (config, checkpoint, non-finite loss, input checks) and OS errors of user paths."""
    return (UserError, *PATH_ERRORS)


def _add_multiprocess_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--num_processes", type=int, default=None, help="processes in the job (env JAX_NUM_PROCESSES)"
    )
    p.add_argument("--process_id", type=int, default=None, help="this process's index (env JAX_PROCESS_ID)")
    p.add_argument(
        "--coordinator_address", default=None, help="HOST:PORT of process 0 (env JAX_COORDINATOR_ADDRESS)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sora-jax", description="Sora-style text-to-video in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="build the bundled data, train the quickstart config, sample, evaluate")
    p.add_argument("--workdir", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the same steps at a seconds-long size (configs/quickstart.py:smoke_eval, 8 test prompts): a check",
    )

    p = sub.add_parser(
        "train",
        help="train a config in a workdir (resumes from its checkpoints)",
        description="Train a config; override keys with --config.key=value (e.g. --config.train.num_steps=100).",
    )
    p.add_argument("--config", required=True, help="config file, path.py[:arg]")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and TensorBoard events go here")
    p.add_argument(
        "--compile_only", action="store_true", help="lower and compile the step, print memory, exit"
    )
    p.add_argument(
        "--cpu_devices",
        type=int,
        default=None,
        help="run on N fake CPU devices (with --compile_only: per-device memory of a pod mesh, on a laptop)",
    )
    _add_multiprocess_flags(p)

    p = sub.add_parser(
        "sample",
        help="generate videos from the latest checkpoint in a workdir (t2v, i2v, extend, connect, edit, loop, long)",
        description="Modes: t2v (default); i2v --image F; extend --video F [--direction forward|backward]; "
        "connect --video A --video B; edit --video F --strength s; loop; long --seconds N. "
        "Inputs are resized and centre-cropped to the model's frame.",
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several in t2v)")
    p.add_argument("--out", required=True, help="folder for the MP4/GIF files and the contact sheet")
    p.add_argument("--mode", default=SampleMode.T2V.value, choices=[m.value for m in SampleMode])
    p.add_argument("--image", default=None, help="i2v: the image to animate")
    p.add_argument("--video", action="append", default=None, help="extend/edit: a video; connect: two")
    p.add_argument("--direction", default="forward", choices=["forward", "backward"], help="extend")
    p.add_argument("--strength", type=float, default=0.6, help="edit: noise level to start from, (0, 1]")
    p.add_argument("--seconds", type=float, default=60.0, help="long: length at the model's fps")
    p.add_argument("--overlap", type=int, default=1, help="latent frames given at each seam")
    p.add_argument("--negative_prompt", default=None, help="the unconditional branch of guidance")
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        help="a LoRA adapter file or folder (diffusers / ComfyUI / kohya layout), optionally :WEIGHT "
        "(A.safetensors:0.8); repeat for several",
    )
    p.add_argument(
        "--lora_unmerged",
        action="store_true",
        help="keep the --lora adapters beside the kernels (exact, slower per step) instead of merging them",
    )
    p.add_argument("--guidance_rescale", type=float, default=0.0, help="phi of guidance rescale (e.g. 0.7)")
    p.add_argument(
        "--history_guidance", type=float, default=0.0, help="given-frame modes: history guidance scale w"
    )
    p.add_argument("--fsdp", type=int, default=0, help="shard the parameters over N local devices")
    p.add_argument("--bucket", default="", help="clip shape TxHxW (default: the config's first bucket)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's)")
    p.add_argument("--cfg_scale", type=float, default=None, help="classifier-free guidance scale")

    p = sub.add_parser(
        "detect",
        help="does each video carry this system's watermark (p-value, payload) and a valid provenance record",
        description="Blind watermark detection (sora_jax/safety/watermark.py) and provenance validation (the "
        "MP4's C2PA manifest or its sidecar JSON, sora_jax/safety/provenance.py), one line per video.",
    )
    p.add_argument("videos", nargs="+", help="video files (MP4, GIF, ...)")
    p.add_argument("--json", action="store_true", help="one JSON list with every number instead of lines")
    p.add_argument(
        "--trust_anchors", default=None, help="PEM file of the CA certificates whose C2PA signers are trusted"
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="also name the checkpoint of this workdir whose payload a video carries",
    )

    p = sub.add_parser(
        "eval",
        help="score a workdir: prompt adherence on test prompts (DiT), or reconstruction PSNR/SSIM (VAE)",
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--num_prompts", type=int, default=64)
    p.add_argument("--num_clips", type=int, default=256, help="VAE workdirs: clips to reconstruct")
    p.add_argument("--raw_params", action="store_true", help="score the raw parameters, not the EMA")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "test", "paraphrase"],
        help="paraphrase: prompts in wordings the captions never use (DiT only)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="report folder (default: <workdir>/eval)")
    p.add_argument(
        "--data",
        default=None,
        help="dataset to draw captions and reference clips from (default: the workdir's; for precomputed "
        "latents, the clips they were made from)",
    )
    p.add_argument(
        "--prompting",
        action="store_true",
        help="DiT: score i2v, extend, connect and --seconds long videos instead (sora_jax/eval/prompting.py)",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="--prompting: length of the long videos")
    p.add_argument("--num_long", type=int, default=8, help="--prompting: number of long videos")
    p.add_argument("--overlap", type=int, default=1, help="--prompting: latent frames given at each seam")
    p.add_argument(
        "--metrics",
        default=None,
        help="comma list of adherence,fvd,fd_digits,fd_frames,psnr: one JSON report of those "
        "(metric, value, count, step, seconds) and a table (sora_jax/eval/suite.py)",
    )
    p.add_argument("--num_videos", type=int, default=64, help="--metrics: videos to sample and score")
    p.add_argument("--step", type=int, default=None, help="--metrics: checkpoint step (default: latest)")
    p.add_argument(
        "--ref_count", type=int, default=None, help="--metrics: reference clips of the split (default: all)"
    )
    p.add_argument(
        "--compare", default=None, help="--metrics: a second workdir scored the same way, side by side"
    )
    p.add_argument("--compare_step", type=int, default=None, help="--compare: its step (default: latest)")

    p = sub.add_parser(
        "ingest",
        help="videos + a captions file -> a dataset folder of H.264 clips (resumable, parallel)",
        description="Cut videos into captioned clips stored as H.264 in ArrayRecord shards "
        "(data_pipelines.ingest); rerun to resume.",
    )
    from sora_jax.data.ingest import add_arguments as add_ingest_arguments

    add_ingest_arguments(p)

    p = sub.add_parser(
        "export",
        help="write a workdir's model as a diffusers-layout folder that runs in plain PyTorch (sora_torch/)",
        description="Writes DIR: model_index.json, transformer/, vae/, scheduler/, text_encoder/, tokenizer/, "
        "the PyTorch twins (sora_torch/) and generate.py; from sora_torch import SoraPipeline with DIR on "
        "sys.path. Nothing is written unless every tensor checks out.",
    )
    p.add_argument("--workdir", required=True, help="a text-to-video workdir with checkpoints")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument(
        "--dtype",
        default=None,
        help="weights dtype: float32 | bfloat16 (default: float32; diffusers: the checkpoint's)",
    )
    p.add_argument("--raw_params", action="store_true", help="export the raw parameters, not the EMA")
    p.add_argument(
        "--format",
        default="torch",
        choices=["torch", "diffusers"],
        help="torch: PyTorch twins + SoraPipeline; diffusers: a Wan workdir as diffusers' own WanPipeline folder",
    )
    p.add_argument("--max_shard_mb", type=int, default=None, help="diffusers: transformer shard size in MB")

    p = sub.add_parser(
        "import",
        help="bring a folder written by `sora-jax export` back into a JAX workdir (train on, sample)",
    )
    p.add_argument("--from", dest="src", required=True, help="the exported folder")
    p.add_argument("--workdir", required=True, help="the new workdir (must not exist, or be empty)")

    p = sub.add_parser(
        "import-diffusers",
        help="turn a diffusers Wan 2.1 folder (WanPipeline) into a workdir to sample, export or fine-tune",
        description="Reads model_index.json, transformer/, vae/, text_encoder/ (UMT5), tokenizer/ and "
        "scheduler/ of DIR; writes WORKDIR with an orbax checkpoint at step 0 and the config "
        "(model.arch = wan). The text encoder, tokenizer and scheduler stay in DIR (recorded).",
    )
    p.add_argument("--from", dest="src", required=True, help="the diffusers Wan 2.1 folder")
    p.add_argument("--workdir", required=True, help="the new workdir (must not exist, or be empty)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="transformer + UMT5")
    p.add_argument("--num_frames", type=int, default=None, help="video length to sample (default 81)")
    p.add_argument("--height", type=int, default=None, help="video height (default 480)")
    p.add_argument("--width", type=int, default=None, help="video width (default 832)")

    p = sub.add_parser(
        "checkpoints",
        help="list a workdir's checkpoints: step, time, size, config summary, training data card",
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _print_checkpoints(rows: list[dict], as_json: bool) -> None:
    if as_json:
        import json

        print(json.dumps(rows, indent=1))
        return
    print(f"{'step':>8}  {'saved':19}  {'size':>9}  config / data card")
    for r in rows:
        step = str(r["step"]) if r["complete"] else r["name"]
        print(f"{step:>8}  {r['time']:19}  {r['bytes'] / 2**20:7.2f} MB  {r['config']}")
        if r["complete"]:
            card = r.get("datacard")
            data = f"data card {card['hash'][:12]}: {card['summary']}" if card else "no data card"
            print(f"{'':>8}  {'':19}  {'':>9}  {data}")


def _print_scalars(metrics: dict) -> None:
    """``key=value`` for every scalar (floats to 4 significant digits) on one line."""
    words = []
    for k, v in metrics.items():
        if isinstance(v, float):
            words.append(f"{k}={v:.4g}")
        elif isinstance(v, bool | int) or (isinstance(v, str) and v and not any(c.isspace() for c in v)):
            words.append(f"{k}={v}")
    print(" ".join(words))


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run(argv: list[str]) -> int:
    """Parses ``argv`` and runs the command; errors propagate (``main`` reports them)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [r for r in rest if r.startswith("--config.")]
    unknown = [r for r in rest if not r.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and args.command not in ("train", "sample"):
        parser.error("--config.* overrides are only for `sora-jax train` (and --config.safety.* for sample)")
    if args.command == "sample" and any(not o.startswith("--config.safety.") for o in overrides):
        parser.error("sample takes --config.safety.* overrides only (the safeguards of this run)")
    _setup_logging()

    if args.command == "ingest":  # before anything imports jax: ingest spawns worker processes
        from sora_jax.data.ingest import ingest, summary

        report = ingest(
            args.videos,
            args.captions,
            args.out,
            clip_seconds=args.clip_seconds,
            min_frames=args.min_frames,
            max_short_side=args.max_short_side,
            crf=args.crf,
            shard_mb=args.shard_mb,
            videos_per_unit=args.videos_per_unit,
            workers=args.workers,
            progress=not args.no_progress,
            require_license=args.require_license,
        )
        print(summary(report))
    elif args.command == "train":
        from sora_jax import commands

        result = commands.train(
            args.config,
            args.workdir,
            overrides=overrides,
            compile_only=args.compile_only,
            cpu_devices=args.cpu_devices,
            num_processes=args.num_processes,
            process_id=args.process_id,
            coordinator_address=args.coordinator_address,
        )
        _print_scalars(result)
    elif args.command == "demo":
        from sora_jax.demo import run_demo

        if args.smoke:
            run_demo(args.workdir, config_arg="smoke_eval", num_eval_prompts=8, long_seconds=2.0)
        else:
            run_demo(args.workdir)
    elif args.command == "sample":
        from sora_jax import commands

        print(
            commands.sample(
                args.workdir,
                args.prompt,
                args.out,
                mode=SampleMode(args.mode),
                image=args.image,
                videos=args.video or (),
                direction=args.direction,
                strength=args.strength,
                seconds=args.seconds,
                overlap=args.overlap,
                negative_prompt=args.negative_prompt,
                guidance_rescale=args.guidance_rescale,
                history_guidance=args.history_guidance,
                fsdp=args.fsdp,
                bucket=args.bucket,
                seed=args.seed,
                steps=args.steps,
                cfg_scale=args.cfg_scale,
                safety_overrides=overrides,
                loras=args.lora or (),
                lora_unmerged=args.lora_unmerged,
            )
        )
    elif args.command == "detect":
        from sora_jax import commands

        reports = commands.detect(args.videos, trust_anchors=args.trust_anchors, workdir=args.workdir)
        if args.json:
            print(json.dumps(reports, indent=2))
        else:
            for r in reports:
                print(r["line"])
    elif args.command == "eval" and args.metrics is not None:
        from sora_jax import commands

        report = commands.evaluate_metrics(
            args.workdir,
            args.metrics,
            num_videos=args.num_videos,
            step=args.step,
            split=args.split,
            seed=args.seed,
            ref_count=args.ref_count,
            out=args.out,
            use_ema=False if args.raw_params else None,
            compare=args.compare,
            compare_step=args.compare_step,
            data=args.data,
        )
        print(report["table"])
        print(f"report: {report['path']}")
    elif args.command == "eval":
        from sora_jax import commands

        metrics = commands.evaluate(
            args.workdir,
            num_prompts=args.num_prompts,
            num_clips=args.num_clips,
            split=args.split,
            seed=args.seed,
            out=args.out,
            use_ema=False if args.raw_params else None,
            prompting=args.prompting,
            seconds=args.seconds,
            num_long=args.num_long,
            overlap=args.overlap,
            data=args.data,
        )
        _print_scalars(metrics)
    elif args.command == "export" and _is_lora_workdir(args.workdir):
        from sora_jax.export.lora_export import export_adapters

        if args.dtype not in (None, "float32"):
            parser.error("a LoRA workdir's adapters are written in float32 (leave --dtype out)")
        r = export_adapters(args.workdir, args.out, raw_params=args.raw_params)
        print(
            f"exported the adapters of step {r['step']} ({r['parameters']:,} parameters, {r['files']} files) "
            f"to {r['out']} in {r['seconds']:.1f} s; the base: `sora-jax export --workdir {r['base']}`, then "
            "load_lora_weights"
        )
    elif args.command == "export" and args.format == "diffusers":
        from sora_jax.export.wan_io import MAX_SHARD_BYTES, export_diffusers

        if args.raw_params:
            parser.error("--raw_params is for --format torch (a Wan workdir holds its parameters alone)")
        shard = args.max_shard_mb * 2**20 if args.max_shard_mb else MAX_SHARD_BYTES
        r = export_diffusers(args.workdir, args.out, dtype=args.dtype, max_shard_bytes=shard)
        print(
            f"exported step {r['step']} ({r['parameters']:,} parameters, {r['files']} files) to {r['out']} "
            f"in {r['seconds']:.1f} s (WanPipeline.from_pretrained)"
        )
    elif args.command == "export":
        from sora_jax.export.writer import export

        r = export(args.workdir, args.out, dtype=args.dtype or "float32", raw_params=args.raw_params)
        print(
            f"exported step {r['step']} ({r['parameters']:,} parameters, {r['files']} files) to {r['out']} "
            f"in {r['seconds']:.1f} s"
        )
    elif args.command == "import":
        from sora_jax.export.importer import import_folder

        r = import_folder(args.src, args.workdir)
        print(f"imported step {r['step']} ({r['parameters']:,} parameters) into {r['workdir']}")
    elif args.command == "import-diffusers":
        from sora_jax.export.wan_io import import_diffusers

        r = import_diffusers(
            args.src,
            args.workdir,
            dtype=args.dtype,
            num_frames=args.num_frames,
            height=args.height,
            width=args.width,
        )
        print(
            f"imported {r['parameters']:,} parameters into {r['workdir']} (step {r['step']}) "
            f"in {r['seconds']:.1f} s"
        )
    elif args.command == "checkpoints":
        from sora_jax.train.checkpoint import list_checkpoints, read_best

        _print_checkpoints(list_checkpoints(args.workdir), args.json)
        best = read_best(args.workdir)
        if best is not None and not args.json:
            print(
                f"best: step {best['step']} by {best['metric']} = {best['value']:.4g} "
                f"(checkpoints_best/; load with step='best')"
            )
    return 0


def _is_lora_workdir(workdir: str) -> bool:
    """Whether ``workdir``'s latest checkpoint is a LoRA run (its export is the adapters alone)."""
    from sora_jax.export.lora_export import is_lora_workdir
    from sora_jax.loading import saved_config

    return is_lora_workdir(saved_config(workdir)[1])


def main(argv: list[str] | None = None) -> int:
    """``sora-jax``: runs the command; 0 on success, 2 (one line on stderr) for a user error (3 for a prompt the
    safety policy refuses), 1 with the traceback for anything else (a bug), 130 when interrupted."""
    if argv is None:  # the console command, not a caller in this process: huge pages for XLA's temporaries
        host_malloc.reexec_with_huge_pages()
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("sora-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("SORA_JAX_DEBUG"):
            raise
        if isinstance(e, user_error_types()):
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"sora-jax: error: {msg}", file=sys.stderr)
            return getattr(e, "exit_code", 2)
        traceback.print_exc()
        print(
            f"sora-jax: internal error ({type(e).__name__}): a bug, not your input; the traceback is above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
