"""Precompute a dataset's caption embeddings with a frozen text encoder, once, next to its shards.

    python -m data_pipelines.encode_text --data data/digits --encoder minilm --max_length 24
    python -m data_pipelines.encode_text --data data/mine --encoder t5 --path ~/t5-v1_1-xxl --splits train

Writes ``<data>/text_emb-<encoder>-<hash>-<split>.npz`` (``sora_jax.text.frozen.EmbeddingTable``: distinct
captions, float16 embeddings [N, L, D] zero at padding, masks [N, L], the empty prompt included); the trainer
uses it for ``config.text.encoder = minilm | t5`` with the same path and max_length (the hash names them).
Captions come from ``metadata.json`` when it lists them, else from the record headers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sora_jax.data.pipeline import split_captions


def encode_text(
    data: str | Path,
    *,
    encoder: str,
    path: str = "",
    max_length: int = 24,
    splits: Sequence[str] = ("train",),
    tokenizer_path: str = "",
    dtype: str = "float32",
) -> list[Path]:
    """Writes one embedding table per split; returns their paths. ``tokenizer_path`` / ``dtype``: a UMT5
    folder's separate tokenizer and compute dtype (Wan: ``config.text.tokenizer_path`` / ``text.dtype``)."""
    from sora_jax.text.frozen import FrozenTextEmbedder, table_file

    embedder = FrozenTextEmbedder(
        encoder, path, max_length=max_length, tokenizer_path=tokenizer_path, dtype=dtype
    )
    out = []
    for split in splits:
        table = embedder.table(split_captions(data, split), progress=True)
        out.append(table.save(table_file(data, embedder, split)))
        print(f"{split}: {len(table.captions)} distinct captions -> {out[-1]}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset folder (metadata.json + shards)")
    p.add_argument("--encoder", required=True, choices=["minilm", "t5"])
    p.add_argument("--path", default="", help="t5: the Hugging Face folder; minilm: default the bundled one")
    p.add_argument("--max_length", type=int, default=24, help="tokens per caption (config.text.max_length)")
    p.add_argument("--splits", nargs="+", default=["train"])
    args = p.parse_args(argv)
    try:
        encode_text(
            args.data, encoder=args.encoder, path=args.path, max_length=args.max_length, splits=args.splits
        )
    except (ValueError, FileNotFoundError, KeyError, ImportError) as e:
        print(f"encode_text: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
