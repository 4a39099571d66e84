"""The trainer, one ordered script (big_vision's ``train.py`` shape). ``train(cfg, workdir)`` runs:

    mesh -> batch specs (from the config) -> abstract state + shardings (``build_train_fns``) -> [compile_only:
    compile the step for every batch shape, memory checked (the peak over all of them), stop] -> the same
    compile in a thread, while the main thread opens the train stream -> the data card (its {hash, summary}
    goes into every checkpoint) -> resume, or init (fine-tuning: ``model.init_from``'s parameters,
    ``_initial_state``) -> the compiled steps -> loop (metrics, checkpoints, evaluation, time limit, preemption).

LoRA (``config.lora``): the state (optimizer, EMA, checkpoints) holds the adapters alone; the frozen base
(``lora.init_from``'s parameters, stored as ``lora.base_dtype`` says: float32 / bfloat16 / int8 / fp8) enters
the step as ``frozen["base"]``, like a latent model's VAE; DoRA's magnitudes start from that base.

Each task has one step builder (``_STEP_BUILDERS``: the DiT's, the VAE's), all on the shared update of
``state.apply_update``. Extend through config, not forks.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sora_jax import factory, loading
from sora_jax.choices import DataContent, Task, TextEncoderKind
from sora_jax.config import ConfigError, task
from sora_jax.data import datacard, moving_digits, pipeline
from sora_jax.eval import in_training
from sora_jax.models import quant
from sora_jax.models.perceptual import load_perceptual
from sora_jax.parallel import sharding
from sora_jax.parallel.mesh import make_mesh
from sora_jax.train import checkpoint, metrics, repa
from sora_jax.train import data as data_lib
from sora_jax.train.preemption import PreemptionWatch
from sora_jax.train.program import compiled_memory, largest_constant
from sora_jax.train.state import (
    TrainState,
    dora_start,
    init_state,
    lr_schedule,
    make_optimizer,
    split_lora,
    with_base,
)
from sora_jax.train.step import (
    Step,
    VAELossWeights,
    frozen_autoencoder_params,
    make_loss_fn,
    make_step,
    make_vae_gan_step,
    make_vae_loss_fn,
)

log = logging.getLogger("sora_jax.train")


# ------------------------------------------------------------------------------------------- the step


@dataclasses.dataclass(frozen=True)
class TrainFns:
    """What ``build_train_fns`` gives the loop."""

    init: Callable[[], TrainState]  # jitted, the state placed by ``abstract_state``'s shardings
    step: Callable  # jitted (state, batch, frozen) -> (state, metrics); the state is donated
    abstract_state: TrainState  # ShapeDtypeStructs carrying their NamedShardings
    graphdef: nnx.GraphDef  # of the trained model
    frozen: dict  # parameters the step uses but does not train (a VAE, LPIPS), placed on the mesh
    batch_keys: frozenset[str]  # what the step reads from a batch


@dataclasses.dataclass(frozen=True)
class _TaskStep:
    step: Step
    frozen: dict
    extra_state: Callable[[], dict] = dict  # added to the initial state (a discriminator and its optimizer)


def _null_text(cfg: ml_collections.ConfigDict, shapes_only: bool, table) -> tuple[np.ndarray, np.ndarray]:
    """The empty prompt as the model's text input (``[1, L]`` ids or ``[1, L, F]`` frozen features, mask
    ``[1, L]``): what caption dropout puts in. A T5 / UMT5 encoder's comes from the captions' embedding
    ``table`` (which holds "", float16) when there is one, and ``shapes_only`` (compile-only) gives zeros, so
    that encoder (UMT5-XXL: 11 GB) is not loaded; MiniLM (90 MB) computes it in float32, as it always did."""
    if table is not None and TextEncoderKind(cfg.text.encoder) is TextEncoderKind.T5:
        return table.encode([""])
    frozen = factory.frozen_dim(cfg)
    if shapes_only and frozen:
        length = factory.text_length(cfg)
        return np.zeros((1, length, frozen), np.float32), np.zeros((1, length), bool)
    return factory.make_text_input(cfg).encode([""])


def _t2v_step(
    cfg: ml_collections.ConfigDict, graphdef, tx, lr_fn, shapes_only: bool = False, table=None
) -> _TaskStep:
    # precomputed latents (data_pipelines/encode_latents.py): the step never encodes, so no VAE weights
    latents = DataContent(cfg.data.get("content", "video")) is DataContent.LATENTS
    autoencoder = factory.make_autoencoder(cfg) if latents else loading.load_autoencoder(cfg)
    null_text, null_mask = _null_text(cfg, shapes_only, table)
    repa_term, repa_frozen = repa.from_config(cfg)
    loss_fn = functools.partial(
        make_loss_fn,
        graphdef,
        factory.make_process(cfg),
        autoencoder,
        null_text=jnp.asarray(null_text[0]),
        null_mask=jnp.asarray(null_mask[0]),
        caption_dropout=cfg.text.caption_dropout,
        mask_probs=factory.mask_probs(cfg),
        mask_max_frames=cfg.get("conditioning", {}).get("max_frames", 1),
    )
    until = repa.until_step(cfg)  # REPA off from this step on (repa.until), None: never
    late = None if until is None else (until, loss_fn(repa=None))
    step = make_step(loss_fn(repa=repa_term), tx, ema_decay=cfg.optim.ema_decay, lr_fn=lr_fn, late=late)
    return _TaskStep(step, frozen_autoencoder_params(autoencoder) | repa_frozen)


def _vae_step(
    cfg: ml_collections.ConfigDict, graphdef, tx, lr_fn, shapes_only: bool = False, table=None
) -> _TaskStep:
    v = cfg.vae
    weights = VAELossWeights(v.l1_weight, v.l2_weight, v.kl_weight, v.get("perceptual_weight", 0.0))
    frozen = {}
    if weights.perceptual > 0:
        if not v.get("perceptual_path"):
            raise ConfigError(
                "config.vae.perceptual_weight > 0 needs config.vae.perceptual_path (VGG16 .npz)"
            )
        frozen["perceptual"] = load_perceptual(v.perceptual_path)
    if v.get("gan_weight", 0.0) <= 0:
        return _TaskStep(
            make_step(make_vae_loss_fn(graphdef, weights), tx, ema_decay=cfg.optim.ema_decay, lr_fn=lr_fn),
            frozen,
        )
    disc_tx = make_optimizer(cfg, lr=v.get("disc_lr", 0.0) or cfg.optim.lr)
    disc_graphdef, _ = nnx.split(nnx.eval_shape(lambda: factory.make_discriminator(cfg, 0)), nnx.Param)

    def extra_state() -> dict:
        disc = nnx.state(factory.make_discriminator(cfg, cfg.seed + 1), nnx.Param)
        return {"disc": disc, "disc_opt_state": disc_tx.init(disc)}

    step = make_vae_gan_step(
        graphdef,
        disc_graphdef,
        tx,
        disc_tx,
        weights,
        gan_weight=v.gan_weight,
        gan_start=v.gan_start,
        ema_decay=cfg.optim.ema_decay,
        lr_fn=lr_fn,
    )
    return _TaskStep(step, frozen, extra_state)


_STEP_BUILDERS: dict[Task, Callable[..., _TaskStep]] = {Task.T2V: _t2v_step, Task.VAE: _vae_step}


def build_train_fns(
    cfg: ml_collections.ConfigDict, mesh, *, shapes_only: bool = False, text_table=None
) -> TrainFns:
    """The jitted init and step of ``cfg`` on ``mesh`` (``cfg`` resolved: ``loading.resolve_autoencoder``).
    ``shapes_only``: for compiling alone (a frozen text encoder's empty prompt as zeros, nothing loaded);
    ``text_table``: the captions' ``EmbeddingTable`` of a frozen encoder, for the empty prompt's features."""
    model = factory.abstract_state(cfg, mesh)
    tx = make_optimizer(cfg)
    step_args = (cfg, model.graphdef, tx, lr_schedule(cfg), shapes_only, text_table)
    built = _STEP_BUILDERS[task(cfg)](*step_args)
    lora = factory.lora_spec(cfg) is not None
    trainable = nnx.LoRAParam if lora else nnx.Param  # LoRA: the optimizer and the EMA see adapters alone

    def init_fn() -> TrainState:
        return init_state(factory.make_module(cfg, cfg.seed), tx, cfg.seed, trainable) | built.extra_state()

    abstract = jax.eval_shape(init_fn)
    state_sharding = sharding.state_shardings(abstract, mesh)
    frozen_sharding = sharding.state_shardings(built.frozen, mesh)
    frozen = jax.jit(lambda f: f, out_shardings=frozen_sharding)(built.frozen) if built.frozen else {}
    if lora:  # the frozen base: a step argument like a VAE's weights, outside the state and its checkpoints
        base = _lora_base(cfg, split_lora(model.params)[1], shapes_only)
        frozen, frozen_sharding = frozen | {"base": base}, frozen_sharding | {"base": _shardings(base)}
    batch_sharding = {k: v.sharding for k, v in data_lib.abstract_batch(cfg, mesh).items()}

    def sharded_step(state, batch, frozen):
        with sharding.activation_sharding(mesh):
            return built.step(state, batch, frozen)

    step = jax.jit(
        sharded_step,
        in_shardings=(state_sharding, batch_sharding, frozen_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    placed = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )
    init = jax.jit(init_fn, out_shardings=state_sharding)
    return TrainFns(init, step, placed, model.graphdef, frozen, frozenset(batch_sharding))


def _shardings(tree):
    return jax.tree.map(lambda a: a.sharding, tree)


def _lora_base(cfg: ml_collections.ConfigDict, abstract_base: nnx.State, shapes_only: bool) -> nnx.State:
    """A LoRA run's frozen base on the mesh (``loading.lora_base``), stored as ``lora.base_dtype`` says;
    ``shapes_only``: its shapes (``quant.stored_abstract``)."""
    if shapes_only:
        return quant.stored_abstract(abstract_base, cfg.lora.get("base_dtype", ""))
    if not cfg.lora.init_from:
        log.warning("LoRA without config.lora.init_from: the frozen base is the seed's random initialisation")
    base = loading.lora_base(cfg, abstract_base)
    log.info("LoRA: frozen base from %s", cfg.lora.init_from or f"seed {cfg.seed}")
    return base


# ------------------------------------------------------------------------------------------- the trainer


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    compile_only: bool = False,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    """Trains ``cfg`` in ``workdir`` (resuming from its latest checkpoint). Returns the last logged metrics
    with the run's timings (``compile_seconds``, ``train_seconds``, ``input_seconds``, ``steps_run``).

    ``compile_only``: compile the step for every batch shape and return the peak memory over all of them.
    ``devices``: the mesh's devices (default: all devices of all processes).
    With ``config.eval.every_steps`` > 0 the EMA weights are evaluated in the loop (``_Evals``); the last
    evaluation's ``eval/*`` scalars and ``eval_seconds`` (all evaluations) join the result.
    """
    workdir = Path(workdir)
    cfg = loading.resolve_init(loading.resolve_autoencoder(cfg))
    evaluating = cfg.get("eval") is not None and cfg.eval.every_steps > 0
    if evaluating:
        in_training.check_config(cfg)  # a metric's typo costs no compile
    mesh = make_mesh(cfg.mesh, devices)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    specs = data_lib.batch_specs(cfg, mesh)
    frozen_text = task(cfg) is Task.T2V and factory.frozen_dim(cfg) > 0 and not compile_only
    # T5's empty prompt comes from the captions' table (``_null_text``); MiniLM's table is made while the
    # step compiles
    t5 = frozen_text and TextEncoderKind(cfg.text.encoder) is TextEncoderKind.T5
    table = data_lib.ensure_caption_table(cfg, workdir) if t5 else None
    fns = build_train_fns(cfg, mesh, shapes_only=compile_only, text_table=table)
    sizes = _state_sizes(cfg, fns, mesh)
    if compile_only:
        executables, memory, seconds = _timed_compile(fns, specs)
        return {
            "compiled": True,
            "compiled_steps": len(executables),
            "compile_seconds": seconds,
            **memory,
            **sizes,
        }

    # XLA compiles the step on one core while the captions' table, the data stream (with REPA's table) and the
    # initial state are made on the others (``compile_seconds`` is the compile's own wall-clock)
    compiling = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
    compiled = compiling.submit(_timed_compile, fns, specs)
    compiling.shutdown(wait=False)
    if frozen_text and table is None:
        data_lib.ensure_caption_table(cfg, workdir)  # kept in the workdir; the stream reads it from there
    timings = {}
    stream = iter(data_lib.open_train_stream(cfg, workdir, mesh, timings))
    card = _data_card(cfg, workdir)
    mgr = checkpoint.manager(
        workdir, keep=cfg.train.keep_checkpoints, keep_every=cfg.train.get("keep_every", 0)
    )
    evals = None
    try:
        resumed = checkpoint.restore_latest_good(workdir, mgr, fns.abstract_state, cfg, data_iter=stream)
        if resumed is not None:
            log.info("resumed from step %d in %s", resumed[0], workdir)
        start, state = resumed if resumed is not None else (0, _initial_state(cfg, fns))
        executables, _, seconds = compiled.result()
        timings |= {"compiled_steps": len(executables), "compile_seconds": seconds}
        evals = _Evals(cfg, workdir, fns.graphdef, mesh, card, fns.frozen) if evaluating else None
        pre = timings.get("repa_precompute_seconds", 0.0)  # REPA's table (repa.precompute) is training time
        last = _loop(
            cfg, workdir, mesh, fns, executables, state, start, stream, mgr, progress, evals, card, pre
        )
    finally:
        mgr.wait_until_finished()
        mgr.close()
        if evals is not None:
            evals.close()
    return last | timings


def _data_card(cfg: ml_collections.ConfigDict, workdir: Path) -> dict | None:
    """{hash, summary} of the training data's card (``sora_jax.data.datacard``; a latent dataset's is its
    source's), or None: TFDS data, or a folder without a card (ingested before cards). A bundled moving-digits
    build from before cards gets its card written now."""
    tfds = cfg.data.get("tfds")
    if tfds is not None and tfds.get("name"):
        log.warning("no data card: TFDS data (%s)", tfds.name)
        return None
    path = pipeline.dataset_dir(cfg, workdir)
    meta = pipeline.read_metadata(path)
    if meta.get("generator") == moving_digits.GENERATOR and "source" not in meta:  # not its latents
        card = moving_digits.ensure_card(path, write=jax.process_index() == 0)
    else:
        card = datacard.find_card(path)
    if card is None:
        log.warning("no data card in %s (re-ingest it to make one): checkpoints record none", path)
        return None
    log.info("data card %s: %s", card["hash"][:12], card["summary"])
    return datacard.reference(card)


def _initial_state(cfg: ml_collections.ConfigDict, fns: TrainFns) -> TrainState:
    """The state at step 0: ``fns.init()``, its parameters and EMA replaced by those of the workdir
    ``config.model.init_from`` names when set (fine-tuning: fresh optimizer state, EMA = the loaded weights).
    A LoRA run's state is its adapters (B = 0: step 0 is the base); its base is ``fns.frozen["base"]``."""
    state = fns.init()
    if (cfg.get("lora") or {}).get(
        "dora", False
    ) and "base" in fns.frozen:  # DoRA: m = ||W||_I of the frozen base
        shardings = jax.tree.map(lambda a: a.sharding, fns.abstract_state["params"])
        return dora_start(fns.graphdef, state, fns.frozen["base"], shardings)
    source = cfg.model.get("init_from", "")
    if not source:
        return state
    step, params = loading.init_params(source, fns.abstract_state["params"])
    log.info("fine-tuning: parameters of %s (its step %d); fresh optimizer state, EMA = them", source, step)
    shardings = jax.tree.map(lambda a: a.sharding, fns.abstract_state["ema"])
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)
    return state | {"params": params, "ema": copy(params)}


