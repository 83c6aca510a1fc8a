#!/usr/bin/env bash
# The checks that need a GPU, in one run of at most 8 minutes on one H100 (issue 18):
#
#   bash benchmarks/device_check.sh          # from the repository root, on the GPU machine
#
# 1. setup: the GPU (nvidia-smi), python and torch, and the Python packages the harness needs;
# 2. throughput: benchmarks/throughput.py --device cuda, 3 interleaved repeats (bars:
#    harness/plain >= 0.95 for cifar10/resnet20 and imagenet/resnet18; ResNet-18 trains with the
#    harness's `auto` loader workers, min(8, CPUs - 1)), the ImageNet loader alone at 0, 2 and 8
#    workers; throughput.json is rewritten after each benchmark, so a cut-short run keeps those done;
# 3. device_tests: tests/pipeline/test_device.py, whose CUDA tests skip without a GPU -- among them every
#    built-in method run through `jpqbench run` on CUDA for a capped number of steps (digits,
#    2 epochs x 3 steps: plan verified, cost counted, artifact exported, model.pt loadable
#    without a GPU); its nccl DDP test is left to part 4;
# 4. ddp_nccl: `jpqbench run --nproc 2` over nccl (tests/pipeline/test_device.py's DDP test) on two GPUs;
#    skipped, with the reason, on a machine with fewer.
#
# Everything goes under ${OUT:-/tmp/device_check}: one log per part, throughput.json and
# summary.txt (at most 6 files in one folder: what the device tool copies back). Each part
# runs under `timeout`, cut to what is left of the 8 minutes (DEADLINE_S); a part that finds
# too little time left is not started. The exit status is 0 only when every part ran and passed.
#
# The project is not pip-installed: its pyproject pins torch 2.14.1 and Python 3.11, while
# the GPU machine's image has its own torch and Python 3.12 and no network. PYTHONPATH puts the
# working tree first instead. Packages that the image lacks are installed from wheels in
# ${WHEELS:-.whl} (a folder of the working tree) when it holds any: `bash scripts/device_wheels.sh`
# fetches them here (the list and the versions are there), then name `.whl` in the run's `carry`.
# A part whose packages are missing is skipped, naming them.
set -euo pipefail

OUT=${OUT:-/tmp/device_check}
WHEELS=${WHEELS:-.whl}
PYTHON=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-450}  # 8 minutes, less a timed-out part's 10 s to die and the summary's few
MIN_PART_S=30  # a part is not started with less time than this left
HARNESS_MODULES="pydantic yaml scipy sklearn tqdm PIL torch_pruning gymnasium stable_baselines3"
TEST_MODULES="$HARNESS_MODULES mlflow pytest xdist pytest_timeout"

mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY=()
FAILED=0

missing_modules() {  # missing_modules MODULE...: those of MODULE... that python cannot import
  "$PYTHON" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(name for name in sys.argv[1:] if importlib.util.find_spec(name) is None))
EOF
}

part() {  # part NAME LIMIT_S REQUIRED_MODULES COMMAND...: COMMAND under timeout, output to $OUT/NAME.log
  local name=$1 limit=$2 modules=$3 start=$SECONDS rc=0 left
  shift 3
  left=$((DEADLINE_S - SECONDS))
  if ((left < MIN_PART_S)); then
    SUMMARY+=("$name: NOT RUN (${left}s left of the ${DEADLINE_S}s)"); FAILED=1; return
  fi
  local missing
  missing=$(missing_modules $modules)
  if [[ -n $missing ]]; then
    SUMMARY+=("$name: NOT RUN (missing Python packages: $missing; the header says how to carry wheels)")
    FAILED=1; return
  fi
  if ((limit > left)); then limit=$left; fi
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  tail -n 30 "$OUT/$name.log"
  case $rc in
    0) SUMMARY+=("$name: ok, $((SECONDS - start))s") ;;
    124 | 137) SUMMARY+=("$name: TIMED OUT after ${limit}s"); FAILED=1 ;;
    *) SUMMARY+=("$name: FAILED (exit status $rc), $((SECONDS - start))s"); FAILED=1 ;;
  esac
}

setup() {  # the machine, and the wheels in $WHEELS installed where the image lacks packages
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
  "$PYTHON" -c 'import sys, torch
print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda,
      "GPUs", torch.cuda.device_count())'
  local missing
  missing=$(missing_modules $TEST_MODULES)
  echo "missing before wheels: ${missing:-none}"
  if [[ -n $missing ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$WHEELS"/*.whl
    echo "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into /tmp/site"
  fi
}

gpus() {
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count())'
}

export PYTHON WHEELS TEST_MODULES
export -f setup missing_modules
part setup 90 "" bash -c setup
if [[ -d /tmp/site ]]; then export PYTHONPATH="$PYTHONPATH:/tmp/site"; fi
echo "missing after setup: $(missing_modules $TEST_MODULES)" >>"$OUT/setup.log"
part throughput 240 "$HARNESS_MODULES" \
  "$PYTHON" benchmarks/throughput.py --device cuda --repeats 3 --workers 0 2 8 \
  --json "$OUT/throughput.json"
part device_tests 200 "$TEST_MODULES" \
  "$PYTHON" -m pytest tests/pipeline/test_device.py -k "not nccl" -n 0 -q -rs --durations=0 -p no:cacheprovider
if (($(gpus) >= 2)); then
  part ddp_nccl 120 "$TEST_MODULES" \
    "$PYTHON" -m pytest tests/pipeline/test_device.py -k nccl -n 0 -q -rs -p no:cacheprovider
else
  SUMMARY+=("ddp_nccl: skipped: DDP over nccl needs two GPUs, this machine has $(gpus)")
fi

GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | paste -sd, -)
printf '%s\n' "gpu: $GPU; total: ${SECONDS}s of at most ${DEADLINE_S}s" "${SUMMARY[@]}" \
  | tee "$OUT/summary.txt"
exit "$FAILED"
