"""The samplers: one sampling core and two front ends that place and compile it.

The core is pure: ``sample_latents(spec, params, inputs, strength)`` encodes the prompts and the negative
(null) prompts with the model's text branch, draws each sample's noise from its own key, and runs the
process's sampler with classifier-free guidance (and guidance rescale), frame conditioning and SDEdit;
``decode_videos`` turns latents into uint8 pixels through an autoencoder whose weights come in as an
argument. ``sample_inputs`` prepares one call's host inputs (text input, per-prompt keys, conditioning)
and ``SampleInputs.padded`` repeats the last row up to a batch multiple.

Front ends:
- ``PmapSampler``: the evaluation sampler. ``jax.pmap`` over the local devices, parameters replicated with
  ``in_axes=None``; prompts split across devices; samples and decodes in one call.
- ``JitSampler``: ``jax.jit`` over a mesh with the parameters (the DiT's and the frozen autoencoder's)
  placed by the rules table and the prompts sharded over its batch axes; for models larger than one device
  and for the video-prompting modes (frame conditioning, SDEdit, negative prompts).

Each prompt's noise comes from ``fold_in(key(seed), prompt_index)`` (``prompt_keys``), and every sample is
drawn from its own key, so a prompt gives the same video whatever the front end, the device count or its
position in the batch. Parameters are always arguments of the compiled functions, never constants.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sora_jax.diffusion import flow
from sora_jax.diffusion.guidance import cfg_apply
from sora_jax.diffusion.process import Process
from sora_jax.models.autoencoder import Autoencoder, float_to_video, video_to_float
from sora_jax.parallel import sharding

# ------------------------------------------------------------------------------------------------ the core


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerSpec:
    """What a sampler runs, fixed when it is built: the model's graph, the diffusion process and its
    sampler over ``num_steps``, the latent shape ``(T', H', W', C)`` and the guidance."""

    graphdef: nnx.GraphDef
    process: Process
    latent_shape: tuple[int, int, int, int]
    sampler: str
    num_steps: int
    cfg_scale: float
    guidance_rescale: float = 0.0
    history_guidance: float = 0.0
    jitter: float = 0.0  # the steps at noise level <= this roll the model's input by an offset (``jittered``)

    def __post_init__(self):
        object.__setattr__(self, "latent_shape", tuple(self.latent_shape))
        for name in ("guidance_rescale", "history_guidance", "jitter"):
            object.__setattr__(self, name, float(getattr(self, name)))


class SampleInputs(NamedTuple):
    """One sampling call's inputs; every leaf has leading dim B (host or device arrays).

    text / negative: the text input's ``(ids int32 [B, L] or frozen features float32 [B, L, F], mask bool
    [B, L])`` of the prompts and of the unconditional branch of classifier-free guidance (the empty prompt,
    or negative prompts); keys: raw key data uint32 ``[B, 2]`` (``prompt_keys``); cond float32
    ``[B, T', H', W', C]`` given on the frames where cond_mask bool ``[B, T']`` is set; init float32
    ``[B, T', H', W', C]``: SDEdit's start; noise float32 ``[B, T', H', W', C]``: the initial noise, instead of
    the draw from each sample's key (to feed another implementation the same numbers). cond, cond_mask, init
    and noise may be None.
    """

    text: tuple[np.ndarray, np.ndarray]
    negative: tuple[np.ndarray, np.ndarray]
    keys: np.ndarray
    cond: np.ndarray | None = None
    cond_mask: np.ndarray | None = None
    init: np.ndarray | None = None
    noise: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.keys)

    def rows(self, index) -> SampleInputs:
        """The rows ``index`` (a slice or an index array) of every leaf."""
        return jax.tree.map(lambda a: a[index], self)

    def padded(self, multiple: int) -> SampleInputs:
        """``pad_rows`` of every leaf."""
        return pad_rows(self, multiple)


def pad_rows(tree, multiple: int):
    """Every leaf ``[n, ...]`` of ``tree`` with its last row repeated up to a multiple of ``multiple`` rows
    (the results for the copies are dropped)."""

    def pad(a):
        extra = -len(a) % multiple
        return np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) if extra else a

    return jax.tree.map(pad, tree)


