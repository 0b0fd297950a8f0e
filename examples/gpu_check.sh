#!/usr/bin/env bash
# CUDA checks and benchmarks for a GPU machine (run from the repository root):
#   bash examples/gpu_check.sh [tests] [eager] [profile] [overhead] [kernels] [compile1] [compile]
# No argument: all but compile1, well over 10 minutes.  Measured on an H200: tests about 2.5 min (the first
# Triton compiles), eager 3 min, overhead 0.5 min, compile1 over 3 min; a device call is limited to 10
# minutes, so run it in parts, e.g. 'tests eager overhead', then 'compile1 kernels'.
# Uses the machine's own torch/triton/timm/typer; pixify is copied from this checkout to a private folder
# (no pip, no network).  Everything is logged to $OUT/log.txt (default /tmp/pixify-gpu); the whole pytest
# output is in $OUT/tests.txt.
set -uo pipefail
OUT="${OUT:-/tmp/pixify-gpu}"
PARTS="${*:-tests eager profile overhead kernels compile}"
SITE="$(mktemp -d)"
mkdir -p "$OUT"
# a copy with the layout an install makes (rules/ as pixify/rulefiles), run from there: Python puts the
# working directory first on sys.path, so the checkout's own pixify/ (no rulefiles) must not be in it
cp -r pixify tests examples pyproject.toml "$SITE/" && cp -r rules "$SITE/pixify/rulefiles" && cd "$SITE" || exit 1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
px() { python3 -c "from pixify.cli import entry; entry()" "$@"; }
has() { [[ " $PARTS " == *" $1 "* ]]; }
R50=(bench resnet50 --zeta auto --batch-size 1,64 --device cuda --rounds 30)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

if has tests; then
  echo "== tests (CUDA kernels, both channels-innermost kernels, compile on CUDA)"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short tests/test_triton.py \
    ${PIXIFY_TEST_K:+-k "$PIXIFY_TEST_K"} > "$OUT/tests.txt" 2>&1
  grep -E "^(E |FAILED|ERROR)|passed|failed" "$OUT/tests.txt" | tail -30
fi
if has eager; then
  echo "== ResNet-50 --zeta auto, eager"
  px "${R50[@]}" --dtype float16 --floor
  px "${R50[@]}" --dtype bfloat16
  px "${R50[@]}" --dtype float16 --channels-last
  echo "== the same, channels-last, with the 'tile' channels-innermost kernel"
  PIXIFY_TRITON_CHANNELS_INNER=tile px "${R50[@]}" --dtype float16 --channels-last
fi
if has profile; then
  echo "== where the time goes: syncs and torch.profiler (batch 1, float16)"
  timeout 120 python3 examples/gpu_profile.py resnet50 --batch-size 1 --dtype float16 --rows 10
fi
if has overhead; then
  echo "== host cost per call of PiX's pieces (batch 1 and 64, float16)"
  timeout 120 python3 examples/gpu_overhead.py --shape 1,256,56,56
  timeout 120 python3 examples/gpu_overhead.py --shape 64,256,56,56
fi
if has kernels; then
  echo "== kernels, device time (do_bench)"
  timeout 120 python3 examples/gpu_kernels.py --json "$OUT/kernels.json"
fi
if has compile1; then
  echo "== ResNet-50 --zeta auto, --compile-mode reduce-overhead, graph breaks, recompiles and perf hints (e.g. why CUDA graphs were skipped) to $OUT/compile_log.txt"
  TORCH_LOGS=graph_breaks,recompiles,perf_hints px "${R50[@]}" --dtype float16 --compile-mode reduce-overhead --no-train --floor \
    2> "$OUT/compile_log.txt"
  grep -ciE "graph break" "$OUT/compile_log.txt"; grep -iE "reason|break" "$OUT/compile_log.txt" | sort | uniq -c | sort -rn | head -20
fi
if has compile; then
  echo "== ResNet-50 --zeta auto, --compile-mode reduce-overhead (CUDA graphs: no per-kernel launch cost)"
  px "${R50[@]}" --dtype float16 --compile-mode reduce-overhead --no-train --floor
  echo "== the same with PiX as the custom op (Triton) instead of decomposed for inductor"
  PIXIFY_COMPILED_PIX=op px "${R50[@]}" --dtype float16 --compile-mode reduce-overhead --no-train
  echo "== ResNet-50 --zeta auto, --compile (default mode)"
  px "${R50[@]}" --dtype float16 --compile --no-train
fi
