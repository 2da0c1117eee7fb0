"""The CuPy path, whole model.

On the CPU, always: the GPU code path (Model.run -> cuda_extend: cuda_layers for chunks, the
graph-safe decode step cuda_decode for one token) run through the kernels' NumPy twins must give
the reference logits and equal full recompute, with every launch checked against kernels.cu's
signatures; load(device="cuda") must fail in one line without CuPy or a GPU.

On a GPU (skipped, with the reason, without CuPy or a CUDA device): CuPy vs NumPy on the tiny
fixture and vs reference.npz (fp32 weights: <= 1e-4 abs; bf16 weights: relative RMSE of the logits
<= 1e-2 against the fp32 NumPy path), and cached decode vs full recompute with and without CUDA graphs.
"""
import contextlib
import copy
import dataclasses
import inspect
import os
import sys
import types

import numpy as np
import pytest

import convert
import phi4flash as pf
from conftest import PROMPTS, ROOT, cupy_or_skip
from test_kernels import LaunchChecker

TOL = 1e-4


@contextlib.contextmanager
def gpu_code_path(model, monkeypatch):
    """The model as load(device="cuda") sets it up (Model.run -> cuda_extend), but on its NumPy
    arrays, so every kernel runs as its twin; each launch is checked against kernels.cu's signature.
    -> (that model, the launch checker)."""
    checker = LaunchChecker(pf._launch)
    layers = [{group: dict(params) for group, params in layer.items()} for layer in model.layers]  # fused below, not the fixture's
    gpu = pf.fuse_for_decode(dataclasses.replace(model, layers=layers, device="cuda"))
    with monkeypatch.context() as m:
        m.setattr(pf, "_launch", checker)
        yield gpu, checker


def maxdiff(a, b):
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    return float(np.abs(np.asarray(a, np.float64) - b).max())


# ------------------------------------------------------------------------------------------------
# CPU: the GPU code path through the twins

def assert_forward_matches_reference(gpu, launches, ref, p, tol=TOL):
    """The model on the GPU code path (gpu, its launch checker) against reference.npz for prompt p:
    a forward's logits, every residual, the memory and shared K/V, and a prefill's last logits and
    states; the prefill kernels must have run."""
    trace = {}
    logits = gpu.forward(ref[f"{p}_input_ids"], trace=trace)
    last, cache = gpu.prefill(ref[f"{p}_input_ids"])
    assert maxdiff(logits, ref[f"{p}_logits"]) <= tol
    for i in range(gpu.config.num_hidden_layers):
        assert maxdiff(trace[f"layers.{i}.residual"], ref[f"{p}_hidden_states"][i + 1]) <= tol, i
    for name, key in (("memory", "gmu_memory"), ("shared_k", "shared_k"), ("shared_v", "shared_v")):
        assert maxdiff(trace[name], ref[f"{p}_{key}"]) <= tol, name
    assert maxdiff(last, ref[f"{p}_logits"][-1]) <= tol                   # prefill: one query row at layer L/2+1
    for i in (0, 2, 4):
        assert maxdiff(cache.conv_state[i], ref[f"{p}_prefill_conv_state_L{i}"][:, 1:].T) <= tol
        assert maxdiff(cache.ssm_state[i], ref[f"{p}_prefill_ssm_state_L{i}"]) <= 1e-5
    for kernel in ("conv1d_silu_prefill", "scan_prefill", "attention_prefill_f32", "attention_decode_f32", "gemv_bf16"):
        assert launches.counts.get(kernel), kernel


@pytest.mark.parametrize("p", PROMPTS)
def test_gpu_code_path_forward_matches_reference(model, ref, monkeypatch, p):
    with gpu_code_path(model, monkeypatch) as (gpu, launches):
        assert_forward_matches_reference(gpu, launches, ref, p)


def greedy_decode(model, prompt, steps):
    """Prefill, then `steps` greedy decode steps -> (all ids, the logits of every step, the cache)."""
    logits, cache = model.prefill(prompt, model.new_cache(len(prompt) + steps + 8))
    seq, cached = list(prompt), [logits]
    for _ in range(steps):
        seq.append(int(np.argmax(np.where(model.token_mask, logits, -np.inf))))
        logits = model.step(cache, seq[-1])
        cached.append(logits)
    return seq, cached, cache


