"""Invisible video watermark: a keyed spread-spectrum pattern in the luma, detected blind with a p-value.

Owns the payload layout (``payload_bits``, ``bits_to_hex``), embedding (``embed``) and blind detection with a
calibrated p-value and payload decoding (``detect``). Pure numpy plus the standard library, with no sora_jax
imports: this file is copied as is into the PyTorch export folder, which has no JAX.

How it works
------------
Pattern. The key seeds one periodic tile of P x P pixels (P = ``Watermark.tile``, 96) written in the 2-D
Fourier domain: every rfft bin (u, v) of the tile with v >= 1 and 2 <= sqrt(u^2 + v^2) <= 15 cycles per
tile (``band``: periods of 48 to ~6.4 px, above the content's strongest frequencies and below the Nyquist
limit of a half-size copy; larger tiles, i.e. lower frequencies in pixels, measured better under H.264) gets
unit magnitude and a keyed random phase. The bins are split at random into a sync group (``sync_fraction``
of them) and ``n_bits`` payload groups; the bins of payload group k are multiplied by +1 or -1 for bit k.
Groups use disjoint bins, so they are exactly orthogonal. The inverse FFT is the tile (unit RMS); it is
repeated over the frame from the top-left corner and the same tile goes into every frame, scaled by
``strength`` (the RMS change in luma). The change is added equally to R, G and B, i.e. to the luma only.
Near black (white) the negative (positive) half of the pattern clips away at 0 (255); there the surviving
half is scaled by up to sqrt(2) (``_BOOST``, ramped in over the last 2 * strength levels), which keeps the
change's energy, hence the PSNR, that of an unclipped pattern while restoring ~70% of its linear part. By
default the pattern is uniform over the frame: the optional perceptual mask (``mask=True``: local luma
contrast, stronger on texture, weaker on flat areas, mean square 1 per frame) puts it on edges, where H.264
and the content residual hide it, and almost none on flat black, which made it undetectable in the demo
model's videos (white digits on black, 32x32 upscaled 4x).

Detection (no original needed). Per frame, subtract a 9x9 box blur from the luma and clip the residual to
+-1 level (``_CLIP``): content edges (the demo's blocky upscaled digits leave residuals of tens of levels in
a 9 px band) then weigh no more than the pattern does, a robust, nearly sign-only correlation. Average these
over frames (frame repeats, fps changes and trims only reweight the average) and for each candidate scale
s (``scales``: 1, 1/2, 2) fold the frame into one Q x Q tile, Q = sP (mean of all pixels congruent mod Q):
a crop only shifts the pattern cyclically, a resize by s changes its period to Q, while the bins keep their
(u, v) in cycles per tile.
The folded tile's spectrum is whitened to unit magnitude (phase only), multiplied by the conjugate sync
phases and inverse-transformed on a 2x oversampled grid: the cross-correlation at every half-pixel cyclic
shift, in one FFT. Its largest value over shifts, in units of its null standard deviation, is ``sync_z``.

Null model and p-value. After whitening every bin has unit magnitude; for an unmarked video the key's phases
are independent of the content (and of anything computed from the content alone, such as the clipped
residual), so the correlation at a shift is a sum of K (sync bins) cosines with independent uniform phases:
exactly mean 0, variance K/2 (we divide by sqrt(K/2)) and, with K = 168, close to Gaussian (with lighter
tails, so the p-value errs conservative). The maximum over the correlated shifts is
treated as the maximum of N_EFF independent standard normals: p_sync = 1 - (1 - Phi_c(z))^N_EFF, N_EFF fitted
once by Monte Carlo of this exact null (random phases, all three tile sizes; see ``_N_EFF``); the scales are
folds with different periods, nearly independent, combined by Sidak (1 - (1 - min p)^(scales tried)).
The payload groups add evidence: at the chosen shift (picked from the sync bins alone, whose phases are
independent of theirs) each group's correlation over sqrt(n_k / 2) is again a null standard normal whatever
the bit, so their sum of squares is chi^2 with n_bits dof, giving p_bits. Fisher's method combines the two
independent p-values: score = -2 ln(p_sync p_bits), chi^2 with 4 dof under the null, and p_value is its
tail. A video is marked when p < ``threshold`` (1e-6 by default, i.e. score > 33.4).

Payload. At the peak shift (refined to a quarter pixel) bit k is the sign of its group's correlation; its
confidence is the posterior probability of that sign under a Gaussian channel whose per-bin amplitude is
estimated from the sync correlation.

Measured. The demo model's own videos (benchmarks/watermark_demo.py, 24 test captions, 32x32 x 8 frames
written as ``sora-jax sample`` writes them: 4x nearest to 128x128, marked, H.264 CRF 18; PSNR 41.1 dB): 100%
detected after the write with 98.7% of payload bits right (the previous mask + plain box-blur detector: 0%,
61.5%); after a further edit: CRF 23 100%, CRF 28 95.8%, half size 95.8%, 10% crop 100%, 8 -> 24 fps 100%,
trim 95.8% (bits 93-97%), all combined 0%; no false positive on the unmarked generated videos nor on 24 real
test clips written the same way; digit-reader adherence of marked vs unmarked MP4s unchanged (+0.0000).
Synthetic content (benchmarks/watermark.py, 200 videos per size, results/watermark.json): at 256x256 every
single edit (H.264 CRF 23 / 28, half size, 10% crop, 8 -> 24 fps, trim) is detected in 100% of videos with
>= 99.9% of payload bits right and no false positive, PSNR 40.8 dB; all edits combined: 16%. At 128x128
(32x32 upscaled 4x) the single edits give 97-99.5%, except H.264 CRF 28 (64%: 100% of digits on smooth
texture and of smooth gradients, 40% of panning 1/f texture, 16% of digits on 1/f texture with grain: on
busy texture the clipped residual is nearly sign-only and loses to a linear one); combined edits there (a
56x56 CRF 28 copy) are not detected.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math

import numpy as np

__all__ = ["Detection", "Watermark", "bits_to_hex", "detect", "embed", "payload_bits"]

PROJECT_KEY = 0x50_2A_20_26  # the fixed key sora_jax marks its videos with
_MIN_SIZE = 32  # smallest H, W accepted
_BLUR = 9  # box blur width (px) of the detector's high-pass
_CLIP = 1.0  # the detector clips each frame's high-pass residual to +-_CLIP luma levels (robust to edges)
_BOOST = math.sqrt(2)  # gain of the surviving half of the pattern where black / white clips the other half
_MASK_WIN = 7  # window (px) of the local-contrast mask
_MASK_FLOOR = 3.0  # luma std added to the local contrast so flat areas keep a little of the pattern
# effective number of independent shifts searched in a fold of Q px (a 2Q x 2Q grid of half-pixel shifts):
# a Monte Carlo fit of the exact null (K = 84 and 134 random-phase sync bins in the default band; 3e3 - 4e4 draws
# per Q, matched at the 0.5 - 0.99 quantiles of the maximum, rounded up). It depends on how finely the grid
# samples the band (2Q points per tile), not on K; for another band it is scaled by the band's area.
_N_EFF = {32: 2900.0, 48: 4300.0, 64: 5000.0, 96: 5800.0, 128: 6000.0, 192: 7000.0}
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class Watermark:
    """The watermark's settings; embed and detect must use the same ``key``, ``tile``, ``band``, ``n_bits``
    and ``sync_fraction``.

    key: seed of the pattern (the project's fixed key by default). strength: RMS change of the luma, in uint8
    levels (2.3 gives PSNR ~ 40.8 dB). tile: period P of the pattern in pixels at the embedding size (a
    multiple of 4). scales: resize factors the detector searches (s * tile must be a whole number of pixels
    and at least tile/2). band: (lo, hi) radius of the pattern's bins in cycles per tile (hi below half of
    the smallest s * tile). n_bits: payload bits. sync_fraction: share of the pattern's bins used for detection
    (the rest carry the payload). threshold: p-value below which ``detect`` says detected. mask: shape the
    pattern by local contrast (embedding only; off by default, see the module docstring).
    """

    key: int = PROJECT_KEY
    strength: float = 2.3
    tile: int = 96
    scales: tuple[float, ...] = (1.0, 0.5, 2.0)
    n_bits: int = 32
    sync_fraction: float = 0.5
    threshold: float = 1e-6
    mask: bool = False
    band: tuple[int, int] = (2, 15)

    def __post_init__(self):
        if self.tile < 16 or self.tile % 4:
            raise ValueError(f"Watermark.tile must be a multiple of 4 and >= 16, got {self.tile}")
        if not self.scales:
            raise ValueError("Watermark.scales must name at least one scale, got ()")
        for s in self.scales:
            q = s * self.tile
            if abs(q - round(q)) > 1e-9 or q < self.tile / 2:
                raise ValueError(
                    f"Watermark.scales: {s} * tile {self.tile} must be a whole number >= tile/2, got {q}"
                )
        lo, hi = self.band
        if not 1 <= lo < hi < min(self.scales) * self.tile / 2:
            raise ValueError(
                f"Watermark.band must satisfy 1 <= lo < hi < min(scales) * tile / 2, got {self.band}"
            )
        if not self.strength > 0:
            raise ValueError(f"Watermark.strength must be > 0, got {self.strength}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"Watermark.threshold must be in (0, 1), got {self.threshold}")
        if not 0 < self.sync_fraction < 1:
            raise ValueError(f"Watermark.sync_fraction must be in (0, 1), got {self.sync_fraction}")
        n = len(_templates(self.key, self.tile, self.n_bits, self.sync_fraction, self.band).u)
        if self.n_bits < 1 or (1 - self.sync_fraction) * n < 3 * self.n_bits:
            raise ValueError(
                f"Watermark.n_bits must be >= 1 and leave >= 3 of the tile's {n} bins per bit, got {self.n_bits}"
            )


@dataclasses.dataclass(frozen=True)
class Detection:
    """What ``detect`` found.

    detected: p_value < threshold. score: Fisher's -2 ln(p_sync p_bits), chi^2 with 4 dof for an unmarked
    video. p_value: probability that an unmarked video scores at least this high (may underflow to 0; see
    log10_p). sync_z: the sync correlation peak in null standard deviations at the best scale. bits: uint8
    [n_bits] decoded payload (meaningful only when detected). bit_confidence: float [n_bits] in [0.5, 1],
    the posterior probability of each decoded bit. scale, shift: the resize factor and (dy, dx) cyclic shift in
    pixels of the folded tile where the pattern was found.
    """

    detected: bool
    score: float
    p_value: float
    log10_p: float
    sync_z: float
    bits: np.ndarray
    bit_confidence: np.ndarray
    scale: float
    shift: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class _Templates:
    u: np.ndarray  # int [n] signed row frequency of each bin, cycles per tile
    v: np.ndarray  # int [n] column frequency, 1 <= v
    phase: np.ndarray  # float [n] keyed phase
    group: np.ndarray  # int [n] 0 = sync, k + 1 = payload bit k


@functools.lru_cache(maxsize=16)
def _templates(key: int, tile: int, n_bits: int, sync_fraction: float, band: tuple[int, int]) -> _Templates:
    """The keyed band bins of a tile of ``tile`` px, their phases and their groups."""
    lo, hi = band
    u, v = np.meshgrid(np.arange(-hi, hi + 1), np.arange(1, hi + 1), indexing="ij")
    radius = np.hypot(u, v)
    keep = (radius >= lo) & (radius <= hi)
    u, v = u[keep], v[keep]
    rng = np.random.default_rng([key & 0xFFFFFFFF, tile, 0x574D])
    phase = rng.uniform(0, 2 * np.pi, u.size)
    order = rng.permutation(u.size)
    n_sync = int(round(sync_fraction * u.size))
    group = np.empty(u.size, np.int64)
    group[order[:n_sync]] = 0
    group[order[n_sync:]] = 1 + np.arange(u.size - n_sync) % max(n_bits, 1)
    return _Templates(u, v, phase, group)


def payload_bits(model_id: str, run_id: str) -> np.ndarray:
    """uint8 [32] payload: 16 bits of BLAKE2b(model_id) then 16 bits of BLAKE2b(run_id), most significant
    bit first (``bits_to_hex`` prints it as 'mmmm-rrrr'). A 16-bit hash identifies a model or run among a
    known list (1 in 65,536 chance of a collision), not an arbitrary string."""
    out = []
    for text in (model_id, run_id):
        word = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=2).digest(), "big")
        out += [(word >> (15 - i)) & 1 for i in range(16)]
    return np.asarray(out, np.uint8)


def bits_to_hex(bits: np.ndarray) -> str:
    """bits [N] of 0/1, most significant first -> hex, in groups of 16 bits: 'mmmm-rrrr' for a 32-bit payload."""
    bits = np.asarray(bits).astype(np.int64).ravel()
    if bits.size == 0 or np.any((bits != 0) & (bits != 1)):
        raise ValueError(f"bits_to_hex: bits must be a non-empty array of 0/1, got {bits.tolist()}")
    words = []
    for start in range(0, bits.size, 16):
        chunk = bits[start : start + 16]
        value = int("".join(map(str, chunk)), 2)
        words.append(f"{value:0{(chunk.size + 3) // 4}x}")
    return "-".join(words)


def _check_video(video, fn: str) -> np.ndarray:
    if (
        not isinstance(video, np.ndarray)
        or video.dtype != np.uint8
        or video.ndim != 4
        or video.shape[-1] != 3
    ):
        got = f"{video.dtype} {video.shape}" if isinstance(video, np.ndarray) else type(video).__name__
        raise ValueError(f"{fn}: video must be a uint8 numpy array [T, H, W, 3], got {got}")
    t, h, w, _ = video.shape
    if t < 1 or h < _MIN_SIZE or w < _MIN_SIZE:
        raise ValueError(f"{fn}: video needs T >= 1 and H, W >= {_MIN_SIZE}, got [T, H, W] = [{t}, {h}, {w}]")
    return video


def _tile_pattern(wm: Watermark, bits: np.ndarray) -> np.ndarray:
    """float32 [P, P], unit RMS: the sync bins plus the payload bins signed by ``bits``."""
    tpl = _templates(wm.key, wm.tile, wm.n_bits, wm.sync_fraction, wm.band)
    signs = np.concatenate([[1.0], 2.0 * bits - 1.0])[tpl.group]
    spectrum = np.zeros((wm.tile, wm.tile // 2 + 1), np.complex128)
    spectrum[tpl.u % wm.tile, tpl.v] = signs * np.exp(1j * tpl.phase)
    tile = np.fft.irfft2(spectrum, s=(wm.tile, wm.tile))
    return (tile / np.sqrt(np.mean(tile**2))).astype(np.float32)


def _box_mean(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over a k x k window (k odd, edges replicated) of the last two axes of x [..., H, W]."""
    r = k // 2
    pad = [(0, 0)] * (x.ndim - 2) + [(r + 1, r), (r + 1, r)]
    c = np.pad(x.astype(np.float64), pad, mode="edge").cumsum(-2).cumsum(-1)
    s = c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]
    return s / (k * k)


