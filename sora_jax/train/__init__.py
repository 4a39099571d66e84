"""Training: state, the jitted step, the loop, checkpoints (orbax) and metrics (clu)."""