@pytest.mark.parametrize("prompt_len", [1, 5, 13])
def test_gpu_decode_step_equals_full_recompute_past_three_windows(model, ref, monkeypatch, prompt_len):
    """cuda_decode (every position read from the step's device buffers, K/V stored by the Wqkv GEMV,
    the conv in in_proj's, attention over whole rings and the whole preallocated shared buffer) vs one
    CPU forward."""
    W = model.config.sliding_window[1]
    prompt = np.resize(ref["p2_input_ids"], prompt_len)
    with gpu_code_path(model, monkeypatch) as (gpu, launches):
        seq, cached, cache = greedy_decode(gpu, prompt, 3 * W + 5)
    full = model.forward(seq)                                             # the plain CPU path
    assert maxdiff(np.array(cached), full[prompt_len - 1:]) <= TOL
    kinds, steps = model.config.layer_kinds, 3 * W + 5 + (prompt_len == 1)  # a 1-token prompt is a decode step too
    assert launches.counts["gemv_bf16_qkv"] == steps * (kinds.count("swa") + 1)  # sliding layers + layer L/2+1
    assert launches.counts["gemv_bf16_conv"] == launches.counts["scan_step"] == steps * kinds.count("mamba")
    assert "conv1d_silu_step" not in launches.counts and cache.cuda is not None and cache.length == len(seq)


def test_gpu_decode_and_chunks_mix_and_the_shared_buffer_grows(model, monkeypatch):
    """Decode steps (cuda_decode) and multi-token chunks (cuda_layers) share one cache; its shared K/V
    starts too small and grows under both. The caches equal the CPU path's, slot for slot."""
    rng = np.random.default_rng(4)
    seq = rng.integers(0, 500, 40)
    sizes = (3, 1, 1, 5, 1, 1, 1, 9, 1, 17)
    cpu_cache = model.new_cache(2)
    cpu_rows = [model.run(cpu_cache, seq[s:s + n], "all" if n > 1 else "last")
                for s, n in zip(np.cumsum((0,) + sizes[:-1]), sizes)]
    with gpu_code_path(model, monkeypatch) as (gpu, launches):
        cache = gpu.new_cache(2)
        rows = [gpu.run(cache, seq[s:s + n], "all" if n > 1 else "last")
                for s, n in zip(np.cumsum((0,) + sizes[:-1]), sizes)]
    assert launches.counts["scan_step"] == sizes.count(1) * model.config.layer_kinds.count("mamba")
    for got, want in zip(rows, cpu_rows):
        assert maxdiff(got, want) <= TOL
    assert cache.length == cpu_cache.length == 40
    for i, kv in cache.kv.items():
        cpu = cpu_cache.kv[i]
        n = cpu.k.shape[1] if cpu.window else cpu.length
        assert kv.length == cpu.length and np.array_equal(kv.pos[:n], cpu.pos[:n]), i
        assert maxdiff(kv.k[:, :n], cpu.k[:, :n]) <= 1e-5 and maxdiff(kv.v[:, :n], cpu.v[:, :n]) <= 1e-5, i
    for i in cache.ssm_state:
        assert maxdiff(cache.conv_state[i], cpu_cache.conv_state[i]) <= 1e-5
        assert maxdiff(cache.ssm_state[i], cpu_cache.ssm_state[i]) <= 1e-5
    assert cache.shared(model.config).k.shape[1] >= 40


BF16_KV_SIZES = (5, 1, 1, 9) + (1,) * 24 + (17, 1, 1)   # chunks and steps, 3 windows of decode steps, growth
# Two paths that store a bf16 K/V cache differ by more than their fp32 summation order: an fp32 value
# ~1e-6 from a rounding boundary lands on the other side of it in one path (one bf16 step), and every
# later layer's input then moves a little too (its attention saw the flipped key), so later layers'
# K/V differ by up to ~1e-4 before rounding. How many flip depends on the order of the CPU path's
# sums, so on NumPy's BLAS: of the 4,800 elements stored in assert_bf16_kv_path_equals_cpu, 10 with
# NumPy 2.4 (logits' relative RMSE 1.1e-5) and 24 with NumPy 1.24, the floor (8.9e-5, one chunk
# 2.2e-4; a difference of 1.5e-4 before rounding, several bf16 steps for a value near zero). So the
# bounds: at most 1 % of the elements differ, each by one bf16 step plus 5e-4, and the logits by
# BF16_KV_FLIPS_RMSE; the arithmetic itself is held to 3e-6 from the same cache bits.
BF16_KV_FLIPS_RMSE = 5e-4


def relative_rmse(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2)))


