"""Evaluation: prompt adherence on moving digits, video prompting, VAE reconstruction.

``digit_reader`` is the evaluator, a small video classifier that reads which digits a clip shows and each
one's direction (shipped weights in ``weights/digit_reader.npz``, trained by ``reader_training``);
``adherence`` scores its readings against the prompts (digit, direction and exact-set accuracy, with chance
levels) and writes reports; ``evaluate`` runs it on a trained workdir, ``paraphrase`` gives prompts in unseen
wordings, ``prompting`` scores i2v / extend / connect / long videos, ``reconstruction`` a VAE's PSNR / SSIM.
``sora_jax.commands.evaluate`` (``sora-jax eval``) picks the one for a checkpoint's task.
"""
