#!/usr/bin/env bash
# Every GPU check and benchmark of minirlhf in one script, for a machine with one NVIDIA GPU and
# about ten minutes of wall time (a lent H200, say). Run it from anywhere:
#
#     OUT=/some/dir bash benchmarks/gpu_checks.sh          # default OUT: ./gpu_out
#
# The steps, in order, each under `timeout` (so one hang cannot eat the budget) and each run even if
# an earlier one failed; its exit code goes to $OUT/summary.txt:
#
#   nvidia-smi      the chip, driver and memory
#   env             torch, CUDA, Triton and Python versions; bf16 support (the commit heads the summary)
#   pytest          python -m pytest -q -x: the whole suite, the CUDA tests included (skipped on CPUs)
#   smoke           run_all.py --preset smoke --device cuda: every stage on the GPU
#   torchrun        train_base.py --preset smoke under torchrun (1 process: the launcher's path,
#                   RANK/WORLD_SIZE/LOCAL_RANK set; one GPU cannot host 2 ranks). run_all.py's
#                   --nproc-per-node 1 is not used: it starts a plain python process, like `smoke`.
#   bench_train     bench_train.py --presets medium,small --dtypes fp32,bf16: tokens/s, peak memory,
#                   MFU against the chip's bf16 peak
#   bench_kernels   the bf16 rows again with --kernels reference: the LM head through cuBLAS instead
#                   of the Triton logprob kernel (which runs its matmuls in fp32), to see what it costs
#   bench_compile   the same in bf16 with --compile: the eager rows again, then torch.compile'd ones
#                   (bf16 only: every compiled row costs a compilation of tens of seconds)
#   bench_logprobs  bench_logprobs.py --device cuda: token_logprobs at 2048x256x50257 and
#                   16384x768x50257, fp32 and bf16, fwd and fwd+bwd: plain PyTorch, the fused torch
#                   path, torch.compile, the Triton kernel and the tiled tensor-core one (unmeasured
#                   so far); before `medium`, which takes whatever time is left
#   medium          run_all.py --preset medium --device cuda under /usr/bin/time -v: the wall time
#                   and host peak memory the README needs; GPU memory sampled by nvidia-smi
#
# Time: the steps share a budget of BUDGET_S seconds (default 560, inside a 10-minute command limit);
# each gets min(its own cap, what is left), and a step with under 15 s left is skipped (and says so).
# To rerun some steps only: ONLY=bench_train,medium bash benchmarks/gpu_checks.sh
#
# What it writes in $OUT: three files, because the lending tool brings back at most 8 files:
#   summary.txt   one line per step (exit code, seconds, command), the benchmark tables, the medium
#                 run's wall time and peak memory
#   checks.log    every step's full output, in order, appended as it runs (kept if the run is killed)
#   runs.tar.gz   the pipeline runs' logs, metrics, plots and evaluation reports (no checkpoints, no
#                 data), built at exit
# Checkpoints and data go to a fresh scratch folder (mktemp -d under $TMPDIR or /tmp), not to $OUT.

set -u

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/minirlhf_gpu_checks.XXXXXX")" || exit 1
BUDGET_S="${BUDGET_S:-560}"
ONLY="${ONLY:-}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"   # the lent machines' torch is in python3
SUMMARY="$OUT/summary.txt"
LOG="$OUT/checks.log"
export PYTHONUNBUFFERED=1   # output reaches checks.log as it is printed, not at exit
: > "$SUMMARY"
: > "$LOG"
SECONDS=0

wanted() {   # wanted NAME: is this step selected (ONLY empty, or NAME in its comma list)?
    [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]
}

step() {     # step NAME CAP_S COMMAND...: run COMMAND under timeout, log it, record its exit code
    local name=$1 cap=$2
    shift 2
    local left=$(( BUDGET_S - SECONDS ))
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 15 )); then
        printf '%-15s skipped: %ss of the %ss budget left\n' "$name" "$left" "$BUDGET_S" | tee -a "$SUMMARY"
        return 0
    fi
    echo "===== $name (timeout ${limit}s): $*" >> "$LOG"
    local start=$SECONDS
    # timeout signals the whole process group, so run_all.py's stage processes stop with it
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" >> "$LOG"
    local rc=${PIPESTATUS[0]}
    local note=""
    if (( rc == 124 || rc == 137 )); then note="  TIMED OUT after ${limit}s"; fi
    echo >> "$LOG"   # the step's last line may lack its newline
    echo "===== $name: exit code $rc, $(( SECONDS - start ))s$note" >> "$LOG"
    printf '%-15s rc=%-3s %4ss%s  %s\n' "$name" "$rc" "$(( SECONDS - start ))" "$note" "$*" | tee -a "$SUMMARY"
}

GPU_MEM_PID=""
gpu_memory_start() {   # sample the GPU's used memory every 0.5 s while a step runs
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$WORK/$1.gpu_memory" 2>/dev/null &
    GPU_MEM_PID=$!
}
gpu_memory_stop() {
    [ -n "$GPU_MEM_PID" ] && kill "$GPU_MEM_PID" 2>/dev/null && wait "$GPU_MEM_PID" 2>/dev/null
    GPU_MEM_PID=""
    local peak
    peak=$(sort -n "$WORK/$1.gpu_memory" 2>/dev/null | tail -n 1)
    echo "    $1: peak GPU memory in use, whole GPU (nvidia-smi every 0.5 s): ${peak:-?} MiB" | tee -a "$SUMMARY"
}