def assert_bf16_kv_path_equals_cpu(model, gpu, launches, monkeypatch):
    """A bfloat16 K/V cache on the GPU code path (`gpu`, its launch checker) against the CPU path with
    the same option.
    1. Chunks (the prefill kernels) and decode steps (attention_decode) mixed on one cache whose
       shared K/V starts too small and grows. A few elements round to a neighbouring bf16 value
       (10 or 24 of the 4,800 stored here, measured: above); the caches are the same bits elsewhere.
       The logits' relative RMSE: 1.1e-5 / 8.9e-5 measured (fp32 K/V: 9.5e-7); the bound,
       BF16_KV_FLIPS_RMSE.
    2. Decode steps from the same cache bits on both paths: the attention reads the same values, so
       only fp32 summation order is left: relative RMSE <= 3e-6 (3.5e-7 to 4.5e-7 measured)."""
    seq = np.random.default_rng(19).integers(0, 500, sum(BF16_KV_SIZES))
    starts = np.cumsum((0,) + BF16_KV_SIZES[:-1])
    cpu = dataclasses.replace(model, kv_dtype="bfloat16")
    cpu_cache = cpu.new_cache(2)
    want = [cpu.run(cpu_cache, seq[a:a + n], "all" if n > 1 else "last") for a, n in zip(starts, BF16_KV_SIZES)]
    cache = gpu.new_cache(2)
    got = [gpu.run(cache, seq[a:a + n], "all" if n > 1 else "last") for a, n in zip(starts, BF16_KV_SIZES)]
    assert relative_rmse(np.concatenate(got), np.concatenate(want)) <= BF16_KV_FLIPS_RMSE
    flipped = stored = 0
    for i, kv in cache.kv.items():
        n = kv.k.shape[1] if kv.window else kv.length
        mine, theirs = (kv.k[:, :n], kv.v[:, :n]), (cpu_cache.kv[i].k[:, :n], cpu_cache.kv[i].v[:, :n])
        assert kv.k.dtype == np.uint16 and np.array_equal(kv.pos[:n], cpu_cache.kv[i].pos[:n]), i
        for a, b in zip(mine, theirs):
            flipped, stored = flipped + int((a != b).sum()), stored + a.size
            wide, want = pf.bf16_to_f32(a), pf.bf16_to_f32(b)             # one bf16 step (<= 2^-7 of the value)
            assert (np.abs(wide - want) <= 2 ** -7 * np.abs(want) + 5e-4).all(), i   # + what earlier flips moved
    assert flipped <= stored // 100
    assert cache.shared(model.config).k.shape[1] >= len(seq)
    for token in (7, 99, 345):                                        # one step each from the same bits
        mine, same = copy.deepcopy(cache), copy.deepcopy(cache)
        mine.cuda = same.cuda = None         # a copied step's buffers lose their views (token_pos): make new ones
        assert relative_rmse(gpu.step(mine, token), cpu.step(same, token)) <= 3e-6
    assert {"attention_prefill_bf16", "attention_decode_bf16"} <= set(launches.counts)
    assert "attention_prefill_f32" not in launches.counts and "attention_decode_f32" not in launches.counts


def test_gpu_code_path_with_a_bf16_kv_cache_equals_the_cpu_path(model, monkeypatch):
    with gpu_code_path(dataclasses.replace(model, kv_dtype="bfloat16"), monkeypatch) as (gpu, launches):
        assert_bf16_kv_path_equals_cpu(model, gpu, launches, monkeypatch)


def test_gpu_code_path_greedy_generation_matches_reference_targets(model, ref, monkeypatch):
    with gpu_code_path(model, monkeypatch) as (gpu, _):
        for p in PROMPTS:
            ids = list(gpu.generate(ref[f"{p}_input_ids"], 24, temperature=0.0, stop_ids=()))
            assert ids == ref[f"{p}_greedy_full_ids"].tolist(), p


# int8 weights: the GPU code path and the CPU path both compute fp32 over the same q · s; only the
# order of the sums differs (and the kernels scale a group's sum once, (Σ x·q)·s). Measured on the
# fixture: 1.5e-6 of the logits' largest magnitude, through the twins and through the real kernels.
INT8_TOL = 5e-6


def assert_int8_matches_cpu(gpu, launches, cpu, ref, steps=12, prompts=PROMPTS):
    """The int8 model on the GPU code path (its launch checker) against the CPU int8 model: a
    forward's logits and `steps` greedy decode steps after a prefill, for each prompt; the decode
    steps ran the fused int8 instances."""
    for p in prompts:
        ids = ref[f"{p}_input_ids"]
        want = cpu.forward(ids)
        assert maxdiff(gpu.forward(ids), want) <= INT8_TOL * np.abs(want).max(), p
        got_seq, got, _ = greedy_decode(gpu, ids, steps)
        want_seq, want, _ = greedy_decode(cpu, ids, steps)
        assert got_seq == want_seq and maxdiff(np.array(got), np.array(want)) <= INT8_TOL * np.abs(want).max(), p
    for kernel in ("gemv_int8", "gemv_int8_qkv", "gemv_int8_conv", "gemv_int8_norm", "embed_int8"):
        assert launches.counts.get(kernel), kernel


