"""LoRA personalization of the quickstart digits DiT (issue 22): adapters on its attention q/k/v/out and MLP
projections, the trained model frozen underneath (sora_jax/models/lora.py).

    sora-jax train --config configs/quickstart.py --workdir runs/quick            # the base, once
    sora-jax train --config configs/finetune_lora.py --workdir runs/lora \\
        --config.lora.init_from=runs/quick --config.data.path=data/my_style
    sora-jax sample --workdir runs/lora --prompt "grey style: a 3 moving left" --out out/
    sora-jax train --config configs/finetune_lora.py:smoke --workdir /tmp/l \\
        --config.lora.init_from=/tmp/q                                             # seconds, for tests

The run's state (optimizer, EMA, checkpoints) holds the adapters alone; the base is read from
``lora.init_from`` at every start (so keep that workdir). Step 0 samples exactly what the base samples (B = 0).
``sora-jax sample`` / ``eval`` / ``api.load_pipeline`` on a LoRA workdir merge the adapters onto that base
(``loading.restore``).

The defaults are the setting measured by ``python benchmarks/lora_style.py --base runs/demo`` (the demo's
model; results in benchmarks/results/lora_style_demo.json, row "default"; 160 s of training on a 2-core CPU):
8 clips of a style the base never drew (mid-grey digits, RGB 128) captioned "grey style: <ordinary caption>",
each twice, among 192 clips of the base's own data (DreamBooth's prior preservation). On 96 held-out test
prompts with the trigger, the digits' foreground luma went from the base's 129 to 100 (the style clips: 94;
the base data: 174); adherence on the plain test prompts moved by digits -0.021, direction -0.020, both 0.000,
count -0.031 (base 0.292 / 0.218 / 0.229 / 0.552); the styled videos themselves read 0.167 digits right vs the
base's 0.219 on the same triggered prompts (some grey digits come out broken). lr 1e-3 drew the style fully but cost 0.04 digit accuracy;
rank 4 kept adherence but drew half the style; without the base's clips every setting that drew the style
cost 0.12-0.18 digit accuracy on plain prompts. On all 512 test prompts (row "default_512prompts": the same
LoRA) the foreground luma went from 130 to 101 and plain-prompt adherence moved by -0.006 / -0.012 / -0.002 /
-0.021 (digits / direction / both / count).
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
    c.optim.optimizer = "adamw"  # the adapters are low-rank pairs, not the matrices Muon orthogonalises
    c.optim.lr = (
        5e-4  # 1e-3 drew the style but cost 0.04 digit accuracy on plain prompts (lora_style_demo.json)
    )
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
