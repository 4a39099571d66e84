"""The video prompter, ``Prompter``: text-to-video, image-to-video, extend forward/backward, connect, edit,
loop, long videos.

Every mode is one mechanism (``sora_jax/diffusion/masks.py``): a pixel *template* clip of the model's
shape holds the given frames (an image, the end of a video, ...), the autoencoder encodes it, and the latent
frames whose pixel frames are all given become the conditioning (clean, at time 0) of one sampling pass. For
the causal VAE latent 0 covers pixel frame 0 and latent i pixel frames f(i-1)+1 .. f i; in pixel space a
latent frame is a pixel frame. ``overlap`` counts given latent frames; ``pixel_overlap`` is what they cover.

    p = Prompter.from_pipeline(api.load_pipeline("runs/demo"))
    p.i2v("a 3 moving left", image)                 # uint8 [T, H, W, 3], frame 0 = image
    p.extend("...", video, direction="forward")      # video + new frames
    p.connect("...", a, b)                           # a + transition + b
    p.edit("...", video, strength=0.6)               # SDEdit
    p.loop("...")                                    # a clip whose end leads back to its start
    p.long_video(["..."], seconds=60, sink=...)     # autoregressive extension, streamed

Long videos extend forward segment by segment (each conditioned on the last ``overlap`` latent frames of
the previous one, re-encoded from pixels so every segment sees clips as in training) and decode each segment
on its own, so memory stays that of one segment whatever the length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sora_jax.models.autoencoder import Autoencoder
from sora_jax.sample.sampler import JitSampler


def fit_frames(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 video ``[T, h, w, C]`` or image ``[h, w, C]`` / ``[h, w]`` (C = 1, 3, 4) -> ``[T, height, width, 3]``:
    resized (bicubic) to cover the model's frame, centre-cropped. ValueError for empty or ill-shaped input."""
    v = np.asarray(video)
    if v.size == 0:
        raise ValueError("the input has no pixels (an empty image or video)")
    if v.ndim == 2:  # a grey image
        v = v[None, ..., None]
    elif v.ndim == 3:  # an image [H, W, C]
        v = v[None]
    if v.ndim != 4 or v.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected frames [T, H, W, 3] or an image [H, W, 3], got shape {v.shape}")
    if v.shape[-1] == 1:
        v = np.repeat(v, 3, axis=-1)
    v = v[..., :3].astype(np.uint8)
    _, h, w, _ = v.shape
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))  # PIL: (w, h)
    if size != (w, h):
        v = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in v])
    top, left = (v.shape[1] - height) // 2, (v.shape[2] - width) // 2
    return np.ascontiguousarray(v[:, top : top + height, left : left + width])


