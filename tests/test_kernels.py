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
           "const unsigned short*": np.uint16, "int*": np.int32, "int": np.int32, "long long": np.int64,
           "float": np.float32}


def kernel_signatures():
    """{kernel name: [(C type, parameter name), ...]} for every extern "C" __global__ function."""
    src = open(KERNELS_CU).read()
    found = {}
    pattern = r'extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\(([^)]*)\)'
    for name, params in re.findall(pattern, src):
        found[name] = []
        for p in params.split(","):
            p = " ".join(p.split())
            m = re.fullmatch(r"(.*?\*?)\s*(\w+)", p)
            ctype = m.group(1).replace(" *", "*").strip()
            found[name].append((ctype, m.group(2)))
    return found


SIGNATURES = kernel_signatures()
TWINS = [pf.conv1d_silu_prefill, pf.conv1d_silu_step, pf.scan_prefill, pf.scan_step, pf.attention_prefill_f32,
         pf.attention_prefill_bf16, pf.attention_decode_f32, pf.attention_decode_bf16, pf.kv_write, pf.gemv_bf16, pf.gemv_f32,
         pf.layer_norm_rows, pf.embed_bf16, pf.embed_f32]


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


def test_kv_write_twin_ring_and_append():
    rng = np.random.default_rng(3)
    H_kv, hd, W = 4, 8, 8
    ring_k, ring_v, ring_pos = np.zeros((H_kv, W, hd), np.float32), np.zeros((H_kv, W, hd), np.float32), np.full(W, -1)
    for p in range(20):
        kn, vn = rand(rng, H_kv, hd), rand(rng, H_kv, hd)
        pf.kv_write(kn, vn, ring_k, ring_v, ring_pos, np.array([p]), H_kv, hd, W, W)
        assert np.array_equal(ring_k[:, p % W], kn) and ring_pos[p % W] == p
    assert sorted(ring_pos) == list(range(12, 20))
    buf_k, buf_v, buf_pos = np.zeros((H_kv, 5, hd), np.float32), np.zeros((H_kv, 5, hd), np.float32), np.full(5, -1)
    pf.kv_write(kn, vn, buf_k, buf_v, buf_pos, np.array([3]), H_kv, hd, 5, 0)
    assert np.array_equal(buf_v[:, 3], vn) and buf_pos.tolist() == [-1, -1, -1, 3, -1]
    pf.kv_write(kn, vn, buf_k, buf_v, buf_pos, np.array([5]), H_kv, hd, 5, 0)  # past the end: nothing written
    assert buf_pos.tolist() == [-1, -1, -1, 3, -1]


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


def gemv_epilogue_checks(dtype, rows, out, inp):
    """Kernel 7's epilogues (plain and residual with and without bias, the GMU gate, SwiGLU over
    [gate; up], the residual updated in place) for bf16 or fp32 weights. With inp = 5120 and a small
    out, split-K takes 8 warps per output."""
    rng = np.random.default_rng(rows + out + inp)
    W2 = rand(rng, 2 * out, inp, scale=inp ** -0.5)
    W2 = bf16_bits(W2) if dtype == "bf16" else W2
    Wf = pf.f32(W2)
    W = W2[:out]
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


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("rows,out,inp", [(1, 37, 64), (3, 9, 300), (1, 192, 5120), (8, 5, 8)])
def test_gemv_epilogues(checked, dtype, rows, out, inp):
    """Kernel 7's epilogues against the model's own formulas, bf16 and fp32 weights."""
    for what, got, want in gemv_epilogue_checks(dtype, rows, out, inp):
        scale = max(1.0, np.abs(want).max()) if what.startswith("mode") else 1.0
        assert np.abs(got - want).max() <= 1e-5 * scale, what
    assert set(checked.counts) == {"gemv_bf16" if dtype == "bf16" else "gemv_f32"}


def test_gemv_splits_give_small_outputs_more_warps():
    assert pf.gemv_splits(192, 5120) == 8 and pf.gemv_splits(2560, 10240) == 4 and pf.gemv_splits(200064, 2560) == 1
    assert pf.gemv_splits(10240, 2560) == 1 and pf.gemv_splits(5, 8) == 1     # at least a 256-column step per warp
    assert all(pf.GEMV_WARPS % pf.gemv_splits(o, i) == 0 for o in (1, 7, 192, 5000) for i in (4, 300, 5120))


def test_layer_norm_and_embed_twins(checked):
    rng = np.random.default_rng(12)
    x, p = rand(rng, 3, 70), {"weight": rand(rng, 70), "bias": rand(rng, 70)}
    assert np.abs(pf.cuda_layer_norm(x, p, np.empty_like(x), 1e-5) - pf.layer_norm(x, p, 1e-5)).max() < TOL
    E = rand(rng, 11, 70)
    for table, twin in ((E, pf.embed_f32), (bf16_bits(E), pf.embed_bf16)):
        y = np.empty((1, 70), np.float32)
        pf._launch(twin, (1,), (256,), (table, np.array([7]), y, np.int32(70)))
        assert np.array_equal(y[0], pf.f32(table)[7])


def test_cuda_linear_many_rows_widens_tiles():
    rng = np.random.default_rng(11)
    W, x = bf16_bits(rand(rng, 70, 48)), rand(rng, 20, 48)
    assert np.abs(pf.cuda_linear(x, W) - x @ pf.bf16_to_f32(W).T).max() < TOL


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


def find_libnvrtc():
    candidates = []
    for base in sys.path:
        candidates += glob.glob(os.path.join(base, "nvidia", "cu1*", "lib", "libnvrtc.so*"))
        candidates += glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    candidates += glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*")
    candidates = [c for c in candidates if "builtins" not in c and ".alt." not in c]
    return candidates[0] if candidates else None


def test_kernels_cu_compiles_with_nvrtc_as_cupy_calls_it():
    """CuPy's RawModule compiles with NVRTC (no host headers, -ftz=true -std=c++17
    --device-as-default-execution-space); nvcc alone would not catch NVRTC-only failures."""
    lib = find_libnvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or a CUDA toolkit with NVRTC)")
    for builtins in glob.glob(os.path.join(os.path.dirname(lib), "libnvrtc-builtins.so*")):
        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)  # NVRTC 13.0 dlopens it by name, not from its own folder
    nvrtc = ctypes.CDLL(lib)
    prog = ctypes.c_void_p()
    src = open(KERNELS_CU, "rb").read()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None) == 0
    opts = [b"-std=c++17", b"-ftz=true", b"-arch=compute_90", b"--device-as-default-execution-space"]
    result = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    text = log.value.decode(errors="replace")
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


def test_gpu_kv_write_equals_twin():
    cupy = gpu_or_skip()
    rng = np.random.default_rng(0)
    kn, vn = rand(rng, 20, 64), rand(rng, 20, 64)
    for window, slots, p in ((512, 512, 1000), (0, 4096, 77)):
        kc, vc, kp = np.zeros((20, slots, 64), np.float32), np.zeros((20, slots, 64), np.float32), np.full(slots, -1)
        args = (kn, vn, kc, vc, kp, np.array([p]), np.int32(20), np.int32(64), np.int32(slots), np.int32(window))
        _, _, ha, da = on_both(cupy, lambda *a: pf._launch(pf.kv_write, (5,), (256,), a), *args)
        for i in (2, 3, 4):
            assert np.array_equal(ha[i], da[i])
