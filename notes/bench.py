"""Benchmark phi4flash on random weights: decode speed against the memory roofline, prefill scaling,
load time and memory. Nothing to download: the checkpoint is generated into a temporary folder.

    python notes/bench.py --size mid --dtype float32
    python notes/bench.py --size mid --dtype bfloat16
    python notes/bench.py --size 169m --dtype int8 --kv-dtype bfloat16
    python notes/bench.py --size real --dtype bfloat16 --contexts 512 --prefill 512 --steps 4
    python notes/bench.py --size real --dtype bfloat16 --device cuda --contexts 512,2048,8192,32768 --prefill 2048,8192,32768

With --device cuda the random weights are generated on the GPU (no checkpoint, no disk), every timing
is bracketed by a device synchronisation, and the peak device memory is the high-water mark of
CuPy's memory pools (emptied before each phase). PHI4FLASH_CUDA_GRAPHS=0 times the decode step
without CUDA graphs. --host-profile (GPU): how much of a step the host takes around its graph.

Roofline: a decode step must read every weight once (the tied embedding as the LM head; int8
matrices with their scales), the sliding-window rings, the shared K/V once per layer that attends
over it (layer L/2+1 and every cross-attention layer, 8 in the real model; 4 or 2 bytes a number with
--kv-dtype) and the Mamba states (step_bytes). Its floor is those bytes divided by a bandwidth
measured in the same run (roofline_s):
  * on a GPU, the read bandwidth of a read-only kernel (device_bandwidths: it streams a buffer far
    larger than L2 and writes one word per block), since a step reads; the copy bandwidth (a
    device-to-device cudaMemcpyAsync, bytes read + written) is reported beside it. notes/gemv_sweep.py
    and notes/gpu.md use the same function.
  * on a CPU, the RAM bandwidth of a STREAM-style copy (bytes read + written; copy_bandwidth).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import convert  # noqa: E402
import phi4flash  # noqa: E402
from phi4flash import Config  # noqa: E402

SIZES = {
    # the 169M-parameter model of the bf16 issue: hidden 1024, 8 layers, 16/8 heads, MLP 4096, vocab 32000, window 128
    "169m": Config(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=8,
                   sliding_window=tuple(128 if i % 2 and i < 4 else None for i in range(8)), mamba_dt_rank=64),
    # a few hundred MB of weights: big enough that decode streams from RAM, small enough to iterate
    "mid": Config(vocab_size=32064, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=8,
                  sliding_window=tuple(512 if i % 2 and i < 8 else None for i in range(16)), mamba_dt_rank=64),
    # the real Phi-4-mini-flash-reasoning shapes (3.85B parameters)
    "real": Config(vocab_size=200064, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
                   num_attention_heads=40, num_key_value_heads=20,
                   sliding_window=tuple(512 if i % 2 and i < 16 else None for i in range(32)), mamba_dt_rank=160),
}


def write_random_model(folder, cfg, dtype, seed=0):
    """A converted folder with random weights scaled so activations stay O(1) through every layer
    (int8 matrices: those weights quantised as convert.py quantises)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    plan = convert.conversion_plan(cfg)
    header, layout = convert.converted_header(cfg, plan, dtype)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(header)
        for name, (shape, stored, offset) in layout.items():
            if name.endswith(".scales"):
                continue                                                # written with its matrix
            last = name.rsplit(".", 1)[-1]
            row = math.prod(shape[1:] or (1,))
            rows = max(1, (8 << 20) // row)
            for r in range(0, shape[0], rows):
                n = min(rows, shape[0] - r)
                part = (n, *shape[1:])
                if last == "A_log":
                    a = np.log(np.broadcast_to(np.arange(1, shape[1] + 1, dtype=np.float32), part))
                elif last in ("weight", "subln", "D") and len(shape) == 1 and "conv1d" not in name:
                    a = np.ones(part, np.float32)
                elif last in ("bias", "bq", "bk", "bv", "out_proj_bias"):
                    a = np.zeros(part, np.float32)
                elif last == "dt_proj_bias":  # softplus(bias) ≈ Δ in [1e-3, 1e-1], as Mamba initialises it
                    dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), part)).astype(np.float32)
                    a = dt + np.log(-np.expm1(-dt))
                elif last.startswith("lambda"):
                    a = (0.1 * rng.standard_normal(part)).astype(np.float32)
                else:
                    fan_in = shape[1] if len(shape) > 1 else 1
                    a = rng.standard_normal(part, dtype=np.float32) / np.float32(math.sqrt(fan_in))
                a = np.ascontiguousarray(a, np.float32)
                f.seek(len(header) + offset + r * row * convert.BYTES[stored])
                if stored == "I8":
                    q, scales = phi4flash.quantize_int8(a)
                    f.write(q.tobytes())
                    f.seek(len(header) + layout[name + ".scales"].offset + r * scales.shape[1] * 4)
                    f.write(scales.tobytes())
                else:
                    f.write((phi4flash.f32_to_bf16(a) if stored == "BF16" else a).tobytes())


def synthetic_cache(model, n, extra, seed=0):
    """A cache that has seen n tokens, its K/V random instead of computed (at the real size a real
    32K-token prefill takes ~17 minutes on 2 cores; a decode step reads the same bytes either way):
    every ring holds the last W positions, the shared buffer n of them, room for `extra` more."""
    rng = np.random.default_rng(seed)
    cache = model.new_cache(n + extra)
    for kv in cache.kv.values():
        slots = kv.k.shape[1] if kv.window else n
        for buf in (kv.k, kv.v):
            for a in range(0, slots, 4096):                            # a few MB at a time
                b = min(slots, a + 4096)
                noise = rng.standard_normal((buf.shape[0], b - a, buf.shape[2]), dtype=np.float32)
                buf[:, a:b] = phi4flash.kv_stored(kv, noise, noise)[0]
        positions = np.arange(max(0, n - slots), n)
        kv.pos[positions % slots if kv.window else positions] = positions
        kv.length = n
    for i in cache.ssm_state:
        cache.ssm_state[i][...] = 0.1 * rng.standard_normal(cache.ssm_state[i].shape, dtype=np.float32)
    cache.length = n
    return cache