def read_image(path) -> np.ndarray:
    """uint8 ``[H, W, 3]`` of an image file; FileNotFoundError / ValueError with one line naming the file."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such image file: {p}")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {p}: {e}") from None


def latent_frame_mask(pixel_mask: np.ndarray, temporal_downsample: int) -> np.ndarray:
    """bool ``[..., T]`` over pixel frames -> ``[..., T']`` over latent frames: a latent frame is given when
    every pixel frame it codes is (causal coding: latent 0 <- frame 0, latent i <- frames f(i-1)+1 .. f i)."""
    f = int(temporal_downsample)
    m = np.asarray(pixel_mask, bool)
    if f == 1:
        return m
    rest = m[..., 1:]
    if rest.shape[-1] % f:
        raise ValueError(f"{m.shape[-1]} frames do not fit a causal code of 1 + {f}k frames")
    groups = rest.reshape(*rest.shape[:-1], -1, f).all(axis=-1)
    return np.concatenate([m[..., :1], groups], axis=-1)


def pixel_frames(latent_frames: int, temporal_downsample: int) -> int:
    """Pixel frames that the first ``latent_frames`` latent frames code (1 + f (k - 1); k in pixel space)."""
    f = int(temporal_downsample)
    return latent_frames if f == 1 else 1 + f * (latent_frames - 1)


def fsdp_placement(cfg, fsdp: int):
    """(mesh, param shardings) to sample a model of ``cfg`` with its parameters sharded over ``fsdp`` local
    devices by the training rules (mesh data=1, fsdp=N): for models larger than one device."""
    from sora_jax import factory
    from sora_jax.parallel.mesh import make_mesh

    devices = jax.local_devices()
    if not 1 <= fsdp <= len(devices):
        raise ValueError(f"--fsdp {fsdp}: this process has {len(devices)} local device(s)")
    mcfg = cfg.copy_and_resolve_references()
    mcfg.unlock()
    mcfg.mesh.data, mcfg.mesh.fsdp, mcfg.mesh.tensor, mcfg.mesh.seq = 1, fsdp, 1, 1
    mesh = make_mesh(mcfg.mesh, devices[:fsdp])
    return mesh, factory.abstract_state(mcfg, mesh).shardings


@dataclasses.dataclass
class Prompter:
    """A ``JitSampler`` (with its autoencoder) at the model's clip shape ``frames x height x width``.

    ``prompt_check`` (the pipeline's, ``Pipeline.prompt_check``): called with the prompts before every
    sampling pass; raises to refuse them."""

    sampler: JitSampler
    frames: int
    height: int
    width: int
    fps: float
    prompt_check: Callable[[list[str]], None] | None = None

    @classmethod
    def from_pipeline(
        cls,
        pipe,
        *,
        bucket: str = "",
        fsdp: int = 0,
        mesh=None,
        param_sharding=None,
        guidance_rescale: float = 0.0,
        history_guidance: float = 0.0,
    ) -> Prompter:
        """From ``api.load_pipeline``'s Pipeline (its config, autoencoder, text input and params).

        ``bucket`` "TxHxW" picks the clip shape (default: the config's first ``data.buckets`` entry, else
        ``data.num_frames`` x ``height`` x ``width``); ``fsdp`` > 0 shards the parameters over that many local
        devices (``fsdp_placement``)."""
        from sora_jax import factory
        from sora_jax.data.buckets import parse_buckets

        cfg = pipe.config
        spec = bucket or cfg.data.get("buckets", "")
        d = cfg.data
        T, H, W = parse_buckets(spec)[0].shape if spec else (d.num_frames, d.height, d.width)
        latent = tuple(pipe.autoencoder.latent_shape(T, H, W))
        if fsdp:
            mesh, param_sharding = fsdp_placement(cfg, fsdp)
        sampler = JitSampler(
            pipe.graphdef,
            pipe.params,
            pipe.text_input,
            factory.make_process(cfg),
            latent,
            sampler=cfg.diffusion.sampler,
            num_steps=cfg.diffusion.sample_steps,
            cfg_scale=cfg.diffusion.cfg_scale,
            guidance_rescale=guidance_rescale,
            history_guidance=history_guidance,
            jitter=float(cfg.diffusion.get("sample_jitter", 0.0)),
            autoencoder=pipe.autoencoder,
            mesh=mesh,
            param_sharding=param_sharding,
        )
        return cls(sampler, T, H, W, float(d.fps), getattr(pipe, "prompt_check", None))

    # ------------------------------------------------------------------------------------------ plumbing

    @property
    def autoencoder(self) -> Autoencoder:
        """The sampler's autoencoder (its weights placed where the sampler runs)."""
        return self.sampler.autoencoder

    @property
    def f(self) -> int:
        return int(getattr(self.autoencoder, "temporal_downsample", 1))

    def pixel_overlap(self, overlap: int) -> int:
        """Pixel frames covered by ``overlap`` given latent frames (checked to leave frames to generate)."""
        latent_t = self.sampler.latent_shape[0]
        if not 1 <= overlap < latent_t:
            raise ValueError(f"overlap must be 1..{latent_t - 1} latent frames, got {overlap}")
        return pixel_frames(overlap, self.f)

    def encode(self, videos: np.ndarray) -> np.ndarray:
        """uint8 ``[B, T, H, W, 3]`` -> latents float32 ``[B, T', H', W', C]`` (``JitSampler.encode``)."""
        return self.sampler.encode(videos)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents ``[B, T', H', W', C]`` -> uint8 ``[B, T, H, W, 3]``; a VAE decodes in causal chunks
        (``JitSampler.decode``: equal to the full decode, memory bounded by a chunk)."""
        return self.sampler.decode(latents)

    def generate(
        self,
        prompts: list[str],
        *,
        given: list[dict[int, np.ndarray]] | None = None,
        init: np.ndarray | None = None,
        strength: float = 1.0,
        seed: int = 0,
        negative_prompts: list[str] | None = None,
    ) -> np.ndarray:
        """uint8 ``[B, T, H, W, 3]``: one sampling pass per prompt, with ``given[b]`` = {pixel frame index:
        uint8 [H, W, 3]} as conditioning and/or ``init`` (uint8 ``[B, T, H, W, 3]``) edited at ``strength``."""
        if self.prompt_check is not None:
            self.prompt_check(list(prompts))
        n, T = len(prompts), self.frames
        cond = cond_mask = None
        if given is not None and any(given):
            template = np.zeros((n, T, self.height, self.width, 3), np.uint8)
            pmask = np.zeros((n, T), bool)
            for b, frames in enumerate(given):
                for i, frame in frames.items():
                    template[b, i] = frame
                    pmask[b, i] = True
            cond_mask = latent_frame_mask(pmask, self.f)
            cond = self.encode(template)
        init_lat = None if init is None else self.encode(init)
        latents = self.sampler.sample(
            list(prompts),
            seed=seed,
            cond=cond,
            cond_mask=cond_mask,
            init=init_lat,
            strength=strength,
            negative_prompts=negative_prompts,
        )
        return self.decode(latents)

    def _fit(self, video: np.ndarray, name: str, min_frames: int = 1) -> np.ndarray:
        v = fit_frames(video, self.height, self.width)
        if len(v) < min_frames:
            raise ValueError(f"{name} has {len(v)} frames; this mode needs at least {min_frames}")
        return v

    # ---------------------------------------------------------------------------------------------- modes

    def t2v(self, prompt: str, *, seed: int = 0, **kw) -> np.ndarray:
        return self.generate([prompt], seed=seed, **kw)[0]

    def i2v(self, prompt: str, image: np.ndarray, *, seed: int = 0, **kw) -> np.ndarray:
        """Animates ``image`` ([H, W, 3]): frame 0 of the result is the image (through the autoencoder)."""
        img = self._fit(image, "the image")[0]
        return self.generate([prompt], given=[{0: img}], seed=seed, **kw)[0]

    def extend(
        self,
        prompt: str,
        video: np.ndarray,
        *,
        direction: str = "forward",
        overlap: int = 1,
        seed: int = 0,
        **kw,
    ) -> np.ndarray:
        """``video`` + new frames (forward), or new frames + ``video`` (backward); each pass conditions on the
        ``overlap`` latent frames at the seam."""
        if direction not in ("forward", "backward"):
            raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
        P, T = self.pixel_overlap(overlap), self.frames
        v = self._fit(video, "the video", P)
        if direction == "forward":
            clip = self.generate([prompt], given=[{i: v[len(v) - P + i] for i in range(P)}], seed=seed, **kw)[
                0
            ]
            return np.concatenate([v, clip[P:]])
        clip = self.generate([prompt], given=[{T - P + i: v[i] for i in range(P)}], seed=seed, **kw)[0]
        return np.concatenate([clip[: T - P], v])

    def connect(
        self, prompt: str, a: np.ndarray, b: np.ndarray, *, overlap: int = 1, seed: int = 0, **kw
    ) -> tuple[np.ndarray, np.ndarray]:
        """(a + transition + b, the generated clip): the clip starts with a's last frames, ends with b's first."""
        P, T = self.pixel_overlap(overlap), self.frames
        if 2 * overlap >= self.sampler.latent_shape[0]:
            raise ValueError(f"connect gives {overlap} latent frames at each end: the clip is too short")
        va, vb = self._fit(a, "the first video", P), self._fit(b, "the second video", P)
        given = {i: va[len(va) - P + i] for i in range(P)} | {T - P + i: vb[i] for i in range(P)}
        clip = self.generate([prompt], given=[given], seed=seed, **kw)[0]
        return np.concatenate([va, clip[P : T - P], vb]), clip

    def edit(
        self, prompt: str, video: np.ndarray, *, strength: float = 0.6, seed: int = 0, **kw
    ) -> np.ndarray:
        """SDEdit of the first T frames of ``video``: noised to ``strength`` and denoised under ``prompt``."""
        v = self._fit(video, "the video", self.frames)[: self.frames]
        return self.generate([prompt], init=v[None], strength=strength, seed=seed, **kw)[0]

    def loop(self, prompt: str, *, overlap: int = 1, seed: int = 0, **kw) -> np.ndarray:
        """A clip plus a transition back to its start: played in a loop, it never jumps."""
        clip = self.t2v(prompt, seed=seed, **kw)
        P = self.pixel_overlap(overlap)
        _, transition = self.connect(prompt, clip, clip, overlap=overlap, seed=seed + 1, **kw)
        return np.concatenate([clip, transition[P : self.frames - P]])

    def long_video(
        self,
        prompts: list[str],
        *,
        seconds: float | None = None,
        num_frames: int | None = None,
        overlap: int = 1,
        seed: int = 0,
        sink: Callable[[np.ndarray], None] | None = None,
        progress: bool = False,
        init_strength: float = 1.0,
        **kw,
    ) -> tuple[np.ndarray | None, list[tuple[int, int]]]:
        """Videos of ``seconds`` at the model's fps (or ``num_frames``) by autoregressive extension, one per
        prompt (sampled together).

        Returns (uint8 ``[B, N, H, W, 3]``, or None when a ``sink`` took each segment's new frames
        ``[B, n, H, W, 3]`` as they came, and the segments as (first, end) frame ranges: segment 0 is the t2v
        clip, each later one the frames one extension added). Segment s samples with seed ``seed + s``.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        total = int(num_frames if num_frames is not None else round(float(seconds) * self.fps))
        if total < 1:
            raise ValueError(f"a long video needs at least one frame, got {total}")
        P, T = self.pixel_overlap(overlap), self.frames
        kept: list[np.ndarray] = []
        emit = sink if sink is not None else kept.append
        clip = self.generate(prompts, seed=seed, **kw)
        done = min(T, total)
        segments = [(0, done)]
        emit(clip[:, :done])
        n_more = -(-(total - done) // (T - P))
        for s in tqdm(range(1, n_more + 1), desc="segments", disable=not progress):
            given = [{i: c[T - P + i] for i in range(P)} for c in clip]
            if init_strength < 1.0:
                held = np.repeat(clip[:, T - 1 : T], T, axis=1)
                kw = kw | {"init": held, "strength": init_strength}
            clip = self.generate(prompts, given=given, seed=seed + s, **kw)
            new = clip[:, P:][:, : total - done]
            emit(new)
            segments.append((done, done + new.shape[1]))
            done += new.shape[1]
        return (np.concatenate(kept, axis=1) if sink is None else None), segments
