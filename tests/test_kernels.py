"""kernels.cu, checked three ways.

1. On the CPU, always: each kernel's NumPy twin (phi4flash.py, appendix A: same name,
   same parameters, same tiling / online softmax / split reduction / state layout) against the
   model's own functions (causal_conv1d, selective_scan_sequential, attend, linear), including
   T < W, T not a multiple of the tile, T >> W and batch 1. Every launch is also checked against
   the kernel's C signature (argument count, names, dtypes, contiguity, strides, block size).
2. kernels.cu compiles: nvcc for sm_90 with warnings as errors and no register spills, and NVRTC
   with CuPy's options when a libnvrtc is on this machine. Skipped, with the reason, when absent.
3. On a GPU: each kernel against its twin. Skipped, with the reason, without CuPy or a CUDA device.
"""
import ctypes
import glob
import inspect
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import phi4flash as pf
from conftest import cupy_or_skip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS_CU = os.path.join(ROOT, "kernels.cu")
TOL = 1e-5


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def bf16_bits(a):
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


# ------------------------------------------------------------------------------------------------
# kernels.cu parsed: signatures and #defines

C_TYPES = {"const float*": np.float32, "float*": np.float32, "const long long*": np.int64, "long long*": np.int64,
           "const unsigned short*": np.uint16, "unsigned short*": np.uint16, "const signed char*": np.int8,
           "int*": np.int32, "int": np.int32, "long long": np.int64, "float": np.float32}


def kernel_signatures():
    """{kernel name: [(C type, parameter name), ...]} for every extern "C" __global__ function."""
    src = open(KERNELS_CU).read()
    found = {}
    pattern = r'extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\(([^)]*)\)'
    for name, params in re.findall(pattern, src):
        found[name] = []
        for p in params.split(","):
            p = " ".join(p.split()).removeprefix("IMMUTABLE ")            # (a marker for the PDL rules, no type)
            m = re.fullmatch(r"(.*?\*?)\s*(\w+)", p)
            ctype = m.group(1).replace(" *", "*").strip()
            found[name].append((ctype, m.group(2)))
    return found


SIGNATURES = kernel_signatures()
TWINS = [pf.conv1d_silu_prefill, pf.conv1d_silu_step, pf.scan_prefill, pf.scan_step, pf.attention_prefill_f32,
         pf.attention_prefill_bf16, pf.attention_decode_f32, pf.attention_decode_bf16, *pf.GEMV_INSTANCES.values(),
         pf.layer_norm_rows, pf.embed_bf16, pf.embed_f32, pf.embed_int8]


def test_every_kernel_has_a_twin_with_its_parameters():
    assert sorted(SIGNATURES) == sorted(t.__name__ for t in TWINS)
    for twin in TWINS:
        c_names = [name for _, name in SIGNATURES[twin.__name__]]
        py_names = [n.rstrip("_") for n in inspect.signature(twin).parameters]  # lambda_ <-> lambda
        assert py_names == c_names, twin.__name__
        assert all(ctype in C_TYPES for ctype, _ in SIGNATURES[twin.__name__]), SIGNATURES[twin.__name__]


def test_python_constants_match_kernels_cu_defines():
    defines = dict(re.findall(r"^#define (\w+) (\d+)", open(KERNELS_CU).read(), re.M))
    shared = [n for n in defines if hasattr(pf, n)]
    assert len(shared) >= 10, shared
    for name in shared:
        assert getattr(pf, name) == int(defines[name]), name
    assert pf.DECODE_KEYS * pf.DECODE_MAX_QUERIES == pf.DECODE_THREADS  # a thread per (query, key) of a tile


class LaunchChecker:
    """Stands in for pf._launch: checks each launch against the kernel's C signature the way the
    GPU would need it, then runs the twin. Counts launches per kernel."""

    def __init__(self, real):
        self.real, self.counts = real, {}

    def __call__(self, twin, grid, block, args):
        name = twin.__name__
        sig = SIGNATURES[name]
        assert len(args) == len(sig), (name, len(args), len(sig))
        values = {}
        for (ctype, pname), a in zip(sig, args):
            want = C_TYPES[ctype]
            if ctype.endswith("*"):
                on_device = type(a).__module__.startswith("cupy")             # the GPU-only tests launch CuPy arrays
                assert (isinstance(a, np.ndarray) or on_device) and a.dtype == want, (name, pname, type(a), getattr(a, "dtype", None))
                if pname not in ("k", "v"):
                    assert a.flags.c_contiguous, (name, pname, a.strides)
            else:
                assert type(a) is want, (name, pname, type(a))  # a Python int would reach the GPU as 8 bytes
            values[pname] = a
        if "kv_head_stride" in values:  # K/V rows contiguous, heads kv_head_stride values apart
            hd = int(values["head_dim"])
            for pname in ("k", "v"):
                size = values[pname].itemsize
                assert values[pname].strides == (size * int(values["kv_head_stride"]), size * hd, size), (name, pname)
        threads = math.prod(block)
        assert 32 <= threads <= 1024 and threads % 32 == 0, (name, block)
        assert len(grid) <= 3 and all(g >= 1 for g in grid) and (len(grid) < 2 or grid[1] <= 65535), (name, grid)
        self.counts[name] = self.counts.get(name, 0) + 1
        return self.real(twin, grid, block, args)


@pytest.fixture
def checked(monkeypatch):
    checker = LaunchChecker(pf._launch)
    monkeypatch.setattr(pf, "_launch", checker)
    return checker


# ------------------------------------------------------------------------------------------------
# 1. Twins against the model's functions (CPU)

@pytest.mark.parametrize("T", [1, 2, 3, 37])
def test_conv1d_silu_twins_equal_causal_conv1d(checked, T):
    rng = np.random.default_rng(T)
    d_inner, d_conv = 40, 4
    x, state = rand(rng, T, d_inner), rand(rng, d_conv - 1, d_inner)
    w, b = rand(rng, d_inner, d_conv), rand(rng, d_inner)
    want, want_state = pf.causal_conv1d(x, state, w, b)
    state_inout = state.copy()
    got = pf.cuda_conv1d_silu(x, state_inout, w, b)                     # step kernel for T = 1
    assert np.abs(got - pf.silu(want)).max() < TOL
    assert np.array_equal(state_inout, want_state)                      # updated in place
    out = np.empty_like(x)
    pf.conv1d_silu_prefill(x, state, w, b, out, T, d_inner, d_conv)     # the prefill kernel at any T
    assert np.abs(out - pf.silu(want)).max() < TOL
    assert checked.counts == {"conv1d_silu_step" if T == 1 else "conv1d_silu_prefill": 1}


