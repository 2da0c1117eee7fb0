"""convert.py: layouts it accepts, what it writes, and one clear line for every bad input."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import convert
import phi4flash
from conftest import ROOT, TINY, copy_snapshot, random_snapshot, write_safetensors


def run_convert(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def read_hf(path):
    tensors, _ = phi4flash.read_safetensors(path)
    return {k: phi4flash.f32(v) for k, v in tensors.items()}


def test_converted_folder_contents(converted):
    names = sorted(os.listdir(converted))
    assert names == ["generation_config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json"]
    header, meta, start = phi4flash.read_safetensors_header(os.path.join(converted, "model.safetensors"))
    assert meta["format"] == "phi4flash" and meta["format_version"] == "1"  # bf16: the version older readers know
    assert json.loads(meta["config"])["sliding_window"] == [None, 8, None, 8, None, None, None, None]
    assert start % 64 == 0
    assert header["layers.0.mlp.fc1_gate"]["dtype"] == "BF16" and header["layers.0.mamba.A_log"]["dtype"] == "F32"


def test_official_safetensors_reads_our_file(tmp_path):
    """Our writer is checked by the reference library (which has no NumPy bf16, hence float32 here)."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    dst = tmp_path / "f32"
    convert.convert(TINY, dst, dtype="float32")
    theirs = safetensors_numpy.load_file(str(dst / "model.safetensors"))
    ours, _ = phi4flash.read_safetensors(str(dst / "model.safetensors"))
    assert theirs.keys() == ours.keys()
    assert all(np.array_equal(theirs[k], ours[k]) for k in ours)


def test_split_tensors_are_the_right_rows(converted):
    hf = read_hf(os.path.join(TINY, "model.safetensors"))
    ours = {k: phi4flash.f32(v) for k, v in phi4flash.read_safetensors(os.path.join(converted, "model.safetensors"))[0].items()}
    F, E, R, N = 128, 128, 4, 16
    fc1, in_proj = hf["model.layers.0.mlp.fc1.weight"], hf["model.layers.0.attn.in_proj.weight"]
    assert np.array_equal(ours["layers.0.mlp.fc1_gate"], fc1[:F]) and np.array_equal(ours["layers.0.mlp.fc1_up"], fc1[F:])
    assert np.array_equal(ours["layers.0.mamba.in_proj_z"], in_proj[E:])
    x_proj = hf["model.layers.2.attn.x_proj.weight"]
    assert np.array_equal(ours["layers.2.mamba.x_proj_B"], x_proj[R:R + N])
    assert np.array_equal(ours["layers.2.mamba.conv1d_weight"], hf["model.layers.2.attn.conv1d.weight"][:, 0, :])
    wqkv = hf["model.layers.5.attn.Wqkv.weight"]
    assert np.array_equal(ours["layers.5.attn.Wv"], wqkv[96:])
    assert np.array_equal(ours["layers.7.attn.Wq"], hf["model.layers.7.attn.Wqkv.weight"])


def test_sharded_snapshot_converts_to_the_same_file(tmp_path, converted):
    src = copy_snapshot(tmp_path / "sharded")
    tensors = read_hf(os.path.join(src, "model.safetensors"))
    os.remove(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:60], "model-00002-of-00002.safetensors": names[60:]}
    weight_map = {}
    for file, part in halves.items():
        write_safetensors(os.path.join(src, file), {n: tensors[n] for n in part})
        weight_map.update({n: file for n in part})
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, open(os.path.join(src, "model.safetensors.index.json"), "w"))
    convert.convert(src, tmp_path / "out")
    with open(tmp_path / "out" / "model.safetensors", "rb") as a, open(os.path.join(converted, "model.safetensors"), "rb") as b:
        assert a.read() == b.read()


def test_f32_and_f16_source_tensors(tmp_path, model):
    """Source dtypes are read from the header: F32 (e.g. A_log kept wide) and F16 are accepted."""
    src = copy_snapshot(tmp_path / "mixed")
    tensors = read_hf(os.path.join(src, "model.safetensors"))
    dtypes = {n: "F32" for n in tensors if n.endswith(("A_log", ".D", "lambda_q1"))}
    dtypes["model.layers.1.mlp.fc2.weight"] = "F32"
    dtypes["model.layers.3.input_layernorm.bias"] = "F16"  # bf16 values in this range with ≤ 8 bits: exact in f16
    write_safetensors(os.path.join(src, "model.safetensors"), tensors, dtypes)
    convert.convert(src, tmp_path / "out")
    ids = [5, 68, 417, 3, 2]
    assert np.abs(phi4flash.load(tmp_path / "out").forward(ids) - model.forward(ids)).max() < 1e-5


