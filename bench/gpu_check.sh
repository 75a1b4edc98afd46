#!/usr/bin/env bash
# The serving server on a GPU machine, in one run (see bench/gpu_check.py for what is checked).
#
# Device (python3 there is 3.12 with torch and transformers; the rest travels as wheels in .whl/):
#   run: bash bench/gpu_check.sh     carry: [".whl", ".cache/serving-tests/tokenizer-smollm2-0.1.2"]
# STAGE=decode (the default; issue 16, at most 8 minutes on an H200): the Llama-3-8B-shaped and the 289M
# models with random weights made on the GPU, after bench/paged_kernel.py ($OUT/gpu_paged_kernel.json, at most
# KERNEL_S=90 s); results in $OUT/gpu_decode.json (copy it to
# bench/results/gpu_decode-<gpu>.json) and a summary at the end of the log. STAGE=full or diag: the earlier
# server checks. Local CPU rehearsal with tiny models (CUDA-only arms write "skipped: no CUDA"):
#   PY=.venv/bin/python WHL=none OUT=/tmp/gpu-check bash bench/gpu_check.sh --large 64,2,4,2,128,0 \
#     --small 64,2,4,2,128,0 --batches 1,2,4 --context 20 --steps 2 --streams 4 --ttft-requests 2 \
#     --ttft-tokens 32 --max-new-tokens 8 --eq-tokens 8
# (STAGE=full's rehearsal: --hidden 64 --intermediate 128 --layers 2 --heads 4 --kv-heads 2
#  --max-new-tokens 8 --concurrency 4,8)
# Wheels (.whl/ is ignored through .git/info/exclude), at the versions uv.lock pins:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 starlette==1.10.0 uvicorn==0.54.0 \
#     pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     typing-extensions==4.16.0 regex==2026.11.19   (cp312 wheels; regex: transformers needs >= 2025.10.22)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
PY=${PY:-python3}
WHL=${WHL:-.whl}
TOK=${TOK:-.cache/serving-tests/tokenizer-smollm2-0.1.2}
SITE=${SITE:-/tmp/gpu-check-site}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec > >(tee "$OUT/log.txt") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
$PY -c 'import sys, torch; print(sys.version.split()[0], sys.executable, "torch", torch.__version__, "cuda", torch.cuda.is_available())'
echo "== the interpreter's own packages (uv.lock pins: torch 2.15.0, transformers 5.24.0, huggingface-hub 2.4.0, tokenizers 0.23.3)"
$PY -m pip list 2>/dev/null | grep -iE '^(torch|transformers|huggingface.hub|tokenizers|accelerate|safetensors|prometheus.client|httpx|anyio|h11|click|typing.extensions|regex|numpy|starlette|uvicorn|pydantic|pydantic.core|gguf) '

BASE="$PWD/serving:$PWD/devstack"  # the project, without its virtualenv
TF=""
if [ -d "$WHL" ]; then
  echo "== wheels from $WHL"
  base_whl=$(ls "$WHL"/*.whl | grep -v '/transformers-')
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/base" $base_whl || exit 1
  if ls "$WHL"/transformers-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/tf" "$WHL"/transformers-*.whl || exit 1
    TF="$SITE/tf:"
  fi
  BASE="$BASE:$SITE/base"
fi

STAGE=${STAGE:-decode}  # decode, full, or diag (step timings, profile, float32 alone/batched)
own=0
if [ -z "${SKIP_PROBES:-}" ]; then
  echo "== probe: engine steps vs model.generate, the interpreter's own transformers"
  PYTHONPATH="$BASE" $PY -m bench.gpu_check probe --out "$OUT" --tag own
  own=$?
fi
main_path="$BASE"
if [ -n "$TF" ] && [ -n "${SKIP_PROBES:-}" ]; then
  main_path="$TF$BASE"
elif [ -n "$TF" ]; then
  echo "== probe: the same with the transformers uv.lock pins (carried)"
  PYTHONPATH="$TF$BASE" $PY -m bench.gpu_check probe --out "$OUT" --tag pinned
  pinned=$?
  # The full check runs on whichever transformers the engine is right with (the pinned one first).
  if [ $pinned -eq 0 ] || [ $own -ne 0 ]; then main_path="$TF$BASE"; fi
fi
if [ "$STAGE" = decode ]; then
  echo "== paged decode kernels (Triton, torch varlen where present, SDPA): $OUT/gpu_paged_kernel.json"
  PYTHONPATH="$main_path" timeout "${KERNEL_S:-90}" $PY -m bench.paged_kernel --out "$OUT" || echo "paged kernel bench: exit $?"
fi
echo "== $STAGE (PYTHONPATH=$main_path)"
budget=()
[ "$STAGE" = decode ] && budget=(--budget-s "${BUDGET_S:-400}")  # the optional arms stop past this
PYTHONPATH="$main_path" $PY -m bench.gpu_check "$STAGE" --out "$OUT" --tokenizer "$TOK" "${budget[@]}" "$@"
rc=$?
echo "== exit $rc"
exit $rc
