#!/usr/bin/env bash
# The prepared device check for a session that is lent a GPU machine (issue 5 asks for the engine
# benchmark there in bf16): the CUDA tests, then `bench engine --device cuda --dtype bfloat16`.
#
# That machine reaches no package registry and its image lacks llguidance (and has transformers 5.17,
# which may predate deepseek_v32), so prepare wheels HERE first, from the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl llguidance==1.9.1 transformers==5.24.0
# then call the device tool's run with: command "bash benchmarks/gpu_check.sh", carry [".whl"],
# timeout_s 560. Results come back under $OUT (bench_engine.md/json/png, the logs).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -k cuda \
    tests/model/test_forms.py tests/engine/test_paged_runner.py 2>&1 | tee "$OUT/cuda_tests.log"
timeout 400 python3 -m dsv32.cli bench engine --device cuda --dtype bfloat16 --repeats 2 --out "$OUT" \
    2>&1 | tail -80 | tee "$OUT/bench_engine.log"
