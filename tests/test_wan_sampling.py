"""Sampling as Wan samples, against diffusers: UniPC multistep (``sora_jax.diffusion.unipc``) step by step
against ``UniPCMultistepScheduler`` on an analytic model, the time grids of diffusers' flow schedulers, and a
whole ``WanPipeline`` run (tiny random transformer and VAE, CFG with negative prompt embeddings, UniPC and
Euler) reproduced by our transformer + ``cfg_apply`` + ``Process.sample`` + chunked VAE decode."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.diffusion import cfg_apply, flow, make_process, unipc

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_wan import TINY_A, _torch_model  # noqa: E402
from test_wan_vae import TINY as TINY_VAE  # noqa: E402

WAN_UNIPC = dict(  # Wan 2.1's scheduler config in diffusers (flow_shift 3.0 for 480p, 5.0 for 720p)
    prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, solver_order=2,
    solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
)  # fmt: skip


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------------ an analytic model

MU = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
VAR = 0.25  # data ~ N(MU, VAR): the exact x0 = E[x0 | x_s] is linear in x_s


def toy_endpoint(noise):
    """Where the toy's probability-flow ODE takes noise at s = 1: MU + sqrt(VAR) noise (an affine transport)."""
    return MU + np.sqrt(VAR) * np.asarray(noise)


def toy_velocity(x, s):
    """The exact velocity of data N(MU, VAR) at noise level s (numpy or jax)."""
    x0 = ((1 - s) * VAR * x + s * s * MU) / ((1 - s) ** 2 * VAR + s * s)
    return (x - x0) / s


def toy_apply(sigmas: np.ndarray, times: np.ndarray):
    """apply_fn(x, model_time) of the toy model: the step's sigma looked up from its network time."""
    sig, tj = jnp.asarray(sigmas[:-1]), jnp.asarray(times)

    def apply(x, mt):
        return toy_velocity(x, sig[jnp.argmin(jnp.abs(tj - mt[0]))])

    return apply


def diffusers_loop(scheduler, num_steps: int, x: np.ndarray, start: int = 0) -> list[np.ndarray]:
    """diffusers' scheduler driven by the toy model from x (at step ``start``, via ``set_begin_index``); the
    state after every step."""
    scheduler.set_timesteps(num_steps)
    scheduler.set_begin_index(start)
    xt, out = torch.from_numpy(np.array(x)), []
    for i, t in enumerate(scheduler.timesteps[start:], start):
        v = toy_velocity(xt.numpy(), np.float32(scheduler.sigmas[i])).astype(np.float32)
        xt = scheduler.step(torch.from_numpy(v), t, xt).prev_sample
        out.append(xt.numpy())
    return out


