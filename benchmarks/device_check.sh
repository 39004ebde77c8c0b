#!/bin/bash
# The GPU checks of issue 12 (acceptance 4) as one prepared run, for a machine with a CUDA torch
# and nvcc but no torchrec or fbgemm (the `device` tool's): build the native ops with their CUDA
# kernels in place, run the CUDA parity tests against the CPU kernels and the reference (torch
# alone: --noconftest), then the bandwidth benchmark (SGD and Adagrad), and last compute-sanitizer's memcheck over
# a few parity cases. Everything it prints also lands in $OUT (default build/device).
#
#   device run:  bash benchmarks/device_check.sh        (about 5-7 minutes on an H200)
#
# Steps run on when one fails (each one's status is in $OUT/status.txt), so a single run says
# everything there is to say.
set -u
OUT=${OUT:-build/device}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
: > "$OUT/status.txt"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, record the status
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/status.txt"
}

# torch's extension build finds the toolkit from CUDA_HOME, else from nvcc's path, which a wrapper
# script (as /usr/local/bin/nvcc on some images) would make /usr/local: point it at the toolkit.
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda /usr/local/cuda-*; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME=$d; break; fi
  done
fi
echo "CUDA_HOME=${CUDA_HOME:-unset} ($(nvcc --version 2>/dev/null | tail -1))" | tee "$OUT/toolkit.txt"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv \
  | tee "$OUT/gpu.txt"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/gpu.txt"

# Hopper is sm_90; FIITED_EXT_CUDA=1 fails the build instead of silently leaving CUDA out.
step build 400 env FIITED_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
  MAX_JOBS="${MAX_JOBS:-16}" $PY setup.py -q build_ext --inplace
step registered 60 $PY -c "
import torchrec_fiited.ops.native as n
print('native', n.AVAILABLE, 'lookup', sorted(n.DEVICES), 'hash', sorted(n.HASH_DEVICES))
assert 'cuda' in n.DEVICES and 'cuda' in n.HASH_DEVICES, 'CUDA kernels not registered'"
step parity 300 $PY -m pytest --noconftest -p no:cacheprovider -q -rs -k cuda \
  tests/ops/test_native_parity.py tests/ops/test_batched_lookup.py tests/store/test_hash_table.py
step bench 300 $PY benchmarks/bench_cuda_ops.py --out "$OUT/cuda_ops.json"
step bench_adagrad 300 $PY benchmarks/bench_cuda_ops.py --optimizer adagrad \
  --out "$OUT/cuda_ops_adagrad.json"
step memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY -m pytest --noconftest -p no:cacheprovider -q -x \
  -k "test_cuda_batched_matches_reference and 2-16 or test_cuda_full_bucket_rule or test_cuda_matches_cpu and 3-8" \
  tests/ops/test_batched_lookup.py tests/store/test_hash_table.py
cat "$OUT/status.txt"
