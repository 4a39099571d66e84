"""The train steps: the DiT's (caption dropout, encode, diffusion loss) and the VAE's (reconstruction + KL),
both through ``make_step`` (gradients, AdamW update, EMA, metrics)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sora_jax.diffusion import masks
from sora_jax.models.autoencoder import Autoencoder, video_to_float
from sora_jax.models.discriminator import adaptive_weight, hinge_d_loss, hinge_g_loss
from sora_jax.models.vae import kl_divergence
from sora_jax.train.state import TrainState, ema_update


def make_loss_fn(
    graphdef: nnx.GraphDef,
    process,
    autoencoder: Autoencoder,
    *,
    null_ids: jax.Array,
    null_mask: jax.Array,
    caption_dropout: float,
    mask_probs: dict[str, float] | None = None,
    mask_max_frames: int = 1,
) -> Callable[[nnx.State, dict, jax.Array], jax.Array]:
    """``loss_fn(params, batch, key) -> scalar``: caption dropout, encode, mean diffusion loss over the batch.

    With ``mask_probs`` giving a frame-conditioning strategy other than "none" a positive probability
    (``sora_jax/diffusion/masks.py``), each clip draws a mask of given latent frames: clean, at time 0, out of
    the loss."""
    use_masks = mask_probs is not None and masks.conditions_frames(mask_probs)

    def loss_fn(params, batch, key):
        model = nnx.merge(graphdef, params)
        k_drop, k_diff, k_mask = jax.random.split(key, 3)
        # token ids [B, L], or a frozen encoder's features [B, L, F] (sora_jax/text/frozen.py)
        ids = batch["tokens"] if "tokens" in batch else batch["text_emb"]
        mask = batch["text_mask"]
        drop = jax.random.uniform(k_drop, (ids.shape[0], 1)) < caption_dropout
        ids = jnp.where(drop.reshape(-1, *[1] * (ids.ndim - 1)), null_ids[None], ids)
        mask = jnp.where(drop, null_mask[None, :], mask)
        if "latents" in batch:  # precomputed by data_pipelines/encode_latents.py
            x0 = batch["latents"]
        else:
            x0 = autoencoder.encode(video_to_float(batch["video"]))
        ctx, ctx_mask = model.encode_text(ids, mask)
        cond_mask = None
        if use_masks:
            cond_mask = masks.sample_masks(k_mask, x0.shape[0], x0.shape[1], mask_probs, mask_max_frames)
        per_example = process.training_loss(
            lambda xt, t: model.denoise(xt, t, ctx, ctx_mask), x0, k_diff, cond_mask=cond_mask
        )
        return per_example.mean()

    return loss_fn


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    process,
    autoencoder: Autoencoder,
    *,
    null_ids: jax.Array,
    null_mask: jax.Array,
    caption_dropout: float,
    ema_decay: float,
    lr_fn: Callable[[jax.Array], jax.Array],
    mask_probs: dict[str, float] | None = None,
    mask_max_frames: int = 1,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns ``step(state, batch) -> (state, metrics)``; batch: video u8 [B,T,H,W,3], tokens, text_mask [B,L]."""
    loss_fn = make_loss_fn(
        graphdef,
        process,
        autoencoder,
        null_ids=null_ids,
        null_mask=null_mask,
        caption_dropout=caption_dropout,
        mask_probs=mask_probs,
        mask_max_frames=mask_max_frames,
    )

    def loss_with_aux(params, batch, key):
        return loss_fn(params, batch, key), {}

    return make_step(loss_with_aux, tx, ema_decay=ema_decay, lr_fn=lr_fn)


def make_step(
    loss_fn: Callable[[nnx.State, dict, jax.Array], tuple[jax.Array, dict]],
    tx: optax.GradientTransformation,
    *,
    ema_decay: float,
    lr_fn: Callable[[jax.Array], jax.Array],
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The update every model shares: ``loss_fn(params, batch, key) -> (loss, aux metrics)``, gradients,
    the optimizer, EMA; metrics = loss, grad_norm, lr and the aux metrics."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "opt_state": opt_state,
            "ema": ema_update(state["ema"], params, ema_decay),
            "rng": state["rng"],
        }
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_fn(state["step"]), **aux}
        return new_state, metrics

    return step


def psnr(mse_pm1: jax.Array) -> jax.Array:
    """PSNR in dB of a mean squared error measured on [-1, 1] pixels (peak-to-peak 2)."""
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse_pm1, 1e-12))


def _perceptual_term(perceptual, recon: jax.Array, x: jax.Array) -> jax.Array:
    """Mean LPIPS over every frame of recon / x ``[B, T, H, W, 3]``."""
    frames = lambda v: v.reshape(-1, *v.shape[2:])  # noqa: E731
    return jnp.mean(perceptual(frames(recon), frames(x)))


