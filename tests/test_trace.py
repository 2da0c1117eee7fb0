"""Trace and compare: recording changes nothing, the fixture's reference reads as a match, and a
planted bug (one perturbed weight) is pinpointed at its layer, through the API and the CLI."""
import io
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from rich.console import Console

import convert
import phi4flash
from conftest import PROMPTS, ROOT, TINY

ATOL = 1e-4


def fresh_model_with(converted, layer, mixer, name, scale=0.05, seed=0):
    """A newly loaded tiny model (the shared fixture stays clean) with one weight perturbed: the
    weights are read-only memory maps, so the array is replaced by a noisy float32 copy."""
    model = phi4flash.load(converted)
    w = phi4flash.f32(model.layers[layer][mixer][name])
    noise = np.random.default_rng(seed).standard_normal(w.shape).astype(np.float32)
    model.layers[layer][mixer][name] = w + scale * float(np.abs(w).mean()) * noise
    return model


def render(table):
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    return console.file.getvalue()


def marked_rows(text):
    """The first cell of every table row that carries the FIRST marker."""
    return [line.split("│")[1].strip() for line in text.splitlines() if "◀ FIRST" in line]


def test_trace_leaves_logits_unchanged(model, ref):
    for p in PROMPTS:
        ids = ref[f"{p}_input_ids"]
        plain = model.forward(ids)
        trace = {}
        traced = model.forward(ids, trace=trace)
        with_probs = model.forward(ids, trace={}, attn_probs=(5, 1))
        assert np.array_equal(plain, traced) and np.array_equal(plain, with_probs)  # bitwise
        assert np.array_equal(trace["logits"], plain)


def test_trace_has_every_documented_name_with_its_shape(model, ref):
    cfg = model.config
    ids = ref["p1_input_ids"]
    T, D, hd = len(ids), cfg.hidden_size, cfg.head_dim
    trace = {}
    model.forward(ids, trace=trace, attn_probs=(1, 0))
    names = [n for _, _, row in phi4flash.trace_rows(cfg) for n in row]
    assert set(trace) == {n for n in names if not n.endswith("attn_probs")} | {"layers.1.attn_probs"}
    for name, x in trace.items():
        want = {"memory": (T, cfg.d_inner), "shared_k": (cfg.num_key_value_heads, T, hd),
                "shared_v": (cfg.num_key_value_heads, T, hd), "logits": (T, cfg.vocab_size),
                "layers.1.attn_probs": (2, T, T)}.get(name, (T, D))
        assert x.shape == want and x.dtype == np.float32, name


