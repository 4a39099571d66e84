"""What a compiled train step holds: its memory per device and the largest constant baked into it (the trainer
logs both and reports them with its timings)."""

from __future__ import annotations

import math
import re


def largest_constant(hlo_text: str) -> tuple[int, str]:
    """(bytes, tensor type) of the largest constant in a lowered program's StableHLO text: what the program
    carries baked in (frozen weights closed over would show here; arguments do not)."""
    best = (0, "")
    for m in _CONSTANT.finditer(hlo_text):
        dims, dtype = m.group(1), m.group(2)
        n = math.prod(int(d) for d in dims.split("x") if d) if dims else 1
        bits = int(re.sub(r"\D", "", dtype) or 8)
        best = max(best, (n * max(bits, 8) // 8, f"tensor<{dims}{dtype}>"))
    return best


_CONSTANT = re.compile(r"stablehlo\.constant .*: tensor<((?:\d+x)*)([a-z]+\d*)>")


def compiled_memory(compiled) -> dict[str, float]:
    """The compiled step's memory per device in GiB (empty where the backend reports none)."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        return {}
    if mem is None:
        return {}
    gib = 1 / 2**30
    out = {
        "argument_gib": mem.argument_size_in_bytes * gib,
        "output_gib": mem.output_size_in_bytes * gib,
        "temp_gib": mem.temp_size_in_bytes * gib,
        "alias_gib": mem.alias_size_in_bytes * gib,
    }
    # donated state: outputs alias arguments, so the peak is arguments + temporaries + non-aliased outputs
    out["peak_gib"] = out["argument_gib"] + out["temp_gib"] + out["output_gib"] - out["alias_gib"]
    return out
