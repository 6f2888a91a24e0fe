#!/usr/bin/env bash
# Runs a config on this host: CPU, or every local GPU (one process drives them all).
#   launch/local.sh configs/mae.py:quickstart runs/mae_quickstart [--config.FIELD=VALUE ...]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
# TensorFlow only feeds data: keep it off the GPUs and quiet.
export CUDA_DEVICE_ORDER=PCI_BUS_ID TF_CPP_MIN_LOG_LEVEL=2 TF_FORCE_GPU_ALLOW_GROWTH=true
# Let XLA take most GPU memory up front (faster) and use the latency-hiding scheduler.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
else
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  # (mim_jax.main sets the CPU allocator policy itself: see mim_jax/allocator.py.)
fi
exec python3 -m mim_jax.main --config "$config" --workdir "$workdir" "$@"