def test_gpu_code_path_int8_equals_the_cpu_int8_model(model_int8, ref, monkeypatch):
    with gpu_code_path(model_int8, monkeypatch) as (gpu, launches):
        assert_int8_matches_cpu(gpu, launches, model_int8, ref)


def assert_a_short_kv_buffer_fails_the_step_in_one_line(gpu, monkeypatch):
    """A shared K/V buffer that the host failed to grow (kv_grow made a no-op): the Wqkv GEMV of
    layer L/2+1 stores nothing and sets the step's error flag, which the host turns into one line
    after the step; the flag is cleared and the cache keeps its length."""
    cache = gpu.new_cache(4)
    _, cache = gpu.prefill([5, 68, 417, 322], cache)
    monkeypatch.setattr(pf, "kv_grow", lambda kv, needed: None)
    with pytest.raises(pf.Phi4FlashError) as e:
        gpu.step(cache, 76)
    layer = gpu.config.kv_layer
    assert str(e.value) == (f"decode step at position 4: no K/V slot for it (layer {layer}'s has 4 slots); its K/V "
                            "were not stored, so this cache cannot be used further")
    assert cache.length == 4 and cache.cuda.buf["error"][0] == 0 and (cache.shared(gpu.config).pos == np.arange(4)).all()


def test_a_short_kv_buffer_fails_the_decode_step_in_one_line(model, monkeypatch):
    with gpu_code_path(model, monkeypatch) as (gpu, _):
        assert_a_short_kv_buffer_fails_the_step_in_one_line(gpu, monkeypatch)


def test_gpu_prefill_stores_the_bf16_kv_as_the_cpu_path(converted, monkeypatch):
    """cuda_layers writes K/V through kv_stored as extend() does: bf16 bits, the CPU path's within
    one rounding step (the products' sums differ in order). The attention is stubbed, so that only
    the store is compared (the bf16 attention kernels are compared in the tests above)."""
    cpu = pf.load(converted, kv_dtype="bfloat16")
    _, want = cpu.prefill(np.arange(5, 25), cpu.new_cache(32), logits=False)
    with gpu_code_path(cpu, monkeypatch) as (gpu, _):
        monkeypatch.setattr(pf, "cuda_attend", lambda q, k, v, qpos, *rest: np.zeros((len(qpos), q.shape[0] * q.shape[2]),
                                                                                      np.float32))
        got = gpu.new_cache(32)
        gpu.run(got, np.arange(5, 25), None)
    for i, kv in want.kv.items():
        assert got.kv[i].k.dtype == np.uint16 and np.array_equal(got.kv[i].pos, kv.pos), i
    first = min(want.kv)                                                  # later layers' inputs saw the stub
    for a, b in ((got.kv[first].k, want.kv[first].k), (got.kv[first].v, want.kv[first].v)):
        a, b = pf.bf16_to_f32(a), pf.bf16_to_f32(b)
        assert np.abs(a - b).max() <= 2 ** -8 * np.abs(b).max() and np.mean(a == b) > 0.99