@pytest.mark.parametrize("num_steps", [1, 4, 10, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_time_grids_equal_diffusers(num_steps, shift):
    sch = diffusers.UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=shift)
    sch.set_timesteps(num_steps)
    sigmas, times = unipc.flow_sigmas(num_steps, shift)
    np.testing.assert_array_equal(sigmas, sch.sigmas.numpy())
    np.testing.assert_array_equal(times, sch.timesteps.numpy().astype(np.float32))  # integers: 999, ...
    eul = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    eul.set_timesteps(num_steps)
    ts = flow.flow_match_euler_times(num_steps, shift)
    np.testing.assert_array_equal(ts, eul.sigmas.numpy())
    np.testing.assert_array_equal(flow.model_time(ts[:-1]), eul.timesteps.numpy())
    if num_steps > 1:  # neither is our uniform grid: diffusers stops 1/1000 (shifted) short of 0, then jumps
        assert np.abs(flow.sampling_times(num_steps, shift) - ts).max() > 1e-3
        assert np.abs(flow.sampling_times(num_steps, shift)[:-1] - sigmas[:-1]).max() > 1e-4


@pytest.mark.parametrize(
    ("num_steps", "shift", "options"),
    [
        (4, 3.0, {}),
        (10, 5.0, {}),
        (10, 1.0, dict(solver_order=3)),
        (6, 3.0, dict(solver_order=1)),
        (8, 3.0, dict(disable_corrector=[0, 3])),
        (8, 3.0, dict(start=3)),  # SDEdit-like: from the 4th step, warm-up orders again
        (6, 3.0, dict(solver_type="bh1")),
    ],
)
def test_unipc_step_by_step_equals_diffusers(num_steps, shift, options):
    options = dict(options)
    start = options.pop("start", 0)
    sch = diffusers.UniPCMultistepScheduler(**{**WAN_UNIPC, **options}, flow_shift=shift)
    x = np.random.default_rng(1).standard_normal(MU.shape).astype(np.float32)
    ref = diffusers_loop(sch, num_steps, x, start)
    sigmas, times = unipc.flow_sigmas(num_steps, shift)
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    run = jax.jit(
        lambda x: unipc.unipc_trajectory(toy_apply(sigmas, times), x, sigmas, times, start=start, **kw)
    )
    final, steps = run(jnp.asarray(x))
    assert len(steps) == len(ref) == num_steps - start
    if options.get("solver_type") == "bh1":
        # diffusers' bh1 ends in NaN: B(h) = h = -inf at sigma 0, times a zero history term; ours skips that term
        assert not np.isfinite(ref[-1]).all() and np.isfinite(np.asarray(final)).all()
        steps, ref = steps[:-1], ref[:-1]
    errs = [rel_err(a, r) for a, r in zip(steps, ref, strict=True)]
    print(
        f"unipc {num_steps} steps shift {shift} {options} start {start}: max rel err per step {max(errs):.1e}"
    )
    assert max(errs) < 1e-5, errs


def test_process_unipc_and_diffusers_euler_grid():
    """Process.sample: "unipc" (diffusers' grid by default) is unipc_sample; time_grid="diffusers" makes "euler"
    diffusers' FlowMatchEulerDiscreteScheduler; the uniform defaults are unchanged; bad grids raise."""
    proc = make_process("rectified_flow", flow_shift=3.0)
    x = jnp.asarray(np.random.default_rng(2).standard_normal(MU.shape).astype(np.float32))
    key = jax.random.key(0)
    sigmas, times = unipc.flow_sigmas(5, 3.0)
    ours = proc.sample(toy_apply(sigmas, times), x, key, sampler="unipc", num_steps=5)
    np.testing.assert_array_equal(ours, unipc.unipc_sample(toy_apply(sigmas, times), x, sigmas, times))
    ref = diffusers_loop(diffusers.UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=3.0), 5, np.asarray(x))
    assert rel_err(ours, ref[-1]) < 1e-5
    # euler on diffusers' grid
    ts = flow.flow_match_euler_times(5, 3.0)
    ours = proc.sample(
        toy_apply(ts, ts[:-1] * 1000), x, key, sampler="euler", num_steps=5, time_grid="diffusers"
    )
    ref = diffusers_loop(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), 5, np.asarray(x))
    assert rel_err(ours, ref[-1]) < 1e-6
    # the uniform grid, unshifted: euler as before; unipc runs on it (first sigma 1 - 1e-6), 2nd order vs 1st
    ts = flow.sampling_times(10, 1.0)
    plain = proc.sample(toy_apply(ts, ts[:-1] * 1000), x, key, sampler="euler", num_steps=10, shift=1.0)
    np.testing.assert_array_equal(plain, flow.euler_sample(toy_apply(ts, ts[:-1] * 1000), x, 10, 1.0))
    sig = unipc.sigmas_from_times(ts)
    uni = proc.sample(
        toy_apply(sig, sig[:-1] * 1000), x, key, sampler="unipc", num_steps=10, shift=1.0, time_grid="uniform"
    )
    e_uni, e_euler = rel_err(uni, toy_endpoint(x)), rel_err(plain, toy_endpoint(x))
    print(f"distance to the ODE endpoint, 10 uniform steps: unipc {e_uni:.1e}, euler {e_euler:.1e}")
    assert e_uni < 0.2 * e_euler
    # frame conditioning and SDEdit go through unipc too: given frames returned exactly, editing from a step
    cond, mask = jnp.asarray(MU), jnp.asarray([[True, False, False], [False, False, True]])
    out = proc.sample(lambda x, t: 0.5 * x, x, key, sampler="unipc", num_steps=6, cond=cond, cond_mask=mask)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(np.asarray(out)[mask], MU[np.asarray(mask)])
    edit = proc.sample(
        toy_apply(sigmas, times), x, key, sampler="unipc", num_steps=5, init=cond, strength=0.6
    )
    start = int(np.argmax(sigmas[:-1] <= 0.6))
    noised = (1 - sigmas[start]) * MU + sigmas[start] * np.asarray(x)
    expect = unipc.unipc_sample(toy_apply(sigmas, times), jnp.asarray(noised), sigmas, times, start=start)
    assert start > 0 and rel_err(edit, expect) < 1e-6
    with pytest.raises(ValueError, match="no 'heun' sampler"):
        proc.sample(toy_apply(ts, ts), x, key, sampler="heun", num_steps=8, time_grid="diffusers")
    with pytest.raises(ValueError, match="unknown time_grid 'karras'"):
        proc.sample(toy_apply(ts, ts), x, key, sampler="unipc", num_steps=8, time_grid="karras")
    with pytest.raises(ValueError, match="rectified_flow objective only"):
        make_process("ddpm").sample(
            toy_apply(ts, ts), x, key, sampler="ddim", num_steps=4, time_grid="uniform"
        )
    with pytest.raises(ValueError, match="lower_order_final=False"):
        unipc.coefficients(sigmas, lower_order_final=False)


