"""int8 weights and the bf16 K/V cache (phi4flash.py section 11, convert.py --dtype int8): the
format exactly as its formula says, the compiled product against its NumPy twin, the model's int8 and
bf16-K/V paths against fp32 computations over the same numbers, cached decoding against full
recompute, and one line for every damaged file or bad option. Work and numbers only, no timings.

Tolerances:
* implementation (the compiled product vs its float64 twin, a model vs fp32 over the same numbers):
  only the order of fp32 sums differs, ~K·2⁻²⁴ relative; 1e-5 as for bf16 (tests/test_cpu_bf16.py).
* cached decoding vs full recompute: 1e-4 on O(1) logits, as tests/test_cache.py.
* the formats' own error (against the exact fp32 computation over the checkpoint's bf16 weights):
  sanity bounds that catch a wrong axis or scale, not quality: relative RMSE of the logits <= 8e-2
  for int8 weights, <= 1e-2 for the bf16 K/V (measured 3.6e-2 and 2.8e-3 on these random weights).
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

import convert
import phi4flash as pf
from conftest import PROMPTS, ROOT, TINY, copy_snapshot, write_safetensors

numba = pytest.importorskip("numba", reason="numba is not installed: only the NumPy int8 path can be tested")


@pytest.fixture(scope="session")
def model_kv16(converted):
    return pf.load(converted, kv_dtype="bfloat16")


def relative(got, want):
    return float(np.abs(got.astype(np.float64) - want).max() / max(1e-30, np.abs(want).max()))


def rel_rmse(got, want):
    return float(np.sqrt(np.mean((got.astype(np.float64) - want) ** 2) / np.mean(np.asarray(want, np.float64) ** 2)))


def random_int8(rng, out, inp):
    """An Int8Weight as quantize_int8 makes it from Gaussian rows, a few with an outlier."""
    w = rng.standard_normal((out, inp)).astype(np.float32)
    w[::7, ::13] *= 40
    return pf.Int8Weight(*pf.quantize_int8(w))


def dequantized(model):
    """The same model with every Int8Weight replaced by its fp32 matrix q · s: the fp32 computation
    over the numbers the int8 file holds."""
    fp32 = lambda a: pf.dequantize_int8(a.q, a.scales) if isinstance(a, pf.Int8Weight) else a  # noqa: E731
    layers = [{part: {k: fp32(a) for k, a in group.items()} for part, group in layer.items()} for layer in model.layers]
    return dataclasses.replace(model, embed_tokens=fp32(model.embed_tokens), layers=layers)


def greedy(model, ids, n):
    logits, cache = model.prefill(ids)
    out, rows = [], [logits]
    for _ in range(n):
        out.append(int(np.argmax(rows[-1])))
        rows.append(model.step(cache, out[-1]))
    return out, np.array(rows)


# ----------------------------------------------------------------------------------------------
# The format

def test_quantize_int8_is_the_formula_group_by_group():
    """s = max|w| / 127 and q = round(w / s), computed here one group at a time in plain fp32: an
    outlier spoils only its own group, a group of zeros gets s = 0, the largest weight maps to ±127."""
    rng = np.random.default_rng(0)
    w = (0.02 * rng.standard_normal((3, 96))).astype(np.float32)
    w[0, 40] = -3.0                      # an outlier in group 1 of row 0
    w[1, 64:96] = 0.0                    # a group of zeros
    q, scales = pf.quantize_int8(w)
    assert q.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == (3, 3)
    for r in range(3):
        for g in range(3):
            group = w[r, 32 * g:32 * (g + 1)]
            s = np.float32(np.abs(group).max()) / np.float32(127)
            assert scales[r, g] == s
            want = np.rint(group / s) if s > 0 else np.zeros(32)
            assert np.array_equal(q[r, 32 * g:32 * (g + 1)], want.astype(np.int8)), (r, g)
    assert q[0, 40] == -127 and np.abs(q).max() == 127 and not q[1, 64:].any() and scales[1, 2] == 0
    error = np.abs(pf.dequantize_int8(q, scales) - w)
    assert error[0, 32:64].max() > 1e-2 > error[0, :32].max() * 10   # the outlier's group only is coarse
    assert (error <= scales.repeat(32, axis=1) / 2 * (1 + 1e-6)).all()  # off by at most s/2


def test_converted_int8_file_holds_the_formula_exactly(converted_int8):
    """Every matrix of the int8 conversion, value by value and scale by scale, equals the formula
    applied to the snapshot's own bf16 weights; vectors are their exact fp32 widening."""
    src, _ = pf.read_safetensors(os.path.join(TINY, "model.safetensors"))
    ours, meta = pf.read_safetensors(os.path.join(converted_int8, "model.safetensors"))
    assert meta["weights_dtype"] == "int8" and meta["format_version"] == "2"
    cfg = pf.read_converted(os.path.join(converted_int8, "model.safetensors"))[0]
    seen = 0
    for piece in convert.conversion_plan(cfg):
        w = pf.f32(src[piece.theirs][piece.r0:piece.r1]).reshape(ours[piece.ours].shape)
        if not piece.matrix:
            assert ours[piece.ours].dtype == np.float32 and np.array_equal(ours[piece.ours], w), piece.ours
        elif w.shape[1] % 32:
            assert ours[piece.ours].dtype == np.uint16 and np.array_equal(pf.f32(ours[piece.ours]), w), piece.ours
        else:
            groups = w.reshape(w.shape[0], -1, 32)
            s = np.abs(groups).max(-1) / np.float32(127)
            q = np.rint(groups / np.where(s > 0, s, 1)[..., None]).reshape(w.shape)
            assert np.array_equal(ours[piece.ours + ".scales"], s), piece.ours
            assert ours[piece.ours].dtype == np.int8 and np.array_equal(ours[piece.ours], q), piece.ours
            seen += 1
    assert seen == 59  # 62 matrices, the 3 dt_proj (input width 4) stay bf16


