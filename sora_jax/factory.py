"""From the global config to the parts: text input, text-to-video model, autoencoder, diffusion process.

The one place that reads ``config.model`` / ``config.text`` / ``config.diffusion`` and turns them into the
models' own config dataclasses, so models never see the global config.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sora_jax import diffusion
from sora_jax.choices import AutoencoderKind, ModelArch, Task, TextEncoderKind
from sora_jax.config import (
    REPA_CLASS_CHANNELS,
    REPA_MOTION_CHANNELS,
    WAN_MODEL_KEYS,
    ConfigError,
    model_arch,
    task,
)
from sora_jax.models import lora as lora_lib
from sora_jax.models import quant
from sora_jax.models import vae as vae_lib
from sora_jax.models.autoencoder import Autoencoder, IdentityAutoencoder, LumaAutoencoder
from sora_jax.models.discriminator import PatchDiscriminator3D
from sora_jax.models.dit import DiTConfig, dit_config
from sora_jax.models.lora import LoraSpec, add_adapters
from sora_jax.models.t2v import TextToVideo
from sora_jax.models.vae import VAEConfig, VideoVAE
from sora_jax.models.wan_t2v import WanTextToVideo, WanVAECodec
from sora_jax.models.wan_transformer import WanConfig
from sora_jax.models.wan_vae import WanVAEConfig
from sora_jax.parallel import sharding
from sora_jax.text.encoder import TextEncoderConfig
from sora_jax.text.tokenizer import HashWordTokenizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_autoencoder(cfg: ml_collections.ConfigDict) -> Autoencoder:
    """The config's autoencoder. A trained VAE comes without weights (shapes only) and only from a resolved
    config (``sora_jax.loading.resolve_autoencoder``); ``sora_jax.loading.load_autoencoder`` adds them."""
    kind = AutoencoderKind(cfg.autoencoder.kind)
    if kind is AutoencoderKind.IDENTITY:
        return IdentityAutoencoder()
    if kind is AutoencoderKind.LUMA:
        return LumaAutoencoder()
    a = cfg.autoencoder
    if kind is AutoencoderKind.WAN_VAE:
        return _wan_vae_codec(wan_vae_config(cfg))
    if not a.get("vae"):
        raise ValueError(
            f"config.autoencoder: the VAE of {a.get('path')!r} is not resolved into the config; "
            "load it with sora_jax.loading.resolve_autoencoder(cfg)"
        )
    return vae_codec(vae_lib.VAEConfig(**a.vae.to_dict()), a.shift, a.scale, a.vae_step)


def vae_codec(vcfg: VAEConfig, shift: float, scale: float, step: int = 0) -> vae_lib.VAECodec:
    """A VAE as an ``Autoencoder`` over normalised latents, without weights (``VAECodec.with_params``)."""
    return vae_lib.VAECodec(_vae_graphdef(vcfg), None, vcfg, shift, scale, step)


@functools.lru_cache(maxsize=8)
def _vae_graphdef(vcfg: VAEConfig) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: VideoVAE(vcfg, rngs=nnx.Rngs(0))), nnx.Param)[0]


def wan_vae_config(cfg: ml_collections.ConfigDict) -> WanVAEConfig:
    """The Wan VAE of ``config.autoencoder.wan_vae`` (``WanVAEConfig`` fields; written by import-diffusers)."""
    return WanVAEConfig(**cfg.autoencoder.wan_vae.to_dict())


@functools.lru_cache(maxsize=4)
def _wan_vae_codec(vcfg: WanVAEConfig) -> WanVAECodec:
    return WanVAECodec.from_config(vcfg)


def make_text_input(cfg: ml_collections.ConfigDict):
    """What turns prompts into the model's text input, ``encode(texts) -> (x, mask bool [B, L])``: the
    HashWordTokenizer for the trainable encoder (x: int32 ids ``[B, L]``), a whole frozen encoder for
    ``text.encoder`` = minilm | t5 (the FrozenTextEmbedder, cached; x: float32 features ``[B, L, D]``)."""
    if TextEncoderKind(cfg.text.encoder) is TextEncoderKind.TRAINABLE:
        return HashWordTokenizer(vocab_size=cfg.text.vocab_size, max_length=cfg.text.max_length)
    t = cfg.text
    extra = {
        k: t[k] for k in ("tokenizer_path", "dtype", "clauses", "sentences") if t.get(k)
    }  # Wan: UMT5's folders
    return frozen_embedder(t.encoder, t.get("path", ""), t.max_length, **extra)


def text_length(cfg: ml_collections.ConfigDict) -> int:
    """Rows of the model's text input: ``text.max_length``, plus ``text.sentences`` for a frozen encoder."""
    if TextEncoderKind(cfg.text.encoder) is TextEncoderKind.TRAINABLE:
        return int(cfg.text.max_length)
    return int(cfg.text.max_length) + int(cfg.text.get("sentences", 0))


