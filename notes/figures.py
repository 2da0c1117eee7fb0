"""The notes' figures, drawn from the measured results in notes/results/ and from phi4flash's own
functions. Nothing measured is typed in here: every plotted number is read from a result file or
computed by the code the notes teach.

    python notes/figures.py --out notes/figures               # every figure (what the notes embed)
    python notes/figures.py --out /tmp/figs --only masks      # one of them

Each figure is a data function, which returns plain lists and dicts (what is plotted, with the files
it came from), and a plot function that draws only that data. tests/test_figures.py checks the data
against the JSON files and the code, and that every figure is written. Only the plot functions need
matplotlib (pip install -e ".[notes]"). A result file that is missing leaves its figure out, with one
line naming the command that makes it.

The figures are SVG with their text kept as text, the backend, sizes and ids fixed, and no date, so
drawing them again with the same matplotlib writes the same bytes.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import statistics
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
import bench  # noqa: E402  (SIZES: the configurations the benchmarks ran)
import convert  # noqa: E402
import phi4flash  # noqa: E402

RESULTS = os.path.join(HERE, "results")
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny-phi4flash")
GB = 1e9

# The plain transformer that SambaY is set against: Phi-4-mini-reasoning, from the values of its
# config.json (model_type phi3, Phi3ForCausalLM) that its weights and K/V follow from. Every one of its
# 32 layers keeps and reads its own K/V; no biases; the embedding is tied to the LM head.
PHI4_MINI_REASONING = {"vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192,
                       "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8,
                       "tie_word_embeddings": True}
PLAIN_KV_BYTES = 2  # its cache in bf16, as its reference code keeps it

OPTIONS = {  # (weights, K/V) -> legend label and colour, the same in every figure
    ("bfloat16", "float32"): ("bf16 weights, fp32 K/V (default)", "tab:blue"),
    ("bfloat16", "bfloat16"): ("bf16 weights, bf16 K/V", "tab:purple"),
    ("int8", "float32"): ("int8 weights, fp32 K/V", "tab:green"),
    ("int8", "bfloat16"): ("int8 weights, bf16 K/V", "tab:olive"),
    ("float32", "float32"): ("fp32 weights, fp32 K/V", "tab:orange"),
}
PLAIN_COLOUR = "black"


class MissingResults(Exception):
    """A figure's result files are not there; the message names the command that makes them."""


# ----------------------------------------------------------------------------------------------
# Bytes: what a decode step reads, what the cache holds (the counts of bench.step_bytes and note 6)

def weight_bytes(cfg, weights_dtype):
    """Bytes of every stored tensor of a converted file (the table convert.py writes)."""
    stored = phi4flash.stored_tensors(cfg, weights_dtype).values()
    return sum(math.prod(shape) * convert.BYTES[d] for shape, d in stored)


def kv_row(cfg, kv_dtype):
    """Bytes of K and V of one position in one layer."""
    return 2 * cfg.num_key_value_heads * cfg.head_dim * np.dtype(phi4flash.KV_DTYPES[kv_dtype]).itemsize


def state_bytes(cfg):
    """The Mamba layers' conv and scan states, always fp32."""
    return cfg.layer_kinds.count("mamba") * (cfg.mamba_d_conv - 1 + cfg.mamba_d_state) * cfg.d_inner * 4


def step_parts(cfg, kv_dtype, context):
    """What a decode step at this context reads besides the weights, as bench.step_bytes counts it:
    the Mamba states (read and written), the rings (up to W positions each), the shared K/V once per
    layer that reads it (layer L/2+1 and the cross-attention layers)."""
    rings = sum(min(context, cfg.sliding_window[i]) for i, k in enumerate(cfg.layer_kinds) if k == "swa")
    return {"Mamba states": 2 * state_bytes(cfg),
            "sliding rings": rings * kv_row(cfg, kv_dtype),
            "shared K/V": bench.shared_kv_readers(cfg) * context * kv_row(cfg, kv_dtype)}


def cache_parts(cfg, kv_dtype, tokens):
    """What the cache holds after `tokens` tokens, as empty_cache allocates it (note 6; the int64
    positions, 0.5 MiB at 64K, left out): the states, the rings of W slots, the shared K/V."""
    rings = sum(w for i, w in enumerate(cfg.sliding_window) if cfg.layer_kinds[i] == "swa")
    return {"Mamba states": state_bytes(cfg), "sliding rings": rings * kv_row(cfg, kv_dtype),
            "shared K/V": tokens * kv_row(cfg, kv_dtype)}