def test_converter_names_the_matrices_that_stay_bf16(tmp_path, capsys):
    convert.convert(TINY, tmp_path / "a", dtype="int8")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 of the 62 matrices stay bf16" in err and "layers.0.mamba.dt_proj" in err
    convert.convert(TINY, tmp_path / "b", dtype="bfloat16")
    assert capsys.readouterr().err == ""


def test_int8_sizes_of_the_real_model():
    from synthetic import REAL_CONFIG
    cfg = convert.config_from_hf(REAL_CONFIG)
    plan = convert.conversion_plan(cfg)
    size = convert.planned_bytes(cfg, plan, "int8")
    params = sum(int(np.prod(s)) for s in pf.tensor_shapes(cfg).values())
    matrices = sum(int(np.prod(pf.tensor_shapes(cfg)[p.ours])) for p in plan if p.matrix)
    assert convert.size_text(size) == "4.3 GB" and convert.stays_bf16(cfg, plan, "int8") == []
    assert size - 4 * (params - matrices) == pytest.approx(1.125 * matrices, abs=1e6)  # 1 byte + 4 per 32


# ----------------------------------------------------------------------------------------------
# The compiled product

@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 16, 32])
@pytest.mark.parametrize("out,inp", [(37, 64), (1, 32), (64, 96), (129, 2560), (256, 10240)])
def test_compiled_int8_product_equals_its_twin_and_linear_on_the_dequantized_matrix(rows, out, inp):
    rng = np.random.default_rng(rows * 1000 + out + inp)
    W = random_int8(rng, out, inp)
    x = rng.standard_normal((rows, inp)).astype(np.float32)
    assert pf.compiled_gemv_int8() is not None
    got = pf.linear(x, W)                                                 # rows <= CPU_GEMV_ROWS: compiled
    assert got.shape == (rows, out) and got.dtype == np.float32
    assert relative(got, pf.gemv_int8_reference(x, W.q, W.scales)) < 1e-5
    assert relative(got, pf.linear(x, pf.dequantize_int8(W.q, W.scales))) < 1e-5   # fp32 BLAS on q · s


def test_compiled_int8_product_at_the_real_head_shape():
    """The tied head, 200064 x 2560: zero pages except three slices of random rows (first, middle,
    last), so the highest output index and its scales are exercised."""
    q, scales = np.zeros((200064, 2560), np.int8), np.zeros((200064, 80), np.float32)
    rng = np.random.default_rng(7)
    slices = [slice(0, 40), slice(100_000, 100_033), slice(200_064 - 31, 200_064)]
    for s in slices:
        part = random_int8(rng, s.stop - s.start, 2560)
        q[s], scales[s] = part.q, part.scales
    x = rng.standard_normal((3, 2560)).astype(np.float32)
    y = pf.linear(x, pf.Int8Weight(q, scales))
    for s in slices:
        assert relative(y[:, s], pf.gemv_int8_reference(x, q[s], scales[s])) < 1e-5
    assert not y[:, 40:100_000].any()


