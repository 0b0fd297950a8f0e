#!/usr/bin/env bash
# CUDA checks and benchmarks in one run, for a GPU machine (run from the repository root).
# Uses the machine's own torch/triton/timm/typer; pixify is copied from this checkout to a private
# site folder (no pip, no network).  Everything is logged to $OUT/log.txt (default /tmp/pixify-gpu).
set -uo pipefail
OUT="${OUT:-/tmp/pixify-gpu}"
SITE="$(mktemp -d)"
mkdir -p "$OUT"
# a copy with the layout an install makes (rules/ as pixify/rulefiles), run from there: Python puts the
# working directory first on sys.path, so the checkout's own pixify/ (no rulefiles) must not be in it
cp -r pixify tests examples pyproject.toml "$SITE/" && cp -r rules "$SITE/pixify/rulefiles" && cd "$SITE" || exit 1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
px() { python3 -c "from pixify.cli import entry; entry()" "$@"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

echo "== tests (CUDA kernels, compile on CUDA)"
# the whole pytest output is in $OUT/tests.txt; here the failures (one line each) and the summary
timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short tests/test_triton.py \
  ${PIXIFY_TEST_K:+-k "$PIXIFY_TEST_K"} > "$OUT/tests.txt" 2>&1
grep -E "^(E |FAILED|ERROR)|passed|failed" "$OUT/tests.txt" | tail -30

echo "== ResNet-50 --zeta auto, eager"
px bench resnet50 --zeta auto --batch-size 1,64 --device cuda --dtype float16 --rounds 30 --floor
px bench resnet50 --zeta auto --batch-size 1,64 --device cuda --dtype bfloat16 --rounds 30
echo "== ResNet-50 --zeta auto, --compile"
px bench resnet50 --zeta auto --batch-size 1,64 --device cuda --dtype float16 --rounds 30 --compile --no-train
echo "== ResNet-50 --zeta auto, --compile-mode reduce-overhead (CUDA graphs: no per-kernel launch cost)"
px bench resnet50 --zeta auto --batch-size 1,64 --device cuda --dtype float16 --rounds 30 \
  --compile-mode reduce-overhead --no-train --floor
echo "== where the time goes: syncs and torch.profiler (batch 1, float16)"
timeout 120 python3 examples/gpu_profile.py resnet50 --batch-size 1 --dtype float16 --rows 10
echo "== kernels, device time (do_bench)"
[ -n "${PIXIFY_SKIP_KERNELS:-}" ] || timeout 90 python3 examples/gpu_kernels.py --json "$OUT/kernels.json"
echo "== ResNet-50 --zeta auto, eager, channels-last"
px bench resnet50 --zeta auto --batch-size 1,64 --device cuda --dtype float16 --rounds 30 --channels-last
