#!/usr/bin/env bash
# The GPU check: every measurement that needs CUDA, in priority order, under one time budget.
#
#   bash benchmarks/gpu_check.sh                              # on the GPU machine (BUDGET_S=540)
#   CPU_REHEARSAL=1 BUDGET_S=240 HAM_DATA=/work/shared/data/ham10000-200x150 \
#       bash benchmarks/gpu_check.sh                          # the same steps, tiny, on the CPU
#
# Steps (each under `timeout` with what is left of the budget; a failure is recorded and the
# next step runs):
#   1. the CUDA-only tests (pytest -m gpu)                     -> 1_pytest_gpu.txt
#   2. benchmarks/train_throughput.py, paper preset: eager batch 32 and 128 on the three input
#      paths, then compiled batch 128                          -> 2_train_throughput.{log,json}
#   3. benchmarks/ham10000.py on the real images, 224 px, paper preset, compiled, variants
#      sampler_only (the default recipe) then paper (the paper's literal recipe), as many epochs
#      as the time left allows, --no_mlflow                    -> 3_ham10000.{log,json}
#   4. benchmarks/predict_latency.py --device cuda (needs mlflow; skipped without it)
#                                                              -> 4_predict_latency.txt
# and summary.txt (the machine, then one line per step as it ends). Results go to $OUT (the GPU
# runner sets it; at most 8 files come back from there, this writes 7) or benchmarks/gpu_out/.
#
# THE DATA. ../shared does not travel to the GPU machine and this script never reads it: make a
# copy inside the repository, in the ignored folder .gpu_data/ (41 MiB; the working tree that
# travels is limited to 64 MiB), once, before the device call:
#     mkdir -p .gpu_data && cp -r ../shared/data/ham10000-200x150 .gpu_data/
# and name it in the device call's carry (ignored folders travel only when carried):
#     run(command="bash benchmarks/gpu_check.sh", carry=[".gpu_data"], timeout_s=600)
# Another copy: HAM_DATA=path (a folder with images/, labels.csv, image_info.csv).
#
# The GPU machine has torch, timm, pandas, scikit-learn, Pillow, pytest, PyYAML but no mlflow,
# dvc or kfp: steps 1-3 import none of them (ham10000.py --no_mlflow; the tests' conftest.py
# imports mlflow, so without it step 1 runs the gpu-marked test files with --noconftest).
# predict_latency.py imports mlflow (components/registry/serving.py, mlflow.pyfunc): step 4 is
# skipped unless mlflow is importable, e.g. from wheels carried in a folder named by WHEELS_DIR
# (installed with pip --no-index --target into a temporary folder put on PYTHONPATH).
#
# Settings (environment): BUDGET_S (540), OUT, PYTHON (.venv/bin/python if there, else python3),
# HAM_DATA (.gpu_data/ham10000-200x150), HAM_WORK (.gpu_work/ham10000: splits, prepared
# images and runs; kept between calls on a warm machine, runs/ cleared unless HAM_RESUME=1),
# HAM_EPOCHS (skip the estimate), HAM_IPS (training img/s for the estimate; default: step 2's
# eager batch-32 resident figure), HAM_FIXED_S / HAM_VARIANT_S (the estimate's overheads),
# TT_N_IMAGES (train_throughput's images per epoch), SIMULATE_BARE=1 (block the imports of
# mlflow, dvc, kfp, moto, boto3, as on the GPU machine), WHEELS_DIR, CPU_REHEARSAL=1,
# DRY_RUN=1 (print the step commands, run none).
set -u
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
REHEARSAL=${CPU_REHEARSAL:-0}
[ "$REHEARSAL" = 0 ] && REHEARSAL=""
MIN_STEP_S=${MIN_STEP_S:-15}          # a step with less than this left is skipped

if [ -n "${OUT:-}" ]; then
    OUT_DIR=$OUT
else
    OUT_DIR=benchmarks/gpu_out
    rm -rf "$OUT_DIR"
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
SUMMARY=$OUT_DIR/summary.txt
WORK=.gpu_work
mkdir -p "$WORK"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true

remaining() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
say() { echo "$*" | tee -a "$SUMMARY"; }

