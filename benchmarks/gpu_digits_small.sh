#!/usr/bin/env bash
# One GPU session's measurements, as run through the device tool (Python 3.12, jax with CUDA, no network):
# train configs/digits_small.py (frame-conditioning masks on, trainable text encoder) for a time budget,
# then score text-to-video adherence on test prompts, the video-prompting checks (i2v, extend, connect,
# 60-second videos) and sampling speed; while those (latency-bound) evaluations run, train
# configs/vae_digits.py at full width for a time budget in a second process and score its test PSNR.
# Each process takes at most 45% of the GPU's memory. Everything small lands in $OUT as it is made.
#
#   ../shared/device/wheels.sh                       # once, here: .whl/ with grain, clu, av, ...
#   device run: bash benchmarks/gpu_digits_small.sh  (carry .whl)
# On a CPU, for a dry run:  OUT=/tmp/o SMOKE=1 bash benchmarks/gpu_digits_small.sh
set -u
source benchmarks/gpu_env.sh
PY=python3
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
W=/tmp/ds_run
V=/tmp/vae_run
VAE_S=${VAE_S:-170}
VARGS=(--config.vae.base_width=0 --config.data.batch_size=32 --config.optim.lr=1e-3 --config.train.num_steps=30000
       --config.train.time_limit_s=$VAE_S --config.train.ckpt_every=100000 --config.optim.ema_decay=0.999
       --config.data.num_train=20000 --config.data.num_test=256 --config.data.num_workers=4)
TRAIN_S=${TRAIN_S:-300}
STEPS=${STEPS:-9000}
LONG_S=${LONG_S:-60}
ARGS=(--config.text.encoder=trainable --config.model.attention_impl=xla --config.train.time_limit_s=$TRAIN_S
      --config.train.num_steps=$STEPS --config.optim.warmup_steps=500 --config.train.ckpt_every=100000
      --config.data.num_workers=4 --config.eval.every_steps=0)  # timed as measured: no evaluation in training
NP=256; NC=64; NL=16
if [ -n "${SMOKE:-}" ]; then
  ARGS+=(--config.model.variant=smoke --config.data.num_train=256 --config.data.num_test=64
         --config.data.batch_size=8 --config.data.num_workers=0 --config.model.dtype=float32)
  NP=8; NC=8; NL=2; LONG_S=${LONG_S_SMOKE:-4}
  VARGS+=(--config.vae.variant=smoke --config.data.num_train=64 --config.data.num_test=16 --config.data.batch_size=4
          --config.data.num_workers=0)
fi
{
  date -u; nvidia-smi -L 2>/dev/null
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  t0=$(date +%s)
  timeout 900 $PY -m sora_jax.cli train --config configs/digits_small.py --workdir $W "${ARGS[@]}" 2>&1 \
    | tr '\r' '\n' | grep -v "^train: .*it/s\]$" | grep -v "^train: *[0-9]*%" ; echo "train rc=${PIPESTATUS[0]} $(( $(date +%s) - t0 )) s"
  grep -h . $W/metrics.jsonl 2>/dev/null | tail -3
  ( t1=$(date +%s); timeout $((VAE_S + 120)) $PY -m sora_jax.cli train --config configs/vae_digits.py --workdir $V "${VARGS[@]}" 2>&1 \
      | tr '\r' '\n' | grep -v "^train: " | grep -v "^moving digits"; echo "vae train rc=${PIPESTATUS[0]} $(( $(date +%s) - t1 )) s"
    grep -h . $V/metrics.jsonl 2>/dev/null | tail -2
    timeout 100 $PY -m sora_jax.cli eval --workdir $V --num_clips 256 2>&1 | tail -1; echo "vae eval rc=$?"
    cp $V/eval/reconstruction_test.json $OUT/vae_reconstruction_test.json 2>/dev/null ) > $OUT/vae_log.txt 2>&1 &
  VAE_PID=$!
  t0=$(date +%s)
  timeout 240 $PY -m sora_jax.cli eval --workdir $W --num_prompts $NP 2>&1 | tail -2; echo "eval rc=$? $(( $(date +%s) - t0 )) s"
  cp $W/eval/adherence_test.json $OUT/ 2>/dev/null
  t0=$(date +%s)
  timeout 300 $PY -m sora_jax.cli eval --workdir $W --prompting --num_prompts $NC --num_long $NL --seconds $LONG_S 2>&1 \
    | tr '\r' '\n' | grep -v "segments: " | tail -3; echo "prompting rc=$? $(( $(date +%s) - t0 )) s"
  cp $W/eval/prompting.json $W/eval/prompting_long.mp4 $W/eval/prompting_connect.mp4 $OUT/ 2>/dev/null
  timeout 120 $PY benchmarks/sample.py --config configs/digits_small.py --steps 32 --batch 1 16 --repeats 3 \
    --out $OUT/sample_bench.json --override text.encoder=trainable model.dtype=bfloat16 2>&1 | grep -v Warn | tail -4
  wait $VAE_PID; cat $OUT/vae_log.txt
  date -u
} 2>&1 | tee $OUT/log.txt
