#!/usr/bin/env bash
# The GPU checks, as one script for a borrowed GPU machine without network access (minutes are scarce:
# everything that needs a GPU, in one call). From the repository root:
#
#   bash scripts/device_checks.sh            # writes into $OUT (default: device-out/)
#
#   1. the kernel benchmark -> results/benchmarks/kernels-<gpu>.json (copied to $OUT; commit it)
#   2. the GPU-marked tests: model.offload across devices, the kernels against their references
#   3. one real-shape Mixtral-8x7B MoE layer through the pipeline with model.offload=true on the GPU:
#      the record's peak GPU memory against the accounting (scripts/dryrun.py --device cuda --offload)
#
# The machine needs torch, triton and transformers (a CUDA image has them) plus hydra-core, omegaconf and
# antlr4, which travel as wheels in .whl/ (git-ignored), made where pip works:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl hydra-core==1.3.8 omegaconf==2.3.1 && pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# Each step has its own time limit, so one slow step leaves the others their turn.
set -uo pipefail
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

timeout "${BENCH_S:-240}" python3 scripts/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.log"
cp results/benchmarks/kernels-*.json "$OUT/" 2>/dev/null

timeout "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_offload.py tests/kernels 2>&1 \
    | tee "$OUT/gpu_tests.log"

timeout "${DRYRUN_S:-200}" python3 scripts/dryrun.py --model mixtral --moe-layers 1 --dtype bfloat16 --device cuda \
    --offload --work /tmp/dynamo-dryrun --out "$OUT/dryrun_mixtral_offload_gpu.json" 2>&1 | tee "$OUT/dryrun.log"
