"""What int8 weights and the bf16 K/V cache change in the logits, measured (notes/11-quantization.md).

    python notes/quant_error.py --json notes/results/quant-error.json

Two questions, on two models with random weights: the bundled tiny fixture (its three reference
prompts and a synthetic one) and the 169M configuration of notes/bench.py (a synthetic prompt).

* Exactness of the implementation: the int8 model against an fp32 computation over its dequantised
  weights q · s, the bf16-K/V model against an fp32 cache holding the same rounded K/V. Both must
  agree to fp32 rounding (tests/test_cpu_int8.py asserts 1e-5 relative).
* Error of the formats themselves, against the exact path (the checkpoint's bf16 weights widened to
  fp32, fp32 K/V): relative RMSE of the logits of a full forward over the prompt, how often the
  argmax agrees over its positions, and for how many tokens greedy decoding agrees.

Random weights exaggerate the error: their logits are nearly flat (many near-ties for the argmax),
and nothing in them is structured the way trained weights are. Only the real checkpoint can say what
a user will see (tests/test_real_checkpoint.py measures it there).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "notes")]
import convert  # noqa: E402
import phi4flash as pf  # noqa: E402
from bench import SIZES, write_random_model  # noqa: E402

TINY = os.path.join(ROOT, "tests", "fixtures", "tiny-phi4flash")
GREEDY = 64


def rel_rmse(a, b):
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2) / np.mean(np.asarray(b, np.float64) ** 2)))


def max_relative(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def greedy(model, ids, n=GREEDY):
    return list(model.generate(ids, n, temperature=0.0, stop_ids=()))


def agreement(a, b):
    """How many leading tokens two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def dequantized(model):
    """The model with each Int8Weight replaced by its fp32 matrix q · s."""
    fp32 = lambda a: pf.dequantize_int8(a.q, a.scales) if isinstance(a, pf.Int8Weight) else a  # noqa: E731
    layers = [{part: {k: fp32(a) for k, a in group.items()} for part, group in layer.items()} for layer in model.layers]
    return dataclasses.replace(model, embed_tokens=fp32(model.embed_tokens), layers=layers)


@dataclasses.dataclass
class RoundedKV:
    """While in use, a float32 cache stores its K/V rounded to bf16 values (kept as fp32 numbers):
    the fp32 computation the bf16 cache must equal."""

    def __enter__(self):
        self.stored = pf.kv_stored
        pf.kv_stored = lambda kv, k, v: ((pf.bf16_to_f32(pf.f32_to_bf16(k)), pf.bf16_to_f32(pf.f32_to_bf16(v)))
                                         if kv.k.dtype == np.float32 else self.stored(kv, k, v))

    def __exit__(self, *exc):
        pf.kv_stored = self.stored


def measure(exact, option, prompts):
    """{prompt: the format's error} for `option` against `exact`."""
    out = {}
    for name, ids in prompts.items():
        a, b = option.forward(ids), exact.forward(ids)
        ga, gb = greedy(option, ids), greedy(exact, ids)
        out[name] = {"tokens": len(ids), "relative_rmse": rel_rmse(a, b),
                     "argmax_agree": int(np.sum(np.argmax(a, 1) == np.argmax(b, 1))), "positions": len(ids),
                     "greedy_agree": agreement(ga, gb), "greedy_steps": GREEDY}
    return out


def exactness(model_int8, model_kv16, exact_f32kv, prompts):
    """Max relative difference of the logits (forward, and 20 teacher-forced cached steps) from the fp32
    computation over the same numbers."""
    out = {}
    fp32 = dequantized(model_int8)
    for name, ids in prompts.items():
        tokens = greedy(fp32, ids, 20)
        row = {"int8_forward": max_relative(model_int8.forward(ids), fp32.forward(ids)),
               "int8_decode": max_relative(teacher_forced(model_int8, ids, tokens), teacher_forced(fp32, ids, tokens))}
        with RoundedKV():
            tokens = greedy(exact_f32kv, ids, 20)
            row["kv16_forward"] = max_relative(model_kv16.forward(ids), exact_f32kv.forward(ids))
            row["kv16_decode"] = max_relative(teacher_forced(model_kv16, ids, tokens),
                                              teacher_forced(exact_f32kv, ids, tokens))
        out[name] = row
    return out


def teacher_forced(model, ids, tokens):
    logits, cache = model.prefill(ids)
    rows = [logits]
    for t in tokens[:-1]:
        rows.append(model.step(cache, t))
    return np.array(rows)


def run(folder_for, prompts):
    exact = pf.load(folder_for("bfloat16"))
    int8 = pf.load(folder_for("int8"))
    kv16 = pf.load(folder_for("bfloat16"), kv_dtype="bfloat16")
    both = pf.load(folder_for("int8"), kv_dtype="bfloat16")
    return {"error": {"int8": measure(exact, int8, prompts), "kv16": measure(exact, kv16, prompts),
                      "int8+kv16": measure(exact, both, prompts)},
            "exactness": exactness(int8, kv16, exact, prompts)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--skip-169m", action="store_true", help="only the tiny fixture")
    args = ap.parse_args(argv)
    results = {"command": "python notes/quant_error.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="phi4flash-quant-") as tmp:
        ref = np.load(os.path.join(TINY, "reference.npz"))
        prompts = {p: [int(t) for t in ref[f"{p}_input_ids"]] for p in ("p0", "p1", "p2")}
        prompts["synthetic (64 random ids)"] = [int(t) for t in rng.integers(0, 512, 64)]
        for d in ("bfloat16", "int8"):
            convert.convert(TINY, os.path.join(tmp, f"tiny-{d}"), dtype=d)
        results["tiny"] = run(lambda d: os.path.join(tmp, f"tiny-{d}"), prompts)
        if not args.skip_169m:
            cfg = SIZES["169m"]
            for d in ("bfloat16", "int8"):  # the same random fp32 weights (seed 0), stored both ways
                write_random_model(os.path.join(tmp, f"169m-{d}"), cfg, d)
            ids = [int(t) for t in rng.integers(0, cfg.vocab_size, 64)]
            results["169m"] = run(lambda d: os.path.join(tmp, f"169m-{d}"), {"synthetic (64 random ids)": ids})
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def report(r):
    print(f"command: {r['command']}")
    for model in ("tiny", "169m"):
        if model not in r:
            continue
        print(f"\n{model}: error of each format against the exact path (bf16 weights widened, fp32 K/V)\n"
              "| option | prompt | relative RMSE of the logits | argmax agrees | greedy agrees for |\n|---|---|---|---|---|")
        for option, rows in r[model]["error"].items():
            for prompt, e in rows.items():
                print(f"| {option} | {prompt} | {e['relative_rmse']:.2e} | {e['argmax_agree']}/{e['positions']} | "
                      f"{e['greedy_agree']} of {e['greedy_steps']} tokens |")
        print(f"\n{model}: exactness, max |difference| / max |logit| against fp32 over the same numbers\n"
              "| prompt | int8 forward | int8 20 steps | bf16 K/V forward | bf16 K/V 20 steps |\n|---|---|---|---|---|")
        for prompt, e in r[model]["exactness"].items():
            print(f"| {prompt} | {e['int8_forward']:.1e} | {e['int8_decode']:.1e} | {e['kv16_forward']:.1e} | "
                  f"{e['kv16_decode']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
