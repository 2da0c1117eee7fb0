#!/usr/bin/env bash
# The GPU session's prepared check (issue 19): everything a lent H100/H200 should measure, in one
# run that ends inside BUDGET seconds (default 420), most important first:
#
#   bash notes/gpu_check.sh            # BUDGET=300 bash notes/gpu_check.sh for less
#
#  1 tests   the GPU tests: each kernel of kernels.cu against its NumPy twin on the device; the whole
#            model on the device (bf16, fp32, int8 weights; bf16 K/V; PDL on vs off, bit for bit)
#  2 parity  notes/gpu_check.py: GPU vs CPU logits for each weights / K/V option on the fixture,
#            and at the real shapes (relative RMSE <= 1e-2)
#  3 pdl     notes/gpu_check.py --parts pdl: PDL on vs off, bitwise equal logits over 32 real-size
#            decode steps; the two-kernel probe that shows the launches overlap
#  4 bench   notes/bench.py at the real shapes, bf16 weights: decode at 2K and 32K context against
#            the measured read-bandwidth roofline, each kernel's GB/s, the host's share of a step,
#            a 32K-token prefill
#  5 nopdl   the same decode with PHI4FLASH_PDL=0
#  6 chain   notes/gemv_sweep.py --chain: a step's 138 products back to back, as PDL on, PDL off,
#            and PDL on without the GEMVs' L2 prefetch (three processes): each launch boundary's cost
#  7 int8    decode with int8 weights, fp32 K/V and bf16 K/V; then bf16 weights with bf16 K/V
#
# Each phase runs under its own time limit, cut to what is left of BUDGET, and a phase that would
# get under 20 s is skipped (said in the log), so one that hangs does not eat the others' time.
# Results: notes/results/gpu-<device>-<phase>.{txt,json} and the merged gpu-<device>.json, copied to
# $OUT when it is set (the device tool's output folder). The exit code is the first failing phase's.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
budget=${BUDGET:-420}
status=0
export PYTHONUNBUFFERED=1

$py -c "import cupy" 2>/dev/null || { echo "error: $py cannot import CuPy (pip install cupy-cuda13x, or cupy-cuda12x)" >&2; exit 2; }
$py -c "import cuda.bindings.driver" 2>/dev/null \
    || echo "note: no cuda-bindings: kernels launch without PDL (pip install cuda-bindings); the pdl phases measure nothing" >&2
name=$($py -c "import cupy; n = cupy.cuda.runtime.getDeviceProperties(0)['name']; n = n.decode() if isinstance(n, bytes) else n; print(n.replace(' ', '-'))") \
    || { echo "error: CuPy sees no CUDA device" >&2; exit 2; }
res=notes/results/gpu-$name
mkdir -p notes/results
export PHI4FLASH_CACHE=${PHI4FLASH_CACHE:-$(mktemp -d)}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv > "$res-device.txt" 2>&1
$py -c "import cupy, sys; print('cupy', cupy.__version__, 'python', sys.version.split()[0])" >> "$res-device.txt" 2>&1

phase() {  # phase NAME SECONDS COMMAND...: run under min(SECONDS, what is left), keep its output, remember a failure
    local name=$1 limit=$2; shift 2
    local left=$((budget - SECONDS - 10))                                  # 10 s kept for the merge and the copy
    [ $left -lt $limit ] && limit=$left
    if [ $limit -lt 20 ]; then echo "== $name: skipped, ${left}s of the budget left"; echo "skipped" > "$res-$name.txt"; return 0; fi
    echo "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$res-$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$res-$name.txt"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
    return 0
}

bench="$py notes/bench.py --size real --device cuda --contexts 2048,32768 --steps 16"
phase tests 120 $py -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py tests/test_pdl.py
phase parity 60 $py notes/gpu_check.py --parts fixture,real --json "$res-parity.json"
phase pdl 45 $py notes/gpu_check.py --parts pdl --json "$res-pdl.json"
phase bench 75 $bench --dtype bfloat16 --prefill 32768 --kernels --host-profile --json "$res-bench.json"
phase nopdl 40 env PHI4FLASH_PDL=0 $bench --dtype bfloat16 --prefill "" --json "$res-nopdl.json"
phase chain-pdl 35 $py notes/gemv_sweep.py --chain --json "$res-chain-pdl.json"
phase chain-nopdl 35 env PHI4FLASH_PDL=0 $py notes/gemv_sweep.py --chain --json "$res-chain-nopdl.json"
phase chain-noprefetch 35 env PHI4FLASH_PDL_PREFETCH=0 $py notes/gemv_sweep.py --chain --json "$res-chain-noprefetch.json"
phase int8 40 $bench --dtype int8 --prefill "" --json "$res-int8.json"
phase int8-bf16kv 40 $bench --dtype int8 --kv-dtype bfloat16 --prefill "" --json "$res-int8-bf16kv.json"
phase bf16kv 40 $bench --dtype bfloat16 --kv-dtype bfloat16 --prefill "" --json "$res-bf16kv.json"

$py - "$res" <<'EOF'
import json, os, sys
res = sys.argv[1]
merged = {"device": open(f"{res}-device.txt").read().strip().splitlines()}
for part in ("parity", "pdl", "bench", "nopdl", "chain-pdl", "chain-nopdl", "chain-noprefetch", "int8", "int8-bf16kv", "bf16kv"):
    if os.path.exists(f"{res}-{part}.json"):
        merged[part] = json.load(open(f"{res}-{part}.json"))
if os.path.exists(f"{res}-tests.txt"):
    merged["tests"] = open(f"{res}-tests.txt").read().strip().splitlines()[-1:]
json.dump(merged, open(f"{res}.json", "w"), indent=1)
print(f"wrote {res}.json")
for part in ("bench", "nopdl", "int8", "int8-bf16kv", "bf16kv"):                # the figures the issue asks for
    for d in merged.get(part, {}).get("decode", []):
        print(f"{part:12s} decode at {d['context']:6d}: {1e3 * d['s_per_token']:.3f} ms/token, "
              f"{100 * d['share_of_roofline']:.0f}% of the {1e3 * d['roofline_s']:.3f} ms roofline")
for d in merged.get("bench", {}).get("prefill", []):
    print(f"bench        prefill of {d['tokens']} tokens: {d['s']:.2f} s")
for part in ("chain-pdl", "chain-nopdl", "chain-noprefetch"):
    c = merged.get(part, {}).get("chain")
    if c:
        print(f"{part:16s} {c['step_ms']:.3f} ms vs floor {c['floor_ms']:.3f} ms: {c['per_boundary_us']:.2f} us per boundary")
if "pdl" in merged:
    print(f"pdl: on vs off bitwise {merged['pdl']['pdl']['on_vs_off_bitwise']}, probe {merged['pdl']['pdl']['probe']}")
if "parity" in merged:
    print(f"parity: worst rel RMSE {merged['parity'].get('worst_rel_rmse')}, passed {merged['parity'].get('passed')}")
EOF
if [ -n "${OUT:-}" ]; then cp "$res"*.json "$res"*.txt "$OUT"/ 2>/dev/null; fi
echo "gpu_check: exit $status after $SECONDS s"
exit $status
