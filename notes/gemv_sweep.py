"""Where a GPU decode step's time goes, and kernel 7 (gemv_bf16) on the real decode-step shapes as
built and in variants: the numbers behind notes/gpu.md's "Decode on a GPU: the measured picture".

    python notes/gemv_sweep.py [--json notes/results/gemv-sweep.json] [--variants base,unroll2] [--contexts 2048]
    python notes/gemv_sweep.py --chain --json out.json     # only the chain below (4), as PHI4FLASH_PDL says

1. The real decode step (random real-size weights) at each --contexts length, captured as a CUDA
   graph with only some of its launches kept (all, the GEMVs, the attention, the LayerNorms, ...),
   so each part's GPU time is measured without events between launches.
2. Each (variant, shape): R launches of kernel 7 captured in one graph over enough copies of W that
   every read comes from HBM, not L2; GB/s counts the weight bytes. A variant is kernels.cu's source
   with some text replaced and/or another split-K policy (VARIANTS below), compiled by NVRTC with
   CuPy's options and launched as phi4flash.cuda_gemv launches the real one.
3. References: the run's read and copy bandwidths (notes/bench.py's device_bandwidths, the same
   denominator as bench.py's roofline: the products' floor is their weight bytes over the read
   bandwidth), an empty launch inside a graph, and torch's bf16 linear on the same shapes when torch
   is importable.
4. --chain: the 138 products of a step back to back, each with its own weights, as one graph: the
   cost of a launch boundary beyond the bytes' floor, with and without programmatic dependent launch.

Which products a decode step makes, and how many of each, comes from the config's layer schedule
(decode_products), not from a typed table; tests/test_gpu_roofline.py checks it against the
launches of phi4flash.cuda_step_layers. Nothing here needs a GPU until main() runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "notes")]
import bench  # noqa: E402
import phi4flash as pf  # noqa: E402

LB = '__launch_bounds__(GEMV_WARPS * WARP, 4)\ngemv_bf16('
HINT = "#ifdef __CUDA_ARCH__  // read-only, not kept in L1, and L2 fetches the whole 256-byte line: +4% (notes/gpu.md)"
ONE_ROW = "    if (rows == 1)  // a decode step: one row, no per-row predicates (they cost a quarter of its speed)"
def short_warps(out_features, in_features, cols=1024):
    """A split policy: the fewest warps per output that leave each at most `cols` columns (one
    GEMV_UNROLL round of loads), so no warp lives long and a launch's tail is short."""
    splits = 1
    while splits < pf.GEMV_WARPS and in_features > cols * splits:
        splits *= 2
    return splits


VARIANTS = {  # name -> ([(text in kernels.cu, replacement)], split policy)
    "base": ([], pf.gemv_splits),
    "unroll2": ([("#define GEMV_UNROLL 4 ", "#define GEMV_UNROLL 2 ")], pf.gemv_splits),
    "minblocks3": ([(LB, LB.replace(", 4)", ", 3)"))], pf.gemv_splits),
    "no-L2-hint": ([(HINT, "#if 0")], pf.gemv_splits),                  # plain __ldg loads
    "no-one-row-path": ([(ONE_ROW, "    if (false)")], pf.gemv_splits),   # rows == 1 through the 8-row instance
    "short-warps-1024": ([], short_warps),
    "short-warps-512": ([], lambda o, i: short_warps(o, i, 512)),
    "short-warps-2048": ([], lambda o, i: short_warps(o, i, 2048)),
}


def decode_products(cfg):
    """The products (kernel 7 launches) of one decode step of this config, from its layer schedule:
    [(label, out_features, in_features, mode, launches per step)]. For the real model: 9 Mamba
    layers, 8 sliding-window + 1 full attention layer (Wqkv), 7 cross-attention layers (Wq only),
    7 GMUs, an MLP in each of the 32 layers, and the tied LM head: 138 launches."""
    kinds = cfg.layer_kinds
    D, F, V, d_inner = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.d_inner
    H, H_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    mamba, gmu, cross = kinds.count("mamba"), kinds.count("gmu"), kinds.count("cross")
    qkv = kinds.count("swa") + kinds.count("full")                       # layers with their own K/V
    products = [("LM head", V, D, pf.GEMV_PLAIN, 1),
                ("mlp fc1 (SwiGLU)", F, D, pf.GEMV_SWIGLU, len(kinds)), ("mlp fc2", D, F, pf.GEMV_RESIDUAL, len(kinds)),
                ("mamba in_proj", 2 * d_inner, D, pf.GEMV_PLAIN, mamba),
                ("mamba x_proj", cfg.mamba_dt_rank + 2 * cfg.mamba_d_state, d_inner, pf.GEMV_PLAIN, mamba),
                ("mamba out_proj", D, d_inner, pf.GEMV_RESIDUAL, mamba),
                ("attn Wqkv", (H + 2 * H_kv) * hd, D, pf.GEMV_PLAIN, qkv), ("attn Wq (cross)", H * hd, D, pf.GEMV_PLAIN, cross),
                ("attn out_proj", D, H * hd, pf.GEMV_RESIDUAL, qkv + cross),
                ("gmu in_proj", d_inner, D, pf.GEMV_GATE, gmu), ("gmu out_proj", D, d_inner, pf.GEMV_RESIDUAL, gmu)]
    return [p for p in products if p[4]]