def prompt_keys(seed: int, n: int) -> np.ndarray:
    """Raw key data uint32 ``[n, 2]``: ``fold_in(key(seed), i)`` for prompt i (the samplers' per-prompt keys)."""
    base = jax.random.key(seed)
    return np.stack([jax.random.key_data(jax.random.fold_in(base, i)) for i in range(n)])


def sample_inputs(
    text_input,
    prompts: Sequence[str],
    latent_shape: tuple[int, int, int, int],
    *,
    seed: int = 0,
    negative_prompts: Sequence[str] | None = None,
    cond: np.ndarray | None = None,
    cond_mask: np.ndarray | None = None,
    init: np.ndarray | None = None,
    noise: np.ndarray | None = None,
) -> SampleInputs:
    """Host inputs for B prompts: ``text_input.encode`` (a tokenizer or a frozen embedder) of the prompts and
    of the negative prompts (default: the empty prompt, the null caption of classifier-free guidance),
    the per-prompt keys of ``seed``, and the conditioning and explicit initial ``noise`` checked against
    ``[B, *latent_shape]``."""
    n = len(prompts)
    negative = list(negative_prompts) if negative_prompts else [""] * n
    if len(negative) != n:
        raise ValueError(f"got {len(negative)} negative prompts for {n} prompts")
    shape = (n, *latent_shape)
    if (cond is None) != (cond_mask is None):
        raise ValueError("frame conditioning needs both cond (latents) and cond_mask (the given frames)")
    if cond is not None:
        cond, cond_mask = np.asarray(cond, np.float32), np.asarray(cond_mask, bool)
        if cond.shape != shape:
            raise ValueError(f"cond latents {cond.shape} do not match the model's {shape}")
        if cond_mask.shape != shape[:2]:
            raise ValueError(f"cond_mask {cond_mask.shape} is not [{n}, {latent_shape[0]}]")
    if init is not None:
        init = np.asarray(init, np.float32)
        if init.shape != shape:
            raise ValueError(f"init latents {init.shape} do not match the model's {shape}")
    if noise is not None:
        noise = np.asarray(noise, np.float32)
        if noise.shape != shape:
            raise ValueError(
                f"noise {noise.shape} does not match the model's latents {shape} ([B, T, H, W, C])"
            )
        if not np.isfinite(noise).all():
            raise ValueError("noise holds NaN or Inf")
    ids, mask = text_input.encode(list(prompts))
    neg_ids, neg_mask = text_input.encode(negative)
    return SampleInputs(
        (np.asarray(ids), np.asarray(mask)),
        (np.asarray(neg_ids), np.asarray(neg_mask)),
        prompt_keys(seed, n),
        cond,
        cond_mask,
        init,
        noise,
    )


def sample_latents(spec: SamplerSpec, params, inputs: SampleInputs, strength: float = 1.0) -> jax.Array:
    """Latents float32 ``[B, T', H', W', C]`` of the B samples of ``inputs`` under the model ``params``.

    Sample b starts from ``inputs.noise[b]`` when given, else from noise drawn with the first half of its
    key, and gives the second half to the stochastic samplers; the model sees ``[prompts; negatives]`` in one
    call per step (classifier-free guidance with ``spec.cfg_scale`` and ``spec.guidance_rescale``). ``strength`` < 1 with ``inputs.init``
    is SDEdit (a static Python float). Traceable: jit or pmap it.
    """
    model = nnx.merge(spec.graphdef, params)
    ctx, ctx_mask = model.encode_text(*inputs.text)
    null_ctx, null_mask = model.encode_text(*inputs.negative)
    pairs = jax.vmap(lambda k: jax.random.split(jax.random.wrap_key_data(k)))(inputs.keys)
    if inputs.noise is None:
        noise = jax.vmap(lambda k: jax.random.normal(k, (1, *spec.latent_shape)))(pairs[:, 0])[:, 0]
    else:
        noise = jnp.asarray(inputs.noise, jnp.float32)
    denoise = lambda x, t, c: model.denoise(x, t, c[0], c[1])  # noqa: E731
    if spec.jitter:
        scale = flow.TIME_SCALE if spec.process.is_flow else spec.process.num_timesteps
        denoise = jittered(denoise, model.patch_size[1:], spec.jitter * scale)
    guided = cfg_apply(
        denoise,
        (jnp.concatenate([ctx, null_ctx]), jnp.concatenate([ctx_mask, null_mask])),
        spec.cfg_scale,
        rescale=spec.guidance_rescale,
    )
    return spec.process.sample(
        guided,
        noise,
        pairs[:, 1],  # typed keys [B]: a sample's stochastic steps do not depend on its batch
        sampler=spec.sampler,
        num_steps=spec.num_steps,
        cond=inputs.cond,
        cond_mask=inputs.cond_mask,
        init=inputs.init,
        strength=strength,
        history_scale=spec.history_guidance,
    )


