#!/usr/bin/env bash
# `elmkit compare` on the shipped tiny testbed model: every method removes 25% (of the layers for
# depth methods, of the non-embedding parameters for width methods), once without healing and once
# with the same LoRA healing for all; keeps reports, tables, plots and every method's plan.
#   benchmarks/compare_tiny.sh [RUN_DIR] [RESULTS_DIR] [extra compare options...]
#   HEALS=none benchmarks/compare_tiny.sh      # one setting only
set -euo pipefail
RUN=${1:-runs/compare_tiny}
RES=${2:-benchmarks/results/compare_tiny}
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/.."
for heal in ${HEALS:-none lora}; do
  start=$(date +%s)
  python3 -m elmkit.cli compare --model testbed:tiny --out "$RUN/$heal" --remove 0.25 --heal "$heal" "$@"
  echo "compare --heal $heal wall time: $(( $(date +%s) - start )) s" | tee "$RUN/$heal/wall_time.txt"
  mkdir -p "$RES/$heal/plans"
  cp "$RUN/$heal/report.md" "$RUN/$heal/results.json" "$RUN/$heal/accuracy.png" "$RUN/$heal/config.json" \
     "$RUN/$heal/wall_time.txt" "$RES/$heal/"
  for d in "$RUN/$heal"/*/; do
    m=$(basename "$d")
    if [ -f "$d/plan.json" ]; then cp "$d/plan.json" "$RES/$heal/plans/$m.json"; fi
    if [ -f "$d/search/search.png" ]; then cp "$d/search/search.png" "$RES/$heal/plans/$m.png"; fi
  done
done
