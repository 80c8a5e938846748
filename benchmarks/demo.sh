#!/usr/bin/env bash
# Run the main job (`elmkit demo`) and keep its report, metrics and plots.
#   benchmarks/demo.sh [RUN_DIR] [RESULTS_DIR] [MODEL]
# e.g. benchmarks/demo.sh runs/demo-smollm2 benchmarks/results/demo-smollm2 smollm2-135m
set -euo pipefail
RUN=${1:-runs/demo}
RES=${2:-benchmarks/results/demo}
MODEL=${3:-testbed:tiny}
cd "$(dirname "$0")/.."
start=$(date +%s)
python3 -m elmkit.cli demo --out "$RUN" --model "$MODEL"
echo "demo wall time: $(( $(date +%s) - start )) s" | tee "$RUN/wall_time.txt"
mkdir -p "$RES"
cp "$RUN/report.md" "$RUN/metrics.json" "$RUN"/*.png "$RUN/wall_time.txt" "$RES/"
cp "$RUN/elm/loss.png" "$RES/elm_training.png"
