"""``sora-jax export`` of a LoRA workdir: its adapters alone, in the files other tools load.

Owns ``is_lora_workdir`` and ``export_adapters``. A LoRA run (``config.lora``) trains adapters over the frozen
base of ``lora.init_from``; exporting it writes the adapters (EMA, or the raw ones), never the base:

    DIR/pytorch_lora_weights.safetensors   diffusers / peft layout (WanPipeline.load_lora_weights, the PyTorch
                                           twin's SoraPipeline.load_lora_weights)
    DIR/wan_lora_comfyui.safetensors       Wan only: ComfyUI / original Wan names with .alpha
    DIR/adapter_config.json                rank, alpha, targets, the base (lora.init_from), the step
    DIR/adapter/                           a small orbax checkpoint of the adapters (nnx.LoRAParam pure dict)
    DIR/datacard.json                      the data the adapters were trained on (when the run recorded one)

Export the base once with ``sora-jax export --workdir <lora.init_from>``; any number of adapters then load
on top of it. The folder appears whole (written beside it, renamed) or not at all.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from sora_jax.export.lora_files import write_adapters
from sora_jax.export.writer import check_out, staged_folder, write_datacard

ADAPTER_CHECKPOINT = "adapter"


def is_lora_workdir(cfg: ml_collections.ConfigDict) -> bool:
    """Whether a workdir's saved config trains LoRA adapters (``config.lora.enabled``)."""
    lo = cfg.get("lora")
    return lo is not None and bool(lo.enabled)


def export_adapters(workdir: str | Path, out: str | Path, *, raw_params: bool = False) -> dict:
    """Writes the latest checkpoint's adapters of the LoRA ``workdir`` to ``out`` (the module docstring's
    files; the base is not read). Returns a summary (out, step, parameters, files, seconds, base)."""
    import orbax.checkpoint as ocp

    from sora_jax import loading

    t0 = time.perf_counter()
    out = check_out(out)
    cfg, step, abstract, adapters = loading.restore(workdir, use_ema=not raw_params, with_base=False)
    _, base = nnx.split_state(abstract.params, nnx.LoRAParam, ...)
    model = nnx.merge(abstract.graphdef, nnx.merge_state(base, adapters))  # the base as shapes only
    with staged_folder(out) as tmp:
        metadata = {
            "sora_jax_workdir": str(workdir),
            "sora_jax_step": str(step),
            "sora_jax_parameters": "params" if raw_params else "ema",
            "sora_jax_base": str(cfg.lora.init_from),
        }
        write_adapters(model, tmp, metadata=metadata)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / ADAPTER_CHECKPOINT, nnx.to_pure_dict(adapters))
            ckpt.wait_until_finished()
        write_datacard(tmp, workdir, step, cfg)
    return {
        "out": str(out),
        "step": int(step),
        "parameters": int(sum(a.size for a in jax.tree.leaves(adapters))),
        "files": sum(1 for p in out.rglob("*") if p.is_file()),
        "seconds": time.perf_counter() - t0,
        "base": str(cfg.lora.init_from),
    }
