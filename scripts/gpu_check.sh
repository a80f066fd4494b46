#!/usr/bin/env bash
# The whole GPU check of issue #17 in one command, offline, from a copy of the repo:
#
#   bash scripts/gpu_check.sh                 # on the GPU machine (needs .whl/: scripts/fetch_gpu_wheels.sh)
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh  # the same stages with a tiny model (a CPU test run)
#   bash scripts/gpu_check.sh extra           # the second command of a GPU session (below)
#
# Writes everything under $OUT (default ./gpu_check_out; a new or empty folder, or an earlier check's,
# whose outputs are replaced): one log per stage, bench_<wp>_<side>.json,
# pytest.xml/.log, failures.txt (each failing test's traceback end, also printed), build.json, and gpu_check.md + gpu_check.json, rewritten after every stage so
# that partial results survive. Stages, each under its own `timeout`:
#   setup       install .whl/*.whl (pip --no-index --no-deps --target $SITE), a stub for xprof
#               (imported by tokamax, used only by its benchmarking) when it is missing
#   build       random Llama (~1.07 B parameters: 16 layers, hidden 2048, 32/8 heads, ffn 8192,
#               SmolLM2's 49,152 vocabulary, tied) in bf16 on the GPU, saved to $WORK/model;
#               synthetic pairs and jaxpref configs for ~450 and ~4,000-token sequences
#   bench_<wp>_jax / bench_<wp>_trl
#               scripts/bench.py --only jax|trl (3 warm-up + 5 timed steps; TRL on the device
#               jaxpref ran on): 8 pairs of ~450 tokens, 2 pairs of ~4,000 tokens per step;
#               GPU_CHECK_PROFILE=1: jaxpref's side also traces 2 steps (bench.py --profile) and
#               writes profile_<wp>.txt, device time per kernel (scripts/profile_summary.py)
#   tests       fp32: tests/test_model_parity.py tests/test_layouts.py tests/test_fast_path.py (XLA
#               autotuning off: each small program compiles faster); its limit is whatever the budget left
# `extra` (GPU_CHECK_BUDGET_S default 220 s; reuses $GPU_CHECK_WORK's model and configs when the main
# check left them there, else builds them):
#   bench_450ga8_jax / bench_450ga8budget_jax
#               the ~450-token work point as 8 micro-batches of one pair (per_device_train_batch_size 1,
#               gradient_accumulation_steps 8), then the same filled to training.max_tokens_per_batch 16384
#   attention   scripts/attention_gpu_check.py: every layout's flash kernels (Mosaic GPU, Triton)
#               against the dense path, fp32 and bf16, and one layer's fwd+bwd at 4,096 tokens
#   tests       fp32: tests/test_fast_path.py and the GGUF parity tests
# Each stage's limit is its cap (below), cut to what is left of GPU_CHECK_BUDGET_S (470 s) less the
# time kept for the later stages (the tests' floor, 120 s, and 10 s for the report), so the whole
# check ends within 8 minutes. Environment: OUT, PYTHON (python3), GPU_CHECK_WORK (/tmp/gpu_check),
# GPU_CHECK_SITE (/tmp/site), GPU_CHECK_BUDGET_S, GPU_CHECK_TINY=1, GPU_CHECK_DTYPE (bfloat16).
set -u -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}

setup_stage() {
    shopt -s nullglob
    local wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_check: no wheels in .whl/ (run scripts/fetch_gpu_wheels.sh where PyPI is reachable)"
    elif "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --quiet --no-index --no-deps --upgrade --target "$SITE" "${wheels[@]}" || return 1
    else  # no pip: a wheel is a zip archive
        "$PY" - "$SITE" "${wheels[@]}" <<'EOF' || return 1
import sys, zipfile
for w in sys.argv[2:]:
    zipfile.ZipFile(w).extractall(sys.argv[1])
EOF
    fi
    if ! PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import xprof" 2>/dev/null; then
        mkdir -p "$SITE/xprof/cli"
        : > "$SITE/xprof/__init__.py"
        : > "$SITE/xprof/cli/__init__.py"
        printf 'def get_kernel_stats_tool(*a, **k):\n    raise RuntimeError("xprof is a stub here (scripts/gpu_check.sh)")\n' \
            > "$SITE/xprof/cli/tools.py"
        echo "gpu_check: xprof stubbed"
    fi
    # Versions from the installed metadata (no import of torch or trl: their stages import them);
    # tokamax's attention entry point and jax's devices are imported for real.
    PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
import importlib.metadata as md, json
v = {}
for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "transformers", "torch", "peft",
          "accelerate", "trl", "datasets", "tokamax", "pyarrow", "pandas", "pytest"):
    try:
        v[p] = md.version(p)
    except md.PackageNotFoundError:
        v[p] = "MISSING"