@pytest.mark.parametrize("layer", [1, 5, 7])
def test_attention_maps_rebuild_the_layers_output(model, ref, layer):
    """attn_probs are recomputed from the trace after the forward (the model's attention code does
    no tracing). They must be the maps the layer used: combined by the equation with the layer's
    values, the maps of every head pair give the layer's mixer_out (1e-5: the same fp32 math)."""
    cfg, p = model.config, model.layers[layer]["attn"]
    trace = {}
    model.forward(ref["p2_input_ids"], trace=trace)
    u = trace[f"layers.{layer}.mixer_in"]
    v = trace["shared_v"] if cfg.layer_kinds[layer] == "cross" else \
        phi4flash.project_heads(u, p["Wv"], p["bv"], cfg.num_key_value_heads)        # (H_kv, T, hd)
    lambda_init = phi4flash.lambda_init_for(layer)
    lam = phi4flash.diff_lambda(p, lambda_init)
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    pairs = []
    for j in range(cfg.num_attention_heads // 2):
        P = phi4flash.attention_maps(model, trace, layer, j)                           # (2, T, T)
        assert np.allclose(P.sum(-1), 1, atol=1e-5)
        V_g = np.concatenate([v[2 * (j // G)], v[2 * (j // G) + 1]], axis=-1)          # (T, 2hd)
        pairs.append(phi4flash.rms_norm(P[0] @ V_g - lam * (P[1] @ V_g), p["subln"], 1e-5) * (1 - lambda_init))
    out = phi4flash.linear(np.concatenate(pairs, axis=-1), p["out_proj"], p["out_proj_bias"])
    assert np.abs(out - trace[f"layers.{layer}.mixer_out"]).max() < 1e-5


def test_fixture_reference_converted_to_dump_names_matches(model, ref):
    cfg = model.config
    for p in PROMPTS:
        dump = phi4flash.reference_to_dump(ref, p)
        trace = {"input_ids": ref[f"{p}_input_ids"]}
        model.forward(dump["input_ids"], trace=trace)
        c = phi4flash.compare_trace(cfg, trace, dump, ATOL)
        assert c.first is None, (p, c.first, c.diffs)
        assert len(c.diffs) == 1 + cfg.num_hidden_layers + 5  # embed, every residual, memory, shared K/V, norm, logits
        assert set(c.skipped) == {f"layers.{i}.{n}" for i in range(cfg.num_hidden_layers)
                                  for n in ("mixer_in", "mixer_out", "mlp_out")}
        assert c.unknown == [] and max(c.diffs.values()) < 1e-5
        assert "◀" not in render(phi4flash.trace_table(cfg, trace, c))


def test_reference_to_dump_names_a_missing_prompt(ref):
    with pytest.raises(phi4flash.Phi4FlashError, match=r"no prompt 'p9' \(it has \['p0', 'p1', 'p2'\]\)"):
        phi4flash.reference_to_dump(ref, "p9")


# (layer, mixer, weight) -> the first tensor over atol against our own clean trace (every name) and
# against the fixture's reference (residuals, memory, shared K/V only)
PLANTED = [
    (0, "mamba", "out_proj", "layers.0.mixer_out", "layers.0.residual"),
    (1, "input_layernorm", "weight", "layers.1.mixer_in", "layers.1.residual"),
    (2, "mlp", "fc2", "layers.2.mlp_out", "layers.2.residual"),
    (3, "attn", "out_proj", "layers.3.mixer_out", "layers.3.residual"),
    (4, "mamba", "A_log", "memory", "memory"),
    (5, "attn", "Wv", "shared_v", "shared_v"),
    (6, "gmu", "in_proj", "layers.6.mixer_out", "layers.6.residual"),
    (7, "attn", "Wq", "layers.7.mixer_out", "layers.7.residual"),
]


@pytest.mark.parametrize("layer,mixer,name,first_own,first_ref", PLANTED)
def test_a_perturbed_weight_is_pinpointed(model, converted, ref, layer, mixer, name, first_own, first_ref):
    cfg = model.config
    ids = ref["p2_input_ids"]
    clean = {}
    model.forward(ids, trace=clean)
    bad = fresh_model_with(converted, layer, mixer, name)
    trace = {}
    bad.forward(ids, trace=trace)
    for reference, first in ((clean, first_own), (phi4flash.reference_to_dump(ref, "p2"), first_ref)):
        c = phi4flash.compare_trace(cfg, trace, reference, ATOL)
        assert c.first == first, (c.first, c.diffs)
        order = list(c.diffs)
        assert all(c.diffs[n] <= ATOL for n in order[:order.index(first)])  # everything before it matches
        assert marked_rows(render(phi4flash.trace_table(cfg, trace, c))) == [str(layer)]


def test_compare_drops_a_batch_axis_and_rejects_other_shapes(model, ref):
    cfg = model.config
    trace = {}
    model.forward(ref["p0_input_ids"], trace=trace)
    batched = {name: x[None] for name, x in trace.items()}
    assert phi4flash.compare_trace(cfg, trace, batched, 0.0).first is None
    with pytest.raises(phi4flash.Phi4FlashError, match=r"ref\.npz: layers\.2\.residual has shape \(5, 32\), the trace has \(5, 64\)"):
        phi4flash.compare_trace(cfg, trace, {"layers.2.residual": trace["layers.2.residual"][:, :32]}, ATOL, where="ref.npz")
    nan = dict(trace, **{"layers.4.mlp_out": np.full_like(trace["layers.4.mlp_out"], np.nan)})
    assert phi4flash.compare_trace(cfg, trace, nan, ATOL).first == "layers.4.mlp_out"  # NaN is never within atol
    c = phi4flash.compare_trace(cfg, trace, {"layer.3.residual": trace["layers.3.residual"], "embed": trace["embed"]}, ATOL)
    assert c.unknown == ["layer.3.residual"] and list(c.diffs) == ["embed"]


def test_attention_probabilities_of_one_head(model, ref):
    cfg = model.config
    W, G = cfg.sliding_window[1], cfg.num_attention_heads // cfg.num_key_value_heads
    ids = ref["p2_input_ids"]
    T = len(ids)
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    for layer, j in ((1, 0), (3, 3), (5, 2), (7, 1)):
        trace = {}
        model.forward(ids, trace=trace, attn_probs=(layer, j))
        maps = trace[f"layers.{layer}.attn_probs"]                        # (2, T, T)
        assert np.allclose(maps.sum(-1), 1.0, atol=1e-5)
        visible = (s <= t) & ((s > t - W) if cfg.sliding_window[layer] else True)
        assert np.all(maps[:, ~visible] == 0) and np.all(maps[:, visible] > 0)
        # re-derived from the mixer input with the striping table: query heads 2j and 2j+1 use K heads
        # 2g and 2g+1, g = j // G; the K/V of a cross layer are layer L/2+1's
        p = model.layers[layer]["attn"]
        u = trace[f"layers.{layer}.mixer_in"]
        q = phi4flash.project_heads(u, p["Wq"], p["bq"], cfg.num_attention_heads)
        k = (trace["shared_k"] if layer > cfg.kv_layer
             else phi4flash.project_heads(u, p["Wk"], p["bk"], cfg.num_key_value_heads))
        g = j // G
        for stripe in (0, 1):
            scores = q[2 * j + stripe] @ k[2 * g + stripe].T / math.sqrt(cfg.head_dim)
            e = np.exp(np.where(visible, scores, -np.inf) - scores.max(-1, keepdims=True))
            assert np.abs(maps[stripe] - e / e.sum(-1, keepdims=True)).max() < 1e-5


def test_attention_probabilities_over_several_query_blocks(model):
    """Past 256 queries attend() slices keys per block; the maps are still whole (T, T) rows."""
    ids = np.random.default_rng(5).integers(0, 500, 300)
    W = model.config.sliding_window[1]
    trace = {}
    model.forward(ids, trace=trace, attn_probs=(1, 2))
    maps = trace["layers.1.attn_probs"]
    t, s = np.arange(300)[:, None], np.arange(300)[None, :]
    assert np.allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(maps[:, (s > t) | (s <= t - W)] == 0)


def test_attn_probs_must_name_an_attention_layer_and_head(model):
    with pytest.raises(phi4flash.Phi4FlashError, match=r"layer 2 is not an attention layer \(those are \[1, 3, 5, 7\]\)"):
        model.forward([1, 2], trace={}, attn_probs=(2, 0))
    with pytest.raises(phi4flash.Phi4FlashError, match="head 4 is out of range; a layer has 4 differential heads"):
        model.forward([1, 2], trace={}, attn_probs=(1, 4))


# ----------------------------------------------------------------------------------------------
# The command line

def run_cli(*args, cache):
    env = dict(os.environ, PHI4FLASH_CACHE=str(cache), COLUMNS="200")
    return subprocess.run([sys.executable, os.path.join(ROOT, "phi4flash.py"), "trace", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def perturbed_folder(converted, dst, name, scale=0.05, seed=0):
    """A copy of a converted folder whose bf16 tensor `name` is rewritten in place with noise: a
    'port' with one planted bug, as the CLI would meet it."""
    shutil.copytree(converted, dst)
    path = os.path.join(dst, "model.safetensors")
    header, _, start = phi4flash.read_safetensors_header(path)
    info = header[name]
    assert info["dtype"] == "BF16"
    begin, end = info["data_offsets"]
    with open(path, "r+b") as f:
        f.seek(start + begin)
        w = phi4flash.bf16_to_f32(np.frombuffer(f.read(end - begin), np.uint16))
        noise = np.random.default_rng(seed).standard_normal(w.shape).astype(np.float32)
        f.seek(start + begin)
        f.write(convert.f32_to_bf16(w + scale * float(np.abs(w).mean()) * noise).tobytes())
    return str(dst)


def test_cli_traces_a_snapshot_and_saves_the_dump(model, ref, tmp_path):
    ids = ref["p1_input_ids"]
    dump = tmp_path / "dump.npz"
    r = run_cli(TINY, "--ids", ",".join(map(str, ids)), "--save", dump, "--attn-probs", "3,1", cache=tmp_path / "cache")
    cache = tmp_path / "cache"
    assert r.returncode == 0 and r.stderr.startswith(f"note: converting {TINY} once into {cache}") and r.stderr.count("\n") == 1, r.stderr
    rows = [line.split("│")[1].strip() for line in r.stdout.splitlines() if line.startswith("│")]
    assert rows == ["embed", *map(str, range(8)), "norm", "head"]
    saved = np.load(dump)
    trace = {}
    logits = model.forward(ids, trace=trace, attn_probs=(3, 1))
    assert set(saved.files) == set(trace) | {"input_ids"} and saved["input_ids"].tolist() == ids.tolist()
    assert np.allclose(saved["logits"], logits, atol=1e-6, rtol=0)
    assert np.allclose(saved["layers.3.attn_probs"], trace["layers.3.attn_probs"], atol=1e-6, rtol=0)


def test_cli_prompt_text_is_tokenized_without_a_template(model, tmp_path):
    dump = tmp_path / "dump.npz"
    r = run_cli(TINY, "--prompt", "hello world", "--save", dump, cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert np.load(dump)["input_ids"].tolist() == model.encode("hello world")


def test_cli_compare_pinpoints_a_planted_bug(converted, ref, tmp_path):
    reference = tmp_path / "p2-reference.npz"
    dump = phi4flash.reference_to_dump(ref, "p2")
    np.savez(reference, **dump, **{"layer.3.residual": dump["layers.3.residual"]})  # one misspelt name
    ids = ",".join(map(str, ref["p2_input_ids"]))
    good = run_cli(converted, "--ids", ids, "--compare", reference, cache=tmp_path / "cache")
    assert good.returncode == 0, good.stderr
    assert marked_rows(good.stdout) == [] and "all within atol 0.0001" in good.stdout
    assert f"warning: 1 arrays of {reference} are not in this trace and were ignored: layer.3.residual" in good.stdout
    assert "14 tensors compared, 24 not in the reference (skipped)" in good.stdout

    port = perturbed_folder(converted, tmp_path / "port", "layers.3.attn.out_proj")
    bad = run_cli(port, "--ids", ids, "--compare", reference, cache=tmp_path / "cache")
    assert bad.returncode == 1 and bad.stderr == ""
    assert marked_rows(bad.stdout) == ["3"]
    assert bad.stdout.rstrip().splitlines()[-1].startswith("FIRST over atol 0.0001: layers.3.residual (max|diff| ")

    # the same bug against our own clean dump, which has every name: the mixer output is the culprit
    clean = tmp_path / "clean.npz"
    assert run_cli(converted, "--ids", ids, "--save", clean, cache=tmp_path / "cache").returncode == 0
    bad = run_cli(port, "--ids", ids, "--compare", clean, "--atol", "1e-6", cache=tmp_path / "cache")
    assert bad.returncode == 1 and marked_rows(bad.stdout) == ["3"]
    assert "FIRST over atol 1e-06: layers.3.mixer_out" in bad.stdout


def test_cli_bad_input_is_one_line_without_a_traceback(tmp_path):
    r = run_cli(TINY, "--ids", "5,x,7", cache=tmp_path / "cache")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: --ids '5,x,7': expected comma-separated token ids, like 5,68,417\n"  # before any conversion
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("args,message", [
    (["MISSING", "--ids", "1"], "error: MODEL MISSING: not a folder"),
    (["{conv}", "--ids", "1,2,600"], "error: ids: token id 600 is outside the vocabulary [0, 512)"),
    (["{conv}", "--ids", ","], "error: --ids: no token ids given"),
    (["{conv}", "--ids", "1,2", "--atol", "1e-3"], "error: --atol: only meaningful with --compare"),
    (["{conv}", "--ids", "1,2", "--compare", "{ref}", "--atol", "-1"], "error: --atol -1.0: expected a number >= 0"),
    (["{conv}", "--ids", "1,2", "--compare", "{tmp}/none.npz"], "error: --compare {tmp}/none.npz: no such file"),
    (["{conv}", "--ids", "1,2", "--compare", "{conv}/tokenizer.json"], "error: --compare {conv}/tokenizer.json: not a .npz"),
    (["{conv}", "--ids", "1,2", "--compare", "{ref}"], "error: --compare {ref}: made from other token ids (5 tokens"),
    (["{conv}", "--ids", "4,62,383,3,2", "--compare", "{short}"],
     "error: --compare {short}: layers.0.residual has shape (3, 64), the trace has (5, 64)"),
    (["{conv}", "--ids", "1,2", "--compare", "{fixture}"], "error: --compare {fixture}: no array has a trace name"),
    (["{conv}", "--ids", "1,2", "--attn-probs", "0,0"], "error: attn_probs: layer 0 is not an attention layer"),
    (["{conv}", "--ids", "1,2", "--attn-probs", "1"], "error: --attn-probs '1': expected LAYER,HEAD"),
    (["{conv}", "--ids", "1,2", "--save", "{tmp}/no/such/dir/d.npz"], "error: --save {tmp}/no/such/dir/d.npz: cannot write it"),
])
def test_cli_errors(converted, ref, tmp_path, capsys, args, message):
    p0 = phi4flash.reference_to_dump(ref, "p0")
    np.savez(tmp_path / "ref.npz", **p0)
    np.savez(tmp_path / "short.npz", **{"layers.0.residual": p0["layers.0.residual"][:3]})
    paths = {"conv": converted, "tmp": str(tmp_path), "ref": str(tmp_path / "ref.npz"),
             "short": str(tmp_path / "short.npz"), "fixture": os.path.join(TINY, "reference.npz")}
    code = phi4flash.main(["trace", *(a.format(**paths) for a in args)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(message.format(**paths)) and err.count("\n") == 1, err


@pytest.mark.parametrize("what", ["missing", "a file", "repo id", "broken snapshot"])
def test_cli_model_folder_errors_are_one_line(tmp_path, what):
    """Run as a script, phi4flash.py is __main__ while convert.py imports phi4flash: the two must be
    one module, or convert's Phi4FlashError escapes main() as a traceback."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    model = {"missing": tmp_path / "none", "a file": os.path.join(ROOT, "README.md"),
             "repo id": "nobody/no-such-model", "broken snapshot": broken}[what]
    r = run_cli(model, "--ids", "1,2", cache=tmp_path / "cache")
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(model) in r.stderr


def test_cli_ctrl_c_is_a_clean_one_line_stop(tmp_path):
    """SIGINT while the forward runs: one line, exit 130, no dump left behind."""
    import signal
    import time
    from conftest import copy_snapshot
    long_context = tmp_path / "long-context"  # the tiny model with a 32K context: forward refuses ids past it
    convert.convert(copy_snapshot(tmp_path / "snapshot", max_position_embeddings=32768), str(long_context))
    ids = ",".join(["5", "68", "417"] * 8000)                                 # a forward of a few seconds
    dump = tmp_path / "dump.npz"
    env = dict(os.environ, PHI4FLASH_CACHE=str(tmp_path / "cache"))
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "phi4flash.py"), "trace", str(long_context), "--ids", ids,
                          "--save", str(dump)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(2.0)
    assert p.poll() is None, "the forward finished before the signal: make it longer"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "interrupted: nothing was saved\n", err
    assert not any(f.startswith("dump") for f in os.listdir(tmp_path))
