"""The GPU path against the CPU path: relative RMSE of the logits (<= 1e-2) on the bundled fixture
for each weights / K/V option and on a random model with the real 3.85B shapes; and programmatic
dependent launch, which must change when kernels start and never what they compute. Run by
notes/gpu_check.sh on a machine with CuPy and a CUDA device; it exits 2 with one line without them.

    python notes/gpu_check.py --json out.json [--parts fixture,real,pdl] [--options int8/bfloat16] [--tokens 16]

fixture: the converted tiny model in each option (bf16 or int8 weights, fp32 or bf16 K/V) on the
GPU (kernels.cu) vs the same file on the CPU, so only the order of the sums differs: all positions
of each prompt, then 24 decode steps (CUDA graph) of the CPU's greedy tokens on both sides; bf16
weights with fp32 K/V also against the reference's fp32 logits.
real: random bf16 weights made on the GPU (notes/bench.py), copied to the host as the same bits, one
forward of --tokens tokens on each side, then the last logits of a --prompt-token prefill. Products
of >= 2^30 multiply-adds take TF32 on the GPU (phi4flash.matmul_t): in the forward only the LM
head's, in the prefill all of them.
pdl: 32 greedy steps at the real shapes with PDL, again with PDL, and with it off: bitwise equal
logits; and a two-kernel probe showing that a PDL launch begins before its predecessor ends and
that its griddepcontrol.wait returns only after (pdl_parity, overlap_probe).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "notes")]
import bench  # noqa: E402
import convert  # noqa: E402
import phi4flash  # noqa: E402

TINY = os.path.join(ROOT, "tests", "fixtures", "tiny-phi4flash")
FUSED = {"mamba": ("in_proj", "x_proj"), "attn": ("Wqkv", "bqkv"), "mlp": ("fc1",)}  # fuse_for_decode's, GPU only


def relative_rmse(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want ** 2)))


def host_copy(gpu):
    """The GPU model's weights as a CPU model: the same values, the split names only."""
    to_host = phi4flash.to_numpy
    layers = [{group: {k: to_host(a) for k, a in p.items() if k not in FUSED.get(group, ())} for group, p in layer.items()}
              for layer in gpu.layers]
    return dataclasses.replace(gpu, embed_tokens=to_host(gpu.embed_tokens), layers=layers, device="cpu",
                               final_layernorm={k: to_host(a) for k, a in gpu.final_layernorm.items()})


def greedy(model, ids, steps, tokens=None):
    """Logits (1 + steps, V) of a prefill of ids and `steps` decode steps: of the greedy tokens, or of
    `tokens` when given (teacher forcing: both sides see the same tokens, so one near-tie that goes
    the other way does not turn the rest of the comparison into two different texts)."""
    logits, cache = model.prefill(ids)
    out, fed = [logits], []
    for i in range(steps):
        fed.append(int(np.argmax(np.where(model.token_mask, out[-1], -np.inf))) if tokens is None else tokens[i])
        out.append(model.step(cache, fed[-1]))
    return np.array(out), fed


OPTIONS = [("bfloat16", "float32"), ("bfloat16", "bfloat16"), ("int8", "float32"), ("int8", "bfloat16")]


def fixture_parity(options=OPTIONS):
    """Each (weights, K/V) option on the GPU against the same option on the CPU (the same converted
    file, so only the order of the sums differs, and with bf16 K/V a value that lands on the other
    side of a rounding boundary); bf16 / fp32 also against the reference's fp32 logits."""
    ref = np.load(os.path.join(TINY, "reference.npz"))
    out = {}
    for weights, kv in options:
        folder = convert.resolve_model(TINY, dtype=weights)
        gpu = phi4flash.load(folder, device="cuda", kv_dtype=kv)
        cpu = phi4flash.load(folder, kv_dtype=kv)
        rows = {}
        for p in ("p0", "p1", "p2"):
            ids = ref[f"{p}_input_ids"]
            want, tokens = greedy(cpu, ids, 24)
            got, _ = greedy(gpu, ids, 24, tokens)
            forward = gpu.forward(ids)
            rows[p] = {"forward_rel_rmse": relative_rmse(forward, cpu.forward(ids)),
                       "decode_rel_rmse": relative_rmse(got, want),
                       "decode_argmax_agree": float(np.mean(got.argmax(-1) == want.argmax(-1)))}
            if (weights, kv) == ("bfloat16", "float32"):
                rows[p]["forward_max_abs_vs_reference"] = float(np.abs(forward - ref[f"{p}_logits"]).max())
        out[f"{weights} weights, {kv} K/V"] = rows
        print(f"fixture, {weights} weights, {kv} K/V: worst rel RMSE "
              f"{max(v for r in rows.values() for k, v in r.items() if k.endswith('rel_rmse')):.2e}", flush=True)
    return out