def test_the_model_type_rule():
    """model_type must be 'phi4flash'; architectures, when present, must list Phi4FlashForCausalLM."""
    real = json.load(open(os.path.join(TINY, "config.json")))
    assert convert.config_from_hf(real).num_hidden_layers == 8
    assert convert.config_from_hf({k: v for k, v in real.items() if k != "architectures"}).num_hidden_layers == 8
    for change, words in [({"model_type": "phi3"}, "model_type is 'phi3'"), ({"model_type": None}, "model_type is None"),
                          ({"architectures": ["Phi3ForCausalLM"]}, "architectures is ['Phi3ForCausalLM']"),
                          ({"architectures": "Phi4FlashForCausalLM"}, "expected a list")]:
        with pytest.raises(phi4flash.Phi4FlashError, match=re.escape(words)):
            convert.config_from_hf({**real, **change})


def test_f32_weights_are_rounded_to_nearest_even():
    x = np.array([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, -3.0], np.float32)
    got = phi4flash.bf16_to_f32(convert.f32_to_bf16(x))
    assert got.tolist() == [1.0, 1.0 + 2 ** -6, 1.0 + 2 ** -7, -3.0]


def test_sliding_window_list_and_missing_mamba_keys(tmp_path):
    L = 8
    src = random_snapshot(tmp_path / "list", sliding_window=[None, 8, None, 8, None, None, None, None],
                          mamba_d_state=None, mamba_d_conv=None, mamba_expand=None, mamba_dt_rank=None, mb_per_layer=None)
    cfg = convert.config_from_hf(json.load(open(os.path.join(src, "config.json"))))
    assert (cfg.mamba_d_state, cfg.mamba_d_conv, cfg.mamba_expand, cfg.mamba_dt_rank) == (16, 4, 2, 4)
    assert cfg.sliding_window == (None, 8, None, 8, None, None, None, None) and len(cfg.sliding_window) == L
    convert.convert(src, tmp_path / "out")
    m = phi4flash.load(tmp_path / "out")
    assert m.config.sliding_window[3] == 8


def test_explicit_dt_rank_is_honoured(tmp_path):
    """mamba_dt_rank 6 != ceil(64/16) = 4: the config value sets the shapes, and decoding still equals recompute."""
    src = random_snapshot(tmp_path / "dt6", mamba_dt_rank=6)
    convert.convert(src, tmp_path / "out")
    m = phi4flash.load(tmp_path / "out")
    assert m.layers[0]["mamba"]["dt_proj"].shape == (128, 6)
    seq = [5, 68, 417, 322, 76, 412, 232, 499, 232, 3, 4, 45, 80, 232, 30, 29]
    full = m.forward(seq)
    logits, cache = m.prefill(seq[:4])
    for t in range(4, len(seq)):
        logits = m.step(cache, seq[t])
        assert np.abs(logits - full[t]).max() < 1e-4
    assert convert.config_from_hf({**json.load(open(os.path.join(src, "config.json"))), "mamba_dt_rank": "auto"}).mamba_dt_rank == 4


# ---------------------------------------------------------------------------------------------- bad input

