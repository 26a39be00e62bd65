#!/usr/bin/env bash
# The README's main job on the embedded FSDD demo (6 speakers of real speech), on whatever this machine has:
# build and verify shards, train the boss recipe sized for a CPU (configs/demo.yaml), evaluate it on the
# dataset's own test takes, and write predictions. About 4 minutes on 2 CPU cores.
# Extra arguments go to the trainer as overrides, e.g.: bash launch/demo.sh train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_SILENT=true

spkdist shard --demo --out shards/fsdd-demo
spkdist verify shards/fsdd-demo
rm -rf runs/demo  # the demo starts fresh each time (the trainer refuses to overwrite a run)
python launch/train.py --config configs/demo.yaml data.shards=shards/fsdd-demo "$@"
echo "test accuracy (FSDD takes 0-4):"
spkdist evaluate --checkpoint runs/demo --shards shards/fsdd-demo --split test
spkdist predict --checkpoint runs/demo --shards shards/fsdd-demo --split test --out runs/demo/predictions.csv