# -- the environment ------------------------------------------------------------------------
if [ -n "${WHEELS_DIR:-}" ] && ls "$WHEELS_DIR"/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$TMP/site" "$WHEELS_DIR"/*.whl && export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "${SIMULATE_BARE:-0}" = 1 ]; then
    mkdir -p "$TMP/bare"
    cat > "$TMP/bare/sitecustomize.py" <<'EOF'
# SIMULATE_BARE=1: these packages are not installed on the GPU machine.
import importlib.abc, sys
_BLOCK = {"mlflow", "dvc", "kfp", "moto", "boto3", "botocore"}
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r} (SIMULATE_BARE)", name=name)
        return None
sys.meta_path.insert(0, _Blocker())
EOF
    export PYTHONPATH="$TMP/bare${PYTHONPATH:+:$PYTHONPATH}"
fi
MLFLOW_OK=""
"$PYTHON" -c "import mlflow" >/dev/null 2>&1 && MLFLOW_OK=1

{
    echo "# benchmarks/gpu_check.sh  $(date -u +%FT%TZ)  budget ${BUDGET_S}s${REHEARSAL:+  CPU REHEARSAL}"
    if REV=$(git rev-parse --short HEAD 2>/dev/null); then
        echo "commit: $REV$(git diff --quiet HEAD -- 2>/dev/null || echo ' + uncommitted changes')"
    else echo "commit: (no git here)"; fi
    "$PYTHON" - <<'EOF' 2>&1
import importlib.util, os, platform, sys
print(f"python {platform.python_version()} ({sys.executable}); {os.cpu_count()} CPUs")
try:
    import torch
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}; cuda {cuda}" + (
        f": {torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}" if cuda else ""))
except Exception as err:
    print(f"torch: {err!r}")
for name in ("timm", "pandas", "sklearn", "PIL", "yaml", "pytest", "mlflow", "dvc", "kfp"):
    try:
        found = importlib.util.find_spec(name) is not None
    except ImportError:                 # SIMULATE_BARE's blocker
        found = False
    print(f"  {name}: {'yes' if found else 'NO'}", end="")
print()
EOF
} | tee -a "$SUMMARY"
if [ -z "$REHEARSAL" ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "WARNING: no CUDA here; the GPU steps will fail or skip (CPU_REHEARSAL=1 rehearses on the CPU)"
fi
say ""

STEPS=()
# run_step NAME CAP FILE CMD...: CMD under timeout min(CAP, time left), its output appended to
# FILE as it comes; one line in summary.txt. Returns CMD's status (99: skipped).
run_step() {
    local name=$1 cap=$2 file=$3; shift 3
    local left; left=$(remaining)
    local t=$(( left < cap ? left : cap ))
    if (( t < MIN_STEP_S )); then
        STEPS+=("$name: SKIPPED (${left}s of the budget left)")
        say "${STEPS[-1]}"
        return 99
    fi
    echo "\$ $* (timeout ${t}s)" | tee -a "$file"
    if [ "${DRY_RUN:-0}" = 1 ]; then STEPS+=("$name: DRY_RUN"); say "${STEPS[-1]}"; return 0; fi
    local s; s=$(date +%s)
    timeout -k 20 "$t" "$@" 2>&1 | tee -a "$file"
    local rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - s ))
    local verdict="OK"
    if (( rc == 124 || rc == 137 )); then verdict="TIMEOUT after ${t}s (rc $rc)"
    elif (( rc != 0 )); then verdict="FAILED (rc $rc)"; fi
    echo "[$name: $verdict, ${took}s]" >> "$file"
    STEPS+=("$name: $verdict, ${took}s")
    say "${STEPS[-1]}"
    return "$rc"
}
note() { STEPS+=("  note: $*"); say "${STEPS[-1]}"; }

# -- 1. the CUDA-only tests -----------------------------------------------------------------
F1=$OUT_DIR/1_pytest_gpu.txt
if "$PYTHON" -c "import sys; sys.path[:0] = ['tests', '.']; import conftest" >/dev/null 2>&1; then
    run_step "1 pytest -m gpu" 150 "$F1" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/
