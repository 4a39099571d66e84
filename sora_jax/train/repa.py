"""REPA (Yu et al. 2024, "Representation Alignment for Generation"): the training-loss term that aligns a DiT
block's tokens, through the model's projector MLP, with a frozen pretrained encoder's features of the clean clip.

``config.repa``: ``layer`` (the block whose output is aligned, 1..depth; 0: off), ``dim`` (the encoder's
feature width; the projector's output), ``weight`` (lambda of the term), ``standardize`` (the targets per
channel to zero mean and unit variance over the batch's tokens), ``classes`` (the weight of a second term). The
encoder is the bundled digit reader (``sora_jax/eval/digit_reader.py``): its conv map ``[B, T, H/4, W/4, 96]``
of every frame (``first_frames``: of the first frame of each temporal token group), average-pooled to the DiT's
token grid. Loss: ``weight * (1 - cos(projected token, encoder feature))`` averaged over the tokens; with
``classes`` > 0 the projector has 11 more outputs, the logits of which digit the reader's class maps put in
the token (or background), plus ``classes * cross-entropy``. With ``motion`` > 0 (a VideoJAM-like motion term,
Chefer et al. 2025, on REPA's projector) ``REPA_MOTION_CHANNELS`` more outputs are the logits of how each token's
content moves to the next frame (``motion_targets``: block matching on the clean clip, any video), plus
``motion * cross-entropy``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import factory
from sora_jax.choices import DataContent, ModelArch, Task
from sora_jax.config import REPA_CLASS_CHANNELS, REPA_MOTION_RADIUS, ConfigError, model_arch, task
from sora_jax.data.records import decode_clip
from sora_jax.eval.digit_reader import DigitReader, load_reader


def layer(cfg: ml_collections.ConfigDict) -> int:
    """``config.repa.layer``; 0 where the config has no ``repa`` group (configs saved before it) and for what
    REPA does not apply to (the VAE task, Wan: ``config.model.arch = wan``)."""
    if task(cfg) is not Task.T2V or model_arch(cfg) is not ModelArch.DIT:
        return 0
    return int(cfg.get("repa", {}).get("layer", 0))


@dataclasses.dataclass(frozen=True)
class RepaTerm:
    """The REPA term of the loss: ``targets`` from the frozen encoder's parameters (``frozen["repa"]``)."""

    graphdef: nnx.GraphDef  # of the encoder (a DigitReader)
    weight: float
    height: int  # the encoder's frame size: videos are block-averaged to it
    width: int
    first_frames: bool = False  # the encoder reads only the first frame of each temporal token group
    standardize: bool = False  # targets per channel to zero mean, unit variance over the batch's tokens
    classes: float = 0.0  # weight of the class term (which digit each token shows; 0: off)
    motion: float = 0.0  # weight of the motion term (how each token's content moves; 0: off)

    def _grey(self, video: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """video uint8 ``[B, T, H, W, 3]`` -> the encoder's grey frames ``[B, n, height, width]`` in [0, 1]."""
        b, t, h, w, _ = video.shape
        fh, fw = h // self.height, w // self.width
        if fh < 1 or h != fh * self.height or w != fw * self.width:
            raise ConfigError(
                f"config.repa: the digit reader reads {self.height}x{self.width} frames (or multiples), "
                f"the data has {h}x{w}"
            )
        if t % grid[0]:
            raise ConfigError(
                f"config.repa: {t} frames do not split into the DiT's {grid[0]} temporal token groups"
            )
        # first_frames: the encoder (most of REPA's cost) / pt
        step = t // grid[0] if self.first_frames else 1
        grey = video[:, ::step].astype(jnp.float32).mean(-1) / 255.0
        return grey.reshape(b, grey.shape[1], self.height, fh, self.width, fw).mean((3, 5))

    @staticmethod
    def _pool(fmap: jax.Array, grid: tuple[int, int, int], space: str) -> jax.Array:
        """``[B, n, H', W', C]`` -> ``[B, gt * gh * gw, C]`` in patch order: the mean over a token's frames and
        the ``space`` ("mean" or "sum") over its positions."""
        b, n, hh, ww, c = fmap.shape
        gt, gh, gw = grid
        if hh % gh or ww % gw:
            raise ConfigError(
                f"config.repa: the encoder's map [H', W'] = {(hh, ww)} does not pool to the DiT's token "
                f"grid {grid}: use a patch size that divides it"
            )
        blocks = fmap.reshape(b, gt, n // gt, gh, hh // gh, gw, ww // gw, c)
        blocks = blocks.mean((2, 4, 6)) if space == "mean" else blocks.mean(2).sum((3, 5))
        return blocks.reshape(b, gt * gh * gw, c)

    def encode(self, params: nnx.State, video: jax.Array, grid: tuple[int, int, int]) -> dict[str, jax.Array]:
        """video uint8 ``[B, T, H, W, 3]`` -> the frozen encoder's pass, pooled to the ``grid`` (gt, gh, gw) in
        patch order: ``{"repa_features": [B, N, D]}`` (its conv map, mean over each token's positions and
        frames), with ``classes`` > 0 also ``"repa_mass": [B, N, K]`` (the reader's class maps,
        ``DigitReader.class_maps``, summed over a token's positions: the share of digit k's presence there,
        averaged over its frames). What does not depend on the batch: ``precompute_table`` keeps it per clip."""
        encoder: DigitReader = nnx.merge(self.graphdef, params)
        grey = self._grey(video, grid)
        if not self.classes:
            return {
                "repa_features": self._pool(jax.lax.stop_gradient(encoder.feature_map(grey)), grid, "mean")
            }
        maps, fmap = jax.lax.stop_gradient(encoder.class_maps(grey))
        return {"repa_features": self._pool(fmap, grid, "mean"), "repa_mass": self._pool(maps, grid, "sum")}

    def finish(self, encoded: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array | None]:
        """``encode``'s output -> the targets: the features ``[B, N, D]`` (``standardize``: per channel over the
        batch's tokens) and with ``classes`` > 0 which digit each token shows, ``[B, N, K + 1]`` (the mass, the
        rest clipped at 0 as background, normalised to sum to 1), else None."""
        features = encoded["repa_features"]
        if self.standardize:  # the map's shared positive mean (GELU) would make any constant output align
            mean = features.mean((0, 1))
            features = (features - mean) * jax.lax.rsqrt(jnp.square(features - mean).mean((0, 1)) + 1e-6)
        if not self.classes:
            return features, None
        mass = encoded["repa_mass"]
        q = jnp.concatenate([mass, jnp.maximum(1.0 - mass.sum(-1, keepdims=True), 0.0)], -1)
        return features, q / jnp.maximum(q.sum(-1, keepdims=True), 1e-6)

    def targets(
        self, params: nnx.State, video: jax.Array, grid: tuple[int, int, int]
    ) -> tuple[jax.Array, jax.Array | None]:
        """video uint8 ``[B, T, H, W, 3]`` -> ``finish(encode(...))``: one encoder pass, the targets per token of
        the ``grid`` (gt, gh, gw) in patch order, ``[B, gt * gh * gw, D]`` and the class targets or None."""
        return self.finish(self.encode(params, video, grid))

    def loss(
        self,
        z: jax.Array,
        params: nnx.State,
        video: jax.Array,
        grid: tuple[int, int, int],
        encoded: dict[str, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The term added to the diffusion loss, from the projected tokens ``z [B, N, dim (+ K + 1)]`` and the
        clean video uint8 ``[B, T, H, W, 3]``: ``weight * (1 - cos)`` of the first ``dim`` channels and the
        features of ``targets``, plus with ``classes`` > 0 ``classes *`` the cross-entropy of the last K + 1
        (logits) against its classes. ``encoded``: the batch's ``encode`` output, precomputed per clip
        (``precompute_table``); None: the encoder runs here. Returns (the term, aux {"repa_cos"[,
        "repa_class_ce"]})."""
        features, classes = self.finish(self.encode(params, video, grid) if encoded is None else encoded)
        d = features.shape[-1]
        cos = alignment(z[..., :d], features).mean()
        term, aux = self.weight * (1.0 - cos), {"repa_cos": cos}
        if classes is not None:
            k = classes.shape[-1]
            logp = jax.nn.log_softmax(z[..., d : d + k].astype(jnp.float32), -1)
            ce = -jnp.sum(classes * logp, -1).mean()
            term, aux = term + self.classes * ce, aux | {"repa_class_ce": ce}
            d += k
        if self.motion:
            q, w = motion_targets(video, grid)
            logp = jax.nn.log_softmax(z[..., d : d + q.shape[-1]].astype(jnp.float32), -1)
            ce = jnp.sum(w * -jnp.sum(q * logp, -1)) / jnp.maximum(jnp.sum(w), 1.0)
            term, aux = term + self.motion * ce, aux | {"repa_motion_ce": ce}
        return term, aux


def motion_targets(
    video: jax.Array,
    grid: tuple[int, int, int],
    radius: int = REPA_MOTION_RADIUS,
    temperature: float = 0.05,
    min_ink: float = 4.0,
) -> tuple[jax.Array, jax.Array]:
    """How each token's content moves, by block matching on the clean clip: video uint8 ``[B, T, H, W, 3]`` ->
    (targets ``[B, N, (2r + 1)^2]``, weights ``[B, N]``) for the ``grid`` (gt, gh, gw) in patch order.

    For each frame t < T - 1 and shift s = (dy, dx) in ``[-radius, radius]^2`` (row-major, dy outer), the cost
    of a token is the sum over its pixels and its frames of ``|frame[t + 1](p + s) - frame[t](p)|`` (grey in [0,
    1], outside the frame 0); the target is ``softmax(-cost / (temperature * ink))`` with ink the token's sum of
    grey over those frames (so a shift that leaves a fraction of the ink unmatched costs that fraction / temperature),
    weighted 1 where ink >= ``min_ink`` (pixels' worth) and 0 elsewhere (empty tokens, the last frame, images).
    """
    g = video.astype(jnp.float32).mean(-1) / 255.0  # [B, T, H, W]
    b, t, h, w = g.shape
    gt, gh, gw = grid
    if t % gt or h % gh or w % gw:
        raise ConfigError(f"config.repa.motion: the clip [T, H, W] = {(t, h, w)} does not split into {grid}")
    pt, ph, pw = t // gt, h // gh, w // gw
    r = int(radius)
    s = (2 * r + 1) ** 2
    if t < 2:
        return jnp.full((b, gt * gh * gw, s), 1.0 / s), jnp.zeros((b, gt * gh * gw))
    cur = g[:, :-1]
    nxt = jnp.pad(g[:, 1:], ((0, 0), (0, 0), (r, r), (r, r)))
    cost = jnp.stack(
        [
            jnp.abs(nxt[:, :, r + dy : r + dy + h, r + dx : r + dx + w] - cur)
            for dy in range(-r, r + 1)
            for dx in range(-r, r + 1)
        ],
        -1,
    )  # [B, T - 1, H, W, S]
    cost = jnp.pad(cost, ((0, 0), (0, 1), (0, 0), (0, 0), (0, 0)))  # the last frame: no pair, no cost
    ink = jnp.pad(cur, ((0, 0), (0, 1), (0, 0), (0, 0)))
    cost = cost.reshape(b, gt, pt, gh, ph, gw, pw, s).sum((2, 4, 6)).reshape(b, gt * gh * gw, s)
    ink = ink.reshape(b, gt, pt, gh, ph, gw, pw).sum((2, 4, 6)).reshape(b, gt * gh * gw)
    q = jax.nn.softmax(-cost / (temperature * jnp.maximum(ink, 1e-3))[..., None], -1)
    return jax.lax.stop_gradient(q), (ink >= min_ink).astype(jnp.float32)


def alignment(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean cosine similarity per example: pred, target ``[B, N, D]`` -> ``[B]``."""
    p = pred.astype(jnp.float32)
    q = target.astype(jnp.float32)
    cos = jnp.sum(p * q, -1) * jax.lax.rsqrt(jnp.maximum(jnp.sum(p * p, -1) * jnp.sum(q * q, -1), 1e-12))
    return cos.mean(-1)


def token_grid(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(gt, gh, gw): the DiT's token grid over the config's clip (its latents / the patch size)."""
    t, h, w, _ = factory.latent_shape(cfg)
    pt, ph, pw = cfg.model.patch_size
    return t // pt, h // ph, w // pw


def precomputed(cfg: ml_collections.ConfigDict) -> bool:
    """``config.repa.precompute`` with REPA on: the encoder's pass is computed once per train clip
    (``precompute_table``) and read from the batch (``repa_features``, ``repa_mass``) instead of each step."""
    return bool(layer(cfg)) and bool(cfg.repa.get("precompute", False))


def batch_shapes(
    cfg: ml_collections.ConfigDict, batch_size: int
) -> dict[str, tuple[tuple[int, ...], object]]:
    """{key: (shape, dtype)} that the step's batch holds for a precomputed REPA term ({} without one)."""
    if not precomputed(cfg):
        return {}
    n = math.prod(token_grid(cfg))
    shapes = {"repa_features": ((batch_size, n, int(cfg.repa.dim)), jnp.float32)}
    if cfg.repa.get("classes", 0.0):
        shapes["repa_mass"] = ((batch_size, n, REPA_CLASS_CHANNELS - 1), jnp.float32)
    return shapes


def precompute_table(
    term: RepaTerm,
    params: nnx.State,
    source,
    grid: tuple[int, int, int],
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """``term.encode`` of every clip of ``source`` (a random-access source of clip records; train clips are
    read unchanged, so a clip's targets never change), in record order: {key: ``[len(source), N, C]``
    float32}. ``batch_size`` clips per jitted call (the last one padded)."""
    from tqdm.auto import tqdm

    encode = jax.jit(lambda p, v: term.encode(p, v, grid))
    n = len(source)
    table: dict[str, np.ndarray] = {}
    for lo in tqdm(range(0, n, batch_size), desc="REPA targets", unit="batch", disable=not progress):
        video = np.stack([decode_clip(source[i])["video"] for i in range(lo, min(lo + batch_size, n))])
        pad = batch_size - len(video)
        out = encode(params, np.concatenate([video, np.zeros((pad, *video.shape[1:]), video.dtype)]))
        for k, v in out.items():
            table.setdefault(k, np.zeros((n, *v.shape[1:]), np.float32))[lo : lo + len(video)] = np.asarray(
                v[: len(video)]
            )
    return table


def encoder_flops(cfg: ml_collections.ConfigDict) -> float:
    """Forward FLOPs of the REPA encoder per training step (its 3x3 convolutions on every frame of the batch, or
    on the first frame of each temporal token group with ``first_frames``; 0 when REPA is off or
    ``precomputed``: the step does not run it)."""
    if not layer(cfg) or precomputed(cfg):
        return 0.0
    rc = load_reader().cfg
    frames = cfg.data.batch_size * cfg.data.num_frames
    if cfg.repa.get("first_frames", False):
        frames //= int(cfg.model.patch_size[0])
    flops, c_in, h, w = 0.0, 1, rc.height, rc.width
    for c_out, stride in zip(rc.widths, rc.strides, strict=True):
        h, w = -(-h // stride), -(-w // stride)
        flops += 2.0 * 9 * c_in * c_out * h * w
        c_in = c_out
    return flops * frames


def until_step(cfg: ml_collections.ConfigDict) -> int | None:
    """The first step without the REPA term: ``repa.until`` (a fraction of ``train.num_steps``) < 1 turns it
    off there, as HASTE (Wang et al. 2025) does (measured on 2 CPU cores: the step after the switch is no
    faster, benchmarks/SPEEDRUN.md); None while it stays on (``repa.until`` 1, or REPA off)."""
    until = float(cfg.repa.get("until", 1.0)) if layer(cfg) else 1.0
    if not 0.0 < until <= 1.0:
        raise ConfigError(f"config.repa.until must be in (0, 1], got {until}")
    return None if until == 1.0 else round(until * cfg.train.num_steps)


def from_config(cfg: ml_collections.ConfigDict) -> tuple[RepaTerm | None, dict]:
    """The config's REPA term and its frozen parameters ``{"repa": encoder params}`` (``(None, {})`` when off)."""
    if not layer(cfg):
        return None, {}
    r = cfg.repa
    if DataContent(cfg.data.get("content", "video")) is not DataContent.VIDEO:
        raise ConfigError("config.repa needs the videos in the batch (config.data.content = 'video')")
    if not float(r.weight) > 0:
        raise ConfigError(f"config.repa.weight must be > 0 with config.repa.layer > 0, got {r.weight}")
    reader = load_reader()
    dim = reader.cfg.widths[-1]
    if int(r.dim) != dim:
        raise ConfigError(f"config.repa.dim = {r.dim}: the digit reader's features are {dim} wide")
    if reader.cfg.num_digits + 1 != REPA_CLASS_CHANNELS:
        raise ConfigError(
            f"config.repa.classes: the digit reader has {reader.cfg.num_digits} classes, the projector "
            f"{REPA_CLASS_CHANNELS - 1}"
        )
    graphdef, params = nnx.split(reader, nnx.Param)
    rc = reader.cfg
    term = RepaTerm(
        graphdef,
        float(r.weight),
        rc.height,
        rc.width,
        first_frames=bool(r.get("first_frames", False)),
        standardize=bool(r.get("standardize", False)),
        classes=float(r.get("classes", 0.0)),
        motion=float(r.get("motion", 0.0)),
    )
    return term, {"repa": params}