def _batch_key(batch: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))


def _timed_compile(fns: TrainFns, specs: list[dict]) -> tuple[dict, dict, float]:
    """``_compile`` and its wall-clock seconds."""
    t0 = time.perf_counter()
    return *_compile(fns, specs), time.perf_counter() - t0


def _compile(fns: TrainFns, specs: list[dict]) -> tuple[dict, dict]:
    """One executable per batch shape, and the memory report of the largest (``peak_gib`` over all), with
    the largest constant any of them holds."""
    executables, worst, constant = {}, {}, (0, "")
    for spec in specs:
        lowered = fns.step.lower(fns.abstract_state, spec, fns.frozen)
        constant = max(constant, largest_constant(lowered.as_text()))
        compiled = lowered.compile()
        executables[_batch_key(spec)] = compiled
        memory = compiled_memory(compiled)
        if memory.get("peak_gib", -1.0) > worst.get("peak_gib", -1.0):
            worst = memory | {
                "peak_batch": ",".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in sorted(spec.items()))
            }
    if worst:
        log.info(
            "compiled %d step(s); peak memory per device about %.3f GiB (args %.3f, temps %.3f) for batch %s",
            len(executables),
            worst["peak_gib"],
            worst["argument_gib"],
            worst["temp_gib"],
            worst["peak_batch"],
        )
    log.info("largest constant in the step: %d bytes (%s)", *constant)
    return executables, worst | {"largest_constant_bytes": constant[0], "largest_constant": constant[1]}


