"""bf16 weights on a CPU (phi4flash.py section 11): the compiled few-rows product against its NumPy
twin and against float32 weights, the same logits with and without numba, the BLAS thread limit of
a decode step, and flat memory over a long generation. Work and numbers only, no timings.

Tolerances: the kernel sums in fp32 in another order than the float64 twin, so a product over K
inputs is within ~K·2⁻²⁴ of it relative to max|y|; 1e-5 leaves room for K = 10240. Logits from bf16
bits and from their exact fp32 widening differ only by summation order: 1e-5 absolute on O(1)
logits, the project's fp32 parity tolerance divided by 10.
"""
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import phi4flash as pf
from conftest import PROMPTS, ROOT
from test_gpu import greedy_decode, maxdiff

numba = pytest.importorskip("numba", reason="numba is not installed: only the NumPy bf16 path can be tested")


def bf16_bits(a):
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


@pytest.fixture
def numba_off(monkeypatch):
    """The NumPy-only path, as with PHI4FLASH_NUMBA=0 or without numba."""
    monkeypatch.setattr(pf, "_nb", False)


def relative(got, want):
    return float(np.abs(got.astype(np.float64) - want).max() / max(1e-30, np.abs(want).max()))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16, 32])
@pytest.mark.parametrize("out,inp", [(37, 77), (1, 300), (64, 1), (129, 2560), (256, 10240)])
def test_compiled_product_equals_its_twin_and_linear_on_fp32(rows, out, inp):
    rng = np.random.default_rng(rows * 1000 + out + inp)
    W = bf16_bits(rng.standard_normal((out, inp)))
    x = rng.standard_normal((rows, inp)).astype(np.float32)
    assert pf.compiled_gemv() is not None
    got = pf.bf16_matmul(x, W)                                           # the compiled kernel: rows <= CPU_GEMV_ROWS
    assert got.shape == (rows, out) and got.dtype == np.float32
    assert relative(got, pf.gemv_bf16_reference(x, W)) < 1e-5
    assert relative(got, pf.linear(x, pf.bf16_to_f32(W))) < 1e-5          # the fp32 weights through BLAS


def test_compiled_product_at_the_real_head_shape():
    """The tied head, 200064 x 2560: zero pages except three slices of random rows, the first, one in
    the middle and the last (so the highest output index is exercised)."""
    W = np.zeros((200064, 2560), np.uint16)
    rng = np.random.default_rng(7)
    slices = [slice(0, 40), slice(100_000, 100_033), slice(200_064 - 31, 200_064)]
    for s in slices:
        W[s] = bf16_bits(rng.standard_normal((s.stop - s.start, 2560)))
    x = rng.standard_normal((2, 2560)).astype(np.float32)
    y = pf.bf16_matmul(x, W)
    for s in slices:
        assert relative(y[:, s], pf.gemv_bf16_reference(x, W[s])) < 1e-5
    assert not y[:, 40:100_000].any()


def test_many_rows_take_the_blocks_and_agree():
    rng = np.random.default_rng(3)
    W = bf16_bits(rng.standard_normal((300, 96)))
    x = rng.standard_normal((pf.CPU_GEMV_ROWS + 1, 96)).astype(np.float32)
    assert relative(pf.bf16_matmul(x, W), pf.gemv_bf16_reference(x, W)) < 1e-5
    assert relative(pf.bf16_matmul(x[:16], W), pf.bf16_matmul_blocks(x[:16], W)) < 1e-5


def test_numpy_only_path_when_numba_is_off(numba_off):
    assert pf.compiled_gemv() is None
    rng = np.random.default_rng(4)
    W = bf16_bits(rng.standard_normal((50, 70)))
    x = rng.standard_normal((1, 70)).astype(np.float32)
    assert relative(pf.bf16_matmul(x, W), pf.gemv_bf16_reference(x, W)) < 1e-5


