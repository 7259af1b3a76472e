#!/usr/bin/env bash
# The one prepared GPU run of issue 9: resnet50, resnet18, vgg16, googlenet, alexnet, each in
# train and infer mode, the zoo against torchvision (eager and torch.compile, bf16 autocast,
# channels_last) in the same process, batch 256, bf16 compute with float32 params, synthetic
# on-device data. Then, while time is left, the fast-path ablations on resnet50 train (float32,
# no donation, remat, no XLA flags) and a jax.profiler trace of resnet50 train.
#
#   bash benchmarks/gpu.sh            # writes $OUT/<gpu>.jsonl, $OUT/table.md, $OUT/env.txt
#
# Assumptions (not this script's job to satisfy):
#   * run from a checkout on one NVIDIA H100 or H200 (works on any single CUDA GPU; several GPUs
#     work too: the zoo side shards the batch over all of them, torch uses one);
#   * $PY (default .venv/bin/python, else python3) has zoo installed with jax[cuda12] (the
#     `gpu` extra) and a CUDA build of torch + torchvision; nothing is installed here and the
#     machine needs no network;
#   * $OUT is a writable directory (default benchmarks/results); results are appended.
# Budget: ~8 minutes on an H100 (each run is a fresh process: ~10 s of imports, JAX compile
# 10-40 s, torch.compile 20-90 s, timing ~10 s). DEADLINE_S (default 460) stops starting new
# runs; whatever was not run is recorded as `skipped` in the JSONL, so a cut-off run still
# leaves a valid, honest file. Order: every model's train run, then every infer run, then the
# ablations and the trace. If the deadline cuts the list, a second call with e.g.
# `MODES=infer MODELS=googlenet,alexnet ABLATIONS=0 TRACE=0 bash benchmarks/gpu.sh` appends the
# rest to the same file.
#
# XLA flags, set here only (never on import of zoo):
#   --xla_gpu_enable_latency_hiding_scheduler=true  overlaps async work (collectives, copies)
#       with compute; the standard advice for multi-GPU, expected neutral on one GPU.
#   Everything else is left at XLA's defaults (autotuning level, command buffers, Triton GEMM).
# The ablation "no XLA_FLAGS" measures resnet50 train without them; keep a flag only where it
# wins. torch side: cudnn.benchmark on, TF32 allowed (as XLA), torch.compile default mode.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-benchmarks/results}
DEADLINE_S=${DEADLINE_S:-460}
BATCH=${BATCH:-256}
MODELS=${MODELS:-resnet50,resnet18,vgg16,googlenet,alexnet}
MODES=${MODES:-train,infer}
ABLATIONS=${ABLATIONS:-1}   # 0: skip the resnet50 fast-path ablations
TRACE=${TRACE:-1}           # 0: skip the profiler trace
mkdir -p "$OUT"
start=$(date +%s)

export TF_CPP_MIN_LOG_LEVEL=2
export XLA_PYTHON_CLIENT_PREALLOCATE=false      # JAX and torch share the GPU in one process
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/zoo-inductor-cache}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  echo "XLA_FLAGS=$XLA_FLAGS"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
RESULTS="$OUT/${gpu:-gpu}.jsonl"

# JAX and torch must share one process (one cuDNN) for interleaved windows; if a conv in each,
# one after the other, fails there, fall back to separate processes (ratios then not interleaved).
SEPARATE=""
if ! timeout 120 "$PY" - >> "$OUT/env.txt" 2>&1 <<'PROBE'
import torch, jax, jaxlib, jax.numpy as jnp
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print("jax", jax.__version__, jaxlib.__version__)
w = torch.randn(4, 3, 3, 3, device="cuda")
x = torch.randn(8, 3, 32, 32, device="cuda")
print("torch conv", torch.nn.functional.conv2d(x, w).sum().item())
y = jax.lax.conv(jnp.ones((8, 3, 32, 32)), jnp.ones((4, 3, 3, 3)), (1, 1), "SAME")
print("jax conv", float(y.sum()), jax.devices())
print("torch conv again", torch.nn.functional.conv2d(x, w).sum().item())
PROBE
then
  echo "JAX and torch cannot share a process here: benchmarking them separately" | tee -a "$OUT/env.txt"
  SEPARATE=--separate
fi

# 3 windows of ~0.5 s each per measurement: enough for a stable median on a GPU, and the
# compiles dominate the wall time anyway.
left=$(( DEADLINE_S - ($(date +%s) - start) ))
"$PY" benchmarks/run_all.py --out "$RESULTS" --deadline-s "$left" --timeout-s 240 \
  --models "$MODELS" --modes "$MODES" \
  --bench-args "--batch-size $BATCH --windows 3 --window-s 0.5 --warmup 3" $SEPARATE \
  $([ "$ABLATIONS" = 1 ] && echo --ablations)

# a profile of the headline case, if time is left (open with TensorBoard/XProf: top ops)
left=$(( DEADLINE_S - ($(date +%s) - start) ))
if [ "$TRACE" = 1 ] && [ "$left" -gt 40 ]; then
  timeout "$left" "$PY" -m zoo bench resnet50 --mode train --batch-size "$BATCH" --steps 5 \
    --windows 2 --trace "$OUT/trace_resnet50_train" --output "$OUT/trace_run.jsonl" \
    > /dev/null || echo "trace run failed or timed out"
fi

"$PY" benchmarks/run_all.py --markdown "$RESULTS" | tee "$OUT/table.md"
echo "total $(( $(date +%s) - start )) s; results in $RESULTS"
