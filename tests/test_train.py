"""Training: the same loss curve on 1 and 8 devices, bitwise-exact resume after a kill (NaN handling:
test_checkpoints.py)."""

import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from helpers import run_cli, start_cli

from configs import quickstart
from sora_jax.config import load_config
from sora_jax.train import checkpoint
from sora_jax.train.loop import train
from sora_jax.train.state import lr_schedule

ROOT = Path(__file__).resolve().parents[1]


def smoke_config(data_dir, **overrides):
    items = [f"--config.data.path={data_dir}", "--config.train.log_every=1"]
    items += [f"--config.{k}={v}" for k, v in overrides.items()]
    return load_config(f"{quickstart.__file__}:smoke", items)


def losses(workdir) -> dict[int, float]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]  # a resumed run rewrites steps after its checkpoint: keep the last
    return out


def test_train_one_device_then_sharded_same_loss_curve(data_dir, tmp_path):
    assert jax.device_count() == 8
    one = smoke_config(data_dir, **{"mesh.data": 1})
    train(one, tmp_path / "one", progress=False, devices=jax.devices()[:1])
    eight = smoke_config(data_dir, **{"mesh.data": 2, "mesh.fsdp": 4})
    train(eight, tmp_path / "eight", progress=False)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(a) == list(range(1, one.train.num_steps + 1))
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=2e-4, atol=1e-6)
    # the loss went down from its first value: the model learns something even in 6 steps
    assert a[max(a)] < a[1]
    # checkpoints: keep 2, the last one at the final step
    assert checkpoint.latest_step(tmp_path / "one") == one.train.num_steps
    assert list((tmp_path / "one" / "tensorboard").iterdir())


def test_muon_trains_sharded_like_on_one_device_and_resumes(data_dir, tmp_path):
    """optim.optimizer=muon (its AdamW half leaves masked nodes in the optimizer state) trains under an fsdp
    mesh with the one-device loss curve, and resumes exactly from its checkpoint."""
    over = {"optim.optimizer": "muon", "train.num_steps": 3, "train.ckpt_every": 2}
    one = smoke_config(data_dir, **{"mesh.data": 1, **over})
    train(one, tmp_path / "one", progress=False, devices=jax.devices()[:1])
    eight = smoke_config(data_dir, **{"mesh.data": 2, "mesh.fsdp": 4, **over})
    train(eight, tmp_path / "eight", progress=False)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(a) == [1, 2, 3] and a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=2e-4, atol=1e-6)
    (tmp_path / "one" / "checkpoints" / "3").rename(tmp_path / "step3")  # resume from step 2
    train(one, tmp_path / "one", progress=False, devices=jax.devices()[:1])
    np.testing.assert_allclose(losses(tmp_path / "one")[3], a[3], rtol=1e-6)


def test_time_limit_saves_and_stops_then_resumes(data_dir, tmp_path):
    cfg = smoke_config(data_dir, **{"train.num_steps": 400, "train.time_limit_s": 1e-9, "mesh.data": 1})
    out = train(cfg, tmp_path / "w", progress=False, devices=jax.devices()[:1])
    assert out["time_limit_reached"] and out["step"] == 1  # the budget is spent after the first step
    assert checkpoint.latest_step(tmp_path / "w") == 1
    again = train(cfg, tmp_path / "w", progress=False, devices=jax.devices()[:1])
    assert (
        again["step"] == 2 and checkpoint.latest_step(tmp_path / "w") == 2
    )  # a rerun resumes, one more step


