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
    for kernel in ("conv1d_silu_prefill", "scan_prefill", "attention_prefill", "attention_decode_split", "gemv_bf16"):
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
    """cuda_decode (every position read from the step's device buffers, K/V written by kv_write,
    attention over whole rings and the whole preallocated shared buffer) vs one CPU forward."""
    W = model.config.sliding_window[1]
    prompt = np.resize(ref["p2_input_ids"], prompt_len)
    with gpu_code_path(model, monkeypatch) as (gpu, launches):
        seq, cached, cache = greedy_decode(gpu, prompt, 3 * W + 5)
    full = model.forward(seq)                                             # the plain CPU path
    assert maxdiff(np.array(cached), full[prompt_len - 1:]) <= TOL
    kinds, steps = model.config.layer_kinds, 3 * W + 5 + (prompt_len == 1)  # a 1-token prompt is a decode step too
    assert launches.counts["kv_write"] == steps * (kinds.count("swa") + 1)  # sliding layers + layer L/2+1, each step
    assert launches.counts["scan_step"] == steps * kinds.count("mamba")
    assert cache.cuda is not None and cache.length == len(seq)


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


def test_gpu_code_path_greedy_generation_matches_reference_targets(model, ref, monkeypatch):
    with gpu_code_path(model, monkeypatch) as (gpu, _):
        for p in PROMPTS:
            ids = list(gpu.generate(ref[f"{p}_input_ids"], 24, temperature=0.0, stop_ids=()))
            assert ids == ref[f"{p}_greedy_full_ids"].tolist(), p


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


def test_decode_step_is_only_kernels_at_most_12_per_layer(monkeypatch):
    """One decode step on the real 32-layer schedule (small widths) is a fixed sequence of kernels.cu
    launches and nothing else: every array it touches refuses arithmetic, and the launches are only
    counted (the twins do not run). At most 12 per layer: <= 400 per token."""
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
    assert launched[0] == "embed_bf16" and launched[-2:] == ["layer_norm_rows", "gemv_bf16"]
    body = launched[1:-2]
    starts = [n for n, k in enumerate(body) if k == "layer_norm_rows"][::2]   # each layer: LN1 ... LN2 ...
    per_layer = [len(body[a:b]) for a, b in zip(starts, starts[1:] + [len(body)])]
    assert len(per_layer) == 32 and max(per_layer) <= 12 and len(launched) <= 400, per_layer
    kinds = cfg.layer_kinds
    assert per_layer == [{"mamba": 9, "swa": 9, "full": 9, "gmu": 6, "cross": 8}[k] for k in kinds]
    assert len(launched) == 3 + 9 * 9 + 9 * 9 + 6 * 7 + 8 * 7


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


def test_bench_kernel_traffic_counts_every_weight_once_per_step(model, monkeypatch):
    """notes/bench.py --kernels: every kernel of a decode step has a traffic formula, and the
    products' weight bytes add up to the model's weights (each read once per token)."""
    sys.path.insert(0, os.path.join(ROOT, "notes"))
    import bench
    with gpu_code_path(model, monkeypatch) as (gpu, launches):
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
            weights += a["W"].nbytes if int(a["mode"]) == pf.GEMV_SWIGLU else a["W"].nbytes * int(a["out_features"]) // a["W"].shape[0]
        elif twin.__name__ == "scan_step":
            weights += a["dt_proj"].nbytes
    fused = {id(w): w.nbytes for layer in gpu.layers for p in layer.values() for k, w in p.items()
             if k in ("in_proj", "x_proj", "dt_proj", "out_proj", "Wqkv", "fc1", "fc2") or k == "Wq" and "Wqkv" not in p}
    assert weights == sum(fused.values()) + gpu.embed_tokens.nbytes


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
