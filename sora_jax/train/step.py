"""The train steps, one builder per task: the DiT's loss (caption dropout, encode, diffusion loss), the VAE's
(reconstruction + KL [+ LPIPS]) and the VAE's with a PatchGAN. All share ``make_step`` / ``state.apply_update``
(gradients, AdamW, EMA, metrics) and the signature ``step(state, batch, frozen) -> (state, metrics)``:
``frozen`` holds the parameters that are used but not trained (a latent model's VAE, the LPIPS network, a LoRA
model's base weights ``frozen["base"]``: then ``state["params"]`` holds only the adapters), so
they are arguments of the compiled step, placed by the rules table, never constants baked into it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sora_jax.diffusion import masks
from sora_jax.models.autoencoder import Autoencoder, video_to_float
from sora_jax.models.discriminator import adaptive_weight, hinge_d_loss, hinge_g_loss
from sora_jax.models.vae import kl_divergence
from sora_jax.train.repa import RepaTerm
from sora_jax.train.state import TrainState, apply_update, with_base

Step = Callable[[TrainState, dict, dict], tuple[TrainState, dict]]
LossFn = Callable[[nnx.State, dict, dict, jax.Array], tuple[jax.Array, dict]]


def frozen_autoencoder_params(autoencoder: Autoencoder) -> dict:
    """``{"autoencoder": params}`` for a codec with weights (a trained VAE), else ``{}``."""
    params = getattr(autoencoder, "params", None)
    return {"autoencoder": params} if params else {}


def _bind(autoencoder: Autoencoder, frozen: dict) -> Autoencoder:
    return autoencoder.with_params(frozen["autoencoder"]) if "autoencoder" in frozen else autoencoder


def make_loss_fn(
    graphdef: nnx.GraphDef,
    process,
    autoencoder: Autoencoder,
    *,
    null_text: jax.Array,
    null_mask: jax.Array,
    caption_dropout: float,
    mask_probs: dict[str, float] | None = None,
    mask_max_frames: int = 1,
    repa: RepaTerm | None = None,
) -> LossFn:
    """The text-to-video loss ``loss_fn(params, batch, frozen, key) -> (scalar, {})``: caption dropout to the
    null prompt (``null_text`` ids ``[L]`` or frozen features ``[L, F]``, ``null_mask`` ``[L]``), encode the video
    (the autoencoder's weights from ``frozen["autoencoder"]`` when it has any), mean diffusion loss.

    With ``mask_probs`` giving a frame-conditioning strategy other than "none" a positive probability
    (``sora_jax/diffusion/masks.py``), each clip draws a mask of given latent frames: clean, at time 0, out of
    the loss.

    ``repa`` (``sora_jax/train/repa.py``): adds ``repa.loss``, ``repa.weight * (1 - cos)`` between the DiT's
    projected block tokens and the frozen encoder's features (``frozen["repa"]``) of the clean clip (plus its
    class term); aux ``repa_cos`` (and ``repa_class_ce``). A batch holding ``repa_features`` (and ``repa_mass``:
    ``config.repa.precompute``) gives the encoder's pass, which then does not run in the step."""
    use_masks = mask_probs is not None and masks.conditions_frames(mask_probs)

    def loss_fn(params, batch, frozen, key):
        model = nnx.merge(graphdef, with_base(params, frozen))  # LoRA: the adapters over the frozen base
        k_drop, k_diff, k_mask = jax.random.split(key, 3)
        # token ids [B, L], or a frozen encoder's features [B, L, F] (sora_jax/text/frozen.py)
        text = batch["tokens"] if "tokens" in batch else batch["text_emb"]
        mask = batch["text_mask"]
        drop = jax.random.uniform(k_drop, (text.shape[0], 1)) < caption_dropout
        text = jnp.where(drop.reshape(-1, *[1] * (text.ndim - 1)), null_text[None], text)
        mask = jnp.where(drop, null_mask[None, :], mask)
        if "latents" in batch:  # precomputed by data_pipelines/encode_latents.py
            x0 = batch["latents"]
        else:
            x0 = _bind(autoencoder, frozen).encode(video_to_float(batch["video"]))
        ctx, ctx_mask = model.encode_text(text, mask)
        cond_mask = None
        if use_masks:
            cond_mask = masks.sample_masks(k_mask, x0.shape[0], x0.shape[1], mask_probs, mask_max_frames)
        if repa is None:
            per_example = process.training_loss(
                lambda xt, t: model.denoise(xt, t, ctx, ctx_mask), x0, k_diff, cond_mask=cond_mask
            )
            return per_example.mean(), {}
        tokens = {}

        def apply(xt, t):  # the same forward pass gives the projected tokens
            out, tokens["z"] = model.denoise(xt, t, ctx, ctx_mask, features=True)
            return out

        per_example = process.training_loss(apply, x0, k_diff, cond_mask=cond_mask)
        pt, ph, pw = model.dit.cfg.patch_size
        grid = (x0.shape[1] // pt, x0.shape[2] // ph, x0.shape[3] // pw)
        with jax.named_scope("repa"):  # the encoder's targets and the term (benchmarks/cpu_step_profile.py)
            encoded = {k: batch[k] for k in ("repa_features", "repa_mass") if k in batch} or None
            term, aux = repa.loss(tokens["z"], frozen["repa"], batch["video"], grid, encoded)
        return per_example.mean() + term, aux

    return loss_fn


def make_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    ema_decay: float,
    lr_fn: optax.Schedule,
    late: tuple[int, LossFn] | None = None,
) -> Step:
    """``step(state, batch, frozen)``: ``loss_fn(params, batch, frozen, key) -> (loss, aux)``, its gradients,
    ``apply_update``; metrics = loss, grad_norm, lr and the aux metrics. The key is
    ``fold_in(state rng, step)``.

    ``late = (s, late_loss_fn)``: from step ``s`` on, ``late_loss_fn`` instead (a ``lax.cond`` on the step: one
    compiled program, only the taken branch runs); aux metrics it lacks are NaN there (e.g. REPA's
    ``repa_cos`` after ``repa.until``)."""

    def grad_of(fn):
        return jax.value_and_grad(fn, has_aux=True)

    def step(state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        args = (batch, frozen, key)
        if late is None:
            (loss, aux), grads = grad_of(loss_fn)(state["params"], *args)
        else:
            switch, late_fn = late
            shapes = jax.eval_shape(grad_of(loss_fn), state["params"], *args)[0][1]

            def after(params):
                (loss, aux), grads = grad_of(late_fn)(params, *args)
                nan = {k: jnp.full(v.shape, jnp.nan, v.dtype) for k, v in shapes.items()}
                return (loss, nan | aux), grads

            (loss, aux), grads = jax.lax.cond(
                state["step"] < switch, lambda p: grad_of(loss_fn)(p, *args), after, state["params"]
            )
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_fn(state["step"]), **aux}
        return apply_update(state, grads, tx, ema_decay), metrics

    return step


