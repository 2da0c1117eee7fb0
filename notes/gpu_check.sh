#!/usr/bin/env bash
# The GPU session's prepared check (issue 12, part 3): on one H100/H200 it takes about 8 minutes.
#
#   bash notes/gpu_check.sh
#
# 1. CuPy: used if importable, else installed from PyPI (cupy-cuda13x, then cupy-cuda12x).
# 2. The GPU tests: every kernel of kernels.cu against its NumPy twin on the device, and the whole
#    model on the device (fp32 vs the reference, bf16 vs fp32, cached decode vs full recompute with
#    and without CUDA graphs, greedy turns).
# 3. notes/gpu_check.py: relative RMSE of the logits, GPU bf16 vs the fp32 CPU path, on the
#    fixture and on a random model with the real shapes (<= 1e-2).
# 4. notes/bench.py on the real shapes: decode at 2K and 32K context against the measured-bandwidth
#    roofline, each kernel's time and GB/s (--kernels), a 32K-token prefill.
# Everything lands in notes/results/gpu-<device>*.{txt,json} and, when $OUT is set (the device
# tool's output folder), is copied there. Each phase has its own time limit, so one that hangs
# does not eat the others' time; the exit code is the first failing phase's.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
status=0

$py -c "import cupy" 2>/dev/null || $py -m pip install -q "cupy-cuda13x>=13.6" || $py -m pip install -q "cupy-cuda12x>=13" \
    || { echo "error: no CuPy and none could be installed" >&2; exit 2; }
name=$($py -c "import cupy; n = cupy.cuda.runtime.getDeviceProperties(0)['name']; n = n.decode() if isinstance(n, bytes) else n; print(n.replace(' ', '-'))") \
    || { echo "error: CuPy sees no CUDA device" >&2; exit 2; }
res=notes/results/gpu-$name
mkdir -p notes/results
export PHI4FLASH_CACHE=${PHI4FLASH_CACHE:-$(mktemp -d)}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$res-device.txt" 2>&1

phase() {  # phase NAME SECONDS COMMAND...: run with a time limit, keep its output, remember a failure
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$res-$name.txt" 2>&1
    local rc=$?
    tail -n 40 "$res-$name.txt"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    return 0
}

phase tests 150 $py -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py
phase parity 120 $py notes/gpu_check.py --json "$res-parity.json"
phase bench 180 $py notes/bench.py --size real --dtype bfloat16 --device cuda --contexts 2048,32768 \
    --prefill 32768 --steps 16 --kernels --prefill-profile --json "$res-bench.json"

$py - "$res" <<'EOF'
import json, os, sys
res = sys.argv[1]
merged = {}
for part in ("parity", "bench"):
    if os.path.exists(f"{res}-{part}.json"):
        merged[part] = json.load(open(f"{res}-{part}.json"))
merged["device"] = open(f"{res}-device.txt").read().strip().splitlines()
merged["tests"] = open(f"{res}-tests.txt").read().strip().splitlines()[-1:] if os.path.exists(f"{res}-tests.txt") else []
json.dump(merged, open(f"{res}.json", "w"), indent=1)
print(f"wrote {res}.json")
EOF
if [ -n "${OUT:-}" ]; then cp "$res"*.json "$res"*.txt "$OUT"/ 2>/dev/null; fi
exit $status