def real_size_parity(tokens, prompt):
    """A forward of `tokens` tokens, then the last logits of a `prompt`-token prefill, GPU vs CPU."""
    cfg = bench.SIZES["real"]
    bench._cupy = phi4flash.require_cupy()
    t = time.perf_counter()
    gpu = bench.random_device_model(cfg, "bfloat16")
    cpu = host_copy(gpu)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200000, tokens)
    gpu_logits, cpu_logits = gpu.forward(ids), cpu.forward(ids)
    long_ids = rng.integers(0, 200000, prompt)
    gpu_last, cpu_last = gpu.prefill(long_ids)[0], cpu.prefill(long_ids)[0]
    return {"tokens": tokens, "forward_rel_rmse": relative_rmse(gpu_logits, cpu_logits),
            "argmax_agree": float(np.mean(gpu_logits.argmax(-1) == cpu_logits.argmax(-1))),
            "prefill_tokens": prompt, "prefill_tf32": phi4flash.CUDA_TF32,
            "prefill_rel_rmse": relative_rmse(gpu_last, cpu_last),
            "prefill_argmax_agree": bool(gpu_last.argmax() == cpu_last.argmax()),
            "seconds": time.perf_counter() - t}


SPIN_PROBE = r"""
__device__ unsigned long long now_ns() { unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
extern "C" __global__ void spin(unsigned long long* t, long long ns) {     // lets its dependent start, then runs ns
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    unsigned long long t0 = now_ns(), t1;
    do { t1 = now_ns(); } while (t1 - t0 < (unsigned long long)ns);
    if (threadIdx.x == 0) t[0] = t1;                                       // when it ended
}
extern "C" __global__ void probe(unsigned long long* t) {                  // when it began, when its wait returned
    unsigned long long begun = now_ns();
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (threadIdx.x == 0) { t[1] = begun; t[2] = now_ns(); }
}
"""


def overlap_probe(spin_us=20, repeats=5):
    """Does a PDL launch begin before its predecessor ends? A kernel that triggers its dependents
    first and then spins spin_us, followed by a probe launched as phi4flash launches its PDL kernels
    (phi4flash._launch_pdl): the probe's start before the spinner's end is the overlap PDL buys; its
    wait must return only after the spinner ended (and with it, its memory). Eagerly and in a graph."""
    cp = phi4flash.require_cupy()
    driver = phi4flash._pdl_driver()
    if driver is None:
        return {"pdl": False}
    module = cp.RawModule(code=SPIN_PROBE, options=("-std=c++17",))
    spin, probe = module.get_function("spin"), module.get_function("probe")
    t = cp.zeros(3, cp.uint64)
    stream = cp.cuda.Stream(non_blocking=True)

    def pair():
        spin((1,), (32,), (t, np.int64(1000 * spin_us)))
        phi4flash._launch_pdl(driver, probe, (1,), (32,), (t,))

    def measure(run):
        rows = []
        for _ in range(repeats):
            t.fill(0)
            run()
            stream.synchronize()
            end, begun, released = (int(v) for v in t.get())
            rows.append(((end - begun) / 1e3, (released - end) / 1e3))
        overlap, release = np.median(rows, axis=0)
        return {"probe_began_before_spinner_ended_us": float(overlap), "wait_returned_after_spinner_ended_us": float(release)}

    with stream:
        eager = measure(pair)
        stream.begin_capture()
        pair()
        graph = stream.end_capture()
        in_graph = measure(lambda: graph.launch(stream))
    return {"pdl": True, "spin_us": spin_us, "eager": eager, "graph": in_graph,
            "overlaps": min(eager["probe_began_before_spinner_ended_us"], in_graph["probe_began_before_spinner_ended_us"]) > 0,
            "waits": min(eager["wait_returned_after_spinner_ended_us"], in_graph["wait_returned_after_spinner_ended_us"]) >= 0}


