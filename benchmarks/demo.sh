#!/usr/bin/env bash
# Run the main job (`elmkit demo`) and keep its report, metrics and plots.
#   benchmarks/demo.sh [RUN_DIR] [RESULTS_DIR]
set -euo pipefail
RUN=${1:-runs/demo}
RES=${2:-benchmarks/results/demo}
cd "$(dirname "$0")/.."
start=$(date +%s)
python3 -m elmkit.cli demo --out "$RUN"
echo "demo wall time: $(( $(date +%s) - start )) s" | tee "$RUN/wall_time.txt"
mkdir -p "$RES"
cp "$RUN/report.md" "$RUN/metrics.json" "$RUN/accuracy.png" "$RUN/residuals.png" "$RUN/wall_time.txt" "$RES/"
cp "$RUN/elm/loss.png" "$RES/elm_training.png"
