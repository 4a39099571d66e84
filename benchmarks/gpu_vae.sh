#!/usr/bin/env bash
# One GPU call: train configs/vae_digits.py at full width alone on the GPU for a time budget, then score
# test-clip PSNR with the raw weights and with the EMA weights (sora-jax eval). Carry .whl (see
# benchmarks/gpu_digits_small.sh). Dry run on a CPU: OUT=/tmp/o SMOKE=1 bash benchmarks/gpu_vae.sh
set -u
source benchmarks/gpu_env.sh
V=/tmp/vae_run
VAE_S=${VAE_S:-140}
VARGS=(--config.vae.base_width=0 --config.data.batch_size=32 --config.optim.lr=1e-3 --config.train.num_steps=30000
       --config.train.time_limit_s=$VAE_S --config.train.ckpt_every=100000 --config.optim.ema_decay=0.99
       --config.data.num_train=20000 --config.data.num_test=256 --config.data.num_workers=4)
[ -n "${SMOKE:-}" ] && VARGS+=(--config.vae.variant=smoke --config.data.num_train=64 --config.data.num_test=16
  --config.data.batch_size=4 --config.data.num_workers=0)
{
  date -u; nvidia-smi -L 2>/dev/null
  t1=$(date +%s)
  python3 -m sora_jax.cli train --config configs/vae_digits.py --workdir $V "${VARGS[@]}" 2>&1 \
    | tr '\r' '\n' | grep -v "^train: " | grep -v "^moving digits"; echo "vae train rc=${PIPESTATUS[0]} $(( $(date +%s) - t1 )) s"
  grep -h . $V/metrics.jsonl | tail -3
  python3 -m sora_jax.cli eval --workdir $V --num_clips 256 --raw_params --out $V/eval_raw 2>&1 | tail -1
  cp $V/eval_raw/reconstruction_test.json $OUT/vae_raw.json
  python3 -m sora_jax.cli eval --workdir $V --num_clips 256 2>&1 | tail -1
  cp $V/eval/reconstruction_test.json $OUT/vae_ema.json
  date -u
} 2>&1 | tee $OUT/log.txt
