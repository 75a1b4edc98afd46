#!/bin/sh
# Start NUM_SHARD tensor-parallel ranks; flags (e.g. --model, --max-total-tokens) pass through.
# On SIGTERM torchrun forwards the signal to every rank: rank 0 drains for GRACEFUL_SHUTDOWN_SECONDS (the
# others wait for its stop plan), and torchrun gives them that long plus 3 s before it kills them.
set -eu
drain="${GRACEFUL_SHUTDOWN_SECONDS:-30}"
exec torchrun --standalone --nproc-per-node "${NUM_SHARD:-1}" --shutdown-timeout "$((drain + 3))" \
    -m llm_serving "$@"