import tokamax._src.ops.attention.api  # the flash path's entry point
import jax
v["jax_devices"] = [str(d) for d in jax.devices()]
print(json.dumps(v, indent=1))
raise SystemExit(1 if "MISSING" in v.values() else 0)
EOF
}

if [ "${1:-}" = _setup ]; then
    setup_stage
    exit $?
fi
die() { echo "gpu_check: $*" >&2; exit 2; }
MODE=${1:-main}
case "$MODE" in main|extra) ;; *) die "unknown mode \`$MODE\` (main, extra)" ;; esac
for var in GPU_CHECK_BUDGET_S GPU_CHECK_TEST_WORKERS; do
    [ -z "${!var:-}" ] || [[ ${!var} =~ ^[0-9]+$ ]] || die "$var=${!var}: expected a whole number"
done
for var in GPU_CHECK_TINY GPU_CHECK_PROFILE; do
    case ${!var:-0} in 0|1) ;; *) die "$var=${!var}: expected 0 or 1" ;; esac
done
case ${GPU_CHECK_DTYPE:-bfloat16} in bfloat16|float32) ;; *) die "GPU_CHECK_DTYPE=$GPU_CHECK_DTYPE: expected bfloat16 or float32" ;; esac

OUT=${OUT:-$REPO/gpu_check_out$([ "$MODE" = extra ] && echo _extra)}
[ ! -e "$OUT" ] || [ -d "$OUT" ] || die "OUT=$OUT: is a file, expected a folder for the check's outputs"
{ mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) && [ -w "$OUT" ]; } 2>/dev/null || die "OUT=$OUT: cannot create or write this folder"
# The outputs of an earlier check (stages.jsonl) are cleared below; a folder of other files is not ours to clear.
[ -e "$OUT/stages.jsonl" ] || [ -z "$(ls -A "$OUT")" ] || \
    die "OUT=$OUT: holds files that are not a gpu_check's outputs; name a new or empty folder"
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}
DTYPE=${GPU_CHECK_DTYPE:-bfloat16}
mkdir -p "$WORK" 2>/dev/null || die "GPU_CHECK_WORK=$WORK: cannot create this folder"
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
    # A CPU run of every stage: 2 + 3 steps; the tests' cap is short on purpose (on a 2-core CPU they
    # take far longer), so the run also shows the counts of a test stage cut by its limit.
    SIZE=--tiny WARMUP=2 STEPS=3 BUDGET=${GPU_CHECK_BUDGET_S:-2400}
    CAP_SETUP=120 CAP_BUILD=180 CAP_JAX=300 CAP_TRL=400 CAP_TESTS=240 TESTS_FLOOR=240 DEFAULT_WORKERS=2
    export BIG_T=512   # attention_gpu_check's one-layer timing at 512 tokens, not 4,096
else
    SIZE= WARMUP=3 STEPS=5 BUDGET=${GPU_CHECK_BUDGET_S:-470}
    CAP_SETUP=90 CAP_BUILD=90 CAP_JAX=120 CAP_TRL=90 CAP_TESTS=400 TESTS_FLOOR=120 DEFAULT_WORKERS=12
