"""DiT-8B on long clips: 128 frames at 256x448 (16:9), 28,672 tokens per clip, on a 64-device pod.

    sora-jax train --config configs/pod_dit_8b.py --workdir gs://bucket/runs/dit8b --config.data.path=...
    sora-jax train --config configs/pod_dit_8b.py --workdir /tmp/c8b --compile_only --cpu_devices 64
    sora-jax train --config configs/pod_dit_8b.py:smoke --workdir /tmp/t --compile_only --cpu_devices 8

Mesh: fsdp=8 x tensor=2 x seq=4 over 64 devices (e.g. a v5p-128 slice, or 8 hosts x 8 GPUs); one clip is
split over the 8 devices of a (tensor, seq) group, so the global batch is 8 clips per pod. More pods multiply
``mesh.dcn.data``. Sequence parallelism: ring attention (the 12 local heads split over seq=4 would also
suit "ulysses", which wants a flash kernel on the accelerator: XLA's CPU attention materialises the scores).
Pixel space with 2x16x16 patches and x0-prediction (JiT) until the VAE provides latents.

Memory per device from ``--compile_only --cpu_devices 64`` (jax 0.10.2, XLA's CPU memory analysis; fp32
master weights, Adam and EMA sharded over fsdp x tensor = 16, bf16 compute, remat "full"), measured
2026-11-25: train state 124.7 GiB in all (8.6B parameters) -> 7.9 GiB per device; step temporaries
17.0 GiB; peak about 24.9 GiB, inside an 80 GB H100 or a 95 GB v5p chip.
"""

import ml_collections

from configs import pod_dit_1b


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "smoke"):
        raise ValueError(f"configs/pod_dit_8b.py: unknown argument {arg!r} (use '' or 'smoke')")
    c = pod_dit_1b.get_config()
    c.data.num_frames = 128
    c.data.height = 256
    c.data.width = 448
    c.data.batch_size = 8
    c.model.variant = "8B"
    c.model.seq_parallel = "ring"
    c.text.width = 2048
    c.text.num_heads = 16
    c.optim.lr = 6e-5
    c.mesh.data = 1
    c.mesh.fsdp = 8
    c.mesh.tensor = 2
    c.mesh.seq = 4
    if arg == "smoke":  # tiny, with the same fsdp x tensor x seq layout (ring attention) on 8 devices
        pod_dit_1b.shrink(c)
        c.mesh.fsdp, c.mesh.tensor, c.mesh.seq = 2, 2, 2
    return c