finish() {   # at exit, also after a kill: stop the sampler, pack the runs' small files
    [ -n "$GPU_MEM_PID" ] && kill "$GPU_MEM_PID" 2>/dev/null
    (cd "$WORK" && tar -czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='*_data' . 2>/dev/null)
    echo "total ${SECONDS}s of the ${BUDGET_S}s budget; runs.tar.gz $(du -h "$OUT/runs.tar.gz" 2>/dev/null | cut -f1)" \
        | tee -a "$SUMMARY"
    echo "scratch (checkpoints, data): $WORK" | tee -a "$SUMMARY"
}
trap finish EXIT
trap 'exit 143' TERM INT   # so that `finish` runs when the machine's time limit stops the script

{
    echo "minirlhf GPU checks, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '(no git metadata)')"
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi failed')"
    echo "budget ${BUDGET_S}s${ONLY:+; only: $ONLY}"
} | tee -a "$SUMMARY"

if wanted nvidia-smi; then
    step nvidia-smi 30 nvidia-smi
fi

if wanted env; then
    cat > "$WORK/env.py" <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "| capability", torch.cuda.get_device_capability(),
          "| bf16:", torch.cuda.is_bf16_supported())
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed (the kernels fall back to the fused torch path)")
PY
    step env 60 "$PY" "$WORK/env.py"
    grep -E '^(python|cuda available|device|triton)' "$WORK/env.log" 2>/dev/null | sed 's/^/    /' >> "$SUMMARY"
fi

if wanted pytest; then
    step pytest 200 "$PY" -m pytest -q -x --durations=10
    tail -n 3 "$WORK/pytest.log" 2>/dev/null | sed 's/^/    /' >> "$SUMMARY"
fi

if wanted smoke; then
    step smoke 150 "$PY" run_all.py --preset smoke --device cuda --out-dir "$WORK/smoke" --data-dir "$WORK/smoke_data"
fi

if wanted torchrun; then
    if [ ! -f "$WORK/smoke_data/corpus.txt" ]; then   # the smoke step writes it; prepare it if that did not run
        step torchrun_data 90 "$PY" data/prepare.py --preset smoke --data-dir "$WORK/smoke_data"
    fi
    step torchrun 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train_base.py \
        --preset smoke --device cuda --data-dir "$WORK/smoke_data" --out-dir "$WORK/smoke_torchrun"
fi

# the table and the lines that explain it, without compiler warnings
BENCH_LINES='^(torch |MFU denominator|fp32 rows|[a-z]+: .*parameters| *preset dtype| +[a-z]+ +(fp32|bf16) |target )'
if wanted bench_train; then
    gpu_memory_start bench_train
    step bench_train 120 "$PY" benchmarks/bench_train.py --device cuda --presets medium,small --dtypes fp32,bf16
    gpu_memory_stop bench_train
    grep -E "$BENCH_LINES" "$WORK/bench_train.log" 2>/dev/null | sed 's/^/    /' >> "$SUMMARY"
fi

if wanted bench_kernels; then   # the same rows with the LM head through cuBLAS: what the logprob kernel costs
    step bench_kernels 90 "$PY" benchmarks/bench_train.py --device cuda --presets medium,small --dtypes bf16 --kernels reference
    grep -E "$BENCH_LINES" "$WORK/bench_kernels.log" 2>/dev/null | grep -E ' (fp32|bf16) ' | sed 's/^/    (reference kernels) /' >> "$SUMMARY"
fi

if wanted bench_compile; then   # bf16 only: each compiled row costs a compilation (tens of seconds)
    step bench_compile 240 "$PY" benchmarks/bench_train.py --device cuda --presets medium,small --dtypes bf16 --compile
    grep -E "$BENCH_LINES" "$WORK/bench_compile.log" 2>/dev/null | grep -E ' yes ' | sed 's/^/    /' >> "$SUMMARY"
fi

if wanted bench_logprobs; then   # 5 processes (one per implementation); torch.compile measured last
    step bench_logprobs 240 "$PY" benchmarks/bench_logprobs.py --device cuda
    # the final table; if the step was cut short, the rows it printed as it measured them
    TABLE_START='^results ('
    grep -q "$TABLE_START" "$WORK/bench_logprobs.log" 2>/dev/null || TABLE_START='^as measured'
    { grep -E '^token_logprobs on' "$WORK/bench_logprobs.log"
      sed -n "/$TABLE_START/,\$p" "$WORK/bench_logprobs.log"; } 2>/dev/null | sed 's/^/    /' >> "$SUMMARY"
fi

if wanted medium; then
    TIMER=()
    if [ -x /usr/bin/time ]; then
        TIMER=(/usr/bin/time -v -o "$WORK/medium.time")
    else
        echo "    medium: /usr/bin/time not found: wall time from the step line only, no host peak memory" >> "$SUMMARY"
    fi
    gpu_memory_start medium
    step medium 600 ${TIMER[@]+"${TIMER[@]}"} "$PY" run_all.py --preset medium --device cuda \
        --out-dir "$WORK/medium" --data-dir "$WORK/medium_data"
    gpu_memory_stop medium
    if [ -f "$WORK/medium.time" ]; then
        grep -E 'Elapsed \(wall clock\)|Maximum resident set size|Exit status' "$WORK/medium.time" \
            | sed 's/^[[:space:]]*/    medium: /' >> "$SUMMARY"
    fi
    tail -n 12 "$WORK/medium.log" 2>/dev/null | sed 's/^/    /' >> "$SUMMARY"   # run_all's table of stages
fi
