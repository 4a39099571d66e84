"""Latent diffusion on moving digits: the quickstart DiT on the latents of configs/vae_digits.py.

    sora-jax train --config configs/vae_digits.py --workdir runs/vae_digits      # 1. the VAE
    sora-jax eval --workdir runs/vae_digits                                       # 2. PSNR + latent stats
    sora-jax train --config configs/digits_latent.py --workdir runs/latent \\
        --config.autoencoder.path=runs/vae_digits                                 # 3. the DiT on latents
    sora-jax eval --workdir runs/latent                                           # prompt adherence

9-frame 32x32 clips -> 3 x 8 x 8 x 8 latents (normalised by the VAE's measured shift/scale); 1x2x2 patches
give 48 tokens of 32 values. With ``data.path`` empty the clips are built again from the same seed and sizes as the VAE's.
"""

import ml_collections

from configs import quickstart


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/digits_latent.py: unknown argument {arg!r} (use '' or 'smoke')")
    c = quickstart.get_config("smoke" if arg == "smoke" else "")
    c.autoencoder.kind = "vae"
    c.autoencoder.path = ""  # the VAE's workdir (required)
    c.data.num_frames = 5 if arg == "smoke" else 9
    c.model.patch_size = (1, 2, 2)
    c.diffusion.flow_prediction = "v"  # latents are unit-variance: v-prediction as usual in latent space
    c.diffusion.flow_shift = 3.0
    c.optim.optimizer, c.optim.lr = "adamw", 2e-3  # as measured (the pixel quickstart moved to Muon, 4e-3)
    c.repa.layer = 0  # REPA reads pixel clips (the quickstart aligns with the digit reader since stop 21)
    c.data.two_digit_gap, c.data.two_digit_left_to_right = 0.0, False  # its data as measured
    return c