def make_vae_loss_fn(
    graphdef: nnx.GraphDef,
    *,
    l1_weight: float,
    l2_weight: float,
    kl_weight: float,
    perceptual=None,
    perceptual_weight: float = 0.0,
) -> Callable[[nnx.State, dict, jax.Array], tuple[jax.Array, dict]]:
    """VAE loss on batch["video"] u8 [B, T, H, W, 3]: ``l1 |x - x^| + l2 (x - x^)^2 + kl KL / n``, the means
    over pixels in [-1, 1] and KL (summed over each clip's latent) divided by the clip's pixel count n; plus
    ``perceptual_weight`` x mean LPIPS over frames when a ``perceptual`` loss (``models.perceptual``) is given."""

    def loss_fn(params, batch, key):
        model = nnx.merge(graphdef, params)
        x = video_to_float(batch["video"])
        recon, mean, logvar = model(x, key)
        err = recon - x
        l1, mse = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
        kl = jnp.mean(kl_divergence(mean, logvar)) / (x[0].size)
        loss = l1_weight * l1 + l2_weight * mse + kl_weight * kl
        aux = {"l1": l1, "mse": mse, "kl": kl, "psnr": psnr(mse)}
        if perceptual is not None and perceptual_weight > 0:
            aux["lpips"] = _perceptual_term(perceptual, recon, x)
            loss = loss + perceptual_weight * aux["lpips"]
        return loss, aux

    return loss_fn


def make_vae_gan_step(
    graphdef: nnx.GraphDef,
    disc_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    *,
    l1_weight: float,
    l2_weight: float,
    kl_weight: float,
    gan_weight: float,
    gan_start: int,
    ema_decay: float,
    lr_fn: Callable[[jax.Array], jax.Array],
    perceptual=None,
    perceptual_weight: float = 0.0,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The VAE step with a 3D PatchGAN (state also holds ``disc`` and ``disc_opt_state``).

    One forward of the VAE and two pullbacks (``jax.vjp``): the gradient of reconstruction + KL and the
    gradient of the generator's hinge loss; the latter is scaled by ``gan_weight`` x the adaptive weight
    (their norm ratio at the decoder's last layer, taming eq. 7) and counts from step ``gan_start`` on, as
    does the discriminator's hinge loss on real clips against (stopped) reconstructions.
    """

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        x = video_to_float(batch["video"])
        on = (state["step"] >= gan_start).astype(jnp.float32)

        def forward(params):
            return nnx.merge(graphdef, params)(x, key)

        (recon, mean, logvar), pullback = jax.vjp(forward, state["params"])

        def rec_kl(recon, mean, logvar):
            err = recon - x
            l1, mse = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
            kl = jnp.mean(kl_divergence(mean, logvar)) / x[0].size
            loss = l1_weight * l1 + l2_weight * mse + kl_weight * kl
            if perceptual is not None and perceptual_weight > 0:
                loss = loss + perceptual_weight * _perceptual_term(perceptual, recon, x)
            return loss, (l1, mse, kl)

        def disc_logits(disc, video):
            return nnx.merge(disc_graphdef, disc)(video)

        (rec_loss, (l1, mse, kl)), rec_cot = jax.value_and_grad(rec_kl, argnums=(0, 1, 2), has_aux=True)(
            recon, mean, logvar
        )
        g_loss, g_cot = jax.value_and_grad(lambda r: hinge_g_loss(disc_logits(state["disc"], r)))(recon)
        (g_rec,) = pullback(rec_cot)
        (g_gan,) = pullback((g_cot, jnp.zeros_like(mean), jnp.zeros_like(logvar)))
        last = lambda g: g["decoder"]["conv_out"]["kernel"].value  # noqa: E731
        weight = on * gan_weight * adaptive_weight(last(g_rec), last(g_gan))
        grads = jax.tree.map(lambda a, b: a + weight * b, g_rec, g_gan)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)

        fake = jax.lax.stop_gradient(recon)

        def d_loss_fn(disc):
            real_logits, fake_logits = disc_logits(disc, x), disc_logits(disc, fake)
            return on * hinge_d_loss(real_logits, fake_logits), (real_logits.mean(), fake_logits.mean())

        (d_loss, (real_mean, fake_mean)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state["disc"])
        d_updates, disc_opt_state = disc_tx.update(d_grads, state["disc_opt_state"], state["disc"])
        new_state = {
            **state,
            "step": state["step"] + 1,
            "params": params,
            "opt_state": opt_state,
            "ema": ema_update(state["ema"], params, ema_decay),
            "disc": optax.apply_updates(state["disc"], d_updates),
            "disc_opt_state": disc_opt_state,
        }
        metrics = {
            "loss": rec_loss + weight * g_loss,
            "grad_norm": optax.global_norm(grads),
            "lr": lr_fn(state["step"]),
            "l1": l1,
            "mse": mse,
            "kl": kl,
            "psnr": psnr(mse),
            "g_loss": g_loss,
            "d_loss": d_loss,
            "gan_weight": weight,
            "logits_real": real_mean,
            "logits_fake": fake_mean,
        }
        return new_state, metrics

    return step
