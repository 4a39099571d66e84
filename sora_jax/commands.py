"""What the ``sora-jax`` commands do, as library functions with typed arguments: the CLI parses its flags and
calls one of these; a notebook calls them the same way.

    train(config, workdir, overrides=[...])           sora-jax train
    sample(workdir, prompts, out, mode=SampleMode.I2V, image="digit.png")   sora-jax sample
    evaluate(workdir, num_prompts=64)                 sora-jax eval (the evaluator of the checkpoint's task)

The other commands call their library function directly: ``sora_jax.demo.run_demo``,
``sora_jax.data.ingest.ingest``, ``sora_jax.train.checkpoint.list_checkpoints``.

Inputs are checked before anything heavy loads; bad input raises ``UserError`` with one line.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sora_jax.choices import SampleMode, Task
from sora_jax.errors import UserError

# inputs each mode reads: (images, videos)
_INPUTS: dict[SampleMode, tuple[int, int]] = {
    SampleMode.I2V: (1, 0),
    SampleMode.EXTEND: (0, 1),
    SampleMode.EDIT: (0, 1),
    SampleMode.CONNECT: (0, 2),
}


@contextlib.contextmanager
def _user_input():
    """The readers below (prompts, image and video files) report bad input as ValueError; here, where the
    user's input enters, that is a ``UserError``."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise UserError(str(e)) from e


# ------------------------------------------------------------------------------------------------- train


def train(
    config: str,
    workdir: str | Path,
    *,
    overrides: Sequence[str] = (),
    compile_only: bool = False,
    cpu_devices: int | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    coordinator_address: str | None = None,
) -> dict:
    """``sora-jax train``: trains ``config`` ("path.py[:arg]", ``overrides`` "key=value") in ``workdir``,
    resuming from its checkpoints; returns the trainer's summary (final loss, steps, timings; with
    ``compile_only``, the compiled step's memory and nothing written).

    ``cpu_devices``: run on that many fake CPU devices (the memory of a pod mesh, on a laptop). The three
    multi-process arguments start ``jax.distributed`` (each defaults from the environment); call this before
    anything else touches JAX's devices."""
    if cpu_devices:
        import jax

        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    from sora_jax.config import load_config
    from sora_jax.parallel.mesh import initialize_distributed

    initialize_distributed(num_processes, process_id, coordinator_address)
    cfg = load_config(config, overrides)
    from sora_jax.train.loop import train as train_loop

    return train_loop(cfg, workdir, compile_only=compile_only)


# ------------------------------------------------------------------------------------------------ sample


