"""The train steps: the DiT's (caption dropout, encode, diffusion loss) and the VAE's (reconstruction + KL),
both through ``make_step`` (gradients, AdamW update, EMA, metrics)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sora_jax.models.autoencoder import Autoencoder, video_to_float
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
) -> Callable[[nnx.State, dict, jax.Array], jax.Array]:
    """``loss_fn(params, batch, key) -> scalar``: caption dropout, encode, mean diffusion loss over the batch."""

    def loss_fn(params, batch, key):
        model = nnx.merge(graphdef, params)
        k_drop, k_diff = jax.random.split(key)
        ids, mask = batch["tokens"], batch["text_mask"]
        drop = jax.random.uniform(k_drop, (ids.shape[0], 1)) < caption_dropout
        ids = jnp.where(drop, null_ids[None, :], ids)
        mask = jnp.where(drop, null_mask[None, :], mask)
        x0 = autoencoder.encode(video_to_float(batch["video"]))
        ctx, ctx_mask = model.encode_text(ids, mask)
        per_example = process.training_loss(lambda xt, t: model.denoise(xt, t, ctx, ctx_mask), x0, k_diff)
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
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns ``step(state, batch) -> (state, metrics)``; batch: video u8 [B,T,H,W,3], tokens, text_mask [B,L]."""
    loss_fn = make_loss_fn(
        graphdef,
        process,
        autoencoder,
        null_ids=null_ids,
        null_mask=null_mask,
        caption_dropout=caption_dropout,
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


def make_vae_loss_fn(
    graphdef: nnx.GraphDef, *, l1_weight: float, l2_weight: float, kl_weight: float
) -> Callable[[nnx.State, dict, jax.Array], tuple[jax.Array, dict]]:
    """VAE loss on batch["video"] u8 [B, T, H, W, 3]: ``l1 |x - x^| + l2 (x - x^)^2 + kl KL / n``, the means
    over pixels in [-1, 1] and KL (summed over each clip's latent) divided by the clip's pixel count n."""

    def loss_fn(params, batch, key):
        model = nnx.merge(graphdef, params)
        x = video_to_float(batch["video"])
        recon, mean, logvar = model(x, key)
        err = recon - x
        l1, mse = jnp.mean(jnp.abs(err)), jnp.mean(jnp.square(err))
        kl = jnp.mean(kl_divergence(mean, logvar)) / (x[0].size)
        loss = l1_weight * l1 + l2_weight * mse + kl_weight * kl
        return loss, {"l1": l1, "mse": mse, "kl": kl, "psnr": psnr(mse)}

    return loss_fn
