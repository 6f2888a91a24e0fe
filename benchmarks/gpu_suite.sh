#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md, one process per row, in priority order (a row that fails or
# runs past its limit does not stop the next one). Needs jax with CUDA, flax, optax, orbax,
# chex and ml_collections; no TensorFlow (the steps run on on-device synthetic images).
#
#   benchmarks/gpu_suite.sh OUTDIR [ROW ...]     # default: every row
#
# OUTDIR gets results.jsonl (one JSON object per row: the benchmark's --json_out plus 'label'),
# log.txt, and for the row 'mae_l16' a jax.profiler trace (trace.xplane.pb) with the step's HLO
# text (train_step.hlo.txt), which mim_jax.benchmark.gpu_trace splits by op kind.
# STEPS (default 10) and WARMUP (default 3) set the timed and untimed steps; PYTHON the
# interpreter (default python3). A row takes 1.5-3 minutes on an H200 (start-up and the
# parameters' init ~50 s for L/16, compile 30-50 s), so all rows take ~30 minutes: pick
# rows to fit a shorter GPU session.
set -u
out=${1:?usage: benchmarks/gpu_suite.sh OUTDIR [ROW ...]}
shift
mkdir -p "$out"
py=${PYTHON:-python3}
steps=${STEPS:-10}
warmup=${WARMUP:-3}
bf16="--config.model.dtype=bfloat16 --config.data.name=synthetic"
cudnn="--config.model.attention_impl=cudnn"

run_row() {  # LABEL SECONDS BENCHMARK-ARGS...
  local label=$1 limit=$2
  shift 2
  echo "=== $label ($(date -u +%H:%M:%S)): python -m mim_jax.benchmark $*" | tee -a "$out/log.txt"
  rm -f "/tmp/$label.json"
  timeout "$limit" "$py" -m mim_jax.benchmark --steps "$steps" --warmup "$warmup" \
    --json_out "/tmp/$label.json" "$@" 2>&1 | tee -a "$out/log.txt" | grep -v "^[IW][0-9]\{4\} "
  if [ -f "/tmp/$label.json" ]; then
    "$py" -c 'import json, sys; d = json.load(open(sys.argv[1])); d["label"] = sys.argv[2]; print(json.dumps(d))' \
      "/tmp/$label.json" "$label" >> "$out/results.jsonl"
  else
    echo "=== $label: no result" | tee -a "$out/log.txt"
  fi
}

row() {  # LABEL: the rows, by name
  case $1 in
    mae_l16) run_row mae_l16 300 --config configs/mae.py:variant=L/16 --batch 256 $bf16 $cudnn \
               --trace_dir /tmp/trace_mae_l16 ;;
    mae_b16) run_row mae_b16 200 --config configs/mae.py:variant=B/16 --batch 256 $bf16 $cudnn ;;
    mae_l16_own_attention) run_row mae_l16_own_attention 300 \
               --config configs/mae.py:variant=L/16 --batch 256 $bf16 ;;
    simmim_swinb) run_row simmim_swinb 240 --config configs/simmim.py:model=swin_b --batch 128 $bf16 ;;
    simmim_vitb) run_row simmim_vitb 200 --config configs/simmim.py:model=vit_b --batch 128 $bf16 ;;
    finetune_vitb) run_row finetune_vitb 200 --config configs/finetune.py:model=vit_b --batch 256 \
               $bf16 $cudnn ;;
    mae_l16_b512) run_row mae_l16_b512 300 --config configs/mae.py:variant=L/16 --batch 512 $bf16 $cudnn ;;
    mae_b16_f32) run_row mae_b16_f32 200 --config configs/mae.py:variant=B/16 --batch 256 \
               --config.data.name=synthetic ;;
    beit_v2_b16) run_row beit_v2_b16 240 --config configs/beit.py:version=2 --batch 256 $bf16 ;;
    spark_r50) run_row spark_r50 240 --config configs/spark.py:model=resnet50 --batch 256 $bf16 ;;
    spark_convnext_s) run_row spark_convnext_s 240 --config configs/spark.py:model=convnext_s \
               --batch 256 $bf16 ;;
    # 64 images + 64 texts + 64 pairs; the frozen VQ-KD tokenizer runs on the 128 images.
    beit3_base) run_row beit3_base 300 --config configs/beit3.py:variant=base --batch 192 $bf16 ;;
    *) echo "unknown row $1" >&2; return 1 ;;
  esac
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee -a "$out/log.txt"
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(mae_l16 mae_b16 mae_l16_own_attention simmim_swinb finetune_vitb
                                simmim_vitb beit_v2_b16 spark_r50 spark_convnext_s beit3_base
                                mae_l16_b512 mae_b16_f32)
for r in "${rows[@]}"; do
  row "$r"
  if [ "$r" = mae_l16 ] && [ -d /tmp/trace_mae_l16 ]; then
    f=$(find /tmp/trace_mae_l16 -name '*.xplane.pb' | tail -1)
    [ -n "$f" ] && cp "$f" "$out/trace.xplane.pb"
    gzip -c /tmp/trace_mae_l16/train_step.hlo.txt > "$out/train_step.hlo.txt.gz"
    cp /tmp/trace_mae_l16/traced_steps.txt "$out/" 2>/dev/null
  fi
done
