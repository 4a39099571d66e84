"""``python -m data_pipelines.ingest --videos DIR --captions F --out D``: a folder of videos + captions to
ArrayRecord shards; the same command as ``sora-jax ingest`` (the library code is ``sora_jax.data.ingest``)."""

import sys

from sora_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