def sample(
    workdir: str | Path,
    prompts: Sequence[str],
    out: str | Path,
    *,
    mode: SampleMode | str = SampleMode.T2V,
    image: str | Path | None = None,
    videos: Sequence[str | Path] = (),
    direction: str = "forward",
    strength: float = 0.6,
    seconds: float = 60.0,
    overlap: int = 1,
    negative_prompt: str | None = None,
    guidance_rescale: float = 0.0,
    history_guidance: float = 0.0,
    fsdp: int = 0,
    bucket: str = "",
    seed: int = 0,
    steps: int | None = None,
    cfg_scale: float | None = None,
    safety_overrides: Sequence[str] = (),
    loras: Sequence[str] = (),
    lora_unmerged: bool = False,
) -> str:
    """``sora-jax sample``: generates from the latest checkpoint in ``workdir``, writes MP4 + GIF per video
    and a contact sheet to ``out``; returns a one-line summary.

    ``mode`` (``SampleMode``): t2v takes any number of ``prompts``, the others one; i2v animates ``image``;
    extend (``direction`` forward | backward) and edit (re-noised to ``strength`` in (0, 1]) take one of
    ``videos``, connect two (A then B); loop; long makes ``seconds`` of video. Given frames are resized and
    centre-cropped to the model's frame; ``overlap`` latent frames are given at each seam.
    ``negative_prompt``, ``guidance_rescale`` (phi), ``history_guidance`` (w, the modes that give frames;
    ``Process.sample``), ``fsdp`` (shard the parameters over N local devices) and
    ``bucket`` ("TxHxW"; default the config's first) go to the jitted sampler; ``steps`` and ``cfg_scale``
    replace the config's; ``safety_overrides`` (``safety.watermark.enabled=False``, ...) change this run's
    safeguards (``config.safety``: watermark, provenance, policy). ``loras``: LoRA adapter files or folders,
    each ``PATH`` or ``PATH:WEIGHT`` (diffusers, ComfyUI or kohya layout; ``export.lora_files``), merged into
    the weights (``lora_unmerged``: attached beside them) and named in the provenance record. Every input is checked, and the image and videos read, before the model loads; the
    prompts go through the workdir config's safety policy (``config.safety.policy``) then too, and a refused one
    raises ``sora_jax.errors.PromptRefused`` (``sora-jax`` exits 3) with nothing written."""
    try:
        mode = SampleMode(mode)
    except ValueError:
        raise UserError(f"unknown mode {mode!r}; use one of {[m.value for m in SampleMode]}") from None
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    from sora_jax.sample.pipeline import check_prompts

    with _user_input():
        check_prompts(prompts)
    if mode is not SampleMode.T2V and len(prompts) > 1:
        raise UserError(f"--mode {mode} takes one --prompt, got {len(prompts)}")
    frames = _read_inputs(mode, image, list(videos))
    if mode is SampleMode.EDIT and not 0.0 < strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1], got {strength}")
    if direction not in ("forward", "backward"):
        raise UserError(f"--direction must be forward or backward, got {direction!r}")
    if bucket:
        from sora_jax.data.buckets import parse_buckets

        parse_buckets(bucket)

    _check_model_takes(workdir, mode)
    from sora_jax.loading import saved_config
    from sora_jax.safety.policy import policy_for

    saved_step, saved = saved_config(workdir)
    if safety_overrides:
        from sora_jax.config import apply_overrides, validate

        saved = saved.copy_and_resolve_references()
        apply_overrides(saved, safety_overrides)
        validate(saved)
    policy = policy_for(saved)
    policy.check(prompts)  # PromptRefused (exit 3) before the model loads; negative prompts are not checked
    adapters = _read_loras(saved, loras)  # every file checked against the model before its weights load
    from sora_jax.safety.stamp import Stamp

    # the run's watermark payload and provenance facts; reads any signing key now, hashes the checkpoint once
    lora_record = {"lora": [f"{a.source}:{w:g}" for a, w in adapters]} if adapters else {}
    stamp = Stamp.for_run(
        saved, workdir, saved_step, steps=steps, cfg_scale=cfg_scale, mode=str(mode), seed=seed, **lora_record
    )
    from sora_jax.sample.pipeline import load_pipeline

    pipe = load_pipeline(
        workdir, sample_steps=steps, cfg_scale=cfg_scale, adapters=adapters, merge_adapters=not lora_unmerged
    )
    pipe.prompt_check = policy.check  # and at every sampling pass (decisions are remembered)
    out = Path(out)
    if mode is SampleMode.T2V and not (negative_prompt or guidance_rescale or fsdp or bucket):
        from sora_jax.sample.outputs import write_samples

        videos_out = pipe.generate(prompts, seed=seed, progress=True)  # the pmap sampler: the fast path
        write = functools.partial(stamp.write, seed=seed)
        paths = write_samples(out, videos_out, prompts, fps=pipe.config.data.fps, write=write)
        return f"wrote {len(paths['mp4'])} videos and {paths['contact_sheet']}{_marks(stamp)}"

    from sora_jax.sample.prompter import Prompter

    p = Prompter.from_pipeline(
        pipe,
        bucket=bucket,
        fsdp=fsdp,
        guidance_rescale=guidance_rescale,
        history_guidance=history_guidance,
    )
    kw = {"seed": seed}
    if negative_prompt:
        kw["negative_prompts"] = [negative_prompt] * (len(prompts) if mode is SampleMode.T2V else 1)
    prompt = prompts[0]
    if mode is SampleMode.T2V:
        results = list(p.generate(prompts, **kw))
    elif mode is SampleMode.I2V:
        results = [p.i2v(prompt, frames[0], **kw)]
    elif mode is SampleMode.EXTEND:
        results = [p.extend(prompt, frames[0], direction=direction, overlap=overlap, **kw)]
    elif mode is SampleMode.CONNECT:
        results = [p.connect(prompt, frames[0], frames[1], overlap=overlap, **kw)[0]]
    elif mode is SampleMode.EDIT:
        results = [p.edit(prompt, frames[0], strength=strength, **kw)]
    elif mode is SampleMode.LOOP:
        results = [p.loop(prompt, overlap=overlap, **kw)]
    else:
        video, _ = p.long_video([prompt], seconds=seconds, overlap=overlap, progress=True, **kw)
        results = [video[0]]
    _write_videos(out, mode, results, prompts if mode is SampleMode.T2V else [prompt], p.fps, stamp, seed)
    return f"wrote {len(results)} {mode} video(s) of {len(results[0])} frames to {out}{_marks(stamp)}"


