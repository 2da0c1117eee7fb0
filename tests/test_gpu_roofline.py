"""The GPU roofline's numerator and denominator, and the sweep's counts, on the CPU.

notes/bench.py's step_bytes (what a decode step reads: the roofline's numerator) and
notes/gemv_sweep.py's decode_products (which products a step makes and how many of each) are
computed from the config's layer schedule. Here they are compared with the launches
phi4flash.cuda_step_layers makes on the real 32-layer schedule (small widths), and with the real
config's counts that notes/gpu.md quotes: 9 Wqkv and 7 cross-attention Wq launches, 8 layers
reading the shared K/V. The denominator, device_bandwidths' read-only kernel, compiles as
kernels.cu does (nvcc for sm_90 without spills, NVRTC as CuPy calls it); its time is the GPU's.
"""
import collections
import inspect
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import phi4flash as pf
from conftest import ROOT
from test_gpu import random_model
from test_kernels import find_nvcc, nvrtc_compile

sys.path.insert(0, os.path.join(ROOT, "notes"))
import bench  # noqa: E402
import gemv_sweep  # noqa: E402  (importable without CuPy: nothing touches a GPU before main())

SMALL_REAL = pf.Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                       num_attention_heads=8, num_key_value_heads=4, mamba_dt_rank=4,
                       sliding_window=tuple(8 if i % 2 and i < 16 else None for i in range(32)))  # the real schedule


def one_step_launches(model, context):
    """The launches of one decode step after `context` tokens (recorded, not run) -> ([(name, args)], cache)."""
    cache = model.new_cache(context + 4)
    cache.length = context
    for kv in cache.kv.values():
        kv.length = context
    step = pf.new_cuda_step(model, np)
    pf.step_partials(model.config, step, [kv.k.shape[1] for kv in cache.kv.values()], np)
    launches = []
    saved = pf._launch
    pf._launch = lambda twin, grid, block, args: launches.append((twin.__name__, args))
    try:
        pf.cuda_step_layers(model, cache, step)
    finally:
        pf._launch = saved
    return launches, cache


def test_sweep_products_are_the_gemv_launches_of_a_decode_step():
    model = random_model(SMALL_REAL)
    launches, _ = one_step_launches(model, 5)
    seen = collections.Counter()
    for name, a in launches:            # every instance of kernel 7: plain, and the fused _qkv, _conv, _norm
        if name.startswith("gemv_bf16"):
            named = dict(zip(inspect.signature(getattr(pf, name)).parameters, a))
            mode = int(named["mode"]) if "mode" in named else pf.GEMV_RESIDUAL if name.endswith("_norm") else pf.GEMV_PLAIN
            seen[int(named["out_features"]), int(named["in_features"]), mode] += 1
    products = gemv_sweep.decode_products(SMALL_REAL)
    want = collections.Counter()
    for _, out, inp, mode, n in products:   # shapes repeat at these widths (fc2, out_proj: D x d_inner)
        want[out, inp, mode] += n
    assert seen == want
    launched = sum(2 * out * inp * (2 if mode == pf.GEMV_SWIGLU else 1) * n for (out, inp, mode), n in seen.items())
    assert launched == sum(gemv_sweep.weight_bytes(p) * p[4] for p in products)


def test_the_real_configs_counts():
    """The counts notes/gpu.md quotes, from the real config's layer_kinds."""
    cfg = bench.SIZES["real"]
    kinds = collections.Counter(cfg.layer_kinds)
    assert kinds == {"mamba": 9, "swa": 8, "full": 1, "gmu": 7, "cross": 7}
    per_step = {label: n for label, _, _, _, n in gemv_sweep.decode_products(cfg)}
    assert per_step == {"LM head": 1, "mlp fc1 (SwiGLU)": 32, "mlp fc2": 32, "mamba in_proj": 9, "mamba x_proj": 9,
                        "mamba out_proj": 9, "attn Wqkv": 9, "attn Wq (cross)": 7, "attn out_proj": 16,
                        "gmu in_proj": 7, "gmu out_proj": 7}
    assert sum(per_step.values()) == 138 and bench.shared_kv_readers(cfg) == 8
    assert gemv_sweep.SHAPES == gemv_sweep.decode_products(cfg)
    weights = sum(gemv_sweep.weight_bytes(p) * p[4] for p in gemv_sweep.SHAPES)
    assert weights == 7_687_372_800                                       # the products' bf16 weights, per step


