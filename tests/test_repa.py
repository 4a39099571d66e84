"""REPA (sora_jax/train/repa.py): the encoder targets against a numpy pooling of the reader's map, the
alignment against scipy's cosine distance, the DiT's features path, the config checks and a training run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.spatial import distance

from sora_jax import config as config_lib
from sora_jax import factory
from sora_jax.config import ConfigError
from sora_jax.eval.digit_reader import load_reader
from sora_jax.models import dit as dit_lib
from sora_jax.train import repa
from sora_jax.train.loop import train

QUICK = "configs/quickstart.py"


def test_targets_pool_the_readers_map_to_the_token_grid():
    cfg = config_lib.load_config(QUICK, ["repa.layer=2"])
    term, frozen = repa.from_config(cfg)
    video = np.random.default_rng(0).integers(0, 256, (2, 8, 64, 64, 3), dtype=np.uint8)  # 2x the reader's
    # reference: grey in [0, 1], 2x2 block mean to 32x32, the reader's conv map, then the mean over 2x2x2 blocks
    grey = video.astype(np.float64).mean(-1).reshape(2, 8, 32, 2, 32, 2).mean((3, 5)) / 255.0
    fmap = np.asarray(load_reader().feature_map(jnp.asarray(grey, jnp.float32)))  # [2, 8, 8, 8, 96]
    want = fmap.reshape(2, 4, 2, 4, 2, 4, 2, 96).mean((2, 4, 6)).reshape(2, 64, 96)
    got = np.asarray(term.targets(frozen["repa"], jnp.asarray(video), (4, 4, 4))[0])
    assert got.shape == (2, 64, 96)
    assert term.targets(frozen["repa"], jnp.asarray(video), (4, 4, 4))[1] is None  # no class term
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # first_frames: frames 0, 2, 4, 6 alone (the first of each temporal token group)
    first = repa.from_config(config_lib.load_config(QUICK, ["repa.layer=2", "repa.first_frames=True"]))[0]
    want_first = fmap[:, ::2].reshape(2, 4, 4, 2, 4, 2, 96).mean((3, 5)).reshape(2, 64, 96)
    got_first = np.asarray(first.targets(frozen["repa"], jnp.asarray(video), (4, 4, 4))[0])
    np.testing.assert_allclose(got_first, want_first, rtol=1e-4, atol=1e-5)
    standardized = repa.from_config(config_lib.load_config(QUICK, ["repa.layer=2", "repa.standardize=True"]))[
        0
    ]
    got_std = np.asarray(standardized.targets(frozen["repa"], jnp.asarray(video), (4, 4, 4))[0])
    flat = want.reshape(-1, 96)
    np.testing.assert_allclose(
        got_std, (want - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-6), rtol=1e-3, atol=1e-3
    )
    with pytest.raises(ConfigError, match="token grid"):
        term.targets(frozen["repa"], jnp.asarray(video), (4, 3, 4))


def test_alignment_is_the_mean_cosine_similarity():
    r = np.random.default_rng(1)
    p, q = r.standard_normal((2, 5, 7)), r.standard_normal((2, 5, 7))
    want = [np.mean([1.0 - distance.cosine(p[b, n], q[b, n]) for n in range(5)]) for b in range(2)]
    np.testing.assert_allclose(np.asarray(repa.alignment(jnp.asarray(p), jnp.asarray(q))), want, rtol=1e-5)


def test_dit_features_path_keeps_the_output_and_counts_its_parameters():
    cfg = dit_lib.dit_config("smoke", depth=3, repa_layer=2, repa_dim=5)
    model = dit_lib.DiT(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))  # zero-initialised paths become live
    model = nnx.merge(
        graphdef,
        jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]),
    )
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((2, 2, 8, 8, 3)), jnp.float32)
    t = jnp.asarray([10.0, 700.0])
    text = jnp.asarray(r.standard_normal((2, 4, cfg.text_dim)), jnp.float32)
    mask = jnp.ones((2, 4), bool)
    out, z = model(x, t, text, mask, features=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(x, t, text, mask)), rtol=1e-5, atol=1e-6)
    assert z.shape == (2, 2 * 2 * 2, 5)
    # z is the projector on the tokens after block 2: a depth-2 model with the first two blocks gives the same
    short_cfg = dit_lib.dit_config("smoke", depth=2, repa_layer=2, repa_dim=5)
    short = dit_lib.DiT(short_cfg, rngs=nnx.Rngs(0))
    full = nnx.state(model)
    part = nnx.state(short)
    part["blocks"] = jax.tree.map(lambda a: a[:2], full["blocks"])
    for name in ("x_embedder", "t_embedder", "y_embedder", "repa_proj", "final_layer"):
        part[name] = full[name]
    nnx.update(short, part)
    np.testing.assert_allclose(
        np.asarray(short(x, t, text, mask, features=True)[1]), np.asarray(z), rtol=1e-5, atol=1e-6
    )
    counted = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert counted == dit_lib.param_count(cfg)
    assert dit_lib.repa_flops_per_token(cfg) == 2 * (2 * 32 * 32 + 4 * 32 * 32 + 2 * 32 * 5)
    plain = dit_lib.DiT(dit_lib.dit_config("smoke"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="repa_layer"):
        plain(x, t, text, mask, features=True)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["repa.layer=5"], "depth = 4"),
        (["repa.layer=1", "repa.weight=0.0"], "weight > 0"),
    ],
)
def test_config_checks(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_lib.validate(config_lib.load_config(QUICK, overrides))


def test_encoder_width_must_match():
    cfg = config_lib.load_config(QUICK, ["repa.layer=1", "repa.dim=64"])
    with pytest.raises(ConfigError, match="96 wide"):
        repa.from_config(cfg)


def test_training_with_repa_raises_the_alignment(tmp_path):
    """The smoke_eval config (32x32 clips the reader reads) with REPA after block 1: the projector is in the
    state, the loss logs repa_cos, and 24 steps raise it by more than 0.1."""
    cfg = config_lib.load_config(
        f"{QUICK}:smoke_eval", ["repa.layer=1", "train.num_steps=24", "train.log_every=4"]
    )
    assert factory.model_config(cfg).repa_layer == 1
    train(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    cos = [r["repa_cos"] for r in rows if "repa_cos" in r]
    assert len(cos) == 6
    assert cos[-1] > cos[0] + 0.1, cos  # measured: 0.015 -> 0.204


def test_class_targets_pool_the_readers_class_maps():
    """The class term's targets against a numpy pooling of ``DigitReader.class_maps`` (each map sums to the
    reader's own presence probability, read through ``__call__``) on real two-digit clips."""
    from sora_jax.data import moving_digits

    cfg = config_lib.load_config(QUICK, ["repa.layer=2", "repa.classes=0.5"])
    term, frozen = repa.from_config(cfg)
    assert term.classes == 0.5 and factory.model_config(cfg).repa_dim == 96 + config_lib.REPA_CLASS_CHANNELS
    clips = moving_digits.generate("test", 6, seed=3)
    grey = jnp.asarray(clips["video"].astype(np.float32).mean(-1) / 255.0)
    reader = load_reader()
    maps, fmap = (np.asarray(a) for a in reader.class_maps(grey))  # [6, 8, 8, 8, 10], [..., 96]
    np.testing.assert_allclose(fmap, np.asarray(reader.feature_map(grey)), rtol=1e-5, atol=1e-6)
    presence = np.asarray(jax.nn.sigmoid(reader(grey)[0]))
    np.testing.assert_allclose(maps.sum((2, 3)), np.repeat(presence[:, None], 8, 1), rtol=1e-4, atol=1e-5)
    mass = maps.reshape(6, 4, 2, 4, 2, 4, 2, 10).mean(2).sum((3, 5)).reshape(6, 64, 10)
    q = np.concatenate([mass, np.maximum(1.0 - mass.sum(-1, keepdims=True), 0.0)], -1)
    want = q / q.sum(-1, keepdims=True)
    feats, classes = term.targets(frozen["repa"], jnp.asarray(clips["video"]), (4, 4, 4))
    want_feats = fmap.reshape(6, 4, 2, 4, 2, 4, 2, 96).mean((2, 4, 6)).reshape(6, 64, 96)
    np.testing.assert_allclose(np.asarray(feats), want_feats, rtol=1e-4, atol=1e-5)  # the same encoder pass
    got = np.asarray(classes)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the token holding most of a shown digit's mass names that digit
    for b in range(6):
        for d in clips["digits"][b][clips["digits"][b] >= 0]:
            assert got[b, got[b, :, d].argmax()].argmax() == d