JITTER_HASH = 2654435761  # Knuth's multiplicative hash; the exported PyTorch pipeline uses the same offsets


def jittered(denoise: Callable, patch: tuple[int, int], below: float) -> Callable:
    """``denoise(x, t, c)`` where the model time (the largest of t: the frames being generated) is <= ``below``:
    x ``[B, T, H, W, C]`` rolled by (dy, dx) in [0, ph) x [0, pw), a hash of round(t), and the output rolled
    back. The patch grid falls elsewhere at every step, so the seams of the per-patch linear head do not add up
    in one place; the early, noisier steps (above ``below``), where the layout is decided, keep the grid still.
    Rolled content wraps around the frame's edges."""
    ph, pw = (int(p) for p in patch)

    def fn(x, t, c):
        t0 = jnp.max(jnp.asarray(t, jnp.float32))
        h = jnp.round(t0).astype(jnp.uint32) * jnp.uint32(JITTER_HASH)
        on = (t0 <= below).astype(jnp.int32)
        dy, dx = on * ((h >> 16) % ph).astype(jnp.int32), on * ((h >> 24) % pw).astype(jnp.int32)
        out = denoise(jnp.roll(x, (dy, dx), axis=(2, 3)), t, c)
        return jnp.roll(out, (-dy, -dx), axis=(2, 3))

    return fn


def decode_videos(autoencoder: Autoencoder, ae_params, latents: jax.Array) -> jax.Array:
    """latents ``[B, T', H', W', C]`` -> uint8 videos ``[B, T, H, W, 3]`` through ``autoencoder`` over
    ``ae_params`` (an argument of the jitted caller, so the weights are not compiled in)."""
    return float_to_video(autoencoder.with_params(ae_params).decode(latents))


def encode_videos(autoencoder: Autoencoder, ae_params, videos: jax.Array) -> jax.Array:
    """uint8 videos ``[B, T, H, W, 3]`` -> latents float32 ``[B, T', H', W', C]`` (as ``decode_videos``)."""
    return autoencoder.with_params(ae_params).encode(video_to_float(videos))


# ------------------------------------------------------------------------------------------- front ends