def psnr_from_mse(mse_pm1: jax.Array) -> jax.Array:
    """PSNR in dB of a mean squared error measured on [-1, 1] pixels (peak-to-peak 2)."""
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse_pm1, 1e-12))


def _perceptual_term(perceptual, recon: jax.Array, x: jax.Array) -> jax.Array:
    """Mean LPIPS over every frame of recon / x ``[B, T, H, W, 3]``."""
    frames = lambda v: v.reshape(-1, *v.shape[2:])  # noqa: E731
    return jnp.mean(perceptual(frames(recon), frames(x)))


@dataclasses.dataclass(frozen=True)
class VAELossWeights:
    l1: float
    l2: float
    kl: float
    perceptual: float = 0.0


def vae_losses(
    recon: jax.Array, mean: jax.Array, logvar: jax.Array, x: jax.Array, w: VAELossWeights, perceptual=None
) -> tuple[jax.Array, dict]:
    """``l1 |x - x^| + l2 (x - x^)^2 + kl KL / n`` (means over pixels in [-1, 1]; KL summed over each clip's
    latent, divided by the clip's pixel count n), plus ``w.perceptual`` x mean LPIPS over frames when a
    ``perceptual`` loss (``models.perceptual``) is given. x, recon ``[B, T, H, W, 3]``. Returns (loss, terms)."""
    err = recon - x
    l1, mse = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
    kl = jnp.mean(kl_divergence(mean, logvar)) / (x[0].size)
    loss = w.l1 * l1 + w.l2 * mse + w.kl * kl
    terms = {"l1": l1, "mse": mse, "kl": kl, "psnr": psnr_from_mse(mse)}
    if perceptual is not None and w.perceptual > 0:
        terms["lpips"] = _perceptual_term(perceptual, recon, x)
        loss = loss + w.perceptual * terms["lpips"]
    return loss, terms