else
    # tests/conftest.py imports mlflow (and the MLflow/S3 test servers): without it, pytest
    # cannot even load it. The gpu-marked tests use none of its fixtures.
    GPU_FILES=$(grep -l "pytest.mark.gpu" tests/test_*.py | tr '\n' ' ')
    note "tests/conftest.py does not import here (no mlflow): gpu-marked files with --noconftest"
    # shellcheck disable=SC2086
    run_step "1 pytest -m gpu (--noconftest)" 150 "$F1" \
        "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider --noconftest $GPU_FILES
fi

# -- 2. training throughput -----------------------------------------------------------------
F2=$OUT_DIR/2_train_throughput.log
J2=$OUT_DIR/2_train_throughput.json
TT_EAGER=$WORK/tt_eager.json
TT_COMPILED=$WORK/tt_compiled.json
rm -f "$TT_EAGER" "$TT_COMPILED"
merge_tt() {   # the two --json outputs as one list, rewritten after each part
    "$PYTHON" - "$J2" "$TT_EAGER" "$TT_COMPILED" <<'EOF'
import json, sys
from pathlib import Path
rows = [r for f in sys.argv[2:] if Path(f).is_file() for r in json.loads(Path(f).read_text())]
Path(sys.argv[1]).write_text(json.dumps(rows, indent=2) + "\n")
EOF
}
TT=(benchmarks/train_throughput.py)
if [ -n "$REHEARSAL" ]; then        # the tiny model at 32 px, batches 8 and 32, 64 JPEGs
    TT+=(--cpu-tiny --n_images "${TT_N_IMAGES:-64}")
    TT_EAGER_BS=8,32
    TT_COMPILED_ARGS=(--modes "${REHEARSAL_TT_MODE:-eager}" --batch_sizes 32)
else                              # the paper model at 224 px, 2560 JPEGs
    TT+=(${TT_N_IMAGES:+--n_images "$TT_N_IMAGES"})
    TT_EAGER_BS=32,128
    TT_COMPILED_ARGS=(--modes compiled --batch_sizes 128)
fi
run_step "2a train_throughput eager b$TT_EAGER_BS" 210 "$F2" \
    "$PYTHON" "${TT[@]}" --modes eager --batch_sizes "$TT_EAGER_BS" --json "$TT_EAGER"
merge_tt
[ -n "$REHEARSAL" ] && [ "${REHEARSAL_TT_MODE:-eager}" = eager ] && \
    note "rehearsal: 2b runs eager (torch.compile on 2 CPU cores takes minutes; REHEARSAL_TT_MODE=compiled)"
run_step "2b train_throughput ${TT_COMPILED_ARGS[1]} b${TT_COMPILED_ARGS[3]}" 240 "$F2" \
    "$PYTHON" "${TT[@]}" "${TT_COMPILED_ARGS[@]}" --json "$TT_COMPILED"
merge_tt

# -- 3. the real images: HAM10000, two recipes ----------------------------------------------
F3=$OUT_DIR/3_ham10000.log
J3=$OUT_DIR/3_ham10000.json
HAM_DATA=${HAM_DATA:-.gpu_data/ham10000-200x150}
VARIANTS=(sampler_only paper)
if [ -n "$MLFLOW_OK" ]; then PL_RESERVE=${PL_RESERVE:-$([ -n "$REHEARSAL" ] && echo 60 || echo 100)}
else PL_RESERVE=0; fi               # step 4 is skipped without mlflow: nothing to keep for it
if [ -n "$REHEARSAL" ]; then
    HAM_WORK=${HAM_WORK:-$WORK/ham10000-rehearsal}
    HAM_FLAGS=(--smoke)               # 32 px tiny model, 4/2/2 images a class; no compile on CPU
    HAM_FIXED_S=${HAM_FIXED_S:-60}    # split + preparing all 10015 images (36 px) on 2 cores
    HAM_VARIANT_S=${HAM_VARIANT_S:-25}
    MAX_EPOCHS=2
