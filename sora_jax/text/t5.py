"""Pretrained T5 v1.1 / mT5 / UMT5 text encoders in Flax NNX, loaded from Hugging Face folders.

Owns:
- ``T5Config`` (``T5Config.from_hf(config.json dict)``) and ``VARIANTS`` (T5 v1.1 XXL, UMT5-XXL, for
  ``jax.eval_shape`` tests and sharding plans).
- ``T5Encoder``: ids int32 ``[B, L]`` + mask ``[B, L]`` -> hidden states ``[B, L, d_model]``, the encoder
  stack of ``transformers.T5EncoderModel`` / ``UMT5EncoderModel``: bucketed bidirectional relative position
  bias (T5/mT5: one table in layer 0 shared by all layers; UMT5: a table in every layer), unscaled attention
  logits, pre-norm T5 RMS LayerNorm (no mean, no bias, float32 inside), gated-GELU (``gelu_new``) or plain
  ReLU feed-forward, final norm. No dropout (inference). Padding positions hold what HF computes there
  (queries at padding still attend to the real tokens): callers mask them.
- ``load_t5_encoder(folder)``: ``config.json`` plus ``model.safetensors`` / sharded safetensors with
  ``model.safetensors.index.json`` / ``pytorch_model.bin`` (and its sharded index; torch imported only then).
- ``T5Tokenizer``: the ids ``AutoTokenizer.from_pretrained(folder)(texts, padding="max_length",
  truncation=True, max_length=L)`` gives, from ``spiece.model`` (sentencepiece) or, failing that,
  ``tokenizer.json`` (the ``tokenizers`` library).

Precision: ``dtype`` is the compute dtype (float32 or bfloat16); ``param_dtype`` the storage dtype, by default
the same as ``dtype`` (a frozen encoder: XXL in bfloat16 is half the memory). Norms, softmax and the position
bias run in float32. Parameters carry logical axis names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``,
``norm``, ``layers``) so ``sora_jax.parallel.sharding`` can place an XXL encoder over a mesh.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models.layers import Dtype, RMSNorm, as_dtype
from sora_jax.parallel.sharding import constrain

# ---------------------------------------------------------------------------------------------------- config


class FFActivation(enum.Enum):
    RELU = "relu"
    GELU = "gelu"  # exact (erf) GELU, HF "gelu"
    GELU_NEW = "gelu_new"  # tanh approximation: HF "gelu_new", what "gated-gelu" means
    SILU = "silu"


_ACT_ALIASES = {"gelu_pytorch_tanh": "gelu_new", "swish": "silu"}


def parse_feed_forward_proj(value: str) -> tuple[FFActivation, bool]:
    """HF ``feed_forward_proj`` ("relu", "gated-gelu", "gated-silu", ...) -> (activation, gated)."""
    parts = str(value).split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(
            f"feed_forward_proj={value!r}: want '<act>' or 'gated-<act>', e.g. 'relu', 'gated-gelu'"
        )
    gated = len(parts) == 2
    name = "gelu_new" if value == "gated-gelu" else _ACT_ALIASES.get(parts[-1], parts[-1])
    try:
        return FFActivation(name), gated
    except ValueError:
        known = [a.value for a in FFActivation] + list(_ACT_ALIASES)
        raise ValueError(
            f"feed_forward_proj={value!r}: activation {name!r} not supported; known: {known}"
        ) from None


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    activation: FFActivation = FFActivation.GELU_NEW
    gated: bool = True  # wi_0 (activated) * wi_1; False: original T5's single wi
    bias_per_layer: bool = False  # UMT5: a relative-position table in every layer
    dtype: str | jnp.dtype = "float32"
    param_dtype: str | jnp.dtype = "float32"

    def __post_init__(self):
        sizes = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
        for key in sizes + ("relative_attention_num_buckets", "relative_attention_max_distance"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"T5Config.{key} must be positive, got {getattr(self, key)}")
        if self.relative_attention_num_buckets < 4:
            raise ValueError("T5Config.relative_attention_num_buckets must be >= 4 (bidirectional buckets)")
        if not isinstance(self.activation, FFActivation):
            raise ValueError(f"T5Config.activation must be a FFActivation, got {self.activation!r}")
        for key in ("dtype", "param_dtype"):
            if as_dtype(getattr(self, key)) not in (jnp.float32, jnp.bfloat16):
                raise ValueError(f"T5Config.{key} must be float32 or bfloat16, got {getattr(self, key)!r}")

    @classmethod
    def from_hf(
        cls, hf: dict[str, Any], *, dtype: Dtype = "float32", param_dtype: Dtype | None = None
    ) -> T5Config:
        """A Hugging Face ``config.json`` dict (model_type t5, mt5 or umt5) -> ``T5Config``."""
        model_type = hf.get("model_type")
        if model_type not in ("t5", "mt5", "umt5"):
            raise ValueError(
                f"config.json model_type={model_type!r} is not a T5 encoder (want t5, mt5 or umt5)"
            )
        missing = [
            k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if k not in hf
        ]
        if missing:
            raise ValueError(f"config.json of a {model_type} model lacks {missing}")
        default_ff = "relu" if model_type == "t5" else "gated-gelu"
        activation, gated = parse_feed_forward_proj(hf.get("feed_forward_proj", default_ff))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["d_model"]),
            d_kv=int(hf["d_kv"]),
            d_ff=int(hf["d_ff"]),
            num_layers=int(hf["num_layers"]),
            num_heads=int(hf["num_heads"]),
            relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
            activation=activation,
            gated=gated,
            bias_per_layer=model_type == "umt5",
            dtype=as_dtype(dtype).name,
            param_dtype=as_dtype(param_dtype if param_dtype is not None else dtype).name,
        )


# Full-size encoders (the encoder half of the named checkpoints), for eval_shape tests and sharding plans.
VARIANTS: dict[str, T5Config] = {
    "t5-v1_1-xxl": T5Config(32128, 4096, 64, 10240, 24, 64),
    "umt5-xxl": T5Config(256384, 4096, 64, 10240, 24, 64, bias_per_layer=True),
}


# ----------------------------------------------------------------------------------------------------- model


def relative_position_buckets(
    query_len: int, key_len: int, num_buckets: int = 32, max_distance: int = 128
) -> np.ndarray:
    """Bidirectional T5 buckets, int32 ``[query_len, key_len]`` for ``key - query`` (HF's arithmetic, float32).

    Half the buckets per direction; of those, half exact offsets, half log-spaced up to ``max_distance``.
    """
    rel = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        logv = np.log(rel.astype(np.float32) / np.float32(max_exact))
    scaled = logv / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(rel < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (out + np.where(rel < max_exact, rel, large)).astype(np.int32)


def position_bias(table: jax.Array, buckets: np.ndarray) -> jax.Array:
    """Table ``[num_buckets, K]`` and buckets ``[N, M]`` -> float32 bias ``[K, N, M]``."""
    return jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))


def _param(
    rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], std: float, dtype
) -> nnx.Param:
    init = nnx.with_partitioning(nnx.initializers.normal(std), names)
    return nnx.Param(init(rngs.params(), shape, as_dtype(dtype)))


_ACTIVATIONS = {
    FFActivation.RELU: jax.nn.relu,
    FFActivation.GELU: lambda x: jax.nn.gelu(x, approximate=False),
    FFActivation.GELU_NEW: lambda x: jax.nn.gelu(x, approximate=True),
    FFActivation.SILU: jax.nn.silu,
}


class T5Layer(nnx.Module):
    """x += SelfAttention(norm(x)) (unscaled, + relative bias, key-masked); x += FF(norm(x))."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        D, K, H, F, pd = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.param_dtype
        self.attn_norm = RMSNorm(D, eps=cfg.layer_norm_epsilon, param_dtype=pd, rngs=rngs)
        self.wq = _param(rngs, (D, K, H), ("embed", "heads", "kv"), (D * H) ** -0.5, pd)
        self.wk = _param(rngs, (D, K, H), ("embed", "heads", "kv"), D**-0.5, pd)
        self.wv = _param(rngs, (D, K, H), ("embed", "heads", "kv"), D**-0.5, pd)
        self.wo = _param(rngs, (K, H, D), ("heads", "kv", "embed"), (K * H) ** -0.5, pd)
        nb = cfg.relative_attention_num_buckets
        self.rel_bias = _param(rngs, (nb, K), (None, "heads"), D**-0.5, pd) if cfg.bias_per_layer else None
        self.ff_norm = RMSNorm(D, eps=cfg.layer_norm_epsilon, param_dtype=pd, rngs=rngs)
        self.wi_0 = _param(rngs, (D, F), ("embed", "mlp"), D**-0.5, pd)
        self.wi_1 = _param(rngs, (D, F), ("embed", "mlp"), D**-0.5, pd) if cfg.gated else None
        self.wo_ff = _param(rngs, (F, D), ("mlp", "embed"), F**-0.5, pd)
        self.activation = cfg.activation
        self.dtype = as_dtype(cfg.dtype)

    def attention(self, x: jax.Array, mask: jax.Array, bias: jax.Array) -> jax.Array:
        """x ``[B, N, D]``, key mask bool ``[B, N]``, bias float32 ``[K, N, N]`` -> ``[B, N, D]``."""
        dt = self.dtype
        q = jnp.einsum("BND,DKH->BNKH", x, self.wq[...].astype(dt))
        k = jnp.einsum("BMD,DKH->BMKH", x, self.wk[...].astype(dt))
        v = jnp.einsum("BMD,DKH->BMKH", x, self.wv[...].astype(dt))
        q = constrain(q, ("act_batch", "act_text", "act_heads", "act_kv"))
        logits = jnp.einsum("BNKH,BMKH->BKNM", q, k, preferred_element_type=jnp.float32) + bias[None]
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        out = jnp.einsum("BKNM,BMKH->BNKH", probs, v)
        out = constrain(out, ("act_batch", "act_text", "act_heads", "act_kv"))
        return jnp.einsum("BNKH,KHD->BND", out, self.wo[...].astype(dt))

    def feed_forward(self, x: jax.Array) -> jax.Array:
        """x ``[B, N, D]`` -> ``[B, N, D]``: wo(act(wi_0 x) * wi_1 x), or wo(act(wi_0 x)) when not gated."""
        dt = self.dtype
        h = _ACTIVATIONS[self.activation](x @ self.wi_0[...].astype(dt))
        if self.wi_1 is not None:
            h = h * (x @ self.wi_1[...].astype(dt))
        h = constrain(h, ("act_batch", "act_text", "act_mlp"))
        return h @ self.wo_ff[...].astype(dt)

    def __call__(
        self, x: jax.Array, mask: jax.Array, shared_bias: jax.Array | None, buckets: np.ndarray
    ) -> jax.Array:
        """x ``[B, N, D]``, mask bool ``[B, N]``, shared bias ``[K, N, N]`` (None: this layer's) -> ``[B, N, D]``."""
        bias = position_bias(self.rel_bias[...], buckets) if self.rel_bias is not None else shared_bias
        x = x + self.attention(self.attn_norm(x), mask, bias)
        x = x + self.feed_forward(self.ff_norm(x))
        return constrain(x, ("act_batch", "act_text", "act_embed"))


class T5Encoder(nnx.Module):
    """ids int32 ``[B, L]`` + mask ``[B, L]`` (bool or int; True/1 = token) -> hidden ``[B, L, d_model]``."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.output_dim = cfg.d_model
        D, pd = cfg.d_model, cfg.param_dtype
        self.embedding = _param(rngs, (cfg.vocab_size, D), ("vocab", "embed"), 1.0, pd)
        nb = cfg.relative_attention_num_buckets
        self.rel_bias = (
            None if cfg.bias_per_layer else _param(rngs, (nb, cfg.num_heads), (None, "heads"), 0.1, pd)
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r: nnx.Rngs) -> T5Layer:
            return T5Layer(cfg, rngs=r)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(D, eps=cfg.layer_norm_epsilon, param_dtype=pd, rngs=rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.cfg
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"T5Encoder wants ids and mask [B, L]; got {ids.shape}, {mask.shape}")
        mask = jnp.asarray(mask).astype(jnp.bool_)
        x = jnp.take(self.embedding[...], ids, axis=0).astype(as_dtype(cfg.dtype))  # [B, L, D]
        x = constrain(x, ("act_batch", "act_text", "act_embed"))
        L = ids.shape[1]
        buckets = relative_position_buckets(
            L, L, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        shared = None if self.rel_bias is None else position_bias(self.rel_bias[...], buckets)  # [K, L, L]
        graphdef, state = nnx.split(self.layers)

        def body(h: jax.Array, layer_state) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, layer_state)(h, mask, shared, buckets), None

        x, _ = jax.lax.scan(body, x, state)
        return self.final_norm(x)


# ------------------------------------------------------------------------------------------------ checkpoints


def _hf_names(cfg: T5Config) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Our parameter (``layers.wq`` etc.) -> (HF name with ``{i}`` for the layer, HF shape)."""
    D, KH, F = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    blk = "encoder.block.{i}.layer"
    names = {
        "layers.attn_norm.scale": (f"{blk}.0.layer_norm.weight", (D,)),
        "layers.wq": (f"{blk}.0.SelfAttention.q.weight", (KH, D)),
        "layers.wk": (f"{blk}.0.SelfAttention.k.weight", (KH, D)),
        "layers.wv": (f"{blk}.0.SelfAttention.v.weight", (KH, D)),
        "layers.wo": (f"{blk}.0.SelfAttention.o.weight", (D, KH)),
        "layers.ff_norm.scale": (f"{blk}.1.layer_norm.weight", (D,)),
        "layers.wo_ff": (f"{blk}.1.DenseReluDense.wo.weight", (D, F)),
        "final_norm.scale": ("encoder.final_layer_norm.weight", (D,)),
        "embedding": ("shared.weight", (cfg.vocab_size, D)),
    }
    bias = (
        "SelfAttention.relative_attention_bias.weight",
        (cfg.relative_attention_num_buckets, cfg.num_heads),
    )
    if cfg.bias_per_layer:
        names["layers.rel_bias"] = (f"{blk}.0.{bias[0]}", bias[1])
    else:
        names["rel_bias"] = (f"encoder.block.0.layer.0.{bias[0]}", bias[1])
    if cfg.gated:
        names["layers.wi_0"] = (f"{blk}.1.DenseReluDense.wi_0.weight", (F, D))
        names["layers.wi_1"] = (f"{blk}.1.DenseReluDense.wi_1.weight", (F, D))
    else:
        names["layers.wi_0"] = (f"{blk}.1.DenseReluDense.wi.weight", (F, D))
    return names


def _to_ours(ours: str, w: np.ndarray, cfg: T5Config) -> np.ndarray:
    """An HF tensor -> our layout: Linear weights [out, in] transposed, attention split into heads."""
    K, H = cfg.num_heads, cfg.d_kv
    if ours in ("layers.wq", "layers.wk", "layers.wv"):
        return w.T.reshape(cfg.d_model, K, H)
    if ours == "layers.wo":
        return w.T.reshape(K, H, cfg.d_model)
    if ours in ("layers.wi_0", "layers.wi_1", "layers.wo_ff"):
        return w.T
    return w


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _read_safetensors_raw(file: Path, name: str) -> np.ndarray:
    """One tensor read from the safetensors layout itself (numpy has no bfloat16, so safe_open can't)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))[name]
        start, end = meta["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    if meta["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{file.name}: tensor {name!r} has dtype {meta['dtype']}; want a float type")
    return np.frombuffer(buf, jnp.dtype(_SAFETENSORS_DTYPES[meta["dtype"]])).reshape(meta["shape"])


class _Checkpoint:
    """Tensor name -> numpy array over one folder's weight files, read one tensor (or .bin shard) at a time."""

    def __init__(self, folder: Path):
        for index_name, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            if (folder / single).is_file():
                self.files = {None: folder / single}
                break
            if (folder / index_name).is_file():
                weight_map = json.loads((folder / index_name).read_text())["weight_map"]
                self.files = {k: folder / v for k, v in weight_map.items()}
                break
        else:
            raise FileNotFoundError(
                f"no weights in {folder}: want model.safetensors, model.safetensors.index.json, "
                "pytorch_model.bin or pytorch_model.bin.index.json"
            )
        for f in set(self.files.values()):
            if not f.is_file():
                raise FileNotFoundError(f"weight file {f} (named in the index) does not exist")
        self.torch = next(iter(self.files.values())).suffix == ".bin"
        self._bin: tuple[Path, dict] | None = None
        if None in self.files:
            self.files = {k: self.files[None] for k in self._keys(self.files[None])}

    def _keys(self, file: Path) -> list[str]:
        if self.torch:
            return list(self._load_bin(file))
        from safetensors import safe_open

        with safe_open(str(file), framework="np") as f:
            return list(f.keys())

    def _load_bin(self, file: Path) -> dict:
        if self._bin is None or self._bin[0] != file:
            import torch

            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the pre-zip torch format cannot be memory-mapped
                sd = torch.load(file, map_location="cpu", weights_only=True)
            self._bin = (file, sd)
        return self._bin[1]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        if name not in self.files:
            raise ValueError(f"T5 checkpoint has no tensor {name!r}")
        file = self.files[name]
        if self.torch:
            import torch

            t = self._load_bin(file)[name].detach()
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(jnp.bfloat16)
            return t.numpy()
        from safetensors import safe_open

        with safe_open(str(file), framework="np") as f:
            if f.get_slice(name).get_dtype() == "BF16":
                return _read_safetensors_raw(file, name)
            return f.get_tensor(name)


def _checked(ckpt: _Checkpoint, name: str, shape: tuple[int, ...]) -> np.ndarray:
    w = ckpt.get(name)
    if tuple(w.shape) != tuple(shape):
        raise ValueError(
            f"T5 checkpoint tensor {name} has shape {tuple(w.shape)}; config.json implies {shape}"
        )
    return w


def _path_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def load_t5_encoder(
    path: str | Path,
    dtype: Dtype = "float32",
    *,
    param_dtype: Dtype | None = None,
    mesh: jax.sharding.Mesh | None = None,
    tokenizer_path: str | Path | None = None,
    max_length: int | None = None,
) -> tuple[T5Encoder, T5Tokenizer]:
    """A Hugging Face T5/mT5/UMT5 folder -> (``T5Encoder``, ``T5Tokenizer``).

    ``dtype``: compute dtype; ``param_dtype``: storage (default: ``dtype``). ``mesh``: each parameter is
    placed straight onto it by its logical names (``sharding.RULES``), never whole on one device.
    ``tokenizer_path``: where ``spiece.model``/``tokenizer.json`` live (default: ``path``).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"T5 folder {folder} does not exist (want a Hugging Face folder with config.json)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json (want a Hugging Face T5 folder)")
    cfg = T5Config.from_hf(
        json.loads((folder / "config.json").read_text()), dtype=dtype, param_dtype=param_dtype
    )
    tokenizer = T5Tokenizer(tokenizer_path or folder, max_length=max_length)
    ckpt = _Checkpoint(folder)
    names = _hf_names(cfg)
    if "shared.weight" not in ckpt and "encoder.embed_tokens.weight" in ckpt:
        names["embedding"] = ("encoder.embed_tokens.weight", names["embedding"][1])

    abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, abs_state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        from sora_jax.parallel.sharding import state_shardings

        shardings = dict(nnx.to_flat_state(state_shardings(abs_state, mesh)))
    pd = as_dtype(cfg.param_dtype)
    flat = []
    for key, var in nnx.to_flat_state(abs_state):
        ours = _path_key(key)
        if ours not in names:
            raise RuntimeError(f"load_t5_encoder: no checkpoint mapping for parameter {ours}")
        hf, shape = names[ours]
        if ours.startswith("layers."):
            rows = [_to_ours(ours, _checked(ckpt, hf.format(i=i), shape), cfg) for i in range(cfg.num_layers)]
            value = np.stack([r.astype(pd) for r in rows])
        else:
            value = _to_ours(ours, _checked(ckpt, hf, shape), cfg).astype(pd)
        if value.shape != var.get_value().shape:  # a bug here, not in the checkpoint
            raise RuntimeError(
                f"load_t5_encoder: {ours} is {value.shape}, the model wants {var.get_value().shape}"
            )
        placed = jax.device_put(value, shardings[key].get_value()) if shardings else jnp.asarray(value)
        flat.append((key, var.replace(placed)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), tokenizer


# -------------------------------------------------------------------------------------------------- tokenizer


class Encoded(NamedTuple):
    ids: np.ndarray  # int32 [B, L]
    mask: np.ndarray  # bool [B, L]
    num_truncated: int  # texts longer than L tokens (EOS included), cut to L


def _token_str(tok: Any, default: str) -> str:
    """tokenizer_config values are strings or AddedToken dicts ({"content": ...})."""
    if tok is None:
        return default
    return str(tok["content"]) if isinstance(tok, dict) else str(tok)


class T5Tokenizer:
    """HF-identical T5 tokenization: pieces, then EOS ``</s>``, truncation to L-1 pieces + EOS, pad id 0."""

    def __init__(self, folder: str | Path, *, max_length: int | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        conf_file = folder / "tokenizer_config.json"
        conf = json.loads(conf_file.read_text()) if conf_file.is_file() else {}
        self.eos_token = _token_str(conf.get("eos_token"), "</s>")
        self.pad_token = _token_str(conf.get("pad_token"), "<pad>")
        unk_token = _token_str(conf.get("unk_token"), "<unk>")
        hf_max = int(conf.get("model_max_length", 512) or 512)
        self.max_length = int(max_length or (hf_max if hf_max < 1_000_000 else 512))
        if (folder / "spiece.model").is_file():
            self._init_sentencepiece(folder / "spiece.model", conf, unk_token)
        elif (folder / "tokenizer.json").is_file():
            self._init_tokenizers(folder / "tokenizer.json")
        else:
            raise FileNotFoundError(f"{folder} has neither spiece.model nor tokenizer.json (a T5 tokenizer)")

    def _init_sentencepiece(self, model_file: Path, conf: dict, unk_token: str) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self._tok = None
        size = self._sp.get_piece_size()
        extra_ids = int(conf.get("extra_ids", 100))
        extra = [f"<extra_id_{i}>" for i in range(extra_ids)]
        more = conf.get("additional_special_tokens") or conf.get("extra_special_tokens") or []
        more = list(more.values()) if isinstance(more, dict) else list(more)
        specials = [self.pad_token, self.eos_token, unk_token, *extra, *(_token_str(t, "") for t in more)]
        # HF's ids: pieces of the model keep theirs; <extra_id_i> -> size + extra_ids - 1 - i; others follow
        self._special: dict[str, int] = {}
        nxt = size + extra_ids
        for tok in dict.fromkeys(t for t in specials if t):
            pid = self._sp.piece_to_id(tok)
            if pid != self._sp.unk_id() or tok == self._sp.id_to_piece(self._sp.unk_id()):
                self._special[tok] = pid
            elif (m := re.fullmatch(r"<extra_id_(\d+)>", tok)) and int(m.group(1)) < extra_ids:
                self._special[tok] = size + extra_ids - 1 - int(m.group(1))
            else:
                self._special[tok], nxt = nxt, nxt + 1
        self.vocab_size = nxt
        # HF matches added tokens on the raw text (longest first); each chunk between them is encoded alone
        alternatives = sorted(self._special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        self.eos_id = self._special[self.eos_token]
        self.pad_id = self._special[self.pad_token]

    def _init_tokenizers(self, json_file: Path) -> None:
        try:
            import tokenizers
        except ImportError:
            raise ImportError(
                f"{json_file.parent} has only tokenizer.json: install the `tokenizers` package to read it"
            ) from None
        self._sp = None
        self._tok = tokenizers.Tokenizer.from_file(str(json_file))
        self._tok.no_truncation()
        self._tok.no_padding()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos, pad = self._tok.token_to_id(self.eos_token), self._tok.token_to_id(self.pad_token)
        if eos is None or pad is None:
            raise ValueError(f"{json_file} lacks the tokens {self.eos_token!r} / {self.pad_token!r}")
        self.eos_id, self.pad_id = int(eos), int(pad)

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without EOS, untruncated."""
        if self._tok is not None:
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        out = []
        for text in texts:
            ids: list[int] = []
            for chunk in self._split.split(text):
                if chunk in self._special:
                    ids.append(self._special[chunk])
                elif chunk:
                    ids.extend(self._sp.encode(chunk))
            out.append(ids)
        return out

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> Encoded:
        """B strings -> ``Encoded(ids int32 [B, L], mask bool [B, L], num_truncated)``, L = max_length."""
        if isinstance(texts, str):
            raise TypeError("T5Tokenizer.encode wants a list of strings, got one string")
        L = int(max_length or self.max_length)
        if L < 1:
            raise ValueError(f"T5Tokenizer.encode: max_length must be >= 1, got {L}")
        ids = np.full((len(texts), L), self.pad_id, np.int32)
        mask = np.zeros((len(texts), L), bool)
        truncated = 0
        for b, row in enumerate(self.pieces([str(t) for t in texts])):
            truncated += len(row) + 1 > L
            row = row[: L - 1] + [self.eos_id]
            ids[b, : len(row)] = row
            mask[b, : len(row)] = True
        return Encoded(ids, mask, truncated)
