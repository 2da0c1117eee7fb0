"""The full-size benchmark of issue 7: a genuinely 7.7 GB random bf16 checkpoint, converted and run on
this machine with the weights kept bf16 in RAM (or int8: --dtype). Nothing to download.

    python notes/bench_real_size.py --json notes/results/cpu-real-size-end-to-end.json   # the real size: 7.7 GB
    python notes/bench_real_size.py --layers 8 --hidden 512 --decode 4         # a reduced run (~290 MB)
    python notes/bench_real_size.py --dtype bfloat16,int8 --long-context 32768 --kv-dtypes float32,bfloat16

Phases, each in its own process so each reports its own peak RSS (VmHWM):
  write    a Hugging Face snapshot with the real names and shapes (two bf16 shards + index, the tiny
           tokenizer with the real special-token ids; tests/synthetic.py), random values at scales
           that keep activations finite, generated a few MB at a time;
  convert  convert.convert(snapshot, converted): seconds, MB/s of source, peak RSS;
  run      phi4flash.load (memory-mapped: headers only), then every weight page read into RAM (the
           bf16-in-RAM state: weights stay bf16, compute is fp32), a prefill of --prefill tokens and
           --decode greedy steps through the cache: seconds, s/token, peak RSS. With --long-context N,
           then --decode steps after N tokens for each of --kv-dtypes; that cache is filled with
           random K/V (bench.synthetic_cache): a real prefill of 32K tokens would take ~17 minutes.
With several --dtype values the snapshot is written once and convert and run go once per dtype.

By default each file is flushed and dropped from the page cache before the next phase reads it, so
convert and the page-in read from disk as after a reboot (--warm keeps them cached). Needs free disk
for two copies of the weights (15.4 GB at the real size) in --tmp; everything is deleted at the end,
also on error or Ctrl-C (--keep keeps it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "notes")]
import convert  # noqa: E402
import phi4flash  # noqa: E402
import synthetic  # noqa: E402
from bench import copy_bandwidth, decode_bytes, decode_profile, synthetic_cache, weight_tensors  # noqa: E402


def hf_config(args):
    """REAL_CONFIG, or a reduced one: head_dim stays 64 and KV heads half the query heads, as in the real model."""
    if args.hidden % 256:
        raise SystemExit(f"error: --hidden {args.hidden}: expected a multiple of 256 (heads of 64, an even number of "
                         f"query and KV heads)")
    if args.layers % 4 or args.layers < 4:
        raise SystemExit(f"error: --layers {args.layers}: expected a multiple of 4 (SambaY's schedule)")
    heads = args.hidden // 64
    return synthetic.config_with(num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                 num_attention_heads=heads, num_key_value_heads=heads // 2, vocab_size=args.vocab)


def peak_rss():
    """This process's peak and current resident memory, in bytes (file-backed weight pages included)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def drop_from_page_cache(folder):
    """Flush and evict one folder's files from the page cache (only those files: other users' cache stays)."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------------------------
# The phases (run in child processes: python bench_real_size.py --phase NAME ...)

def phase_write(args, work):
    cfg = json.loads(args.config)
    start = time.perf_counter()
    nbytes = synthetic.write_snapshot(os.path.join(work, "snapshot"), cfg, fill=synthetic.random_fill(seed=0))
    seconds = time.perf_counter() - start
    return {"bytes": nbytes, "s": seconds}


def phase_convert(args, work):
    start = time.perf_counter()
    out = os.path.join(work, f"converted-{args.dtype}")
    convert.convert(os.path.join(work, "snapshot"), out, dtype=args.dtype, show_progress=False)
    seconds = time.perf_counter() - start
    return {"s": seconds, "source_bytes": synthetic_bytes(os.path.join(work, "snapshot")),
            "output_bytes": os.path.getsize(os.path.join(out, "model.safetensors"))}


def synthetic_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def phase_run(args, work):
    out = {}
    start = time.perf_counter()
    model = phi4flash.load(os.path.join(work, f"converted-{args.dtype}"))
    out["load_s"] = time.perf_counter() - start
    out["prefill_tokens"] = args.prefill
    start = time.perf_counter()
    for a in weight_tensors(model):  # one byte of every 4 kB page: the kernel reads each page in once
        np.bitwise_or.reduce(a.reshape(-1).view(np.uint8)[::4096])
    out["page_in_s"] = time.perf_counter() - start
    out["rss_page_in"] = peak_rss()
    out["weights_bytes"] = sum(a.nbytes for a in weight_tensors(model))
    rng = np.random.default_rng(0)
    ids = rng.choice(np.flatnonzero(model.token_mask), args.prefill)
    start = time.perf_counter()
    logits, cache = model.prefill(ids, model.new_cache(args.prefill + args.decode + 1))
    out["prefill_s"] = time.perf_counter() - start
    out["rss_prefill"] = peak_rss()
    steps = []
    for _ in range(args.decode):
        token = phi4flash.sample(logits, model.token_mask, 0.0, 0, 1.0, None)
        start = time.perf_counter()
        logits = model.step(cache, token)
        steps.append(time.perf_counter() - start)
    out["decode_s"] = steps
    out["rss"] = peak_rss()  # while the model is still mapped
    out["copy_GBps"] = copy_bandwidth() / 1e9     # this run's own bandwidth, for the roofline
    out["roofline_s"] = decode_bytes(model, args.prefill + args.decode // 2) / (out["copy_GBps"] * 1e9)
    if args.profile:  # where a step's time goes (a second prefill of the same length, then timed steps)
        out["profile"] = decode_profile(model, [args.prefill], args.profile)[args.prefill]
    out["logits_finite"] = bool(np.isfinite(logits).all())
    out["logits_std"] = float(np.std(logits))
    del cache
    out["long"] = []
    for kv_dtype in filter(None, args.kv_dtypes.split(",") if args.long_context else []):
        other = dataclasses.replace(model, kv_dtype=kv_dtype)
        cache = synthetic_cache(other, args.long_context, args.decode + 2)
        token, steps = 1, []
        for n in range(args.decode + 1):
            start = time.perf_counter()
            token = int(np.argmax(other.step(cache, token)))
            if n:                                  # the first step touches the new cache's pages
                steps.append(time.perf_counter() - start)
        out["long"].append({"context": args.long_context, "kv_dtype": kv_dtype, "decode_s": steps,
                            "roofline_s": decode_bytes(other, args.long_context + args.decode // 2) / (out["copy_GBps"] * 1e9),
                            "cache_filled": "random K/V (synthetic_cache), no prefill"})
        del cache
    return out


PHASES = {"write": phase_write, "convert": phase_convert, "run": phase_run}


def run_phase(name, args, work, config):
    """Run one phase in a fresh process; -> its result dict (with its peak RSS)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", name, "--work", work, "--config", json.dumps(config),
           "--prefill", str(args.prefill), "--decode", str(args.decode), "--profile", str(args.profile),
           "--dtype", args.dtype, "--long-context", str(args.long_context), "--kv-dtypes", args.kv_dtypes]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"error: phase {name} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="num_hidden_layers (default 32, the real model)")
    ap.add_argument("--hidden", type=int, default=2560, help="hidden_size; heads of 64, MLP 4x (default 2560)")
    ap.add_argument("--vocab", type=int, default=200064, help="vocab_size (default 200064; at least 200029 for the "
                    "real special-token ids)")
    ap.add_argument("--prefill", type=int, default=512, help="prompt tokens (default 512)")
    ap.add_argument("--decode", type=int, default=16, help="decode steps timed one by one (default 16)")
    ap.add_argument("--tmp", default=os.environ.get("TMPDIR", "/tmp"), help="where the temporary folder goes")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also: where a decode step's time goes, over STEPS steps after a second prefill")
    ap.add_argument("--dtype", default="bfloat16", help="the conversion's --dtype, or several, comma-separated "
                    "(bfloat16, float32, int8; default bfloat16)")
    ap.add_argument("--long-context", type=int, default=0, metavar="N",
                    help="also: --decode steps after N tokens of random K/V (no prefill), for each --kv-dtypes")
    ap.add_argument("--kv-dtypes", default="float32", help="K/V caches for --long-context, comma-separated "
                    "(float32, bfloat16; default float32)")
    ap.add_argument("--warm", action="store_true", help="leave files in the page cache between phases")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.phase:  # a child: run one phase, print its result as the last line
        result = PHASES[args.phase](args, args.work)
        result.setdefault("rss", peak_rss())
        print(json.dumps(result))
        return 0

    if args.vocab <= max(synthetic.REAL_SPECIAL_IDS.values()):
        raise SystemExit(f"error: --vocab {args.vocab}: expected more than {max(synthetic.REAL_SPECIAL_IDS.values())} "
                         f"(the tokenizer has the real special-token ids)")
    if args.prefill < 1 or args.decode < 1:
        raise SystemExit("error: --prefill and --decode: expected at least 1")
    dtypes = args.dtype.split(",")
    for d in dtypes:
        if d not in phi4flash.WEIGHTS_DTYPES:
            raise SystemExit(f"error: --dtype {d}: expected {', '.join(phi4flash.WEIGHTS_DTYPES)}")
    for d in filter(None, args.kv_dtypes.split(",")):
        if d not in phi4flash.KV_DTYPES:
            raise SystemExit(f"error: --kv-dtypes {d}: expected {', '.join(phi4flash.KV_DTYPES)}")
    config = hf_config(args)
    cfg = convert.config_from_hf(config)
    params = sum(math.prod(s) for s in convert.hf_tensor_shapes(cfg).values())
    if not os.path.isdir(args.tmp):
        raise SystemExit(f"error: --tmp {args.tmp}: not a folder")
    stored = {"bfloat16": 2, "float32": 4, "int8": 1.125}
    need = int(2 * params + sum(stored[d] for d in dtypes) * params) + (256 << 20)  # the snapshot, the conversions
    free = shutil.disk_usage(args.tmp).free
    if free < need:
        raise SystemExit(f"error: --tmp {args.tmp}: {free / 1e9:.1f} GB free, this run needs {need / 1e9:.1f} GB")
    work = tempfile.mkdtemp(prefix="phi4flash-bench-real-size-", dir=args.tmp)
    results = {"command": " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
               "config": {"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab, "parameters": params},
               "machine": machine(), "cold": not args.warm,
               "loadavg_start": os.getloadavg()}  # others' work on the machine: a busy one reads slower
    try:
        results["write"] = run_phase("write", args, work, config)
        if not args.warm:
            drop_from_page_cache(os.path.join(work, "snapshot"))
        results["dtypes"] = {}
        for dtype in dtypes:
            args.dtype = dtype
            results["dtypes"][dtype] = {"convert": run_phase("convert", args, work, config)}
            if not args.warm:
                drop_from_page_cache(os.path.join(work, "snapshot"))
        shutil.rmtree(os.path.join(work, "snapshot"))  # not needed any more: frees disk
        for dtype in dtypes:
            args.dtype = dtype
            if not args.warm:
                drop_from_page_cache(os.path.join(work, f"converted-{dtype}"))
            results["dtypes"][dtype]["run"] = run_phase("run", args, work, config)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the temporary folder is removed")
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["loadavg_end"] = os.getloadavg()
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def machine():
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpus": os.cpu_count(), "ram_bytes": mem, "python": platform.python_version(), "numpy": np.__version__,
            "platform": platform.platform(), "commit": commit}


