#!/usr/bin/env bash
# Train the `base` testbed preset on one GPU (about 8-9 minutes on an H200), then keep what
# documents it: the card, metrics, training log and loss plot. The weights stay in RUN_DIR.
#   benchmarks/testbed_base.sh RUN_DIR RESULTS_DIR
set -euo pipefail
RUN=${1:-runs/testbed-base}
RES=${2:-benchmarks/results/testbed_base}
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m elmkit.cli testbed train --preset base --out "$RUN" 2>&1 | grep -v "it/s\]" || true
mkdir -p "$RES"
cp "$RUN/metrics.json" "$RUN/config.json" "$RUN/train_log.jsonl" "$RUN/loss.png" "$RES/"
cp "$RUN/model/README.md" "$RES/card.md"
cp "$RUN/model/card.json" "$RES/card.json"
