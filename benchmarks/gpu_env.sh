# Sourced by the benchmarks/gpu_*.sh scripts: $OUT for results, unbuffered Python, and on the GPU machine the
# carried wheels (.whl/, from ../shared/device/wheels.sh) installed into /tmp/site. SMOKE=1: a CPU dry run.
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ -z "${SMOKE:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
