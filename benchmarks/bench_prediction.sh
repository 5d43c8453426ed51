#!/bin/sh
# Predicted vs measured end-to-end speed-up on the CPU (ONNX Runtime) for mobilenet_v2 plans
# at budget ratios 0.9, 0.7, 0.5 solved from the shipped table (uniform importance).
# Usage: sh benchmarks/bench_prediction.sh [TABLE] [OUTDIR]
set -e
TABLE=${1:-latency_tables/cpu_onnxruntime/mobilenet_v2.csv}
OUT=${2:-out/prediction}
mkdir -p "$OUT"
for ratio in 0.9 0.7 0.5; do
  .venv/bin/dpcompress solve --latency-table "$TABLE" --model torchvision:mobilenet_v2 \
    --budget-ratio "$ratio" --out "$OUT/plan_$ratio.json" > /dev/null
  echo "budget ratio $ratio"
  OMP_NUM_THREADS=1 .venv/bin/dpcompress bench --model torchvision:mobilenet_v2 --plan "$OUT/plan_$ratio.json" \
    --backend onnxruntime --rounds 10 --iters 10 --json > "$OUT/bench_$ratio.json"
  .venv/bin/python -c "import json,sys; r=json.load(open(sys.argv[1])); print('  original %.2f ms, compressed %.2f ms, measured %.2fx, predicted %.2fx' % (r['original']['median_ms'], r['compressed']['median_ms'], r['measured_speedup'], r['predicted_speedup']))" "$OUT/bench_$ratio.json"
done
