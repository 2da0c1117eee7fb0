#!/usr/bin/env bash
# Time two checkouts against each other on the same random-weight folder, in alternation, so that a
# machine's drift (a noisy neighbour, the page cache, the clock) lands on both sides alike.
#
#   git worktree add /tmp/before 22d4d8a && cp notes/bench.py /tmp/before/notes/  # 22d4d8a's has no 169m
#   bash notes/ab.sh /tmp/before . 169m float32 /tmp/ab 3 --contexts 512,8192 --prefill "" --steps 24
#
# writes /tmp/ab/model (once) and /tmp/ab/{before,after}-{1..RUNS}.json, then prints each run's
# median s/token per context. Extra arguments go to both checkouts' notes/bench.py.
set -euo pipefail
if [ $# -lt 6 ]; then
    echo "usage: notes/ab.sh BEFORE_CHECKOUT AFTER_CHECKOUT SIZE DTYPE OUTDIR RUNS [bench.py args...]" >&2
    exit 2
fi
before=$1 after=$2 size=$3 dtype=$4 out=$5 runs=$6
shift 6
mkdir -p "$out"
if [ ! -f "$out/model/model.safetensors" ]; then
    python - "$after" "$size" "$dtype" "$out/model" <<'EOF'
import os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "notes"))
import bench
bench.write_random_model(sys.argv[4], bench.SIZES[sys.argv[2]], sys.argv[3])
EOF
fi
for i in $(seq 1 "$runs"); do
    for side in before after; do
        dir=$before; [ "$side" = after ] && dir=$after
        python "$dir/notes/bench.py" --size "$size" --dtype "$dtype" --model "$out/model" \
            --json "$out/$side-$i.json" "$@" > /dev/null
    done
done
python - "$out" "$runs" <<'EOF'
import json, sys
out, runs = sys.argv[1], int(sys.argv[2])
for side in ("before", "after"):
    rows = [json.load(open(f"{out}/{side}-{i}.json"))["decode"] for i in range(1, runs + 1)]
    for k, ctx in enumerate(r["context"] for r in rows[0]):
        ms = ", ".join(f"{run[k]['s_per_token'] * 1e3:.0f}" for run in rows)
        print(f"{side:6s} context {ctx:5d}: {ms} ms/token")
EOF
