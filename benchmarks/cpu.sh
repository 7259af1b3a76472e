#!/usr/bin/env bash
# The CPU table of the README: zoo vs torch eager, interleaved windows in one run each (torch in
# a child process where the zoo's convolutions are oneDNN's: zoo.bench.torch_timers_apart).
#   bash benchmarks/cpu.sh [OUT.jsonl]     (default benchmarks/results/cpu_<date>.jsonl)
# simple_cnn, lenet5, resnet20 and resnet18 at 64 px, train and infer, batch 64 and 128, on the
# default one host device; then simple_cnn's and resnet20's train runs again on one host device
# per core (--xla_force_host_platform_device_count, the batch split over them by the bench's jit
# path; lenet5 is left out: its all-reduce deadlocks there, see the README).
# Each line is the bench's JSON plus "xla_flags" and "cpu".
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/cpu_$(date +%Y-%m-%d).jsonl}
PY=${PY:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python)}  # the project venv where there is one
CPU="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
export TF_CPP_MIN_LOG_LEVEL=2 JAX_PLATFORMS=cpu
bench() {  # XLA_FLAGS, then bench arguments
  local flags=$1; shift
  XLA_FLAGS=$flags $PY -m zoo bench "$@" --against torch 2>/dev/null |
    FLAGS=$flags CPU=$CPU $PY -c 'import json, os, sys
for line in sys.stdin:
    r = json.loads(line); r.update(xla_flags=os.environ["FLAGS"], cpu=os.environ["CPU"])
    print(json.dumps(r), flush=True)' | tee -a "$OUT"
}
for bs in 64 128; do
  for mode in train infer; do
    for m in simple_cnn lenet5 resnet20; do bench "" $m --mode $mode --batch-size $bs; done
    bench "" resnet18 --image-size 64 --mode $mode --batch-size $bs
  done
done
for bs in 64 128; do
  for m in simple_cnn resnet20; do
    bench "--xla_force_host_platform_device_count=$(nproc)" $m --mode train --batch-size $bs
  done
done