def test_loss_adds_the_class_cross_entropy():
    cfg = config_lib.load_config(QUICK, ["repa.layer=2", "repa.weight=0.5", "repa.classes=0.25"])
    term, frozen = repa.from_config(cfg)
    video = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 8, 32, 32, 3), dtype=np.uint8))
    z = jnp.asarray(np.random.default_rng(3).standard_normal((2, 64, 107)), jnp.float32)
    got, aux = term.loss(z, frozen["repa"], video, (4, 4, 4))
    feats, q = (np.asarray(a) for a in term.targets(frozen["repa"], video, (4, 4, 4)))
    zn = np.asarray(z, np.float64)
    cos = np.mean([1.0 - distance.cosine(zn[b, n, :96], feats[b, n]) for b in range(2) for n in range(64)])
    logits = zn[..., 96:]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -(q * logp).sum(-1).mean()
    np.testing.assert_allclose(float(aux["repa_cos"]), cos, rtol=1e-4)
    np.testing.assert_allclose(float(aux["repa_class_ce"]), ce, rtol=1e-4)
    np.testing.assert_allclose(float(got), 0.5 * (1.0 - cos) + 0.25 * ce, rtol=1e-4)
    with pytest.raises(ConfigError, match="classes >= 0"):
        config_lib.validate(config_lib.load_config(QUICK, ["repa.classes=-1.0"]))