def detect(
    videos: Sequence[str | Path],
    *,
    trust_anchors: str | Path | None = None,
    workdir: str | Path | None = None,
) -> list[dict]:
    """``sora-jax detect``: per video ``safety.stamp.inspect_video``'s report plus ``line`` (one line for the
    terminal) and, with ``workdir``, ``matches``: the checkpoint steps of ``workdir`` whose payload
    (``stamp.model_id`` + ``stamp.run_id``) the watermark carries, allowing ``stamp.MATCH_BITS`` bit errors
    (nearest first; ``bit_errors`` beside them)."""
    from sora_jax.safety.stamp import MATCH_BITS, inspect_video, payload_distance

    known = _payloads(workdir) if workdir is not None else None
    reports = []
    for path in videos:
        r = inspect_video(path, trust_anchors=trust_anchors)
        wm = r["watermark"]
        if wm["detected"]:
            text = f"watermark DETECTED (p = 10^{wm['log10_p']:.1f}, payload {wm['payload']})"
        else:
            text = f"no watermark (p = {wm['p_value']:.2g})"
        if known is not None:
            near = sorted(
                (payload_distance(hexa, wm["payload"]), step)
                for step, hexa in known.items()
                if wm["payload"] is not None and payload_distance(hexa, wm["payload"]) <= MATCH_BITS
            )
            r["matches"], r["bit_errors"] = [s for _, s in near], [d for d, _ in near]
            if near:
                text += f", from {Path(workdir).name} step {near[0][1]} ({near[0][0]} bit(s) off)"
        prov = r["provenance"]["summary"] if r["provenance"] else "no provenance (not an MP4)"
        r["line"] = f"{path}: {text}; {prov}"
        reports.append(r)
    return reports


def _payloads(workdir: str | Path) -> dict[int, str]:
    """{step: payload hex} of every checkpoint of ``workdir`` (what its videos carry)."""
    from sora_jax.loading import saved_config
    from sora_jax.safety.stamp import model_id, run_id
    from sora_jax.safety.watermark import bits_to_hex, payload_bits
    from sora_jax.train.checkpoint import list_checkpoints

    _, cfg = saved_config(workdir)
    steps = [c["step"] for c in list_checkpoints(workdir) if c["step"] is not None]
    return {s: bits_to_hex(payload_bits(model_id(cfg), run_id(workdir, s))) for s in steps}


def _marks(stamp) -> str:
    """How the run's videos are marked, for its summary line."""
    wm = f"watermark {stamp.payload}" if stamp.watermark is not None else "no watermark"
    rec = (
        "no provenance" if not stamp.provenance else "C2PA signed" if stamp.signing else "provenance sidecars"
    )
    return f" ({wm}; {rec})"


def parse_lora(spec: str) -> tuple[Path, float]:
    """``"PATH"`` or ``"PATH:WEIGHT"`` (``--lora``) -> (path, weight); UserError in one line when the path
    does not exist or the weight is not a finite number."""
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            path, weight = spec, 1.0  # a ':' inside the path
    if not math.isfinite(weight):
        raise UserError(f"--lora {spec}: the weight must be a finite number")
    if not Path(path).exists():
        raise UserError(f"--lora {spec}: {path} does not exist")
    return Path(path), weight


def _read_loras(cfg, specs: Sequence[str]) -> list:
    """``--lora`` specs -> ``[(lora.Adapters, weight)]`` read for ``cfg``'s model (shapes only, nothing
    allocated); a file that does not fit the model is a one-line ``LoraFileError``."""
    if not specs:
        return []
    from flax import nnx

    from sora_jax import factory
    from sora_jax.export.lora_files import read_adapters
    from sora_jax.loading import resolve_autoencoder

    parsed = [parse_lora(s) for s in specs]
    resolved = resolve_autoencoder(cfg)
    abstract = nnx.eval_shape(lambda: factory.make_module(resolved, resolved.seed))
    return [(read_adapters(path, abstract), weight) for path, weight in parsed]


def _check_model_takes(workdir: str | Path, mode: SampleMode) -> None:
    """UserError when the workdir's model cannot sample ``mode``: Wan 2.1 text-to-video takes one time per
    sample, so none of the modes that give frames (frame conditioning)."""
    from sora_jax.choices import ModelArch
    from sora_jax.config import model_arch
    from sora_jax.loading import saved_config

    if mode is not SampleMode.T2V and model_arch(saved_config(workdir)[1]) is ModelArch.WAN:
        raise UserError(
            f"--mode {mode}: {workdir} holds Wan 2.1 text-to-video, which takes no given frames; use --mode t2v"
        )