def test_many_rows_and_no_numba_take_the_dequantized_blocks(monkeypatch):
    rng = np.random.default_rng(3)
    W = random_int8(rng, 300, 96)
    x = rng.standard_normal((pf.CPU_GEMV_ROWS + 1, 96)).astype(np.float32)
    assert relative(pf.linear(x, W), pf.gemv_int8_reference(x, W.q, W.scales)) < 1e-5
    assert relative(pf.int8_matmul_blocks(x[:5], W), pf.gemv_int8_reference(x[:5], W.q, W.scales)) < 1e-5
    monkeypatch.setattr(pf, "_nb", False)                                # as PHI4FLASH_NUMBA=0
    assert pf.compiled_gemv_int8() is None
    assert relative(pf.linear(x[:1], W), pf.gemv_int8_reference(x[:1], W.q, W.scales)) < 1e-5


def test_embedding_lookup_dequantizes_the_rows(model_int8):
    E = model_int8.embed_tokens
    rows = E[np.array([5, 68, 5])]
    assert rows.shape == (3, 64) and rows.dtype == np.float32
    assert np.array_equal(rows[0], E.q[5] * np.repeat(E.scales[5], 32)) and np.array_equal(rows[0], rows[2])


# ----------------------------------------------------------------------------------------------
# The model on int8 weights and on the bf16 K/V

@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_int8_model_equals_fp32_over_the_dequantized_weights(model_int8, ref, monkeypatch, path):
    """Forward over each prompt (5 and 23 tokens: the compiled product; 41: the blocks) and 20
    greedy steps through the cache, against the same model with q · s as fp32 matrices."""
    if path == "numpy":
        monkeypatch.setattr(pf, "_nb", False)
    exact = dequantized(model_int8)
    for p in PROMPTS:
        ids = ref[f"{p}_input_ids"]
        assert relative(model_int8.forward(ids), exact.forward(ids)) <= 1e-5, p
        ours, theirs = greedy(model_int8, ids, 20), greedy(exact, ids, 20)
        assert ours[0] == theirs[0] and relative(ours[1], theirs[1]) <= 1e-5, p


def test_bf16_kv_equals_fp32_over_the_rounded_kv(model, model_kv16, ref, monkeypatch):
    """The bf16 cache against a float32 cache whose K/V are rounded the same way but kept fp32: the
    NumPy attention (prefill) and the compiled one reading bf16 bits (decode) against fp32 reads."""
    rounded = dataclasses.replace(model)                                  # same weights, float32 K/V
    stored = pf.kv_stored
    monkeypatch.setattr(pf, "kv_stored", lambda kv, k, v: (
        (pf.bf16_to_f32(pf.f32_to_bf16(k)), pf.bf16_to_f32(pf.f32_to_bf16(v))) if kv.k.dtype == np.float32
        else stored(kv, k, v)))
    for p in PROMPTS:
        ids = ref[f"{p}_input_ids"]
        assert relative(model_kv16.forward(ids), rounded.forward(ids)) <= 1e-5, p
        ours, theirs = greedy(model_kv16, ids, 20), greedy(rounded, ids, 20)
        assert ours[0] == theirs[0] and relative(ours[1], theirs[1]) <= 1e-5, p


def test_the_bf16_cache_holds_bits_and_grows_as_bits(model_kv16):
    cache = model_kv16.new_cache(2)
    assert all(kv.k.dtype == np.uint16 and kv.v.dtype == np.uint16 for kv in cache.kv.values())
    model_kv16.prefill(np.arange(5, 30), cache)                           # the shared buffer doubles
    shared = cache.shared(model_kv16.config)
    assert shared.k.dtype == np.uint16 and shared.k.shape[1] >= 25 and shared.length == 25
    trace = {}
    model_kv16.forward([5, 68, 417], trace=trace)
    assert trace["shared_k"].dtype == np.float32                          # traced widened
    assert np.array_equal(pf.bf16_to_f32(pf.f32_to_bf16(trace["shared_k"])), trace["shared_k"])  # bf16 values