def weight_bytes(product):
    """Bytes of bf16 weights one launch of this product reads (SwiGLU reads [gate; up])."""
    _, out, inp, mode, _ = product
    return 2 * (2 * out if mode == pf.GEMV_SWIGLU else out) * inp


SHAPES = decode_products(bench.SIZES["real"])


def graph_time(cp, launches, repeats=3):
    """Seconds per launch of the callables, captured once as a CUDA graph, best of `repeats` replays."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        for launch in launches:
            launch()
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        graph.launch(stream)
        end.record(stream)
        end.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, end) / 1e3)
    return best / len(launches)


def sweep(cp, variants, min_bytes=512 << 20, launches=40):
    source = open(pf.KERNELS_CU).read()
    rng = cp.random.default_rng(0)
    results = {}
    for name in variants:
        text, policy = source, VARIANTS[name][1]
        for old, new in VARIANTS[name][0]:
            assert text.count(old) == 1, (name, old)
            text = text.replace(old, new)
        kernel = cp.RawModule(code=text, options=("-std=c++17", "-ftz=true")).get_function("gemv_bf16")
        results[name] = {}
        for label, out, inp, mode, per_step in SHAPES:
            w_rows = 2 * out if mode == pf.GEMV_SWIGLU else out
            nbytes = 2 * w_rows * inp
            copies = max(1, -(-min_bytes // nbytes))
            Ws = [(rng.standard_normal((w_rows, inp), dtype=cp.float32).view(cp.uint32) >> 16).astype(cp.uint16)
                  for _ in range(copies)]
            x = rng.standard_normal((1, inp), dtype=cp.float32)
            aux, y = rng.standard_normal((1, out), dtype=cp.float32), cp.empty((1, out), cp.float32)
            splits = policy(out, inp)
            grid, block = (pf._blocks(out, pf.GEMV_WARPS // splits),), (pf.GEMV_WARPS * 32,)
            args = lambda W: (x, W, aux, aux, y, np.int32(1), np.int32(out), np.int32(inp), np.int32(mode),  # noqa: E731
                              np.int32(0), np.int32(splits))
            calls = [lambda W=Ws[r % copies]: kernel(grid, block, args(W)) for r in range(max(launches, copies))]
            seconds = graph_time(cp, calls)
            results[name][label] = {"us": 1e6 * seconds, "GBps": nbytes / seconds / 1e9, "MB": nbytes / 1e6,
                                    "per_step": per_step, "splits": splits}
            del Ws
        step = sum(r["us"] * r["per_step"] for r in results[name].values())
        results[name]["step_us"] = step
        print(f"{name}: {step / 1e3:.3f} ms of products per decode step; " + ", ".join(
            f"{k} {v['GBps']:.0f}" for k, v in results[name].items() if k != "step_us") + " GB/s", flush=True)
    return results


def torch_reference(cp):
    """torch.nn.functional.linear, bf16 weights and input, batch 1, the same shapes, graph-replayed."""
    try:
        import torch
    except ImportError:
        return None
    out = {}
    for label, o, inp, mode, per_step in SHAPES:
        rows = 2 * o if mode == pf.GEMV_SWIGLU else o
        copies = max(1, -(-(512 << 20) // (2 * rows * inp)))
        Ws = [torch.randn(rows, inp, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, inp, device="cuda", dtype=torch.bfloat16)
        n = max(40, copies)
        torch.nn.functional.linear(x, Ws[0])
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for r in range(n):
                torch.nn.functional.linear(x, Ws[r % copies])
        g.replay()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(3):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            e.synchronize()
            best = min(best, s.elapsed_time(e) / 1e3 / n)
        out[label] = {"us": 1e6 * best, "GBps": 2 * rows * inp / best / 1e9, "per_step": per_step}
        del Ws, g
    out["step_us"] = sum(v["us"] * v["per_step"] for v in out.values())
    print(f"torch bf16 linear: {out['step_us'] / 1e3:.3f} ms per step; " + ", ".join(
        f"{k} {v['GBps']:.0f}" for k, v in out.items() if k != "step_us") + " GB/s", flush=True)
    return out


def empty_launch_us(cp, n=263):
    """A graph of n launches of a kernel that does nothing: the cost of a launch inside a graph."""
    kernel = cp.RawKernel('extern "C" __global__ void nothing(int* p) {}', "nothing")
    p = cp.zeros(1, cp.int32)
    return 1e6 * graph_time(cp, [lambda: kernel((1,), (32,), (p,))] * n)


def step_breakdown(cp, context, read_GBps):
    """The real decode step's GPU time at this context (random real-size weights), captured as a
    graph with every launch, and with only some kept (the GEMVs, everything but them, ...);
    model.step()'s wall time (the graph with its copies in and out, its launch and sync, the logits'
    copy out of the pinned buffer); and the step's roofline at the read bandwidth (bench.roofline_s)."""
    import time

    bench._cupy = cp
    model = bench.random_device_model(bench.SIZES["real"], "bfloat16")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, context)
    _, cache = model.prefill(ids, model.new_cache(context + 64))
    for token in (1, 2, 3):                                               # eager, captured, replayed
        model.step(cache, token)
    walls = []
    for token in range(4, 24):
        t = time.perf_counter()
        model.step(cache, token)
        walls.append(time.perf_counter() - t)
    real = pf._launch
    out = {"context": context, "model_step_ms": 1e3 * float(np.median(walls)),
           "roofline_ms": 1e3 * bench.roofline_s(model, context, 1e9 * read_GBps)}
    for label, keep in (("all", lambda n: True), ("gemv only", lambda n: n.startswith("gemv")),
                        ("all but gemv", lambda n: not n.startswith("gemv")),
                        ("attention only", lambda n: n.startswith("attention")),
                        ("mamba scan only", lambda n: n == "scan_step")):   # (the conv and the LayerNorms run in GEMVs)
        pf._launch = lambda twin, grid, block, args: real(twin, grid, block, args) if keep(twin.__name__) else None
        try:
            out[f"graph_ms ({label})"] = 1e3 * graph_time(cp, [lambda: pf.cuda_step_layers(model, cache, cache.cuda)])
        finally:
            pf._launch = real
    print(f"decode step at {context}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items() if k != "context"), flush=True)
    del model, cache
    cp.get_default_memory_pool().free_all_blocks()
    return out


def gemv_chain(cp, read_GBps, repeats=5):
    """Every product of a real decode step (SHAPES: 138 launches), each with its own random bf16
    weights so every read comes from HBM, launched back to back by phi4flash.cuda_gemv (so with
    programmatic dependent launch unless PHI4FLASH_PDL=0) and captured as one graph: the products'
    time per step against their floor (weight bytes over the read bandwidth), and what each launch
    boundary costs beyond the floor. Run once per setting, each in its own process (notes/gpu_check.sh)."""
    rng = cp.random.default_rng(1)
    launches, nbytes = [], 0
    for label, out, inp, mode, per_step in SHAPES:
        rows = 2 * out if mode == pf.GEMV_SWIGLU else out
        x, y = rng.standard_normal((1, inp), dtype=cp.float32), cp.zeros((1, out), cp.float32)
        for _ in range(per_step):
            W = (rng.standard_normal((rows, inp), dtype=cp.float32).view(cp.uint32) >> 16).astype(cp.uint16)
            launches.append(lambda x=x, W=W, y=y, mode=mode, out=out: pf.cuda_gemv(x, W, y, mode, out_features=out))
            nbytes += W.nbytes
    step = graph_time(cp, launches, repeats) * len(launches)             # seconds per replay of the chain
    floor = nbytes / (1e9 * read_GBps)
    pdl = pf._pdl_driver() is not None
    out = {"launches": len(launches), "weights_GB": nbytes / 1e9, "pdl": pdl,
           "prefetch": os.environ.get("PHI4FLASH_PDL_PREFETCH", "1") != "0",
           "step_ms": 1e3 * step, "floor_ms": 1e3 * floor, "x_floor": step / floor,
           "per_boundary_us": 1e6 * (step - floor) / len(launches)}
    print(f"the GEMV chain ({len(launches)} launches, {nbytes / 1e9:.2f} GB, PDL {'on' if pdl else 'off'}, "
          f"prefetch {'on' if out['prefetch'] else 'off'}): {out['step_ms']:.3f} ms per step, floor "
          f"{out['floor_ms']:.3f} ms ({out['x_floor']:.3f}x), {out['per_boundary_us']:.2f} us per boundary", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--contexts", default="2048,32768", help="decode-step breakdowns at these contexts ('' for none)")
    ap.add_argument("--chain", action="store_true",
                    help="only: the decode step's 138 products as one graph of distinct weights (gemv_chain)")
    args = ap.parse_args(argv)
    try:
        cp = pf.require_cupy()
    except pf.Phi4FlashError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = bench.device_bandwidths(cp)                                # the roofline's read bandwidth, and the copy's
    if args.chain:
        results["chain"] = gemv_chain(cp, results["read_GBps"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 0
    results["empty_launch_in_graph_us"] = empty_launch_us(cp)
    floor = sum(weight_bytes(p) * p[4] for p in SHAPES) / (1e9 * results["read_GBps"])
    results["products_floor_ms"] = 1e3 * floor
    print(f"read {results['read_GBps']:.0f} GB/s (the roofline's denominator), copy {results['copy_GBps']:.0f} GB/s; "
          f"the products' floor {1e3 * floor:.3f} ms per step; an empty launch in a graph "
          f"{results['empty_launch_in_graph_us']:.2f} us", flush=True)
    results["steps"] = [step_breakdown(cp, int(c), results["read_GBps"]) for c in args.contexts.split(",") if c]
    results["variants"] = sweep(cp, args.variants.split(","))
    results["torch"] = torch_reference(cp)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