def plain_transformer(c=PHI4_MINI_REASONING, kv_bytes=PLAIN_KV_BYTES):
    """A plain transformer's parameters, bf16 weight bytes and K/V bytes per token (every layer's)."""
    D, F, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    H, H_kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = D // H
    layer = D * (H + 2 * H_kv) * hd + H * hd * D + D * 2 * F + F * D + 2 * D  # qkv, o, gate_up, down, 2 norms
    params = V * D * (1 if c["tie_word_embeddings"] else 2) + L * layer + D
    return {"parameters": params, "weights": 2 * params, "kv_per_token": L * 2 * H_kv * hd * kv_bytes}


def contexts(cfg, points=64):
    """0 .. the model's context, evenly, the window included (where the rings stop growing)."""
    grid = np.linspace(0, cfg.context_length, points + 1).round().astype(int)
    return sorted(set(grid.tolist()) | {w for w in cfg.sliding_window if w})


def decode_bytes_data():
    """Figure 1a: bytes one decode step reads against context, SambaY by part and with each option,
    beside Phi-4-mini-reasoning (a plain transformer of about the same size)."""
    cfg = bench.SIZES["real"]
    xs = contexts(cfg)
    plain = plain_transformer()
    weights = {w: weight_bytes(cfg, w) for w in ("bfloat16", "int8")}
    parts = [step_parts(cfg, "float32", x) for x in xs]
    stack = [{"label": "weights (bf16)", "y": [weights["bfloat16"] / GB] * len(xs)}]
    stack += [{"label": name + (", read and written" if name == "Mamba states" else ""),
               "y": [p[name] / GB for p in parts]} for name in parts[0]]
    totals = [{"label": OPTIONS[w, kv][0], "colour": OPTIONS[w, kv][1], "weights": w, "kv_dtype": kv,
               "y": [(weights[w] + sum(step_parts(cfg, kv, x).values())) / GB for x in xs]}
              for w, kv in OPTIONS if w in weights]
    plain_series = {"label": f"Phi-4-mini-reasoning ({plain['parameters'] / 1e9:.2f}B): "
                             f"{PHI4_MINI_REASONING['num_hidden_layers']} layers, each its own K/V (bf16)",
                    "y": [(plain["weights"] + x * plain["kv_per_token"]) / GB for x in xs]}
    floors = [{"label": "SambaY, bf16 weights only", "y": weights["bfloat16"] / GB},
              {"label": "SambaY, int8 weights only", "y": weights["int8"] / GB},
              {"label": "Phi-4-mini-reasoning, weights only", "y": plain["weights"] / GB}]
    return {"x": xs, "stack": stack, "totals": totals, "plain": plain_series, "floors": floors,
            "readers": bench.shared_kv_readers(cfg), "sambay": params_text(cfg)}


def cache_memory_data():
    """Figure 1b: what the cache holds against context: SambaY by part (fp32 K/V), with the bf16 K/V,
    and Phi-4-mini-reasoning's cache."""
    cfg = bench.SIZES["real"]
    xs = contexts(cfg)
    plain = plain_transformer()
    parts = [cache_parts(cfg, "float32", x) for x in xs]
    return {"x": xs,
            "stack": [{"label": name, "y": [p[name] / GB for p in parts]} for name in parts[0]],
            "bf16_kv": {"label": "SambaY, bf16 K/V", "colour": OPTIONS["bfloat16", "bfloat16"][1],
                        "y": [sum(cache_parts(cfg, "bfloat16", x).values()) / GB for x in xs]},
            "plain": {"label": f"Phi-4-mini-reasoning (bf16 K/V, {PHI4_MINI_REASONING['num_hidden_layers']} layers)",
                      "y": [x * plain["kv_per_token"] / GB for x in xs]}}


# ----------------------------------------------------------------------------------------------
# Measured decode and prefill, from notes/results/

def _json(path):
    with open(path) as f:
        return json.load(f)


