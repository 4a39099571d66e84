"""The VAE's adversary: a 3D PatchGAN discriminator and the hinge / adaptive-weight GAN losses.

Owns ``PatchDiscriminator3D`` (as in MAGVIT / Open-Sora's VAE: strided 3D convolutions with GroupNorm and
LeakyReLU(0.2), one real/fake logit per spacetime patch), ``hinge_d_loss`` / ``hinge_g_loss`` and
``adaptive_weight`` (Esser et al. 2021, "Taming Transformers", eq. 7: the GAN term is scaled so that its
gradient at the decoder's last layer matches the reconstruction loss's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class PatchDiscriminator3D(nnx.Module):
    """video ``[B, T, H, W, C]`` in [-1, 1] -> logits ``[B, T', H / 2^L, W / 2^L, 1]``.

    ``num_layers`` strided blocks (space /2 each; time /2 from the second on), widths ``width * 2^i``
    capped at 8x.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, num_layers: int = 3, *, rngs: nnx.Rngs):
        self.convs, self.norms = nnx.List(), nnx.List()
        cin = in_channels
        for i in range(num_layers):
            cout = width * min(2**i, 8)
            stride = (2 if i > 0 else 1, 2, 2)
            self.convs.append(nnx.Conv(cin, cout, (3, 4, 4), strides=stride, padding="SAME", rngs=rngs))
            self.norms.append(
                nnx.GroupNorm(cout, num_groups=min(32, cout // 4), rngs=rngs) if i > 0 else None
            )
            cin = cout
        self.out = nnx.Conv(cin, 1, (3, 3, 3), padding="SAME", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            x = jax.nn.leaky_relu(x if norm is None else norm(x), 0.2)
        return self.out(x)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """mean(relu(1 - D(x))) + mean(relu(1 + D(G(z)))) (the discriminator's hinge loss, halved as in taming)."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
    """-mean(D(G(z))): the generator's side of the hinge GAN."""
    return -jnp.mean(logits_fake)


def adaptive_weight(grad_rec: jax.Array, grad_gan: jax.Array, max_weight: float = 1e4) -> jax.Array:
    """||grad of the reconstruction loss|| / (||grad of the GAN loss|| + 1e-4) at the same (last) layer,
    clipped to [0, max_weight], without gradient."""
    w = jnp.linalg.norm(grad_rec) / (jnp.linalg.norm(grad_gan) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))
