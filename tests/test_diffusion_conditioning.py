"""Frame conditioning and samplers (issue 8): mask strategies, per-frame timesteps, conditioned training and
sampling, SDEdit, guidance rescale, DDIM vs ancestral in distribution, update rules against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax import diffusion as D
from sora_jax.diffusion import flow, masks
from sora_jax.diffusion.guidance import cfg_apply, rescale_guidance
from sora_jax.models import dit as dit_lib

# ------------------------------------------------------------------------------------------ mask strategies


def _runs(row):
    """(given prefix length, given suffix length, given frames in between) of a bool row."""
    T = len(row)
    head = T if row.all() else int(np.argmin(row))
    tail = T if row.all() else int(np.argmin(row[::-1]))
    return head, tail, int(row[head : T - tail].sum())


@pytest.mark.parametrize("strategy", ["first", "last", "both"])
def test_mask_strategy_shapes(strategy):
    T, kmax = 6, 3
    m = np.asarray(masks.sample_masks(jax.random.key(0), 3000, T, {strategy: 1.0}, kmax))
    assert m.shape == (3000, T) and m.dtype == bool and not m.all(axis=1).any()
    runs = np.array([_runs(r) for r in m])
    assert (runs[:, 2] == 0).all()  # nothing given between the ends
    head, tail = runs[:, 0], runs[:, 1]
    if strategy == "first":
        assert (tail == 0).all() and set(head) == {1, 2, 3}
        np.testing.assert_allclose(np.bincount(head)[1:] / 3000, 1 / 3, atol=0.03)
    elif strategy == "last":
        assert (head == 0).all() and set(tail) == {1, 2, 3}
    else:  # each end at most (T - 1) // 2 = 2 frames, so the ends never meet
        assert set(head) == {1, 2} and set(tail) == {1, 2}


def test_mask_strategy_mixture_and_random():
    T = 6
    m = np.asarray(masks.sample_masks(jax.random.key(1), 8000, T, {"random": 1.0}, 2))
    assert not m.all(axis=1).any()
    np.testing.assert_allclose(m[:, :-1].mean(), 0.5, atol=0.02)
    probs = {"none": 0.4, "first": 0.3, "random": 0.3}
    m = np.asarray(masks.sample_masks(jax.random.key(2), 8000, T, probs, 2))
    none = ~m.any(axis=1)
    np.testing.assert_allclose(none.mean(), 0.4 + 0.3 * 0.5**T, atol=0.02)


def test_mask_probs_checked():
    with pytest.raises(ValueError, match="unknown mask strategy 'firstt'"):
        masks.check_probs({"firstt": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        masks.check_probs({"none": 0.0})
    assert not masks.conditions_frames({"none": 1.0}) and masks.conditions_frames({"none": 1, "first": 0.1})
    np.testing.assert_array_equal(masks.head_tail_mask(5, 1, 2)[0], [1, 0, 0, 1, 1])
    with pytest.raises(ValueError, match="at least one frame"):
        masks.head_tail_mask(3, 2, 1)


# --------------------------------------------------------------------------------- per-frame timesteps


def _perturbed_dit(patch=(1, 4, 4)):
    cfg = dit_lib.dit_config("smoke", patch_size=patch)
    model = dit_lib.DiT(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def test_per_frame_time_equals_per_sample_time_when_equal():
    model = _perturbed_dit()
    r = np.random.default_rng(0)
    x = jnp.asarray(r.standard_normal((2, 4, 8, 8, 3)), jnp.float32)
    text = jnp.asarray(r.standard_normal((2, 5, 32)), jnp.float32)
    mask = jnp.ones((2, 5), bool)
    t = jnp.asarray([30.0, 800.0])
    a = model(x, t, text, mask)
    b = model(x, jnp.broadcast_to(t[:, None], (2, 4)), text, mask)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # a clean frame 0 changes the output (its own modulation) and differs from "all noisy"
    tf = jnp.asarray([[0.0, 30.0, 30.0, 30.0], [0.0, 800.0, 800.0, 800.0]])
    c = model(x, tf, text, mask)
    assert float(jnp.max(jnp.abs(c - a))) > 1e-3


def test_per_frame_time_groups_take_the_largest_time_of_a_temporal_patch():
    model = _perturbed_dit(patch=(2, 4, 4))
    r = np.random.default_rng(1)
    x = jnp.asarray(r.standard_normal((1, 4, 8, 8, 3)), jnp.float32)
    text = jnp.asarray(r.standard_normal((1, 3, 32)), jnp.float32)
    mask = jnp.ones((1, 3), bool)
    mixed = model(x, jnp.asarray([[0.0, 500.0, 0.0, 0.0]]), text, mask)
    grouped = model(x, jnp.asarray([[500.0, 500.0, 0.0, 0.0]]), text, mask)
    np.testing.assert_allclose(mixed, grouped, atol=1e-6)
    with pytest.raises(ValueError, match=r"per frame \[1, 4\]"):
        model(x, jnp.zeros((1, 3)), text, mask)


# ------------------------------------------------------------------------------ conditioned training loss


@pytest.mark.parametrize("objective", ["ddpm", "rectified_flow"])
def test_conditioned_loss_against_reference(objective):
    """The model sees given frames clean at time 0, free frames noised at t; given frames leave the loss."""
    process = D.make_process(objective, prediction="v", flow_prediction="v")
    r = np.random.default_rng(2)
    x0 = jnp.asarray(r.uniform(-1, 1, (3, 4, 2, 2, 1)), jnp.float32)
    cond = jnp.asarray([[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], bool)
    seen = {}

    def apply_fn(x_t, mt):
        seen["x"], seen["t"] = x_t, mt
        return 0.5 * x_t + mt[..., None, None, None] / 1000.0

    key = jax.random.key(3)
    loss = process.training_loss(apply_fn, x0, key, cond_mask=cond)
    # reference: the same draws as training_loss makes
    key_t, key_noise = jax.random.split(key)
    noise = np.asarray(jax.random.normal(key_noise, x0.shape))
    x0n = np.asarray(x0, np.float64)
    if objective == "rectified_flow":
        t = np.asarray(flow.sample_time(key_t, 3, "logit_normal", 1.0), np.float64)
        xt = (1 - t[:, None, None, None, None]) * x0n + t[:, None, None, None, None] * noise
        mt, target = 1000 * t, noise - x0n
    else:
        t = np.asarray(jax.random.randint(key_t, (3,), 0, 1000))
        a = process.schedule.alphas_cumprod[t][:, None, None, None, None]
        xt = np.sqrt(a) * x0n + np.sqrt(1 - a) * noise
        mt, target = t.astype(np.float64), np.sqrt(a) * noise - np.sqrt(1 - a) * x0n
    c = np.asarray(cond)[..., None, None, None]
    xt = np.where(c, x0n, xt)
    mtf = np.where(np.asarray(cond), 0.0, mt[:, None])
    np.testing.assert_allclose(seen["x"], xt, atol=1e-5)
    np.testing.assert_allclose(seen["t"], mtf, atol=1e-3)
    out = 0.5 * xt + mtf[..., None, None, None] / 1000.0
    sq = (out - target) ** 2
    keep = ~np.asarray(cond)
    want = [sq[b][keep[b]].mean() for b in range(3)]
    np.testing.assert_allclose(loss, want, rtol=1e-4)


# ------------------------------------------------------------------------------------ conditioned sampling


def _gauss_eps(process, mu, s):
    """Exact eps-prediction for data N(mu, s^2) per element."""
    ac = jnp.asarray(process.schedule.alphas_cumprod, jnp.float32)

    def apply_fn(xt, model_time):
        a = ac[jnp.round(model_time).astype(jnp.int32)].reshape(
            model_time.shape + (1,) * (xt.ndim - model_time.ndim)
        )
        return jnp.sqrt(1 - a) * (xt - jnp.sqrt(a) * mu) / (a * s**2 + 1 - a)

    return apply_fn


def _gauss_eps_np(process, mu, s):
    """``_gauss_eps`` in float64 numpy, at an integer timestep."""
    ac = process.schedule.alphas_cumprod

    def eps(x, t):
        a = ac[t]
        return np.sqrt(1 - a) * (x - np.sqrt(a) * mu) / (a * s**2 + 1 - a)

    return eps


def _np_ddim(process, eps_fn, x, steps, eta, zs, start=0):
    """guided-diffusion's DDIM / ancestral update over respaced steps, float64, from step ``start`` on (x is
    then the sample at the kept timestep ``steps - 1 - start``)."""
    kept = D.space_timesteps(process.num_timesteps, steps)
    ac = process.schedule.alphas_cumprod[kept]
    x = np.asarray(x, np.float64)
    for j in range(start, steps):
        i = steps - 1 - j
        a, ap = ac[i], (ac[i - 1] if i > 0 else 1.0)
        eps = eps_fn(x, kept[i])
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        sigma = eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
        x = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma**2) * eps + (sigma * zs[j] if i > 0 else 0)
    return x


@pytest.mark.parametrize(
    ("objective", "sampler"), [("ddpm", "ddim"), ("ddpm", "ddpm"), ("rectified_flow", "euler")]
)
def test_conditioned_sampling_keeps_given_frames_and_feeds_them_clean(objective, sampler):
    process = D.make_process(objective, flow_prediction="x0")
    r = np.random.default_rng(4)
    cond = jnp.asarray(r.uniform(-1, 1, (2, 5, 3)), jnp.float32)
    mask = jnp.asarray([[1, 0, 0, 0, 1], [0, 0, 0, 1, 1]], bool)
    calls = []

    def apply_fn(x, mt):  # a model whose output for free frames depends on the given frames
        calls.append(None)
        m = mask[..., None]
        ok_x = jnp.all(jnp.where(m, jnp.abs(x - cond) < 1e-6, True))
        ok_t = jnp.all(jnp.where(mask, mt == 0, True))
        given_mean = jnp.sum(jnp.where(m, x, 0), axis=1, keepdims=True) / jnp.sum(m, axis=1, keepdims=True)
        out = jnp.broadcast_to(given_mean, x.shape) * 0.9
        return jnp.where(ok_x & ok_t, out, jnp.nan)  # NaN if a given frame was ever fed noisy

    noise = jax.random.normal(jax.random.key(5), cond.shape)
    out = jax.jit(
        lambda n: process.sample(
            apply_fn, n, jax.random.key(6), sampler=sampler, num_steps=6, cond=cond, cond_mask=mask
        )
    )(noise)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(mask)], np.asarray(cond)[np.asarray(mask)])
    if objective == "rectified_flow":  # x0-prediction: free frames end at the model's x0 = 0.9 * given mean
        gm = np.asarray([cond[b][np.asarray(mask[b])].mean(0) for b in range(2)])
        np.testing.assert_allclose(np.asarray(out)[0, 1:4], np.broadcast_to(0.9 * gm[0], (3, 3)), atol=1e-4)


def test_sdedit_strength_one_is_plain_sampling_and_start_step_matches_reference():
    process = D.make_process("rectified_flow", flow_shift=2.0)
    x_star = jnp.full((2, 3, 4), 0.3)

    def vel(x, mt):  # point mass at x_star
        return (x - x_star) / (mt[:, None, None] / 1000.0)

    noise = jax.random.normal(jax.random.key(0), x_star.shape)
    init = jnp.full(x_star.shape, -0.5)
    plain = process.sample(vel, noise, None, sampler="euler", num_steps=8)
    full = process.sample(vel, noise, None, sampler="euler", num_steps=8, init=init, strength=1.0)
    np.testing.assert_allclose(plain, full, atol=1e-6)

    # strength 0.5: numpy Euler from the first time <= 0.5 of the shifted grid, started at init noised there
    seen = []

    def lin(x, mt):
        seen.append(mt)
        return x * 0.0 + 1.0  # constant velocity: x_end = x_start - t_start

    out = process.sample(lin, noise, None, sampler="euler", num_steps=8, init=init, strength=0.5)
    ts = 2.0 * np.linspace(1, 0, 9) / (1 + np.linspace(1, 0, 9))
    start = int(np.nonzero(ts[:-1] <= 0.5)[0][0])
    t0 = ts[start]
    want = (1 - t0) * np.asarray(init) + t0 * np.asarray(noise) - t0
    np.testing.assert_allclose(out, want, atol=1e-5)
    with pytest.raises(ValueError, match="strength must be in"):
        process.sample(lin, noise, None, sampler="euler", num_steps=8, init=init, strength=0.0)


def test_ddpm_sdedit_starts_at_the_respaced_step_at_or_below_strength():
    """DDIM from init noised to the largest kept timestep <= strength * (N - 1), against a float64 reference."""
    process = D.make_process("ddpm", schedule="linear", num_timesteps=100)
    mu, s, steps = 0.2, 0.3, 10
    ac = process.schedule.alphas_cumprod
    init = jnp.linspace(-0.9, 0.9, 12).reshape(3, 4)
    noise = jax.random.normal(jax.random.key(1), (3, 4))
    out = process.sample(
        _gauss_eps(process, mu, s),
        noise,
        jax.random.key(2),
        sampler="ddim",
        num_steps=steps,
        init=init,
        strength=0.45,
        clip_denoised=False,
    )
    kept = [int(k) for k in D.space_timesteps(100, steps)]
    start_t = max(k for k in kept if k / 99 <= 0.45)
    i0 = kept.index(start_t)
    x = np.sqrt(ac[start_t]) * np.asarray(init, np.float64) + np.sqrt(1 - ac[start_t]) * np.asarray(noise)
    zeros = np.zeros((steps, 3, 4))
    x = _np_ddim(process, _gauss_eps_np(process, mu, s), x, steps, 0.0, zeros, start=steps - 1 - i0)
    np.testing.assert_allclose(out, x, atol=2e-4)
    assert i0 < steps - 1  # some steps were skipped
    full = process.sample(
        _gauss_eps(process, mu, s),
        noise,
        jax.random.key(2),
        sampler="ddim",
        num_steps=steps,
        clip_denoised=False,
    )
    assert np.abs(np.asarray(full) - x).max() > 1e-2  # and it is not plain sampling


# ------------------------------------------------------------------------------------------------ guidance


def test_guidance_rescale_formula_and_negative_branch():
    r = np.random.default_rng(7)
    c, u = r.standard_normal((2, 3, 4)), r.standard_normal((2, 3, 4)) * 3
    g = u + 5.0 * (c - u)
    want = 0.7 * g * (c.std(axis=(1, 2), keepdims=True) / g.std(axis=(1, 2), keepdims=True)) + 0.3 * g
    np.testing.assert_allclose(rescale_guidance(jnp.asarray(g), jnp.asarray(c), 0.7), want, rtol=1e-5)

    def model(x, t, cond):  # output = x * cond scalar
        return x * cond[:, None, None]

    x = jnp.asarray(r.standard_normal((2, 3, 4)), jnp.float32)
    apply = cfg_apply(model, jnp.asarray([2.0, 2.0, -1.0, -1.0]), 4.0, rescale=0.7)  # negative "prompt" = -1
    out = apply(x, jnp.zeros(2))
    gx = np.asarray(x) * (-1 + 4.0 * 3)
    want = (
        0.7 * gx * ((2 * np.asarray(x)).std(axis=(1, 2), keepdims=True) / gx.std(axis=(1, 2), keepdims=True))
    )
    np.testing.assert_allclose(out, want + 0.3 * gx, rtol=1e-5)


# --------------------------------------------------------------------------- samplers vs numpy references


def test_ddim_eta0_deterministic_and_matches_reference_update():
    process = D.make_process("ddpm", schedule="cosine", num_timesteps=1000)
    mu, s = 0.3, 0.5
    noise = jax.random.normal(jax.random.key(0), (64,))
    run = lambda k: process.sample(  # noqa: E731
        _gauss_eps(process, mu, s), noise, k, sampler="ddim", num_steps=20, eta=0.0, clip_denoised=False
    )
    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    ref = _np_ddim(process, _gauss_eps_np(process, mu, s), noise, 20, 0.0, np.zeros((20, 64)))
    np.testing.assert_allclose(a, ref, atol=2e-4)


def test_ddpm_ancestral_step_matches_posterior_reference():
    """The ancestral sampler with the noise it draws equals the numpy posterior-mean + sigma z update."""
    process = D.make_process("ddpm", schedule="linear", num_timesteps=50)
    mu, s = -0.2, 0.3
    key, steps = jax.random.key(9), 5
    noise = jax.random.normal(jax.random.key(8), (16,))
    out = process.sample(
        _gauss_eps(process, mu, s), noise, key, sampler="ddpm", num_steps=steps, clip_denoised=False
    )
    zs = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, j), (16,))) for j in range(steps)])
    # fixed-small ancestral = DDIM with eta 1 on the respaced schedule (same mean and variance)
    ref = _np_ddim(process, _gauss_eps_np(process, mu, s), noise, steps, 1.0, zs)
    np.testing.assert_allclose(out, ref, atol=3e-4)


def test_ddim_eta1_and_ancestral_agree_in_distribution():
    process = D.make_process("ddpm", schedule="cosine", num_timesteps=1000)
    mu, s, n = 0.25, 0.4, 20000
    noise = jax.random.normal(jax.random.key(0), (n,))
    fn = _gauss_eps(process, mu, s)
    kw = dict(
        num_steps=250, clip_denoised=False
    )  # ancestral sampling is biased at few steps (std -0.03 at 50)
    anc = np.asarray(process.sample(fn, noise, jax.random.key(1), sampler="ddpm", **kw))
    ddim = np.asarray(process.sample(fn, noise, jax.random.key(2), sampler="ddim", eta=1.0, **kw))
    det = np.asarray(process.sample(fn, noise, jax.random.key(2), sampler="ddim", eta=0.0, **kw))
    for x in (anc, ddim, det):
        assert abs(x.mean() - mu) < 0.01 and abs(x.std() - s) < 0.01
    # two-sample Kolmogorov-Smirnov statistic between the stochastic samplers
    grid = np.sort(np.concatenate([anc, ddim]))
    ks = np.max(np.abs(np.searchsorted(np.sort(anc), grid) - np.searchsorted(np.sort(ddim), grid))) / n
    assert ks < 0.02  # the 1% critical value at n = 20000 is ~0.016
    assert not np.allclose(anc, ddim)  # different noise draws, same law


def test_euler_matches_reference_update():
    process = D.make_process("rectified_flow", flow_shift=3.0)
    mu, s = 0.5, 0.3

    def v_np(x, t):
        var = (1 - t) ** 2 * s**2 + t**2
        r = x - (1 - t) * mu
        return t / var * r - (mu + (1 - t) * s**2 / var * r)

    def v_jax(x, mt):
        return v_np(x, (mt / 1000.0)[:, None])

    noise = np.asarray(jax.random.normal(jax.random.key(3), (8, 5)), np.float64)
    out = process.sample(v_jax, jnp.asarray(noise, jnp.float32), None, sampler="euler", num_steps=12)
    ts = 3 * np.linspace(1, 0, 13) / (1 + 2 * np.linspace(1, 0, 13))
    x = noise
    for t, tn in zip(ts[:-1], ts[1:]):
        x = x + (tn - t) * v_np(x, t)
    np.testing.assert_allclose(out, x, atol=1e-4)


@pytest.mark.parametrize("w", [0.0, 2.0])
def test_history_guidance_two_euler_steps_against_reference(w):
    """x0-prediction flow, 2 Euler steps (t = 1, 0.5, 0): the model predicts x0 = 0.9 x the given frame's
    input; the no-history call sees that frame noised with its own noise to the step's level, at the step's
    time, so the guided x0 (and, after the last step, the free frames) is
    0.9 c + w (0.9 c - 0.9 ((1 - t) c + t n)) at t = 0.5."""
    process = D.make_process("rectified_flow", flow_prediction="x0", flow_shift=1.0)
    r = np.random.default_rng(7)
    cond = jnp.asarray(r.uniform(-1, 1, (2, 4, 3)), jnp.float32)
    mask = jnp.asarray([[1, 0, 0, 0], [1, 0, 0, 0]], bool)

    def apply_fn(x, mt):  # NaN unless the times are the given frame's 0 or one time for the whole window
        ok = jnp.all((mt[:, :1] == 0) | (mt == mt[:, :1]), axis=1)[:, None, None]
        return jnp.where(ok, jnp.broadcast_to(0.9 * x[:, :1], x.shape), jnp.nan)

    noise = jax.random.normal(jax.random.key(3), cond.shape)
    out = process.sample(
        apply_fn,
        noise,
        jax.random.key(0),
        sampler="euler",
        num_steps=2,
        cond=cond,
        cond_mask=mask,
        history_scale=w,
    )
    c, n = np.asarray(cond[:, 0]), np.asarray(noise[:, 0])
    want = 0.9 * c + w * (0.9 * c - 0.9 * (0.5 * c + 0.5 * n))
    np.testing.assert_allclose(np.asarray(out)[:, 1:], np.broadcast_to(want[:, None], (2, 3, 3)), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[:, 0], c)


def test_history_guidance_ddpm_noises_the_history_to_the_calls_timestep():
    process = D.make_process("ddpm", schedule="linear", num_timesteps=100)
    cond = jnp.full((1, 3, 2), 0.5, jnp.float32)
    mask = jnp.asarray([[1, 0, 0]], bool)
    noise = jax.random.normal(jax.random.key(1), cond.shape)
    seen = []

    def apply_fn(x, mt):
        jax.debug.callback(lambda a, b: seen.append((np.asarray(a), np.asarray(b))), x, mt)
        return jnp.zeros_like(x)

    process.sample(
        apply_fn,
        noise,
        jax.random.key(0),
        sampler="ddim",
        num_steps=2,
        cond=cond,
        cond_mask=mask,
        history_scale=1.5,
    )
    abar = np.cumprod(1.0 - np.linspace(1e-3, 0.2, 100))  # linear betas scaled by 1000 / 100
    assert len(seen) == 4  # per step: the history call, then the noised one
    for x, mt in seen[1::2]:
        t = int(mt[0, 0])
        assert (mt == t).all() and t in (0, 99)  # the respaced timesteps of 2 steps
        want = np.sqrt(abar[t]) * 0.5 + np.sqrt(1 - abar[t]) * np.asarray(noise[0, 0])
        np.testing.assert_allclose(x[0, 0], want, rtol=1e-5)
    for x, mt in seen[::2]:
        assert mt[0, 0] == 0 and (x[0, 0] == 0.5).all()
