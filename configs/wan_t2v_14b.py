"""Fine-tuning Wan 2.1 T2V 14B: ``configs/wan_t2v_1_3b.py``'s recipe at the 14B release's sizes.

    sora-jax train --config configs/wan_t2v_14b.py --workdir runs/ft14 \\
        --config.model.init_from=runs/wan14b --config.data.path=data/mine_wan
    sora-jax train --config configs/wan_t2v_14b.py --workdir /tmp/c14 --compile_only --cpu_devices 8
    python -m benchmarks.wan_memory        # the per-device memory at fsdp 8 / 16 / 64 (README)

FSDP over every device (``mesh.fsdp = -1``), one 33 x 480 x 832 clip per device (latents 9 x 60 x 104:
14,040 tokens), bfloat16 compute, float32 master weights, Adam moments and EMA, full remat. Memory per device
(``benchmarks/results/wan14b_memory_cpu.json``, README "Fine-tuning Wan 2.1"): the train state is 213 GiB in
all (14.3B parameters x 16 bytes), 26.7 GiB per device at fsdp 8.
``smoke``: the same tiny Wan as the 1.3B config's.
"""

import ml_collections

from configs import wan_t2v_1_3b

# model.wan: WanConfig fields (sora_jax/models/wan.py: wan_config("14B"), the Wan2.1-T2V-14B release)
WAN_14B = wan_t2v_1_3b.WAN_1_3B | dict(width=5120, depth=40, num_heads=40, ffn_dim=13824)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/wan_t2v_14b.py: unknown argument {arg!r} (use '' or 'smoke')")
    c = wan_t2v_1_3b.wan_recipe(WAN_14B)
    c.optim.lr = 5e-6
    if arg == "smoke":
        wan_t2v_1_3b.shrink(c)
    return c
