"""Flax NNX models: the spacetime DiT, its layers, autoencoders, and the text-to-video wrapper.

Parameters carry logical axis names (``nnx.with_partitioning``); placement on a mesh is decided by
``sora_jax.parallel`` from one rules table, never here. Eager sharding is switched off so that models can be
built without a mesh (tests, notebooks, ``jax.eval_shape``).
"""

from flax import nnx

nnx.use_eager_sharding(False)