def copy_bandwidth(nbytes=512 << 20, repeats=5):
    """Best STREAM-style copy rate in bytes/s (read + write), on arrays far larger than the caches."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    return 2 * a.nbytes / best


def _timed(fn):
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


# --- --device cuda: weights made on the GPU, device bandwidth, device synchronisation and memory

_cupy = None  # set by main() for --device cuda


def _sync():
    if _cupy is not None:
        _cupy.cuda.Device().synchronize()


READ_KERNEL = r'''extern "C" __global__ void read_only(const uint4* p, long long n, unsigned int* out) {
    unsigned int acc = 0;                       // 16-byte loads, grid-stride; xor so no load can be dropped
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        uint4 v = p[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    for (int offset = 16; offset > 0; offset /= 2) acc ^= __shfl_xor_sync(0xffffffffu, acc, offset);
    __shared__ unsigned int warp_acc[32];
    if (threadIdx.x % 32 == 0) warp_acc[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {                     // one word per block: the writes are nothing beside the reads
        for (int w = 1; w < blockDim.x / 32; w++) acc ^= warp_acc[w];
        out[blockIdx.x] = acc;
    }
}'''


def device_bandwidths(cp, nbytes=1 << 30, repeats=5):
    """{"read_GBps", "copy_GBps"} of this GPU, best of `repeats`, each timed by CUDA events on one
    stream: the read-only kernel READ_KERNEL over `nbytes` (8 blocks of 256 threads per SM, far more
    than L2 holds), and a device-to-device cudaMemcpyAsync of `nbytes` (bytes read + written). The
    roofline divides by the read bandwidth (roofline_s); the copy is reported beside it."""
    kernel = cp.RawKernel(READ_KERNEL, "read_only")
    src, dst = cp.zeros(nbytes // 4, cp.uint32), cp.empty(nbytes // 4, cp.uint32)
    blocks = 8 * cp.cuda.Device().attributes["MultiProcessorCount"]
    out = cp.zeros(blocks, cp.uint32)
    stream = cp.cuda.Stream(non_blocking=True)

    def best(fn):
        seconds = []
        for _ in range(repeats + 1):                                      # the first is a warm-up
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            seconds.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
        return min(seconds[1:])
    with stream:
        read = best(lambda: kernel((blocks,), (256,), (src, np.int64(nbytes // 16), out)))
    copy = best(lambda: cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes,
                                                   cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr))
    del src, dst
    return {"read_GBps": nbytes / read / 1e9, "copy_GBps": 2 * nbytes / copy / 1e9}


def random_device_model(cfg, dtype, seed=0):
    """A phi4flash.Model built directly from random CuPy arrays (the layout load(device="cuda")
    gives: bf16 matrices as uint16 bits, or int8 groups as Int8Weight values and scales, float32
    vectors), scaled as write_random_model scales them (int8: uniform q in [-127, 127] and one scale
    for the matrix, about the same variance)."""
    cp = _cupy
    phi4flash.check_cuda_config(cfg)
    rng = cp.random.default_rng(seed)
    tensors = {}
    for name, shape in phi4flash.tensor_shapes(cfg).items():
        last = name.rsplit(".", 1)[-1]
        if last == "A_log":
            a = cp.log(cp.broadcast_to(cp.arange(1, shape[1] + 1, dtype=cp.float32), shape)).copy()
        elif last in ("weight", "subln", "D") and len(shape) == 1 and "conv1d" not in name:
            a = cp.ones(shape, cp.float32)
        elif last in ("bias", "bq", "bk", "bv", "out_proj_bias"):
            a = cp.zeros(shape, cp.float32)
        elif last == "dt_proj_bias":  # softplus(bias) = Δ in [1e-3, 1e-1]
            dt = cp.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape)).astype(cp.float32)
            a = dt + cp.log(-cp.expm1(-dt))
        elif last.startswith("lambda"):
            a = (0.1 * rng.standard_normal(shape, dtype=cp.float32)).astype(cp.float32)
        else:
            fan_in = shape[1] if len(shape) > 1 else 1
            a = rng.standard_normal(shape, dtype=cp.float32) / cp.float32(math.sqrt(fan_in))
        if dtype == "int8" and phi4flash.is_matrix(name) and shape[1] % phi4flash.GROUP == 0:
            q = (rng.integers(0, 255, size=shape, dtype=cp.int32) - 127).astype(cp.int8)
            scale = math.sqrt(3.0 / shape[1]) / 127   # uniform q: variance ≈ 127² / 3 · scale² = 1 / fan_in
            a = phi4flash.Int8Weight(q, cp.full((shape[0], shape[1] // phi4flash.GROUP), scale, cp.float32))
        elif len(shape) == 2 and dtype in ("bfloat16", "int8") and last not in ("A_log", "conv1d_weight"):
            a = (a.view(cp.uint32) >> 16).astype(cp.uint16)  # truncated to bf16 bits: random values anyway
        tensors[name] = a

    def group(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    layers = []
    for i, kind in enumerate(cfg.layer_kinds):
        mixer = kind if kind in ("mamba", "gmu") else "attn"
        layers.append({n: group(f"layers.{i}.{n}.") for n in ("input_layernorm", "post_attention_layernorm", "mlp", mixer)})
    model = phi4flash.Model(cfg, tensors["embed_tokens.weight"], group("final_layernorm."), layers, device="cuda",
                            prefill_chunk=phi4flash.CUDA_PREFILL_CHUNK)
    model.token_mask = np.ones(cfg.vocab_size, bool)
    return phi4flash.fuse_for_decode(model)


def reset_device_peak():
    """Empty CuPy's default pools so their size after a phase is that phase's high-water mark."""
    if _cupy is not None:
        _cupy.get_default_memory_pool().free_all_blocks()


def device_peak():
    """Bytes held by CuPy's default pool (every device array of phi4flash, the decode step's included)."""
    return _cupy.get_default_memory_pool().total_bytes()


def rss():
    """(current, peak) resident set size in bytes, from /proc/self/status."""
    status = open("/proc/self/status").read()
    field = lambda key: int(status.split(key + ":")[1].split()[0]) * 1024  # noqa: E731
    return field("VmRSS"), field("VmHWM")


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


def shared_kv_readers(cfg):
    """Layers of a decode step that read the shared K/V: layer L/2+1 and every cross-attention layer."""
    return sum(kind in ("full", "cross") for kind in cfg.layer_kinds)


def step_bytes(model, context):
    """Bytes a decode step at this context length reads, by part: every weight once, the sliding
    rings (up to W positions each), the shared K/V once per layer that reads it, the Mamba states
    (read and written)."""
    cfg = model.config
    hd, H_kv, kinds = cfg.head_dim, cfg.num_key_value_heads, cfg.layer_kinds
    window = max((w for w in cfg.sliding_window if w), default=0)
    number = np.dtype(phi4flash.KV_DTYPES[model.kv_dtype]).itemsize  # bytes per K/V number: 4, or 2 (bf16)
    return {"weights": sum(t.nbytes for t in weight_tensors(model)),
            "rings": kinds.count("swa") * 2 * H_kv * min(context, window) * hd * number,
            "shared_kv": shared_kv_readers(cfg) * 2 * H_kv * context * hd * number,
            "states": kinds.count("mamba") * 2 * (cfg.d_inner * cfg.mamba_d_state + (cfg.mamba_d_conv - 1) * cfg.d_inner) * 4}


def decode_bytes(model, context):
    """Bytes a decode step at this context length reads: the sum of step_bytes."""
    return sum(step_bytes(model, context).values())


def roofline_s(model, context, bandwidth):
    """The floor of a decode step at this context: its bytes over `bandwidth` (bytes/s), measured in
    the same run: a read-only kernel's on a GPU (device_bandwidths), the copy's on a CPU."""
    return decode_bytes(model, context) / bandwidth


def weight_tensors(model):
    """Every weight array of a loaded model, once (an int8 matrix as its values and its scales): on a
    GPU the split projections are row views of the fused matrices (fuse_for_decode), and only the
    fused ones are counted."""
    def arrays(a):
        return (a.q, a.scales) if isinstance(a, phi4flash.Int8Weight) else (a,)
    yield from arrays(model.embed_tokens)
    yield from model.final_layernorm.values()
    for layer in model.layers:
        for group in layer.values():
            found = [b for a in group.values() for b in arrays(a)]
            yield from (a for a in found if not any(a.base is b for b in found))


def _ms_per_matrix(fn, arrays, x, repeats):
    """Milliseconds of fn(x, W) per matrix W, the best of `repeats` passes over the cycled arrays
    (a first call outside the clock compiles and warms)."""
    fn(x, arrays[0])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for a in arrays:
            fn(x, a)
        best = min(best, time.perf_counter() - t)
    return 1e3 * best / len(arrays)


def bf16_profile(rows=10240, cols=2560, repeats=5):
    """Where a bf16 weight's time goes in a few-row product, on a matrix of the real MLP's shape
    cycled through 8 copies (420 MB) so every read comes from RAM as in decoding: fp32 BLAS on the
    widened weights, the compiled product (phi4flash.bf16_matmul, <= CPU_GEMV_ROWS rows) and the
    NumPy widen-then-BLAS blocks, for 1 to 128 rows (where the compiled product stops paying)."""
    rng = np.random.default_rng(0)
    mats = [convert.f32_to_bf16(rng.standard_normal((rows, cols), dtype=np.float32)) for _ in range(8)]
    f32s = [phi4flash.bf16_to_f32(m) for m in mats[:4]]
    gemv = phi4flash.compiled_gemv()

    def compiled(x, W):
        gemv(x, W, np.empty((x.shape[0], W.shape[0]), np.float32))

    from threadpoolctl import threadpool_limits
    bw = copy_bandwidth()
    print(f"products with a {rows}x{cols} matrix read from RAM; copy bandwidth {bw / 1e9:.1f} GB/s; "
          f"the bf16 floor at that rate: {1e3 * mats[0].nbytes / bw:.2f} ms\n")
    xs = {T: rng.standard_normal((T, cols), dtype=np.float32) for T in (1, 4, 16, 32, 64, 128)}
    # BLAS first, the compiled product last: numba's threads spin a while after each call, and BLAS's
    # threads measured in that while would show the stall the decode step avoids (cpu_threads)
    blas = {T: _ms_per_matrix(lambda x, W: x @ W.T, f32s, x, repeats) for T, x in xs.items()}
    blocks = {T: _ms_per_matrix(phi4flash.bf16_matmul_blocks, mats, x, repeats) for T, x in xs.items()}
    with threadpool_limits(1, "blas"):  # as a compiled step runs
        fast = {T: _ms_per_matrix(compiled, mats, x, repeats) if gemv is not None else float("nan")
                for T, x in xs.items()}
    print("| rows | fp32 BLAS ms | compiled bf16 ms (GB/s) | NumPy widen + BLAS ms (GB/s) |\n|---|---|---|---|")
    gb = lambda t: mats[0].nbytes / t / 1e6  # noqa: E731
    for T in xs:
        print(f"| {T} | {blas[T]:.2f} | {fast[T]:.2f} ({gb(fast[T]):.1f}) | {blocks[T]:.2f} ({gb(blocks[T]):.1f}) |")


def int8_profile(rows=10240, cols=2560, repeats=5):
    """bf16_profile for int8 weights: on the same shapes and the same 8 cycled matrices (their int8
    form, 236 MB with the scales), the compiled int8 product (gemv_int8_cpu) and the dequantised
    blocks through BLAS, next to the compiled bf16 product, for 1 to 128 rows."""
    rng = np.random.default_rng(0)
    f32s = [rng.standard_normal((rows, cols), dtype=np.float32) for _ in range(8)]
    mats = [phi4flash.f32_to_bf16(w) for w in f32s]
    int8s = [phi4flash.Int8Weight(*phi4flash.quantize_int8(w)) for w in f32s]
    del f32s
    bf16, int8 = phi4flash.compiled_gemv(), phi4flash.compiled_gemv_int8()

    def compiled_int8(x, W):
        int8(x, W.q, W.scales, np.empty((x.shape[0], rows), np.float32))

    def compiled_bf16(x, W):
        bf16(x, W, np.empty((x.shape[0], rows), np.float32))

    from threadpoolctl import threadpool_limits
    bw = copy_bandwidth()
    nbytes = int8s[0].nbytes
    print(f"products with a {rows}x{cols} matrix read from RAM; copy bandwidth {bw / 1e9:.1f} GB/s; the int8 floor "
          f"(values + scales, {nbytes / 1e6:.1f} MB) at that rate: {1e3 * nbytes / bw:.2f} ms, bf16's "
          f"{1e3 * mats[0].nbytes / bw:.2f} ms\n")
    xs = {T: rng.standard_normal((T, cols), dtype=np.float32) for T in (1, 4, 16, 32, 64, 128, 512)}
    blocks = {T: _ms_per_matrix(phi4flash.int8_matmul_blocks, int8s, x, repeats) for T, x in xs.items()}
    bf16_blocks = {T: _ms_per_matrix(phi4flash.bf16_matmul_blocks, mats, x, repeats) for T, x in xs.items()}
    with threadpool_limits(1, "blas"):  # as a compiled step runs
        fast = {T: _ms_per_matrix(compiled_int8, int8s, x, repeats) for T, x in xs.items() if T <= 128}
        fast16 = {T: _ms_per_matrix(compiled_bf16, mats, x, repeats) for T, x in xs.items() if T <= 128}
    print("| rows | compiled int8 ms (GB/s) | compiled bf16 ms (GB/s) | int8 blocks + BLAS ms | bf16 blocks + BLAS ms |\n"
          "|---|---|---|---|---|")
    for T in xs:
        compiled = (f"{fast[T]:.2f} ({nbytes / fast[T] / 1e6:.1f}) | {fast16[T]:.2f} ({mats[0].nbytes / fast16[T] / 1e6:.1f})"
                    if T in fast else "| ")
        print(f"| {T} | {compiled} | {blocks[T]:.2f} | {bf16_blocks[T]:.2f} |")


def numba_startup():
    """Seconds to import numba, compile the two kernels and make their first calls, in a fresh
    process with the cache folder given by NUMBA_CACHE_DIR (run it twice: cold, then warm)."""
    t0 = time.perf_counter()
    import numba  # noqa: F401
    t1 = time.perf_counter()
    x, W, y = np.ones((1, 64), np.float32), np.ones((8, 64), np.uint16), np.empty((1, 8), np.float32)
    phi4flash.compiled_gemv()(x, W, y)
    t2 = time.perf_counter()
    k = np.ones((4, 8, 8), np.float32)
    phi4flash.attention_row(np.ones((8, 1, 8), np.float32), k, k, np.ones((1, 8), bool), 0.3, 0.5,
                            np.ones(16, np.float32), 1e-5)
    t3 = time.perf_counter()
    where = phi4flash._gemv.stats.cache_path
    print(json.dumps({"import_numba_s": t1 - t0, "gemv_compile_and_first_call_s": t2 - t1,
                      "attention_compile_and_first_call_s": t3 - t2, "cache_path": where,
                      "cache_hits": sum(phi4flash._gemv.stats.cache_hits.values())}))


class PartTimer:
    """Exclusive wall time of named parts of phi4flash: each wrapped function's time minus the time of
    the wrapped functions it calls, so the parts add up to the step."""

    def __init__(self):
        self.seconds, self._stack = {}, []

    def wrap(self, fn, name):
        def timed(*args, **kw):
            label = name(*args) if callable(name) else name
            self._stack.append(0.0)
            _sync()                                          # on a GPU: the work queued before is not ours
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                _sync()
                elapsed = time.perf_counter() - t
                inner = self._stack.pop()
                self.seconds[label] = self.seconds.get(label, 0.0) + elapsed - inner
                if self._stack:
                    self._stack[-1] += elapsed
        return timed


def decode_profile(model, contexts, steps):
    """Where a decode step's time goes at each context: {context: {part: ms per step}}. 'sample' is
    sampling at temperature 0.6 / top-p 0.95 over the whole vocabulary, as chat does."""
    pf = phi4flash
    head = model.embed_tokens
    parts = {"linear": lambda x, W, b=None: ("LM head" if W is head else "weights (bf16)" if W.dtype == np.uint16
                                              else "weights (int8)" if W.dtype == np.int8 else "weights (fp32)"),
             "layer_norm": "LayerNorms", "causal_conv1d": "Mamba conv", "selective_scan": "Mamba scan",
             "mamba": "Mamba elementwise", "mlp": "MLP SwiGLU elementwise", "gmu": "GMU elementwise",
             "attend": lambda q, k, v, qpos, kpos, window, *a: "sliding-window attention" if window else
             "shared-K/V attention (layer L/2+1 + cross)",
             "self_attention": "attention projections glue", "cross_attention": "attention projections glue",
             "kv_ring": "K/V cache writes", "kv_append": "K/V cache writes", "extend": "layer loop glue",
             "sample": "sample"}
    rng = np.random.default_rng(1)
    out = {}
    for ctx in contexts:
        timer = PartTimer()
        saved = {n: getattr(pf, n) for n in parts}
        _, cache = model.prefill(rng.integers(0, model.config.vocab_size, ctx), model.new_cache(ctx + steps + 4))
        token, sampler = 1, np.random.default_rng(0)
        for _ in range(2):
            token = int(np.argmax(model.step(cache, token)))
        try:
            for n, label in parts.items():
                setattr(pf, n, timer.wrap(saved[n], label))
            t = time.perf_counter()
            for _ in range(steps):
                logits = model.step(cache, token)
                token = pf.sample(logits, model.token_mask, 0.6, 0, 0.95, sampler)
            total = time.perf_counter() - t
        finally:
            for n, fn in saved.items():
                setattr(pf, n, fn)
        ms = {k: 1e3 * v / steps for k, v in sorted(timer.seconds.items(), key=lambda kv: -kv[1])}
        ms["other (Model.step, to_numpy)"] = 1e3 * total / steps - sum(ms.values())
        out[ctx] = {"total_ms": 1e3 * total / steps, "parts_ms": ms}
    return out


def prefill_profile(model, n):
    """Where an n-token prefill's time goes: {"total_ms", "parts_ms"} (on a GPU each timed part is
    synchronised before and after, so the parts add up to a slightly slower prefill)."""
    pf = phi4flash
    gpu = model.device == "cuda"
    parts = {"matmul_t": lambda x, W, out: ("products, TF32" if gpu and pf.CUDA_TF32 and
                                            x.shape[0] * x.shape[1] * W.shape[0] >= pf.TF32_MIN_MACS else "products, fp32"),
             "bf16_to_f32": "widening bf16 weights", "layer_norm": "LayerNorms",
             "cuda_attend" if gpu else "attend": lambda q, k, v, qpos, kpos, window, *a: (
                 "sliding-window attention" if window else "full attention (layer L/2+1)"),
             "kv_ring": "K/V cache writes", "kv_append": "K/V cache writes"}
    if gpu:
        parts.update({"cuda_conv1d_silu": "Mamba conv", "cuda_selective_scan": "Mamba scan",
                      "cuda_layers": "layer loop glue (element-wise ops)"})
    else:
        parts.update({"causal_conv1d": "Mamba conv", "selective_scan": "Mamba scan", "extend": "layer loop glue",
                      "linear": "products (linear)"})
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, n)
    model.prefill(ids[:min(n, 64)], model.new_cache(n + 1))             # warm-up: kernel compiles, first touches
    timer, saved = PartTimer(), {name: getattr(pf, name) for name in parts}
    cache = model.new_cache(n + 1)
    try:
        for name, label in parts.items():
            setattr(pf, name, timer.wrap(saved[name], label))
        _sync()
        t = time.perf_counter()
        model.prefill(ids, cache)
        _sync()
        total = time.perf_counter() - t
    finally:
        for name, fn in saved.items():
            setattr(pf, name, fn)
    ms = {k: 1e3 * v for k, v in sorted(timer.seconds.items(), key=lambda kv: -kv[1])}
    ms["other"] = 1e3 * total - sum(ms.values())
    return {"tokens": n, "total_ms": 1e3 * total, "parts_ms": ms}


def print_profile(profile):
    for ctx, p in profile.items():
        print(f"\ndecode step at context {ctx}: {p['total_ms']:.2f} ms (with sampling)\n| part | ms | share |\n|---|---|---|")
        for part, ms in p["parts_ms"].items():
            print(f"| {part} | {ms:.2f} | {100 * ms / p['total_ms']:.1f}% |")


# --- --kernels: time and bandwidth of each kernel launch of a decode step, as llm.c's dev/cuda does

def _param(args, names, name):
    return args[names.index(name)]


def kernel_bytes(twin, args):
    """DRAM bytes of one launch, from the traffic formula in the kernel's header in kernels.cu."""
    import inspect
    names = [n.rstrip("_") for n in inspect.signature(twin).parameters]
    get = lambda n: _param(args, names, n)  # noqa: E731
    i = lambda n: int(get(n))  # noqa: E731
    name = twin.__name__
    if name == "conv1d_silu_prefill":
        return 8 * i("T") * i("d_inner")
    if name == "conv1d_silu_step":
        return 4 * i("d_inner") * (2 * i("d_conv") + 2)
    if name == "scan_prefill":
        return 20 * i("T") * i("d_inner") + 8 * i("d_inner") * i("d_state")
    if name == "scan_step":
        return 4 * i("d_inner") * i("dt_rank") + 12 * i("d_inner") * i("d_state") + 20 * i("d_inner")
    if name in ("attention_prefill_f32", "attention_prefill_bf16"):
        T, S, H, H_kv, hd = i("T"), i("S"), i("H"), i("H_kv"), i("head_dim")
        BQ, W, kv = 64 // (2 * (H // H_kv)), i("window") or S, get("k").dtype.itemsize
        return 8 * T * H * hd + 4 * hd * kv * min(S, BQ + W) * -(-T // BQ) * H_kv // 2
    if name in ("attention_decode_f32", "attention_decode_bf16"):   # the live slots' K/V once, the partials twice
        hd, H, H_kv, kv = i("head_dim"), i("H"), i("H_kv"), get("k").dtype.itemsize
        live = min(i("S"), int(phi4flash.to_numpy(get("qpos")).reshape(-1)[0]) + 1)
        return (4 * hd * kv + 8) * live * H_kv // 2 + 8 * i("n_splits") * H * (2 * hd + 2) + 8 * H * hd
    if name.startswith("gemv_"):                # gemv_<format>[_<epilogue>]: the fused ones are one row
        epilogue = name.split("_")[2] if name.count("_") > 1 else ""
        out, inp = i("out_features"), i("in_features")
        rows, mode = (i("rows"), i("mode")) if "mode" in names else (1, phi4flash.GEMV_PLAIN)
        w = (get("W").nbytes + (get("scales").nbytes if "scales" in names else 0)) // get("W").shape[0] * out
        w *= 2 if mode == phi4flash.GEMV_SWIGLU else 1
        moved = 4 * rows * inp + 4 * rows * out * (2 if mode in (phi4flash.GEMV_RESIDUAL, phi4flash.GEMV_GATE) else 1)
        if epilogue.startswith("qkv"):
            moved += get("k_cache").itemsize * (out - i("q_features"))
        elif epilogue == "conv":
            moved += 4 * (out // 2) * (3 * i("d_conv") - 1)
        elif epilogue == "norm":
            moved += 20 * out
        return w + moved
    if name == "layer_norm_rows":
        return 8 * get("x").size + 8 * i("D")
    if name.startswith("embed_"):
        row = get("E").itemsize * i("D") + (4 * i("D") // phi4flash.GROUP if name == "embed_int8" else 0)
        return row + 4 * i("D")
    raise KeyError(f"{name}: no traffic formula (add the one in its kernels.cu header)")


def kernel_profile(model, context, steps):
    """Run `steps` eager decode steps (no CUDA graph) at this context and time every launch with
    CUDA events (perf_counter on the CPU twins): {kernel: {"launches", "ms", "MB", "GBps"}} per step."""
    pf = phi4flash
    rng = np.random.default_rng(2)
    _, cache = model.prefill(rng.integers(0, model.config.vocab_size, context), model.new_cache(context + steps + 4))
    token = int(np.argmax(model.step(cache, 1)))                          # compiles every kernel
    launch, graphs, stats = pf._launch, pf.CUDA_GRAPHS, {}

    def timed(twin, grid, block, args):
        if _cupy is not None:
            start, end = _cupy.cuda.Event(), _cupy.cuda.Event()
            start.record()
            launch(twin, grid, block, args)
            end.record()
            pending.append((twin.__name__, start, end, kernel_bytes(twin, args)))
        else:
            t = time.perf_counter()
            launch(twin, grid, block, args)
            pending.append((twin.__name__, time.perf_counter() - t, None, kernel_bytes(twin, args)))
    pending = []
    try:
        pf._launch, pf.CUDA_GRAPHS = timed, False
        for _ in range(steps):
            token = int(np.argmax(model.step(cache, token)))
    finally:
        pf._launch, pf.CUDA_GRAPHS = launch, graphs
    for name, start, end, nbytes in pending:
        seconds = _cupy.cuda.get_elapsed_time(start, end) / 1e3 if _cupy is not None else start
        k = stats.setdefault(name, {"launches": 0, "ms": 0.0, "MB": 0.0})
        k["launches"] += 1 / steps
        k["ms"] += 1e3 * seconds / steps
        k["MB"] += nbytes / 1e6 / steps
    for k in stats.values():
        k["GBps"] = k["MB"] / k["ms"] if k["ms"] else 0.0
    return dict(sorted(stats.items(), key=lambda kv: -kv[1]["ms"]))


def print_kernels(r):
    for ctx, stats in r["kernels"].items():
        total = sum(k["ms"] for k in stats.values())
        print(f"\nkernels of one decode step at context {ctx} (eager, events around each launch): "
              f"{sum(k['launches'] for k in stats.values()):.0f} launches, {total:.3f} ms of kernel time\n"
              "| kernel | launches | ms | MB | GB/s |\n|---|---|---|---|---|")
        for name, k in stats.items():
            print(f"| {name} | {k['launches']:.0f} | {k['ms']:.3f} | {k['MB']:.1f} | {k['GBps']:.0f} |")


# --- --host-profile: the host's part of a decode step that replays a CUDA graph

def host_profile(model, context, steps):
    """At this context: model.step()'s wall time (median of `steps`), the decode graph's own device
    time (CUDA events around `steps` launches back to back, nothing on the host between them) and
    their difference, the time per step the GPU waits for the host; beside it the host's parts of a
    step, each timed alone: _graph_key, the graph's launch call, the copy of the logits out of the
    pinned buffer. The back-to-back launches replay one position, so the cache is spent afterwards."""
    pf = phi4flash
    rng = np.random.default_rng(3)
    _, cache = model.prefill(rng.integers(0, model.config.vocab_size, context), model.new_cache(context + steps + 8))
    token = 1
    for _ in range(3):                                                    # eager (compiles), captured, replayed
        token = int(np.argmax(model.step(cache, token)))
    step, stream = cache.cuda, pf.model_stream(model)
    if step.graph is None:
        raise SystemExit(f"error: --host-profile: the decode step was not captured as a graph "
                         f"({step.graph_error or 'PHI4FLASH_CUDA_GRAPHS=0'})")
    walls = []
    for _ in range(steps):
        t = time.perf_counter()
        logits = model.step(cache, token)
        walls.append(time.perf_counter() - t)
        token = int(np.argmax(logits))

    def host_us(fn, n=200):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return 1e6 * (time.perf_counter() - t) / n
    key_us = host_us(lambda: pf._graph_key(model, cache, step))
    copy_us = host_us(lambda: step.host_logits.copy())
    start, end = _cupy.cuda.Event(), _cupy.cuda.Event()
    start.record(stream)
    t = time.perf_counter()
    for _ in range(steps):
        step.graph.launch(stream)
    launch_us = 1e6 * (time.perf_counter() - t) / steps
    end.record(stream)
    end.synchronize()
    graph_ms = _cupy.cuda.get_elapsed_time(start, end) / steps
    step_ms = 1e3 * float(np.median(walls))
    return {"context": context, "model_step_ms": step_ms, "graph_ms": graph_ms, "host_ms": step_ms - graph_ms,
            "graph_key_us": key_us, "launch_call_us": launch_us, "logits_copy_us": copy_us}


def print_host_profile(rows):
    print("\nthe host around a decode step's CUDA graph (model.step wall time, median; the graph alone, "
          "launched back to back)\n| context | model.step ms | graph ms | host ms (the difference) | "
          "_graph_key us | launch call us | logits copy us |\n|---|---|---|---|---|---|---|")
    for h in rows:
        print(f"| {h['context']} | {h['model_step_ms']:.3f} | {h['graph_ms']:.3f} | {h['host_ms']:.3f} | "
              f"{h['graph_key_us']:.1f} | {h['launch_call_us']:.1f} | {h['logits_copy_us']:.1f} |")


def bandwidth_line(r):
    """The run's bandwidths, the roofline's denominator named."""
    if "read_GBps" in r:
        return (f"read bandwidth {r['read_GBps']:.1f} GB/s (a read-only kernel: the roofline's denominator), "
                f"copy bandwidth {r['copy_GBps']:.1f} GB/s (read + write)")
    return f"copy bandwidth {r['copy_GBps']:.1f} GB/s (read + write: the roofline's denominator)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="mid")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "int8"), default="float32", help="weight matrices in RAM")
    ap.add_argument("--kv-dtype", choices=tuple(phi4flash.KV_DTYPES), default="float32", help="the K/V cache")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--contexts", default="512,2048", help="decode contexts, comma-separated")
    ap.add_argument("--prefill", default="512,2048,8192", help="prefill lengths, comma-separated")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per context")
    ap.add_argument("--model", help="use this converted folder instead of generating one")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--bf16-profile", action="store_true", help="only: where a bf16 weight's time goes (CPU)")
    ap.add_argument("--int8-profile", action="store_true", help="only: the same for an int8 weight, beside bf16 (CPU)")
    ap.add_argument("--numba-startup", action="store_true", help="only: numba's import, compile and first-call times")
    ap.add_argument("--kernels", action="store_true",
                    help="also: each kernel's time and GB/s in a decode step (from its header's traffic formula)")
    ap.add_argument("--prefill-profile", action="store_true",
                    help="also: where the first --prefill length's time goes (timers on phi4flash's functions)")
    ap.add_argument("--host-profile", action="store_true",
                    help="also: the host's time around a decode step's CUDA graph at each context (GPU)")
    ap.add_argument("--profile", action="store_true",
                    help="also: where a decode step's time goes at each context (CPU; timers on phi4flash's functions)")
    args = ap.parse_args(argv)
    if args.bf16_profile:
        bf16_profile()
        return 0
    if args.int8_profile:
        int8_profile()
        return 0
    if args.numba_startup:
        numba_startup()
        return 0
    cfg = SIZES[args.size]
    tmp = None
    results = {"size": args.size, "dtype": args.dtype, "kv_dtype": args.kv_dtype, "device": args.device,
               "cpus": os.cpu_count(), "command": "python notes/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "loadavg_start": os.getloadavg()}  # others' work on the machine: a busy one reads slower
    global _cupy
    if args.device == "cuda":
        try:
            _cupy = phi4flash.require_cupy()
        except phi4flash.Phi4FlashError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        name = _cupy.cuda.runtime.getDeviceProperties(_cupy.cuda.Device().id)["name"]
        results["device"] = f"cuda: {name.decode() if isinstance(name, bytes) else name}"
    try:
        if args.device == "cuda" and not args.model:
            bandwidths = device_bandwidths(_cupy)
            t = time.perf_counter()
            model = random_device_model(cfg, args.dtype)
            model.kv_dtype = args.kv_dtype                                # its caches' K/V, as load(kv_dtype=) sets it
            _sync()
            results["load_s"] = results["generate_s"] = time.perf_counter() - t
        else:
            if args.model:
                folder = args.model
            else:
                tmp = tempfile.mkdtemp(prefix="phi4flash-bench-", dir=os.environ.get("PHI4FLASH_BENCH_DIR"))
                folder = os.path.join(tmp, "model")
                results["generate_s"] = _timed(lambda: write_random_model(folder, cfg, args.dtype))
            bandwidths = device_bandwidths(_cupy) if _cupy is not None else {"copy_GBps": copy_bandwidth() / 1e9}
            reset_peak_rss()
            t = time.perf_counter()
            model = phi4flash.load(folder, device=args.device, kv_dtype=args.kv_dtype)
            results["load_s"] = time.perf_counter() - t
        results.update(bandwidths)  # the roofline's denominator: read on a GPU, copy on a CPU
        results["roofline_bandwidth"] = "read" if "read_GBps" in bandwidths else "copy"
        bw = 1e9 * bandwidths[results["roofline_bandwidth"] + "_GBps"]
        results["weights_GB"] = sum(t.nbytes for t in weight_tensors(model)) / 1e9
        rng = np.random.default_rng(0)
        results["decode"] = []
        for ctx in [int(c) for c in args.contexts.split(",") if c]:
            reset_peak_rss()
            reset_device_peak()
            ids = rng.integers(0, model.config.vocab_size, ctx)
            _, cache = model.prefill(ids, model.new_cache(ctx + args.steps + 2))
            token = 1
            for _ in range(2):  # warm-up: first touches of the mapped weights, thread pool start; on a GPU
                token = int(np.argmax(model.step(cache, token)))  # kernel compiles and the CUDA graph capture
            times = []
            for _ in range(args.steps):  # model.step returns host logits: each step ends synchronised
                t = time.perf_counter()
                token = int(np.argmax(model.step(cache, token)))
                times.append(time.perf_counter() - t)
            per_token = float(np.median(times))  # the median step: robust to a noisy neighbour on a shared machine
            floor = roofline_s(model, ctx + 2 + args.steps // 2, bw)
            results["decode"].append({"context": ctx, "s_per_token": per_token, "tok_per_s": 1 / per_token,
                                      "mean_s_per_token": float(np.mean(times)),
                                      "roofline_s": floor, "x_roofline": per_token / floor,
                                      "share_of_roofline": floor / per_token,
                                      "peak_rss_GB": rss()[1] / 1e9})
            if _cupy is not None:
                results["decode"][-1]["peak_device_GB"] = device_peak() / 1e9
            del cache
        if args.kernels:
            if model.device != "cuda":
                raise SystemExit("error: --kernels times kernels.cu's kernels: add --device cuda")
            results["kernels"] = {c: kernel_profile(model, c, args.steps) for c in
                                  [int(c) for c in args.contexts.split(",") if c]}
        if args.host_profile:
            if model.device != "cuda":
                raise SystemExit("error: --host-profile times the host around a CUDA graph: add --device cuda")
            results["host_profile"] = [host_profile(model, c, max(args.steps, 32)) for c in
                                       [int(c) for c in args.contexts.split(",") if c]]
        if args.profile:
            results["profile"] = decode_profile(model, [int(c) for c in args.contexts.split(",") if c], args.steps)
        results["prefill"] = []
        for n in [int(c) for c in args.prefill.split(",") if c]:
            reset_peak_rss()
            reset_device_peak()
            ids = rng.integers(0, model.config.vocab_size, n)
            cache = model.new_cache(n + 1)
            seconds = _timed(lambda: model.prefill(ids, cache))
            results["prefill"].append({"tokens": n, "s": seconds, "tok_per_s": n / seconds, "peak_rss_GB": rss()[1] / 1e9})
            if _cupy is not None:
                results["prefill"][-1]["peak_device_GB"] = device_peak() / 1e9
            del cache
        if args.prefill_profile:
            results["prefill_profile"] = prefill_profile(model, [int(c) for c in args.prefill.split(",") if c][0])
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_end"] = os.getloadavg()
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def report(r):
    print(f"size {r['size']}, {r['dtype']} weights ({r['weights_GB']:.2f} GB), {r.get('kv_dtype', 'float32')} K/V, "
          f"device {r['device']}, {r['cpus']} CPUs; "
          f"{bandwidth_line(r)}; load {r['load_s']:.3f} s; load average "
          f"{r['loadavg_start'][0]:.2f} at the start, {r['loadavg_end'][0]:.2f} at the end")
    if "peak_device_GB" in (r["decode"] or r["prefill"] or [{}])[0]:
        print("\npeak device memory (CuPy pools' high-water mark, GB): decode "
              + ", ".join(f"{d['context']}: {d['peak_device_GB']:.2f}" for d in r["decode"]) + "; prefill "
              + ", ".join(f"{p['tokens']}: {p['peak_device_GB']:.2f}" for p in r["prefill"]))
    print(f"\n| context | s/token (median step) | tok/s | roofline s/token ({r.get('roofline_bandwidth', 'copy')}) | "
          "time / roofline | share of the roofline | peak RSS GB |\n|---|---|---|---|---|---|---|")
    for d in r["decode"]:
        print(f"| {d['context']} | {d['s_per_token']:.4f} | {d['tok_per_s']:.1f} | {d['roofline_s']:.4f} | "
              f"{d['x_roofline']:.2f} | {d['roofline_s'] / d['s_per_token']:.0%} | {d['peak_rss_GB']:.2f} |")
    print("\n| prompt tokens | prefill s | tok/s | peak RSS GB |\n|---|---|---|---|")
    for p in r["prefill"]:
        print(f"| {p['tokens']} | {p['s']:.3f} | {p['tok_per_s']:.0f} | {p['peak_rss_GB']:.2f} |")
    if "profile" in r:
        print_profile(r["profile"])
    if "kernels" in r:
        print_kernels(r)
    if "host_profile" in r:
        print_host_profile(r["host_profile"])
    if "prefill_profile" in r:
        p = r["prefill_profile"]
        print(f"\nprefill of {p['tokens']} tokens, timed part by part: {p['total_ms']:.1f} ms\n| part | ms | share |\n|---|---|---|")
        for k, v in p["parts_ms"].items():
            print(f"| {k} | {v:.1f} | {v / p['total_ms']:.0%} |")
    lens = {p["tokens"]: p["s"] for p in r["prefill"]}
    for n in sorted(lens):
        if 4 * n in lens:
            print(f"\nT({4 * n}) / T({n}) = {lens[4 * n] / lens[n]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
