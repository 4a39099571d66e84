"""Diffusers Wan 2.1 folders in and out (``sora_jax.export.wan_io``): a tiny random ``WanPipeline`` folder built
offline becomes a workdir through ``sora-jax import-diffusers``; the loaded pipeline's transformer and text
features equal diffusers'; ``sora-jax sample`` writes a video from it; ``sora-jax export --format diffusers``
gives back the source's tensors bitwise (float32 and bfloat16) in a folder ``WanPipeline.from_pretrained``
loads without missing or unexpected keys; bad input is one line and exit 2."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

import jax.numpy as jnp  # noqa: E402
from safetensors import safe_open  # noqa: E402

from sora_jax import api, cli  # noqa: E402
from sora_jax.sample.pipeline import load_pipeline  # noqa: E402

TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
)  # fmt: skip
VAE = dict(
    base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0],
)  # fmt: skip
UMT5 = dict(
    vocab_size=120, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, relative_attention_num_buckets=32,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
)  # fmt: skip
VIDEO = ("--num_frames", "5", "--height", "32", "--width", "32")  # latents 2 x 4 x 4 x 4


def _tokenizer(folder):
    """A tiny unigram SentencePiece model with T5's special ids, saved as transformers saves T5's tokenizer."""
    rng = random.Random(0)
    words = str.split("the a cat dog runs jumps over quick brown fox lazy river grass walks on")
    words += ["".join(rng.choice("aeioukstmnrl") for _ in range(rng.randint(2, 6))) for _ in range(150)]
    src = folder / "spm"
    src.mkdir()
    (src / "corpus.txt").write_text(
        "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(300))
    )
    spm.SentencePieceTrainer.train(
        input=str(src / "corpus.txt"), model_prefix=str(src / "spiece"), vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return transformers.T5Tokenizer.from_pretrained(str(src), extra_ids=0)


def _perturbed(model, seed: int):
    """Random weights with norm gains and scale-shift tables away from 1 / 0 (so they are tested too)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("gamma"):
                p.copy_((1.0 if not name.endswith("bias") else 0.0) + 0.2 * torch.randn_like(p))
            elif "scale_shift_table" in name:
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def tiny_pipeline(root) -> diffusers.WanPipeline:
    """The tiny random float32 ``WanPipeline`` (seed 0; its tokenizer files under ``root``)."""
    torch.manual_seed(0)
    return diffusers.WanPipeline(
        tokenizer=_tokenizer(root),
        text_encoder=transformers.UMT5EncoderModel(transformers.UMT5Config(**UMT5)).eval(),
        transformer=_perturbed(diffusers.WanTransformer3DModel(**TRANSFORMER), 1),
        vae=_perturbed(diffusers.AutoencoderKLWan(**VAE), 2),
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
        ),
    )


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A float32 diffusers Wan 2.1 folder as ``WanPipeline.save_pretrained`` writes it, the transformer
    sharded (an index and several safetensors)."""
    root = tmp_path_factory.mktemp("wan_src")
    pipe = tiny_pipeline(root)
    folder = root / "Wan2.1-T2V-tiny"
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "transformer")
    pipe.transformer.save_pretrained(folder / "transformer", max_shard_size="40KB")
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 1
    return folder, pipe


@pytest.fixture(scope="module")
def workdir(wan_folder, tmp_path_factory):
    w = tmp_path_factory.mktemp("wan_wd") / "w"
    args = ["import-diffusers", "--from", str(wan_folder[0]), "--workdir", str(w), "--dtype", "float32"]
    assert cli.main([*args, *VIDEO]) == 0
    return w


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out |= {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    return out


def _bitwise_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dim() else a[k], b[k].view(torch.uint8)), k


def test_imported_pipeline_equals_diffusers(wan_folder, workdir):
    _, ref = wan_folder
    pipe = load_pipeline(workdir)
    cfg = pipe.config
    assert (cfg.model.arch, cfg.autoencoder.kind, cfg.diffusion.flow_shift) == ("wan", "wan_vae", 3.0)
    assert (cfg.diffusion.flow_prediction, cfg.diffusion.sampler, cfg.text.max_length) == ("v", "unipc", 512)
    assert pipe.sampler.latent_shape == (2, 4, 4, 4)

    # the transformer, float32, on the same input (channels-last here, channels-first there)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 4, 4, 4)).astype(np.float32)
    t = np.array([3.0, 701.5], np.float32)
    text = rng.standard_normal((2, 7, 32)).astype(np.float32)
    ours = np.asarray(pipe.model.denoise(jnp.asarray(x), jnp.asarray(t), jnp.asarray(text), None))
    with torch.no_grad():
        theirs = (
            ref.transformer(
                torch.from_numpy(x).permute(0, 4, 1, 2, 3),
                torch.from_numpy(t),
                torch.from_numpy(text),
                return_dict=False,
            )[0]
            .permute(0, 2, 3, 4, 1)
            .numpy()
        )
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"transformer: max |ours - diffusers| / max |diffusers| = {rel:.2e}")
    assert rel < 1e-4

    # the text features: WanPipeline.encode_prompt (UMT5 on the tokens, zero past each prompt's length)
    prompts = ["a cat walks on the grass", ""]
    emb, mask = pipe.text_input.encode(prompts)
    with torch.no_grad():
        ref_emb = ref.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)[0]
    rel = np.abs(emb - ref_emb.numpy()).max() / np.abs(ref_emb.numpy()).max()
    print(f"text features: max |ours - diffusers| / max |diffusers| = {rel:.2e}")
    assert emb.shape == (2, 512, 32) and mask[0].sum() > 1 and mask[1].sum() == 1 and rel < 1e-4

    # the workdir's autoencoder: Wan's VAE with WanPipeline's latent normalisation, as diffusers decodes
    ae = api.load_autoencoder(workdir)
    z = rng.standard_normal((1, 2, 4, 4, 4)).astype(np.float32)
    video = ae.decode(z)
    vae = ref.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    with (
        torch.no_grad()
    ):  # WanPipeline: latents / (1 / std) + mean, decode, then uint8 as its video processor
        frames = vae.decode(torch.from_numpy(z).permute(0, 4, 1, 2, 3) / (1.0 / std) + mean).sample
    ref_video = ((frames.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 4, 1).numpy()
    assert ae.kind == "wan_vae" and video.shape == (1, 5, 32, 32, 3)
    assert np.abs(video.astype(np.float32) - ref_video).max() <= 1.0

    with pytest.raises(ValueError, match="per-frame times"):
        pipe.model.denoise(jnp.asarray(x), jnp.zeros((2, 2)), jnp.asarray(text), None)


def test_sample_writes_a_video(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        cli.main(
            ["sample", "--workdir", str(workdir), "--prompt", "a cat runs", "--out", str(out), "--steps", "2"]
        )
        == 0
    )
    assert "wrote 1 videos" in capsys.readouterr().out
    mp4 = sorted(out.glob("*.mp4"))
    assert mp4 and mp4[0].stat().st_size > 0


def test_export_is_bitwise_and_loads_in_diffusers(wan_folder, workdir, tmp_path, capfd, monkeypatch):
    src, ref = wan_folder
    if importlib.util.find_spec("accelerate") is None:
        # diffusers loads the float32-kept modules (_keep_in_fp32_modules) through accelerate alone; without
        # it, the plain load (which names missing and unexpected keys just the same) is what runs here
        monkeypatch.setattr(diffusers.WanTransformer3DModel, "_keep_in_fp32_modules", None)
    out = tmp_path / "exported"
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(out), "--format", "diffusers"]) == 0
    for part in ("transformer", "vae"):
        _bitwise_equal(_tensors(src / part), _tensors(out / part))
    for part in ("text_encoder", "tokenizer", "scheduler"):
        assert sorted(p.name for p in (out / part).iterdir()) == sorted(
            p.name for p in (src / part).iterdir()
        )
    capfd.readouterr()

    diffusers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.set_verbosity_warning()
    for cls, part in ((diffusers.WanTransformer3DModel, "transformer"), (diffusers.AutoencoderKLWan, "vae")):
        _, info = cls.from_pretrained(out / part, output_loading_info=True)
        assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors
    pipe = diffusers.WanPipeline.from_pretrained(out)
    logged = capfd.readouterr()
    words = ("missing", "unexpected", "not used", "newly initialized", "not initialized")
    assert not any(w in (logged.out + logged.err).lower() for w in words), logged
    assert type(pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    for a, b in zip(ref.transformer.state_dict().values(), pipe.transformer.state_dict().values()):
        assert torch.equal(a, b)


def test_bfloat16_folder_round_trip(wan_folder, tmp_path):
    """A bfloat16 transformer (as Wan's releases) imported with --dtype bfloat16 exports bitwise."""
    src, ref = wan_folder
    folder = tmp_path / "bf16"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("transformer"))
    bf16 = copy.deepcopy(ref.transformer).to(torch.bfloat16)  # the fixture's own stays float32
    bf16.save_pretrained(folder / "transformer", max_shard_size="20KB")
    w, out = tmp_path / "w", tmp_path / "out"
    args = ["import-diffusers", "--from", str(folder), "--workdir", str(w), "--dtype", "bfloat16", *VIDEO]
    assert cli.main(args) == 0
    assert cli.main(["export", "--workdir", str(w), "--out", str(out), "--format", "diffusers"]) == 0
    theirs = _tensors(folder / "transformer")
    assert {v.dtype for v in theirs.values()} == {torch.bfloat16}
    _bitwise_equal(theirs, _tensors(out / "transformer"))