@pytest.mark.parametrize("H,H_kv,hd,S", [(8, 4, 8, 13), (16, 8, 64, 300), (40, 20, 64, 700)])
def test_compiled_attention_reads_bf16_bits(H, H_kv, hd, S):
    rng = np.random.default_rng(S)
    q = rng.standard_normal((H, 1, hd)).astype(np.float32)
    kbuf, vbuf = (pf.f32_to_bf16(rng.standard_normal((H_kv, S + 5, hd)).astype(np.float32)) for _ in range(2))
    subln = rng.standard_normal(2 * hd).astype(np.float32)
    mask = np.ones((1, S), bool)
    mask[0, :S // 4] = False
    want = pf.differential_attention(q, pf.bf16_to_f32(kbuf[:, :S]), pf.bf16_to_f32(vbuf[:, :S]), mask, 0.3, 0.55, subln)
    got = pf.attention_row(q, kbuf[:, :S], vbuf[:, :S], mask, 0.3, 0.55, subln, 1e-5)
    assert np.abs(got - want).max() < 1e-5
    assert np.abs(pf.differential_attention(q, kbuf[:, :S], vbuf[:, :S], mask, 0.3, 0.55, subln) - want).max() == 0


@pytest.mark.parametrize("option", ["int8", "kv16", "int8+kv16"])
def test_cached_decoding_equals_full_recompute(converted, converted_int8, ref, option):
    """64 greedy steps after each prompt, past several windows of 8: every step's logits against a
    full forward over the same tokens, with the same option both ways, and, with the bf16 K/V, the
    cache the steps built against the one a prefill of all the tokens builds.

    int8 weights: 1e-4, as fp32 (only the fp32 rounding of sums differs between the two paths). bf16
    K/V: both paths store the same rounded K/V, except where an element's fp32 value lies within that
    fp32 noise of a bf16 rounding boundary: it rounds to the neighbouring bf16 value (2⁻⁸ relative
    apart), and the layers after it see slightly different inputs. Measured here: up to 2 % of the
    shared K/V's elements differ, by at most 2.8e-3 of its largest, and the logits by 1.1e-3 (int8 +
    bf16 K/V, p0); asserted: under 5 %, under 1e-2, logits within 3e-3, the same ids."""
    model = pf.load(converted_int8 if "int8" in option else converted,
                    kv_dtype="bfloat16" if "kv16" in option else "float32")
    for p in PROMPTS:
        ids = list(ref[f"{p}_input_ids"])
        tokens, rows = greedy(model, ids, 64)
        full = model.forward(ids + tokens)
        assert tokens == [int(t) for t in np.argmax(full[len(ids) - 1:-1], -1)], p
        assert np.abs(rows[:-1] - full[len(ids) - 1:-1]).max() <= (3e-3 if "kv16" in option else 1e-4), p
        if "kv16" not in option:
            continue
        _, stepped = model.prefill(ids)
        for t in tokens:
            model.step(stepped, t)
        _, recomputed = model.prefill(ids + tokens)
        for i, kv in stepped.kv.items():
            n = kv.length if kv.window is None else kv.k.shape[1]
            for a, b in ((kv.k, recomputed.kv[i].k), (kv.v, recomputed.kv[i].v)):
                a, b = pf.bf16_to_f32(a[:, :n]), pf.bf16_to_f32(b[:, :n])
                assert (a != b).mean() < 0.05 and np.abs(a - b).max() < 1e-2 * np.abs(b).max(), (p, i)


def test_the_formats_error_is_within_the_sanity_bounds(model, model_int8, model_kv16, ref):
    """Against the exact fp32 computation over the checkpoint's bf16 weights. Not a quality claim:
    random weights give flat logits (see notes/11-quantization.md for the measured numbers)."""
    for p in PROMPTS:
        ids = ref[f"{p}_input_ids"]
        exact = model.forward(ids)
        assert 1e-3 < rel_rmse(model_int8.forward(ids), exact) <= 8e-2, p
        assert 1e-5 < rel_rmse(model_kv16.forward(ids), exact) <= 1e-2, p


def test_f32_to_bf16_rounds_to_nearest_even_and_keeps_nan():
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -2.5, np.inf, -np.inf, 3.4e38],
                 np.float32)
    assert pf.bf16_to_f32(pf.f32_to_bf16(x)).tolist() == [1.0, 1.0, 1 + 4 * 2 ** -8, 1 + 2 ** -7, -2.5, np.inf,
                                                           -np.inf, np.inf]
    nans = np.array([0x7F800001, 0xFFFFFFFF, 0x7FC00000, 0xFF800001], np.uint32).view(np.float32)
    assert np.isnan(pf.bf16_to_f32(pf.f32_to_bf16(nans))).all()
    assert pf.f32_to_bf16(nans[1:2]).item() >> 15 == 1                   # the sign is kept