def _rel(path):
    """A path as the notes write it: from the repository root when inside it."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def bench_runs(results=RESULTS, device="cpu"):
    """notes/bench.py's result files on this device (the current code's: not *-before.json):
    [(path, result)], in file-name order."""
    pattern = "cpu-*.json" if device == "cpu" else "gpu-*-bench.json"
    runs = []
    for path in sorted(glob.glob(os.path.join(results, pattern))):
        r = _json(path)
        if "decode" in r and r.get("size") in bench.SIZES and not path.endswith("-before.json"):
            runs.append((path, r))
    return runs


def real_size_runs(results=RESULTS):
    """notes/bench_real_size.py's result files with a run per weight dtype (a "dtypes" section)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results, "cpu-real-size-*.json"))):
        r = _json(path)
        if "dtypes" in r:
            runs.append((path, r))
    return runs


def real_size_config(r):
    """The configuration a bench_real_size.py run used (the real one unless reduced)."""
    import bench_real_size
    return convert.config_from_hf(bench_real_size.hf_config(argparse.Namespace(**r["config"])))


def roofline_line(cfg, weights, kv_dtype, bandwidth, xmax):
    """A run's roofline against context, in ms: its weight bytes (as the run counted them) plus what
    else a step reads (step_parts), over the bandwidth the run measured (bytes/s)."""
    xs = [x for x in contexts(cfg) if x < xmax] + [xmax]
    return {"x": xs, "y": [1e3 * (weights + sum(step_parts(cfg, kv_dtype, x).values())) / bandwidth for x in xs]}


def params_text(cfg):
    n = sum(math.prod(s) for s in phi4flash.tensor_shapes(cfg).values())
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


BENCH_COMMAND = ("python notes/bench.py --size 169m --dtype bfloat16 --contexts 512,2048,8192 --prefill 512,2048 "
                 "--steps 32 --json notes/results/cpu-169m-bfloat16.json")
DECODE_COMMANDS = {"cpu": BENCH_COMMAND + " (note 10)", "gpu": "bash notes/gpu_check.sh on a machine with a CUDA GPU "
                   "(notes/gpu.md)"}


def decode_roofline_data(device="cpu", results=RESULTS):
    """Figure 2: measured seconds per token against context, one series per run and option, each with
    its own roofline (the step's bytes over the bandwidth the run measured). One panel per model size."""
    panels = {}
    for path, r in bench_runs(results, device):
        cfg = bench.SIZES[r["size"]]
        kv = r.get("kv_dtype", "float32")
        denominator = r.get("roofline_bandwidth", "copy")   # bench.py before issue 19 divided by the copy
        bandwidth = r[f"{denominator}_GBps"] * GB
        panel = panels.setdefault(r["size"], {
            "title": f"{r['size']}: {params_text(cfg)} parameters, "
                     + (f"CPU, {r['cpus']} cores" if device == "cpu" else r["device"].replace("cuda: ", "")),
            "series": []})
        panel["series"].append({
            "source": _rel(path), "weights": r["dtype"], "kv_dtype": kv, "label": OPTIONS[r["dtype"], kv][0],
            "colour": OPTIONS[r["dtype"], kv][1], "denominator": denominator, "bandwidth_GBps": bandwidth / GB,
            "x": [d["context"] for d in r["decode"]], "y": [1e3 * d["s_per_token"] for d in r["decode"]],
            "share": [d["roofline_s"] / d["s_per_token"] for d in r["decode"]],
            "roofline": roofline_line(cfg, r["weights_GB"] * GB, kv, bandwidth,
                                      max(d["context"] for d in r["decode"]))})
    for path, r in (real_size_runs(results) if device == "cpu" else []):
        cfg = real_size_config(r)
        size = "real" if cfg == bench.SIZES["real"] else f"reduced {params_text(cfg)}"   # --layers, --hidden
        panel = panels.setdefault(size, {"title": f"{size} size: {params_text(cfg)} parameters, CPU, "
                                                  f"{r['machine']['cpus']} cores", "series": []})
        for w, entry in r["dtypes"].items():
            run = entry["run"]
            found = {"float32": ([run["prefill_tokens"]], [1e3 * statistics.median(run["decode_s"])])}
            for long in run.get("long", []):
                xs, ys = found.setdefault(long["kv_dtype"], ([], []))
                xs.append(long["context"])
                ys.append(1e3 * statistics.median(long["decode_s"]))
            for kv, (xs, ys) in found.items():
                panel["series"].append({
                    "source": _rel(path), "weights": w, "kv_dtype": kv, "label": OPTIONS[w, kv][0],
                    "colour": OPTIONS[w, kv][1], "denominator": "copy", "bandwidth_GBps": run["copy_GBps"],
                    "x": xs, "y": ys,
                    "roofline": roofline_line(cfg, run["weights_bytes"], kv, run["copy_GBps"] * GB,
                                              max(x for s in found.values() for x in s[0]))})
    if not panels:
        raise MissingResults(f"no decode results for the {device} in {_rel(results)}/: {DECODE_COMMANDS[device]} "
                             "makes them")
    order = [p for p in bench.SIZES if p in panels] + [p for p in panels if p not in bench.SIZES]
    return {"device": device, "panels": [panels[p] for p in order]}


