"""Fine-tuning Wan with the trainer (``configs/wan_t2v_1_3b.py:smoke``): a tiny random diffusers Wan folder
(``tests/test_wan_io.py``'s) imported as a workdir, a few videos through ``sora-jax ingest``, latents and UMT5
caption features precomputed by ``data_pipelines/encode_latents.py`` with the workdir's VAE and UMT5; training
starts from the imported weights (``model.init_from``: EMA = them, fresh Adam), the loss falls, and a run
killed with SIGKILL resumes to the same losses, bitwise, as one never interrupted. FSDP over 2 devices, the
latents in two buckets (landscape, portrait)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("av")

import jax  # noqa: E402
from helpers import cli_env, run_cli, start_cli  # noqa: E402
from test_ingest import source_frames, write_video  # noqa: E402
from test_wan_io import tiny_pipeline  # noqa: E402

from sora_jax import cli, loading  # noqa: E402
from sora_jax.config import load_config  # noqa: E402
from sora_jax.data import pipeline, records  # noqa: E402
from sora_jax.errors import UserError  # noqa: E402
from sora_jax.train import checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT}/configs/wan_t2v_1_3b.py:smoke"
CAPTIONS = ("a cat runs on the grass", "the dog jumps over a river", "a quick brown fox walks")
BUCKETS = "5x32x48,5x48x32"  # landscape and portrait: latents [2, 4, 6, 4] and [2, 6, 4, 4]
STEPS = 40


@pytest.fixture(scope="module")
def wan_workdir(tmp_path_factory):
    """The tiny Wan folder of test_wan_io (float32) imported with ``sora-jax import-diffusers``."""
    root = tmp_path_factory.mktemp("wan_ft")
    pipe = tiny_pipeline(root)
    pipe.save_pretrained(root / "src")
    wd = root / "wan"
    args = ["import-diffusers", "--from", str(root / "src"), "--workdir", str(wd), "--dtype", "float32"]
    assert cli.main([*args, "--num_frames", "5", "--height", "32", "--width", "32"]) == 0
    return wd


@pytest.fixture(scope="module")
def latents(wan_workdir, tmp_path_factory):
    """Six ingested videos (three captions, native sizes 32x48 / 48x40) -> clips in the buckets 5x32x48 and
    5x48x32 at 8 fps -> Wan-VAE latents and the UMT5 caption table, by ``encode_latents``."""
    from data_pipelines import encode_latents

    root = tmp_path_factory.mktemp("wan_data")
    rows = []
    for i in range(6):
        h, w = (32, 48) if i % 2 else (48, 40)
        frames = np.roll(source_frames(16, h, w), 5 * i, axis=2)
        write_video(root / "videos" / f"v{i}.mp4", frames, 8)
        rows.append((f"v{i}.mp4", CAPTIONS[i % 3]))
    with open(root / "videos" / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("video", "caption"), *rows])
    ingest = ["ingest", "--videos", str(root / "videos"), "--captions", str(root / "videos" / "captions.csv")]
    assert cli.main([*ingest, "--out", str(root / "clips"), "--clip_seconds", "2", "--no_progress"]) == 0
    out = root / "latents"
    args = ["--vae", str(wan_workdir), "--data", str(root / "clips"), "--out", str(out), "--clip", BUCKETS]
    args += ["--fps", "8", "--text_encoder", "t5", "--max_length", "16", "--batch_size", "3"]
    assert encode_latents.main(args) == 0
    return out


def _args(wan_workdir, latents, workdir) -> list[str]:
    return [
        "train", "--config", CONFIG, "--workdir", str(workdir),
        f"--config.model.init_from={wan_workdir}", f"--config.data.path={latents}",
        f"--config.train.num_steps={STEPS}", "--config.train.log_every=1", "--config.train.ckpt_every=5",
        f"--config.data.buckets={BUCKETS}", "--config.data.batch_size=2",
    ]  # fmt: skip


def _losses(workdir) -> dict[int, float]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]  # a resumed run rewrites the steps after its checkpoint: the last kept
    return out


@pytest.fixture(scope="module")
def reference(wan_workdir, latents, tmp_path_factory):
    """An uninterrupted fine-tune of STEPS steps, FSDP over 2 CPU devices: its workdir."""
    wd = tmp_path_factory.mktemp("wan_ref") / "ref"
    out = run_cli(*_args(wan_workdir, latents, wd), env=cli_env(devices=2))
    assert "compiled 2 step(s)" in out.stderr  # one per bucket
    return wd


def test_encoded_latent_dataset(latents):
    meta = json.loads((latents / "metadata.json").read_text())
    assert meta["content"] == "latents" and meta["vae_kind"] == "wan_vae"
    assert meta["buckets"] == [[5, 32, 48], [5, 48, 32]] and meta["splits"]["train"]["num_clips"] == 6
    index = np.load(
        latents / meta["splits"]["train"]["index"]
    )  # each record's bucket: 3 landscape, 3 portrait
    np.testing.assert_array_equal(index, [[5, 32, 48, 8]] * 3 + [[5, 48, 32, 8]] * 3)
    source = pipeline.open_source(latents, "train")
    shapes = [tuple(records.read_record(source[i])[0]["shape"]) for i in range(6)]
    assert shapes == [(2, 4, 6, 4)] * 3 + [(2, 6, 4, 4)] * 3
    assert len(list(latents.glob("text_emb-t5-*-train.npz"))) == 1


def test_fine_tune_starts_from_the_imported_weights(wan_workdir, latents):
    """Step 0: params and EMA are the import's, Adam's moments zero; the UMT5 and VAE paths come from it."""
    import optax

    from sora_jax.parallel.mesh import make_mesh
    from sora_jax.train import loop

    cfg = load_config(CONFIG, [f"model.init_from={wan_workdir}", f"data.path={latents}"])
    cfg = loading.resolve_init(cfg)
    assert cfg.text.path.endswith("text_encoder") and cfg.autoencoder.path == str(wan_workdir / "vae")
    mesh = make_mesh(cfg.mesh, jax.devices()[:2])
    fns = loop.build_train_fns(cfg, mesh)
    state = loop._initial_state(cfg, fns)
    _, _, _, imported = loading.restore(wan_workdir, use_ema=False)
    for a, b, e in zip(*map(jax.tree.leaves, (imported, state["params"], state["ema"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    assert optax.global_norm(state["opt_state"]) == 0 and int(state["step"]) == 0


def test_fine_tune_loss_falls(reference):
    losses = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = (
        np.mean([losses[s] for s in range(1, 9)]),
        np.mean([losses[s] for s in range(STEPS - 7, STEPS + 1)]),
    )
    assert last < 0.8 * first, (first, last)


def test_kill_and_rerun_resumes_exactly(wan_workdir, latents, reference, tmp_path):
    args = _args(wan_workdir, latents, tmp_path / "killed")
    proc = start_cli(*args, env=cli_env(devices=2), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (checkpoint.latest_step(tmp_path / "killed") or 0) < 10:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_step(tmp_path / "killed")
    assert killed_at is not None and killed_at < STEPS, "the run finished before it could be killed"
    rerun = run_cli(*args, env=cli_env(devices=2))
    assert f"resumed from step {killed_at}" in rerun.stderr
    a, b = _losses(tmp_path / "killed"), _losses(reference)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [a[k] for k in sorted(a)] == [b[k] for k in sorted(b)]  # bitwise, data order included


def test_init_from_another_model_is_one_line(wan_workdir, latents):
    cfg = load_config(CONFIG, [f"model.init_from={wan_workdir}", "model.wan.depth=3"])
    with pytest.raises(UserError, match="config.model.wan is") as info:
        loading.resolve_init(cfg)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="init_from"):
        loading.resolve_init(load_config(CONFIG, [f"model.init_from={latents}"]))


def test_fsdp_and_sequence_parallel_step_compiles_without_files(tmp_path):
    """The smoke recipe on fsdp 2 x seq 2 (Ulysses all-to-all over the heads) compiles with nothing on disk
    (``--compile_only``: the empty prompt's UMT5 features as zeros, no VAE for latent data) and reports its
    per-device memory."""
    from sora_jax.train.loop import train

    overrides = ["mesh.fsdp=2", "mesh.seq=2", "model.seq_parallel=ulysses", "data.batch_size=2"]
    cfg = load_config(CONFIG, overrides)
    out = train(cfg, tmp_path / "w", compile_only=True, progress=False, devices=jax.devices()[:4])
    assert out["compiled"] and out["peak_gib"] > 0
    assert not (tmp_path / "w").exists()


def test_a_bfloat16_import_starts_float32_master_weights(wan_workdir, tmp_path):
    """``import-diffusers --dtype bfloat16`` (as released) -> the recipe's float32 parameters, same values."""
    from sora_jax import factory

    wd = tmp_path / "bf16"
    args = ["import-diffusers", "--from", str(wan_workdir.parent / "src"), "--workdir", str(wd)]
    assert cli.main([*args, "--dtype", "bfloat16"]) == 0
    cfg = loading.resolve_init(load_config(CONFIG, [f"model.init_from={wd}"]))
    _, params = loading.init_params(wd, factory.abstract_state(cfg, loading.single_device_mesh()).params)
    _, _, _, imported = loading.restore(wd, use_ema=False)
    assert {str(a.dtype) for a in jax.tree.leaves(imported)} == {"bfloat16", "float32"}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(imported)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))