def make_vae_loss_fn(graphdef: nnx.GraphDef, weights: VAELossWeights) -> LossFn:
    """The VAE loss on batch["video"] u8 ``[B, T, H, W, 3]`` (``vae_losses``); the LPIPS network, when used,
    is ``frozen["perceptual"]``."""

    def loss_fn(params, batch, frozen, key):
        x = video_to_float(batch["video"])
        recon, mean, logvar = nnx.merge(graphdef, params)(x, key)
        return vae_losses(recon, mean, logvar, x, weights, frozen.get("perceptual"))

    return loss_fn


def make_vae_gan_step(
    graphdef: nnx.GraphDef,
    disc_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    weights: VAELossWeights,
    *,
    gan_weight: float,
    gan_start: int,
    ema_decay: float,
    lr_fn: optax.Schedule,
) -> Step:
    """The VAE step with a 3D PatchGAN (state also holds ``disc`` and ``disc_opt_state``).

    One forward of the VAE and two pullbacks (``jax.vjp``): the gradient of reconstruction + KL and the
    gradient of the generator's hinge loss; the latter is scaled by ``gan_weight`` x the adaptive weight
    (their norm ratio at the decoder's last layer, taming eq. 7) and counts from step ``gan_start`` on, as
    does the discriminator's hinge loss on real clips against (stopped) reconstructions.
    """

    def step(state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        x = video_to_float(batch["video"])
        on = (state["step"] >= gan_start).astype(jnp.float32)

        def forward(params):
            return nnx.merge(graphdef, params)(x, key)

        (recon, mean, logvar), pullback = jax.vjp(forward, state["params"])

        def rec_kl(recon, mean, logvar):
            return vae_losses(recon, mean, logvar, x, weights, frozen.get("perceptual"))

        def disc_logits(disc, video):
            return nnx.merge(disc_graphdef, disc)(video)

        (rec_loss, terms), rec_cot = jax.value_and_grad(rec_kl, argnums=(0, 1, 2), has_aux=True)(
            recon, mean, logvar
        )
        g_loss, g_cot = jax.value_and_grad(lambda r: hinge_g_loss(disc_logits(state["disc"], r)))(recon)
        (g_rec,) = pullback(rec_cot)
        (g_gan,) = pullback((g_cot, jnp.zeros_like(mean), jnp.zeros_like(logvar)))
        last = lambda g: g["decoder"]["conv_out"]["kernel"].value  # noqa: E731
        weight = on * gan_weight * adaptive_weight(last(g_rec), last(g_gan))
        grads = jax.tree.map(lambda a, b: a + weight * b, g_rec, g_gan)
        fake = jax.lax.stop_gradient(recon)

        def d_loss_fn(disc):
            real_logits, fake_logits = disc_logits(disc, x), disc_logits(disc, fake)
            return on * hinge_d_loss(real_logits, fake_logits), (real_logits.mean(), fake_logits.mean())

        (d_loss, (real_mean, fake_mean)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state["disc"])
        d_updates, disc_opt_state = disc_tx.update(d_grads, state["disc_opt_state"], state["disc"])
        new_state = apply_update(state, grads, tx, ema_decay) | {
            "disc": optax.apply_updates(state["disc"], d_updates),
            "disc_opt_state": disc_opt_state,
        }
        metrics = {
            "loss": rec_loss + weight * g_loss,
            "grad_norm": optax.global_norm(grads),
            "lr": lr_fn(state["step"]),
            **terms,
            "g_loss": g_loss,
            "d_loss": d_loss,
            "gan_weight": weight,
            "logits_real": real_mean,
            "logits_fake": fake_mean,
        }
        return new_state, metrics

    return step
