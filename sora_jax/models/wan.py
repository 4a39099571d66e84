"""The Wan 2.1 transformer's public face: its config and module (``sora_jax.models.wan_transformer``) and
``from_diffusers`` (the reading, ``sora_jax.models.wan_convert``)::

    from sora_jax.models import wan
    m = wan.from_diffusers(DIR / "transformer")   # m(latents [B,T,H,W,C], timestep [B] 0..1000, text [B,L,D])
"""

from __future__ import annotations

from sora_jax.models import wan_convert
from sora_jax.models.wan_transformer import (
    WAN_VARIANTS,
    WanConfig,
    WanTransformer,
    apply_rope_pairs,
    param_count,
    wan_config,
)

__all__ = [
    "WAN_VARIANTS",
    "WanConfig",
    "WanTransformer",
    "apply_rope_pairs",
    "from_diffusers",
    "param_count",
    "wan_config",
]


def from_diffusers(path, **kw) -> WanTransformer:
    """A diffusers Wan transformer folder (or a pipeline folder holding one) as a ``WanTransformer``; the
    keyword arguments (``dtype``, ``param_dtype``, config overrides) are ``wan_convert.from_diffusers``'s."""
    return wan_convert.from_diffusers(path, **kw)
