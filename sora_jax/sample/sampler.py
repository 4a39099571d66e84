"""The samplers: ``PmapSampler`` (evaluation, replicated params, prompts split across local devices) and
``JitSampler`` (``jax.jit`` over a mesh with params sharded by the training rules, for models too large for
one device, and the one the video-prompting modes use: frame conditioning, SDEdit, negative prompts).

Each prompt's noise comes from ``fold_in(key(seed), prompt_index)`` in both, so a prompt gives the same
starting noise whatever the number of devices, the sampler or its position in the batch. PmapSampler passes
parameters replicated with ``in_axes=None``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sora_jax.diffusion.guidance import cfg_apply
from sora_jax.models.autoencoder import Autoencoder, float_to_video
from sora_jax.parallel import sharding


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
        keys = prompt_keys(seed, len(prompts))
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


def prompt_keys(seed: int, n: int) -> np.ndarray:
    """Raw key data [n, 2]: ``fold_in(key(seed), i)`` for prompt i (the samplers' per-prompt keys)."""
    base = jax.random.key(seed)
    return np.stack([jax.random.key_data(jax.random.fold_in(base, i)) for i in range(n)])


class JitSampler:
    """Samples latents ``[B, T', H', W', C]`` with ``jax.jit`` over a mesh; params sharded as in training.

    ``mesh`` and ``param_sharding`` (the ``params`` subtree of ``loop.build_train_fns``'s state shardings)
    place the parameters; without them everything lives on the first local device. Prompts are padded to a
    multiple of the mesh's batch axes (data x fsdp) and sharded over them.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params,
        tokenizer,
        process,
        latent_shape: tuple[int, int, int, int],
        *,
        sampler: str,
        num_steps: int,
        cfg_scale: float,
        guidance_rescale: float = 0.0,
        mesh=None,
        param_sharding=None,
    ):
        self.graphdef, self.tokenizer, self.process = graphdef, tokenizer, process
        self.latent_shape = tuple(latent_shape)
        self.sampler, self.num_steps, self.cfg_scale = sampler, num_steps, cfg_scale
        self.guidance_rescale = float(guidance_rescale)
        self.mesh = mesh
        if mesh is not None and param_sharding is not None:
            self.params = jax.device_put(params, param_sharding)
        else:
            self.params = jax.device_put(params, jax.local_devices()[0])
        self._fns: dict = {}

    @property
    def batch_multiple(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def _fn(self, strength: float, conditioned: bool, edited: bool):
        key = (float(strength), conditioned, edited)
        if key in self._fns:
            return self._fns[key]

        def run(params, ids, mask, neg_ids, neg_mask, keys, cond, cond_mask, init):
            model = nnx.merge(self.graphdef, params)
            ctx, ctx_mask = model.encode_text(ids, mask)
            nctx, nmask = model.encode_text(neg_ids, neg_mask)
            pairs = jax.vmap(lambda k: jax.random.split(jax.random.wrap_key_data(k)))(keys)
            noise = jax.vmap(lambda k: jax.random.normal(k, (1, *self.latent_shape)))(pairs[:, 0])[:, 0]
            guided = cfg_apply(
                lambda x, t, c: model.denoise(x, t, c[0], c[1]),
                (jnp.concatenate([ctx, nctx]), jnp.concatenate([ctx_mask, nmask])),
                self.cfg_scale,
                rescale=self.guidance_rescale,
            )
            return self.process.sample(
                guided,
                noise,
                pairs[:, 1],  # per-sample keys: a prompt's video does not depend on its batch
                sampler=self.sampler,
                num_steps=self.num_steps,
                cond=cond if conditioned else None,
                cond_mask=cond_mask if conditioned else None,
                init=init if edited else None,
                strength=strength,
            )

        if self.mesh is None:
            fn = jax.jit(run)
        else:
            mesh = self.mesh

            def sharded(*args):
                with sharding.activation_sharding(mesh):
                    return run(*args)

            fn = jax.jit(sharded)
        self._fns[key] = fn
        return fn

    def sample(
        self,
        prompts: list[str],
        *,
        seed: int = 0,
        cond: np.ndarray | None = None,
        cond_mask: np.ndarray | None = None,
        init: np.ndarray | None = None,
        strength: float = 1.0,
        negative_prompts: list[str] | None = None,
    ) -> np.ndarray:
        """Latents float32 ``[B, T', H', W', C]`` for B prompts.

        cond / cond_mask: clean latents ``[B, T', H', W', C]`` given on the frames where the bool mask
        ``[B, T']`` is set (returned exactly); init + strength: SDEdit from ``init`` latents; negative_prompts:
        B prompts that replace the empty caption as the unconditional branch of classifier-free guidance.
        """
        n = len(prompts)
        ids, mask = self.tokenizer.encode(list(prompts))
        neg = list(negative_prompts) if negative_prompts else [""] * n
        if len(neg) != n:
            raise ValueError(f"got {len(neg)} negative prompts for {n} prompts")
        nids, nmask = self.tokenizer.encode(neg)
        keys = prompt_keys(seed, n)
        zeros = np.zeros((n, *self.latent_shape), np.float32)
        cond_a = zeros if cond is None else np.asarray(cond, np.float32)
        mask_a = (
            np.zeros((n, self.latent_shape[0]), bool) if cond_mask is None else np.asarray(cond_mask, bool)
        )
        init_a = zeros if init is None else np.asarray(init, np.float32)
        for name, a in (("cond", cond_a), ("init", init_a)):
            if a.shape != zeros.shape:
                raise ValueError(f"{name} latents {a.shape} do not match the model's {zeros.shape}")
        if mask_a.shape != (n, self.latent_shape[0]):
            raise ValueError(f"cond_mask {mask_a.shape} is not [{n}, {self.latent_shape[0]}]")
        args = [ids, mask, nids, nmask, keys, cond_a, mask_a, init_a]
        m = self.batch_multiple
        pad = -n % m
        if pad:
            args = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in args]
        if self.mesh is not None:
            batch = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
            args = [jax.device_put(a, batch) for a in args]
        fn = self._fn(strength, cond_mask is not None, init is not None)
        return np.asarray(jax.device_get(fn(self.params, *args)))[:n]