# Cases shared with tests/test_cuda_cpu.py, which runs them through the real kernels: each returns
# [(what, got, want)], `got` from the GPU code path (whatever _launch runs), `want` from the model.

def scan_case(T, E=40, N=16):
    """Random scan inputs (x, dt, dt_bias, A_log, B, C, D, z), the start state and the sequential
    scan's (y, h). 40 channels: a full block of 32 and a partial one."""
    rng = np.random.default_rng(100 + T)
    x, dt, z = rand(rng, T, E), rand(rng, T, E), rand(rng, T, E)
    dt_bias, D = rand(rng, E), rand(rng, E)
    A_log = np.log(np.tile(np.arange(1, N + 1, dtype=np.float32), (E, 1))) + rand(rng, E, N, scale=0.1)
    B, C, h0 = rand(rng, T, N), rand(rng, T, N), rand(rng, E, N)
    want_y, want_h = pf.selective_scan_sequential(x, pf.softplus(dt + dt_bias), -np.exp(A_log), B, C, D, h0)
    return (x, dt, dt_bias, A_log, B, C, D, z), h0, want_y, want_h


def scan_checks(T, E=40, N=16):
    args, h0, want_y, want_h = scan_case(T, E, N)
    h = h0.copy()
    y, y_gated = pf.cuda_selective_scan(*args, h)
    return [("y", y, want_y), ("ssm_state", h, want_h), ("y_gated", y_gated, want_y * pf.silu(args[7]))]


def scan_step_checks(R, N, E=40):
    """The decode step's scan: Δ = softplus(dt_low·dt_projᵀ + bias) with [dt_low | B | C] read from
    x_proj's one output, then one step of the recurrence."""
    rng = np.random.default_rng(R + N)
    x, z, xdbc = rand(rng, 1, E), rand(rng, 1, E), rand(rng, 1, R + 2 * N)
    dt_proj, dt_bias, D = rand(rng, E, R, scale=R ** -0.5), rand(rng, E), rand(rng, E)
    A_log = np.log(np.tile(np.arange(1, N + 1, dtype=np.float32), (E, 1)))
    h0 = rand(rng, E, N)
    delta = pf.softplus(xdbc[:, :R] @ dt_proj.T + dt_bias)
    want_y, want_h = pf.selective_scan_sequential(x, delta, -np.exp(A_log), xdbc[:, R:R + N], xdbc[:, R + N:], D, h0)
    h, y, y_gated = h0.copy(), np.empty((1, E), np.float32), np.empty((1, E), np.float32)
    pf._launch(pf.scan_step, (pf._blocks(E, pf.SCAN_CHANNELS),), (pf.SCAN_CHANNELS * N,),
               (x, xdbc, dt_proj, dt_bias, A_log, D, z, h, y, y_gated, np.int32(E), np.int32(N), np.int32(R)))
    return [("y", y, want_y), ("ssm_state", h, want_h), ("y_gated", y_gated, want_y * pf.silu(z))]


@pytest.mark.parametrize("T", [1, 5, 33, 100])
def test_scan_twins_equal_selective_scan_sequential(checked, T):
    """softplus(dt + bias), A = -exp(A_log), D skip, z gate fused; the state carried across calls."""
    for what, got, want in scan_checks(T):
        assert np.abs(got - want).max() < TOL, what
    if T > 1:  # the same sequence in two calls, the second one token long (a decode step)
        (x, dt, dt_bias, A_log, B, C, D, z), h0, want_y, want_h = scan_case(T)
        h2 = h0.copy()
        y_a, _ = pf.cuda_selective_scan(x[:-1], dt[:-1], dt_bias, A_log, B[:-1], C[:-1], D, z[:-1], h2)
        y_b, _ = pf.cuda_selective_scan(x[-1:], dt[-1:], dt_bias, A_log, B[-1:], C[-1:], D, z[-1:], h2)
        assert np.abs(np.concatenate([y_a, y_b]) - want_y).max() < TOL and np.abs(h2 - want_h).max() < TOL
    assert checked.counts == {"scan_prefill": 3 if T > 1 else 1}          # every call, T = 1 too


@pytest.mark.parametrize("R,N", [(4, 16), (160, 16), (7, 8)])
def test_scan_step_twin_fuses_dt_proj(checked, R, N):
    """The decode step's fused scan (1e-5: the same fp32 operations)."""
    for what, got, want in scan_step_checks(R, N):
        assert np.abs(got - want).max() < TOL, what


def random_mamba_layer(rng, D, E, N, R, d_conv=4):
    return {"in_proj_x": bf16_bits(rand(rng, E, D, scale=D ** -0.5)), "in_proj_z": bf16_bits(rand(rng, E, D, scale=D ** -0.5)),
            "conv1d_weight": rand(rng, E, d_conv, scale=0.5), "conv1d_bias": rand(rng, E, scale=0.1),
            "x_proj_dt": bf16_bits(rand(rng, R, E, scale=E ** -0.5)), "x_proj_B": bf16_bits(rand(rng, N, E, scale=E ** -0.5)),
            "x_proj_C": bf16_bits(rand(rng, N, E, scale=E ** -0.5)), "dt_proj": bf16_bits(rand(rng, E, R, scale=R ** -0.5)),
            "dt_proj_bias": rand(rng, E, scale=0.5) - 3.0,
            "A_log": np.log(np.tile(np.arange(1, N + 1, dtype=np.float32), (E, 1))), "D": np.ones(E, np.float32),
            "out_proj": bf16_bits(rand(rng, D, E, scale=E ** -0.5))}


def mamba_checks(T):
    rng = np.random.default_rng(200 + T)
    D, E, N, R = 48, 96, 16, 4   # R = 4: in_features not a multiple of 8 -> the GEMV's scalar path
    p = random_mamba_layer(rng, D, E, N, R)
    u = rand(rng, T, D)
    conv0, ssm0 = rand(rng, 3, E), rand(rng, E, N, scale=0.1)
    want = pf.mamba(u, p, conv0.copy(), ssm0.copy())
    conv, ssm = conv0.copy(), ssm0.copy()
    got = (*pf.cuda_mamba(u, p, conv, ssm), conv, ssm)                   # the states are updated in place
    return [(name, g, w) for g, w, name in zip(got, want, ("out", "y", "conv_state", "ssm_state"))]