def _mask(luma: np.ndarray) -> np.ndarray:
    """luma float32 [T, H, W] -> float32 [T, H, W]: local contrast + a floor, mean square 1 per frame."""
    mean = _box_mean(luma, _MASK_WIN)
    var = np.maximum(_box_mean(luma * luma, _MASK_WIN) - mean * mean, 0)
    m = np.sqrt(var) + _MASK_FLOOR
    return (m / np.sqrt(np.mean(m * m, axis=(1, 2), keepdims=True))).astype(np.float32)


def embed(video: np.ndarray, bits, wm: Watermark = Watermark()) -> np.ndarray:
    """Marks video uint8 [T, H, W, 3] (H, W >= 32) with ``bits`` [n_bits] of 0/1 -> uint8 [T, H, W, 3]."""
    video = _check_video(video, "embed")
    bits = np.asarray(bits)
    if bits.shape != (wm.n_bits,) or np.any((bits != 0) & (bits != 1)):
        raise ValueError(
            f"embed: bits must be {wm.n_bits} values of 0/1, got shape {bits.shape} with values {np.unique(bits)[:4]}"
        )
    _, h, w, _ = video.shape
    p = wm.tile
    tile = _tile_pattern(wm, bits.astype(np.float64))
    pattern = np.tile(tile, (-(-h // p), -(-w // p)))[:h, :w]
    x = video.astype(np.float32)
    delta = wm.strength * pattern
    if wm.mask:
        delta = delta * _mask(x @ _LUMA)
    else:
        delta = np.broadcast_to(delta, x.shape[:3])
    # near black (white) the negative (positive) half of the pattern clips away; there, scale the surviving
    # half by _BOOST (sqrt 2 keeps the change's energy, hence the PSNR, that of an unclipped pattern)
    # a positive change survives where its negative counterpart clips at black: its gain depends on the
    # levels above black; a negative change's on the levels below white
    room = np.where(delta > 0, x.min(-1), 255 - x.max(-1))
    near = np.clip(1 - room / (2 * wm.strength), 0, 1)
    delta = delta * (1 + (_BOOST - 1) * near)
    return np.clip(np.rint(x + delta[..., None]), 0, 255).astype(np.uint8)


def _fold(plane: np.ndarray, q: int) -> np.ndarray:
    """plane float [H, W] -> float [q, q]: the mean of all pixels with the same (y mod q, x mod q)."""
    h, w = plane.shape
    hp, wp = -(-h // q) * q, -(-w // q) * q
    sums = np.zeros((hp, wp), np.float64)
    sums[:h, :w] = plane
    counts = np.zeros((hp, wp), np.float64)
    counts[:h, :w] = 1
    sums = sums.reshape(hp // q, q, wp // q, q).sum((0, 2))
    counts = counts.reshape(hp // q, q, wp // q, q).sum((0, 2))
    return sums / np.maximum(counts, 1)


def _log_sf(z: float) -> float:
    """log P(N(0,1) > z), accurate far in the tail."""
    if z < 5:
        return math.log(max(0.5 * math.erfc(z / math.sqrt(2)), 1e-300))
    return -0.5 * z * z - math.log(z * math.sqrt(2 * math.pi)) + math.log1p(-1 / (z * z) + 3 / z**4)


def _log_union(log_q: float, n: float) -> float:
    """log(1 - (1 - q)^n): the log probability that at least one of n independent events of probability q
    happens (the maximum of n null statistics, Sidak)."""
    if n * math.exp(log_q) < 1e-8:
        return math.log(n) + log_q
    return math.log(-math.expm1(n * math.log1p(-min(math.exp(log_q), 1 - 1e-16))))


def _log_chi2_sf(x: float, dof: int) -> float:
    """log P(chi^2_dof > x), exact (finite sums of the incomplete gamma function for integer dof)."""
    h = max(x, 0.0) / 2
    if dof % 2 == 0:
        terms = [
            j * math.log(h) - math.lgamma(j + 1) if h > 0 else (0.0 if j == 0 else -math.inf)
            for j in range(dof // 2)
        ]
        return min(-h + float(np.logaddexp.reduce(terms)), 0.0)
    head = math.log(max(math.erfc(math.sqrt(h)), 1e-300))
    terms = [(j + 0.5) * math.log(h) - math.lgamma(j + 1.5) - h for j in range((dof - 1) // 2) if h > 0]
    return min(float(np.logaddexp.reduce([head, *terms])), 0.0)


def _n_eff(q: int, band: tuple[int, int]) -> float:
    """Effective number of independent shifts searched in a fold of q px (``_N_EFF``, interpolated in log q)."""
    keys = sorted(_N_EFF)
    n = np.interp(math.log(q), np.log(keys), [_N_EFF[k] for k in keys])
    return float(n) * max(band[1] ** 2 - band[0] ** 2, 1) / (15**2 - 2**2)


def _corr_at(x: np.ndarray, u: np.ndarray, v: np.ndarray, q: int, dy: float, dx: float) -> float:
    """Sum over bins of Re(x e^{2 pi i (u dy + v dx) / q}): the correlation at shift (dy, dx) px."""
    return float(np.sum((x * np.exp(2j * np.pi * (u * dy + v * dx) / q)).real))


def detect(video: np.ndarray, wm: Watermark = Watermark()) -> Detection:
    """Looks for the watermark in video uint8 [T, H, W, 3] (H, W >= 32), without the original."""
    video = _check_video(video, "detect")
    tpl = _templates(wm.key, wm.tile, wm.n_bits, wm.sync_fraction, wm.band)
    plane = np.zeros(video.shape[1:3], np.float64)
    # high-pass each frame, clip (edges and texture then count no more than the pattern), average
    for frame in video:
        luma = frame.astype(np.float32) @ _LUMA
        plane += np.clip(luma - _box_mean(luma, _BLUR), -_CLIP, _CLIP)
    plane /= len(video)
    sync = tpl.group == 0
    n_sync = int(sync.sum())
    best = None
    tried = 0
    for s in wm.scales:
        q = int(round(s * wm.tile))
        if min(plane.shape) < q // 2:
            continue
        tried += 1
        spec = np.fft.rfft2(_fold(plane, q))[tpl.u % q, tpl.v]
        mag = np.abs(spec)
        # phase only; bins below 1e-6 luma levels (float dust of a flat frame) count as empty
        white = np.where(mag > 1e-6 * q * q, spec / np.maximum(mag, 1e-30), 0)
        x = white * np.exp(-1j * tpl.phase)  # conj(template) * whitened spectrum, per bin
        grid = np.zeros((2 * q, q + 1), np.complex128)
        grid[tpl.u[sync] % (2 * q), tpl.v[sync]] = x[sync]
        corr = np.fft.irfft2(grid, s=(2 * q, 2 * q)) * (2 * q) ** 2 / 2  # [2q, 2q] at half-pixel shifts
        peak = int(np.argmax(corr))
        z = float(corr.flat[peak]) / math.sqrt(n_sync / 2)
        log_p = _log_union(_log_sf(z), _n_eff(q, wm.band))
        if best is None or log_p < best[0]:
            best = (log_p, z, s, q, x, divmod(peak, 2 * q))
    if best is None:  # cannot happen for H, W >= 32 unless every scale is > 2x the frame
        raise ValueError(f"detect: frame {plane.shape} is smaller than half of every tile size searched")
    log_p_scale, z, s, q, x, (my, mx) = best
    log_p_sync = _log_union(log_p_scale, tried)  # Sidak over the scales
    # refine the peak to a quarter pixel, then read each payload group's correlation there
    us, vs = tpl.u[sync], tpl.v[sync]
    cands = [(my / 2 + a, mx / 2 + b) for a in (-0.25, 0, 0.25) for b in (-0.25, 0, 0.25)]
    dy, dx = max(cands, key=lambda d: _corr_at(x[sync], us, vs, q, *d))
    amp = _corr_at(x[sync], us, vs, q, dy, dx) / n_sync  # mean cos per sync bin, ~ the signal per bin
    terms = (x * np.exp(2j * np.pi * (tpl.u * dy + tpl.v * dx) / q)).real
    corr_bits = np.bincount(tpl.group, weights=terms, minlength=wm.n_bits + 1)[1:]
    llr = 4 * max(amp, 0.0) * np.abs(corr_bits)  # log-likelihood ratio of the decoded sign (noise var n/2)
    # payload energy at that shift: sum of squared z of the groups, chi^2 with n_bits dof under the null
    # (the shift and scale were chosen from the sync bins only, whose phases are independent of these)
    n_group = np.bincount(tpl.group, minlength=wm.n_bits + 1)[1:]
    chi2 = float(np.sum(corr_bits**2 / (n_group / 2)))
    log_p_bits = _log_chi2_sf(chi2, wm.n_bits)
    fisher = -2 * (log_p_sync + log_p_bits)  # chi^2 with 4 dof under the null
    log_p = _log_chi2_sf(fisher, 4)
    return Detection(
        detected=bool(log_p < math.log(wm.threshold)),
        score=fisher,
        p_value=math.exp(log_p),
        log10_p=log_p / math.log(10),
        sync_z=z,
        bits=(corr_bits > 0).astype(np.uint8),
        bit_confidence=1 / (1 + np.exp(-llr)),
        scale=float(s),
        shift=(float(dy) % q, float(dx) % q),
    )