def _read_inputs(mode: SampleMode, image, videos: list) -> list[np.ndarray]:
    """The frames ``mode`` starts from: uint8 image ``[H, W, 3]`` or videos ``[T, H, W, 3]``, read now."""
    from sora_jax.sample.prompter import read_image
    from sora_jax.sample.video_io import read_video

    images_wanted, videos_wanted = _INPUTS.get(mode, (0, 0))
    if image is not None and not images_wanted:
        raise UserError(f"--image is for --mode i2v, not {mode}")
    if videos and not videos_wanted:
        raise UserError(f"--video is for --mode extend, edit or connect, not {mode}")
    if images_wanted and image is None:
        raise UserError(f"--mode {mode} needs --image FILE")
    if videos_wanted == 1 and len(videos) != 1:
        raise UserError(f"--mode {mode} needs one --video FILE, got {len(videos)}")
    if videos_wanted == 2 and len(videos) != 2:
        raise UserError(f"--mode {mode} takes two --video files (A then B), got {len(videos)}")
    with _user_input():
        return [read_image(image)] if images_wanted else [read_video(v) for v in videos]


def _write_videos(
    out: Path, mode: SampleMode, results: list[np.ndarray], prompts: list[str], fps, stamp, seed: int
) -> None:
    """``<mode>_<i>.mp4`` / ``.gif`` per uint8 video ``[T, H, W, 3]`` through ``stamp`` (watermark, provenance)
    and a contact sheet of up to 16 frames."""
    from sora_jax.sample.video_io import contact_sheet

    for i, video in enumerate(results):
        prompt = prompts[min(i, len(prompts) - 1)]
        stamp.write(out / f"{mode}_{i:02d}.mp4", video, fps, prompt=prompt, seed=seed)
        stamp.write(out / f"{mode}_{i:02d}.gif", video, fps, prompt=prompt, seed=seed)
    sheet = np.stack([r[np.linspace(0, len(r) - 1, min(len(r), 16)).round().astype(int)] for r in results])
    contact_sheet(sheet, prompts, out / f"{mode}_contact_sheet.png")


# -------------------------------------------------------------------------------------------------- eval


def evaluate(
    workdir: str | Path,
    *,
    num_prompts: int = 64,
    num_clips: int = 256,
    split: str = "test",
    seed: int = 0,
    out: str | Path | None = None,
    use_ema: bool | None = None,
    prompting: bool = False,
    seconds: float = 60.0,
    num_long: int = 8,
    overlap: int = 1,
    data: str | Path | None = None,
) -> dict:
    """``sora-jax eval``: scores the latest checkpoint in ``workdir`` with the evaluator of its task, writes
    the report to ``out`` (default ``<workdir>/eval``) and returns its metrics.

    - ``Task.VAE``: reconstruction PSNR / SSIM on ``num_clips`` clips of ``split``, and the latent statistics
      a latent DiT needs (``eval.reconstruction.evaluate_vae``).
    - ``Task.T2V``: prompt adherence on ``num_prompts`` prompts of ``split`` (train | test | paraphrase:
      wordings the captions never use; ``eval.evaluate.evaluate_workdir``); with ``prompting``, image-to-video,
      extension, connection and ``num_long`` videos of ``seconds`` on ``num_prompts`` test clips
      (``eval.prompting.evaluate_prompting``). Captions that are not moving digits' (a Wan fine-tune on
      ingested videos) get FVD and the autoencoder's PSNR instead (``evaluate_metrics``); ``data``: the dataset
      to draw captions and clips from (default: the workdir's, or the clips behind its latents).

    ``use_ema`` False scores the raw parameters (default: the config's ``sample.use_ema``)."""
    from sora_jax.config import task
    from sora_jax.loading import saved_config

    _, cfg = saved_config(workdir)
    kind = task(cfg)
    if kind is Task.VAE:
        if prompting or split == "paraphrase":
            what = "--prompting" if prompting else "--split paraphrase"
            raise UserError(f"{what} scores a text-to-video model; {workdir} holds a VAE")
        from sora_jax.eval.reconstruction import evaluate_vae

        return evaluate_vae(workdir, num_clips=num_clips, split=split, out=out, use_ema=use_ema)
    if prompting:
        if split == "paraphrase":
            raise UserError("--prompting starts from clips of the data: use --split test or train")
        from sora_jax.eval.prompting import evaluate_prompting

        return evaluate_prompting(
            workdir,
            num=num_prompts,
            seconds=seconds,
            num_long=num_long,
            overlap=overlap,
            seed=seed,
            out=out,
            split=split,
            use_ema=use_ema,
            data=data,
        )
    from sora_jax.eval.adherence import adherence_applies
    from sora_jax.eval.clips import eval_dataset
    from sora_jax.eval.evaluate import evaluate_workdir, split_prompts

    if split != "paraphrase":
        data = eval_dataset(cfg, workdir, data)
        if not adherence_applies(split_prompts(data, split, num_prompts, seed)):
            print(
                f"the captions of {data} are not moving digits': scoring fvd and psnr instead of adherence "
                "(choose with --metrics)",
                file=sys.stderr,
            )
            report = evaluate_metrics(
                workdir, "fvd,psnr", num_videos=num_prompts, split=split, seed=seed, out=out,
                use_ema=use_ema, data=data,
            )  # fmt: skip
            return {r["metric"]: r["value"] for r in report["reports"][0]["rows"]}
    report = evaluate_workdir(
        workdir, num_prompts=num_prompts, split=split, seed=seed, out=out, use_ema=use_ema, data=data
    )
    return report["metrics"]


