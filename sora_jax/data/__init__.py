"""Data loading: the clip record codec (``records``) and grain pipelines (``pipeline``) that turn ArrayRecord
shards into per-process batches and global, batch-sharded ``jax.Array``s."""