@pytest.mark.parametrize("T", [1, 7, 40])
def test_cuda_mamba_equals_mamba(checked, T):
    """The whole GPU mixer (GEMV below 9 rows, widened-tile matmul above) vs mamba(), states included."""
    for name, g, w in mamba_checks(T):
        assert np.abs(g - w).max() < 1e-4, name
    assert ("gemv_bf16" in checked.counts) == (T <= pf.GEMV_MAX_ROWS)


def attention_case(rng, H, H_kv, hd, T, past, window):
    """Queries at positions past..past+T-1; keys in time order as kv_ring / kv_append return them (a window
    keeps only the W-1 newest past keys)."""
    kstart = max(0, past - window + 1) if window else 0
    S = past + T - kstart
    q, k, v = rand(rng, H, T, hd), rand(rng, H_kv, S, hd), rand(rng, H_kv, S, hd)
    return q, k, v, np.arange(past, past + T), np.arange(kstart, past + T), 1 + rand(rng, 2 * hd, scale=0.1)


PREFILL_CASES = [  # (H, H_kv, hd, T, past, W)
    (8, 4, 8, 5, 0, 8),       # T < W, the tiny fixture's heads
    (8, 4, 8, 37, 0, 8),      # T not a multiple of the query block (16 rows) or the key tile
    (8, 4, 8, 150, 0, 8),     # T >> W: most key tiles outside every block's range
    (8, 4, 8, 37, 0, None),   # full causal (layer L/2+1 in a full forward)
    (8, 4, 8, 21, 13, None),  # a later chunk over a longer past
    (8, 4, 8, 21, 5, 8),      # a later chunk through a window
    (4, 4, 16, 30, 0, 16),    # G = 1
    (16, 4, 8, 30, 0, None),  # G = 4
    (4, 2, 64, 40, 3, 32),    # the real head_dim and G = 2
]


@pytest.mark.parametrize("H,H_kv,hd,T,past,window", PREFILL_CASES)
def test_attention_prefill_twin_equals_attend(checked, H, H_kv, hd, T, past, window):
    rng = np.random.default_rng(T * 7 + past)
    q, k, v, qpos, kpos, subln = attention_case(rng, H, H_kv, hd, T, past, window)
    lam, lambda_init = np.float32(0.31), 0.62
    want = pf.attend(q, k, v, qpos, kpos, window, lam, lambda_init, subln)
    got = pf.cuda_attend(q, k, v, qpos, kpos, window, lam, lambda_init, subln)
    assert got.shape == want.shape and np.abs(got - want).max() < TOL
    assert checked.counts == {"attention_prefill_f32": 1}


def test_attention_prefill_reads_a_prefix_view_without_copying(checked):
    """The shared buffer is (H_kv, capacity, hd) and attention reads [:, :n]: the kernel gets the
    view's head stride (capacity · hd), checked by LaunchChecker, and the same numbers."""
    rng = np.random.default_rng(5)
    q, k, v, qpos, kpos, subln = attention_case(rng, 8, 4, 8, 19, 0, None)
    kbuf, vbuf = np.zeros((4, 64, 8), np.float32), np.zeros((4, 64, 8), np.float32)
    kbuf[:, :19], vbuf[:, :19] = k, v
    want = pf.attend(q, k, v, qpos, kpos, None, 0.2, 0.5, subln)
    assert np.abs(pf.cuda_attend(q, kbuf[:, :19], vbuf[:, :19], qpos, kpos, None, 0.2, 0.5, subln) - want).max() < TOL


DECODE_CASES = [(8, 4, 8, 1000, None), (4, 2, 64, 300, None), (8, 4, 8, 129, None), (8, 4, 8, 300, 8),
                (16, 4, 8, 77, None)]  # (H, H_kv, hd, S, window)


@pytest.mark.parametrize("sms", [1, 4, 132])
@pytest.mark.parametrize("H,H_kv,hd,S,window", DECODE_CASES)
def test_attention_decode_twin_equals_attend(checked, monkeypatch, H, H_kv, hd, S, window, sms):
    """One query over a long K/V in one launch: the live keys cut into runs of whole 16-key tiles
    per split (1 SM: a single split; 132, an H100's: up to one tile per split, some splits empty),
    merged by the last split of each group."""
    monkeypatch.setattr(pf, "CPU_SMS", sms)
    rng = np.random.default_rng(S + hd)
    q, k, v, qpos, kpos, subln = attention_case(rng, H, H_kv, hd, 1, S - 1, None)
    want = pf.attend(q, k, v, qpos, kpos, window, 0.4, 0.7, subln)
    got = pf.cuda_attend(q, k, v, qpos, kpos, window, 0.4, 0.7, subln)
    assert np.abs(got - want).max() < TOL
    assert checked.counts == {"attention_decode_f32": 1}