# ----------------------------------------------------------------------------------------------
# Bad files and options: one line naming the tensor or the option

def rewrite(converted_int8, dst, edit, metadata=None):
    """A copy of the int8 conversion with its tensors edited by edit({name: array}) -> {name: array}."""
    shutil.copytree(converted_int8, dst)
    tensors, meta = pf.read_safetensors(os.path.join(converted_int8, "model.safetensors"))
    tensors = edit({k: np.array(v) for k, v in tensors.items()})
    kinds = {np.dtype(np.int8): "I8", np.dtype(np.uint16): "BF16", np.dtype(np.float32): "F32"}
    write_raw(os.path.join(dst, "model.safetensors"), tensors, {k: kinds[a.dtype] for k, a in tensors.items()},
              {**meta, **(metadata or {})})
    return str(dst)


def write_raw(path, tensors, dtypes, metadata):
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtypes[name], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


NAME = "layers.1.mlp.fc2"


@pytest.mark.parametrize("edit, metadata, words", [
    (lambda t: {k: v for k, v in t.items() if k != NAME + ".scales"}, None, f"tensor {NAME}.scales is missing"),
    (lambda t: {**t, NAME + ".scales": t[NAME + ".scales"][:, :2]}, None,
     f"tensor {NAME}.scales is F32 (64, 2), expected F32 (64, 4)"),
    (lambda t: {**t, NAME + ".scales": t[NAME + ".scales"].astype(np.uint16)}, None,
     f"tensor {NAME}.scales is BF16 (64, 4), expected F32 (64, 4)"),
    (lambda t: {**t, NAME: pf.f32_to_bf16(t[NAME].astype(np.float32))}, None,
     f"tensor {NAME} is BF16 (64, 128), expected I8 (64, 128)"),
    (lambda t: t, {"weights_dtype": "bfloat16"}, "tensor embed_tokens.weight is I8 (512, 64), expected BF16 (512, 64)"),
    (lambda t: t, {"weights_dtype": "int4"}, "its matrices are stored as 'int4'; this code reads bfloat16, float32, int8"),
    (lambda t: t, {"format_version": "1"}, None),    # read as version 1: a valid int8 file is still what its metadata says
])
def test_a_damaged_int8_file_is_one_line_naming_the_tensor(converted_int8, tmp_path, edit, metadata, words):
    folder = rewrite(converted_int8, tmp_path / "m", edit, metadata)
    if words is None:
        assert isinstance(pf.load(folder).embed_tokens, pf.Int8Weight)
        return
    with pytest.raises(pf.Phi4FlashError) as e:
        pf.load(folder)
    assert words in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(os.path.join(folder, "model.safetensors"))


