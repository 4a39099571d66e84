"""DiT-1B on pod-scale video: 64 frames at 256x256, 8192 tokens per clip, FSDP within a slice.

    sora-jax train --config configs/pod_dit_1b.py --workdir gs://bucket/runs/dit1b --config.data.path=...
    sora-jax train --config configs/pod_dit_1b.py --workdir /tmp/c1b --compile_only --cpu_devices 16
    sora-jax train --config configs/pod_dit_1b.py:smoke --workdir /tmp/t   # the same recipe, tiny: tests

Pixel space with 2x16x16 patches and x0-prediction (JiT) until the VAE (configs/vae_*.py) provides latents.
Mesh: 16 devices as fsdp=16 (e.g. a v5p-32 slice or two 8-GPU hosts); more slices multiply ``mesh.dcn.data``.

Memory per device from ``--compile_only --cpu_devices 16`` (jax 0.10.2, XLA's CPU memory analysis; fp32
master weights, Adam and EMA sharded over fsdp=16, bf16 compute, remat "full"), measured 2026-11-25:
    train state 14.96 GiB in all -> 0.94 GiB per device; step temporaries 16.6 GiB; peak about 17.5 GiB.
The temporaries are mostly attention scores (16 heads x 8192^2 per clip), which XLA's CPU attention
materialises; cuDNN flash attention (``model.attention_impl``) or a seq axis shrinks them on the accelerator.
"""

import ml_collections

from configs import quickstart


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/pod_dit_1b.py: unknown argument {arg!r} (use '' or 'smoke')")
    c = quickstart.get_config()
    c.data.num_frames = 64
    c.data.height = 256
    c.data.width = 256
    c.data.fps = 24
    c.data.batch_size = 16  # global: one clip per device
    c.data.num_workers = 8
    c.autoencoder.kind = "identity"
    c.model.variant = "1B"
    c.model.patch_size = (2, 16, 16)
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.seq_parallel = "none"
    # with real data: "t5" + text.path (T5 v1.1 / UMT5-XXL, frozen); text.width is then the adapter's output
    c.text.encoder = "trainable"
    c.text.width = 1024
    c.text.depth = 4
    c.text.num_heads = 16
    c.text.max_length = 128
    c.text.vocab_size = 32768
    c.optim.optimizer = "adamw"
    c.repa.layer = 0
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.01
    c.optim.ema_decay = 0.9999
    c.train.num_steps = 200_000
    c.train.log_every = 50
    c.train.ckpt_every = 2000
    c.train.keep_checkpoints = 3
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.mesh.seq = 1
    if arg == "smoke":
        shrink(c)
    return c


def shrink(c: ml_collections.ConfigDict) -> None:
    """The ``smoke`` variant of a pod config, in place: the same recipe (pixel space, 2x16x16 patches, bf16,
    remat, trainable text encoder, mesh layout) at test size: about 0.2M parameters on 4x32x32 clips of the
    bundled digits (2x2x2 tokens), a few steps. The mesh axes keep their roles but fit the tests' 8 fake CPU
    devices (``--compile_only --cpu_devices 8`` compiles either in under a minute)."""
    c.data.num_frames = 4
    c.data.height = 32
    c.data.width = 32
    c.data.fps = 8
    c.data.num_train = 64
    c.data.num_test = 16
    c.data.batch_size = 8
    c.data.num_workers = 0
    c.model.variant = "smoke"
    c.text.width = 32
    c.text.depth = 1
    c.text.num_heads = 2
    c.text.max_length = 16
    c.text.vocab_size = 2048
    c.optim.warmup_steps = 2
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.ckpt_every = 3
    c.diffusion.sample_steps = 4
    c.sample.prompts = c.sample.prompts[:2]
