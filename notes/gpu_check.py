"""The GPU path against the fp32 CPU path, as issue 12's GPU check asks: relative RMSE of the logits
(<= 1e-2) on the bundled fixture and on a random model with the real 3.85B shapes. Run by
notes/gpu_check.sh on a machine with CuPy and a CUDA device; it exits 2 with one line without them.

    python notes/gpu_check.py --json notes/results/gpu-parity.json [--tokens 16] [--skip-real]

The fixture: the converted tiny model, bf16 weights on the GPU (kernels.cu) vs fp32 weights on the
CPU (the widening is exact, so only the summation order differs), all positions of each prompt,
then 24 greedy decode steps (CUDA graph) vs the CPU's. The real size: random bf16 weights made on
the GPU (notes/bench.py), copied to the host as the same bits, one forward of --tokens tokens on
each side, then the last logits of a --prompt-token prefill. Products of >= 2^30 multiply-adds take
TF32 on the GPU (phi4flash.matmul_t): in the forward only the LM head's, in the prefill all of them.
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


def greedy(model, ids, steps):
    logits, cache = model.prefill(ids)
    out = [logits]
    for _ in range(steps):
        out.append(model.step(cache, int(np.argmax(np.where(model.token_mask, out[-1], -np.inf)))))
    return np.array(out)


def fixture_parity():
    ref = np.load(os.path.join(TINY, "reference.npz"))
    gpu = phi4flash.load(convert.resolve_model(TINY), device="cuda")
    cpu = phi4flash.load(convert.resolve_model(TINY, dtype="float32"))
    out = {}
    for p in ("p0", "p1", "p2"):
        ids = ref[f"{p}_input_ids"]
        out[p] = {"forward_rel_rmse": relative_rmse(gpu.forward(ids), cpu.forward(ids)),
                  "decode_rel_rmse": relative_rmse(greedy(gpu, ids, 24), greedy(cpu, ids, 24)),
                  "forward_max_abs_vs_reference": float(np.abs(gpu.forward(ids) - ref[f"{p}_logits"]).max())}
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tokens", type=int, default=16, help="tokens of the real-size forward")
    ap.add_argument("--prompt", type=int, default=1024, help="tokens of the real-size prefill (TF32 products)")
    ap.add_argument("--skip-real", action="store_true", help="only the fixture")
    args = ap.parse_args(argv)
    try:
        phi4flash.require_cupy()
    except phi4flash.Phi4FlashError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = {"fixture": fixture_parity()}
    if not args.skip_real:
        results["real_size"] = real_size_parity(args.tokens, args.prompt)
    worst = max([v for p in results["fixture"].values() for k, v in p.items() if k.endswith("rel_rmse")]
                + ([results["real_size"][k] for k in ("forward_rel_rmse", "prefill_rel_rmse")] if "real_size" in results else []))
    results["worst_rel_rmse"], results["passed"] = worst, worst <= 1e-2
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