# ----------------------------------------------------------------------------- a whole WanPipeline run

SHIFT, SCALE = 3.0, 5.0
LATENT = (2, 4, 3, 4, 4)  # diffusers' [B, C, T, H, W]: 9 frames of 32 x 32


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A WanPipeline with a tiny random transformer and VAE (no text encoder: embeddings are given), and ours."""
    from sora_jax.models import wan_convert, wan_vae_convert

    transformer = _torch_model(TINY_A, seed=0)
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKLWan(**TINY_VAE).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("wan_sampling") / "vae"
    vae.save_pretrained(folder)
    sd = {k: v.detach().numpy() for k, v in transformer.state_dict().items()}
    ours = wan_convert.from_state_dict(sd, wan_convert.config_from_diffusers(dict(transformer.config)))
    rng = np.random.default_rng(3)
    latents = rng.standard_normal(LATENT).astype(np.float32)
    text = rng.standard_normal((2, LATENT[0], 7, TINY_A["text_dim"])).astype(np.float32)  # [pos/neg, B, L, D]
    return dict(
        transformer=transformer,
        vae=vae,
        ours=ours,
        our_vae=wan_vae_convert.from_diffusers(folder),
        latents=latents,
        text=text,
    )


def run_pipeline(wan, scheduler, num_steps: int, output_type: str):
    """WanPipeline's output and its latents after the last step (read by a step-end callback)."""
    pipe = diffusers.WanPipeline(
        tokenizer=None, text_encoder=None, vae=wan["vae"], scheduler=scheduler, transformer=wan["transformer"]
    )
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def keep(pipe, i, t, kwargs):
        seen["latents"] = kwargs["latents"].clone()
        return {}

    out = pipe(
        prompt_embeds=torch.from_numpy(wan["text"][0]),
        negative_prompt_embeds=torch.from_numpy(wan["text"][1]),
        latents=torch.from_numpy(wan["latents"]),
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=num_steps,
        guidance_scale=SCALE,
        output_type=output_type,
        callback_on_step_end=keep,
    ).frames
    return out, seen["latents"].numpy()