@functools.lru_cache(maxsize=2)
def frozen_embedder(
    kind: str,
    path: str,
    max_length: int,
    tokenizer_path: str = "",
    dtype: str = "float32",
    clauses: bool = False,
    sentences: int = 0,
):
    from sora_jax.text.frozen import FrozenTextEmbedder

    return FrozenTextEmbedder(
        kind,
        path,
        max_length=max_length,
        tokenizer_path=tokenizer_path,
        dtype=dtype,
        clauses=bool(clauses),
        sentences=int(sentences),
    )


def frozen_dim(cfg: ml_collections.ConfigDict) -> int:
    """Feature width of the frozen text encoder (0 for the trainable one), from its config.json alone (a Wan
    config's ``model.wan.text_dim``, no file read): no weights are loaded, so this is safe inside traced code
    (``jax.eval_shape`` of the model)."""
    import json
    from pathlib import Path

    kind, path = cfg.text.encoder, cfg.text.get("path", "")
    if TextEncoderKind(kind) is TextEncoderKind.TRAINABLE:
        return 0
    if task(cfg) is Task.T2V and model_arch(cfg) is ModelArch.WAN:  # UMT5's d_model, recorded in the config
        return int(cfg.model.wan.text_dim)
    if kind == "minilm":
        from sora_jax.text.minilm import default_model_dir

        folder = Path(path) if path else default_model_dir()
        key = "hidden_size"
    else:
        if not path:
            raise ConfigError(
                "config.text.encoder = 't5' needs config.text.path (a Hugging Face T5/UMT5 folder)"
            )
        folder, key = Path(path), "d_model"
    try:
        return int(json.loads((folder / "config.json").read_text())[key])
    except (OSError, KeyError, ValueError) as e:
        raise FileNotFoundError(
            f"text encoder {kind!r}: cannot read {key} from {folder}/config.json ({e})"
        ) from e


def text_config(cfg: ml_collections.ConfigDict) -> TextEncoderConfig:
    t = cfg.text
    return TextEncoderConfig(
        vocab_size=t.vocab_size,
        max_length=t.max_length,
        width=t.width,
        depth=t.depth,
        num_heads=t.num_heads,
        dtype=_DTYPES[cfg.model.dtype],
    )


def latent_channels(cfg: ml_collections.ConfigDict) -> int:
    """Channels of the latents the DiT sees, from the config alone (a VAE's once resolved into it)."""
    return make_autoencoder(cfg).latent_channels


def model_config(cfg: ml_collections.ConfigDict) -> DiTConfig:
    # width / depth / num_heads: 0 (or absent) keeps the variant's value
    sizes = {k: int(v) for k in ("width", "depth", "num_heads") if (v := cfg.model.get(k, 0))}
    return dit_config(
        cfg.model.variant,
        **sizes,
        in_channels=latent_channels(cfg),
        patch_size=tuple(cfg.model.patch_size),
        text_dim=cfg.text.width,
        dtype=_DTYPES[cfg.model.dtype],
        remat=_remat(cfg.model.remat),
        scan_layers=bool(cfg.model.get("scan_layers", True)),
        seq_parallel=cfg.model.get("seq_parallel", "none"),
        attention_impl=cfg.model.get("attention_impl", "xla"),
        pooled_text_cond=bool(cfg.model.get("pooled_text_cond", True)),
        pos_embed=cfg.model.get("pos_embed", "none"),
        text_attention=cfg.model.get("text_attention", "cross"),
        out_conv=int(cfg.model.get("out_conv", 0)),
        **_repa_fields(cfg.get("repa") or {}),
    )


def _repa_fields(repa) -> dict[str, int]:
    """``config.repa`` (``sora_jax/train/repa.py``) as DiTConfig fields: the projector exists when layer > 0."""
    layer = int(repa.get("layer", 0))
    if not layer:
        return {"repa_layer": 0, "repa_dim": 0}
    classes = REPA_CLASS_CHANNELS if float(repa.get("classes", 0.0)) > 0 else 0
    motion = REPA_MOTION_CHANNELS if float(repa.get("motion", 0.0)) > 0 else 0
    return {"repa_layer": layer, "repa_dim": int(repa.get("dim", 0)) + classes + motion}


def _remat(value) -> str:
    """``model.remat``: a policy name (``dit.REMAT_POLICIES``); True/False mean "full"/"none"."""
    if isinstance(value, bool):
        return "full" if value else "none"
    return str(value)


def wan_model_config(cfg: ml_collections.ConfigDict) -> WanConfig:
    """The ``WanConfig`` of a Wan config (``config.model.arch = wan``): sizes from ``config.model.wan``,
    patch from ``model.patch_size``, compute / storage dtypes, remat, sequence parallelism, attention."""
    m = cfg.model
    sizes = {k: m.wan[k] for k in WAN_MODEL_KEYS}
    return WanConfig(
        **sizes,
        patch_size=tuple(m.patch_size),
        dtype=m.dtype,
        param_dtype=m.get("param_dtype", m.dtype),
        remat=_remat(m.remat),
        seq_parallel=m.get("seq_parallel", "none"),
        attention_impl=m.get("attention_impl", "xla"),
        ffn_chunk=int(m.get("ffn_chunk", 0)),
    )


