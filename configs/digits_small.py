"""The moving-digits benchmark model: DiT-S on 8x32x32 pixel-space clips, for one GPU (or a long CPU run).

sora-jax train --config configs/digits_small.py --workdir runs/digits_small
sora-jax eval --workdir runs/digits_small --num_prompts 256      # adherence on test-split prompts
sora-jax train --config configs/digits_small.py:smoke --workdir /tmp/ds   # seconds, for tests

Measured on one H200 (2026-11-26, benchmarks/gpu_digits_small.sh, trainable text encoder, frame-conditioning
masks on): 3063 steps in 260 s (11.9 steps/s) -> test prompts (256): digits 0.418, both 0.375 (chance 0.006);
the 40k steps below are ~1 hour there.
"""

import ml_collections

from configs import quickstart


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = quickstart.get_config("smoke" if arg == "smoke" else "")
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/digits_small.py: unknown argument {arg!r} (use '' or 'smoke')")
    if arg == "smoke":
        return c
    c.data.num_train = 50_000
    c.data.num_test = 1024
    c.data.batch_size = 64
    c.data.num_workers = 2
    c.model.variant = "S"
    c.model.patch_size = (1, 4, 4)
    c.model.dtype = "bfloat16"
    c.text.width = 256
    c.text.depth = 4
    c.text.num_heads = 4
    c.optim.optimizer = "adamw"  # as measured on the H200 (the quickstart trains with Muon)
    c.repa.layer = 0  # as measured on the H200 (the quickstart trains with REPA)
    c.data.two_digit_gap, c.data.two_digit_left_to_right = 0.0, False  # its data as measured
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 1000
    c.optim.weight_decay = 0.01
    c.optim.ema_decay = 0.9995
    c.train.num_steps = 40_000
    c.train.log_every = 100
    c.train.ckpt_every = 2000
    c.train.keep_checkpoints = 3
    c.eval.every_steps = (
        5000  # adherence and FD-digits on 64 test prompts; the best step kept in checkpoints_best/
    )
    c.eval.num_videos = 64
    c.eval.metrics = "adherence,fd_digits"
    c.eval.best_metric = "adherence"
    return c