def test_kill_and_rerun_resumes_exactly(data_dir, tmp_path):
    steps = 60
    args = [
        "--config",
        f"{quickstart.__file__}:smoke",
        f"--config.data.path={data_dir}",
        f"--config.train.num_steps={steps}",
        "--config.train.log_every=1",
        "--config.train.ckpt_every=10",
        "--config.mesh.data=1",
    ]
    killed = ["train", "--workdir", tmp_path / "killed", *args]
    proc = start_cli(*killed, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (checkpoint.latest_step(tmp_path / "killed") or 0) < 20:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_step(tmp_path / "killed")
    assert killed_at is not None and killed_at < steps, "the run finished before it could be killed"
    rerun = run_cli(*killed)
    assert f"resumed from step {killed_at}" in rerun.stderr
    assert checkpoint.latest_step(tmp_path / "killed") == steps
    # reference: the same job never interrupted
    run_cli("train", "--workdir", tmp_path / "ref", *args)
    a, b = losses(tmp_path / "killed"), losses(tmp_path / "ref")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert [a[k] for k in sorted(a)] == [b[k] for k in sorted(b)]  # bitwise, data order included


def test_a_frozen_vae_enters_the_step_as_an_argument_not_a_constant(tmp_path, monkeypatch):
    """A latent DiT's step takes the VAE's weights as an argument: the compiled program holds no constant
    near the size of the VAE's largest kernel (which, closed over, becomes a constant)."""
    import dataclasses

    import ml_collections
    from flax import nnx

    from sora_jax import factory, loading
    from sora_jax.models.vae import VideoVAE
    from sora_jax.train.program import largest_constant

    vcfg = factory.vae_config(load_config("configs/vae_digits.py"))
    params = nnx.state(VideoVAE(vcfg, rngs=nnx.Rngs(0)), nnx.Param)
    biggest = max(x.nbytes for x in jax.tree.leaves(params))
    assert biggest > 2**18
    codec = factory.vae_codec(vcfg, 0.1, 2.0).with_params(params)
    monkeypatch.setattr(loading, "load_autoencoder", lambda cfg: codec)
    cfg = ml_collections.ConfigDict(
        load_config(
            "configs/digits_latent.py:smoke",
            ["--config.mesh.data=1", "--config.data.height=32", "--config.data.width=32"],
        ).to_dict()
    )
    cfg.autoencoder.vae = dataclasses.asdict(vcfg)
    cfg.autoencoder.shift, cfg.autoencoder.scale, cfg.autoencoder.vae_step = 0.1, 2.0, 0
    out = train(cfg, tmp_path / "w", compile_only=True, progress=False, devices=jax.devices()[:1])
    assert out["compiled"] and 0 < out["largest_constant_bytes"] < biggest // 8, out
    # the check sees constants: the same encoder with its weights closed over carries the biggest kernel
    video = jax.ShapeDtypeStruct((1, 5, 32, 32, 3), np.float32)
    closed = jax.jit(lambda v: codec.encode(v)).lower(video).as_text()
    assert largest_constant(closed)[0] == biggest


# ------------------------------------------------------------------- optimizer, schedule, EMA vs references


def _optim_config(**optim):
    cfg = quickstart.get_config("smoke")
    cfg.train.num_steps = 6
    cfg.optim.update(
        dict(optimizer="adamw", lr=0.1, warmup_steps=2, weight_decay=0.01, b1=0.9, b2=0.99, grad_clip=1.0)
        | optim
    )
    return cfg


def _warmup_cosine(step, peak, warmup, total):
    """Closed form: peak * step / warmup for step < warmup, then cosine from peak to peak / 10 at ``total``."""
    if step < warmup:
        return peak * step / warmup
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return 0.1 * peak + 0.9 * peak * 0.5 * (1 + np.cos(np.pi * progress))


def test_learning_rate_is_linear_warmup_then_cosine_to_a_tenth():
    cfg = _optim_config(lr=2e-3, warmup_steps=10)
    cfg.train.num_steps = 50
    steps = [0, 1, 5, 9, 10, 11, 25, 30, 49, 50, 80]
    got = [float(lr_schedule(cfg)(s)) for s in steps]
    np.testing.assert_allclose(got, [_warmup_cosine(s, 2e-3, 10, 50) for s in steps], rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(got[steps.index(30)], 2e-4 + 1.8e-3 * 0.5 * (1 + np.cos(np.pi / 2)), rtol=1e-5)
    cfg.optim.warmup_steps = 0  # no warmup is one step of it: the first update has learning rate 0
    assert float(lr_schedule(cfg)(0)) == 0.0
    np.testing.assert_allclose(float(lr_schedule(cfg)(1)), 2e-3, rtol=1e-6)
    cfg.optim.final_lr_fraction = 0.0  # the cosine to zero
    np.testing.assert_allclose(float(lr_schedule(cfg)(50)), 0.0, atol=1e-12)
    np.testing.assert_allclose(
        float(lr_schedule(cfg)(25)), 2e-3 * 0.5 * (1 + np.cos(np.pi * 24 / 49)), rtol=1e-5
    )


def _np_train(params, grads, *, lr, warmup, total, b1, b2, wd, clip, ema_decay):
    """float64 numpy: per step, clip the gradient to global norm ``clip``, AdamW (bias-corrected moments,
    eps 1e-8, decoupled weight decay) at the scheduled learning rate of the step count before the update,
    then EMA of the new parameters (starting from the initial ones). Returns per step (params, ema, norm,
    lr)."""
    p = [np.asarray(x, np.float64) for x in params]
    ema = [x.copy() for x in p]
    m, v = [np.zeros_like(x) for x in p], [np.zeros_like(x) for x in p]
    out = []
    for k, g in enumerate(grads):
        norm = np.sqrt(sum(np.sum(gi**2) for gi in g))
        g = [gi * min(1.0, clip / norm) for gi in g]
        rate = _warmup_cosine(k, lr, warmup, total)
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi**2
            m_hat, v_hat = m[i] / (1 - b1 ** (k + 1)), v[i] / (1 - b2 ** (k + 1))
            p[i] = p[i] - rate * (m_hat / (np.sqrt(v_hat) + 1e-8) + wd * p[i])
            ema[i] = ema_decay * ema[i] + (1 - ema_decay) * p[i]
        out.append(([x.copy() for x in p], [x.copy() for x in ema], norm, rate))
    return out


def test_step_applies_clipped_adamw_on_the_schedule_and_updates_the_ema():
    """make_step with make_optimizer on a loss linear in the parameters (its gradient is the batch, so each
    step's global norm is chosen: above and below the clip) against the float64 reference over 5 steps."""
    from flax import nnx

    from sora_jax.train.state import init_state, make_optimizer
    from sora_jax.train.step import make_step

    cfg = _optim_config()
    tx = make_optimizer(cfg)
    state = init_state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), tx, seed=0)
    rng = np.random.default_rng(0)
    shapes = [p.shape for p in jax.tree.leaves(state["params"])]
    grads = []
    for norm in (3.0, 0.5, 2.0, 0.3, 1.5):  # clipped, not, clipped, not, clipped
        g = [rng.standard_normal(s) for s in shapes]
        scale = norm / np.sqrt(sum(np.sum(x**2) for x in g))
        grads.append([(x * scale).astype(np.float32) for x in g])

    def loss_fn(params, batch, frozen, key):
        return sum(jnp.sum(g * p) for g, p in zip(batch, jax.tree.leaves(params))), {}

    step = jax.jit(make_step(loss_fn, tx, ema_decay=0.8, lr_fn=lambda s: lr_schedule(cfg)(s)))
    init = [np.asarray(p) for p in jax.tree.leaves(state["params"])]
    kw = dict(lr=0.1, warmup=2, total=6, b1=0.9, b2=0.99, wd=0.01, clip=1.0, ema_decay=0.8)
    ref = _np_train(init, grads, **kw)
    for k, (g, (p_ref, ema_ref, norm, rate)) in enumerate(zip(grads, ref)):
        state, metrics = step(state, tuple(g), {})
        assert int(state["step"]) == k + 1
        for got, want in zip(jax.tree.leaves(state["params"]), p_ref):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"params, step {k}")
        for got, want in zip(jax.tree.leaves(state["ema"]), ema_ref):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"ema, step {k}")
        np.testing.assert_allclose([metrics["grad_norm"], metrics["lr"]], [norm, rate], rtol=1e-5, atol=1e-9)
    # what the reference checks: without clipping, or without the EMA, the numbers are far off
    unclipped = _np_train(init, grads, **{**kw, "clip": np.inf})[-1][0]
    assert max(np.abs(a - b).max() for a, b in zip(unclipped, ref[-1][0])) > 1e-2
    assert max(np.abs(a - b).max() for a, b in zip(ref[-1][0], ref[-1][1])) > 1e-2