def _motion_reference(video: np.ndarray, grid, r=3, temperature=0.05, min_ink=4.0):
    """Loops over tokens, frames and shifts in numpy (float64): the motion targets and weights."""
    g = video.astype(np.float64).mean(-1) / 255.0
    b, t, h, w = g.shape
    gt, gh, gw = grid
    pt, ph, pw = t // gt, h // gh, w // gw
    shifts = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    q = np.zeros((b, gt * gh * gw, len(shifts)))
    wt = np.zeros((b, gt * gh * gw))
    for i in range(b):
        for n, (a, y, x) in enumerate(np.ndindex(gt, gh, gw)):
            cost, ink = np.zeros(len(shifts)), 0.0
            for f in range(a * pt, min((a + 1) * pt, t - 1)):
                for yy in range(y * ph, (y + 1) * ph):
                    for xx in range(x * pw, (x + 1) * pw):
                        ink += g[i, f, yy, xx]
                        for k, (dy, dx) in enumerate(shifts):
                            inside = 0 <= yy + dy < h and 0 <= xx + dx < w
                            nxt = g[i, f + 1, yy + dy, xx + dx] if inside else 0.0
                            cost[k] += abs(nxt - g[i, f, yy, xx])
            logits = -cost / (temperature * max(ink, 1e-3))
            e = np.exp(logits - logits.max())
            q[i, n], wt[i, n] = e / e.sum(), float(ink >= min_ink)
    return q, wt


def test_motion_targets_match_a_loop_reference_and_read_the_true_motion():
    """``motion_targets`` against a per-token numpy loop on random clips, and on real moving-digit clips the
    most likely shift of the first frames' inked tokens points the way the caption says."""
    from sora_jax.data import moving_digits

    video = np.random.default_rng(4).integers(0, 256, (1, 4, 8, 8, 3), dtype=np.uint8)
    for grid in ((2, 2, 2), (4, 2, 4)):  # two frames per token, and one (the last group without a pair)
        q, w = (np.asarray(a) for a in repa.motion_targets(jnp.asarray(video), grid))
        want_q, want_w = _motion_reference(video, grid)
        np.testing.assert_allclose(q, want_q, rtol=1e-3, atol=1e-5)
        np.testing.assert_array_equal(w, want_w)
    assert not want_w.reshape(4, 8)[-1].any()  # no next frame for the last frame's tokens

    clips = moving_digits.generate("train", 16, seed=5, speed=(1.0, 2.0), two_fraction=0.0)
    q, w = (np.asarray(a) for a in repa.motion_targets(jnp.asarray(clips["video"]), (4, 4, 4)))
    shifts = np.array([(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)], float)
    for i in range(16):
        first = w[i, :16] > 0  # the first temporal group, before any bounce
        mean = (q[i, :16][first][..., None] * shifts).sum(-2).mean(0)
        want = moving_digits.DIRECTION_VECTORS[clips["directions"][i, 0]]
        np.testing.assert_array_equal(np.sign(np.round(mean, 1)), np.sign(np.round(want, 1)))


def test_loss_adds_the_motion_cross_entropy():
    cfg = config_lib.load_config(QUICK, ["repa.layer=2", "repa.weight=0.5", "repa.motion=0.3"])
    term, frozen = repa.from_config(cfg)
    assert factory.model_config(cfg).repa_dim == 96 + config_lib.REPA_MOTION_CHANNELS
    video = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 8, 32, 32, 3), dtype=np.uint8))
    z = jnp.asarray(np.random.default_rng(3).standard_normal((2, 64, 96 + 49)), jnp.float32)
    got, aux = term.loss(z, frozen["repa"], video, (4, 4, 4))
    feats = np.asarray(term.targets(frozen["repa"], video, (4, 4, 4))[0])
    q, w = _motion_reference(np.asarray(video), (4, 4, 4))
    zn = np.asarray(z, np.float64)
    cos = np.mean([1.0 - distance.cosine(zn[b, n, :96], feats[b, n]) for b in range(2) for n in range(64)])
    logits = zn[..., 96:]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = (w * -(q * logp).sum(-1)).sum() / w.sum()
    np.testing.assert_allclose(float(aux["repa_motion_ce"]), ce, rtol=1e-4)
    np.testing.assert_allclose(float(got), 0.5 * (1.0 - cos) + 0.3 * ce, rtol=1e-4)
    with pytest.raises(ConfigError, match="motion >= 0"):
        config_lib.validate(config_lib.load_config(QUICK, ["repa.motion=-1.0"]))


