#!/usr/bin/env bash
# GPU checks, run on the lent GPU machine from the repo root (about 5 minutes on an H100; the
# quick grid's GEMV/MMA loops add about 36 timings to part 2, whose length is not yet measured):
#   benchmarks/gpu.sh --prepare   # here, once: wheels for pytest, the demo's config/tokenizer and the
#                                 # baseline revision's INT4 kernel (GPU_BASELINE_REV, default dc815a0) into .gpu/
#   benchmarks/gpu.sh             # there: kernel and runtime tests, kernel benchmarks, end-to-end decode → $OUT
# The INT4 2.5x target (H100, 2026-11-27): GPU_PARTS=sweep GPU_SWEEP_S=200 GPU_SWEEP_ARGS="--grid next" (56
# configs, each plain and PDL, each checked against the reference before it is timed; 54 s) gave 2.62x as a
# programmatic dependent launch, 2.39x plain; GPU_PARTS=chain (30 s) the same matmul after an RMSNorm and a
# whole MLP block, plain, PDL and as launched by default; GPU_PARTS=tests 105 s, runtime 137 s, e2e 73 s.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .gpu/wheels .gpu/demo
  python -m pip download -q --only-binary=:all: -d .gpu/wheels pytest pytest-xdist
  demo=$(python -c "from inferkit.models.demo import fetch_demo; print(fetch_demo())")
  cp "$demo"/config.json "$demo"/tokenizer* "$demo"/generation_config.json .gpu/demo/
  # the kernel before the per-thread accumulators, timed beside the current one (gpu_kernels.py --baseline)
  mkdir -p .gpu/baseline
  git show "${GPU_BASELINE_REV:-dc815a0}:kernels/quant_matmul.py" > .gpu/baseline/quant_matmul.py
  exit 0
fi
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# pytest and pytest-xdist (compiles run in parallel over 8 workers) from the prepared wheels
python -c "import pytest, xdist" 2>/dev/null || python -m pip install -q --no-index --find-links .gpu/wheels pytest pytest-xdist
# No package index there: install without build isolation, or map the package folders by hand.
if ! python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null; then
  export PYTHONPATH=$PWD
  ln -sfn ../calibration_data inferkit/calibration_data
  ln -sfn ../kernels inferkit/kernels
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
PARTS=${GPU_PARTS:-tests,kernels,chain,runtime}  # e.g. GPU_PARTS=kernels for the benchmarks alone; e2e for 2b, sweep for 2c, chain for 2d; add tune, profile, steps for 4-6
# 1. Tests: every kernel against its reference (compiled, not interpreted), the runtime on CUDA.
if [[ $PARTS == *tests* ]]; then
  xdist=""; python -c "import xdist" 2>/dev/null && xdist="-n 8"
  tests="tests/unit/test_kernels.py tests/unit/test_tune_kernels.py tests/gpu"
  [[ $PARTS == *cputests* ]] && tests="$tests tests/unit/test_runtime.py tests/unit/test_block_manager.py tests/unit/test_scheduler.py"
  timeout 150 python -m pytest -q -p no:cacheprovider $xdist --tb=short $tests > "$OUT/gpu_tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$OUT/gpu_tests.txt" | tail -30
  echo "[tests done at ${SECONDS}s]"
fi
# 2. Kernel benchmarks and end-to-end decode on a Llama-1B-shaped model.
if [[ $PARTS == *kernels* ]]; then
  base=""; [ -f .gpu/baseline/quant_matmul.py ] && base="--baseline .gpu/baseline/quant_matmul.py"
  timeout 360 python benchmarks/gpu_kernels.py --out "$OUT/gpu_kernels.json" --tokenizer .gpu/demo $base ${GPU_KERNELS_ARGS:-} 2>&1 \
    | grep -v "Loading weights" | tee "$OUT/gpu_kernels.log" | grep -v "^attention {\|^matmul {"
  echo "[kernels done at ${SECONDS}s]"
  # The sweep's fastest tiles (kernels/configs/ format): the runtime part below launches with them.
  [ -d "$OUT/tuned" ] && export INFERKIT_KERNEL_CONFIGS="$OUT/tuned"
fi
# 2b. (Only when GPU_PARTS names it.) The end-to-end decode alone (part 2's last step), after a fix
#     there, without the kernel sweep.
if [[ $PARTS == *e2e* ]]; then
  timeout 240 python benchmarks/gpu_kernels.py --only-e2e --out "$OUT/gpu_e2e.json" --tokenizer .gpu/demo 2>&1 \
    | grep -v "Loading weights" | tee "$OUT/gpu_e2e.log"
  echo "[e2e done at ${SECONDS}s]"
fi
# 2c. (Only when GPU_PARTS names it.) The full tile grid for the INT4 GEMV at batch 1, 4096x14336.
if [[ $PARTS == *sweep* ]]; then
  timeout $(( ${GPU_SWEEP_S:-210} + 50 )) python benchmarks/gpu_int4_sweep.py --out "$OUT/int4_sweep.json" \
    --budget-s ${GPU_SWEEP_S:-210} ${GPU_SWEEP_ARGS:-} 2>&1 \
    | tee "$OUT/int4_sweep.log"
  echo "[sweep done at ${SECONDS}s]"