def prefill_data(results=RESULTS):
    """Figure 3: measured prefill seconds against prompt length, with a least-squares line through the
    origin for every run that timed two lengths or more. Model sizes with fewer lengths are left out."""
    panels = {}
    for path, r in bench_runs(results, "cpu"):
        points = [(p["tokens"], p["s"]) for p in r.get("prefill", [])]
        if not points:
            continue
        kv = r.get("kv_dtype", "float32")
        xs, ys = [t for t, _ in points], [s for _, s in points]
        slope = sum(x * y for x, y in points) / sum(x * x for x in xs)   # s per token: min Σ(y − a·x)²
        panels.setdefault(r["size"], {"title": f"{r['size']}: {params_text(bench.SIZES[r['size']])} parameters, "
                                               f"CPU, {r['cpus']} cores", "series": []})["series"].append({
            "source": _rel(path), "weights": r["dtype"], "kv_dtype": kv, "label": OPTIONS[r["dtype"], kv][0],
            "colour": OPTIONS[r["dtype"], kv][1], "x": xs, "y": ys, "slope": slope if len(set(xs)) > 1 else None})
    panels = {k: p for k, p in panels.items() if len({x for s in p["series"] for x in s["x"]}) > 1}
    if not panels:
        raise MissingResults(f"no prefill results at two prompt lengths in {_rel(results)}/: {BENCH_COMMAND} "
                             "makes them")
    return {"panels": [panels[k] for k in bench.SIZES if k in panels]}


# ----------------------------------------------------------------------------------------------
# From the code itself: the masks, the ring, a trace compare

def tiny_config():
    with open(os.path.join(TINY, "config.json")) as f:
        return convert.config_from_hf(json.load(f))


def masks_data():
    """Figure 4: which keys each kind of attention layer lets a query see (phi4flash.visible, with the
    window a layer gets in attention_maps), on the tiny model for a prompt of 2.5 windows; and a
    sliding layer's ring of W slots before and after the decode step that follows (kv_ring)."""
    cfg = tiny_config()
    W = next(w for w in cfg.sliding_window if w)
    T = 2 * W + W // 2                                    # long enough that the window slides and the ring wraps
    pos = np.arange(T)
    layers = []
    kv_layer = cfg.kv_layer
    for kind, what in (("swa", "sliding window, its own K/V"), ("full", "L/2+1, causal, its own K/V"),
                       ("cross", f"cross-attention, layer {kv_layer}'s K/V")):
        i = cfg.layer_kinds.index(kind)
        window = cfg.sliding_window[i] if kind == "swa" else None
        layers.append({"layer": i, "kind": kind, "what": what, "window": window,
                       "mask": phi4flash.visible(pos[None, :], pos[:, None], window).tolist()})
    # a ring of W slots, one head of width 1 whose K and V are the position itself: what a slot holds
    kv = phi4flash.KVCache(np.zeros((1, W, 1), np.float32), np.zeros((1, W, 1), np.float32),
                           np.full(W, -1, np.int64), W)
    values = pos.astype(np.float32)[None, :, None]        # (1, T, 1)
    phi4flash.kv_ring(kv, values, values, 0)              # the prompt: positions 0 .. T-1
    before = kv.pos.tolist()
    new = np.full((1, 1, 1), T, np.float32)
    phi4flash.kv_ring(kv, new, new, T)                    # one decode step at position T
    return {"T": T, "W": W, "layers": layers,
            "ring": {"query": T, "before": before, "after": kv.pos.tolist(), "k_after": kv.k[0, :, 0].tolist(),
                     "written": int(np.flatnonzero(kv.pos != np.array(before))[0]),
                     "visible_before": phi4flash.visible(np.array(before), T, W).tolist(),
                     "visible_after": phi4flash.visible(kv.pos, T, W).tolist()}}