def random_model(cfg, seed=0):
    """A Model of random float32/bf16 arrays in memory with the tensors of `cfg` (no file, no tokenizer)."""
    rng = np.random.default_rng(seed)
    tensors = {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in pf.tensor_shapes(cfg).items()}
    for name in tensors:
        if name.rsplit(".", 1)[-1] in pf.LINEAR_WEIGHTS or name == "embed_tokens.weight":
            tensors[name] = (tensors[name].view(np.uint32) >> 16).astype(np.uint16)

    def group(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    layers = [{n: group(f"layers.{i}.{n}.") for n in ("input_layernorm", "post_attention_layernorm", "mlp",
                                                        kind if kind in ("mamba", "gmu") else "attn")}
              for i, kind in enumerate(cfg.layer_kinds)]
    model = pf.Model(cfg, tensors["embed_tokens.weight"], group("final_layernorm."), layers, device="cuda")
    model.token_mask = np.ones(cfg.vocab_size, bool)
    return pf.fuse_for_decode(model)


class NoMath(np.ndarray):
    """An array that refuses arithmetic: any ufunc, matmul or array function but a no-copy
    ascontiguousarray raises. Slicing and reshaping (views) still work."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        raise AssertionError(f"the decode step computed {ufunc.__name__} itself, outside kernels.cu")

    def __array_function__(self, func, types, args, kwargs):
        if func is np.ascontiguousarray and args[0].flags.c_contiguous and kwargs.get("dtype", args[0].dtype) == args[0].dtype:
            return args[0]
        raise AssertionError(f"the decode step called numpy.{func.__name__} itself, outside kernels.cu")


def test_decode_step_is_only_kernels_at_most_6_per_layer(monkeypatch):
    """One decode step on the real 32-layer schedule (small widths) is a fixed sequence of kernels.cu
    launches and nothing else: every array it touches refuses arithmetic, and the launches are only
    counted (the twins do not run). The K/V store, Mamba's conv and every LayerNorm but the first run
    in the epilogue of the GEMV before them, and attention_decode merges its own splits: at most 6
    launches per layer (263 -> 165 per token). The attention's launches are counted apart."""
    cfg = pf.Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=8,
                    num_key_value_heads=4, sliding_window=tuple(8 if i % 2 and i < 16 else None for i in range(32)),
                    mamba_dt_rank=4)
    model = random_model(cfg)
    cache = model.new_cache(16)
    step = pf.new_cuda_step(model, np)
    pf.step_partials(cfg, step, [16], np)
    nomath = lambda a: a.view(NoMath)  # noqa: E731
    model.embed_tokens = nomath(model.embed_tokens)
    model.final_layernorm = {k: nomath(a) for k, a in model.final_layernorm.items()}
    model.layers = [{g: {k: nomath(a) for k, a in p.items()} for g, p in layer.items()} for layer in model.layers]
    step.buf = {k: nomath(a) for k, a in step.buf.items()}
    step.token, step.pos, step.lam = nomath(step.token), nomath(step.pos), {i: nomath(a) for i, a in step.lam.items()}
    cache.conv_state = {i: nomath(a) for i, a in cache.conv_state.items()}
    cache.ssm_state = {i: nomath(a) for i, a in cache.ssm_state.items()}
    for kv in cache.kv.values():
        kv.k, kv.v, kv.pos = nomath(kv.k), nomath(kv.v), nomath(kv.pos)
    launched = []
    checker = LaunchChecker(lambda twin, grid, block, args: None)
    monkeypatch.setattr(pf, "_launch", lambda twin, grid, block, args: launched.append(twin.__name__) or
                        checker(twin, grid, block, tuple(np.asarray(a) if isinstance(a, NoMath) else a for a in args)))
    pf.cuda_step_layers(model, cache, step)
    assert launched[:2] == ["embed_bf16", "layer_norm_rows"] and launched[-1] == "gemv_bf16"  # the first LN; the head
    body = launched[2:-1]
    ends = [n + 1 for n, k in enumerate(body) if k.endswith("_norm")][1::2]  # a layer ends with fc2 + the next LN
    layers = [body[a:b] for a, b in zip([0] + ends, ends)]
    assert len(layers) == 32 and ends[-1] == len(body)
    mixer = {"mamba": ["gemv_bf16_conv", "gemv_bf16", "scan_step"], "swa": ["gemv_bf16_qkv"], "full": ["gemv_bf16_qkv"],
             "gmu": ["gemv_bf16"], "cross": ["gemv_bf16"]}
    rest = ["gemv_bf16_norm", "gemv_bf16", "gemv_bf16_norm"]               # out_proj + LN, fc1 SwiGLU, fc2 + LN
    kinds = cfg.layer_kinds
    assert [[k for k in ks if not k.startswith("attention_")] for ks in layers] == [mixer[k] + rest for k in kinds]
    attention = [sum(k.startswith("attention_") for k in ks) for ks in layers]
    assert len({a for a, k in zip(attention, kinds) if k in ("swa", "full", "cross")}) == 1 and \
        all(a == 0 for a, k in zip(attention, kinds) if k in ("mamba", "gmu"))
    assert max(map(len, layers)) <= 6 and len(launched) == 3 + 9 * 6 + 16 * (4 + max(attention)) + 7 * 4 <= 200


def test_a_one_token_chunk_without_logits_is_not_a_decode_step(model, monkeypatch):
    """extend(..., logits=None) for one token (a chat turn's last chunk of one token) only fills the
    cache: the layer loop (cuda_layers) up to layer L/2+1, not the decode step and its head."""
    with gpu_code_path(model, monkeypatch) as (gpu, launches):
        cache = gpu.new_cache(16)
        assert gpu.run(cache, np.array([5, 68, 417]), None) is None
        assert gpu.run(cache, np.array([322]), None) is None
        assert "scan_step" not in launches.counts and cache.cuda is None and cache.length == 4
        logits = gpu.step(cache, 76)
    want = model.forward([5, 68, 417, 322, 76])[-1]
    assert maxdiff(logits, want) <= TOL


