"""Fine-tuning Wan 2.1 T2V 1.3B with this trainer, on precomputed Wan-VAE latents and UMT5 caption features.

    sora-jax import-diffusers --from Wan2.1-T2V-1.3B-Diffusers --workdir runs/wan --dtype bfloat16
    sora-jax ingest --videos raw/ --captions raw/captions.csv --out data/mine
    python -m data_pipelines.encode_latents --vae runs/wan --data data/mine --out data/mine_wan \\
        --clip 33x480x832,33x832x480 --fps 16 --text_encoder t5 --max_length 512 --batch_size 1
    sora-jax train --config configs/wan_t2v_1_3b.py --workdir runs/ft --config.model.init_from=runs/wan \\
        --config.data.path=data/mine_wan --config.data.buckets=33x480x832,33x832x480
    sora-jax train --config configs/wan_t2v_1_3b.py:smoke --workdir /tmp/w --compile_only --cpu_devices 8

``model.init_from`` names the workdir to start from (``sora_jax.loading.resolve_init``): its parameters become
the step-0 parameters and EMA, the optimizer state starts fresh, and the UMT5 folder, its tokenizer and the VAE
folder (``text.path``, ``text.tokenizer_path``, ``autoencoder.path``) come from it when left empty here. A rerun
resumes from ``--workdir``'s checkpoints as any run does (then ``init_from`` is not read again for weights).

Recipe: Wan's own objective (rectified flow, velocity ``noise - x0``, one uniform time per clip shifted by
``flow_shift``; no frame conditioning), latents and caption features precomputed once
(``data_pipelines/encode_latents.py`` with the workdir's Wan VAE and its UMT5; its ``--clip`` buckets are
``data.buckets`` here, or its one clip shape is ``data.num_frames`` x ``height`` x ``width``), float32 master
weights with bfloat16 compute, full remat, AdamW at 1e-5, EMA 0.999, FSDP over every device
(``mesh.fsdp = -1``; ``model.seq_parallel = "ulysses"`` with ``mesh.seq`` splits long clips' tokens).
``configs/wan_t2v_14b.py`` is the 14B release's sizes on the same recipe.

``smoke``: a tiny Wan (37,744 parameters) with the sizes of the random diffusers folder the tests build
(``tests/test_wan_io.py``): loading, validating and counting parameters needs no file; training it needs that
folder imported (``init_from``) for its UMT5 and VAE.
"""

import ml_collections

from configs import quickstart

# model.wan: WanConfig fields (sora_jax/models/wan.py: wan_config("1.3B"), the Wan2.1-T2V-1.3B release)
WAN_1_3B = dict(
    width=1536, depth=30, num_heads=12, ffn_dim=8960, text_dim=4096, in_channels=16, out_channels=16,
    freq_dim=256, eps=1e-6, cross_attn_norm=True, rope_theta=10000.0,
)  # fmt: skip
# autoencoder.wan_vae: WanVAEConfig fields; absent ones keep its defaults, which are Wan 2.1's VAE
WAN21_VAE = dict(
    base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, temperal_downsample=(False, True, True)
)
# the smoke sizes: tests/test_wan_io.py's random diffusers folder (TRANSFORMER, VAE, UMT5 there)
WAN_SMOKE = dict(
    width=32, depth=2, num_heads=2, ffn_dim=64, text_dim=32, in_channels=4, out_channels=4, freq_dim=32,
    eps=1e-6, cross_attn_norm=True, rope_theta=10000.0,
)  # fmt: skip
VAE_SMOKE = dict(
    base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temperal_downsample=(False, True, True),
    latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 2.0, 1.0),
)  # fmt: skip