@pytest.mark.parametrize("classes", [0.0, 0.5])
def test_precomputed_targets_train_as_the_encoder_in_the_step(tmp_path, classes):
    """``repa.precompute``: the encoder's pass per train clip, computed once and looked up by record index,
    gives the losses of the encoder run in each step (the same clips in the same order; with the class term,
    its mass too), the encoder's FLOPs leave the step's count, and the time counts as training; with
    ``repa.until`` the term stops at its step."""
    over = ["repa.layer=1", "train.num_steps=4", "train.log_every=1", f"repa.classes={classes}"]
    rows, outs = {}, {}
    for pre in (False, True):
        cfg = config_lib.load_config(f"{QUICK}:smoke_eval", [*over, f"repa.precompute={pre}"])
        work = tmp_path / str(pre)
        outs[pre] = train(cfg, work, progress=False)
        rows[pre] = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    keys = ["loss", "repa_cos"] + (["repa_class_ce"] if classes else [])
    for k in keys:
        want = [r[k] for r in rows[False] if k in r]
        got = [r[k] for r in rows[True] if k in r]
        assert len(want) == 4
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5)
    if not classes:  # resumed from step 2 (its data iterator's state through the lookup), steps 3-4 again
        cfg = config_lib.load_config(
            f"{QUICK}:smoke_eval", [*over, "repa.precompute=True", "train.ckpt_every=2"]
        )
        train(cfg, tmp_path / "resumed", progress=False)
        (tmp_path / "resumed" / "checkpoints" / "4").rename(tmp_path / "step4")
        train(cfg, tmp_path / "resumed", progress=False)
        lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
        again = {r["step"]: r["loss"] for r in map(json.loads, lines)}
        np.testing.assert_allclose([again[3], again[4]], [r["loss"] for r in rows[True][2:4]], rtol=1e-6)
        # repa.until = 0.5 (HASTE): steps 1-2 as above, steps 3-4 without the term (no repa_cos logged)
        cfg = config_lib.load_config(f"{QUICK}:smoke_eval", [*over, "repa.precompute=True", "repa.until=0.5"])
        train(cfg, tmp_path / "until", progress=False)
        lines = (tmp_path / "until" / "metrics.jsonl").read_text().splitlines()
        until = [json.loads(line) for line in lines]
        np.testing.assert_allclose(
            [r["loss"] for r in until[:2]], [r["loss"] for r in rows[True][:2]], rtol=1e-6
        )
        assert [("repa_cos" in r) for r in until] == [True, True, False, False]
        assert abs(until[2]["loss"] - rows[True][2]["loss"]) > 1e-3  # the term left the loss
    assert outs[True]["repa_precompute_seconds"] > 0 and "repa_precompute_seconds" not in outs[False]
    assert outs[True]["train_seconds"] > outs[True]["repa_precompute_seconds"]
    on, off = (config_lib.load_config(QUICK, [f"repa.precompute={p}"]) for p in (True, False))
    assert repa.encoder_flops(on) == 0.0 < repa.encoder_flops(off)  # the step no longer runs the encoder


def test_precompute_table_rows_are_the_clips_encoded_alone():
    """Each row of ``precompute_table`` (batches of 4, the last padded) is ``encode`` of that record alone."""
    from sora_jax.data import moving_digits
    from sora_jax.data.records import encode_clip

    cfg = config_lib.load_config(QUICK, ["repa.layer=2", "repa.classes=0.5"])
    term, frozen = repa.from_config(cfg)
    clips = moving_digits.generate("test", 6, seed=5)
    source = [
        encode_clip(clips["video"][i], clips["captions"][i], clips["digits"][i], clips["directions"][i])
        for i in range(6)
    ]
    table = repa.precompute_table(term, frozen["repa"], source, repa.token_grid(cfg), batch_size=4)
    assert set(table) == {"repa_features", "repa_mass"} and table["repa_features"].shape == (6, 64, 96)
    for i in (0, 5):
        one = term.encode(frozen["repa"], jnp.asarray(clips["video"][i : i + 1]), (4, 4, 4))
        for k, v in one.items():
            np.testing.assert_allclose(table[k][i], np.asarray(v[0]), rtol=1e-4, atol=1e-5)


def test_precompute_refuses_buckets():
    with pytest.raises(ConfigError, match="precompute"):
        config_lib.load_config(QUICK, ["repa.precompute=True", "data.buckets=8x32x32"])