def breaks(tmp_path, how):
    """Make one kind of broken SRC (or DST); -> (src, dst, words the error must contain)."""
    src = copy_snapshot(tmp_path / "src")
    dst = tmp_path / "dst"
    st = os.path.join(src, "model.safetensors")
    if how == "missing shard":
        tensors = read_hf(st)
        os.remove(st)
        names = sorted(tensors)
        write_safetensors(os.path.join(src, "model-00001-of-00002.safetensors"), {n: tensors[n] for n in names[:50]})
        weight_map = {n: "model-00001-of-00002.safetensors" if i < 50 else "model-00002-of-00002.safetensors"
                      for i, n in enumerate(names)}
        json.dump({"weight_map": weight_map}, open(os.path.join(src, "model.safetensors.index.json"), "w"))
        return src, dst, ["model-00002-of-00002.safetensors", "missing shard"]
    if how == "truncated":
        os.truncate(st, os.path.getsize(st) - 1000)
        return src, dst, ["model.safetensors", "truncated"]
    if how in ("wrong model_type", "model_type phi3, Phi4Flash architecture", "Phi3 architecture"):
        copy = json.load(open(os.path.join(src, "config.json")))
        copy.update({"wrong model_type": dict(model_type="phi3", architectures=["Phi3ForCausalLM"]),
                     "model_type phi3, Phi4Flash architecture": dict(model_type="phi3"),
                     "Phi3 architecture": dict(architectures=["Phi3ForCausalLM"])}[how])
        json.dump(copy, open(os.path.join(src, "config.json"), "w"))
        if how == "Phi3 architecture":
            return src, dst, ["config.json", "architectures is ['Phi3ForCausalLM']", "Phi4FlashForCausalLM"]
        return src, dst, ["config.json", "model_type is 'phi3'", "expected 'phi4flash'"]
    tensors = read_hf(st)
    if how == "missing tensor":
        del tensors["model.layers.4.attn.A_log"]
        words = ["model.layers.4.attn.A_log", "missing"]
    elif how == "extra tensor":
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        words = ["lm_head.weight", "unexpected"]
    elif how == "wrong shape":
        tensors["model.layers.3.attn.Wqkv.weight"] = tensors["model.layers.3.attn.Wqkv.weight"][:100]
        words = ["model.layers.3.attn.Wqkv.weight", "[100, 64]", "[128, 64]"]
    elif how == "DST exists":
        os.makedirs(dst)
        open(dst / "keep.txt", "w").write("mine")
        return src, dst, ["already exists", "--force"]
    elif how == "SRC not a folder":
        return st, dst, ["not a folder"]
    elif how == "bad dtype":
        write_safetensors(st, tensors)
        raw = open(st, "rb").read().replace(b'"BF16"', b'"I64X"', 1)
        open(st, "wb").write(raw)
        return src, dst, ["dtype I64X", "F32, F16, BF16"]
    write_safetensors(st, tensors)
    return src, dst, words


CASES = ["missing shard", "truncated", "wrong model_type", "model_type phi3, Phi4Flash architecture", "Phi3 architecture",
         "missing tensor", "extra tensor", "wrong shape",
         "DST exists", "SRC not a folder", "bad dtype"]


@pytest.mark.parametrize("how", CASES)
def test_bad_input_gives_one_clear_line_and_writes_nothing(tmp_path, how):
    src, dst, words = breaks(tmp_path, how)
    before = sorted(os.listdir(tmp_path))
    r = run_convert(src, dst)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert sorted(os.listdir(tmp_path)) == before  # no DST, no partial folder
    if how == "DST exists":
        assert os.listdir(dst) == ["keep.txt"]


def test_force_replaces_an_existing_dst(tmp_path):
    dst = tmp_path / "dst"
    os.makedirs(dst)
    open(dst / "old.txt", "w").write("x")
    r = run_convert(TINY, dst, "--force")
    assert r.returncode == 0, r.stderr
    assert "old.txt" not in os.listdir(dst) and phi4flash.load(dst).config.num_hidden_layers == 8


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def interrupt(raw, *args):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return original(raw, *args)

    original = convert._convert_rows
    monkeypatch.setattr(convert, "_convert_rows", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(TINY, tmp_path / "dst")
    assert os.listdir(tmp_path) == []


def test_load_refuses_other_format_versions_and_raw_checkpoints(tmp_path, converted):
    with pytest.raises(phi4flash.Phi4FlashError, match="run convert.py"):
        phi4flash.load(TINY)
    old = tmp_path / "old"
    os.makedirs(old)
    tensors, meta = phi4flash.read_safetensors(os.path.join(converted, "model.safetensors"))
    write_safetensors(old / "model.safetensors", {k: phi4flash.f32(v) for k, v in tensors.items()}, {k: "F32" for k in tensors},
                      metadata={**meta, "format_version": "0"})
    with pytest.raises(phi4flash.Phi4FlashError, match="format version 0.*convert the original checkpoint again"):
        phi4flash.load(old)
    with pytest.raises(phi4flash.Phi4FlashError, match="no converted model"):
        phi4flash.load(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    os.makedirs(broken)
    write_safetensors(broken / "model.safetensors", {"x": np.zeros(2)}, {"x": "F32"},
                      metadata={"format": "phi4flash", "format_version": phi4flash.FORMAT_VERSION})
    with pytest.raises(phi4flash.Phi4FlashError, match="config in the metadata is missing"):
        phi4flash.load(broken)


def test_resolve_model_converts_a_snapshot_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PHI4FLASH_CACHE", str(tmp_path / "cache"))
    first = convert.resolve_model(TINY)
    mtime = os.path.getmtime(os.path.join(first, "model.safetensors"))
    assert convert.resolve_model(TINY) == first and os.path.getmtime(os.path.join(first, "model.safetensors")) == mtime
    assert convert.resolve_model(first) == first  # a converted folder is used as it is