def wan_recipe(sizes: dict) -> ml_collections.ConfigDict:
    """The fine-tuning recipe (module docstring) for Wan sizes ``sizes`` (``model.wan``)."""
    c = quickstart.get_config()
    d = c.data
    d.path = ""  # the latent dataset data_pipelines/encode_latents.py wrote (required)
    d.content = "latents"
    d.num_frames, d.height, d.width, d.fps = 33, 480, 832, 16  # the --clip given to encode_latents
    d.buckets = ""  # or encode_latents' --clip list, e.g. "33x480x832,33x832x480" (batch: data.token_budget)
    d.speed = ()
    d.batch_size = 8  # global: a multiple of the mesh's batch axes (data x fsdp)
    d.num_workers = 2

    c.model = ml_collections.ConfigDict()
    c.model.arch = "wan"
    c.model.variant = "wan2.1-t2v"  # a label; the sizes are model.wan
    c.model.wan = ml_collections.ConfigDict(dict(sizes))
    c.model.patch_size = (1, 2, 2)
    c.model.dtype = "bfloat16"  # compute
    c.model.param_dtype = "float32"  # master weights, Adam moments and EMA (the import may be bfloat16)
    c.model.remat = "full"
    c.model.seq_parallel = "none"  # none | ulysses | ring over mesh.seq
    c.model.attention_impl = "xla"  # cudnn on NVIDIA GPUs; chunked: flash-style blocks, any backend
    c.model.ffn_chunk = 0  # > 0: the FFN over blocks of that many tokens (long clips; 0: all at once)
    c.model.init_from = ""  # the workdir to fine-tune (sora-jax import-diffusers wrote it)
    c.model.source = ""  # the diffusers folder (export --format diffusers copies text/tokenizer/scheduler)

    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.kind = "wan_vae"
    c.autoencoder.path = ""  # "" : init_from's vae/
    c.autoencoder.wan_vae = ml_collections.ConfigDict(WAN21_VAE)

    t = c.text
    t.encoder = "t5"  # frozen UMT5-XXL; its features are precomputed (encode_latents --text_encoder t5)
    t.path = ""  # "": init_from's text_encoder/
    t.tokenizer_path = ""
    t.dtype = "bfloat16"
    t.max_length = 512  # WanPipeline's max_sequence_length
    t.width = sizes["text_dim"]
    t.caption_dropout = 0.1  # keeps classifier-free guidance working

    f = c.diffusion
    f.objective = "rectified_flow"
    f.flow_prediction = "v"
    f.flow_timestep_sampling = "uniform"
    f.flow_shift = 3.0  # Wan's 480p shift
    f.sampler = "unipc"
    f.time_grid = "diffusers"  # diffusers' scheduler grids: euler and unipc sample as WanPipeline does
    f.sample_steps = 50
    f.cfg_scale = 5.0
    f.sample_jitter = 0.0  # the quickstart's patch-grid jitter off: sampled as WanPipeline samples

    c.conditioning.probs = ml_collections.ConfigDict({"none": 1.0})  # Wan 2.1 T2V: one time per clip
    c.conditioning.max_frames = 1

    c.repa.layer = 0  # REPA is the quickstart DiT's (the digit reader's features)
    o = c.optim
    o.optimizer = "adamw"
    o.lr, o.warmup_steps, o.weight_decay, o.b1, o.b2, o.grad_clip, o.ema_decay = (
        1e-5, 100, 0.0, 0.9, 0.999, 1.0, 0.999
    )  # fmt: skip
    c.train.num_steps = 2000
    c.train.log_every = 10
    c.train.ckpt_every = 200
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.seq = 1, -1, 1, 1
    c.eval.every_steps = 0  # the digits evaluators do not apply
    c.sample.prompts = ("a cat walks on the grass, realistic",)
    c.sample.use_ema = True
    return c


def shrink(c: ml_collections.ConfigDict) -> None:
    """The smoke variant in place: the tiny Wan (``WAN_SMOKE``, ``VAE_SMOKE``) on 5 x 32 x 32 clips (latents
    2 x 4 x 4 x 4: 8 tokens), a few steps; the recipe (bf16 compute, fp32 weights, remat, FSDP) kept."""
    c.model.wan = ml_collections.ConfigDict(WAN_SMOKE)
    c.autoencoder.wan_vae = ml_collections.ConfigDict(VAE_SMOKE)
    c.data.num_frames, c.data.height, c.data.width, c.data.fps = 5, 32, 32, 8
    c.data.batch_size = 4
    c.data.num_workers = 0
    c.text.max_length = 16
    c.text.width = WAN_SMOKE["text_dim"]
    c.optim.lr, c.optim.warmup_steps, c.optim.ema_decay = 3e-3, 2, 0.9
    c.train.num_steps, c.train.log_every, c.train.ckpt_every = 8, 2, 4
    c.diffusion.sample_steps = 4
    c.sample.prompts = ("a cat runs",)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/wan_t2v_1_3b.py: unknown argument {arg!r} (use '' or 'smoke')")
    c = wan_recipe(WAN_1_3B)
    if arg == "smoke":
        shrink(c)
    return c