def test_training_loads_no_text_encoder(wan_workdir, latents, tmp_path, monkeypatch):
    """With the captions' UMT5 table beside the latents, neither the captions nor the empty prompt (caption
    dropout) load the encoder (UMT5-XXL: 11 GB); the step holds no VAE either (latent data)."""
    from sora_jax import factory
    from sora_jax.train.loop import train

    monkeypatch.setattr(
        factory, "frozen_embedder", lambda *a, **k: pytest.fail("the text encoder was loaded")
    )
    monkeypatch.setattr(loading, "load_autoencoder", lambda *a, **k: pytest.fail("the VAE was loaded"))
    args = _args(wan_workdir, latents, tmp_path / "w")[5:]
    cfg = load_config(CONFIG, [a.removeprefix("--config.") for a in args] + ["train.num_steps=2"])
    out = train(cfg, tmp_path / "w", progress=False, devices=jax.devices()[:2])
    assert out["step"] == 2 and np.isfinite(out["loss"])


def test_eval_scores_a_wan_fine_tune_against_the_clips_behind_its_latents(
    reference, wan_workdir, latents, tmp_path, capsys
):
    """``sora-jax eval`` on the fine-tuned workdir: its data are latents, so the captions and the reference
    clips come from the ingested clips they were made from (native sizes, cut to the generated 5x32x32 at
    8 fps); the captions are not moving digits', so FVD and the VAE's PSNR are scored instead of adherence.
    The PSNR equals diffusers' ``AutoencoderKLWan`` round trip of the same clips."""
    from diffusers import AutoencoderKLWan

    from sora_jax.eval import clips as eval_clips
    from sora_jax.eval.reconstruction import psnr
    from sora_jax.models.autoencoder import float_to_video

    out = tmp_path / "eval"
    args = ["eval", "--workdir", str(reference), "--split", "train", "--num_prompts", "2", "--out", str(out)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "not moving digits'" in captured.err and "fvd=" in captured.out and "psnr=" in captured.out
    report = json.loads(next(out.glob("metrics_step*.json")).read_text())
    rows = {r["metric"]: r for r in report["rows"]}
    assert report["step"] == STEPS and report["num_videos"] == 2
    assert rows["fvd"]["count"] == 2 and rows["fvd"]["ref_count"] == 6  # every 16-frame clip fits 5 frames
    assert rows["fvd"]["frames"] == "repeat 5->16" and np.isfinite(rows["fvd"]["value"])
    source = Path(json.loads((latents / "metadata.json").read_text())["source"])
    assert [p.name for p in (source / "fd_stats").glob("fvd_*")] == ["fvd_train_all_5x32x32@8.npz"]

    clips, _ = eval_clips.sample_clips(source, "train", 2, 0, clip=eval_clips.ClipShape(5, 32, 32, 8.0))
    assert clips.shape == (2, 5, 32, 32, 3)
    vae = AutoencoderKLWan.from_pretrained(wan_workdir.parent / "src" / "vae").eval()
    x = torch.from_numpy(clips.astype(np.float32) / 127.5 - 1.0).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    recon = float_to_video(recon.permute(0, 2, 3, 4, 1).numpy())
    want = float(np.mean(np.minimum(psnr(clips, recon), 100.0)))
    assert rows["psnr"]["count"] == 2 and abs(rows["psnr"]["value"] - want) < 0.02, (rows["psnr"], want)


def test_eval_refuses_what_it_cannot_score_in_one_line(reference, wan_workdir, capsys):
    """Adherence on captions without digits, and a workdir with no dataset, are one line each, before any
    weights load."""
    args = ["eval", "--workdir", str(reference), "--metrics", "adherence", "--split", "train"]
    assert cli.main([*args, "--num_videos", "2"]) != 0
    err = capsys.readouterr().err.strip()
    assert "adherence reads moving digits: 2 of 2 prompts" in err and "\n" not in err
    assert cli.main(["eval", "--workdir", str(wan_workdir), "--metrics", "fvd", "--num_videos", "2"]) != 0
    err = capsys.readouterr().err.strip()
    assert "has no dataset to evaluate against" in err and "--data" in err and "\n" not in err


def test_a_lora_fine_tune_exports_adapters_that_diffusers_loads(wan_workdir, latents, tmp_path):
    """Wan LoRA end to end: the trainer fits adapters over the imported Wan (frozen, ``lora.init_from``),
    ``sora-jax export`` writes them alone, and diffusers' ``WanTransformer3DModel`` of the same base with the
    file loaded the way ``WanPipeline.load_lora_weights`` does (peft) gives the LoRA workdir's transformer
    output within 1e-4 (float32); the ComfyUI file too."""
    pytest.importorskip("peft")
    import copy

    from flax import nnx
    from test_wan import _inputs, _torch_forward

    from sora_jax import factory
    from sora_jax.models import wan_convert

    wd, out = tmp_path / "lora", tmp_path / "adapters"
    run_cli(
        "train", "--config", CONFIG, "--workdir", str(wd), "--config.lora.enabled=True",
        f"--config.lora.init_from={wan_workdir}", f"--config.data.path={latents}", "--config.train.num_steps=4",
        "--config.train.ckpt_every=4", f"--config.data.buckets={BUCKETS}", "--config.data.batch_size=2",
        "--config.optim.lr=3e-2", "--config.optim.warmup_steps=1", env=cli_env(devices=1),
    )  # fmt: skip
    assert cli.main(["export", "--workdir", str(wd), "--out", str(out)]) == 0
    assert not (out / "transformer").exists()  # the adapters alone
    saved, _, _, params = loading.restore(wd)  # the adapters (EMA) over the imported base
    saved.model.dtype = "float32"  # the config computes in bfloat16: the same weights in float32
    model = factory.make_module(saved, 0)
    nnx.update(model, params)
    ours = model.transformer
    _, _, base_abstract, base_params = loading.restore(wan_workdir, use_ema=False)
    base = nnx.merge(base_abstract.graphdef, base_params).transformer
    config = {k: v for k, v in wan_convert.config_to_diffusers(base.cfg).items() if not k.startswith("_")}
    ref = diffusers.WanTransformer3DModel(**config).eval()
    sd = {k: torch.from_numpy(v.copy()) for k, v in wan_convert.to_diffusers_state_dict(base).items()}
    ref.load_state_dict(sd, strict=True)
    inputs = _inputs({"in_channels": base.cfg.in_channels, "text_dim": base.cfg.text_dim}, (2, 4, 4), seed=1)
    want = np.asarray(ours(*map(jax.numpy.asarray, inputs)))
    plain = _torch_forward(ref, *inputs)
    scale = np.abs(want).max()
    assert np.abs(plain - want).max() > 1e-3 * scale  # the trained adapters change the output
    for name in ("pytorch_lora_weights.safetensors", "wan_lora_comfyui.safetensors"):
        model = copy.deepcopy(ref)
        state_dict = diffusers.WanPipeline.lora_state_dict(str(out / name))
        diffusers.WanPipeline.load_lora_into_transformer(state_dict, transformer=model, adapter_name="ours")
        got = _torch_forward(model, *inputs)
        assert np.abs(got - want).max() <= 1e-4 * scale, (name, np.abs(got - want).max() / scale)