def test_decode_splits_follow_the_sm_count_and_the_work_the_live_length():
    """The split count is fixed by the SM count (4 blocks per SM over the KV groups), capped by the
    tiles the cache holds: a shared buffer that doubles keeps it. The keys per split follow the live
    length, and the splits' runs tile [0, live) exactly, a run of whole tiles each."""
    assert [pf.decode_splits(S, 20, 132) for S in (16, 512, 2048, 4096, 8192, 65536)] == [1, 32, 53, 53, 53, 53]
    assert pf.decode_splits(65536, 20, 4) == 2 and pf.decode_splits(65536, 2, 1000) == pf.DECODE_MAX_SPLITS
    assert [pf.keys_per_split(live, 53) for live in (1, 2048, 32768)] == [16, 48, 624]
    for live, n_splits in ((1, 53), (2048, 53), (32768, 53), (170, 19), (77, 3)):
        keys = pf.keys_per_split(live, n_splits)
        runs = [(min(live, s * keys), min(live, s * keys + keys)) for s in range(n_splits)]
        assert runs[0][0] == 0 and runs[-1][1] == live and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        assert keys % pf.DECODE_KEYS == 0 and keys - pf.DECODE_KEYS < -(-live // n_splits)


def live_slots_case(rng, kv_bits):
    """A 300-slot shared buffer of which 170 are written (the query is position 169); the slots
    past them hold NaN and positions that are not -1. Attention must not read them: a NaN value
    row reaches the output even with a zero weight. -> (q, k, v, kpos, subln, want)."""
    H, H_kv, hd = 8, 4, 8
    q, k, v = rand(rng, H, 1, hd), rand(rng, H_kv, 300, hd), rand(rng, H_kv, 300, hd)
    if kv_bits:
        k, v = pf.f32_to_bf16(k), pf.f32_to_bf16(v)
    k[:, 170:], v[:, 170:] = (0x7FC0, 0x7FC0) if kv_bits else (np.nan, np.nan)
    kpos = np.where(np.arange(300) < 170, np.arange(300), 10 ** 6)
    subln = 1 + rand(rng, 2 * hd, scale=0.1)
    want = pf.attend(q, pf.f32(k[:, :170]), pf.f32(v[:, :170]), np.array([169]), np.arange(170), None, 0.4, 0.7, subln)
    return q, k, v, kpos, subln, want


@pytest.mark.parametrize("kv_bits", [False, True])
def test_attention_decode_reads_only_the_live_slots(checked, monkeypatch, kv_bits):
    monkeypatch.setattr(pf, "CPU_SMS", 132)                               # 19 splits, 8 of them empty
    q, k, v, kpos, subln, want = live_slots_case(np.random.default_rng(7), kv_bits)
    got = pf.cuda_attend(q, k, v, np.array([169]), kpos, None, 0.4, 0.7, subln)
    assert np.isfinite(got).all() and np.abs(got - want).max() < TOL
    assert checked.counts == {"attention_decode_bf16" if kv_bits else "attention_decode_f32": 1}


def test_attention_decode_leaves_its_split_counters_at_zero(checked):
    """A CUDA graph replays the launch with the same scratch: the last block of each group resets
    its counter, so a second launch on the same scratch counts from 0 and gives the same output."""
    rng = np.random.default_rng(11)
    q, k, v, qpos, kpos, subln = attention_case(rng, 8, 4, 8, 1, 299, None)
    scratch = pf.decode_scratch(8, 4, 8, pf.decode_splits(300, 4, pf.CPU_SMS), np)
    outs = [pf.cuda_decode_attention(q[:, 0], k, v, qpos, kpos, None, np.float32([0.4]), 0.7, subln, scratch=scratch)
            for _ in range(2)]
    assert scratch[3].tolist() == [0, 0] and np.array_equal(outs[0], outs[1])
    assert np.abs(outs[0] - pf.attend(q, k, v, qpos, kpos, None, 0.4, 0.7, subln)).max() < TOL


@pytest.mark.parametrize("T,past,window", [(37, 0, 8), (21, 13, None), (1, 299, None), (1, 20, 8)])
def test_attention_twins_read_bf16_kv_bits(checked, T, past, window):
    """K/V as a bfloat16 cache holds them (uint16 bits): the kernels' bf16 instances equal attend()
    over the same values widened (exact), prefill and decode alike."""
    rng = np.random.default_rng(T + past)
    q, k, v, qpos, kpos, subln = attention_case(rng, 8, 4, 8, T, past, window)
    k, v = pf.f32_to_bf16(k), pf.f32_to_bf16(v)
    want = pf.attend(q, pf.f32(k), pf.f32(v), qpos, kpos, window, np.float32(0.31), 0.62, subln)
    got = pf.cuda_attend(q, k, v, qpos, kpos, window, np.float32(0.31), 0.62, subln)
    assert np.abs(got - want).max() < TOL
    assert checked.counts == {"attention_decode_bf16" if T == 1 else "attention_prefill_bf16": 1}


def test_attention_decode_over_a_preallocated_buffer_and_a_ring(checked):
    """Slots past the length (-1) are skipped; a wrapped ring (slot = position % W, positions out of
    time order) and a half-filled one give attend's result over the same keys in time order."""
    rng = np.random.default_rng(9)
    H, H_kv, hd, W = 8, 4, 8, 8
    subln = 1 + rand(rng, 2 * hd, scale=0.1)
    # preallocated append buffer: 300 slots, 170 written
    q, k, v = rand(rng, H, 1, hd), rand(rng, H_kv, 300, hd), rand(rng, H_kv, 300, hd)
    kpos = np.where(np.arange(300) < 170, np.arange(300), -1)
    want = pf.attend(q, k[:, :170], v[:, :170], np.array([169]), np.arange(170), None, 0.4, 0.7, subln)
    assert np.abs(pf.cuda_attend(q, k, v, np.array([169]), kpos, None, 0.4, 0.7, subln) - want).max() < TOL
    for newest in (20, 4):  # wrapped ring; ring with empty slots (T < W)
        positions = np.arange(max(0, newest - W + 1), newest + 1)
        kt, vt = rand(rng, H_kv, len(positions), hd), rand(rng, H_kv, len(positions), hd)
        ring_k, ring_v = np.zeros((H_kv, W, hd), np.float32), np.zeros((H_kv, W, hd), np.float32)
        ring_pos = np.full(W, -1)
        ring_k[:, positions % W], ring_v[:, positions % W], ring_pos[positions % W] = kt, vt, positions
        want = pf.attend(q, kt, vt, np.array([newest]), positions, W, 0.4, 0.7, subln)
        got = pf.cuda_attend(q, ring_k, ring_v, np.array([newest]), ring_pos, W, 0.4, 0.7, subln)
        assert np.abs(got - want).max() < TOL, newest


@pytest.mark.parametrize("rows,out,inp", [(1, 37, 64), (3, 37, 300), (8, 37, 4), (1, 256, 2560), (2, 9, 1000)])
def test_gemv_bf16_twin_equals_linear(checked, rows, out, inp):
    rng = np.random.default_rng(rows * out + inp)
    W = bf16_bits(rand(rng, out, inp))
    x = rand(rng, rows, inp)
    want = x.astype(np.float64) @ pf.bf16_to_f32(W).T.astype(np.float64)
    got = pf.cuda_linear(x, W)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert np.abs(got - pf.linear(x, W)).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert checked.counts == {"gemv_bf16": 1}


def weight_as(fmt, w):
    """fp32 rows w (out, in) stored as kernel 7 reads them: "bf16" bits, "f32", or "int8" groups."""
    return {"bf16": bf16_bits, "f32": lambda a: a, "int8": lambda a: pf.Int8Weight(*pf.quantize_int8(a))}[fmt](w)


def widened(W):
    """The fp32 matrix kernel 7 multiplies by: bf16 widened, int8 dequantised (q · s)."""
    return pf.dequantize_int8(W.q, W.scales) if isinstance(W, pf.Int8Weight) else pf.f32(W)


def first_rows(W, n):
    """A row view of W's first n rows (an Int8Weight's values and scales alike)."""
    return pf.Int8Weight(W.q[:n], W.scales[:n]) if isinstance(W, pf.Int8Weight) else W[:n]


def gemv_epilogue_checks(dtype, rows, out, inp):
    """Kernel 7's epilogues (plain and residual with and without bias, the GMU gate, SwiGLU over
    [gate; up], the residual updated in place) for bf16, fp32 or int8 weights. With inp = 5120 and a
    small out, split-K takes 8 warps per output."""
    rng = np.random.default_rng(rows + out + inp)
    W2 = weight_as(dtype, rand(rng, 2 * out, inp, scale=inp ** -0.5))
    Wf = widened(W2)
    W = first_rows(W2, out)
    x, bias, aux = rand(rng, rows, inp), rand(rng, out), rand(rng, rows, out)
    acc = x @ Wf[:out].T
    checks = []
    for mode, b, a, want in [(pf.GEMV_PLAIN, None, None, acc), (pf.GEMV_PLAIN, bias, None, acc + bias),
                             (pf.GEMV_RESIDUAL, bias, aux, aux + (acc + bias)), (pf.GEMV_RESIDUAL, None, aux, aux + acc),
                             (pf.GEMV_GATE, None, aux, pf.silu(acc) * aux)]:
        checks.append((f"mode {mode}", pf.cuda_gemv(x, W, np.empty((rows, out), np.float32), mode, bias=b, aux=a), want))
    checks.append(("swiglu", pf.cuda_gemv(x, W2, np.empty((rows, out), np.float32), pf.GEMV_SWIGLU, out_features=out),
                   pf.silu(acc) * (x @ Wf[out:].T)))
    for b in (None, bias):                                                 # in place: y is the residual stream
        residual = aux.copy()
        pf.cuda_gemv(x, W, residual, pf.GEMV_RESIDUAL, bias=b, aux=residual)
        checks.append(("residual in place", residual, aux + acc if b is None else aux + (acc + bias)))
    return checks


EPILOGUE_SHAPES = {"bf16": [(1, 37, 64), (3, 9, 300), (1, 192, 5120), (8, 5, 8)],
                   "f32": [(1, 37, 64), (3, 9, 300), (1, 192, 5120), (8, 5, 8)],
                   "int8": [(1, 37, 64), (3, 9, 320), (1, 192, 5120), (8, 5, 32)]}   # int8: in a multiple of 32


@pytest.mark.parametrize("dtype,rows,out,inp", [(d, *c) for d, cases in EPILOGUE_SHAPES.items() for c in cases])
def test_gemv_epilogues(checked, dtype, rows, out, inp):
    """Kernel 7's epilogues against the model's own formulas, bf16, fp32 and int8 weights."""
    for what, got, want in gemv_epilogue_checks(dtype, rows, out, inp):
        scale = max(1.0, np.abs(want).max()) if what.startswith("mode") else 1.0
        assert np.abs(got - want).max() <= 1e-5 * scale, what
    assert set(checked.counts) == {f"gemv_{dtype}"}


def unaligned_int8_checks():
    """int8 values that do not start on a 16-byte boundary take the column-by-column path."""
    rng = np.random.default_rng(8)
    W = weight_as("int8", rand(rng, 9, 64, scale=0.125))
    buf = np.empty(W.q.size + 1, np.int8)
    q = buf[1:].reshape(W.q.shape)
    q[...] = W.q
    assert q.ctypes.data % 16
    x = rand(rng, 2, 64)
    return [("y", pf.cuda_linear(x, pf.Int8Weight(q, W.scales)), x @ widened(W).T)]


def test_gemv_int8_unaligned_values(checked):
    (what, got, want), = unaligned_int8_checks()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert checked.counts == {"gemv_int8": 1}


class StepBuffers:
    """What the fused GEMVs read of a decode step (pf.CudaStep): its position and flag buffers."""

    def __init__(self, pos=0):
        self.pos = np.array([pos], np.int64)
        self.buf = {"error": np.zeros(1, np.int32), "counter": np.zeros(1, np.int32)}


def qkv_checks(fmt, H, H_kv, hd, D, window, slots, positions, kv_dtype="float32"):
    """The Wqkv instance of kernel 7 for decode tokens at `positions`: y = [q | k | v] = x·Wᵀ + b
    against the model's formula, and the cache it stores k and v into (a ring of W slots, or an
    append buffer) slot for slot and bit for bit what the model's own kv_stored and kv_ring /
    kv_append store for the same k and v; the step's error flag stays 0."""
    rng = np.random.default_rng(H + D + slots + len(positions))
    out = (H + 2 * H_kv) * hd
    W, bias = weight_as(fmt, rand(rng, out, D, scale=D ** -0.5)), rand(rng, out, scale=0.1)
    bits = pf.KV_DTYPES[kv_dtype]
    got, want = [pf.KVCache(np.zeros((H_kv, slots, hd), bits), np.zeros((H_kv, slots, hd), bits), np.full(slots, -1),
                            window) for _ in range(2)]
    step, checks = StepBuffers(), []
    for p in positions:
        x = rand(rng, 1, D)
        step.pos[0] = p
        y = pf.cuda_gemv_qkv(x, W, bias, np.empty((1, out), np.float32), got, step, H * hd)
        checks.append((f"y at {p}", y, x @ widened(W).T + bias))
        k_new, v_new = y[:, H * hd:].reshape(2, H_kv, 1, hd)                   # (H_kv, 1, hd) each, as y holds them
        (pf.kv_ring if window else pf.kv_append)(want, *pf.kv_stored(want, k_new, v_new), p)
    return checks + [("k_cache", got.k, want.k), ("v_cache", got.v, want.v), ("kpos", got.pos, want.pos),
                     ("error flag", step.buf["error"], np.zeros(1, np.int32))]


def conv_gemv_checks(fmt, D, d_inner, d_conv=4, steps=3):
    """in_proj's instance: y = [x̂ | z] for `steps` decode tokens in a row, x̂ = silu(causal_conv1d)
    of the raw x = u·in_proj_xᵀ, z = u·in_proj_zᵀ; conv_state shifted as causal_conv1d leaves it."""
    rng = np.random.default_rng(D + d_inner + d_conv)
    W = weight_as(fmt, rand(rng, 2 * d_inner, D, scale=D ** -0.5))
    weight, bias = rand(rng, d_inner, d_conv, scale=0.5), rand(rng, d_inner, scale=0.1)
    state, want_state = rand(rng, d_conv - 1, d_inner), None
    want_state, checks = state.copy(), []
    for t in range(steps):
        u = rand(rng, 1, D)
        y = pf.cuda_gemv_conv(u, W, np.empty((1, 2 * d_inner), np.float32), state, weight, bias)
        xz = u @ widened(W).T                                                  # (1, 2·d_inner)  raw [x | z]
        conv, want_state = pf.causal_conv1d(xz[:, :d_inner], want_state, weight, bias)
        checks += [(f"x̂ {t}", y[:, :d_inner], pf.silu(conv)), (f"z {t}", y[:, d_inner:], xz[:, d_inner:])]
    return checks + [("conv_state", state, want_state)]


def norm_gemv_checks(fmt, inp, D, has_bias=True):
    """A residual GEMV with the next LayerNorm fused: hidden += x·Wᵀ (+ b) in place, normed =
    layer_norm(hidden) with that LayerNorm's weight and bias; the block counter is back at 0."""
    rng = np.random.default_rng(inp + D + has_bias)
    W = weight_as(fmt, rand(rng, D, inp, scale=inp ** -0.5))
    x, hidden0 = rand(rng, 1, inp), rand(rng, 1, D, scale=2.0) + 0.5
    bias = rand(rng, D, scale=0.1) if has_bias else None
    norm = {"weight": 1 + rand(rng, D, scale=0.1), "bias": rand(rng, D, scale=0.1)}
    hidden, normed, step = hidden0.copy(), np.empty((1, D), np.float32), StepBuffers()
    pf.cuda_gemv_norm(x, W, bias, hidden, norm, normed, step, 1e-5)
    want = hidden0 + (x @ widened(W).T + (0 if bias is None else bias))
    return [("hidden", hidden, want), ("normed", normed, pf.layer_norm(want, norm, 1e-5)),
            ("counter", step.buf["counter"], np.zeros(1, np.int32))]


@pytest.mark.parametrize("fmt", ["bf16", "f32", "int8"])
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
def test_gemv_qkv_stores_kv_into_rings_and_the_append_buffer(checked, fmt, kv_dtype):
    """20 positions through a ring of 8 (slot p % 8), then an append buffer of 32 slots (slot p)."""
    for window, slots, positions in ((8, 8, range(20)), (None, 32, (0, 1, 2, 7, 31))):
        for what, got, want in qkv_checks(fmt, 8, 4, 8, 64, window, slots, positions, kv_dtype):
            if got.dtype.kind in "iu":
                assert np.array_equal(got, want), (window, what)
            else:
                assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), (window, what)
    assert checked.counts == {f"gemv_{fmt}_qkv{'' if kv_dtype == 'float32' else '16'}": 25}