@pytest.mark.parametrize("context", [5, 30])  # within and past the window of 8
def test_step_bytes_count_the_shared_kv_once_per_reading_layer_and_each_ring(context):
    model = random_model(SMALL_REAL)
    launches, cache = one_step_launches(model, context)
    shared = cache.shared(SMALL_REAL)
    split = [a for name, a in launches if name.startswith("attention_decode_")]
    reading_shared = [a for a in split if np.shares_memory(a[1], shared.k)]    # its k, the second argument
    assert len(reading_shared) == bench.shared_kv_readers(SMALL_REAL) == 8 and len(split) == 16
    H_kv, hd, W = SMALL_REAL.num_key_value_heads, SMALL_REAL.head_dim, 8
    parts = bench.step_bytes(model, context)
    assert parts["shared_kv"] == len(reading_shared) * 2 * H_kv * context * hd * 4        # K and V of every position
    assert parts["rings"] == (len(split) - len(reading_shared)) * 2 * H_kv * min(context, W) * hd * 4
    assert bench.decode_bytes(model, context) == sum(parts.values())


def test_the_roofline_divides_by_the_read_bandwidth_on_a_gpu(capsys):
    model = random_model(SMALL_REAL)
    assert bench.roofline_s(model, 100, 2e12) == bench.decode_bytes(model, 100) / 2e12
    common = {"size": "real", "dtype": "bfloat16", "weights_GB": 7.72, "cpus": 16, "load_s": 0.3,
              "loadavg_start": (0.0,), "loadavg_end": (0.0,), "prefill": [],
              "decode": [{"context": 2048, "s_per_token": 0.004, "tok_per_s": 250.0, "roofline_s": 0.002,
                          "x_roofline": 2.0, "peak_rss_GB": 0.5}]}
    bench.report({**common, "device": "cuda: X", "read_GBps": 4400.0, "copy_GBps": 4100.0, "roofline_bandwidth": "read"})
    out = capsys.readouterr().out
    assert "read bandwidth 4400.0 GB/s (a read-only kernel: the roofline's denominator)" in out
    assert "copy bandwidth 4100.0 GB/s" in out and "roofline s/token (read)" in out and "| 50% |" in out
    bench.report({**common, "device": "cpu", "copy_GBps": 20.0, "roofline_bandwidth": "copy"})
    assert "copy bandwidth 20.0 GB/s (read + write: the roofline's denominator)" in capsys.readouterr().out


def test_the_read_kernel_compiles_with_nvcc_without_spills(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the compile check needs the CUDA toolkit")
    src = tmp_path / "read_only.cu"
    src.write_text(bench.READ_KERNEL)
    run = subprocess.run([nvcc, "-arch=sm_90", "-cubin", "-o", str(tmp_path / "r.cubin"), "-Xptxas", "-v",
                          "--Werror", "all-warnings", str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    props = re.search(r"Function properties for read_only\n\s*(.*)", run.stdout + run.stderr)
    assert props and props.group(1).strip() == "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"


def test_the_read_kernel_compiles_with_nvrtc_as_cupy_calls_it():
    opts = [b"-arch=compute_90", b"--device-as-default-execution-space"]  # RawKernel's defaults: no -std, no -ftz
    result, log = nvrtc_compile(bench.READ_KERNEL.encode(), b"read_only.cu", opts)
    assert result == 0 and "warning" not in log.lower(), log[-3000:]
