#!/usr/bin/env bash
# One GPU call (issue 22): does Wan-1.3B LoRA fit 24 GB at 480 x 832 and 81 frames on a real GPU compile? The
# training step's memory analysis on one GPU (benchmarks/lora_memory.py, --compile_only in child processes,
# nothing allocated) with cuDNN flash attention, then with model.ffn_chunk=4096, for the full fine-tune and LoRA
# with a bfloat16 / int8 base; the CPU counts are benchmarks/results/lora_memory_cpu_chunked*.json.
# Carry .whl (see benchmarks/gpu_digits_small.sh). Dry run on a CPU: OUT=/tmp/o SMOKE=1 bash benchmarks/gpu_lora_memory.sh
set -u
source benchmarks/gpu_env.sh
BACKEND=gpu
ARGS=(--models 1.3B --frames "${FRAMES:-81}" --options full,lora_bf16_base,lora_int8_base --timeout 240)
[ -n "${SMOKE:-}" ] && BACKEND=cpu && ARGS=(--models 1.3B --frames 5 --options lora_int8_base --timeout 240)
ATT=cudnn
[ -n "${SMOKE:-}" ] && ATT=chunked
{
  date -u; nvidia-smi -L 2>/dev/null
  python3 -m benchmarks.lora_memory --backend $BACKEND --attention $ATT "${ARGS[@]}" \
    --out "$OUT/lora_memory_gpu_${ATT}.json"; echo "rc=$?"
  python3 -m benchmarks.lora_memory --backend $BACKEND --attention $ATT --ffn_chunk 4096 "${ARGS[@]}" \
    --out "$OUT/lora_memory_gpu_${ATT}_ffn4096.json"; echo "rc=$?"
  date -u
} 2>&1 | tee "$OUT/log.txt"
