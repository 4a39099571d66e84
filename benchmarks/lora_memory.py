"""Memory of one training step on ONE device for Wan 2.1 1.3B / 14B (``configs/wan_t2v_1_3b.py``, ``_14b.py``):
full fine-tuning vs LoRA over a float32 / bfloat16 / int8 / fp8 frozen base (``config.lora.base_dtype``,
sora_jax/models/quant.py), from the trainer's ``--compile_only`` path: nothing is allocated, the step is lowered
and compiled for one device and XLA's memory analysis of the executable is read (``train.loop._memory``).

    python -m benchmarks.lora_memory                     # CPU: 1.3B and 14B at 81 x 480 x 832, every option
    python -m benchmarks.lora_memory --models 1.3B --frames 17,21,25 --options full,lora_int8_base \
        --out benchmarks/results/lora_memory_cpu_frames.json   # the clip length that fits
    python -m benchmarks.lora_memory --backend gpu --out benchmarks/results/lora_memory_gpu.json  # cudnn attention
    python -m benchmarks.lora_memory --attention chunked --options full,lora_bf16_base,lora_int8_base,lora_fp8_base \
        --out benchmarks/results/lora_memory_cpu_chunked.json   # flash-style attention in plain JAX, on the CPU
    python -m benchmarks.lora_memory --attention chunked --ffn_chunk 4096 \
        --out benchmarks/results/lora_memory_cpu_chunked_ffn4096.json   # and the FFN over 4096-token blocks

One clip per step (``data.batch_size = 1``), latents and UMT5 caption features precomputed (``data.content =
latents``: no VAE, no text encoder in the step), the configs' recipe otherwise: bfloat16 compute, float32
master weights / Adam moments / EMA of what trains, full remat (``model.remat = "full"``: each block's
activations recomputed in the backward pass), LoRA rank 8 on every block's attention q/k/v/out and FFN kernels.

Each option compiles in its own process; the table is printed and the JSON (``--out``) rewritten after every
row, so an interrupted run keeps what it measured. On the CPU backend there is no flash attention: the attention
scores ``[K, N, N]`` of one block are materialised and counted in ``temp`` (``scores_gib`` gives their size in the
compute dtype; a flash kernel such as cuDNN's, ``model.attention_impl = "cudnn"``, does not hold them).
``--attention chunked`` sets ``model.attention_impl = "chunked"`` (``layers.chunked_attention``: query and key
blocks with an online softmax, recomputed in the backward pass), which runs on the CPU and holds one tile of
scores instead: the CPU count then approaches what a flash kernel holds. ``peak`` is arguments + temporaries +
outputs not aliased to (donated) arguments. ``--ffn_chunk C`` sets ``model.ffn_chunk = C``: each block's FFN
runs over blocks of C tokens, so the backward pass never holds its hidden ``[N, ffn_dim]`` whole (on the CPU,
several float32 copies of it set the step's peak).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"1.3B": "configs/wan_t2v_1_3b.py", "14B": "configs/wan_t2v_14b.py"}
# option -> config overrides
OPTIONS = {
    "full": ["lora.enabled=False"],
    "lora_f32_base": ["lora.enabled=True"],
    "lora_bf16_base": ["lora.enabled=True", "lora.base_dtype=bfloat16"],
    "lora_int8_base": ["lora.enabled=True", "lora.base_dtype=int8"],
    "lora_fp8_base": ["lora.enabled=True", "lora.base_dtype=float8_e4m3fn"],
}

_CHILD = """
import json, sys
from sora_jax import commands
config, cpu, overrides = sys.argv[1], sys.argv[2] == "cpu", json.loads(sys.argv[3])
out = commands.train(config, sys.argv[4], overrides=overrides, compile_only=True, cpu_devices=1 if cpu else None)
print("RESULT " + json.dumps(out))
"""


_ATTENTION_NOTES = {
    "xla": "attention_impl=xla: no flash attention, one block's attention scores [K, N, N] are materialised "
    "inside temp_gib (scores_gib is their size in bf16); a flash kernel (cudnn) does not hold them.",
    "chunked": "attention_impl=chunked (layers.chunked_attention, 1024 x 1024 query x key blocks, online "
    "softmax, blocks recomputed in the backward pass): the scores are never held whole (scores_gib is what the "
    "xla path would hold, not counted here); temp_gib holds a tile of scores and per query block the running "
    "accumulators.",
    "cudnn": "attention_impl=cudnn: the cuDNN flash kernel, scores never materialised.",
}


def _scores_gib(config: str, overrides: list[str]) -> tuple[int, float]:
    """(tokens per clip, GiB of one block's attention scores ``[K, N, N]`` for one clip in the compute dtype)."""
    from sora_jax import factory
    from sora_jax.config import load_config

    cfg = load_config(config, overrides)
    n = factory.tokens_per_clip(cfg, cfg.data.num_frames, cfg.data.height, cfg.data.width)
    itemsize = 2 if cfg.model.dtype == "bfloat16" else 4
    return n, cfg.model.wan.num_heads * n * n * itemsize / 2**30


def measure(
    model: str, option: str, frames: int, backend: str, attention: str, timeout: float, ffn_chunk: int = 0
) -> dict:
    """One (model, option) compiled for one device of ``backend`` in a child process."""
    config = CONFIGS[model]
    overrides = [
        "data.batch_size=1", "mesh.data=1", "mesh.fsdp=1", f"data.num_frames={frames}", "data.height=480",
        "data.width=832", *OPTIONS[option],
    ]  # fmt: skip
    overrides.append(f"model.attention_impl={attention}")
    if ffn_chunk:
        overrides.append(f"model.ffn_chunk={ffn_chunk}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, config, backend, json.dumps(overrides), workdir],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    head = {
        "model": model,
        "option": option,
        "frames": frames,
        "height": 480,
        "width": 832,
        "attention": attention,
    }
    if proc.returncode or not lines:
        return head | {"error": proc.stderr.strip().splitlines()[-3:]}
    out = json.loads(lines[-1].removeprefix("RESULT "))
    tokens, scores = _scores_gib(config, overrides)
    keep = (
        "peak_gib", "argument_gib", "output_gib", "alias_gib", "temp_gib", "state_gib", "lora_base_gib",
        "compile_seconds", "peak_batch",
    )  # fmt: skip
    return head | {
        "overrides": overrides,
        "tokens_per_clip": tokens,
        "scores_gib": scores,
        **{k: out[k] for k in keep if k in out},
        "wall_seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="1.3B,14B", help="comma-separated: 1.3B, 14B")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated of {', '.join(OPTIONS)}")
    p.add_argument(
        "--frames", default="81", help="clip frames, comma-separated: every model at each (4k + 1)"
    )
    p.add_argument("--backend", default="cpu", choices=("cpu", "gpu"))
    p.add_argument(
        "--attention",
        default=None,
        choices=("xla", "chunked", "cudnn"),
        help="model.attention_impl (default: xla on cpu, cudnn on gpu)",
    )
    p.add_argument("--ffn_chunk", type=int, default=0, help="model.ffn_chunk: FFN token blocks (0: whole)")
    p.add_argument("--out", default="benchmarks/results/lora_memory_cpu.json")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per row")
    args = p.parse_args(argv)
    import jax

    attention = args.attention or ("cudnn" if args.backend == "gpu" else "xla")
    models = args.models.split(",")
    frames = [int(f) for f in args.frames.split(",")]
    meta = {
        "what": "per-device memory of one compiled training step on one device (XLA memory analysis)",
        "backend": args.backend,
        "attention": attention,
        "ffn_chunk": args.ffn_chunk,
        "jax": jax.__version__,
        "options": OPTIONS,
        "note": (
            "batch 1, latents and text features precomputed, bf16 compute, f32 master weights and Adam state of "
            "what trains, remat full, LoRA rank 8 on the blocks' attention and FFN kernels. "
            + _ATTENTION_NOTES[attention]
            + " The count is XLA's buffer assignment for this backend: no CUDA context, cuBLAS/cuDNN workspaces "
            "or allocator fragmentation; GPU fusion and scheduling differ. Seen in the CPU HLO after optimization "
            "(not checked on a GPU): XLA CPU converts the scan's bf16 stack of saved block inputs (depth x N x D) "
            "and a bf16 base's stacked kernels to float32 outside the loops, so temp_gib holds float32 copies "
            "of both."
        ),
    }
    rows = []
    print(f"{'model':>5} {'option':>15} {'frames':>6} {'peak':>8} {'args':>8} {'temp':>8} {'base':>7} "
          f"{'scores':>7} {'compile s':>9}")  # fmt: skip
    for model, n in ((m, f) for m in models for f in frames):
        for option in args.options.split(","):
            row = measure(model, option, n, args.backend, attention, args.timeout, args.ffn_chunk)
            rows.append(row)
            if "error" in row:
                print(f"{model:>5} {option:>15} {n:>6} error: {row['error']}")
            else:
                print(
                    f"{model:>5} {option:>15} {n:>6} {row['peak_gib']:8.2f} {row['argument_gib']:8.2f} "
                    f"{row['temp_gib']:8.2f} {row.get('lora_base_gib', 0.0):7.2f} {row['scores_gib']:7.2f} "
                    f"{row['compile_seconds']:9.1f}",
                    flush=True,
                )
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
