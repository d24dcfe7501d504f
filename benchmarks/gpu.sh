#!/usr/bin/env bash
# GPU checks, run on the lent GPU machine from the repo root (under 5 minutes):
#   benchmarks/gpu.sh --prepare   # here, once: wheels for pytest and the demo's config/tokenizer into .gpu/
#   benchmarks/gpu.sh             # there: GPU tests, runtime tests, the runtime's GPU benchmark → $OUT
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .gpu/wheels .gpu/demo
  python -m pip download -q --only-binary=:all: -d .gpu/wheels pytest
  demo=$(python -c "from inferkit.models.demo import fetch_demo; print(fetch_demo())")
  cp "$demo"/config.json "$demo"/tokenizer* "$demo"/generation_config.json .gpu/demo/
  exit 0
fi
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python -c "import pytest" 2>/dev/null || python -m pip install -q --no-index .gpu/wheels/*.whl
# No package index there: install without build isolation, or map the package folders by hand.
if ! python -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null; then
  export PYTHONPATH=$PWD
  ln -sfn ../calibration_data inferkit/calibration_data
  ln -sfn ../kernels inferkit/kernels
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 150 python -m pytest -q -p no:cacheprovider tests/gpu tests/unit/test_runtime.py tests/unit/test_block_manager.py \
  tests/unit/test_scheduler.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 240 python benchmarks/gpu_runtime.py --config .gpu/demo --out "$OUT/gpu_runtime.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/gpu_runtime.log"