def test_a_truncated_int8_file_and_an_unknown_tensor_dtype(converted_int8, tmp_path):
    folder = shutil.copytree(converted_int8, tmp_path / "t")
    file = os.path.join(folder, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 100)
    with pytest.raises(pf.Phi4FlashError, match=r"model\.safetensors: truncated: tensor layers\.7\.[\w.]+ ends at byte \d+, the file has \d+$"):
        pf.load(folder)
    raw = open(os.path.join(converted_int8, "model.safetensors"), "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + n].replace(b'"I8"', b'"I4"', 1)
    with open(file, "wb") as f:
        f.write(raw[:8] + header + raw[8 + n:])
    with pytest.raises(pf.Phi4FlashError, match=r"tensor embed_tokens\.weight has dtype I4; expected one of F32, F16, BF16, I8"):
        pf.load(folder)


def test_a_source_weight_that_int8_cannot_hold_is_one_line(tmp_path):
    src = copy_snapshot(tmp_path / "src")
    tensors, _ = pf.read_safetensors(os.path.join(src, "model.safetensors"))
    tensors = {k: pf.f32(v).copy() for k, v in tensors.items()}
    tensors["model.layers.3.mlp.fc2.weight"][10, 7] = np.nan
    write_safetensors(os.path.join(src, "model.safetensors"), tensors, {k: "F32" for k in tensors})
    with pytest.raises(pf.Phi4FlashError, match=r"tensor model\.layers\.3\.mlp\.fc2\.weight has a NaN or infinite "
                                                r"weight in rows 0\.\.63; int8 cannot store it"):
        convert.convert(src, tmp_path / "dst", dtype="int8")
    assert sorted(os.listdir(tmp_path)) == ["src"]                        # nothing left behind
    convert.convert(src, tmp_path / "dst", dtype="bfloat16")              # bf16 stores it as it is


@pytest.mark.parametrize("kwargs, words", [
    ({"kv_dtype": "fp8"}, "kv_dtype 'fp8': expected 'float32' or 'bfloat16'"),
    ({"kv_dtype": None}, "kv_dtype None: expected 'float32' or 'bfloat16'"),
    ({"device": "tpu"}, "device 'tpu': expected 'cpu' or 'cuda'"),
])
def test_load_options_are_checked_in_one_line(converted, kwargs, words):
    with pytest.raises(pf.Phi4FlashError) as e:
        pf.load(converted, **kwargs)
    assert str(e.value) == words


def test_the_gpu_takes_int8_weights_and_the_bf16_kv(model_int8, model_kv16, monkeypatch):
    """to_device (NumPy standing in for CuPy) keeps every Int8Weight an Int8Weight, int8 values and
    float32 scales, fuses them as row views of one matrix, and dequantises dt_proj for the scan. The
    bf16 K/V goes to the device too (its kernels write and read the bits): to_device keeps the option."""
    monkeypatch.setattr(pf, "require_cupy", lambda: np)
    layers = [{g: dict(p) for g, p in layer.items()} for layer in model_int8.layers]
    gpu = pf.to_device(dataclasses.replace(model_int8, layers=layers))
    assert gpu.device == "cuda" and isinstance(gpu.embed_tokens, pf.Int8Weight)
    for i, group, whole, parts in ((1, "attn", "Wqkv", ("Wq", "Wk", "Wv")), (0, "mamba", "in_proj", ("in_proj_x", "in_proj_z"))):
        fused, start = gpu.layers[i][group][whole], 0
        assert isinstance(fused, pf.Int8Weight) and fused.q.dtype == np.int8 and fused.scales.dtype == np.float32
        for name in parts:
            view, old = gpu.layers[i][group][name], model_int8.layers[i][group][name]
            assert view.q.base is fused.q and np.array_equal(view.q, fused.q[start:start + view.shape[0]])
            assert np.array_equal(view.q, old.q) and np.array_equal(view.scales, old.scales)
            start += view.shape[0]
        assert start == fused.shape[0]
    mamba = gpu.layers[0]["mamba"]
    assert mamba["dt_proj"].dtype == np.float32
    gpu = pf.to_device(dataclasses.replace(model_kv16))
    assert gpu.device == "cuda" and gpu.kv_dtype == "bfloat16" and gpu.new_cache(4).kv[1].k.dtype == np.uint16


# ----------------------------------------------------------------------------------------------
# The command lines

def test_convert_and_chat_take_int8_and_the_bf16_kv(tmp_path):
    env = dict(os.environ, PHI4FLASH_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), TINY, str(tmp_path / "c8"), "--dtype", "int8"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("parameters, int8"), r.stderr
    chat = [sys.executable, os.path.join(ROOT, "chat.py")]
    one = subprocess.run(chat + [str(tmp_path / "c8"), "--kv-dtype", "bfloat16", "--temp", "0", "-n", "8", "--prompt", "hi"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 0 and one.stdout.strip(), one.stderr
    snap = subprocess.run(chat + [TINY, "--dtype", "int8", "--temp", "0", "-n", "4", "--prompt", "hi"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert snap.returncode == 0, snap.stderr
    entries = os.listdir(tmp_path / "cache")
    assert len(entries) == 1
    info = json.load(open(tmp_path / "cache" / entries[0] / convert.SOURCE_FILE))
    assert info["dtype"] == "int8" and isinstance(pf.load(tmp_path / "cache" / entries[0]).embed_tokens, pf.Int8Weight)
    bad = subprocess.run(chat + [TINY, "--kv-dtype", "fp8", "--prompt", "hi"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--kv-dtype" in bad.stderr