@pytest.mark.parametrize("which", ["model", "model_int8"])
def test_bench_kernel_traffic_counts_every_weight_once_per_step(request, monkeypatch, which):
    """notes/bench.py --kernels: every kernel of a decode step has a traffic formula, and the
    products' weight bytes (an int8 matrix's scales included) add up to the model's weights (each
    read once per token), for bf16 and int8 weights."""
    sys.path.insert(0, os.path.join(ROOT, "notes"))
    import bench
    with gpu_code_path(request.getfixturevalue(which), monkeypatch) as (gpu, launches):
        stats = bench.kernel_profile(gpu, 12, 2)
        seen = []
        pf_launch = pf._launch
        with monkeypatch.context() as m:      # undone here, inside gpu_code_path (the test's own undo would
            m.setattr(pf, "_launch", lambda twin, grid, block, args: seen.append((twin, args)) or  # restore
                      pf_launch(twin, grid, block, args))                                          # its checker)
            _, cache = gpu.prefill([5, 68, 417])
            seen.clear()
            gpu.step(cache, 322)
    assert set(stats) == {twin.__name__ for twin, _ in seen} and all(k["launches"] >= 1 for k in stats.values())
    names = {twin.__name__: [n.rstrip("_") for n in inspect.signature(twin).parameters] for twin, _ in seen}
    weights = 0
    for twin, args in seen:
        a = dict(zip(names[twin.__name__], args))
        if twin.__name__.startswith("gemv"):
            rows = int(a["out_features"]) * (2 if int(a.get("mode", pf.GEMV_PLAIN)) == pf.GEMV_SWIGLU else 1)
            weights += (a["W"].nbytes + (a["scales"].nbytes if "scales" in a else 0)) * rows // a["W"].shape[0]
        elif twin.__name__ == "scan_step":
            weights += a["dt_proj"].nbytes
    fused = {id(w): w.nbytes for layer in gpu.layers for p in layer.values() for k, w in p.items()
             if k in ("in_proj", "x_proj", "dt_proj", "out_proj", "Wqkv", "fc1", "fc2") or k == "Wq" and "Wqkv" not in p}
    assert weights == sum(fused.values()) + gpu.embed_tokens.nbytes
    assert ("gemv_int8" in stats) == ("embed_int8" in stats) == (which == "model_int8")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_bench_random_device_model_decodes(monkeypatch, dtype):
    """notes/bench.py's random model for a GPU run (NumPy standing in for CuPy, so the twins run):
    int8 matrices as Int8Weight (the tiny width-4 dt_proj stays bf16, as convert.py leaves it), and
    a prefill and decode steps through the GPU code path give finite logits."""
    sys.path.insert(0, os.path.join(ROOT, "notes"))
    import bench
    monkeypatch.setattr(bench, "_cupy", np)
    cfg = pf.Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=4, sliding_window=tuple(8 if i % 2 and i < 4 else None for i in range(8)),
                    mamba_dt_rank=4)
    model = bench.random_device_model(cfg, dtype)
    int8 = dtype == "int8"
    assert isinstance(model.embed_tokens, pf.Int8Weight) == int8
    assert isinstance(model.layers[1]["attn"]["Wqkv"], pf.Int8Weight) == int8
    assert model.layers[0]["mamba"]["dt_proj"].dtype == np.float32
    monkeypatch.setattr(pf, "_launch", LaunchChecker(pf._launch))
    logits, cache = model.prefill([1, 2, 3])
    rows = [logits] + [model.step(cache, t) for t in (4, 5)]
    assert np.isfinite(rows).all() and pf._launch.counts[f"gemv_{'int8' if int8 else 'bf16'}_norm"] == 2 * 2 * 8
    assert bench.decode_bytes(model, 8) > sum(t.nbytes for t in bench.weight_tensors(model))


def test_check_cuda_config_accepts_the_real_and_tiny_models_only_when_supported(model):
    real = convert.config_from_hf({"vocab_size": 200064, "hidden_size": 2560, "intermediate_size": 10240,
                                   "num_hidden_layers": 32, "num_attention_heads": 40, "num_key_value_heads": 20,
                                   "sliding_window": 512, "model_type": "phi4flash"})
    pf.check_cuda_config(real)
    pf.check_cuda_config(model.config)
    from dataclasses import replace
    with pytest.raises(pf.Phi4FlashError, match="head_dim 48") as e:
        pf.check_cuda_config(replace(real, hidden_size=1920))
    assert "\n" not in str(e.value)
    with pytest.raises(pf.Phi4FlashError, match="KV heads"):
        pf.check_cuda_config(replace(real, num_key_value_heads=5))