@pytest.mark.parametrize("H,H_kv,hd,S", [(8, 4, 8, 1), (8, 4, 8, 13), (16, 8, 64, 300), (40, 20, 64, 700), (4, 4, 16, 9)])
def test_compiled_attention_row_equals_differential_attention(H, H_kv, hd, S):
    """A decode step's attention, compiled: one query row over a prefix view of a longer buffer (as
    the shared K/V is read) and over a ring with empty slots (-1 positions masked)."""
    rng = np.random.default_rng(H + S)
    q = rng.standard_normal((H, 1, hd)).astype(np.float32)
    kbuf, vbuf = (rng.standard_normal((H_kv, S + 5, hd)).astype(np.float32) for _ in range(2))
    subln = rng.standard_normal(2 * hd).astype(np.float32)
    mask = np.ones((1, S), bool)
    mask[0, : S // 3] = S > 1 and False
    for k, v in ((kbuf[:, :S], vbuf[:, :S]), (np.ascontiguousarray(kbuf[:, :S]), np.ascontiguousarray(vbuf[:, :S]))):
        want = pf.differential_attention(q, k, v, mask, 0.3, 0.55, subln)
        got = pf.attention_row(q, k, v, mask, 0.3, 0.55, subln, 1e-5)
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5
    assert pf._whole(kbuf[:, :S]) is kbuf                                 # the prefix view is read in place


def test_a_bf16_decode_step_takes_the_compiled_attention(model, model_f32, monkeypatch):
    calls = []
    row = pf.attention_row
    monkeypatch.setattr(pf, "attention_row", lambda *a: calls.append(a[1].shape) or row(*a))
    kinds = model.config.layer_kinds
    _, cache = model.prefill([5, 68, 417])                                # 3 query rows in "swa": the NumPy form;
    assert len(calls) == kinds.count("full") + kinds.count("cross")       # layer L/2+1 and cross: the last row only
    model.step(cache, 322)
    assert len(calls) == 2 * (kinds.count("full") + kinds.count("cross")) + kinds.count("swa")
    before = len(calls)
    _, cache = model_f32.prefill([5, 68, 417])
    model_f32.step(cache, 322)                                            # fp32: BLAS's, no compiled step
    _, cache = model.prefill(np.arange(pf.CPU_GEMV_ROWS + 1))             # a long chunk: BLAS's too
    assert len(calls) == before


@pytest.mark.parametrize("path", ["numba", "numpy"])
def test_bf16_logits_equal_fp32_logits(model, model_f32, ref, monkeypatch, path):
    """The same model stored as bf16 bits (default) and as their exact fp32 widening: forward over
    every prompt (p0, p1 of 5 and 23 tokens take the compiled product, p2 of 41 the blocks) and 20 decode steps."""
    if path == "numpy":
        monkeypatch.setattr(pf, "_nb", False)
    for p in PROMPTS:
        ids = ref[f"{p}_input_ids"]
        assert np.abs(model.forward(ids) - model_f32.forward(ids)).max() <= 1e-5, p
        assert maxdiff(greedy_decode(model, ids, 20)[1], greedy_decode(model_f32, ids, 20)[1]) <= 1e-5, p


@pytest.mark.parametrize("how", ["PHI4FLASH_NUMBA=0", "numba not installed"])
def test_without_numba_the_same_logits_from_numpy_alone(converted, model, ref, tmp_path, how):
    """A process with PHI4FLASH_NUMBA=0 (as CI's NumPy-only path), or one where `import numba` fails,
    decodes with NumPy alone and gives the compiled path's logits."""
    block = "sys.modules['numba'] = None\n" if how == "numba not installed" else ""   # import numba -> ImportError
    script = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1])\n" + block + "import phi4flash as pf\n"
        "m = pf.load(sys.argv[2]); logits, cache = m.prefill([5, 68, 417]); rows = [logits]\n"
        "for t in (3, 9, 27): rows.append(m.step(cache, t))\n"
        "np.save(sys.argv[3], np.array(rows)); print(sys.modules.get('numba') is not None, pf.compiled_gemv())\n")
    out = tmp_path / "logits.npy"
    env = dict(os.environ, PHI4FLASH_NUMBA="0") if how == "PHI4FLASH_NUMBA=0" else dict(os.environ)
    r = subprocess.run([sys.executable, "-c", script, ROOT, converted, str(out)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "None"]
    logits, cache = model.prefill([5, 68, 417])
    want = [logits] + [model.step(cache, t) for t in (3, 9, 27)]
    assert np.abs(np.load(out) - np.array(want)).max() <= 1e-5


def test_a_numba_that_cannot_cache_still_compiles(monkeypatch):
    """_njit asks numba for an on-disk cache; where numba refuses one (no writable cache location, as
    older numbas do at decoration time), the function is compiled for this process only."""
    import numba
    real = numba.njit

    def refusing(*args, **kw):
        if kw.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return real(*args, **kw)

    def double(a):
        out = np.empty_like(a)
        for i in numba.prange(a.size):
            out[i] = 2 * a[i]
        return out

    monkeypatch.setattr(numba, "njit", refusing)
    assert pf._njit(numba, double)(np.arange(3, dtype=np.float32)).tolist() == [0, 2, 4]


def test_a_decode_step_runs_blas_on_one_thread(model, model_f32, monkeypatch):
    """Inside a few-row extend() of a bf16 model the BLAS pool is limited to one thread; a prefill
    chunk keeps it, and so does any step of a float32 model (its products are BLAS's)."""
    from threadpoolctl import threadpool_info
    seen = []
    extend = pf.extend

    def recording(m, cache, ids, *args):
        seen.append((len(ids), [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]))
        return extend(m, cache, ids, *args)
    before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    monkeypatch.setattr(pf, "extend", recording)
    _, cache = model.prefill(np.arange(pf.CPU_GEMV_ROWS + 1))
    model.step(cache, 5)
    assert seen[0] == (pf.CPU_GEMV_ROWS + 1, before) and seen[1] == (1, [1] * len(before))
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == before
    _, cache = model_f32.prefill([5, 68])
    assert seen[-1] == (2, before)


def test_memory_stays_flat_over_a_long_generation(model, ref):
    """NumPy reports its allocations to tracemalloc: after a warm-up, 140 more decode steps leave
    the traced memory where it was (the cache was preallocated for the whole generation)."""
    cache = model.new_cache(len(ref["p1_input_ids"]) + 200)
    tokens = model.generate(ref["p1_input_ids"], 180, temperature=0.8, seed=1, stop_ids=(), cache=cache)
    try:
        sizes = []
        for n, _ in enumerate(tokens):
            if n == 30:
                tracemalloc.start()
            if n in (30, 170):
                sizes.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert len(sizes) == 2 and sizes[1] - sizes[0] < 64 << 10, sizes