def lora_spec(cfg: ml_collections.ConfigDict) -> LoraSpec | None:
    """The ``LoraSpec`` of ``config.lora`` when it is enabled (a text-to-video config), else None."""
    lo = cfg.get("lora")
    if lo is None or not lo.enabled or task(cfg) is not Task.T2V:
        return None
    return LoraSpec(int(lo.rank), float(lo.alpha), tuple(lo.targets), dora=bool(lo.get("dora", False)))


def make_model(cfg: ml_collections.ConfigDict, seed: int = 0) -> TextToVideo | WanTextToVideo:
    """The config's text-to-video model: the DiT with its text branch, or Wan 2.1 (``model.arch = wan``);
    with ``config.lora.enabled``, LoRA adapters (``nnx.LoRAParam``) beside the targeted kernels (and with an int8 /
    fp8 ``lora.base_dtype``, ``quant.add_scales``: a ``<kernel>_qscale`` beside every block kernel)."""
    if model_arch(cfg) is ModelArch.WAN:
        model = WanTextToVideo(wan_model_config(cfg), rngs=nnx.Rngs(seed))
    else:
        model = TextToVideo(
            model_config(cfg), text_config(cfg), rngs=nnx.Rngs(seed), frozen_dim=frozen_dim(cfg)
        )
    spec = lora_spec(cfg)
    if spec is not None:
        try:
            add_adapters(model, spec, seed=seed + 1)
        except ValueError as e:
            raise ConfigError(f"config.lora.targets: {e}") from None
        if cfg.lora.get("base_dtype", "") in quant.QUANTIZED:  # int8 / fp8 base: a scale beside each kernel
            quant.add_scales(lora_lib.adaptable(model))
    return model


def vae_config(cfg: ml_collections.ConfigDict) -> VAEConfig:
    """The VAE of ``config.vae`` (variant + overrides of latent_channels / base_width when non-zero)."""
    v = cfg.vae
    sizes = {k: int(v[k]) for k in ("latent_channels", "base_width") if v.get(k, 0)}
    return vae_lib.vae_config(v.variant, dtype=cfg.model.dtype, **sizes)


def make_vae(cfg: ml_collections.ConfigDict, seed: int = 0) -> VideoVAE:
    return VideoVAE(vae_config(cfg), rngs=nnx.Rngs(seed))


def make_discriminator(cfg: ml_collections.ConfigDict, seed: int = 0) -> PatchDiscriminator3D:
    v = cfg.vae
    return PatchDiscriminator3D(3, v.get("disc_width", 64), v.get("disc_layers", 3), rngs=nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class AbstractState:
    """A config's model without memory: its graph and its parameters as ``ShapeDtypeStruct``s carrying the
    ``NamedSharding`` the rules table gives them on a mesh. The trainer, the loaders and the samplers all
    start from it (the trainer adds its optimizer state on top)."""

    graphdef: nnx.GraphDef
    params: nnx.State

    @property
    def shardings(self) -> nnx.State:
        return jax.tree.map(lambda a: a.sharding, self.params)


def make_module(cfg: ml_collections.ConfigDict, seed: int = 0) -> nnx.Module:
    """What the config trains: the text-to-video model, or the VAE (``task = vae``)."""
    return make_vae(cfg, seed) if task(cfg) is Task.VAE else make_model(cfg, seed)


def abstract_state(cfg: ml_collections.ConfigDict, mesh) -> AbstractState:
    """The config's model (``make_module``) as shapes and shardings on ``mesh``: nothing is allocated."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: make_module(cfg, cfg.seed)), nnx.Param)
    shardings = sharding.state_shardings(params, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)
    return AbstractState(graphdef, params)


def make_process(cfg: ml_collections.ConfigDict):
    return diffusion.process_from_config(cfg.diffusion)


def tokens_per_clip(cfg: ml_collections.ConfigDict, frames: int, height: int, width: int) -> int:
    """Spacetime patches (DiT tokens) of one clip of (frames, height, width) pixels under ``cfg``; for the
    VAE task, pixels. ConfigError when the sizes do not divide (a bucket or clip size the config asks for)."""
    if task(cfg) is Task.VAE:
        return frames * height * width
    t, h, w, _ = make_autoencoder(cfg).latent_shape(frames, height, width)
    pt, ph, pw = cfg.model.patch_size
    if t % pt or h % ph or w % pw:
        raise ConfigError(
            f"a {frames}x{height}x{width} clip gives latents {t}x{h}x{w}, which patch size "
            f"{tuple(cfg.model.patch_size)} does not divide (config.data.buckets / config.model.patch_size)"
        )
    return (t // pt) * (h // ph) * (w // pw)


def latent_shape(cfg: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
    """(T', H', W', C) of the latent video the DiT works on."""
    return tuple(make_autoencoder(cfg).latent_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width))


def mask_probs(cfg: ml_collections.ConfigDict) -> dict[str, float] | None:
    """The frame-conditioning strategy probabilities (``config.conditioning.probs``), None when absent."""
    c = cfg.get("conditioning")
    return None if c is None else {k: float(v) for k, v in c.probs.items()}