def test_load_unknown_device_is_one_line(converted):
    with pytest.raises(pf.Phi4FlashError, match="expected 'cpu' or 'cuda'") as e:
        pf.load(converted, device="tpu")
    assert "\n" not in str(e.value)


def test_load_cuda_without_cupy_is_one_line(converted):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here; the no-CuPy message cannot be observed")
    except ImportError:
        pass
    with pytest.raises(pf.Phi4FlashError) as e:
        pf.load(converted, device="cuda")
    assert "CuPy is not installed" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("failure", ["raises", "zero"])
def test_load_cuda_without_a_device_is_one_line(converted, monkeypatch, failure):
    """A CuPy without a usable GPU (no driver, an old driver, no device): one line, nothing loaded."""
    def device_count():
        if failure == "raises":
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected\n(details)")
        return 0
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=device_count))
    monkeypatch.setitem(__import__("sys").modules, "cupy", fake)
    with pytest.raises(pf.Phi4FlashError) as e:
        pf.load(converted, device="cuda")
    assert "\n" not in str(e.value)
    assert ("no usable CUDA device (cudaErrorNoDevice" if failure == "raises" else "no CUDA device is visible") in str(e.value)


# ------------------------------------------------------------------------------------------------
# GPU: the real thing

@pytest.fixture(scope="module")
def cupy_gpu():
    return cupy_or_skip("whole-model GPU tests need CuPy and a CUDA device")


@pytest.fixture(scope="module")
def gpu_model(cupy_gpu, converted):
    return pf.load(converted, device="cuda")


@pytest.fixture(scope="module")
def gpu_model_f32(cupy_gpu, model_f32):
    return pf.load(model_f32.path, device="cuda")


@pytest.fixture(scope="module")
def gpu_model_int8(cupy_gpu, converted_int8):
    return pf.load(converted_int8, device="cuda")


def test_gpu_int8_equals_the_cpu_int8_model(cupy_gpu, gpu_model_int8, model_int8, ref):
    """int8 weights on the device (gemv_int8 and its fused instances, embed_int8, dequantised blocks
    for a prefill) against the CPU int8 path, forward and 24 greedy steps replayed as a CUDA graph:
    TOL, the bar of the bf16 GPU-vs-NumPy test (the GPU's expf and FMAs round apart from NumPy's)."""
    assert isinstance(gpu_model_int8.embed_tokens, pf.Int8Weight)
    assert isinstance(gpu_model_int8.embed_tokens.q, cupy_gpu.ndarray) and gpu_model_int8.embed_tokens.q.dtype == np.int8
    for p in PROMPTS:
        ids = ref[f"{p}_input_ids"]
        assert maxdiff(gpu_model_int8.forward(ids), model_int8.forward(ids)) <= TOL, p
        seq, rows, cache = greedy_decode(gpu_model_int8, ids, 24)
        want_seq, want_rows, _ = greedy_decode(model_int8, ids, 24)
        assert seq == want_seq and maxdiff(np.array(rows), np.array(want_rows)) <= TOL, p
        assert cache.cuda.graph is not None and cache.cuda.graph_error == ""


def test_gpu_weights_stay_bf16_bits_on_the_device(cupy_gpu, gpu_model):
    assert isinstance(gpu_model.embed_tokens, cupy_gpu.ndarray) and gpu_model.embed_tokens.dtype == np.uint16
    assert gpu_model.layers[0]["mamba"]["A_log"].dtype == np.float32


@pytest.mark.parametrize("p", PROMPTS)
def test_gpu_fp32_forward_matches_reference(gpu_model_f32, ref, p):
    trace = {}
    logits = gpu_model_f32.forward(ref[f"{p}_input_ids"], trace=trace)
    assert maxdiff(logits, ref[f"{p}_logits"]) <= TOL
    for i in range(gpu_model_f32.config.num_hidden_layers):
        assert maxdiff(trace[f"layers.{i}.residual"], ref[f"{p}_hidden_states"][i + 1]) <= TOL, i
    assert maxdiff(trace["memory"], ref[f"{p}_gmu_memory"]) <= TOL
    last, cache = gpu_model_f32.prefill(ref[f"{p}_input_ids"])
    assert maxdiff(last, ref[f"{p}_logits"][-1]) <= TOL
    for i in (0, 2, 4):
        assert maxdiff(cache.ssm_state[i].get(), ref[f"{p}_prefill_ssm_state_L{i}"]) <= 1e-5