def test_gemv_qkv_flags_a_slot_past_the_buffer_and_stores_nothing(checked):
    """Position 5 of an append buffer of 5 slots: nothing of k, v or kpos is written, the flag is set."""
    rng = np.random.default_rng(1)
    W, bias = weight_as("bf16", rand(rng, 16 * 8, 64)), rand(rng, 16 * 8)
    kv = pf.KVCache(np.zeros((4, 5, 8), np.float32), np.zeros((4, 5, 8), np.float32), np.full(5, -1), None)
    step = StepBuffers(pos=5)
    pf.cuda_gemv_qkv(rand(rng, 1, 64), W, bias, np.empty((1, 128), np.float32), kv, step, 64)
    assert step.buf["error"][0] == pf.KV_SLOT_PAST_END and not kv.k.any() and not kv.v.any() and (kv.pos == -1).all()


@pytest.mark.parametrize("fmt", ["bf16", "f32", "int8"])
def test_gemv_conv_is_in_proj_then_the_decode_conv(checked, fmt):
    for what, got, want in conv_gemv_checks(fmt, 64, 96):
        assert np.abs(got - want).max() <= 1e-5, what
    assert checked.counts == {f"gemv_{fmt}_conv": 3}


@pytest.mark.parametrize("fmt", ["bf16", "f32", "int8"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_gemv_norm_is_the_residual_then_the_next_layer_norm(checked, fmt, has_bias):
    for what, got, want in norm_gemv_checks(fmt, 320, 70, has_bias):
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), what
    assert checked.counts == {f"gemv_{fmt}_norm": 1}


def test_gemv_splits_give_small_outputs_more_warps():
    assert pf.gemv_splits(192, 5120) == 8 and pf.gemv_splits(2560, 10240) == 4 and pf.gemv_splits(200064, 2560) == 1
    assert pf.gemv_splits(10240, 2560) == 1 and pf.gemv_splits(5, 8) == 1     # at least a 256-column step per warp
    assert pf.gemv_splits(2560, 1536) == 4 and pf.gemv_splits(2560, 1536, vec=16) == 2   # int8: 512-column steps
    assert all(pf.GEMV_WARPS % pf.gemv_splits(o, i) == 0 for o in (1, 7, 192, 5000) for i in (4, 300, 5120))


def test_layer_norm_and_embed_twins(checked):
    rng = np.random.default_rng(12)
    x, p = rand(rng, 3, 70), {"weight": rand(rng, 70), "bias": rand(rng, 70)}
    assert np.abs(pf.cuda_layer_norm(x, p, np.empty_like(x), 1e-5) - pf.layer_norm(x, p, 1e-5)).max() < TOL
    E = rand(rng, 11, 96)
    for fmt in ("f32", "bf16", "int8"):                                    # the CPU path's rows, bit for bit
        table, y = weight_as(fmt, E), np.empty((1, 96), np.float32)
        pf.cuda_embed(table, np.array([7]), y)
        assert np.array_equal(y[0], pf.f32(table[7]))
    assert checked.counts == {"layer_norm_rows": 1, "embed_f32": 1, "embed_bf16": 1, "embed_int8": 1}


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_cuda_linear_many_rows_widens_tiles(monkeypatch, fmt):
    """Above GEMV_MAX_ROWS rows, blocks of W's rows are widened (dequantised) to fp32 for the matmul."""
    rng = np.random.default_rng(11)
    W, x = weight_as(fmt, rand(rng, 70, 64)), rand(rng, 20, 64)
    monkeypatch.setattr(pf, "matmul_t", lambda x, Wb, out: blocks.append(Wb.shape) or out.__setitem__(..., x @ Wb.T))
    blocks = []
    assert np.abs(pf.cuda_linear(x, W) - x @ widened(W).T).max() < TOL
    assert blocks == [(70, 64)]                                             # one block: 70 rows are under 64 MB


# ------------------------------------------------------------------------------------------------
# 2. kernels.cu compiles (nvcc; NVRTC as CuPy calls it)

def find_nvcc():
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.isfile(p)), None)