def trace_diff_data():
    """Figure 5: note 8's planted bug, reproduced as note 8 does it: noise of 0.01 in the bf16 bits of
    layers.3.attn.out_proj in a copy of the converted tiny model, the fixture's 41-token prompt p2 traced
    (forward(..., trace=...)) and compared (compare_trace) with a clean phi4flash trace (every tensor, atol
    1e-6) and with the fixture's reference.npz (residuals only, atol 1e-4)."""
    ref = np.load(os.path.join(TINY, "reference.npz"))
    ids = ref["p2_input_ids"]
    work = tempfile.mkdtemp(prefix="phi4flash-figures-")
    try:
        clean = os.path.join(work, "clean")
        convert.convert(TINY, clean, show_progress=False)
        port = os.path.join(work, "port")
        shutil.copytree(clean, port)
        path = os.path.join(port, "model.safetensors")
        header, _, start = phi4flash.read_safetensors_header(path)
        info = header["layers.3.attn.out_proj"]
        w = np.memmap(path, np.uint16, "r+", offset=start + info["data_offsets"][0], shape=tuple(info["shape"]))
        noise = np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
        w[:] = convert.f32_to_bf16(phi4flash.bf16_to_f32(w) + 0.01 * noise)   # the planted bug
        w.flush()
        del w
        model, ported = phi4flash.load(clean), phi4flash.load(port)
        theirs, ours = {}, {}
        model.forward(ids, trace=theirs)
        ported.forward(ids, trace=ours)
        cfg = ported.config
        comparisons = {}
        for name, reference, atol in (("clean", dict(theirs, input_ids=ids), 1e-6),
                                      ("reference", phi4flash.reference_to_dump(ref, "p2"), 1e-4)):
            c = phi4flash.compare_trace(cfg, dict(ours, input_ids=ids), reference, atol)
            comparisons[name] = {"atol": c.atol, "first": c.first, "diffs": c.diffs}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [(label, kind, [n for n in names if n in ours]) for label, kind, names in phi4flash.trace_rows(cfg)]
    return {"names": [n for _, _, names in rows for n in names],
            "rows": [{"label": label, "kind": kind, "names": names} for label, kind, names in rows],
            "clean": comparisons["clean"], "reference": comparisons["reference"], "tokens": len(ids)}


# ----------------------------------------------------------------------------------------------
# Drawing (matplotlib only from here on)

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")                                 # no display; the same renderer everywhere
    import matplotlib.pyplot as plt
    plt.rcParams.update({"svg.hashsalt": "phi4flash", "svg.fonttype": "none", "font.size": 9,
                         "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
                         "axes.titlesize": 9.5, "axes.titleweight": "bold"})
    return plt


def _save(fig, path):
    fig.savefig(path, metadata={"Date": None, "Creator": None})
    import matplotlib.pyplot as plt
    plt.close(fig)


def _size(gb):
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.1f} MB" if gb < 0.01 else f"{gb * 1e3:.0f} MB"


def _stack_labels(stack, readers=None):
    """A stacked part's label with its size where it stops growing: the thin ones cannot be seen."""
    out = []
    for s in stack:
        label = s["label"] + (f", read by {readers} layers" if readers and s["label"] == "shared K/V" else "")
        out.append(label if s["label"] == "shared K/V" else f"{label}: {_size(s['y'][-1])}")
    return out


