"""Evaluation: prompt adherence on moving digits.

``digit_reader`` is the evaluator, a small video classifier that reads which digits a clip shows and each
one's direction (shipped weights in ``weights/digit_reader.npz``, trained by ``train_reader``);
``adherence`` scores its readings against the prompts (digit, direction and exact-set accuracy, with chance
levels) and writes reports; ``evaluate`` runs it on a trained workdir (``sora-jax eval``).
"""