class PmapSampler:
    """Generates uint8 videos ``[B, T, H, W, 3]`` from prompts with a TextToVideo model's (EMA) params:
    ``jax.pmap`` over ``devices`` (default: the local devices), params and the autoencoder's weights
    replicated with ``in_axes=None``, prompts padded to a multiple of the device count and split across
    devices. ``generate_fn(params, ae_params, inputs)`` is the pmapped function (inputs ``[D, n, ...]``)."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        text_input,
        process: Process,
        autoencoder: Autoencoder,
        latent_shape: tuple[int, int, int, int],
        *,
        sampler: str,
        num_steps: int,
        cfg_scale: float,
        guidance_rescale: float = 0.0,
        history_guidance: float = 0.0,
        jitter: float = 0.0,
        devices: list[jax.Device] | None = None,
    ):
        args = (latent_shape, sampler, num_steps, cfg_scale, guidance_rescale, history_guidance, jitter)
        self.spec = SamplerSpec(graphdef, process, *args)
        self.text_input, self.autoencoder = text_input, autoencoder
        self.devices = devices or jax.local_devices()
        spec, codec = self.spec, autoencoder.with_params(None)  # the weights come in as ae_params

        def generate_shard(params, ae_params, inputs):
            return decode_videos(codec, ae_params, sample_latents(spec, params, inputs))

        self.generate_fn = jax.pmap(generate_shard, in_axes=(None, None, 0), devices=self.devices)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.spec.latent_shape

    def _split(self, inputs: SampleInputs) -> SampleInputs:
        """Rows ``[n, ...]`` -> ``[D, ceil(n / D), ...]`` (padded)."""
        d = len(self.devices)
        return jax.tree.map(lambda a: a.reshape(d, -1, *a.shape[1:]), inputs.padded(d))

    def lower(self, params, prompts: list[str], *, seed: int = 0) -> jax.stages.Lowered:
        """The pmapped call for ``prompts`` in one chunk, lowered (``.as_text()``, ``.compile()``)."""
        inputs = sample_inputs(self.text_input, prompts, self.latent_shape, seed=seed)
        return self.generate_fn.lower(params, self.autoencoder.params, self._split(inputs))

    def generate(
        self,
        params,
        prompts: list[str],
        *,
        seed: int = 0,
        negative_prompts: list[str] | None = None,
        noise: np.ndarray | None = None,
        batch_per_device: int = 4,
        progress: bool = False,
    ) -> np.ndarray:
        """uint8 ``[len(prompts), T, H, W, 3]``, in chunks of ``batch_per_device`` prompts per device;
        ``noise`` float32 ``[B, T', H', W', C]``: the initial noise instead of the seed's."""
        inputs = sample_inputs(
            self.text_input,
            prompts,
            self.latent_shape,
            seed=seed,
            negative_prompts=negative_prompts,
            noise=noise,
        )
        return self.generate_inputs(params, inputs, batch_per_device=batch_per_device, progress=progress)

    def generate_inputs(
        self, params, inputs: SampleInputs, *, batch_per_device: int = 4, progress: bool = False
    ) -> np.ndarray:
        """uint8 ``[inputs.size, T, H, W, 3]`` from prepared host inputs (``sample_inputs``), in chunks of
        ``batch_per_device`` rows per device: a caller that samples the same prompts again (evaluation during
        training) prepares them once. Every full chunk has one shape, so one compile serves them all."""
        chunk = len(self.devices) * batch_per_device
        out = []
        for start in tqdm(range(0, inputs.size, chunk), desc="sample", disable=not progress):
            part = inputs.rows(slice(start, start + chunk))
            videos = self.generate_fn(params, self.autoencoder.params, self._split(part))
            out.append(np.asarray(videos).reshape(-1, *videos.shape[2:])[: part.size])
        return np.concatenate(out)


class JitSampler:
    """Samples latents ``[B, T', H', W', C]`` with ``jax.jit`` over a mesh; also encodes and decodes through
    the frozen ``autoencoder`` when given one.

    ``mesh`` places the DiT's parameters (``param_sharding``, the abstract state's shardings, or else the
    rules table's) and the autoencoder's weights (the rules table's), and shards prompts over the rules
    table's batch axes (padded to a multiple of them); without a mesh everything lives on the first local
    device. ``sample_fn(params, inputs, strength)``, ``encode_fn(ae_params, videos)`` and
    ``decode_fn(ae_params, latents)`` are the jitted functions (``.lower(...)`` them to inspect or compile
    ahead of time).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params,
        text_input,
        process: Process,
        latent_shape: tuple[int, int, int, int],
        *,
        sampler: str,
        num_steps: int,
        cfg_scale: float,
        guidance_rescale: float = 0.0,
        history_guidance: float = 0.0,
        jitter: float = 0.0,
        autoencoder: Autoencoder | None = None,
        mesh: jax.sharding.Mesh | None = None,
        param_sharding=None,
    ):
        args = (latent_shape, sampler, num_steps, cfg_scale, guidance_rescale, history_guidance, jitter)
        self.spec = SamplerSpec(graphdef, process, *args)
        self.text_input, self.mesh = text_input, mesh
        self.params = self._place(params, param_sharding)
        self.autoencoder = None
        if autoencoder is not None:
            self.autoencoder = autoencoder.with_params(self._place(autoencoder.params))
        spec, codec = self.spec, None if autoencoder is None else autoencoder.with_params(None)
        self.sample_fn = self._jit(
            lambda params, inputs, strength: sample_latents(spec, params, inputs, strength),
            static_argnames="strength",
        )
        self.encode_fn = self._jit(lambda ae_params, videos: encode_videos(codec, ae_params, videos))
        self.decode_fn = self._jit(lambda ae_params, latents: decode_videos(codec, ae_params, latents))

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.spec.latent_shape

    @property
    def batch_multiple(self) -> int:
        """Rows a call is padded to a multiple of: the product of the mesh's batch axes (1 without a mesh)."""
        return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)

    def _place(self, tree, shardings=None):
        if self.mesh is None:
            return jax.device_put(tree, jax.local_devices()[0])
        if shardings is None:
            shardings = sharding.state_shardings(tree, self.mesh)
        return jax.device_put(tree, shardings)

    def _jit(self, fn: Callable, **jit_kw) -> Callable:
        """``jax.jit(fn)`` traced under the mesh's activation sharding (a no-op without a mesh)."""
        mesh = self.mesh

        def traced(*args, **kw):
            with sharding.activation_sharding(mesh):
                return fn(*args, **kw)

        return jax.jit(traced, **jit_kw)

    def _batch(self, tree):
        """Host rows (a pytree, leading dim B) padded to the batch multiple and, on a mesh, sharded over its
        batch axes."""
        tree = pad_rows(tree, self.batch_multiple)
        if self.mesh is None:
            return tree
        return jax.tree.map(lambda a: jax.device_put(a, sharding.batch_sharding(self.mesh, a.ndim)), tree)

    def _inputs(self, prompts, seed, cond, cond_mask, init, negative_prompts) -> SampleInputs:
        return self._batch(
            sample_inputs(
                self.text_input,
                prompts,
                self.latent_shape,
                seed=seed,
                negative_prompts=negative_prompts,
                cond=cond,
                cond_mask=cond_mask,
                init=init,
            )
        )

    def lower(
        self,
        prompts: list[str],
        *,
        seed: int = 0,
        cond: np.ndarray | None = None,
        cond_mask: np.ndarray | None = None,
        init: np.ndarray | None = None,
        strength: float = 1.0,
        negative_prompts: list[str] | None = None,
    ) -> jax.stages.Lowered:
        """``sample``'s jitted call, lowered (``.as_text()``, ``.compile().memory_analysis()``)."""
        inputs = self._inputs(prompts, seed, cond, cond_mask, init, negative_prompts)
        return self.sample_fn.lower(self.params, inputs, strength=float(strength))

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
        inputs = self._inputs(prompts, seed, cond, cond_mask, init, negative_prompts)
        latents = self.sample_fn(self.params, inputs, strength=float(strength))
        return np.asarray(jax.device_get(latents))[: len(prompts)]

    def _codec(self) -> Autoencoder:
        if self.autoencoder is None:
            raise ValueError("this JitSampler was built without an autoencoder (pass autoencoder=...)")
        return self.autoencoder

    def encode(self, videos: np.ndarray) -> np.ndarray:
        """uint8 videos ``[B, T, H, W, 3]`` -> latents float32 ``[B, T', H', W', C]``."""
        videos = np.asarray(videos)
        out = self.encode_fn(self._codec().params, self._batch(videos))
        return np.asarray(jax.device_get(out))[: len(videos)]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents ``[B, T', H', W', C]`` -> uint8 videos ``[B, T, H, W, 3]``. A codec with causal caches (the
        VAE) decodes one latent chunk at a time (``decode_chunked``: equal to the full decode, memory bounded
        by a chunk; its jitted step takes the weights as an argument too)."""
        ae, latents = self._codec(), np.asarray(latents, np.float32)
        if hasattr(ae, "decode_chunked"):
            return float_to_video(np.asarray(ae.decode_chunked(latents), np.float32))
        out = self.decode_fn(ae.params, self._batch(latents))
        return np.asarray(jax.device_get(out))[: len(latents)]