@pytest.mark.parametrize("p", PROMPTS)
def test_gpu_bf16_equals_numpy_and_fp32(gpu_model, model, model_f32, ref, p):
    ids = ref[f"{p}_input_ids"]
    gpu = gpu_model.forward(ids)
    assert maxdiff(gpu, model.forward(ids)) <= TOL                        # same bf16 weights, CuPy vs NumPy
    want = model_f32.forward(ids)
    assert np.sqrt(np.mean((gpu - want) ** 2)) / np.sqrt(np.mean(want ** 2)) <= 1e-2


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("prompt_len", [1, 13])
def test_gpu_cached_decode_equals_full_recompute(gpu_model, ref, monkeypatch, graphs, prompt_len):
    monkeypatch.setattr(pf, "CUDA_GRAPHS", graphs)
    W = gpu_model.config.sliding_window[1]
    prompt = np.resize(ref["p2_input_ids"], prompt_len)
    seq, cached, cache = greedy_decode(gpu_model, prompt, 3 * W + 5)
    full = gpu_model.forward(seq)
    assert maxdiff(np.array(cached), full[prompt_len - 1:]) <= TOL
    assert cache.cuda.graph_error == ""
    assert (cache.cuda.graph is not None) == graphs                       # captured once, then replayed
    assert cache.cuda.eager_steps == (1 if graphs else 3 * W + 5 + (prompt_len == 1))  # a 1-token prompt is a step too


def test_gpu_greedy_generation_and_turns_match_cpu(gpu_model, model, ref):
    for p in PROMPTS:
        assert list(gpu_model.generate(ref[f"{p}_input_ids"], 24, temperature=0.0, stop_ids=())) == \
            ref[f"{p}_greedy_full_ids"].tolist(), p
    prompt, more = ref["p1_input_ids"], ref["p0_input_ids"]
    for m in (gpu_model, model):  # a second turn on the same cache: chunk, then graph steps again
        cache = m.new_cache(8)     # too small: the shared K/V grows and the graph is re-captured
        first = list(m.generate(prompt, 10, temperature=0.0, stop_ids=(), cache=cache))
        second = list(m.generate([first[-1], *more], 10, temperature=0.0, stop_ids=(), cache=cache))
        if m is gpu_model:
            gpu_turns = (first, second)
    assert gpu_turns == (first, second)


def test_gpu_bf16_kv_cache_equals_the_cpu_path_with_the_same_option(cupy_gpu, converted, ref):
    """bf16 K/V on the device (the Wqkv GEMV's _qkv16 store, attention_*_bf16) against the CPU path
    with the same option: 24 greedy steps after a prefill, replayed as a CUDA graph. The bound is the
    one through the twins (BF16_KV_FLIPS_RMSE): a few K/V elements round to the neighbouring bf16
    value, the rest is fp32 summation order."""
    gpu, cpu = pf.load(converted, device="cuda", kv_dtype="bfloat16"), pf.load(converted, kv_dtype="bfloat16")
    for p in PROMPTS:
        ids = ref[f"{p}_input_ids"]
        seq, rows, cache = greedy_decode(gpu, ids, 24)
        want_seq, want_rows, _ = greedy_decode(cpu, ids, 24)
        assert seq == want_seq and relative_rmse(np.array(rows), np.array(want_rows)) <= BF16_KV_FLIPS_RMSE, p
        assert cache.cuda.graph is not None and cache.cuda.graph_error == ""
        assert all(kv.k.dtype == np.uint16 for kv in cache.kv.values())


def test_gpu_decode_with_pdl_equals_without_bit_for_bit(cupy_gpu, converted, ref, monkeypatch):
    """Programmatic dependent launch changes when a step's kernels start, never what they compute:
    24 greedy steps replayed as CUDA graphs, with PDL and with it off, give the same logits bits."""
    if pf._pdl_driver() is None:
        pytest.skip("kernels launch without PDL here (no cuda-bindings, or a GPU below sm_90: stderr said which)")
    gpu = pf.load(converted, device="cuda")
    ids = ref["p2_input_ids"]
    seq, with_pdl, cache = greedy_decode(gpu, ids, 24)
    assert pf._pdl_driver() is not None and cache.cuda.graph is not None   # the graph took the PDL launches
    monkeypatch.setattr(pf, "PDL", False)
    monkeypatch.setattr(pf, "_pdl", None)
    seq_off, without, cache_off = greedy_decode(gpu, ids, 24)
    assert pf._pdl_driver() is None and cache_off.cuda.graph is not None
    assert seq_off == seq and np.array_equal(np.array(without), np.array(with_pdl))