fi
[ "$MODE" = extra ] && BUDGET=${GPU_CHECK_BUDGET_S:-$([ "${GPU_CHECK_TINY:-0}" = 1 ] && echo 900 || echo 220)}
REPORT_RESERVE=10
START=$(date +%s)
: > "$OUT/stages.jsonl"
rm -f "$OUT"/bench_*.json "$OUT"/*.log "$OUT/pytest.xml" "$OUT/tests_env.json" "$OUT/build.json" \
    "$OUT/gpu_check.md" "$OUT/gpu_check.json"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false JAXPREF_CACHE="$WORK/cache" HF_HOME="$WORK/hf" PYTHONUNBUFFERED=1

report() { "$PY" scripts/gpu_check.py report "$OUT" > /dev/null 2>> "$OUT/report.log" || true; }

# run_stage NAME CAP AFTER CMD...: CMD under `timeout`, its limit min(CAP, time left - AFTER).
run_stage() {
    local name=$1 cap=$2 after=$3
    shift 3
    local left=$((START + BUDGET - after - $(date +%s)))
    local lim=$((cap < left ? cap : left))
    if [ "$lim" -lt 5 ]; then
        echo "== $name: skipped, no time left"
        echo "{\"name\": \"$name\", \"rc\": \"skipped\", \"seconds\": 0, \"limit\": $lim}" >> "$OUT/stages.jsonl"
        report
        return 1
    fi
    echo "== $name (limit ${lim} s)"
    local t0=$(date +%s)
    timeout -k 5 "$lim" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$(($(date +%s) - t0))
    echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"limit\": $lim}" >> "$OUT/stages.jsonl"
    [ $rc -eq 0 ] || { echo "   exit $rc after ${dt} s; last lines of $OUT/$name.log:"; tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'; echo; }
    report
    return $rc
}

BEFORE_TESTS=$((TESTS_FLOOR + REPORT_RESERVE))
# The tests compile one small program after another: without autotuning XLA compiles each faster and
# picks its kernels by heuristics (numbers unchanged at fp32's HIGHEST precision, which the tests use).
TEST_XLA_FLAGS=("XLA_FLAGS=--xla_gpu_autotune_level=0${XLA_FLAGS:+ $XLA_FLAGS}")
WORKERS=${GPU_CHECK_TEST_WORKERS:-$DEFAULT_WORKERS}

if [ "$MODE" = extra ]; then
    run_stage setup "$CAP_SETUP" "$BEFORE_TESTS" bash "$REPO/scripts/gpu_check.sh" _setup
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    [ -s "$WORK/build.json" ] || run_stage build "$CAP_BUILD" "$BEFORE_TESTS" "$PY" scripts/gpu_check.py build \
        "$WORK" $SIZE --dtype "$DTYPE" --warmup "$WARMUP" --steps "$STEPS"
    cp "$WORK/build.json" "$OUT/build.json" 2>/dev/null
    wp=$("$PY" scripts/gpu_check.py points $SIZE | cut -d' ' -f1)
    GA8=(--set training.per_device_train_batch_size=1 --set training.gradient_accumulation_steps=8)
    for variant in ga8 ga8budget; do
        extra=()
        [ "$variant" = ga8budget ] && extra=(--set training.max_tokens_per_batch=16384)
        run_stage "bench_${wp}${variant}_jax" "$CAP_JAX" "$BEFORE_TESTS" "$PY" scripts/bench.py \
            --config "$WORK/$wp.yaml" --only jax --warmup "$WARMUP" --steps "$STEPS" "${GA8[@]}" "${extra[@]}" \
            --json "$OUT/bench_${wp}${variant}_jax.json"
    done
    mkdir -p "$OUT/attention"
    run_stage attention "$CAP_JAX" "$BEFORE_TESTS" env OUT="$OUT/attention" bash -c \
        'py=$1; "$py" scripts/attention_gpu_check.py save "$2" && "$py" scripts/attention_gpu_check.py run "$2"' \
        _ "$PY" "$OUT/attention"
    XDIST=()
    "$PY" -c "import xdist" 2>/dev/null && [ "$WORKERS" -gt 0 ] && XDIST=(-n "$WORKERS")
    export JAXPREF_FAILURE_LOG="$OUT/failures.txt"
    : > "$JAXPREF_FAILURE_LOG"
    run_stage tests "$CAP_TESTS" "$REPORT_RESERVE" env XLA_PYTHON_CLIENT_PREALLOCATE=false "${TEST_XLA_FLAGS[@]}" "$PY" -m pytest \
        -o addopts= -v -p no:cacheprovider "${XDIST[@]}" --junitxml="$OUT/pytest.xml" \
        tests/test_fast_path.py tests/test_model_parity.py -k "not test_model_parity or gguf"
    [ -s "$JAXPREF_FAILURE_LOG" ] && { echo "== failures"; head -c 8000 "$JAXPREF_FAILURE_LOG"; echo; }
    "$PY" scripts/gpu_check.py report "$OUT"
    echo "gpu_check extra: $(($(date +%s) - START)) s in all; results in $OUT"
    exit 0
fi

run_stage setup "$CAP_SETUP" "$BEFORE_TESTS" bash "$REPO/scripts/gpu_check.sh" _setup
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"

if run_stage build "$CAP_BUILD" "$BEFORE_TESTS" "$PY" scripts/gpu_check.py build "$WORK" $SIZE \
        --dtype "$DTYPE" --warmup "$WARMUP" --steps "$STEPS"; then
    cp "$WORK/build.json" "$OUT/build.json"
    report
    for wp in $("$PY" scripts/gpu_check.py points $SIZE); do
        PROFILE=()
        [ "${GPU_CHECK_PROFILE:-0}" = 1 ] && PROFILE=(--profile "$WORK/profile_$wp")
        run_stage "bench_${wp}_jax" "$CAP_JAX" "$BEFORE_TESTS" "$PY" scripts/bench.py --config "$WORK/$wp.yaml" \
            --only jax --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/bench_${wp}_jax.json" "${PROFILE[@]}"
        [ ${#PROFILE[@]} -gt 0 ] && cp "$WORK/profile_$wp/summary.txt" "$OUT/profile_$wp.txt" 2>/dev/null
        # TRL on the device jaxpref ran on (if jaxpref's side failed: CUDA whenever torch sees it).
        trl_dev=$("$PY" -c "import json,sys; print('cuda' if json.load(open(sys.argv[1]))[0]['platform'] == 'gpu' else 'cpu')" \
            "$OUT/bench_${wp}_jax.json" 2>/dev/null || echo auto)
        run_stage "bench_${wp}_trl" "$CAP_TRL" "$BEFORE_TESTS" "$PY" scripts/bench.py --config "$WORK/$wp.yaml" \
            --only trl --trl-device "$trl_dev" --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/bench_${wp}_trl.json"
    done
fi

# fp32 tests on the device. Where jaxpref has no `training.matmul_precision` yet, XLA's default fp32
# matmul on a GPU is TF32, so the tests then run with jax's default precision set to highest.
if "$PY" -c "import dataclasses, sys; from jaxpref.config.schema import TrainingConfig as T; \
sys.exit(0 if 'matmul_precision' in {f.name for f in dataclasses.fields(T)} else 1)" 2>/dev/null; then
    PREC_ENV=()
else
    PREC_ENV=(JAX_DEFAULT_MATMUL_PRECISION=highest)
fi
# -v: one line per finished test, so a run cut by its limit still counts; no -x: one failure
# does not hide the rest. With pytest-xdist (in the GPU image) GPU_CHECK_TEST_WORKERS processes
# (default 12, tiny 2; 0: one process) share the device, allocating on demand instead of 75% each.
XDIST=()
if [ "$WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
    XDIST=(-n "$WORKERS")
    PREC_ENV+=(XLA_PYTHON_CLIENT_PREALLOCATE=false)
fi
echo "{\"tests_env\": \"${PREC_ENV[*]:-} ${TEST_XLA_FLAGS[*]}${XDIST[*]:+ pytest ${XDIST[*]}}\"}" > "$OUT/tests_env.json"
export JAXPREF_FAILURE_LOG="$OUT/failures.txt"
: > "$JAXPREF_FAILURE_LOG"
run_stage tests "$CAP_TESTS" "$REPORT_RESERVE" env "${PREC_ENV[@]}" "${TEST_XLA_FLAGS[@]}" bash -c \
    'py=$1; shift; "$py" -c "import jax; print(\"jax devices:\", jax.devices(), flush=True)"; exec "$py" -m pytest "$@"' \
    _ "$PY" -o addopts= -v -p no:cacheprovider "${XDIST[@]}" --junitxml="$OUT/pytest.xml" \
    tests/test_model_parity.py tests/test_layouts.py tests/test_fast_path.py
# Each failing test's traceback end (tests/conftest.py writes them as they happen) on stdout:
# the run's output is what surely comes back from a lent machine.
if [ -s "$JAXPREF_FAILURE_LOG" ]; then
    echo "== failures (first 8000 bytes of $JAXPREF_FAILURE_LOG)"
    head -c 8000 "$JAXPREF_FAILURE_LOG"
    echo
fi

"$PY" scripts/gpu_check.py report "$OUT"
echo "gpu_check: $(($(date +%s) - START)) s in all; results in $OUT"
