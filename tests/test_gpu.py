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
import types

import numpy as np
import pytest

import convert
import phi4flash as pf
from conftest import PROMPTS, cupy_or_skip
from test_kernels import LaunchChecker

TOL = 1e-4


@contextlib.contextmanager
def gpu_code_path(model, monkeypatch):
    """The model as load(device="cuda") sets it up (Model.run -> cuda_extend), but on its NumPy
    arrays, so every kernel runs as its twin; each launch is checked against kernels.cu's signature.
    -> (that model, the launch checker)."""
    checker = LaunchChecker(pf._launch)
    with monkeypatch.context() as m:
        m.setattr(pf, "_launch", checker)
        yield dataclasses.replace(model, device="cuda"), checker


def maxdiff(a, b):
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    return float(np.abs(np.asarray(a, np.float64) - b).max())


# ------------------------------------------------------------------------------------------------
# CPU: the GPU code path through the twins

@pytest.mark.parametrize("p", PROMPTS)
def test_gpu_code_path_forward_matches_reference(model, ref, monkeypatch, p):
    with gpu_code_path(model, monkeypatch) as (gpu, launches):
        trace = {}
        logits = gpu.forward(ref[f"{p}_input_ids"], trace=trace)
        last, cache = gpu.prefill(ref[f"{p}_input_ids"])
    assert maxdiff(logits, ref[f"{p}_logits"]) <= TOL
    for i in range(model.config.num_hidden_layers):
        assert maxdiff(trace[f"layers.{i}.residual"], ref[f"{p}_hidden_states"][i + 1]) <= TOL, i
    for name, key in (("memory", "gmu_memory"), ("shared_k", "shared_k"), ("shared_v", "shared_v")):
        assert maxdiff(trace[name], ref[f"{p}_{key}"]) <= TOL, name
    assert maxdiff(last, ref[f"{p}_logits"][-1]) <= TOL                   # prefill: one query row at layer L/2+1
    for i in (0, 2, 4):
        assert maxdiff(cache.conv_state[i], ref[f"{p}_prefill_conv_state_L{i}"][:, 1:].T) <= TOL
        assert maxdiff(cache.ssm_state[i], ref[f"{p}_prefill_ssm_state_L{i}"]) <= 1e-5
    for kernel in ("conv1d_silu_prefill", "scan_prefill", "attention_prefill", "attention_decode_split", "gemv_bf16"):
        assert launches.counts.get(kernel), kernel


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
    assert cache.cuda.eager_steps == (1 if graphs else 3 * W + 5)


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
