"""The causal video VAE on the bundled moving digits: 9-frame 32x32 clips -> 3 x 8 x 8 x 8 latents.

    sora-jax train --config configs/vae_digits.py --workdir runs/vae_digits
    sora-jax eval --workdir runs/vae_digits            # PSNR / SSIM on test clips, recon contact sheet
    sora-jax train --config configs/vae_digits.py:smoke --workdir /tmp/v   # seconds, for tests

A causal VAE codes 1 + 4k frames (the first alone), so the clips have 9 frames; the digit reader reads the
first 8. Losses: L1 + L2 on pixels in [-1, 1] and a small KL (``vae.kl_weight``).
"""

import ml_collections

from configs import quickstart


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/vae_digits.py: unknown argument {arg!r} (use '' or 'smoke')")
    c = quickstart.get_config("smoke" if arg == "smoke" else "")
    c.task = "vae"
    c.data.two_digit_gap, c.data.two_digit_left_to_right = 0.0, False  # the clips it was measured on
    c.vae = ml_collections.ConfigDict()
    c.vae.variant = "digits"  # sora_jax.models.vae.VAE_VARIANTS
    c.vae.latent_channels = 0  # 0: the variant's
    c.vae.base_width = 0
    c.vae.l1_weight = 1.0
    c.vae.l2_weight = 1.0
    c.vae.kl_weight = 1e-3  # per pixel, on KL summed over each clip's latent
    # LPIPS on a user-supplied VGG16 (.npz in torchvision naming, sora_jax/models/perceptual.py); 0: off
    c.vae.perceptual_weight = 0.0
    c.vae.perceptual_path = ""
    # 3D PatchGAN (hinge loss, adaptive weight) from step gan_start on; gan_weight 0 switches it off
    c.vae.gan_weight = 0.0
    c.vae.gan_start = 2000
    c.vae.disc_lr = 0.0  # 0: optim.lr
    c.vae.disc_width = 32
    c.vae.disc_layers = 3
    c.data.num_frames = 9
    c.model.patch_size = (1, 1, 1)  # unused by the VAE; keeps the DiT checks quiet
    # measured on a 2-core CPU (2026-11-25): width 16, batch 8, lr 2e-3 -> test PSNR 21.1 dB / SSIM 0.875 (raw
    # weights) after 1000 steps, ~0.5-0.9 steps/s. On one H200 (2026-11-26, benchmarks/gpu_vae.sh): the full
    # width (--config.vae.base_width=0), batch 32, lr 1e-3, EMA 0.99 -> 3865 steps in 140 s, test PSNR 33.5 dB
    # (EMA) / 32.6 dB (raw), SSIM 0.989 (benchmarks/results/gpu_h200_digits.json)
    c.vae.base_width = 16
    c.data.batch_size = 8
    c.optim.optimizer = "adamw"
    c.repa.layer = 0  # REPA is a DiT loss term
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.995  # 0.999 still holds 37% of the initial weights at step 1000
    c.train.num_steps = 3000
    c.train.log_every = 100
    c.train.ckpt_every = 1000
    if arg == "smoke":
        c.vae.variant = "smoke"
        c.vae.base_width = 0  # the smoke variant's
        c.data.num_frames = 5
        c.train.num_steps = 4
        c.train.log_every = 2
        c.train.ckpt_every = 2
        c.optim.warmup_steps = 2
    return c