@dataclasses.dataclass
class _Window:
    """The steps since the last log line: their metrics (on device until logged) and their wall-clock."""

    pending: list = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def flush(self, writer, step: int) -> dict:
        host = [(s, jax.device_get(m)) for s, m in self.pending]
        metrics.check_finite(host)
        collection, coll = metrics.collection(host[0][1]), None
        for _, m in host:
            one = collection.single_from_model_output(**m)
            coll = one if coll is None else coll.merge(one)
        out = metrics.computed({k: float(v) for k, v in coll.compute().items()})
        out["steps_per_sec"] = len(host) / (time.perf_counter() - self.started)
        writer.write_scalars(step, out)
        self.pending, self.started = [], time.perf_counter()
        return out


def _loop(
    cfg, workdir, mesh, fns, executables, state, start, stream, mgr, progress, evals, card, already=0.0
) -> dict:
    """Steps from ``start`` to ``train.num_steps``, or until the time limit or a preemption notice; ``evals``
    (or None) evaluates when due; ``card`` (the data card's {hash, summary}, or None) goes into each save.
    ``already``: seconds of training work done before the first step (in ``train_seconds`` and the limit)."""
    total, log_every = cfg.train.num_steps, cfg.train.log_every
    time_limit = float(cfg.train.get("time_limit_s", 0.0))
    writer = metrics.MetricWriter(workdir)
    bar = tqdm(total=total, initial=start, desc="train", disable=not progress or jax.process_index() != 0)
    window, last, done = _Window(), {}, start
    started = trained_until = time.perf_counter() - already
    input_seconds = 0.0  # host time spent waiting for the next batch (the input pipeline's share)
    eval_share = 0.0  # seconds of evaluation inside [started, trained_until]: not training
    try:
        with PreemptionWatch() as preemption:
            for step in range(start, total):
                t_in = time.perf_counter()
                batch = _next_batch(stream, fns, mesh)
                input_seconds += time.perf_counter() - t_in
                key = _batch_key(batch)
                if key not in executables:  # not expected: every shape is compiled above
                    log.warning("compiling the step for an unexpected batch shape %s", key)
                    executables[key] = fns.step.lower(state, batch, fns.frozen).compile()
                state, step_metrics = executables[key](state, batch, fns.frozen)
                window.pending.append((step + 1, step_metrics))
                bar.update(1)
                done = step + 1
                if (
                    time_limit > 0 and len(window.pending) > 1
                ):  # two steps in flight at most: the device's clock
                    jax.block_until_ready(window.pending[-2][1])
                out_of_time = False  # every process decides at the same steps (every step when alone)
                if time_limit > 0 and (jax.process_count() == 1 or done % log_every == 0):
                    out_of_time = _agree(time.perf_counter() - started >= time_limit)
                stop = preemption.reached(done) or out_of_time
                if stop or done == total:  # training ends here: the clock stops before the last save
                    jax.block_until_ready(state)
                    trained_until = time.perf_counter()
                    eval_share = evals.seconds if evals is not None else 0.0
                if done % log_every == 0 or done == total:
                    last = window.flush(writer, done)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                elif stop or done % cfg.train.ckpt_every == 0:  # never save a state a NaN/Inf step produced
                    metrics.check_finite([(s, jax.device_get(m)) for s, m in window.pending])
                if stop or done == total or done % cfg.train.ckpt_every == 0:
                    checkpoint.save(mgr, done, state, cfg, stream, force=stop, datacard=card)
                if evals is not None and not stop and evals.due(done):
                    window.started += evals.run(done, state, window.pending, writer, stream)  # not the steps'
                if stop:
                    mgr.wait_until_finished()
                    why = f"time limit of {time_limit:g} s reached" if out_of_time else "preempted"
                    log.warning("%s: saved step %d in %s, exiting", why, done, workdir)
                    last |= {"time_limit_reached": True} if out_of_time else {"preempted": True}
                    break
    finally:
        bar.close()
        writer.close()
    return (
        last
        | (evals.summary() if evals is not None else {})
        | {
            "step": done,
            "steps_run": done - start,
            "train_seconds": trained_until - started - eval_share,
            "input_seconds": input_seconds,
        }
    )