def report(r):
    GB, MB = 1e9, 1e6
    c, m, w = r["config"], r["machine"], r["write"]
    runs = r.get("dtypes") or {"bfloat16": {"convert": r["convert"], "run": r["run"]}}  # older results: one dtype
    print(f"{c['layers']} layers, hidden {c['hidden']}, vocab {c['vocab']}: {c['parameters']:,} parameters "
          f"({w['bytes'] / GB:.2f} GB bf16); {m['cpus']} CPUs, {m['ram_bytes'] / 2**30:.1f} GiB RAM, numpy {m['numpy']}, "
          f"commit {m['commit']}; {'cold' if r['cold'] else 'warm'} page cache between phases"
          + (f"; load average {r['loadavg_start'][0]:.2f} at the start, {r['loadavg_end'][0]:.2f} at the end"
             if "loadavg_start" in r else ""))
    print(f"command: python {r['command']}")
    for dtype, both in runs.items():
        cv, run = both["convert"], both["run"]
        steps = np.array(run["decode_s"])
        print(f"\n**{dtype} weights** ({cv['output_bytes'] / GB:.2f} GB converted file)\n")
        rows = [
            ("write snapshot", f"{w['s']:.1f} s", f"{w['bytes'] / MB / w['s']:.0f} MB/s", w["rss"]["VmHWM"]),
            ("convert", f"{cv['s']:.1f} s", f"{cv['source_bytes'] / MB / cv['s']:.0f} MB/s of source", cv["rss"]["VmHWM"]),
            ("load (mmap, headers)", f"{run['load_s']:.3f} s", "", None),
            ("page-in (weights into RAM)", f"{run['page_in_s']:.1f} s",
             f"{run['weights_bytes'] / MB / run['page_in_s']:.0f} MB/s", run["rss_page_in"]["VmHWM"]),
            (f"prefill {run['prefill_tokens']} tokens", f"{run['prefill_s']:.2f} s",
             f"{run['prefill_tokens'] / run['prefill_s']:.1f} tok/s", run["rss_prefill"]["VmHWM"]),
            (f"decode {len(steps)} steps", f"{np.median(steps):.3f} s/token (median)",
             f"mean {steps.mean():.3f}, first {steps[0]:.3f}, min {steps.min():.3f}, max {steps.max():.3f}", run["rss"]["VmHWM"]),
        ]
        print("| phase | time | rate | peak RSS so far (its process) |\n|---|---|---|---|")
        for name, seconds, rate, rss in rows:
            print(f"| {name} | {seconds} | {rate} | {'' if rss is None else f'{rss / GB:.2f} GB'} |")
        print(f"\ndecode roofline: {run['roofline_s']:.3f} s/token (the step's bytes at this run's copy bandwidth, "
              f"{run['copy_GBps']:.1f} GB/s): the median step is {np.median(steps) / run['roofline_s']:.2f}x it")
        for long in run.get("long", []):
            t = float(np.median(long["decode_s"]))
            print(f"decode at context {long['context']} ({long['cache_filled']}), {long['kv_dtype']} K/V: {t:.3f} s/token "
                  f"(median of {len(long['decode_s'])}), roofline {long['roofline_s']:.3f}: {t / long['roofline_s']:.2f}x")
        if "profile" in run:
            p = run["profile"]
            print(f"\ndecode step at context {run['prefill_tokens']}: {p['total_ms']:.1f} ms (with sampling)\n"
                  "| part | ms | share |\n|---|---|---|")
            for part, ms in p["parts_ms"].items():
                print(f"| {part} | {ms:.1f} | {100 * ms / p['total_ms']:.1f}% |")
        rss = run["rss"]
        print(f"\nrun process after decoding: RSS {rss['VmRSS'] / GB:.2f} GB = weights mapped from the file "
              f"{rss['RssFile'] / GB:.2f} GB + its own memory {rss['RssAnon'] / GB:.2f} GB; last logits finite: "
              f"{run['logits_finite']} (std {run['logits_std']:.3f})")


if __name__ == "__main__":
    sys.exit(main())
