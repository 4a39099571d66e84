"""The evaluation sampler: ``jax.pmap`` over local devices, prompts split across devices, CFG.

Each prompt's noise comes from ``fold_in(key(seed), prompt_index)``, so a prompt gives the same video whatever
the number of devices or its position in the batch. Parameters are passed replicated with ``in_axes=None``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sora_jax.diffusion.guidance import cfg_apply
from sora_jax.models.autoencoder import Autoencoder, float_to_video


class PmapSampler:
    """Generates uint8 videos [B, T, H, W, 3] from prompts with a TextToVideo model's (EMA) params."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        tokenizer,
        process,
        autoencoder: Autoencoder,
        latent_shape: tuple[int, int, int, int],
        *,
        sampler: str,
        num_steps: int,
        cfg_scale: float,
        devices: list[jax.Device] | None = None,
    ):
        self.graphdef, self.tokenizer, self.process, self.autoencoder = (
            graphdef,
            tokenizer,
            process,
            autoencoder,
        )
        self.latent_shape = tuple(latent_shape)
        self.sampler, self.num_steps, self.cfg_scale = sampler, num_steps, cfg_scale
        self.devices = devices or jax.local_devices()
        null_ids, null_mask = tokenizer.encode([""])
        self._null = (jnp.asarray(null_ids[0]), jnp.asarray(null_mask[0]))
        self._pmapped = jax.pmap(self._generate_shard, in_axes=(None, 0, 0, 0), devices=self.devices)

    def _generate_shard(self, params, ids, mask, keys):
        """One device: ids/mask [n, L], keys [n, 2] -> uint8 videos [n, T, H, W, 3].

        Each sample is vmapped on its own (batch 1, CFG doubling it to 2) with its own key, so stochastic
        samplers too give a prompt the same video whatever the device count.
        """
        model = nnx.merge(self.graphdef, params)
        ctx, ctx_mask = model.encode_text(ids, mask)
        null_ctx, null_mask = model.encode_text(self._null[0][None], self._null[1][None])

        def apply_cond(x_t, t, cond):
            return model.denoise(x_t, t, cond[0], cond[1])

        def one(key, c, m):
            key = jax.random.wrap_key_data(key)
            k_noise, k_sample = jax.random.split(key)
            noise = jax.random.normal(k_noise, (1, *self.latent_shape))
            cond = (jnp.concatenate([c[None], null_ctx]), jnp.concatenate([m[None], null_mask]))
            apply_fn = cfg_apply(apply_cond, cond, self.cfg_scale)
            return self.process.sample(
                apply_fn, noise, k_sample, sampler=self.sampler, num_steps=self.num_steps
            )[0]

        latents = jax.vmap(one)(keys, ctx, ctx_mask)
        return float_to_video(self.autoencoder.decode(latents))

    def generate(
        self, params, prompts: list[str], *, seed: int = 0, batch_per_device: int = 4, progress: bool = False
    ) -> np.ndarray:
        """uint8 [len(prompts), T, H, W, 3]; prompts are padded up to a multiple of the device count."""
        ids, mask = self.tokenizer.encode(list(prompts))
        base = jax.random.key(seed)
        keys = np.stack([jax.random.key_data(jax.random.fold_in(base, i)) for i in range(len(prompts))])
        d = len(self.devices)
        chunk = d * batch_per_device
        out = []
        for start in tqdm(range(0, len(prompts), chunk), desc="sample", disable=not progress):
            sl = slice(start, start + chunk)
            n = len(ids[sl])
            per = -(-n // d)
            pad = per * d - n

            def shard(a, per=per, pad=pad):
                a = np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a
                return a.reshape(d, per, *a.shape[1:])

            videos = self._pmapped(params, shard(ids[sl]), shard(mask[sl]), shard(keys[sl]))
            out.append(np.asarray(videos).reshape(d * per, *videos.shape[2:])[:n])
        return np.concatenate(out)