def evaluate_metrics(
    workdir: str | Path,
    metrics: str,
    *,
    num_videos: int = 64,
    step: int | None = None,
    split: str = "test",
    seed: int = 0,
    ref_count: int | None = None,
    out: str | Path | None = None,
    use_ema: bool | None = None,
    compare: str | Path | None = None,
    compare_step: int | None = None,
    data: str | Path | None = None,
) -> dict:
    """``sora-jax eval --metrics``: scores ``workdir`` (and ``compare``, the same way) with
    ``eval.evaluate.evaluate_metrics``; writes each run's report and, with ``compare``, ``compare.json`` holding
    both. Returns {"reports", "table", "path"}."""
    from sora_jax.config import task
    from sora_jax.eval import suite
    from sora_jax.eval.evaluate import _write_json, evaluate_metrics, format_table
    from sora_jax.loading import saved_config

    names = suite.parse_metrics(metrics)
    if split == "paraphrase":
        raise UserError(
            "--metrics scores captions of a data split and compares with its clips: use test or train"
        )
    if num_videos < 2:
        raise UserError(f"--num_videos must be at least 2 (a covariance needs two videos), got {num_videos}")
    runs = [(workdir, step)] + ([(compare, compare_step)] if compare else [])
    is_vae = [task(saved_config(w, s)[1]) is Task.VAE for w, s in runs]  # all checked before any sampling
    for (w, _), vae in zip(runs, is_vae):
        if vae and names != ["psnr"]:
            raise UserError(f"{w} holds a VAE: of --metrics only psnr applies (sora-jax eval without it)")
    reports = []
    for (w, s), vae in zip(runs, is_vae):
        where = Path(out) / Path(w).name if out and compare else out
        kw = dict(num_videos=num_videos, step=s, split=split, seed=seed, ref_count=ref_count, data=data)
        if vae:
            reports.append(_vae_psnr_report(w, s, split, num_videos, where, use_ema))
        else:
            reports.append(evaluate_metrics(w, names, out=where, use_ema=use_ema, **kw))
    path = (Path(out) if out else Path(workdir) / "eval") / (
        "compare.json" if compare else f"metrics_step{reports[0]['step']}.json"
    )
    table = format_table(reports)
    if compare:
        _write_json(path, {"reports": reports, "table": table})
    return {"reports": reports, "table": table, "path": str(path)}


def _vae_psnr_report(workdir, step, split: str, num: int, out, use_ema) -> dict:
    from sora_jax.eval.evaluate import _write_json
    from sora_jax.eval.reconstruction import evaluate_vae

    if step is not None:
        raise UserError("--step: VAE workdirs are scored at their latest checkpoint")
    import time

    t0 = time.perf_counter()
    m = evaluate_vae(workdir, num_clips=num, split=split, out=out, use_ema=use_ema)
    row = {"metric": "psnr", "value": m["psnr_db"], "count": m["clips"], "step": m["step"]}
    report = {"workdir": str(workdir), "step": m["step"], "split": split, "num_videos": m["clips"]}
    report["rows"] = [row | {"higher_is_better": True, "seconds": time.perf_counter() - t0}]
    _write_json((Path(out) if out else Path(workdir) / "eval") / f"metrics_step{m['step']}.json", report)
    return report
