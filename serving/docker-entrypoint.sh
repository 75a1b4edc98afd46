#!/bin/sh
# Start NUM_SHARD tensor-parallel ranks; flags (e.g. --model, --max-total-tokens) pass through.
set -eu
exec torchrun --standalone --nproc-per-node "${NUM_SHARD:-1}" -m llm_serving "$@"
