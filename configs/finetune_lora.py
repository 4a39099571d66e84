"""LoRA personalization of the quickstart digits DiT (issue 22): adapters on its attention q/k/v/out and MLP
projections, the trained model frozen underneath (sora_jax/models/lora.py).

    sora-jax train --config configs/quickstart.py --workdir runs/quick            # the base, once
    sora-jax train --config configs/finetune_lora.py --workdir runs/lora \\
        --config.lora.init_from=runs/quick --config.data.path=data/my_style
    sora-jax train --config configs/finetune_lora.py:smoke --workdir /tmp/l \\
        --config.lora.init_from=/tmp/q                                             # seconds, for tests

The run's state (optimizer, EMA, checkpoints) holds the adapters alone; the base is read from
``lora.init_from`` at every start (so keep that workdir). Step 0 samples exactly what the base samples (B = 0).
Sampling a LoRA workdir (``sora-jax sample``) is not wired yet.
"""

import ml_collections

from configs import quickstart


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/finetune_lora.py: unknown argument {arg!r} (use '' or 'smoke')")
    c = quickstart.get_config(arg)
    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True
    c.lora.rank = 8
    c.lora.alpha = 8.0  # the update is scaled by alpha / rank
    # "/"-joined parameter paths (re.search): the DiT blocks' self/cross-attention q/k/v/out and MLP kernels
    c.lora.targets = (
        r"^dit/blocks/(attn|cross_attn)/w[qkvo]$",
        r"^dit/blocks/mlp/fc[12]/kernel$",
    )
    c.lora.dora = False  # DoRA (Liu et al. 2024): a learned magnitude per output channel
    c.lora.base_dtype = ""  # the frozen base's storage: "" (model.param_dtype), bfloat16, int8, float8_e4m3fn
    c.lora.init_from = ""  # the trained digits workdir (configs/quickstart.py) whose weights stay frozen

    # a few clips of a new style: short, a small constant rate, no decay to speak of
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.optim.ema_decay = 0.99
    c.train.num_steps = 500
    c.train.log_every = 50
    c.train.ckpt_every = 250
    c.data.num_train = 8  # "from 8 clips"
    c.data.batch_size = 8
    c.text.caption_dropout = 0.1
    if arg == "smoke":
        c.train.num_steps = 4
        c.train.log_every = 2
        c.train.ckpt_every = 2
        c.optim.warmup_steps = 1
    return c