def run_ours(wan, sampler: str, num_steps: int) -> np.ndarray:
    """Our loop: the converted transformer through cfg_apply (negative embeddings as the unconditional half),
    Process.sample on diffusers' grid; channels-last latents [B, T, H, W, C]."""
    graphdef, state = nnx.split(wan["ours"])
    cond = jnp.asarray(wan["text"].reshape(-1, *wan["text"].shape[2:]))  # [pos; neg]: [2B, L, D]
    proc = make_process("rectified_flow", flow_shift=SHIFT)

    @jax.jit
    def sample(state, noise):
        model = nnx.merge(graphdef, state)
        apply = cfg_apply(lambda x, t, text: model(x, t, text), cond, SCALE)
        return proc.sample(
            apply, noise, jax.random.key(0), sampler=sampler, num_steps=num_steps, time_grid="diffusers"
        )

    return np.asarray(sample(state, jnp.asarray(np.moveaxis(wan["latents"], 1, -1))))


@pytest.mark.parametrize(("sampler", "num_steps"), [("unipc", 6), ("euler", 5)])
def test_wan_pipeline_sampling_loop_equals_ours(wan, sampler, num_steps):
    from sora_jax.models import wan_vae as wv

    if sampler == "unipc":
        scheduler = diffusers.UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=SHIFT)
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    video, ref = run_pipeline(wan, scheduler, num_steps, "np")
    ours = run_ours(wan, sampler, num_steps)
    err = rel_err(np.moveaxis(ours, -1, 1), ref)
    print(f"WanPipeline {sampler} {num_steps} steps, CFG {SCALE}: final latents max rel err {err:.1e}")
    assert err < 1e-3
    if sampler == "unipc":  # output_type="latent": the same latents, normalised (before the VAE's statistics)
        latent_out, _ = run_pipeline(wan, scheduler, num_steps, "latent")
        np.testing.assert_array_equal(latent_out.numpy(), ref)
    # our chunked VAE decode of our latents against the pipeline's video in [0, 1], [B, T, H, W, 3]
    vae = wan["our_vae"]
    pixels = wv.decode_chunked(vae, wv.denormalize_latents(jnp.asarray(ours), vae.cfg))
    ours_video = np.clip(np.asarray(pixels) / 2 + 0.5, 0.0, 1.0)
    assert video.shape == ours_video.shape == (2, 9, 32, 32, 3)
    assert float(video.std()) > 0.05, "a degenerate video would make this comparison vacuous"
    abs_err = float(np.abs(ours_video - video).max())
    print(f"WanPipeline {sampler}: decoded video max abs err {abs_err:.1e} (pixels in [0, 1])")
    assert abs_err < 1e-3


def test_config_time_grid_reaches_the_process_and_is_checked():
    """``config.diffusion.time_grid`` becomes the process's default grid; bad values are one line naming it."""
    from sora_jax import factory
    from sora_jax.config import ConfigError, load_config

    cfg = load_config("configs/quickstart.py", ["diffusion.time_grid=diffusers"])
    proc = factory.make_process(cfg)
    plain = dataclasses.replace(proc, flow_time_grid=None)
    x, key = jnp.asarray(np.random.default_rng(0).standard_normal(MU.shape), jnp.float32), jax.random.key(0)
    ts = flow.flow_match_euler_times(5, proc.flow_shift)
    apply = toy_apply(ts, ts[:-1] * 1000)
    got = proc.sample(apply, x, key, sampler="euler", num_steps=5)
    want = plain.sample(apply, x, key, sampler="euler", num_steps=5, time_grid="diffusers")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    uniform = plain.sample(apply, x, key, sampler="euler", num_steps=5)
    assert rel_err(uniform, want) > 1e-3  # the grid matters
    for overrides, match in (
        (["diffusion.time_grid=karras"], "config.diffusion.time_grid = 'karras' is not one of"),
        (["diffusion.time_grid=diffusers", "diffusion.sampler=heun"], "has no 'heun' sampler"),
        (
            ["diffusion.time_grid=uniform", "diffusion.objective=ddpm", "diffusion.sampler=ddim"],
            "rectified_flow",
        ),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config("configs/quickstart.py", overrides)
