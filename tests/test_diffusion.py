"""Diffusion: schedules, noising, targets, samplers and guidance against closed-form float64 references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import diffusion as D
from sora_jax.diffusion import flow

N = 1000


def _jit_loss(process, fn, x0, key, **kw):
    return jax.jit(lambda x, k: process.training_loss(fn, x, k, **kw))(x0, key)


def _bcast(a, like):
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


# ----------------------------------------------------------------------------- schedules


def test_linear_betas_match_ddpm_values():
    np.testing.assert_allclose(D.linear_betas(1000), np.linspace(1e-4, 0.02, 1000), rtol=0, atol=0)
    b = D.linear_betas(100)
    assert b.dtype == np.float64
    np.testing.assert_allclose(b[[0, -1]], [1e-3, 0.2], rtol=1e-12)


def test_cosine_alphas_cumprod_follow_cos_squared():
    s = 0.008
    sched = D.make_schedule("cosine", N)
    f = lambda t: np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    t = np.arange(1, N + 1) / N
    expected = f(t) / f(0.0)
    unclipped = D.cosine_betas(N) < 0.999
    assert unclipped[: N - 5].all()
    np.testing.assert_allclose(sched.alphas_cumprod[unclipped], expected[unclipped], rtol=1e-9, atol=1e-12)
    assert D.cosine_betas(N).max() <= 0.999


def test_posterior_matches_gaussian_conditioning():
    for kind in ("linear", "cosine"):
        sched = D.make_schedule(kind, N)
        b = sched.betas
        ab = np.array([np.prod(1 - b[: t + 1]) for t in range(N)])
        ab_prev = np.append(1.0, ab[:-1])
        t = np.arange(1, N)
        # x_{t-1} | x0 ~ N(sqrt(ab_prev) x0, 1 - ab_prev); x_t = sqrt(1 - b_t) x_{t-1} + sqrt(b_t) n
        gain = np.sqrt(1 - b[t]) * (1 - ab_prev[t]) / (1 - ab[t])  # Cov(x_{t-1}, x_t) / Var(x_t)
        coef2 = gain
        coef1 = np.sqrt(ab_prev[t]) - gain * np.sqrt(1 - b[t]) * np.sqrt(ab_prev[t])
        var = (1 - ab_prev[t]) - gain * np.sqrt(1 - b[t]) * (1 - ab_prev[t])
        np.testing.assert_allclose(sched.alphas_cumprod, ab, rtol=1e-12)
        np.testing.assert_allclose(sched.posterior_mean_coef1[t], coef1, rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(sched.posterior_mean_coef2[t], coef2, rtol=1e-9)
        np.testing.assert_allclose(sched.posterior_variance[t], var, rtol=1e-7, atol=1e-14)
        assert sched.posterior_variance[0] == 0.0
        assert sched.posterior_log_variance_clipped[0] == sched.posterior_log_variance_clipped[1]
        np.testing.assert_allclose(sched.posterior_mean_coef1[0], 1.0)


def test_q_posterior_mean_variance_jax_matches_numpy():
    sched = D.make_schedule("linear", N)
    key = jax.random.key(0)
    x0, xt = jax.random.normal(key, (2, 3, 4, 5))
    t = jnp.array([5, 700, 0])
    mean, var, log_var = D.q_posterior_mean_variance(sched.to_jax(), x0, xt, t)
    tn = np.asarray(t)
    c1, c2 = sched.posterior_mean_coef1[tn], sched.posterior_mean_coef2[tn]
    exp = _bcast(c1, np.asarray(x0)) * np.asarray(x0) + _bcast(c2, np.asarray(x0)) * np.asarray(xt)
    np.testing.assert_allclose(mean, exp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[:, 0, 0], sched.posterior_variance[tn], rtol=1e-5)
    np.testing.assert_allclose(log_var[:, 0, 0], sched.posterior_log_variance_clipped[tn], rtol=1e-5)


def test_respace_keeps_alphas_cumprod_at_kept_timesteps():
    sched = D.make_schedule("cosine", N)
    kept = D.space_timesteps(N, 10)
    assert kept[0] == 0 and kept[-1] == N - 1 and len(kept) == 10
    sub = D.respace(sched, kept)
    np.testing.assert_allclose(sub.alphas_cumprod, sched.alphas_cumprod[kept], rtol=1e-8)
    full = D.respace(sched, np.arange(N))
    np.testing.assert_allclose(full.betas, sched.betas, rtol=1e-8)


def test_bad_schedule_name():
    with pytest.raises(ValueError, match="'quadratic'.*linear, cosine"):
        D.make_schedule("quadratic", 10)


# ----------------------------------------------------------------------------- ddpm


def test_q_sample_deterministic_and_statistics():
    sched = D.make_schedule("cosine", N)
    x0 = jnp.full((3, 20000), 0.7)
    t = jnp.array([10, 500, 990])
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    xt = np.asarray(D.q_sample(sched, x0, t, noise))
    a = sched.alphas_cumprod[np.asarray(t)][:, None]
    np.testing.assert_allclose(
        xt, np.sqrt(a) * 0.7 + np.sqrt(1 - a) * np.asarray(noise), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(xt.mean(1), np.sqrt(a[:, 0]) * 0.7, atol=0.03)
    np.testing.assert_allclose(xt.std(1), np.sqrt(1 - a[:, 0]), rtol=0.03)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_predict_x0_and_eps_invert_q_sample(prediction):
    sched = D.make_schedule("linear", N).to_jax()
    k1, k2 = jax.random.split(jax.random.key(2))
    x0 = jax.random.uniform(k1, (4, 2, 3, 3), minval=-1, maxval=1)
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 1, 400, 999])
    xt = D.q_sample(sched, x0, t, noise)
    out = noise if prediction == "eps" else D.v_target(sched, x0, t, noise)
    np.testing.assert_allclose(D.predict_x0(sched, xt, t, out, prediction), x0, atol=2e-3)
    np.testing.assert_allclose(D.predict_eps(sched, xt, t, out, prediction), noise, atol=2e-3)
    # Away from the ends, float32 round-off is small.
    np.testing.assert_allclose(D.predict_x0(sched, xt, t, out, prediction)[2], x0[2], atol=1e-5)


def test_v_target_formula():
    sched = D.make_schedule("cosine", N)
    x0 = np.array([[0.3, -0.5]])
    eps = np.array([[1.2, 0.1]])
    a = sched.alphas_cumprod[123]
    v = D.v_target(sched, jnp.asarray(x0), jnp.array([123]), jnp.asarray(eps))
    np.testing.assert_allclose(v, np.sqrt(a) * eps - np.sqrt(1 - a) * x0, rtol=1e-5)


# ----------------------------------------------------------------------------- oracles


def _ddpm_oracle(process, x_star, prediction):
    """The optimal model for a dataset that is the single point x_star."""
    ac = jnp.asarray(process.schedule.alphas_cumprod, jnp.float32)

    def apply_fn(xt, model_time):
        a = _bcast(ac[jnp.round(model_time).astype(jnp.int32)], xt)
        eps = (xt - jnp.sqrt(a) * x_star) / jnp.sqrt(1 - a)
        return eps if prediction == "eps" else jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x_star

    return apply_fn


def _flow_oracle(x_star):
    def apply_fn(xt, model_time):
        t = _bcast(model_time / 1000.0, xt)
        return (xt - x_star) / t

    return apply_fn


# ----------------------------------------------------------------------- samplers, step by step, vs numpy


def _toy_model(x, mt):
    """A stand-in network whose output depends nonlinearly on x and on time, differently per element, so a
    sample depends on every step's time and spacing. x [B, ...] and model time mt [B]: numpy float64 (the
    references) or jax arrays (the samplers)."""
    xp = np if isinstance(x, np.ndarray) else jnp
    t = mt.reshape(mt.shape + (1,) * (x.ndim - 1)) / 1000.0
    w = xp.linspace(-1.0, 1.0, x.shape[-1])
    return 0.8 * xp.tanh(x) * (1.0 - 0.5 * t) + 0.3 * xp.sin(4.0 * t + 2.0 * w)


def _toy_eps(process, mu=0.3, s=0.8):
    """A stand-in eps-network for DDPM: the exact eps of data N(mu, s^2) plus ``_toy_model`` scaled by
    0.3 sqrt(abar_t), an error that moves its x0-prediction by at most ~0.3 (an eps-model whose x0 runs off
    to +-1e3 at the noisy end would test little but the clipping). numpy or jax, as ``_toy_model``."""
    table = process.schedule.alphas_cumprod

    def model(x, mt):
        if isinstance(x, np.ndarray):
            a = table[np.round(mt).astype(int)]
        else:
            a = jnp.asarray(table, jnp.float32)[jnp.round(mt).astype(jnp.int32)]
        a = a.reshape(a.shape + (1,) * (x.ndim - 1))
        exact = (1 - a) ** 0.5 * (x - a**0.5 * mu) / (a * s**2 + 1 - a)
        return exact + 0.3 * a**0.5 * _toy_model(x, mt)

    return model


def _np_ddpm_sample(process, model, noise, steps, sampler, *, eta=0.0, clip=True, key=None):
    """guided-diffusion's p_sample / ddim_sample loops over ``steps`` respaced timesteps, float64: predict x0
    (from eps or v), clip it, then the posterior q(x_{i-1} | x_i, x0) of the respaced chain (ancestral) or the
    DDIM update; step j's noise is the samplers' draw ``normal(fold_in(key, j))``."""
    kept = np.asarray(D.space_timesteps(process.num_timesteps, steps))
    ac = process.schedule.alphas_cumprod[kept]
    ac_prev = np.append(1.0, ac[:-1])
    x = np.asarray(noise, np.float64)
    for j in range(steps):
        i = steps - 1 - j
        a, ap = ac[i], ac_prev[i]
        out = model(x, np.full(x.shape[0], float(kept[i])))
        if process.prediction == "eps":
            x0 = (x - np.sqrt(1 - a) * out) / np.sqrt(a)
        else:
            x0 = np.sqrt(a) * x - np.sqrt(1 - a) * out
        if clip:
            x0 = np.clip(x0, -1.0, 1.0)
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        z = np.asarray(jax.random.normal(jax.random.fold_in(key, j), x.shape)) if key is not None else 0.0
        if sampler == "ddim":
            sigma = eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
            x = np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma**2) * eps + (sigma * z if i > 0 else 0.0)
        else:
            beta = 1 - a / ap
            mean = np.sqrt(ap) * beta / (1 - a) * x0 + np.sqrt(1 - beta) * (1 - ap) / (1 - a) * x
            x = mean + (np.sqrt(beta * (1 - ap) / (1 - a)) * z if i > 0 else 0.0)
    return x


def _np_flow_sample(model, noise, steps, shift, sampler, prediction="v"):
    """Euler / Heun (the last step Euler) from t = 1 to 0 over the shifted uniform grid, float64; an
    x0-prediction enters as the velocity (x_t - x0_hat) / t."""
    u = np.linspace(1.0, 0.0, steps + 1)
    ts = shift * u / (1 + (shift - 1) * u)
    x = np.asarray(noise, np.float64)

    def vel(x, t):
        out = model(x, np.full(x.shape[0], 1000.0 * t))
        return out if prediction == "v" else (x - out) / t

    for k, (t, tn) in enumerate(zip(ts[:-1], ts[1:])):
        v = vel(x, t)
        if sampler == "heun" and k < steps - 1:
            v = 0.5 * (v + vel(x + (tn - t) * v, tn))
        x = x + (tn - t) * v
    return x


@pytest.mark.parametrize(
    ("sampler", "prediction", "schedule", "steps", "eta", "clip"),
    [
        ("ddim", "eps", "cosine", 6, 0.0, True),
        ("ddim", "v", "cosine", 8, 0.0, False),
        ("ddim", "eps", "linear", 6, 0.7, False),
        ("ddim", "v", "linear", 6, 1.0, True),
        ("ddpm", "eps", "linear", 8, 0.0, True),
        ("ddpm", "v", "cosine", 5, 0.0, False),
    ],
)
def test_ddpm_samplers_match_step_by_step_reference(sampler, prediction, schedule, steps, eta, clip):
    process = D.make_process("ddpm", prediction=prediction, schedule=schedule)
    model = _toy_eps(process) if prediction == "eps" else _toy_model
    noise = jax.random.normal(jax.random.key(3), (3, 2, 3, 4)) * 1.5
    key = jax.random.key(4)
    kw = dict(eta=eta, clip=clip, key=key if sampler == "ddpm" or eta > 0 else None)
    out = jax.jit(
        lambda n, k: process.sample(
            model, n, k, sampler=sampler, num_steps=steps, eta=eta, clip_denoised=clip
        )
    )(noise, key)
    ref = _np_ddpm_sample(process, model, noise, steps, sampler, **kw)
    # x0 from eps at the cosine schedule's abar = 2.4e-9 is a difference of terms ~1e4 x: float32 loses ~3e-4
    atol = 1e-3 if (prediction, schedule) == ("eps", "cosine") else 1e-4
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=atol)
    # the reference is sensitive to what it checks: another step count, or no clipping, lands elsewhere
    assert np.abs(_np_ddpm_sample(process, model, noise, steps + 1, sampler, **kw) - ref).max() > 1e-2
    if clip:
        unclipped = _np_ddpm_sample(process, model, noise, steps, sampler, **{**kw, "clip": False})
        assert np.abs(unclipped - ref).max() > 1e-2


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_samplers_match_step_by_step_reference(sampler, prediction):
    process = D.make_process("rectified_flow", flow_shift=3.0, flow_prediction=prediction)
    noise = jax.random.normal(jax.random.key(7), (4, 3, 5))
    out = jax.jit(lambda n: process.sample(_toy_model, n, None, sampler=sampler, num_steps=7))(noise)
    ref = _np_flow_sample(_toy_model, noise, 7, 3.0, sampler, prediction)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    for other in (
        _np_flow_sample(_toy_model, noise, 8, 3.0, sampler, prediction),  # another spacing
        _np_flow_sample(_toy_model, noise, 7, 1.0, sampler, prediction),  # no shift
        _np_flow_sample(_toy_model, noise, 7, 3.0, {"euler": "heun", "heun": "euler"}[sampler], prediction),
    ):
        assert np.abs(other - ref).max() > 1e-2
    # one step of either sampler is one Euler step: x0-prediction then lands on the model's x0 at t = 1
    one = process.sample(_toy_model, noise, None, sampler=sampler, num_steps=1)
    np.testing.assert_allclose(
        one, _np_flow_sample(_toy_model, noise, 1, 3.0, "euler", prediction), atol=1e-5
    )


@pytest.mark.parametrize(("sampler", "steps"), [("euler", 50), ("heun", 20)])
def test_flow_gaussian_data_matches_moments(sampler, steps):
    mu, sigma = 1.5, 0.4

    def velocity(xt, model_time):
        # data N(mu, sigma^2); x_t = (1-t) x0 + t n  =>  v = E[n | x_t] - E[x0 | x_t]
        t = _bcast(model_time / 1000.0, xt)
        var = (1 - t) ** 2 * sigma**2 + t**2
        r = xt - (1 - t) * mu
        return t / var * r - (mu + (1 - t) * sigma**2 / var * r)

    process = D.make_process("rectified_flow")
    noise = jax.random.normal(jax.random.key(8), (4000, 8))
    x = np.asarray(process.sample(velocity, noise, jax.random.key(0), sampler=sampler, num_steps=steps))
    assert abs(x.mean() - mu) < 0.02
    assert abs(x.std() - sigma) < 0.02


def _gaussian_posterior_x0(mu, sigma):
    """E[x0 | x_t] for data N(mu, sigma^2) under x_t = (1-t) x0 + t n (Gaussian conditioning)."""

    def x0_hat(xt, model_time):
        t = _bcast(model_time / 1000.0, xt)
        var = (1 - t) ** 2 * sigma**2 + t**2
        return mu + (1 - t) * sigma**2 / var * (xt - (1 - t) * mu)

    return x0_hat


@pytest.mark.parametrize(("sampler", "steps"), [("euler", 50), ("heun", 20)])
def test_flow_x0_prediction_gaussian_data_matches_moments(sampler, steps):
    mu, sigma = -0.7, 0.3
    process = D.make_process("rectified_flow", flow_prediction="x0")
    noise = jax.random.normal(jax.random.key(8), (4000, 8))
    fn = _gaussian_posterior_x0(mu, sigma)
    x = np.asarray(process.sample(fn, noise, jax.random.key(0), sampler=sampler, num_steps=steps))
    assert abs(x.mean() - mu) < 0.02
    assert abs(x.std() - sigma) < 0.02


def test_flow_x0_prediction_loss_is_clipped_v_loss():
    process = D.make_process("rectified_flow", flow_prediction="x0", flow_timestep_sampling="uniform")
    x0 = jax.random.normal(jax.random.key(20), (64, 6))
    key = jax.random.key(21)
    wrong = lambda xt, mt: jnp.zeros_like(xt)  # predicts x0 = 0
    loss = np.asarray(_jit_loss(process, wrong, x0, key))
    # the same draws of t and noise as training_loss, then the v-loss in float64 numpy
    key_t, key_noise = jax.random.split(key)
    t = np.asarray(D.sample_time(key_t, 64, "uniform"), np.float64)[:, None]
    x = np.asarray(x0, np.float64)
    want = np.mean((x / np.maximum(t, 0.05)) ** 2, axis=1)
    np.testing.assert_allclose(loss, want, rtol=1e-4)
    # equals |v_hat - v|^2 with v_hat = (x_t - x0_hat) / t where t >= 0.05
    n = np.asarray(jax.random.normal(key_noise, (64, 6), jnp.float32), np.float64)
    xt = (1 - t) * x + t * n
    v_hat, v = xt / t, n - x
    big = t[:, 0] >= 0.05
    np.testing.assert_allclose(loss[big], np.mean((v_hat - v) ** 2, axis=1)[big], rtol=1e-3)
    oracle = lambda xt, mt: x0
    assert float(_jit_loss(process, oracle, x0, key).max()) < 1e-10


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_contrastive_flow_matching_loss_matches_numpy(prediction):
    """Contrastive flow matching (Stoica et al. 2025): |v_hat - v|^2 - lambda |v_hat - v_next|^2, the negative
    the batch's next example's target; recomputed in float64 from the same draws of t and noise."""
    lam = 0.05
    process = D.make_process(
        "rectified_flow", flow_prediction=prediction, flow_timestep_sampling="uniform", contrastive=lam
    )
    x0 = jax.random.normal(jax.random.key(30), (8, 6))
    key = jax.random.key(31)
    w = jax.random.normal(jax.random.key(32), (6, 6)) * 0.3
    model = lambda xt, mt: xt @ w  # some model, neither oracle nor zero
    loss = np.asarray(_jit_loss(process, model, x0, key), np.float64)
    key_t, key_noise = jax.random.split(key)
    t = np.asarray(D.sample_time(key_t, 8, "uniform"), np.float64)[:, None]
    x = np.asarray(x0, np.float64)
    n = np.asarray(jax.random.normal(key_noise, (8, 6), jnp.float32), np.float64)
    xt = (1 - t) * x + t * n
    out = xt @ np.asarray(w, np.float64)
    tb = np.maximum(t, 0.05)
    v_hat = (xt - out) / tb if prediction == "x0" else out
    v = (xt - x) / tb if prediction == "x0" else n - x  # x0: the clipped v-loss's target
    v_next = np.roll(n - x, 1, axis=0)  # example i's negative: example i - 1's noise - x0
    want = np.mean((v_hat - v) ** 2, axis=1) - lam * np.mean((v_hat - v_next) ** 2, axis=1)
    np.testing.assert_allclose(loss, want, rtol=2e-4, atol=1e-5)
    plain = D.make_process("rectified_flow", flow_prediction=prediction, flow_timestep_sampling="uniform")
    assert np.all(loss < np.asarray(_jit_loss(plain, model, x0, key)))  # the subtracted term is positive
    with pytest.raises(ValueError, match="contrastive"):
        D.make_process("ddpm", contrastive=lam)
    with pytest.raises(ValueError, match="contrastive"):
        D.make_process("rectified_flow", contrastive=1.0)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_training_loss_oracle_and_zero_model(prediction):
    process = D.make_process("ddpm", prediction=prediction, schedule="linear")
    x_star = jnp.where(jnp.arange(64) % 2 == 0, 1.0, -1.0).reshape(1, 4, 4, 4)
    x0 = jnp.broadcast_to(x_star, (8, 4, 4, 4))
    key = jax.random.key(9)
    loss = _jit_loss(process, _ddpm_oracle(process, x_star, prediction), x0, key)
    assert loss.shape == (8,)
    assert float(loss.max()) < 1e-4
    big = jnp.broadcast_to(x_star.reshape(1, -1)[:, :2].repeat(2048, 1), (16, 4096))
    zero = _jit_loss(process, lambda x, t: jnp.zeros_like(x), big, key)
    # E[eps^2] = 1; E[v^2] = a E[eps^2] + (1 - a) x0^2 = 1 for x0 = +-1.
    np.testing.assert_allclose(zero.mean(), 1.0, atol=0.02)


def test_flow_training_loss_oracle_zero_model_and_time():
    for sampling in ("uniform", "logit_normal"):
        process = D.make_process("rectified_flow", flow_timestep_sampling=sampling)
        x_star = jnp.full((1, 2, 8), 0.5)
        x0 = jnp.broadcast_to(x_star, (16, 2, 8))
        seen = []
        target = _flow_oracle(x_star)

        def oracle(xt, model_time, seen=seen, target=target):
            seen.append(model_time)
            return target(xt, model_time)

        loss = process.training_loss(oracle, x0, jax.random.key(10))
        assert float(loss.max()) < 1e-6
        assert float(seen[0].min()) >= 0 and float(seen[0].max()) <= 1000
        zero = _jit_loss(
            process, lambda x, t: jnp.zeros_like(x), jnp.full((32, 1024), 0.5), jax.random.key(1)
        )
        np.testing.assert_allclose(zero.mean(), 1.25, atol=0.03)  # E[(n - x0)^2] = 1 + x0^2


def test_loss_mask_averages_only_masked_frames():
    process = D.make_process("rectified_flow")
    x_star = jnp.zeros((1, 4, 3, 3, 2))  # [B, T, H, W, C]
    x0 = jnp.broadcast_to(x_star, (2, 4, 3, 3, 2))
    offset = jnp.array([0.0, 0.0, 1.0, 1.0]).reshape(1, 4, 1, 1, 1)
    fn = lambda xt, mt: _flow_oracle(x_star)(xt, mt) + offset  # wrong by 1 on frames 2, 3
    key = jax.random.key(11)
    np.testing.assert_allclose(_jit_loss(process, fn, x0, key), [0.5, 0.5], atol=1e-4)
    mask = jnp.array([[1, 1, 0, 0], [0, 1, 1, 0]])
    np.testing.assert_allclose(_jit_loss(process, fn, x0, key, loss_mask=mask), [0.0, 0.5], atol=1e-4)


def test_flow_time_sampling_and_shift():
    np.testing.assert_allclose(flow.shift_time(jnp.array([0.0, 0.5, 1.0]), 3.0), [0.0, 0.75, 1.0])
    t = np.asarray(D.sample_time(jax.random.key(0), 20000, "logit_normal"))
    assert t.min() > 0 and t.max() < 1
    logit = np.log(t / (1 - t))
    np.testing.assert_allclose([logit.mean(), logit.std()], [0.0, 1.0], atol=0.03)
    t_shift = np.asarray(D.sample_time(jax.random.key(0), 20000, "logit_normal", shift=3.0))
    np.testing.assert_allclose(t_shift, 3 * t / (1 + 2 * t), rtol=1e-5)
    u = np.asarray(D.sample_time(jax.random.key(1), 20000, "uniform"))
    np.testing.assert_allclose(u.mean(), 0.5, atol=0.01)
    ts = np.asarray(D.sampling_times(4))
    np.testing.assert_allclose(ts, [1.0, 0.75, 0.5, 0.25, 0.0])
    assert D.resolution_shift(1024, 256) == 2.0


# ----------------------------------------------------------------------------- guidance


def test_cfg_apply_matches_formula():
    def model(x, t, cond):
        return x * cond["w"][:, None] + t[:, None] + cond["b"]

    B = 3
    x = jax.random.normal(jax.random.key(12), (B, 5))
    t = jnp.arange(B, dtype=jnp.float32)
    cond = {"w": jnp.array([1.0, 2.0, 3.0, 0.5, 0.5, 0.5]), "b": jnp.arange(6.0)[:, None] * jnp.ones((6, 5))}
    c = model(x, t, jax.tree.map(lambda a: a[:B], cond))
    u = model(x, t, jax.tree.map(lambda a: a[B:], cond))
    for s in (0.0, 1.0, 4.5):
        np.testing.assert_allclose(D.cfg_apply(model, cond, s)(x, t), u + s * (c - u), rtol=1e-6)
    traced = jax.jit(lambda s: D.cfg_apply(model, cond, s)(x, t))(jnp.float32(4.5))
    np.testing.assert_allclose(traced, u + 4.5 * (c - u), rtol=1e-6)
    calls = []
    D.cfg_apply(lambda x, t, cond: calls.append(x.shape[0]) or x, cond, 1.0)(x, t)
    D.cfg_apply(lambda x, t, cond: calls.append(x.shape[0]) or x, cond, 2.0)(x, t)
    assert calls == [B, 2 * B]
    with pytest.raises(ValueError, match="2B"):
        D.cfg_apply(model, jax.tree.map(lambda a: a[:B], cond), 2.0)(x, t)


# ----------------------------------------------------------------------------- validation, jit


def test_bad_names_raise_with_name():
    with pytest.raises(ValueError, match="'diffusion_gan'.*ddpm, rectified_flow"):
        D.make_process("diffusion_gan")
    with pytest.raises(ValueError, match="'x0'.*eps, v"):
        D.make_process("ddpm", prediction="x0")
    with pytest.raises(ValueError, match="'eps'.*v, x0"):
        D.make_process("rectified_flow", flow_prediction="eps")
    with pytest.raises(ValueError, match="'beta'"):
        D.make_process("rectified_flow", flow_timestep_sampling="beta")
    noise = jnp.zeros((1, 2))
    ddpm_proc, flow_proc = D.make_process("ddpm"), D.make_process("rectified_flow")
    with pytest.raises(ValueError, match="'euler'.*ddpm, ddim"):
        ddpm_proc.sample(lambda x, t: x, noise, jax.random.key(0), sampler="euler", num_steps=2)
    with pytest.raises(ValueError, match="'ddim'.*euler, heun"):
        flow_proc.sample(lambda x, t: x, noise, jax.random.key(0), sampler="ddim", num_steps=2)
    with pytest.raises(ValueError, match="'rk4'"):
        flow_proc.sample(lambda x, t: x, noise, jax.random.key(0), sampler="rk4", num_steps=2)


def test_process_from_config():
    import configs.quickstart as qs

    p = D.process_from_config(qs.get_config().diffusion)
    assert p.objective is D.Objective.RECTIFIED_FLOW
    np.testing.assert_allclose(p.model_time(jnp.array([0.5])), [500.0])


@pytest.mark.parametrize(
    ("objective", "sampler"), [("ddpm", "ddpm"), ("ddpm", "ddim"), ("rectified_flow", "euler")]
)
def test_sampling_and_loss_under_jit_match_numpy(objective, sampler):
    """Under jax.jit, sample and training_loss against float64 numpy (the loss with the same draws of t and
    noise as training_loss: key split in two, t from the first, noise from the second)."""
    process = D.make_process(objective, prediction="v")
    noise = jax.random.normal(jax.random.key(13), (2, 3, 4))
    key = jax.random.key(14)
    out = jax.jit(lambda n, k: process.sample(_toy_model, n, k, sampler=sampler, num_steps=6))(noise, key)
    if objective == "ddpm":
        ref = _np_ddpm_sample(process, _toy_model, noise, 6, sampler, key=key if sampler == "ddpm" else None)
    else:
        ref = _np_flow_sample(_toy_model, noise, 6, 1.0, sampler)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)

    x0 = np.asarray(jax.random.uniform(jax.random.key(15), (2, 3, 4), minval=-1, maxval=1), np.float64)
    loss = jax.jit(lambda x, k: process.training_loss(_toy_model, x, k))(jnp.asarray(x0, jnp.float32), key)
    key_t, key_noise = jax.random.split(key)
    n = np.asarray(jax.random.normal(key_noise, x0.shape, jnp.float32), np.float64)
    if objective == "ddpm":
        t = np.asarray(jax.random.randint(key_t, (2,), 0, process.num_timesteps))
        a = process.schedule.alphas_cumprod[t][:, None, None]
        xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * n
        target, mt = np.sqrt(a) * n - np.sqrt(1 - a) * x0, t.astype(np.float64)
    else:  # logit-normal times, no shift
        t = 1 / (1 + np.exp(-np.asarray(jax.random.normal(key_t, (2,), jnp.float32), np.float64)))
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * n
        target, mt = n - x0, 1000.0 * t
    want = np.mean((_toy_model(xt, mt) - target) ** 2, axis=(1, 2))
    np.testing.assert_allclose(loss, want, rtol=1e-4)