def test_kernels_cu_compiles_with_nvcc_without_spills(tmp_path):
    """Every kernel compiles for sm_90 (H100/H200) with CuPy's -ftz=true and -std=c++17, warnings
    as errors, and ptxas reports no stack frame or spills for any of them (a runtime-indexed
    register array would show up here as local memory)."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: kernels.cu compile check needs the CUDA toolkit")
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-ftz=true", "-cubin", "-o", str(tmp_path / "kernels.cubin"),
           "-Xptxas", "-v", "--Werror", "all-warnings", KERNELS_CU]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.stdout + run.stderr
    for name in SIGNATURES:
        props = re.search(rf"Function properties for {name}\n\s*(.*)", report)
        assert props, f"{name} missing from ptxas report"
        assert props.group(1).strip() == "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", (name, props.group(1))


def test_int8_gemvs_convert_no_integer_to_float(tmp_path):
    """Kernel 7's int8 instances turn each int8 weight into a float with an integer OR and an FP32
    add (kernels.cu, section 7), never with an int-to-float conversion, which issues at a fraction
    of the FP32 rate: in their PTX the only cvt.rn.f32 from an integer are the two of
    layer_norm_row's `/ D` (in the _norm instances, as in layer_norm_rows itself)."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the PTX check needs the CUDA toolkit")
    ptx = tmp_path / "kernels.ptx"
    run = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-ftz=true", "-ptx", "-o", str(ptx), KERNELS_CU],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    text = ptx.read_text()

    def conversions(name):
        body = re.search(rf"\.entry {name}\((.*?)\n}}\n", text, re.S)
        assert body, name
        return len(re.findall(r"cvt\.rn\.f32\.[su]\d+", body.group(0)))
    assert conversions("layer_norm_rows") == 2
    for name in (n for n in SIGNATURES if n.startswith("gemv_int8")):
        assert conversions(name) == (2 if name.endswith("_norm") else 0), name