def test_make_step_switches_to_the_late_loss_at_its_step():
    """``make_step(late=(2, late_fn))``: steps 0-1 follow ``loss_fn``'s gradients, steps 2-3 ``late_fn``'s (plain
    SGD, lr 0.1, so each update is -0.1 x the taken branch's gradient, computed here by hand); the early aux
    metric is NaN once the late loss runs."""
    from flax import nnx

    from sora_jax.train.state import init_state
    from sora_jax.train.step import make_step

    def early(params, batch, frozen, key):
        w = params["w"].value
        return jnp.sum(w**2), {"early_aux": jnp.sum(w)}

    def late(params, batch, frozen, key):
        w = params["w"].value
        return jnp.sum((w - 1.0) ** 3), {}

    class Weights(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.asarray([0.5, -2.0, 3.0]))

    import optax

    tx = optax.sgd(0.1)
    state = init_state(Weights(), tx, seed=0)
    step = jax.jit(make_step(early, tx, ema_decay=0.0, lr_fn=lambda s: 0.1, late=(2, late)))
    w = np.asarray([0.5, -2.0, 3.0])
    for k in range(4):
        state, metrics = step(state, {}, {})
        loss, grad = (np.sum(w**2), 2 * w) if k < 2 else (np.sum((w - 1) ** 3), 3 * (w - 1) ** 2)
        np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-6)
        assert np.isnan(metrics["early_aux"]) == (k >= 2)
        w = w - 0.1 * grad
        np.testing.assert_allclose(np.asarray(state["params"]["w"].value), w, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- caption dropout in the step


def _text_spy(seen: list):
    """A stand-in TextToVideo whose encode_text records the ids and mask it gets (jax.debug.callback, so
    inside the jitted, differentiated step too)."""
    from flax import nnx

    class Spy(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(()))

        def encode_text(self, ids, mask):
            jax.debug.callback(lambda i, m: seen.append((np.asarray(i), np.asarray(m))), ids, mask)
            return jnp.ones((*ids.shape[:2], 4)) * self.w, mask

        def denoise(self, x_t, t, ctx, mask):
            return x_t * self.w + jnp.mean(ctx)

    return Spy()


def test_caption_dropout_puts_the_null_prompt_in_at_the_configured_rate():
    from flax import nnx

    from sora_jax import factory
    from sora_jax.diffusion import make_process
    from sora_jax.models.autoencoder import IdentityAutoencoder
    from sora_jax.train.state import init_state, make_optimizer
    from sora_jax.train.step import make_loss_fn, make_step

    cfg = quickstart.get_config("smoke")
    tok = factory.make_text_input(cfg)
    null_ids, null_mask = tok.encode([""])
    captions = [f"a {i % 10} moving left" if i % 2 else f"the digit {i % 10} falls" for i in range(512)]
    ids, mask = tok.encode(captions)
    batch = {"tokens": ids, "text_mask": mask, "latents": np.zeros((512, 1, 2, 2, 1), np.float32)}
    tx = make_optimizer(cfg)
    for rate in (0.0, 1.0, 0.3):
        seen = []
        model = _text_spy(seen)
        graphdef, _ = nnx.split(model)
        loss_fn = make_loss_fn(graphdef, make_process("rectified_flow"), IdentityAutoencoder(),
                               null_text=jnp.asarray(null_ids[0]), null_mask=jnp.asarray(null_mask[0]),
                               caption_dropout=rate)  # fmt: skip
        step = make_step(loss_fn, tx, ema_decay=0.9, lr_fn=lambda s: 0.0)
        state = init_state(model, tx, seed=0)
        step = jax.jit(step)
        drops = []
        for _ in range(2):  # two steps: two draws
            state, _ = step(state, batch, {})
            jax.effects_barrier()
            got_ids, got_mask = seen[-1]
            dropped = (got_ids == null_ids).all(1) & (got_mask == null_mask).all(1)
            kept = (got_ids == ids).all(1) & (got_mask == mask).all(1)
            assert (dropped | kept).all()  # a row is its caption or exactly the null prompt, never a mix
            drops.append(dropped)
        assert len(seen) == 2
        if rate in (0.0, 1.0):
            assert all(d.all() == bool(rate) and d.any() == bool(rate) for d in drops)
        else:  # 512 draws each: the rate within 4 standard deviations, and a new draw each step
            assert all(abs(d.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / 512) for d in drops)
            assert (drops[0] != drops[1]).any()
