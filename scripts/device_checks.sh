#!/usr/bin/env bash
# The GPU checks, as one script for a borrowed GPU machine without network access (minutes are scarce:
# everything that needs a GPU, in one call). From the repository root:
#
#   bash scripts/device_checks.sh            # writes into $OUT (default: device-out/); < 10 minutes on an H100
#   bash scripts/device_checks.sh --dry      # the same steps on CPU at toy shapes, Triton interpreted (tests)
#
#   1. the compile report: every kernel specialization for sm_80 and sm_90 -> kernels_compiled.json, with the
#      driver's own register/spill counts on this GPU's architecture (scripts/kernels_compiled.py)
#   2. the end-to-end decode benchmark: FP16 vs packed BQ (vs BQ + slots once they exist), 256 tokens after a
#      128-token prompt, batch 1 and 8, OLMoE's shapes at full depth -> decode-<gpu>.json (scripts/bench_decode.py)
#   3. the kernel benchmark -> results/benchmarks/kernels-<gpu>.json (copied to $OUT; commit it)
#   4. the GPU-marked tests: model.offload across devices, the kernels against their references
#   5. one real-shape Mixtral-8x7B MoE layer through the pipeline with model.offload=true on the GPU:
#      the record's peak GPU memory against the accounting (scripts/dryrun.py --device cuda --offload)
#
# The machine needs torch, triton and transformers (a CUDA image has them) plus hydra-core, omegaconf and
# antlr4, which travel as wheels in .whl/ (git-ignored), made where pip works:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl hydra-core==1.3.8 omegaconf==2.3.1 && pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# Each step has its own time limit (sum 570 s), so one slow step leaves the others their turn.
set -uo pipefail
DRY=${DEVICE_CHECKS_DRY:-0}
[ "${1:-}" = "--dry" ] && DRY=1
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (<= ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 5 "$OUT/$name.log"
    [ $rc -eq 0 ] || { echo "== $name failed (exit $rc)"; status=1; }
}

if [ "$DRY" = 1 ]; then  # CPU, toy shapes, the kernels interpreted (compiled: for real): every path, no speed
    export TRITON_INTERPRET=1
    echo "dry run on CPU" | tee "$OUT/gpu.txt"
    step kernels_compiled 120 env -u TRITON_INTERPRET $PY scripts/kernels_compiled.py --quick \
        --out "$OUT/kernels_compiled.json"
    step bench_decode 240 $PY scripts/bench_decode.py --toy --layers 1 --prompt 6 --new-tokens 2 --reps 1 \
        --batches 1 8 --out "$OUT/decode-dry.json"
    step bench_kernels 120 env -u TRITON_INTERPRET $PY scripts/bench_kernels.py --check
    exit $status
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
step kernels_compiled "${KC_S:-60}" $PY scripts/kernels_compiled.py --jobs "$(nproc)" --out "$OUT/kernels_compiled.json"
step bench_decode "${DECODE_S:-150}" $PY scripts/bench_decode.py --model olmoe --reps 2 --out "$OUT/decode-gpu.json"
step bench_kernels "${BENCH_S:-150}" $PY scripts/bench_kernels.py --rep-ms 50 --new-tokens 32 --decode-reps 3
cp results/benchmarks/kernels-*.json "$OUT/" 2>/dev/null
step gpu_tests "${TESTS_S:-90}" $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_offload.py tests/kernels \
    tests/eval/test_real_model_traps.py
step dryrun "${DRYRUN_S:-120}" $PY scripts/dryrun.py --model mixtral --moe-layers 1 --dtype bfloat16 --device cuda \
    --offload --work /tmp/dynamo-dryrun --out "$OUT/dryrun_mixtral_offload_gpu.json"
exit $status