else
    HAM_WORK=${HAM_WORK:-$WORK/ham10000}
    HAM_FLAGS=(--compile)
    HAM_FIXED_S=${HAM_FIXED_S:-45}     # split + preparing 10015 images at 256 px on 16 cores
    HAM_VARIANT_S=${HAM_VARIANT_S:-120}  # start, torch.compile, images onto the GPU, 2 evaluations
    MAX_EPOCHS=100
fi
if [ ! -f "$HAM_DATA/labels.csv" ] || [ ! -f "$HAM_DATA/image_info.csv" ] || [ ! -d "$HAM_DATA/images" ]; then
    STEPS+=("3 ham10000: FAILED (no data: $HAM_DATA needs images/, labels.csv, image_info.csv; make it here with 'mkdir -p .gpu_data && cp -r ../shared/data/ham10000-200x150 .gpu_data/' and carry .gpu_data)")
    say "${STEPS[-1]}"
    echo "${STEPS[-1]}" >> "$F3"
else
    [ "${HAM_RESUME:-0}" = 1 ] || rm -rf "$HAM_WORK/runs"
    mkdir -p "$HAM_WORK"
    # The epochs: what the time left (less step 4's share) holds after the fixed costs, at
    # the training speed step 2 measured (eager batch 32, resident input: the study's batch).
    read -r EPOCHS EPOCH_S EST < <("$PYTHON" - "$HAM_DATA" "$TT_EAGER" "$(remaining)" "$PL_RESERVE" \
        "$HAM_FIXED_S" "$HAM_VARIANT_S" "${#VARIANTS[@]}" "$MAX_EPOCHS" "${HAM_IPS:-}" \
        "${HAM_EPOCHS:-}" "${REHEARSAL:-0}" <<'EOF'
import json, math, sys
from pathlib import Path
data, tt, left, reserve, fixed, per_variant, n_var, max_e, ips, forced, rehearsal = sys.argv[1:]
left, reserve, fixed, per_variant, n_var, max_e = map(int, (left, reserve, fixed, per_variant,
                                                             n_var, max_e))
n = sum(1 for _ in open(Path(data) / "labels.csv")) - 1
n_train, n_val = (32, 16) if rehearsal != "0" else (round(0.70 * n), round(0.15 * n))
source = "HAM_IPS"
if not ips:
    rows = json.loads(Path(tt).read_text()) if Path(tt).is_file() else []
    hit = [r["img_per_s"] for r in rows if r["mode"] == "eager" and r["batch"] == 32
           and r["input"] == "resident"]
    ips, source = (hit[0], "step 2 eager b32 resident") if hit else (
        (20.0 if rehearsal != "0" else 300.0), "a guess (no step 2 figure)")
ips = float(ips)
# an epoch: the training pass, then the model and its EMA on the validation split (a forward
# pass ~3x a training step's speed), +25% and 2 s for checkpoints and the rest
epoch_s = 1.25 * (n_train + 2 * n_val / 3) / ips + 2
spare = left - reserve - fixed - n_var * per_variant
epochs = int(forced) if forced else max(1, min(max_e, math.floor(spare / (n_var * epoch_s))))
print(epochs, round(epoch_s, 1), f"{'HAM_EPOCHS' if forced else 'estimate'}: {left}s left - {reserve}s for step 4 "
      f"- {fixed}s fixed - {n_var}x{per_variant}s per variant = {spare}s; an epoch ~{epoch_s:.1f}s"
      f" ({n_train} train + {n_val} val images at {ips:.0f} img/s, {source})")
EOF
    )
    EPOCHS=${EPOCHS:-1} EPOCH_S=${EPOCH_S:-0}
    # A warm-up longer than a quarter of the run leaves the LR at its floor: shorten it (the
    # config's 5 epochs are for the full 100-epoch run).
    CONFIG=benchmarks/ham10000_gpu.yaml
    CONFIG_WARMUP=$("$PYTHON" -c "import yaml; print(yaml.safe_load(open('$CONFIG'))['train']['warmup_epochs'])")
    WARMUP=$(( EPOCHS / 4 < CONFIG_WARMUP ? EPOCHS / 4 : CONFIG_WARMUP ))
    if [ "$WARMUP" != "$CONFIG_WARMUP" ]; then
        CONFIG=$HAM_WORK/ham10000_gpu_short.yaml
        "$PYTHON" -c "import yaml; c=yaml.safe_load(open('benchmarks/ham10000_gpu.yaml')); c['train']['warmup_epochs']=$WARMUP; yaml.safe_dump(c, open('$CONFIG','w'), sort_keys=False)"
    fi
    say "3 ham10000: $EPOCHS epochs per variant (${VARIANTS[*]}), warmup_epochs $WARMUP, config $CONFIG; $EST"
    echo "# $EPOCHS epochs per variant, warmup_epochs $WARMUP; $EST" >> "$F3"
    collect_ham() {
        "$PYTHON" - "$J3" "$HAM_WORK" "$EPOCHS" "$WARMUP" "$CONFIG" "$EST" "${VARIANTS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, work, epochs, warmup, config, est, *variants = sys.argv[1:]
doc = {"epochs": int(epochs), "warmup_epochs": int(warmup), "config": config, "estimate": est,
       "variants": {}}
for name in variants:
    # the run folder: <variant>-e<epochs>-s0 (newer ham10000.py) or <variant>-s0
    runs = [Path(work) / "runs" / f"{name}-e{epochs}-s0", Path(work) / "runs" / f"{name}-s0"]
    run = next((r for r in runs if r.is_dir()), runs[0])
    entry = {"folder": str(run)}
    for f in ("result.json", "training_summary.json"):
        if (run / f).is_file():
            entry[f.removesuffix(".json")] = json.loads((run / f).read_text())
    doc["variants"][name] = entry if len(entry) > 1 else "not finished"
Path(out).write_text(json.dumps(doc, indent=2) + "\n")
EOF
    }
    for i in "${!VARIANTS[@]}"; do
        v=${VARIANTS[$i]}
        # the first variant leaves the second its estimated time; the second takes what is left
        cap=$(remaining)
        if (( i + 1 < ${#VARIANTS[@]} )); then
            keep=$("$PYTHON" -c "print(int($HAM_VARIANT_S + $EPOCHS * $EPOCH_S))")
            (( cap - PL_RESERVE - keep > MIN_STEP_S )) && cap=$(( cap - PL_RESERVE - keep ))
        else
            (( cap - PL_RESERVE > MIN_STEP_S )) && cap=$(( cap - PL_RESERVE ))
        fi
        run_step "3 ham10000 $v ($EPOCHS epochs)" "$cap" "$F3" \
            "$PYTHON" benchmarks/ham10000.py --config "$CONFIG" --data "$HAM_DATA" \
            --out "$HAM_WORK" --variants "$v" --epochs "$EPOCHS" "${HAM_FLAGS[@]}" --no_mlflow
        collect_ham
    done
fi

# -- 4. inference latency -------------------------------------------------------------------
F4=$OUT_DIR/4_predict_latency.txt
if [ -z "$MLFLOW_OK" ]; then
    STEPS+=("4 predict_latency: SKIPPED (mlflow is not importable: predict_latency.py saves and loads the model with mlflow.pyfunc, and components/registry/serving.py imports mlflow at its top; carry mlflow wheels with WHEELS_DIR to run it)")
    say "${STEPS[-1]}"
    echo "${STEPS[-1]}" >> "$F4"
else
    if [ -n "$REHEARSAL" ]; then
        PL=(--device cpu --preset tiny --img-size 32 --batch-size 4 --n-batch 8 --repeats 3)
    else
        PL=(--device cuda --preset paper --img-size 224 --batch-size 32 --n-batch 64 --repeats 20)
    fi
    note "predict_latency measures fp32 only (the script has no dtype/bf16 flag)"
    run_step "4 predict_latency ${PL[1]}" 150 "$F4" "$PYTHON" benchmarks/predict_latency.py "${PL[@]}"
fi

# -- summary --------------------------------------------------------------------------------
say ""
say "done in $(( $(date +%s) - START ))s of a ${BUDGET_S}s budget; results in $OUT_DIR:"
ls -l "$OUT_DIR" | tail -n +2 | tee -a "$SUMMARY"
echo
echo "== summary"
cat "$SUMMARY"