def test_bad_input_is_one_line(wan_folder, workdir, tmp_path, capsys):
    src, _ = wan_folder

    def run(*args) -> str:
        assert cli.main(list(args)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sora-jax: error:") and "\n" not in err, err
        return err

    w = str(tmp_path / "w")
    assert "is not a folder" in run("import-diffusers", "--from", str(tmp_path / "nope"), "--workdir", w)
    other = tmp_path / "other"
    other.mkdir()
    assert "no model_index.json" in run("import-diffusers", "--from", str(other), "--workdir", w)
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert "not a WanPipeline" in run("import-diffusers", "--from", str(other), "--workdir", w)
    partial = tmp_path / "partial"
    shutil.copytree(src, partial, ignore=shutil.ignore_patterns("vae"))
    assert "no vae/ folder" in run("import-diffusers", "--from", str(partial), "--workdir", w)
    assert "1 + 4k frames" in run("import-diffusers", "--from", str(src), "--workdir", w, "--num_frames", "6")
    assert not (tmp_path / "w").exists()
    assert "exists and is not empty" in run("import-diffusers", "--from", str(src), "--workdir", str(workdir))
    out = str(tmp_path / "o")
    assert "takes no given frames" in run(
        "sample", "--workdir", str(workdir), "--prompt", "a", "--out", out, "--mode", "loop"
    )
    assert "--format diffusers" in run("export", "--workdir", str(workdir), "--out", out)
    assert "--dtype 'float16' unknown" in run(
        "export", "--workdir", str(workdir), "--out", out, "--format", "diffusers", "--dtype", "float16"
    )
    assert not (tmp_path / "o").exists()


def test_released_size_workdir_config_through_eval_shape():
    """The 1.3B release's workdir config builds its model abstractly (nothing allocated): the parameters of
    Wan2.1-T2V-1.3B, WanPipeline's 81 x 480 x 832 video as 21 x 60 x 104 latents, 32,760 tokens."""
    import dataclasses
    import math

    import jax
    import ml_collections

    from sora_jax import factory, loading
    from sora_jax.config import validate
    from sora_jax.export.wan_io import workdir_config
    from sora_jax.models import wan
    from sora_jax.models.wan_vae import WanVAEConfig

    cfg = workdir_config()
    cfg.autoencoder.wan_vae = ml_collections.ConfigDict(dataclasses.asdict(WanVAEConfig()))
    validate(cfg)
    abstract = factory.abstract_state(cfg, loading.single_device_mesh())
    n = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params))
    assert n == wan.param_count(wan.wan_config("1.3B")) and 1.4e9 < n < 1.45e9, n
    assert factory.latent_shape(cfg) == (21, 60, 104, 16)
    assert factory.tokens_per_clip(cfg, 81, 480, 832) == 21 * 30 * 52


