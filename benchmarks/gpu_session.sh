#!/usr/bin/env bash
# Every GPU check and GPU benchmark of mcalc in one call on a lent GPU machine (the `device` tool's `run`),
# sized to its limits: one command of at most 10 minutes, 15 minutes of device time a session with the
# machine's start counted in, at most eight files back from $OUT. Each step has its own timeout, so that a
# step that hangs or fails leaves the time of the others; the log says how long each took and how it ended.
#
# Here, first (the GPU machine reaches no registry; its image has CuPy, PyTorch, SymPy, Jinja2, SciPy,
# pytest and Hypothesis, not BackPACK, curvlinops or mnist1d):
#     make gpu-wheels            # those as wheels in .whl/ (git ignores it)
# Then, through the device tool:
#     run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
# and commit what comes back under benchmarks/results/, each file named by the GPU (…_h200.json).
#
# A dry run here (no GPU: the GPU steps fail at once, the rest of the plumbing runs):
#     OUT=/tmp/gpu_out PYTHON=.venv/bin/python WHEELS=none bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:?the device tool sets OUT, the folder whose files come back}
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
LOG=$OUT/gpu_session.log
: > "$LOG"

if [ "${WHEELS:-.whl}" != none ]; then
    "$PYTHON" -m pip install --no-index --no-deps --quiet .whl/*.whl >> "$LOG" 2>&1 \
        || echo "installing the carried wheels failed: BackPACK's columns will be missing" >> "$LOG"
fi
GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
TAG=$(echo "$GPU" | grep -oiE '\b[ahlb][0-9]{2,3}\b' | head -1 | tr 'A-Z' 'a-z')
TAG=${TAG:-gpu}
echo "device: ${GPU:-none found}; files tagged '$TAG'; $(date -u); $("$PYTHON" --version 2>&1)" >> "$LOG"

# step NAME SECONDS COMMAND…: runs it with its output in the log, and says how long it took and how it ended
step() {
    local name=$1 limit=$2
    shift 2
    echo -e "\n=== $name (at most $limit s): $*" >> "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s$([ $rc = 124 ] && echo ', timed out')" >> "$LOG"
}

# the GPU tests (each CuPy test's 'gpu' parameter; the emulated ones run in CI) and the library's checks on CuPy
step "GPU tests" 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests -k "gpu and not emulated"
step "verify on CuPy" 60 "$PYTHON" -m mcalc.cli verify --backend cupy
# issue 14's table: 3C3D's K-FAC factors, mcalc's fused kernels against BackPACK on PyTorch's CUDA
step "3C3D K-FAC factors" 90 "$PYTHON" benchmarks/backpack_3c3d.py --device cuda --repeats 9 \
    --json "$OUT/backpack_3c3d_$TAG.json"
# the HBP paper's network: one pass eager, linked and graphed, against BackPACK and PyTorch
step "HBP pass" 90 "$PYTHON" benchmarks/hbp_pass.py --device cuda --json "$OUT/hbp_pass_$TAG.json"
# HBP-Newton steps with eager and graphed backward passes
step "training steps" 60 "$PYTHON" benchmarks/train_step.py --device cuda --json "$OUT/train_step_$TAG.json"
echo -e "\nfinished $(date -u)" >> "$LOG"
cat "$LOG"
