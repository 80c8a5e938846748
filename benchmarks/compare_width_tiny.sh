#!/usr/bin/env bash
# The width methods (FLAP, LLM-Pruner, SLM + LLM-Pruner, DarwinLM and its ZipLM-style and uniform
# contrasts) on the shipped tiny testbed, 25% of the non-embedding parameters removed, without and
# with the same LoRA healing. DarwinLM's search budget is scaled to the testbed (its calibration
# holds about a thousand answer tokens); CPU, about 25 minutes.
#   benchmarks/compare_width_tiny.sh [RUN_DIR] [RESULTS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec benchmarks/compare_tiny.sh "${1:-runs/compare_width_tiny}" "${2:-benchmarks/results/compare_width_tiny}" \
  --methods width --darwinlm.generations 40 --darwinlm.train-tokens 2000 4000 8000 16000 \
  --darwinlm.train-batch-size 16