def test_an_euler_folder_samples_as_its_wan_pipeline(wan_folder, tmp_path):
    """A folder whose scheduler is ``FlowMatchEulerDiscreteScheduler`` imports as sampler "euler" on
    diffusers' grid (``config.diffusion.time_grid``): the workdir's pipeline, from the same initial noise,
    ends on WanPipeline's final latents (prompt through UMT5, the empty negative prompt, CFG 5)."""
    folder, _ = wan_folder
    src = tmp_path / "euler_src"
    shutil.copytree(folder, src)
    shutil.rmtree(src / "scheduler")
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(src / "scheduler")
    index = json.loads((src / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (src / "model_index.json").write_text(json.dumps(index))
    w = tmp_path / "w"
    assert (
        cli.main(["import-diffusers", "--from", str(src), "--workdir", str(w), "--dtype", "float32", *VIDEO])
        == 0
    )
    pipe = load_pipeline(w, sample_steps=4)
    d = pipe.config.diffusion
    assert (d.sampler, d.time_grid, d.flow_shift, d.cfg_scale) == ("euler", "diffusers", 3.0, 5.0)
    noise = np.random.default_rng(1).standard_normal((1, 2, 4, 4, 4)).astype(np.float32)
    ours = pipe.generate_latents(["a cat walks on the grass"], noise=noise)
    wp = diffusers.WanPipeline.from_pretrained(src)  # the folder as diffusers loads it: Euler's scheduler
    assert type(wp.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    wp.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = wp(
            prompt="a cat walks on the grass", negative_prompt="", height=32, width=32, num_frames=5,
            num_inference_steps=4, guidance_scale=5.0, latents=torch.from_numpy(np.moveaxis(noise, -1, 1)),
            output_type="latent", max_sequence_length=512,
        ).frames.numpy()  # fmt: skip
    rel = np.abs(np.moveaxis(ours, -1, 1) - theirs).max() / np.abs(theirs).max()
    print(f"euler folder, 4 steps: final latents max rel err {rel:.1e}")
    assert rel < 1e-3