fi
# 2d. (Only when GPU_PARTS names it.) A decode step's MLP block at batch 1 on Llama-3-8B's shapes
#     (RMSNorm then the 4096x14336 matmul; norm, gate/up, SiLU, down): bf16 against INT4 launched
#     plain and as PDL, after the kernels that really precede the matmuls, not the same matmul.
if [[ $PARTS == *chain* ]]; then
  timeout 120 python benchmarks/gpu_pdl_chain.py --out "$OUT/pdl_chain.json" 2>&1 | tee "$OUT/pdl_chain.log"
  echo "[chain done at ${SECONDS}s]"
fi
# 3. The runtime on the demo's shape (fp32, bf16, W4, W4 with every matmul a PDL launch, W8): the
#    issue-4 benchmark, now on the Triton kernels.
if [[ $PARTS == *runtime* ]]; then
  timeout 180 python benchmarks/gpu_runtime.py --config .gpu/demo --out "$OUT/gpu_runtime.json" 2>&1 \
    | grep -v "Loading weights" | tee "$OUT/gpu_runtime.log"
  echo "[runtime done at ${SECONDS}s]"
fi
# 4. (Only when GPU_PARTS names it.) inferkit tune-kernels on the runtime part's W4 artifact (demo
#    shape): the command a user runs for their own model, its quick grid at 1, 4 and 16 rows, the 3
#    fastest configs per shape also timed as programmatic dependent launches (--pdl).
if [[ $PARTS == *tune* ]]; then
  [ -d /tmp/ik-gpu/w4 ] || timeout 120 python benchmarks/gpu_runtime.py --config .gpu/demo --build-only
  timeout 150 python -m inferkit tune-kernels /tmp/ik-gpu/w4 -o "$OUT/tuned-demo-w4.json" --grid quick --rows 1,4,16 --pdl \
    --overwrite --json "$OUT/tune-demo-w4-sweep.json" 2>&1 | tail -25  # no log file: the device returns 8 files
  echo "[tune done at ${SECONDS}s]"
fi
# 5. (Only when GPU_PARTS names it.) Nsight Compute on the INT4 decode GEMV at 4096x14336: memory
#    throughput, occupancy, warp stalls by reason and the memory chart: the H100 table's tiles, the
#    heuristic's, and the heuristic's loading 2 tiles ahead and pipelined in 4 stages
#    (GPU_PROFILE_CONFIGS: ';'-separated JSON configs instead, "" for the table's).
if [[ $PARTS == *profile* ]]; then
  ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  if [ -z "$ncu" ]; then
    echo "profile: no ncu on this machine"
  else
    stalls=""
    for why in long_scoreboard short_scoreboard wait math_pipe_throttle not_selected selected dispatch_stall \
               no_instruction mio_throttle lg_throttle branch_resolving barrier membar drain misc; do
      stalls="$stalls${stalls:+,}smsp__average_warps_issue_stalled_${why}_per_issue_active.ratio"
    done
    default_cfgs=';{"BN": 128, "BK": 128, "SPLIT_K": 8, "num_warps": 8}'
    default_cfgs+=';{"BN": 128, "BK": 128, "SPLIT_K": 8, "num_warps": 8, "PREFETCH": 2}'
    default_cfgs+=';{"BN": 128, "BK": 128, "SPLIT_K": 8, "num_warps": 8, "STAGES": 4}'
    IFS=';' read -ra cfgs <<< "${GPU_PROFILE_CONFIGS:-$default_cfgs}"
    for cfg in "${cfgs[@]}"; do
      timeout 90 "$ncu" --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
        --section MemoryWorkloadAnalysis --section SchedulerStats --metrics "$stalls" \
        -k regex:gemv --launch-skip 3 --launch-count 1 python benchmarks/gpu_int4_profile.py ${cfg:+--config "$cfg"} 2>&1 \
        | grep -vE "^==PROF==|^\s*$" | tee -a "$OUT/ncu_int4.txt" | grep -E "config|Duration|Memory Throughput|DRAM Through|Achieved Occupancy|Registers Per|Stall|stalled|Warp Cycles Per Issued"
    done
  fi
  echo "[profile done at ${SECONDS}s]"
fi
# 6. (Only when GPU_PARTS names it.) Where the demo-shaped W4 model's decode steps spend their GPU
#    time against bf16's (the W4 load test serves 999 tok/s against bf16's 4464): top kernels.
if [[ $PARTS == *steps* ]]; then
  [ -d /tmp/ik-gpu/w4 ] || timeout 120 python benchmarks/gpu_runtime.py --config .gpu/demo --build-only
  for model in fp32 w4; do
    timeout 90 python benchmarks/gpu_profile.py --model /tmp/ik-gpu/$model --dtype bfloat16 --batch 16 2>&1 \
      | grep -v "Loading weights" | tee -a "$OUT/steps_profile.txt"
  done
  echo "[steps done at ${SECONDS}s]"
fi