def find_libnvrtc():
    candidates = []
    for base in sys.path:
        candidates += glob.glob(os.path.join(base, "nvidia", "cu1*", "lib", "libnvrtc.so*"))
        candidates += glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    candidates += glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*")
    candidates = [c for c in candidates if "builtins" not in c and ".alt." not in c]
    return candidates[0] if candidates else None


def nvrtc_compile(src, name, opts):
    """Compile CUDA source with NVRTC as CuPy does (skip the test when libnvrtc is missing): the
    result code and the compiler's log."""
    lib = find_libnvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or a CUDA toolkit with NVRTC)")
    for builtins in glob.glob(os.path.join(os.path.dirname(lib), "libnvrtc-builtins.so*")):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)  # NVRTC 13.0 dlopens it by name, not from its own folder
    nvrtc = ctypes.CDLL(lib)
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, name, 0, None, None) == 0
    result = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return result, log.value.decode(errors="replace")


def test_kernels_cu_compiles_with_nvrtc_as_cupy_calls_it():
    """CuPy's RawModule compiles with NVRTC (no host headers, -ftz=true -std=c++17
    --device-as-default-execution-space); nvcc alone would not catch NVRTC-only failures."""
    opts = [b"-std=c++17", b"-ftz=true", b"-arch=compute_90", b"--device-as-default-execution-space"]
    result, text = nvrtc_compile(open(KERNELS_CU, "rb").read(), b"kernels.cu", opts)
    assert result == 0, text[-3000:]
    assert "warning" not in text.lower(), text[-3000:]


# ------------------------------------------------------------------------------------------------
# 3. On a GPU: each kernel against its twin

def gpu_or_skip():
    return cupy_or_skip("the kernels are checked against their twins on a GPU only")


def on_both(cupy, fn, *args):
    """fn on NumPy arguments (the twins) and on CuPy copies (the kernels) -> (numpy results,
    device results as NumPy, numpy args after the call, device args after the call)."""
    host_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    dev_args = [cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args]
    host = fn(*host_args)
    dev = fn(*dev_args)
    as_tuple = lambda r: r if isinstance(r, tuple) else (r,)  # noqa: E731
    return (as_tuple(host), tuple(cupy.asnumpy(r) for r in as_tuple(dev)), host_args,
            [cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else a for a in dev_args])


def assert_close(host, dev, tol=TOL, what=""):
    for h, d in zip(host, dev):
        scale = max(1.0, float(np.abs(h).max()) if np.size(h) else 1.0)
        assert np.abs(np.asarray(h) - d).max() <= tol * scale, what


@pytest.mark.parametrize("T", [1, 3, 37, 1000])
def test_gpu_conv_and_scan_kernels_equal_twins(T):
    cupy = gpu_or_skip()
    rng = np.random.default_rng(T)
    E, N = 5120 if T < 100 else 200, 16
    x, state, w, b = rand(rng, T, E), rand(rng, 3, E), rand(rng, E, 4), rand(rng, E)
    host, dev, ha, da = on_both(cupy, pf.cuda_conv1d_silu, x, state, w, b)
    assert_close(host, dev, what="conv out")
    assert_close([ha[1]], [da[1]], what="conv_state")
    dt, z, bias, D = rand(rng, T, E), rand(rng, T, E), rand(rng, E), rand(rng, E)
    A_log = np.log(np.tile(np.arange(1, N + 1, dtype=np.float32), (E, 1)))
    B, C, h = rand(rng, T, N), rand(rng, T, N), rand(rng, E, N)
    host, dev, ha, da = on_both(cupy, pf.cuda_selective_scan, x, dt, bias, A_log, B, C, D, z, h)
    assert_close(host, dev, tol=1e-4, what="scan y")
    assert_close([ha[8]], [da[8]], tol=1e-4, what="ssm_state")


@pytest.mark.parametrize("H,H_kv,hd,T,past,window", PREFILL_CASES + [(40, 20, 64, 2048, 0, 512), (40, 20, 64, 1, 4095, None),
                                                                     (40, 20, 64, 1, 32767, None), (40, 20, 64, 1, 600, 512)])
def test_gpu_attention_kernels_equal_twins(H, H_kv, hd, T, past, window):
    cupy = gpu_or_skip()
    rng = np.random.default_rng(T + past)
    q, k, v, qpos, kpos, subln = attention_case(rng, H, H_kv, hd, T, past, window)
    host, dev, _, _ = on_both(cupy, pf.cuda_attend, q, k, v, qpos, kpos, window, np.float32(0.3), 0.6, subln)
    assert_close(host, dev, tol=1e-5, what="attention")


@pytest.mark.parametrize("H,H_kv,hd,T,past,window", [(8, 4, 8, 37, 0, 8), (40, 20, 64, 2048, 0, 512),
                                                     (40, 20, 64, 1, 32767, None), (40, 20, 64, 1, 600, 512)])