class _Evals:
    """``config.eval`` in the loop: when due, ``InTrainingEvaluator`` on the EMA weights gathered to the host
    (every process gets the full ones and the same decisions: process 0's scalars), its ``eval/*`` scalars,
    ``eval/seconds`` and a grid of videos to the writer, a contact sheet to ``<workdir>/eval/``, and an
    improvement of ``eval.best_metric`` saved as the best checkpoint (``checkpoint.save_best``; resuming keeps
    the best of best.json). It reads the state and the data stream's position, never changes them."""

    def __init__(
        self, cfg: ml_collections.ConfigDict, workdir: Path, graphdef, mesh, card: dict | None, frozen: dict
    ):
        e = cfg.eval
        self.cfg, self.workdir, self.card, self.frozen = cfg, workdir, card, frozen
        self.every, self.total = e.every_steps, cfg.train.num_steps
        self.grid, self.metric = e.grid_videos, e.best_metric
        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        self.evaluator = in_training.InTrainingEvaluator(cfg, graphdef, workdir, devices=local)
        self.mgr = checkpoint.best_manager(workdir) if self.metric else None
        self.best = checkpoint.read_best(workdir) if self.metric else None
        if self.best is not None and self.best.get("metric") != self.metric:
            log.warning(
                "%s ranks by %s, this run by %s: the best starts afresh",
                checkpoint.BEST_FILE,
                self.best.get("metric"),
                self.metric,
            )
            self.best = None
        self.seconds, self.last = 0.0, {}

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def run(self, step: int, state: TrainState, pending: list, writer: metrics.MetricWriter, stream) -> float:
        """Evaluates ``state`` after ``step``; returns the seconds it took."""
        metrics.check_finite([(s, jax.device_get(m)) for s, m in pending])  # never a NaN state
        t0 = time.perf_counter()
        ev = self.evaluator(_host_tree(with_base(state["ema"], self.frozen)), step)  # LoRA: over its base
        scalars = _agreed(ev.scalars)  # every process decides on process 0's numbers
        kept = bool(self.metric) and in_training.improves(
            scalars[self.metric], ev.results[self.metric]["higher_is_better"], self.best
        )
        if kept:
            higher = bool(ev.results[self.metric]["higher_is_better"])
            info = {"metric": self.metric, "value": scalars[self.metric], "higher_is_better": higher}
            checkpoint.save_best(self.mgr, step, state, self.cfg, info, stream, datacard=self.card)
            self.best = {"step": step, **info}
        writer.write_videos(step, "eval/samples", ev.videos[: self.grid], fps=self.cfg.data.fps)
        if self.grid and jax.process_index() == 0:
            in_training.save_samples(ev, self.workdir / "eval", self.grid)
        seconds = time.perf_counter() - t0
        self.last = {f"eval/{k}": v for k, v in scalars.items()} | {"eval/seconds": seconds}
        writer.write_scalars(step, self.last)
        self.seconds += seconds
        log.info(
            "eval at step %d: %s (%.1f s)%s",
            step,
            ", ".join(f"{k} {r['value']:.4g}" for k, r in ev.results.items()),
            seconds,
            f"; best {self.metric} so far: kept in {self.mgr.directory}" if kept else "",
        )
        return seconds

    def summary(self) -> dict:
        return self.last | {"eval_seconds": self.seconds}

    def close(self) -> None:
        if self.mgr is not None:
            self.mgr.wait_until_finished()
            self.mgr.close()


