"""Trains the digit reader (the prompt-adherence evaluator) and writes its weights.

    python -m sora_jax.eval.reader_training --out sora_jax/eval/weights/digit_reader.npz [--steps 1500]

The reader must read every (digit, direction) combination, including the pairs the video model never sees
in training, so it trains on clips from *both* splits of ``sora_jax.data.moving_digits.generate`` drawn
with seeds (``--seed`` and up) that the evaluation clips do not use, every clip fresh (no epochs: a fixed
pool overfits); it is measured on clips of each split drawn with seed 0.

The shipped weights (0.989 of ``generate("test", 1000, seed=0)`` clips read exactly, digits 0.993,
directions 0.995; train split 0.992) came from one run, about 20 minutes on one (shared) CPU core:
    python -m sora_jax.eval.reader_training --steps 2600 --batch 32 --lr 2e-3 --augment 0.5 --seed 1000 \
        --out sora_jax/eval/weights/digit_reader.npz
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from sora_jax.eval.adherence import score
from sora_jax.eval.digit_reader import DigitReader, ReaderConfig, decode, load_reader, predict, save_reader


def _labels(digits: np.ndarray, directions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """digits/directions int32 [N, 2] (-1 padded) -> presence float32 [N, K], direction int32 [N, K] (-1)."""
    n = len(digits)
    presence = np.zeros((n, k), np.float32)
    direction = np.full((n, k), -1, np.int32)
    for j in range(digits.shape[1]):
        ok = digits[:, j] >= 0
        presence[np.flatnonzero(ok), digits[ok, j]] = 1.0
        direction[np.flatnonzero(ok), digits[ok, j]] = directions[ok, j]
    return presence, direction


def make_chunk(
    num_clips: int, seed: int, cfg: ReaderConfig, speeds: tuple[tuple[float, float] | None, ...] = (None,)
) -> tuple[np.ndarray, ...]:
    """Fresh clips, an equal share from each split and each speed range (None: the generator's default),
    shuffled together (a batch from one split teaches its direction prior, e.g. test clips always show a
    held-out pair, and the next batches unteach it):
    grey uint8 [N, T, H, W], presence float32 [N, 10], direction int32 [N, 10]."""
    from sora_jax.data.moving_digits import generate

    parts = []
    share = num_clips // (2 * len(speeds))
    for split in ("train", "test"):
        for k, speed in enumerate(speeds):
            data = generate(
                split,
                share,
                seed=seed + 100_000 * k,
                num_frames=cfg.num_frames,
                height=cfg.height,
                width=cfg.width,
                speed=speed,
            )
            grey = np.round(data["video"].astype(np.float32).mean(-1)).astype(np.uint8)
            parts.append((grey, *_labels(data["digits"], data["directions"], cfg.num_digits)))
    order = np.random.default_rng(seed).permutation(2 * len(speeds) * share)
    return tuple(np.concatenate(arrays)[order] for arrays in zip(*parts))


def stream_batches(
    cfg: ReaderConfig,
    batch: int,
    seed: int,
    chunk: int = 2048,
    speeds: tuple[tuple[float, float] | None, ...] = (None,),
) -> Iterator[tuple[np.ndarray, ...]]:
    """Endless batches of never-repeated clips (chunk c uses seed ``seed + c``), generated one chunk ahead
    in a background thread."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    pending = pool.submit(make_chunk, chunk, seed, cfg, speeds)
    c = 0
    try:
        while True:
            x, p, d = pending.result()
            c += 1
            pending = pool.submit(make_chunk, chunk, seed + c, cfg, speeds)
            for i in range(0, len(x) - batch + 1, batch):
                yield x[i : i + batch], p[i : i + batch], d[i : i + batch]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def loss_fn(model: DigitReader, x, presence, direction):
    """BCE on presence of each digit + CE on the direction of each present digit."""
    pres_logits, dir_logits = model(x)
    bce = optax.sigmoid_binary_cross_entropy(pres_logits, presence).sum(-1).mean()
    mask = direction >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(dir_logits, jnp.maximum(direction, 0))
    ce = (ce * mask).sum() / jnp.maximum(mask.sum(), 1)
    exact_digits = ((pres_logits > 0) == (presence > 0.5)).all(-1)
    dir_ok = ((dir_logits.argmax(-1) == direction) | ~mask).all(-1)
    return bce + ce, {"bce": bce, "ce": ce, "exact": (exact_digits & dir_ok).mean()}


def augment(key: jax.Array, x: jax.Array, strength: float = 1.0) -> jax.Array:
    """Brightness in [1 - 0.4 s, 1] and Gaussian noise (sigma in [0, 0.08 s]) on grey clips [B, T, H, W] in
    [0, 1], s = ``strength`` (0 turns augmentation off)."""
    k1, k2, k3 = jax.random.split(key, 3)
    b = x.shape[0]
    gain = jax.random.uniform(k1, (b, 1, 1, 1), minval=1.0 - 0.4 * strength, maxval=1.0)
    sigma = jax.random.uniform(k2, (b, 1, 1, 1), maxval=0.08 * strength)
    return jnp.clip(x * gain + sigma * jax.random.normal(k3, x.shape), 0.0, 1.0)


def evaluate(
    model: DigitReader, split: str, num_clips: int, seed: int, speed: tuple[float, float] | None = None
) -> dict:
    """Exact-reading accuracy and adherence metrics on fresh clips of ``split`` (seed never trained on)."""
    from sora_jax.data.moving_digits import generate

    cfg = model.cfg
    data = generate(
        split,
        num_clips,
        seed=seed,
        num_frames=cfg.num_frames,
        height=cfg.height,
        width=cfg.width,
        speed=speed,
    )
    readings = decode(*predict(model, data["video"]), cfg.directions)
    intended = [
        [(int(d), int(r)) for d, r in zip(ds, rs) if d >= 0]
        for ds, rs in zip(data["digits"], data["directions"])
    ]
    return score(readings, intended)


def _speeds(specs: list[str]) -> tuple[tuple[float, float] | None, ...]:
    """``["default", "1:2"]`` -> ``(None, (1.0, 2.0))``."""
    out = []
    for s in specs:
        if s == "default":
            out.append(None)
            continue
        try:
            lo, hi = (float(v) for v in s.split(":"))
        except ValueError:
            raise SystemExit(f"reader_training: --speeds wants 'default' or MIN:MAX, got {s!r}") from None
        out.append((lo, hi))
    return tuple(out)


def train(args: argparse.Namespace) -> tuple[DigitReader, dict]:
    cfg = ReaderConfig(num_frames=args.frames, height=args.size, width=args.size)
    t0 = time.time()
    speeds = _speeds(args.speeds)
    batches = stream_batches(cfg, args.batch, args.seed, speeds=speeds)

    if args.init:  # continue training saved weights (its config wins)
        model = load_reader(args.init)
        cfg = dataclasses.replace(model.cfg, metrics={})
        model.cfg = cfg
    else:
        model = DigitReader(cfg, rngs=nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10), args.steps)
    opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    @jax.jit
    def step(state, key, x_u8, presence, direction):
        model, opt = nnx.merge(graphdef, state)
        x = augment(key, x_u8.astype(jnp.float32) / 255.0, args.augment)
        grads, aux = nnx.grad(loss_fn, has_aux=True)(model, x, presence, direction)
        opt.update(model, grads)
        return nnx.state((model, opt)), aux

    key = jax.random.key(args.seed)
    bar = tqdm(range(args.steps), desc="reader", mininterval=2.0)
    ema = None
    for i in bar:
        state, aux = step(state, jax.random.fold_in(key, i), *next(batches))
        if i % 25 == 0 or i == args.steps - 1:
            aux = {k: float(v) for k, v in aux.items()}
            if not np.isfinite(aux["bce"] + aux["ce"]):
                raise FloatingPointError(f"reader loss is not finite at step {i}: {aux}")
            ema = aux if ema is None else {k: 0.8 * ema[k] + 0.2 * aux[k] for k in aux}
            bar.set_postfix(bce=f"{ema['bce']:.3f}", ce=f"{ema['ce']:.3f}", exact=f"{ema['exact']:.3f}")
    batches.close()
    model, _ = nnx.merge(graphdef, state)

    metrics = {
        "train_seconds": round(time.time() - t0, 1),
        "steps": args.steps,
        "lr": args.lr,
        "augment": args.augment,
    }
    if args.init:
        metrics["init"] = f"{args.init} (seed {args.seed})"
    for speed in speeds:
        tag = "" if speed is None else f"_speed_{speed[0]:g}_{speed[1]:g}"
        for split in ("test", "train"):
            m = evaluate(model, split, args.eval_clips, seed=0, speed=speed)
            metrics[f"{split}_exact{tag}"] = m["both_accuracy"]
            metrics[f"{split}_digit{tag}"] = m["digit_accuracy"]
            metrics[f"{split}_direction{tag}"] = m["direction_accuracy"]
    metrics["eval"] = (
        f"generate(split, {args.eval_clips}, seed=0); trained on {args.steps * args.batch} fresh clips "
        f"of both splits, seeds >= {args.seed}"
    )
    return model, metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="where to write the .npz weights")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=1000, help="data/init seed; evaluation uses seed 0")
    parser.add_argument("--eval-clips", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--augment", type=float, default=1.0, help="augmentation strength (0: off)")
    parser.add_argument("--init", default=None, help="continue from these weights (their frames/size win)")
    parser.add_argument(
        "--speeds",
        nargs="+",
        default=["default"],
        help="speed ranges to train on, equal shares: 'default' (the generator's) or MIN:MAX px/frame",
    )
    args = parser.parse_args(argv)
    if args.seed < 200:
        parser.error("--seed must be >= 200: seeds below are the evaluation and test clips")
    model, metrics = train(args)
    cfg = dataclasses.replace(model.cfg, metrics=metrics)
    path = save_reader(args.out, model, cfg)
    print(
        f"test clips read exactly: {metrics['test_exact']:.4f} (digits {metrics['test_digit']:.4f}, "
        f"directions {metrics['test_direction']:.4f}); train clips: {metrics['train_exact']:.4f}",
        flush=True,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
