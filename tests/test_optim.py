"""optim.optimizer = muon: which parameters Muon takes, and its update on stacked blocks against optax's own
2D Muon applied to each block's matrix alone (the rest against AdamW)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import quickstart
from sora_jax.models import dit as dit_lib
from sora_jax.train.state import lr_schedule, make_optimizer, muon_dimension_numbers, newton_schulz_coeffs


def _flat(tree, is_leaf=None):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


@pytest.mark.parametrize("adam_lr", [0.0, 3e-3])
def test_muon_takes_the_blocks_matrices_and_matches_optax_per_block(adam_lr):
    """With ``optim.adam_lr`` > 0 the AdamW part follows the schedule at that peak, Muon's at ``optim.lr``."""
    cfg = quickstart.get_config()
    cfg.optim.optimizer, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip = "muon", 1e-2, 1, 1e9
    cfg.optim.adam_lr = adam_lr
    model = dit_lib.DiT(dit_lib.dit_config("smoke"), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    dims = _flat(muon_dimension_numbers(params), is_leaf=lambda x: x is None or hasattr(x, "output_axis"))
    muon_leaves = {k.removesuffix(".value") for k, v in dims.items() if v is not None}
    blocks = "['blocks']"
    expected = {
        f"{blocks}['{m}']['{w}']" for m in ("attn", "cross_attn") for w in ("wq", "wk", "wv", "wo")
    } | {f"{blocks}['{k}']['kernel']" for k in ("adaLN_modulation",)}
    expected |= {f"{blocks}['mlp']['{k}']['kernel']" for k in ("fc1", "fc2")}
    assert muon_leaves == expected  # embeddings, final layer, biases and norms stay on AdamW

    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(0.01 * rng.standard_normal(p.shape), p.dtype), params)
    tx = make_optimizer(cfg)
    state = tx.init(params)
    for _ in range(2):  # the second step also checks the momentum
        updates, state = tx.update(grads, state, params)
    got, g = _flat(updates), _flat(grads)
    ref2d = optax.contrib.muon(lr_schedule(cfg), ns_steps=cfg.optim.muon_ns_steps, consistent_rms=0.2)
    adam = optax.adamw(lr_schedule(cfg, adam_lr or None), b1=0.9, b2=0.99, weight_decay=0.0, nesterov=True)
    checked = 0
    for key, u in got.items():
        name = key.removesuffix(".value")
        if name in expected:
            leaf = name.split("['")[-1].rstrip("']")
            for layer in range(u.shape[0]):
                gl = np.asarray(g[key][layer])
                if leaf in ("wq", "wk", "wv"):
                    m = gl.reshape(gl.shape[0], -1)
                elif leaf == "wo":
                    m = gl.reshape(-1, gl.shape[-1])
                else:
                    m = gl
                s = ref2d.init({"w": jnp.asarray(m)})
                for _ in range(2):
                    r, s = ref2d.update({"w": jnp.asarray(m)}, s, {"w": jnp.asarray(m)})
                np.testing.assert_allclose(
                    np.asarray(u[layer]).reshape(m.shape), r["w"], rtol=2e-4, atol=1e-7
                )
                checked += 1
        else:
            s = adam.init(g[key])
            for _ in range(2):
                r, s = adam.update(g[key], s, g[key])
            np.testing.assert_allclose(np.asarray(u), r, rtol=2e-4, atol=1e-8)
    assert checked == len(expected) * model.cfg.depth


def test_muon_skip_leaves_the_named_modules_on_adamw():
    params = nnx.state(dit_lib.DiT(dit_lib.dit_config("smoke"), rngs=nnx.Rngs(0)), nnx.Param)
    is_leaf = lambda x: x is None or hasattr(x, "output_axis")  # noqa: E731
    on_muon = lambda tree: {
        k.removesuffix(".value") for k, v in _flat(tree, is_leaf).items() if v is not None
    }  # noqa: E731
    full = on_muon(muon_dimension_numbers(params))
    skipped = on_muon(muon_dimension_numbers(params, skip=("adaLN_modulation",)))
    assert full - skipped == {"['blocks']['adaLN_modulation']['kernel']"} and skipped < full


def test_polar_express_coefficients_approach_the_polar_factor():
    """``optim.muon_ns_coeffs``: after 5 iterations Polar Express's coefficients (1.02 safety folded into the
    first) are within 0.12 of the SVD's polar factor U V^T of a random 128 x 512 matrix, and its singular values
    within [0.85, 1.15]; Jordan et al.'s quintic stays further (it does not converge to 1, by design)."""
    from optax.contrib._muon import orthogonalize_via_newton_schulz

    g = np.random.default_rng(0).standard_normal((128, 512)).astype(np.float32)
    u, _, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
    polar = u @ vt
    errors = {}
    for kind in ("standard", "polar_express"):
        coeffs = jnp.asarray(newton_schulz_coeffs(kind, 5))
        out = np.asarray(orthogonalize_via_newton_schulz(jnp.asarray(g), coeffs, 5))
        errors[kind] = np.linalg.norm(out - polar) / np.linalg.norm(polar)
        if kind == "polar_express":
            sv = np.linalg.svd(out, compute_uv=False)
            assert sv.min() > 0.85 and sv.max() < 1.15
    assert errors["polar_express"] < 0.12 < 0.2 < errors["standard"]
    with pytest.raises(ValueError, match="muon_ns_steps = 5"):
        newton_schulz_coeffs("polar_express", 3)
    with pytest.raises(ValueError, match="standard or polar_express"):
        newton_schulz_coeffs("cubic", 5)