def pdl_parity(steps=32, prompt=64):
    """Programmatic dependent launch must change when kernels start, never what they compute: on a
    random model with the real shapes, `steps` greedy decode steps (CUDA graphs) with PDL, the same
    tokens again with PDL (the run-to-run baseline), then with PDL off (phi4flash.PDL = False): the
    logits bitwise equal. And the overlap probe, to show the launches do overlap."""
    bench._cupy = phi4flash.require_cupy()
    gpu = bench.random_device_model(bench.SIZES["real"], "bfloat16")
    ids = np.random.default_rng(1).integers(0, gpu.config.vocab_size, prompt)
    with_pdl, tokens = greedy(gpu, ids, steps)
    used = phi4flash._pdl_driver() is not None                          # a refused capture turns it off
    again, _ = greedy(gpu, ids, steps, tokens)
    saved = phi4flash.PDL, phi4flash._pdl
    phi4flash.PDL, phi4flash._pdl = False, None
    try:
        without, _ = greedy(gpu, ids, steps, tokens)
    finally:
        phi4flash.PDL, phi4flash._pdl = saved
    out = {"steps": steps, "prompt": prompt, "pdl_used": used,
           "repeat_max_abs": float(np.abs(again - with_pdl).max()),
           "on_vs_off_max_abs": float(np.abs(without - with_pdl).max()),
           "on_vs_off_bitwise": bool(np.array_equal(without, with_pdl)),
           "probe": overlap_probe()}
    print(f"PDL: used {used}, on vs off bitwise {out['on_vs_off_bitwise']} (max abs {out['on_vs_off_max_abs']:.3g}; "
          f"PDL run to run {out['repeat_max_abs']:.3g}); probe {out['probe']}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--parts", default="fixture,real", help="comma-separated, from: fixture, real, pdl")
    ap.add_argument("--options", default=",".join(f"{w}/{kv}" for w, kv in OPTIONS),
                    help="the fixture's WEIGHTS/KV options (weights bfloat16 or int8, K/V float32 or bfloat16)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens of the real-size forward")
    ap.add_argument("--prompt", type=int, default=1024, help="tokens of the real-size prefill (TF32 products)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    options = [tuple(o.split("/")) for o in args.options.split(",") if o]
    bad = (parts - {"fixture", "real", "pdl"}) or [o for o in options if o[0] not in ("bfloat16", "int8")
                                                   or len(o) != 2 or o[1] not in phi4flash.KV_DTYPES]
    if bad:
        print(f"error: --parts/--options: cannot use {sorted(bad)}", file=sys.stderr)
        return 2
    try:
        phi4flash.require_cupy()
    except phi4flash.Phi4FlashError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, worst = {}, []
    if "fixture" in parts:
        results["fixture"] = fixture_parity(options)
        worst += [v for rows in results["fixture"].values() for r in rows.values() for k, v in r.items() if k.endswith("rel_rmse")]
    if "real" in parts:
        results["real_size"] = real_size_parity(args.tokens, args.prompt)
        worst += [results["real_size"][k] for k in ("forward_rel_rmse", "prefill_rel_rmse")]
    passed = True
    if worst:
        results["worst_rel_rmse"] = max(worst)
        passed = max(worst) <= 1e-2
    if "pdl" in parts:
        results["pdl"] = pdl_parity()
        probe = results["pdl"]["probe"]
        passed = passed and results["pdl"]["on_vs_off_bitwise"] and (not probe["pdl"] or probe["waits"])
    results["passed"] = passed
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
