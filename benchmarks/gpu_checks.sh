#!/usr/bin/env bash
# The GPU checks, on a lent GPU machine, from the repository root, with .gpu/ carried
# (benchmarks/gpu_bundle.sh packs it here first). Steps, in the order given:
#   tests  tests/test_gpu.py (reduced precision at fp32's quality, the fp16 overflow, CUDA graphs,
#          `pan upscale` on a GPU actor, Ray Train with nccl and AMP then a resume): about 3 min
#   x4     benchmarks/gpu_pipeline.py at x4: the engine, then pipeline runs of a minute or more
#          on 16, 8 and 4 CPUs (busy fraction, steady rate, the cores that keep up): about 5 min
#   x2     the same at x2 on 16 and 8 CPUs: about 4 min
# Each step writes its log (and the benchmark's JSON) under $OUT, which the device tool returns,
# or /tmp/gpu-checks elsewhere. Two calls fit a session's 15 minutes of device time:
#   run(command="bash benchmarks/gpu_checks.sh tests x4", carry=[".gpu"], timeout_s=590)
#   run(command="bash benchmarks/gpu_checks.sh x2", carry=[".gpu"], timeout_s=400)
# A step that fails is reported and the next one still runs; the exit status counts the failures.
# PYTHON picks the interpreter (default python3: the image's, which holds torch); one that already
# imports Ray runs without the bundle (PYTHON=.venv/bin/python checks this script on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-checks}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! "$python" -c "import ray" 2>/dev/null; then
    site=/tmp/pan-gpu-site
    if [[ ! -d "$site/ray" ]]; then
        mkdir -p "$site" && tar -xJf .gpu/site.tar.xz -C "$site" || exit 1
    fi
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -d .gpu/shared ]]; then
    export PAN_SHARED="$PWD/.gpu/shared"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    echo "$(nproc) CPUs"
    "$python" -c "import sys, torch, ray, pydantic, imagecodecs, fpng; print('python', sys.version.split()[0],
        'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__)"
} 2>&1 | tee "$out/machine.txt"

failed=0
step() {
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s"
    if ((status != 0)); then failed=$((failed + 1)); fi
}
for name in "$@"; do
    case $name in
        tests) step tests "$python" -m pytest -q -n 0 -p no:cacheprovider -m gpu tests/test_gpu.py ;;
        x4) step x4 "$python" benchmarks/gpu_pipeline.py --scale 4 --cpus 16,8,4 --actors 1 \
            --seconds 20 --run-seconds 60 --json "$out/x4.json" ;;
        x2) step x2 "$python" benchmarks/gpu_pipeline.py --scale 2 --cpus 16,8 --actors 1 \
            --seconds 20 --run-seconds 60 --json "$out/x2.json" ;;
        *) echo "unknown step $name (tests, x4, x2)" >&2; failed=$((failed + 1)) ;;
    esac
done
exit "$failed"