def plot_decode_bytes(data, path):
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    x = np.array(data["x"]) / 1024
    a.stackplot(x, *[s["y"] for s in data["stack"]], labels=["SambaY, " + t for t in _stack_labels(data["stack"],
                data["readers"])], colors=["#9ecae1", "#fdae6b", "#a1d99b", "tab:blue"])
    a.plot(x, data["plain"]["y"], color=PLAIN_COLOUR, lw=1.8, label=data["plain"]["label"])
    a.set_title(f"What one decode step reads (SambaY {data['sambay']}: bf16 weights, fp32 K/V)", loc="left")
    a.legend(loc="upper left", fontsize=8)
    for s in data["totals"]:
        b.plot(x, s["y"], color=s["colour"], lw=1.8, label="SambaY, " + s["label"])
    b.plot(x, data["plain"]["y"], color=PLAIN_COLOUR, lw=1.8, label=data["plain"]["label"])
    b.set_title("With the options of note 11; dotted: the weights-only floors", loc="left")
    b.legend(loc="upper left", fontsize=8)
    bf16, int8, plain = data["floors"]
    for ax, text, gap in ((a, "weights-only floor: ", ", "), (b, "", "\n")):   # a step's bytes at context 0
        ax.axhline(bf16["y"], color="tab:blue", ls=":", lw=1.2)
        ax.annotate(f"{text}SambaY bf16 {bf16['y']:.2f} GB{gap}Phi-4-mini-reasoning {plain['y']:.2f} GB",
                    (x[0], bf16["y"]), xytext=(4, -3), textcoords="offset points", ha="left", va="top", fontsize=8)
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("bytes read per token (GB)")
        ax.set_xlim(0, x[-1])
        ax.set_ylim(0, max(max(data["plain"]["y"]), max(max(s["y"]) for s in data["totals"])) * 1.3)  # room: legend
    b.axhline(int8["y"], color="tab:green", ls=":", lw=1.2)
    b.annotate(f"SambaY int8 {int8['y']:.2f} GB", (x[-1], int8["y"]), xytext=(-4, -11),
               textcoords="offset points", ha="right", fontsize=8)
    _save(fig, path)


def plot_cache_memory(data, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    x = np.array(data["x"]) / 1024
    ax.stackplot(x, *[s["y"] for s in data["stack"]],
                 labels=[f"SambaY, {t} (fp32)" for t in _stack_labels(data["stack"])],
                 colors=["#fdae6b", "#a1d99b", "tab:blue"])
    ax.plot(x, data["bf16_kv"]["y"], color=data["bf16_kv"]["colour"], lw=1.8, ls="--", label=data["bf16_kv"]["label"])
    ax.plot(x, data["plain"]["y"], color=PLAIN_COLOUR, lw=1.8, label=data["plain"]["label"])
    for s in (data["plain"], {"y": [sum(p) for p in zip(*(t["y"] for t in data["stack"]))]}, data["bf16_kv"]):
        ax.annotate(_size(s["y"][-1]), (x[-1], s["y"][-1]), xytext=(-4, 4), textcoords="offset points", ha="right",
                    fontsize=8)
    ax.set_title("What the cache holds", loc="left")
    ax.set_xlabel("context (K tokens)")
    ax.set_ylabel("cache (GB)")
    ax.set_xlim(0, x[-1])
    ax.set_ylim(0, max(data["plain"]["y"]) * 1.02)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def _roofline_legend(fig, series, many=True):
    """One legend for all panels: the options in OPTIONS order, then what a dot and a dashed line are."""
    from matplotlib.lines import Line2D
    present = {(s["weights"], s["kv_dtype"]) for s in series}
    handles = [Line2D([], [], color=OPTIONS[o][1], marker="o", ls="--", label=OPTIONS[o][0])
               for o in OPTIONS if o in present]
    handles.append(Line2D([], [], color="grey", marker="o", ls="", label="measured: the median step"))
    denominators = " / ".join(sorted({s["denominator"] for s in series}))
    handles.append(Line2D([], [], color="grey", ls="--", label=f"roofline: the step's bytes at the {denominators} "
                          "bandwidth measured in the same run"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(4, len(handles)) if many else 1, fontsize=8)


def plot_decode_roofline(data, path):
    plt = _pyplot()
    n = len(data["panels"])
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.6) if n > 1 else (6.5, 5), layout="constrained", squeeze=False)
    for ax, panel in zip(axes[0], data["panels"]):
        for s in panel["series"]:
            ax.plot(np.array(s["roofline"]["x"]) / 1024, s["roofline"]["y"], color=s["colour"], ls="--", lw=1.2)
            ax.plot(np.array(s["x"]) / 1024, s["y"], color=s["colour"], marker="o", ls="", ms=5)
        if data["device"] == "gpu":                      # few points: each one's share of its roofline
            for s in panel["series"]:
                middle = len(s["roofline"]["x"]) // 2
                ax.annotate(f"roofline at the {s['denominator']} bandwidth, {s['bandwidth_GBps'] / 1e3:.2f} TB/s",
                            (s["roofline"]["x"][middle] / 1024, s["roofline"]["y"][middle]), xytext=(0, -16),
                            textcoords="offset points", ha="center", color=s["colour"], fontsize=8)
                right = max(s["x"])
                for x, y, share in zip(s["x"], s["y"], s["share"]):
                    ax.annotate(f"{y:.1f} ms: {share:.0%} of the roofline", (x / 1024, y), xytext=(0, 8),
                                textcoords="offset points", ha="right" if x > right / 2 else "left",
                                color=s["colour"], fontsize=8)
        ax.set_title(panel["title"], loc="left")
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("decode (ms per token)")
        ax.set_xlim(0, max(x for s in panel["series"] for x in s["roofline"]["x"]) / 1024 * 1.04)
        ax.set_ylim(0, max(max(s["y"] + s["roofline"]["y"]) for s in panel["series"]) * 1.08)
    _roofline_legend(fig, [s for panel in data["panels"] for s in panel["series"]], many=n > 1)
    _save(fig, path)


