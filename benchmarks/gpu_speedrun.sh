#!/usr/bin/env bash
# The GPU speedrun record in one device call (benchmarks/speedrun.py, issue 16): configs/digits_small.py with
# the trainable text encoder, first a short compile-and-time run of the cuDNN flash attention path and one of
# the XLA path (TIME_S seconds of training each, no evaluation), then the record: TRAIN_S seconds of training
# with the faster path and the test-split adherence table on NP prompts. Each run writes its own JSON into
# $OUT; the compiled steps are shared through a persistent compilation cache.
#
#   ../shared/device/wheels.sh                        # once, here: .whl/ with grain, clu, ...
#   device run: bash benchmarks/gpu_speedrun.sh       (carry .whl)
# On a CPU, for a dry run:  OUT=/tmp/o SMOKE=1 bash benchmarks/gpu_speedrun.sh
set -u
source benchmarks/gpu_env.sh
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
PY=python3
CFG=configs/digits_small.py
TIME_S=${TIME_S:-20}
TRAIN_S=${TRAIN_S:-270}
NP=${NP:-256}
NTRAIN=50000; NTEST=1024   # digits_small's data
STEPS=${STEPS:-9000}  # the schedule's horizon: about the steps the budget buys
COMMON=(text.encoder=trainable optim.warmup_steps=500 data.num_workers=4 train.num_steps=$STEPS)
if [ -n "${SMOKE:-}" ]; then
  COMMON+=(model.variant=smoke data.num_train=256 data.num_test=64 data.batch_size=8 data.num_workers=0
           model.dtype=float32)
  TIME_S=3; TRAIN_S=${TRAIN_S_SMOKE:-5}; NP=8; NTRAIN=256; NTEST=64
fi
D=/tmp/sr_data
{
  date -u; nvidia-smi -L 2>/dev/null
  $PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  t0=$(date +%s)
  $PY -m data_pipelines.moving_digits --out $D --num_train $NTRAIN --num_test $NTEST --num_frames 8 --height 32 \
    --width 32 --fps 8 --seed 0 --speed 1 2 2>&1 | tr '\r' '\n' | tail -1; echo "data $(( $(date +%s) - t0 )) s"
  for impl in cudnn xla; do
    w=/tmp/sr_time_$impl; over=("${COMMON[@]}" model.attention_impl=$impl data.path=$D)
    t0=$(date +%s)
    timeout 240 $PY benchmarks/speedrun.py --config $CFG --budget_s $TIME_S --num_prompts 0 --workdir $w \
      --out $OUT/time_$impl.json --override "${over[@]}" 2>&1 | grep -v -i "warn\|absl"
    echo "time $impl rc=${PIPESTATUS[0]} $(( $(date +%s) - t0 )) s"
  done
  IMPL=$($PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
rates = {}
for impl in ("cudnn", "xla"):
    p = Path(sys.argv[1]) / f"time_{impl}.json"
    if p.is_file():
        rates[impl] = json.loads(p.read_text())["steps_per_s"]
print(max(rates, key=rates.get) if rates else "xla")
EOF
)
  echo "record run with attention_impl=$IMPL"
  t0=$(date +%s)
  timeout $((TRAIN_S + 200)) $PY benchmarks/speedrun.py --config $CFG --budget_s $TRAIN_S --num_prompts $NP \
    --workdir /tmp/sr_record --out $OUT/speedrun_digits_small.json \
    --override "${COMMON[@]}" model.attention_impl=$IMPL data.path=$D 2>&1 | grep -v -i "warn\|absl\|sample: "
  echo "record rc=${PIPESTATUS[0]} $(( $(date +%s) - t0 )) s"
  cp /tmp/sr_record/eval/adherence_test.json $OUT/ 2>/dev/null
  date -u
} 2>&1 | tee $OUT/log.txt