def _next_batch(stream, fns: TrainFns, mesh) -> dict:
    """The next host batch as global arrays, keeping only what the step takes."""
    return pipeline.to_global({k: v for k, v in next(stream).items() if k in fns.batch_keys}, mesh)


def _host_tree(tree):
    """``tree`` of global arrays as full host arrays on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _agreed(scalars: dict[str, float]) -> dict[str, float]:
    """Process 0's scalars on every process (a no-op with one process)."""
    if jax.process_count() == 1:
        return scalars
    from jax.experimental import multihost_utils

    keys = sorted(scalars)
    values = multihost_utils.broadcast_one_to_all(np.asarray([scalars[k] for k in keys], np.float32))
    return {k: float(v) for k, v in zip(keys, np.asarray(values))}


def _agree(flag: bool) -> bool:
    """True when any process says so (processes stop at the same step); a no-op with one process."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def _state_sizes(cfg: ml_collections.ConfigDict, fns: TrainFns, mesh) -> dict[str, float]:
    """The train state's GiB (and a LoRA run's frozen base's), in all and per device, logged; warns when FSDP
    leaves parameters unsharded."""
    sizes = {}
    for name, tree in (("state", fns.abstract_state), ("lora_base", fns.frozen.get("base"))):
        if tree is not None:
            total, local = sharding.bytes_per_device(tree)
            sizes |= {f"{name}_gib": total / 2**30, f"{name}_gib_per_device": local / 2**30}
            base_dtype = name == "lora_base" and (cfg.lora.get("base_dtype", "") or "param_dtype")
            what = f"LoRA: frozen base ({base_dtype})" if base_dtype else "train state"
            log.info("%s: %.3f GiB in all, %.3f GiB per device", what, total / 2**30, local / 2**30)
    if mesh.shape["fsdp"] > 1:
        try:
            sharding.check_sufficiently_sharded(fns.abstract_state["params"], mesh, tolerance=0.1)
        except sharding.ShardingError as e:
            log.warning("%s", e)
    return sizes