def plot_prefill(data, path):
    plt = _pyplot()
    n = len(data["panels"])
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4), layout="constrained", squeeze=False)
    for ax, panel in zip(axes[0], data["panels"]):
        xmax = max(x for s in panel["series"] for x in s["x"])
        for s in panel["series"]:
            m = "osD^v"[list(OPTIONS).index((s["weights"], s["kv_dtype"]))]
            if s["slope"] is not None:
                ax.plot([0, xmax], [0, s["slope"] * xmax], color=s["colour"], lw=1.2, ls="--")
            ax.plot(s["x"], s["y"], color=s["colour"], marker=m, ls="", ms=6, label=s["label"])
        ax.plot([], [], color="grey", ls="--", label="least squares through the origin")
        ax.set_title(panel["title"], loc="left")
        ax.set_xlabel("prompt (tokens)")
        ax.set_ylabel("prefill (s)")
        ax.set_xlim(0, xmax * 1.05)
        ax.set_ylim(0, max(max(s["y"]) for s in panel["series"]) * 1.1)
        ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def plot_masks(data, path):
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    cmap = ListedColormap(["#f0f0f0", "tab:blue"])
    fig = plt.figure(figsize=(11, 5.4), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.1, 1])
    T, W = data["T"], data["W"]
    top.suptitle(f"Which keys a query sees (blue), on the tiny model's schedule, {T} tokens", x=0.01, ha="left",
                 fontweight="bold", fontsize=10)
    for ax, layer in zip(top.subplots(1, 3), data["layers"]):
        ax.imshow(np.array(layer["mask"]), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        window = f", W = {layer['window']}" if layer["window"] else ""
        ax.set_title(f"layer {layer['layer']}: {layer['what']}{window}", loc="left")
        ax.set_xlabel("key position s")
        ax.set_ylabel("query position t")
        ticks = list(range(0, T, 4))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        for spine in ax.spines.values():
            spine.set_visible(False)
    ring = data["ring"]
    ax = bottom.subplots()
    rows = [("after the prompt", ring["before"], ring["visible_before"]),
            (f"after decoding position {ring['query']}", ring["after"], ring["visible_after"])]
    ax.imshow(np.array([r[2] for r in rows], float), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    for row, (_, held, seen) in enumerate(rows):
        for slot, p in enumerate(held):
            ax.text(slot, row, str(p), ha="center", va="center", color="white" if seen[slot] else "black",
                    fontweight="bold" if slot == ring["written"] else "normal")
    ax.add_patch(plt.Rectangle((ring["written"] - 0.5, -0.5), 1, 2, fill=False, ec="tab:red", lw=2))
    ax.set_yticks(range(2), [r[0] for r in rows])
    ax.set_xticks(range(W))
    ax.set_xlabel(f"ring slot (position p is written to slot p % {W}; red: the slot the step at position "
                  f"{ring['query']} overwrites)")
    ax.set_title(f"A sliding layer's ring: which position each slot holds; blue: visible to the query at "
                 f"position {ring['query']}", loc="left")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=0)
    _save(fig, path)


def plot_trace_diff(data, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.4), layout="constrained")
    index = {n: i for i, n in enumerate(data["names"])}
    found = [d for c in ("clean", "reference") for d in data[c]["diffs"].values() if d > 0]
    floor = 10.0 ** (math.floor(math.log10(min(found))) - 1)   # where an exact 0 is drawn on the log axis
    for key, colour, marker, text in (
            ("clean", "tab:red", "o", "against a clean phi4flash trace (every tensor)"),
            ("reference", "tab:blue", "s", "against the fixture's reference.npz (residuals)")):
        c = data[key]
        names = list(c["diffs"])
        ax.plot([index[n] for n in names], [max(c["diffs"][n], floor) for n in names], color=colour, marker=marker,
                ms=4, lw=1, label=f"{text}; atol {c['atol']:.0e} (dotted)")
        ax.axhline(c["atol"], color=colour, ls=":", lw=1)
        if c["first"]:                                   # the first tensor over atol, ringed
            ax.plot(index[c["first"]], c["diffs"][c["first"]], marker=marker, ms=11, mfc="none", mec=colour, mew=1.5)
    for key, colour, offset in (("clean", "tab:red", (40, -70)), ("reference", "tab:blue", (-230, -65))):
        first = data[key]["first"]
        if first:
            ax.annotate(f"first over atol: {first}\n(max|diff| {data[key]['diffs'][first]:.1e})",
                        (index[first], data[key]["diffs"][first]), xytext=offset, textcoords="offset points",
                        arrowprops={"arrowstyle": "->", "color": colour}, color=colour)
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 2)
    ticks = [t for t in ax.get_yticks() if floor < t <= 1]
    ax.set_yticks([floor, *ticks], ["0", *[f"1e{round(math.log10(t))}" if t != 1 else "1" for t in ticks]])
    starts = [index[r["names"][0]] for r in data["rows"]]
    centres = [index[r["names"][0]] / 2 + index[r["names"][-1]] / 2 for r in data["rows"]]
    ax.set_xticks(centres, [f"layer {r['label']}\n{r['kind']}" if r["label"].isdigit() else
                            ("\n" if r["label"] == "head" else "") + r["label"] for r in data["rows"]], fontsize=8)
    for s in starts[1:]:
        ax.axvline(s - 0.5, color="#e8e8e8", lw=0.8, zorder=0)
    ax.set_xlim(-0.7, len(data["names"]) - 0.3)
    ax.set_xlabel("traced tensors in forward order, by layer "
                  "(mixer_in, [memory, shared K/V,] mixer_out, mlp_out, residual)")
    ax.set_ylabel("max |ours − reference|")
    ax.set_title(f"Noise in layer 3's attn.out_proj: where the traces part ({data['tokens']} tokens)", loc="left")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