def test_gpu_attention_kernels_read_bf16_kv_bits(H, H_kv, hd, T, past, window):
    """The bf16 instances on the device (this GPU's split count) against their twins (CPU_SMS)."""
    cupy = gpu_or_skip()
    rng = np.random.default_rng(T + past + 1)
    q, k, v, qpos, kpos, subln = attention_case(rng, H, H_kv, hd, T, past, window)
    k, v = pf.f32_to_bf16(k), pf.f32_to_bf16(v)
    host, dev, _, _ = on_both(cupy, pf.cuda_attend, q, k, v, qpos, kpos, window, np.float32(0.3), 0.6, subln)
    assert_close(host, dev, tol=1e-5, what="attention, bf16 K/V")


@pytest.mark.parametrize("rows,out,inp", [(1, 2560, 10240), (1, 10240, 2560), (8, 160, 5120), (3, 37, 4), (20, 300, 256)])
def test_gpu_bf16_matmul_equals_twin(rows, out, inp):
    cupy = gpu_or_skip()
    rng = np.random.default_rng(rows + out)
    W, x = bf16_bits(rand(rng, out, inp, scale=inp ** -0.5)), rand(rng, rows, inp)
    host, dev, _, _ = on_both(cupy, pf.cuda_linear, x, W)
    assert_close(host, dev, tol=1e-5, what="gemv")


def on_device(cupy, a):
    """A NumPy array, an Int8Weight, a KVCache or StepBuffers as CuPy arrays (the same type)."""
    if isinstance(a, pf.Int8Weight):
        return pf.Int8Weight(cupy.asarray(a.q), cupy.asarray(a.scales))
    if isinstance(a, pf.KVCache):
        return pf.KVCache(cupy.asarray(a.k), cupy.asarray(a.v), cupy.asarray(a.pos), a.window)
    if isinstance(a, StepBuffers):
        step = StepBuffers()
        step.pos, step.buf = cupy.asarray(a.pos), {k: cupy.asarray(v) for k, v in a.buf.items()}
        return step
    return cupy.asarray(a) if isinstance(a, np.ndarray) else a


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_gpu_int8_and_fused_gemvs_equal_twins(fmt):
    """Kernel 7's instances at the real shapes on the GPU against their twins: the plain product
    (1 and 3 rows, and 20 rows through the dequantised blocks), Wqkv storing K/V into a ring and
    the append buffer (fp32; bf16 bits within one rounding step), in_proj with the conv, fc2 with
    the next LayerNorm (the counter back at 0)."""
    cupy = gpu_or_skip()
    rng = np.random.default_rng(19)
    host_and_device = lambda fn, *args: (fn(*args), fn(*[on_device(cupy, a) for a in args]))  # noqa: E731
    W = weight_as(fmt, rand(rng, 2560, 10240, scale=10240 ** -0.5))
    for rows in (1, 3, 20):
        h, d = host_and_device(pf.cuda_linear, rand(rng, rows, 10240), W)
        assert_close([h], [cupy.asnumpy(d)], what=f"{rows} rows")
    Wqkv, bqkv = weight_as(fmt, rand(rng, 5120, 2560, scale=2560 ** -0.5)), rand(rng, 5120)
    x = rand(rng, 1, 2560)
    for window, slots, p, kv_dtype in ((512, 512, 1000, "float32"), (None, 4096, 77, "float32"), (512, 512, 700, "bfloat16")):
        bits = pf.KV_DTYPES[kv_dtype]
        kv = pf.KVCache(np.zeros((20, slots, 64), bits), np.zeros((20, slots, 64), bits), np.full(slots, -1), window)
        hkv, dkv, hstep, dstep = kv, on_device(cupy, kv), StepBuffers(p), on_device(cupy, StepBuffers(p))
        yh = pf.cuda_gemv_qkv(x, Wqkv, bqkv, np.empty((1, 5120), np.float32), hkv, hstep, 2560)
        yd = pf.cuda_gemv_qkv(cupy.asarray(x), on_device(cupy, Wqkv), cupy.asarray(bqkv), cupy.empty((1, 5120), cupy.float32),
                              dkv, dstep, 2560)
        assert_close([yh], [cupy.asnumpy(yd)], what="qkv")
        assert np.array_equal(hkv.pos, cupy.asnumpy(dkv.pos)) and int(dstep.buf["error"][0]) == 0
        for a, b in ((hkv.k, dkv.k), (hkv.v, dkv.v)):
            a, b = pf.f32(a), pf.f32(cupy.asnumpy(b))
            assert np.abs(a - b).max() <= (1e-5 if kv_dtype == "float32" else 2 ** -8) * np.abs(a).max(), kv_dtype
    in_proj, state = weight_as(fmt, rand(rng, 10240, 2560, scale=2560 ** -0.5)), rand(rng, 3, 5120)
    conv_w, conv_b = rand(rng, 5120, 4, scale=0.5), rand(rng, 5120, scale=0.1)
    hstate, dstate = state.copy(), cupy.asarray(state)
    yh = pf.cuda_gemv_conv(x, in_proj, np.empty((1, 10240), np.float32), hstate, conv_w, conv_b)
    yd = pf.cuda_gemv_conv(cupy.asarray(x), on_device(cupy, in_proj), cupy.empty((1, 10240), cupy.float32), dstate,
                           cupy.asarray(conv_w), cupy.asarray(conv_b))
    assert_close([yh, hstate], [cupy.asnumpy(yd), cupy.asnumpy(dstate)], what="conv")
    hidden, norm = rand(rng, 1, 2560), {"weight": 1 + rand(rng, 2560, scale=0.1), "bias": rand(rng, 2560, scale=0.1)}
    m = rand(rng, 1, 10240)
    hh, dh, hstep, dstep = hidden.copy(), cupy.asarray(hidden), StepBuffers(), on_device(cupy, StepBuffers())
    nh = pf.cuda_gemv_norm(m, W, None, hh, norm, np.empty((1, 2560), np.float32), hstep, 1e-5)
    nd = pf.cuda_gemv_norm(cupy.asarray(m), on_device(cupy, W), None, dh, {k: cupy.asarray(v) for k, v in norm.items()},
                           cupy.empty((1, 2560), cupy.float32), dstep, 1e-5)
    assert_close([hh, nh], [cupy.asnumpy(dh), cupy.asnumpy(nd)], what="norm")
    assert int(dstep.buf["counter"][0]) == 0
    alone = pf.cuda_layer_norm(dh, {k: cupy.asarray(v) for k, v in norm.items()}, cupy.empty_like(nd), 1e-5)
    assert np.array_equal(cupy.asnumpy(alone).view(np.uint32), cupy.asnumpy(nd).view(np.uint32))  # the same bits
