"""The notes' figures (notes/figures.py): every one is drawn, and what each plots is what the result
files and the code say. The plotted numbers are read back from the script's data functions (what
its plot functions draw), never from the pictures, and checked against the JSON files read here
independently, or against the code the notes teach."""
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from conftest import ROOT, TINY

sys.path.insert(0, os.path.join(ROOT, "notes"))
import bench  # noqa: E402
import figures  # noqa: E402
import phi4flash  # noqa: E402

RESULTS = os.path.join(ROOT, "notes", "results")


def _json(path):
    with open(path) as f:
        return json.load(f)


def test_the_script_draws_every_figure(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the figures: pip install -e '.[notes]'")
    r = subprocess.run([sys.executable, os.path.join("notes", "figures.py"), "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr   # stderr: a fresh matplotlib's font cache note
    assert len(r.stdout.splitlines()) == len(figures.FIGURES)          # one line per figure
    for name in figures.FIGURES:
        path = tmp_path / "out" / f"{name}.svg"
        assert path.is_file(), r.stdout
        root = ET.parse(path).getroot()                                 # a whole SVG document
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert "<dc:date>" not in path.read_text()                      # no date: the same figure, the same bytes


def test_a_missing_result_file_leaves_its_figure_out_with_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    empty = tmp_path / "results"
    empty.mkdir()
    only = ["decode-roofline-cpu", "decode-roofline-gpu", "prefill", "masks"]
    assert figures.main(["--out", str(tmp_path / "out"), "--results", str(empty),
                         *[a for name in only for a in ("--only", name)]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(only)
    for line, name in zip(lines, only[:3]):
        assert line.startswith(f"{name}: left out: ") and line.endswith("makes them"), line
    assert "python notes/bench.py " in lines[0] and "bash notes/gpu_check.sh" in lines[1]
    assert sorted(os.listdir(tmp_path / "out")) == ["masks.svg"]


def test_every_figure_is_committed_and_embedded_in_a_note_with_alt_text():
    notes = "".join(open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(ROOT, "notes", "*.md")))
    embedded = dict((name, alt) for alt, name in re.findall(r"!\[([^\]]*)\]\(figures/([\w-]+)\.svg\)", notes))
    for name in figures.FIGURES:
        assert os.path.isfile(os.path.join(ROOT, "notes", "figures", f"{name}.svg")), name
        assert len(embedded.get(name, "")) > 40, f"{name}: not embedded in a note with alt text that states its point"


# ------------------------------------------------------------------------------------------------
# Figure 2: decode against the roofline, every point a number of a result file

def _bench_files(pattern):
    return [p for p in sorted(glob.glob(os.path.join(RESULTS, pattern)))
            if not p.endswith("-before.json") and "decode" in _json(p) and _json(p).get("size") in bench.SIZES]


def _expected_decode(device):
    """{(file, weights, kv): {context: (ms per token, roofline ms or None)}}, read from the JSON here."""
    out = {}
    for path in _bench_files("cpu-*.json" if device == "cpu" else "gpu-*-bench.json"):
        r = _json(path)
        key = (os.path.relpath(path, ROOT), r["dtype"], r.get("kv_dtype", "float32"))
        out[key] = {d["context"]: (1e3 * d["s_per_token"], 1e3 * d["roofline_s"]) for d in r["decode"]}
    for path in sorted(glob.glob(os.path.join(RESULTS, "cpu-real-size-*.json"))) if device == "cpu" else []:
        r = _json(path)
        for w, entry in r.get("dtypes", {}).items():
            run = entry["run"]
            points = out.setdefault((os.path.relpath(path, ROOT), w, "float32"), {})
            points[run["prefill_tokens"]] = (1e3 * statistics.median(run["decode_s"]), 1e3 * run["roofline_s"])
            for long in run["long"]:
                out.setdefault((os.path.relpath(path, ROOT), w, long["kv_dtype"]), {})[long["context"]] = (
                    1e3 * statistics.median(long["decode_s"]), 1e3 * long["roofline_s"])
    return out


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_decode_points_are_the_result_files_and_each_roofline_is_theirs(device):
    expected = _expected_decode(device)
    assert expected, f"no {device} decode results in notes/results"
    data = figures.decode_roofline_data(device)
    series = [s for panel in data["panels"] for s in panel["series"]]
    assert {(s["source"], s["weights"], s["kv_dtype"]) for s in series} == set(expected)   # every run, once
    for s in series:
        want = expected[s["source"], s["weights"], s["kv_dtype"]]
        assert s["x"] == list(want)
        assert s["y"] == [want[x][0] for x in s["x"]]                  # the measured number itself
        # the line is the run's own roofline: it passes through the roofline the run wrote down, within
        # the few tokens past the context at which the benchmark evaluated it (< 0.1 %)
        line = np.interp(s["x"], s["roofline"]["x"], s["roofline"]["y"])
        assert line == pytest.approx([want[x][1] for x in s["x"]], rel=1e-3)
        assert s["roofline"]["x"][0] == 0 and s["roofline"]["x"][-1] >= max(s["x"])


def test_the_gpu_roofline_says_its_denominator():
    data = figures.decode_roofline_data("gpu")
    for s in (s for panel in data["panels"] for s in panel["series"]):
        r = _json(os.path.join(ROOT, s["source"]))
        assert s["denominator"] == r.get("roofline_bandwidth", "copy")  # bench.py before issue 19: the copy
        assert s["bandwidth_GBps"] == r[f"{s['denominator']}_GBps"]
        assert s["share"] == [d["roofline_s"] / d["s_per_token"] for d in r["decode"]]


# ------------------------------------------------------------------------------------------------
# Figure 3: prefill against prompt length

def test_prefill_points_are_the_result_files_with_a_line_through_the_origin():
    data = figures.prefill_data()
    series = [s for panel in data["panels"] for s in panel["series"]]
    expected = {}
    for path in _bench_files("cpu-*.json"):
        r = _json(path)
        if r.get("prefill"):
            expected[os.path.relpath(path, ROOT), r["dtype"], r.get("kv_dtype", "float32")] = r["prefill"]
    assert {(s["source"], s["weights"], s["kv_dtype"]) for s in series} == set(expected)
    for s in series:
        points = expected[s["source"], s["weights"], s["kv_dtype"]]
        assert s["x"] == [p["tokens"] for p in points] and s["y"] == [p["s"] for p in points]
        if len(points) > 1:                                            # least squares with no intercept
            (slope,), *_ = np.linalg.lstsq(np.array(s["x"], float)[:, None], np.array(s["y"]), rcond=None)
            assert s["slope"] == pytest.approx(slope, rel=1e-12)
        else:
            assert s["slope"] is None


# ------------------------------------------------------------------------------------------------
# Figure 1: bytes read per step and held by the cache, from the config and the converted file's table

@pytest.mark.parametrize("fixture", ["converted", "converted_int8"])
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_step_bytes_are_what_the_benchmark_counts(fixture, kv_dtype, request):
    model = phi4flash.load(request.getfixturevalue(fixture), kv_dtype=kv_dtype)
    cfg = model.config
    weights = "int8" if fixture == "converted_int8" else "bfloat16"
    for context in (1, 5, 8, 100):                                     # below and past the window of 8
        counted = bench.step_bytes(model, context)
        parts = figures.step_parts(cfg, kv_dtype, context)
        assert figures.weight_bytes(cfg, weights) == counted["weights"]
        assert (parts["Mamba states"], parts["sliding rings"], parts["shared K/V"]) == (
            counted["states"], counted["rings"], counted["shared_kv"])


def test_the_real_weights_are_the_benchmarked_files():
    for path in glob.glob(os.path.join(RESULTS, "cpu-real-size-*.json")):
        for w, entry in _json(path).get("dtypes", {}).items():
            assert figures.weight_bytes(bench.SIZES["real"], w) == entry["run"]["weights_bytes"], (path, w)


def test_decode_bytes_data():
    data = figures.decode_bytes_data()
    cfg = bench.SIZES["real"]
    xs = data["x"]
    assert xs[0] == 0 and xs[-1] == cfg.context_length == 65536 and 512 in xs
    default = next(s for s in data["totals"] if (s["weights"], s["kv_dtype"]) == ("bfloat16", "float32"))
    assert np.allclose(np.sum([s["y"] for s in data["stack"]], axis=0), default["y"], rtol=1e-12)
    for s in data["totals"]:
        w = figures.weight_bytes(cfg, s["weights"])
        assert s["y"] == [(w + sum(figures.step_parts(cfg, s["kv_dtype"], x).values())) / 1e9 for x in xs]
    assert {(s["weights"], s["kv_dtype"]) for s in data["totals"]} == {
        (w, kv) for w in ("bfloat16", "int8") for kv in ("float32", "bfloat16")}
    assert data["readers"] == 8 and [f["y"] for f in data["floors"][:2]] == [
        figures.weight_bytes(cfg, "bfloat16") / 1e9, figures.weight_bytes(cfg, "int8") / 1e9]
    plain = figures.plain_transformer()
    assert data["plain"]["y"] == [(plain["weights"] + x * plain["kv_per_token"]) / 1e9 for x in xs]


def test_the_plain_transformer_is_phi4_mini_reasoning_counted_tensor_by_tensor():
    c = figures.PHI4_MINI_REASONING
    D, F, H, H_kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = D // H
    assert (c["num_hidden_layers"], H_kv, hd) == (32, 8, 128)          # the shapes
    layer = {"qkv_proj": (D, (H + 2 * H_kv) * hd), "o_proj": (H * hd, D), "gate_up_proj": (D, 2 * F),
             "down_proj": (F, D), "input_layernorm": (D,), "post_attention_layernorm": (D,)}
    tensors = [(c["vocab_size"], D), (D,)] + [s for _ in range(c["num_hidden_layers"]) for s in layer.values()]
    plain = figures.plain_transformer()
    assert plain["parameters"] == sum(math.prod(s) for s in tensors)
    assert plain["weights"] == 2 * plain["parameters"]                 # bf16
    assert plain["kv_per_token"] == c["num_hidden_layers"] * 2 * H_kv * hd * 2   # K and V, every layer, bf16
    assert abs(plain["parameters"] / 3.8e9 - 1) < 0.02                 # the model card's 3.8B: same size as SambaY


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_cache_memory_is_what_empty_cache_allocates(kv_dtype):
    for cfg in (figures.tiny_config(), bench.SIZES["169m"]):
        for tokens in (1, 300):
            cache = phi4flash.empty_cache(cfg, tokens, kv_dtype=kv_dtype)
            allocated = sum(a.nbytes for a in [*cache.conv_state.values(), *cache.ssm_state.values()])
            allocated += sum(kv.k.nbytes + kv.v.nbytes for kv in cache.kv.values())
            assert sum(figures.cache_parts(cfg, kv_dtype, tokens).values()) == allocated
    data = figures.cache_memory_data()
    cfg = bench.SIZES["real"]
    assert data["bf16_kv"]["y"] == [sum(figures.cache_parts(cfg, "bfloat16", x).values()) / 1e9 for x in data["x"]]
    assert data["plain"]["y"] == [x * figures.plain_transformer()["kv_per_token"] / 1e9 for x in data["x"]]


# ------------------------------------------------------------------------------------------------
# Figure 4: the masks and the ring; figure 5: the trace compare of note 8

def test_masks_are_the_layers_rules_and_the_ring_is_slot_p_mod_w():
    data = figures.masks_data()
    T, W = data["T"], data["W"]
    cfg = figures.tiny_config()
    assert W == cfg.sliding_window[1] and T > 2 * W
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    rules = {"swa": (s <= t) & (s > t - W), "full": s <= t, "cross": s <= t}
    assert [layer["kind"] for layer in data["layers"]] == list(rules)
    for layer in data["layers"]:
        assert cfg.layer_kinds[layer["layer"]] == layer["kind"]
        assert np.array_equal(layer["mask"], rules[layer["kind"]])
    ring, p = data["ring"], data["ring"]["query"]
    assert p == T
    assert ring["before"] == [max(q for q in range(T) if q % W == slot) for slot in range(W)]
    assert ring["after"] == [max(q for q in range(T + 1) if q % W == slot) for slot in range(W)]
    assert ring["k_after"] == ring["after"] and ring["written"] == p % W
    assert all(ring["visible_after"]) and ring["visible_before"] == [slot != p % W for slot in range(W)]


def test_trace_diff_is_note_8s_planted_bug():
    data = figures.trace_diff_data()
    note = open(os.path.join(ROOT, "notes", "08-trace-and-compare.md"), encoding="utf-8").read()
    printed = dict((float(atol), (name, diff)) for atol, name, diff in
                   re.findall(r"^FIRST over atol ([\d.e+-]+): (\S+) \(max\|diff\| ([\d.e+-]+)\)$", note, re.M))
    for key in ("clean", "reference"):
        c = data[key]
        name, diff = printed[c["atol"]]                               # what note 8's compare printed
        assert c["first"] == name and f"{c['diffs'][name]:.1e}" == diff
        assert list(c["diffs"]) == [n for n in data["names"] if n in c["diffs"]]   # forward order
        assert all(c["diffs"][n] <= c["atol"] for n in list(c["diffs"])[:list(c["diffs"]).index(name)])
    assert len(data["clean"]["diffs"]) == len(data["names"]) == 38 and data["tokens"] == len(
        np.load(os.path.join(TINY, "reference.npz"))["p2_input_ids"])