FIGURES = {  # name -> (data function of the results folder, plot function); written as NAME.svg
    "decode-bytes": (lambda results: decode_bytes_data(), plot_decode_bytes),
    "cache-memory": (lambda results: cache_memory_data(), plot_cache_memory),
    "decode-roofline-cpu": (lambda results: decode_roofline_data("cpu", results), plot_decode_roofline),
    "decode-roofline-gpu": (lambda results: decode_roofline_data("gpu", results), plot_decode_roofline),
    "prefill": (prefill_data, plot_prefill),
    "masks": (lambda results: masks_data(), plot_masks),
    "trace-diff": (lambda results: trace_diff_data(), plot_trace_diff),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the folder to write the figures into (made if missing)")
    ap.add_argument("--only", action="append", choices=sorted(FIGURES), help="draw only this figure (repeatable)")
    ap.add_argument("--results", default=RESULTS, help="the measured results (default: notes/results)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in args.only or FIGURES:
        data_fn, plot_fn = FIGURES[name]
        try:
            data = data_fn(args.results)
        except MissingResults as e:
            print(f"{name}: left out: {e}")
            continue
        path = os.path.join(args.out, name + ".svg")
        plot_fn(data, path)
        print(f"{name}: {path} ({os.path.getsize(path) / 1024:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
