"""kernels.cu itself, run on the CPU through the harness of tests/cuda_cpu.py.

test_kernels.py checks the NumPy twins against the model and kernels.cu's launches against its
signatures; it cannot run a kernel without a GPU. Here g++ compiles the unchanged kernels.cu (with
tests/cuda_cpu/cuda_on_cpu.h supplying the CUDA names), and every kernel runs for real: each block's
threads as fibers, barriers and shuffles checked, shared memory poisoned before every block.

1. The harness itself, on tests/cuda_cpu/selftest.cu (which nvcc accepts too): barriers, shared
   memory, shuffles, votes, atomics and flushed denormals give CUDA's results; a divergent
   barrier, a bad shuffle mask or width, a read of unwritten shared memory, a missing barrier, a
   launch the GPU would refuse and an out-of-bounds read are all caught.
2. Every kernel against its twin, on test_kernels.py's cases (the host functions of phi4flash.py
   launch it; each launch runs both and compares every array the kernel writes), and the host
   result against the model's own function.
3. Real shapes: 40/20 heads, head_dim 64, T = 2048 through a 512 window; a 65,536-key decode;
   the scan at d_inner 5120; the GEMV at 2560 x 10240.
4. Shuffled thread/block orders and other poison bytes change no bit of any kernel's output.
5. The AddressSanitizer + UBSan build runs every kernel without a report (and equals the -O2 build).
6. Mutations of kernels.cu (a deleted barrier, a wrong shuffle width, an off-by-one window, a wrong
   head index) make section 2's comparison fail: the harness catches those bugs. Every barrier,
   knocked out in turn, is noticed, except two that turn out to be redundant.
7. The whole model through the real kernels (test_gpu.py's GPU code path, with each launch running
   the kernel instead of the twin): reference parity, decode == full recompute, greedy targets.

Everything skips, with the reason, when no C++ compiler is found.
"""
import contextlib
import os
import subprocess

import numpy as np
import pytest

import cuda_cpu
import phi4flash as pf
from conftest import PROMPTS
from test_gpu import assert_forward_matches_reference, gpu_code_path, greedy_decode, maxdiff
from test_kernels import (PREFILL_CASES, SIGNATURES, LaunchChecker, attention_case, bf16_bits, find_nvcc,
                          gemv_epilogue_checks, mamba_checks, rand, scan_checks, scan_step_checks)

SELFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_cpu", "selftest.cu")
WRITTEN = ("float*", "long long*")
# Kernel vs twin, relative to max(1, |twin|). The twins follow the kernels' tiling, online-softmax
# and reduction order, so what differs is the order inside a dot product (BLAS or einsum in the
# twin, a sequential loop in the kernel) and glibc's expf/tanhf against NumPy's: a few float32 ulps.
# Measured worst over every case here: 5.5e-7 (attention_prefill), 3.4e-7 (decode split), 2.1e-7
# (gemv), 1.9e-7 (scan), 1e-7 (conv); kv_write is exact.
TWIN_TOL = 2e-6
# Against the model's own functions (attend, selective_scan_sequential, ...): test_kernels.py's bar
# for the twins. Measured worst: 5.3e-7 on the small cases, 1.6e-6 for the real-shape prefill.
MODEL_TOL = 1e-5


@pytest.fixture(scope="session")
def real():
    """kernels.cu compiled for the CPU (cached in tests/.cuda_cpu_build)."""
    if cuda_cpu.compiler() is None:
        pytest.skip("no C++ compiler (g++ or c++, or $CXX): the CPU harness compiles kernels.cu")
    return cuda_cpu.kernels()


@pytest.fixture(scope="session")
def selftest():
    if cuda_cpu.compiler() is None:
        pytest.skip("no C++ compiler (g++ or c++, or $CXX): the CPU harness compiles its self-test kernels")
    return cuda_cpu.kernels(SELFTEST)


def asan_or_skip():
    if cuda_cpu.compiler() is None or cuda_cpu.asan_runtime() is None:
        pytest.skip("no C++ compiler with AddressSanitizer (libasan.so) found")


def relative_error(want, got):
    """max |got − want| / max(1, max |want|); inf where non-finite values differ; integers exact."""
    if want.dtype.kind in "iu":
        return 0.0 if np.array_equal(want, got) else np.inf
    want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
    special = ~np.isfinite(want)
    if not np.array_equal(want[special], got[special], equal_nan=True) or not np.isfinite(got[~special]).all():
        return np.inf
    w, g = want[~special], got[~special]
    return float(np.abs(g - w).max(initial=0.0) / max(1.0, np.abs(w).max(initial=0.0)))


def bitwise_equal(a, b):
    return a.dtype == b.dtype and np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))


class TwinVsKernel:
    """Stands in for pf._launch: each launch runs the NumPy twin on copies of the arguments and the
    real kernel on the arguments themselves (so the host code goes on with the kernel's results),
    then compares every array the kernel may write. Keeps each launch's inputs for replays."""

    def __init__(self, kernels, **launch_options):
        self.kernels, self.options = kernels, launch_options
        self.errors, self.launches = {}, []

    def __call__(self, twin, grid, block, args):
        name = twin.__name__
        self.launches.append(cuda_cpu.Launch(name, grid, block, cuda_cpu.clone_args(args)))
        twin_args = cuda_cpu.clone_args(args)
        twin(*twin_args)
        self.kernels.launch(name, grid, block, args, **self.options)
        params = self.kernels.kernels[name].params
        err = max(relative_error(t, a) for (ctype, _), t, a in zip(params, twin_args, args) if ctype in WRITTEN)
        self.errors[name] = max(self.errors.get(name, 0.0), err)


class Recorder:
    """Stands in for pf._launch: runs the twin, keeping each launch with copies of its inputs."""

    def __init__(self):
        self.launches = []

    def __call__(self, twin, grid, block, args):
        self.launches.append(cuda_cpu.Launch(twin.__name__, grid, block, cuda_cpu.clone_args(args)))
        twin(*args)


# ------------------------------------------------------------------------------------------------
# 1. The harness itself

def test_selftest_kernels_are_real_cuda(tmp_path):
    """The harness is judged on kernels nvcc accepts, warnings as errors (so, e.g., the atomics
    they call exist in CUDA with those types)."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    run = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-ftz=true", "-cubin", "-o", str(tmp_path / "s.cubin"),
                          "--Werror", "all-warnings", SELFTEST], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_barrier_and_shared_memory_across_threads(selftest):
    x = np.arange(1, 129, dtype=np.float32)
    out = np.empty(128, np.float32)
    selftest.launch("rotate_shared", (2,), (64,), (x, out))
    want = np.concatenate([np.roll(x[:64], -1), np.roll(x[64:], -1)])   # each block rotates its own 64
    assert np.array_equal(out, want)


def test_a_missing_barrier_shows_as_poison_and_order_dependence(selftest):
    """Without the barrier, thread t reads s[t + 1] before thread t + 1 wrote it: in index order that
    is the poison (NaN for 0xff bytes), and the result changes with the thread order."""
    x = np.arange(1, 65, dtype=np.float32)
    results = []
    for seed in (None, 1, 2):
        out = np.empty(64, np.float32)
        selftest.launch("rotate_shared_racy", (1,), (64,), (x, out), order_seed=seed)
        results.append(out)
    assert np.isnan(results[0][:63]).all() and results[0][63] == 1.0   # only the last thread reads a written slot
    assert not np.array_equal(results[1], results[2], equal_nan=True)
    out = np.empty(64, np.float32)
    selftest.launch("rotate_shared", (1,), (64,), (x, out), order_seed=1)  # with its barrier: order-proof
    assert np.array_equal(out, np.roll(x, -1))


@pytest.mark.parametrize("mode,message", [
    (0, r"divergent barrier: thread \(0,0,0\) waits at __syncthreads \(selftest.cu:\d+\) while thread \(16,0,0\) has exited"),
    (1, r"divergent barrier: thread \(0,0,0\) waits at __syncthreads \(selftest.cu:(\d+)\), thread \(16,0,0\) "
        r"waits at __syncthreads \(selftest.cu:(?!\1)\d+\)"),
    (2, r"thread \(16,0,0\) waits at __syncthreads_or"),
])
def test_divergent_barriers_are_reported(selftest, mode, message):
    with pytest.raises(cuda_cpu.KernelError, match=r"^divergent_barrier: block \(0,0,0\): .*" + message):
        selftest.launch("divergent_barrier", (1,), (32,), (np.empty(32, np.float32), np.int32(mode)))


def test_block_votes(selftest):
    x = np.where(np.arange(64) % 3 == 0, 1.0, -1.0).astype(np.float32)
    out = np.empty(192, np.float32)
    selftest.launch("block_votes", (1,), (64,), (x, out))
    assert out.reshape(64, 3).tolist() == [[1.0, 0.0, 22.0]] * 64   # or, and, count (22 multiples of 3 < 64)
    selftest.launch("block_votes", (1,), (64,), (np.ones(64, np.float32), out))
    assert out.reshape(64, 3).tolist() == [[1.0, 1.0, 64.0]] * 64


@pytest.mark.parametrize("width", [32, 8, 1])
def test_shuffles_follow_cuda_semantics(selftest, width):
    """xor butterfly sums over groups of `width` lanes; __shfl_sync from lane 3 of the group;
    down / up by one return the lane's own value at the group's edge; ballot and all over the warp."""
    x = (np.arange(64) - 5).astype(np.float32)
    out = np.empty(6 * 64, np.float32)
    selftest.launch("warp_ops", (1,), (64,), (x, out, np.int32(width)))
    out = out.reshape(64, 6)
    lane = np.arange(64)
    group = lane // width
    assert np.array_equal(out[:, 0], np.array([x[group == g].sum() for g in group], np.float32))
    assert np.array_equal(out[:, 1], x[group * width + 3 % width])
    assert np.array_equal(out[:, 2], np.where(lane % width == width - 1, x, x[np.minimum(lane + 1, 63)]))
    assert np.array_equal(out[:, 3], np.where(lane % width == 0, x, x[lane - 1]))
    ballots = [sum(1 << i for i in range(32) if x[w * 32 + i] > 0) for w in (0, 1)]
    assert np.array_equal(out[:, 4], np.repeat(np.array(ballots, np.float32), 32))
    assert out[:, 5].tolist() == [0.0] * 32 + [1.0] * 32              # warp 1 (x = 27..58) is all positive


@pytest.mark.parametrize("mask,lane_mask,width,active,message", [
    (0x0000FFFF, 1, 32, 32, r"thread \(16,0,0\): __shfl_xor_sync \(selftest.cu:\d+\): lane 16 calls it with "
                            r"mask 0x0000ffff, which leaves the lane out"),
    (-1, 1, 24, 32, r"width 24 is not a power of two in \[1, 32\]"),
    (-1, 1, 32, 16, r"waits at __shfl_xor_sync \(selftest.cu:\d+\) with mask 0xffffffff, but lane 16 of its mask "
                    r"has exited"),
    (0x0000FFFF, 16, 32, 16, r"lane 0 reads lane 16, which is not in the mask 0x0000ffff"),
])
def test_bad_shuffles_are_reported(selftest, mask, lane_mask, width, active, message):
    x = np.arange(32, dtype=np.float32)
    args = (x, np.empty(32, np.float32), np.int32(mask), np.int32(lane_mask), np.int32(width), np.int32(active))
    with pytest.raises(cuda_cpu.KernelError, match=r"^shuffle_with: block \(0,0,0\).*" + message):
        selftest.launch("shuffle_with", (1,), (32,), args)


def test_good_partial_shuffles_pass(selftest):
    """The same kernel with a consistent half-warp mask: lanes 0..15 swap neighbours."""
    x = np.arange(32, dtype=np.float32)
    out = np.zeros(32, np.float32)
    selftest.launch("shuffle_with", (1,), (32,), (x, out, np.int32(0xFFFF), np.int32(1), np.int32(32), np.int32(16)))
    assert np.array_equal(out[:16], x[np.arange(16) ^ 1]) and not out[16:].any()


def test_a_block_that_is_not_whole_warps_cannot_shuffle_with_a_full_mask(selftest):
    args = (np.arange(48, dtype=np.float32), np.empty(48, np.float32), np.int32(-1), np.int32(1), np.int32(32), np.int32(32))
    with pytest.raises(cuda_cpu.KernelError, match=r"a block of 48 threads is not a whole number of warps"):
        selftest.launch("shuffle_with", (1,), (48,), args)


def test_poison_exposes_reads_of_unwritten_shared_memory(selftest):
    """Threads 32..63 read shared slots nobody wrote: the poison byte shows through (NaN for 0xff,
    0 for 0x00), so two poisons differ for this kernel and agree for a correct one. Shared memory
    is poisoned per block: block 1 does not see block 0's writes."""
    outs = {}
    for poison in (0xFF, 0x00):
        out = np.empty(128, np.float32)
        selftest.launch("reads_shared", (2,), (64,), (out, np.int32(32), np.int32(1)), poison=poison)
        outs[poison] = out
    assert np.array_equal(outs[0xFF][:32], np.arange(32)) and np.isnan(outs[0xFF][32:]).all()
    assert np.array_equal(outs[0x00][:32], np.arange(32)) and not outs[0x00][32:].any()
    correct = []
    for poison in (0xFF, 0x00):
        out = np.empty(128, np.float32)
        selftest.launch("reads_shared", (2,), (64,), (out, np.int32(64), np.int32(0)), poison=poison)
        correct.append(out)
    assert bitwise_equal(*correct) and np.array_equal(correct[0], np.tile(np.arange(64), 2))


def test_atomics_across_blocks_and_threads(selftest):
    x = np.random.default_rng(1).integers(0, 10, 1000)
    for seed in (None, 4):
        counts = np.zeros(10, np.int64)
        selftest.launch("histogram", (8,), (128,), (x, counts, np.int32(1000)), order_seed=seed)
        assert np.array_equal(counts, np.bincount(x, minlength=10))


def test_denormals_are_flushed_inside_a_launch_only(selftest):
    """FTZ/DAZ as -ftz=true: a denormal product and a denormal input become 0 in the kernel; the
    floating-point mode is restored afterwards (NumPy still sees the denormal)."""
    x = np.array([1e-20, 1e-20, 1e-40], np.float32)
    out = np.full(2, 7.0, np.float32)
    selftest.launch("denormals", (1,), (32,), (x, out))
    assert out.tolist() == [0.0, 0.0]
    assert x[0] * x[1] > 0 and x[2] + np.float32(0) > 0


def test_launches_are_checked_against_the_signature_and_limits(selftest, real):
    x, out = np.arange(64, dtype=np.float32), np.empty(64, np.float32)
    bad = [((x.astype(np.float64), out), r"x must be a float32 array"),
           ((x, out[::2]), r"out must be C-contiguous"),
           ((x, np.broadcast_to(out, (64,))), r"out \(float\*\) is written but the array is read-only"),
           ((x,), r"1 arguments for 2 parameters")]
    for args, message in bad:
        with pytest.raises(cuda_cpu.KernelError, match=r"^rotate_shared: " + message):
            selftest.launch("rotate_shared", (1,), (64,), args)
    with pytest.raises(cuda_cpu.KernelError, match=r"must be int32, got int\b"):   # a Python int: 8 bytes on a GPU
        selftest.launch("reads_shared", (1,), (64,), (out, 64, np.int32(0)))
    with pytest.raises(cuda_cpu.KernelError, match=r"block \(2048, 1, 1\) outside CUDA's limits"):
        selftest.launch("rotate_shared", (1,), (2048,), (x, out))
    with pytest.raises(cuda_cpu.KernelError, match=r"grid \(1, 70000, 1\) outside CUDA's limits"):
        selftest.launch("rotate_shared", (1, 70000), (64,), (x, out))
    with pytest.raises(cuda_cpu.KernelError, match=r"block of 512 threads exceeds __launch_bounds__\(GEMV_WARPS \* WARP\) = 256"):
        y = np.zeros((1, 8), np.float32)
        real.launch("gemv_bf16", (1,), (512,), (np.zeros((1, 8), np.float32), np.zeros((8, 8), np.uint16), y, y, y,
                                                  np.int32(1), np.int32(8), np.int32(8), np.int32(0), np.int32(0),
                                                  np.int32(1)))


def test_the_compiler_sees_the_parameter_types_the_parser_reads(real):
    """cuda_cpu_params_<kernel> spells the compiled C++ types; Kernels() refuses a mismatch, so the
    launch checks rest on the real signatures. Also: every kernel of SIGNATURES is in the build."""
    assert sorted(real.kernels) == sorted(SIGNATURES)
    for name, params in SIGNATURES.items():
        assert [t for t, _ in real.kernels[name].params] == [t for t, _ in params]
    declared = {"attention_prefill": pf.PREFILL_THREADS, "attention_decode_split": pf.DECODE_THREADS,
                "attention_decode_reduce": pf.REDUCE_THREADS, "gemv_bf16": pf.GEMV_WARPS * 32,
                "gemv_f32": pf.GEMV_WARPS * 32, "layer_norm_rows": pf.NORM_THREADS}
    for name, kernel in real.kernels.items():                           # no __launch_bounds__: CUDA's 1024
        assert real.bounds[name] == (declared[name] if kernel.bound else 1024), name


def test_kernels_cu_builds_without_warnings(real):
    """g++ -Wall -Wextra on kernels.cu: a warning here (an unused result, a sign mix, a maybe-
    uninitialised value) is worth reading before it reaches a GPU."""
    log = cuda_cpu.build_log(real.path)
    assert "warning" not in log.lower(), log[-3000:]


def test_out_of_bounds_reads_are_caught_by_the_sanitized_build(selftest):
    """The -O2 build reads past the end silently; the sanitized build reports a heap overflow (an
    array argument, copied into a malloc of exactly its size), a read past a __shared__ array
    (UBSan's object-size check comes first; ASan alone reports it as a global-buffer-overflow, its
    redzones surrounding each shared array), and a signed int overflow in an index (UBSan)."""
    asan_or_skip()
    x, out = np.arange(64, dtype=np.float32), np.empty(64, np.float32)
    selftest.launch("reads_past_end", (1,), (64,), (x, out))           # -O2: unnoticed
    fine = cuda_cpu.run_sanitized([cuda_cpu.Launch("rotate_shared", (1,), (64,), [x, out])], SELFTEST)
    assert np.array_equal(fine[0][1], np.roll(x, -1))
    cases = [(cuda_cpu.Launch("reads_past_end", (1,), (64,), [x, out]), r"AddressSanitizer: heap-buffer-overflow"),
             (cuda_cpu.Launch("shared_past_end", (1,), (64,), [out, np.int32(1)]),
              r"insufficient space for an object of type 'const float'|AddressSanitizer: global-buffer-overflow"),
             (cuda_cpu.Launch("index_overflow", (1,), (32,), [out, np.int32(65536)]), r"signed integer overflow: 65536 \* 65536")]
    for launch, report in cases:
        with pytest.raises(cuda_cpu.KernelError, match=report):
            cuda_cpu.run_sanitized([launch], SELFTEST)


PDL_ERRORS = [
    (3, False, r"block \(1,0,0\): the block exited without reaching cudaGridDependencySynchronize \(kernels.cu's "
               r"pdl_wait\): PDL rule 2"),
    (4, False, r"divergent barrier: thread \(0,0,0\) waits at cudaGridDependencySynchronize \(pdl_wait\) "
               r"\(selftest.cu:\d+\) while thread \(16,0,0\) has exited"),
    (5, False, r"cudaTriggerProgrammaticLaunchCompletion \(selftest.cu:\d+\) before this thread's "
               r"cudaGridDependencySynchronize: kernels.cu's PDL rule 3"),
    (6, False, r"cudaGridDependencySynchronize \(pdl_wait\) \(selftest.cu:\d+\) reached a second time"),
    (7, False, r"prefetch_l2 \(selftest.cu:\d+\) of argument 'x', which is not IMMUTABLE"),
    (8, False, r"prefetch_l2 \(selftest.cu:\d+\) of 1024 bytes at 0x[0-9a-f]+: not inside any argument"),
]


def pdl_args(mode):
    w = np.arange(128, dtype=np.float32)
    return w, (w * 0.5).astype(np.float32), np.zeros(128, np.float32), np.int32(mode)


@pytest.mark.parametrize("mode, _, message", PDL_ERRORS)
def test_the_pdl_rules_are_checked(selftest, mode, _, message):
    """kernels.cu's PDL rules on a kernel that keeps them (mode 0) and breaks each in turn: a
    block that exits without the wait (only an error when launched as PDL), a thread that does, a
    trigger before the wait, a second wait, an L2 prefetch of a non-IMMUTABLE argument or past one."""
    w, x, out, _ = pdl_args(0)
    selftest.launch("pdl_rules", (2,), (64,), (w, x, out, np.int32(0)), pdl=True, order_seed=5)
    assert np.array_equal(out, w + x)
    if mode == 3:
        selftest.launch("pdl_rules", (2,), (64,), pdl_args(3))           # not a PDL launch: rule 2 not needed
    with pytest.raises(cuda_cpu.KernelError, match=message):
        selftest.launch("pdl_rules", (2,), (64,), pdl_args(mode), pdl=True)


def test_a_pdl_kernel_touching_a_mutable_argument_before_its_wait_is_named(selftest):
    """Under AddressSanitizer the arguments not marked IMMUTABLE are poisoned from the start of each
    block of a PDL launch until its wait: a read (mode 1) or a write (mode 2) of one before the
    wait is reported, with the argument's name. The same launches without the PDL check pass."""
    asan_or_skip()
    fine = cuda_cpu.run_sanitized([cuda_cpu.Launch("pdl_rules", (2,), (64,), list(pdl_args(0)), True)], SELFTEST)
    assert np.array_equal(fine[0][2], pdl_args(0)[0] * 1.5)
    for mode, name in ((1, "x"), (2, "out")):
        cuda_cpu.run_sanitized([cuda_cpu.Launch("pdl_rules", (2,), (64,), list(pdl_args(mode)))], SELFTEST)
        with pytest.raises(cuda_cpu.KernelError, match=rf"(?s)use-after-poison.*touched argument '{name}' before "
                                                        r"cudaGridDependencySynchronize|touched argument '" + name):
            cuda_cpu.run_sanitized([cuda_cpu.Launch("pdl_rules", (2,), (64,), list(pdl_args(mode)), True)], SELFTEST)


# ------------------------------------------------------------------------------------------------
# 2. Every kernel against its twin, on test_kernels.py's cases

def conv_checks(T, direct_prefill=False):
    rng = np.random.default_rng(T)
    d_inner, d_conv = 40, 4
    x, state = rand(rng, T, d_inner), rand(rng, d_conv - 1, d_inner)
    w, b = rand(rng, d_inner, d_conv), rand(rng, d_inner)
    want, want_state = pf.causal_conv1d(x, state, w, b)
    if direct_prefill:                                                  # the prefill kernel at T = 1 too
        out = np.empty_like(x)
        pf._launch(pf.conv1d_silu_prefill, (pf._blocks(T * d_inner, 256),), (256,),
                   (x, state, w, b, out, np.int32(T), np.int32(d_inner), np.int32(d_conv)))
        return [("out", out, pf.silu(want))]
    state_inout = state.copy()
    got = pf.cuda_conv1d_silu(x, state_inout, w, b)
    return [("out", got, pf.silu(want)), ("conv_state", state_inout, want_state)]


def prefill_checks(H, H_kv, hd, T, past, window):
    rng = np.random.default_rng(T * 7 + past)
    q, k, v, qpos, kpos, subln = attention_case(rng, H, H_kv, hd, T, past, window)
    want = pf.attend(q, k, v, qpos, kpos, window, np.float32(0.31), 0.62, subln)
    return [("out", pf.cuda_attend(q, k, v, qpos, kpos, window, np.float32(0.31), 0.62, subln), want)]


def prefix_view_checks():
    """The shared buffer's prefix view: k, v reach the kernel with a head stride of 64 · 8."""
    rng = np.random.default_rng(5)
    q, k, v, qpos, kpos, subln = attention_case(rng, 8, 4, 8, 19, 0, None)
    kbuf, vbuf = np.zeros((4, 64, 8), np.float32), np.zeros((4, 64, 8), np.float32)
    kbuf[:, :19], vbuf[:, :19] = k, v
    want = pf.attend(q, k, v, qpos, kpos, None, 0.2, 0.5, subln)
    return [("out", pf.cuda_attend(q, kbuf[:, :19], vbuf[:, :19], qpos, kpos, None, 0.2, 0.5, subln), want)]


def decode_checks(H, H_kv, hd, S, window):
    rng = np.random.default_rng(S + hd)
    q, k, v, qpos, kpos, subln = attention_case(rng, H, H_kv, hd, 1, S - 1, None)
    want = pf.attend(q, k, v, qpos, kpos, window, 0.4, 0.7, subln)
    return [("out", pf.cuda_attend(q, k, v, qpos, kpos, window, 0.4, 0.7, subln), want)]


def ring_checks():
    """A preallocated buffer (slots past the length are -1) and wrapped / half-filled rings."""
    rng = np.random.default_rng(9)
    H, H_kv, hd, W = 8, 4, 8, 8
    subln = 1 + rand(rng, 2 * hd, scale=0.1)
    q, k, v = rand(rng, H, 1, hd), rand(rng, H_kv, 300, hd), rand(rng, H_kv, 300, hd)
    kpos = np.where(np.arange(300) < 170, np.arange(300), -1)
    checks = [("buffer", pf.cuda_attend(q, k, v, np.array([169]), kpos, None, 0.4, 0.7, subln),
               pf.attend(q, k[:, :170], v[:, :170], np.array([169]), np.arange(170), None, 0.4, 0.7, subln))]
    for newest in (20, 4):
        positions = np.arange(max(0, newest - W + 1), newest + 1)
        kt, vt = rand(rng, H_kv, len(positions), hd), rand(rng, H_kv, len(positions), hd)
        ring_k, ring_v = np.zeros((H_kv, W, hd), np.float32), np.zeros((H_kv, W, hd), np.float32)
        ring_pos = np.full(W, -1)
        ring_k[:, positions % W], ring_v[:, positions % W], ring_pos[positions % W] = kt, vt, positions
        checks.append((f"ring {newest}", pf.cuda_attend(q, ring_k, ring_v, np.array([newest]), ring_pos, W, 0.4, 0.7, subln),
                       pf.attend(q, kt, vt, np.array([newest]), positions, W, 0.4, 0.7, subln)))
    return checks


def kv_write_checks():
    """Ring slots pos % W for 20 positions, then the append buffer, including a slot past its end."""
    rng = np.random.default_rng(3)
    H_kv, hd, W = 4, 8, 8
    ring = [np.zeros((H_kv, W, hd), np.float32), np.zeros((H_kv, W, hd), np.float32), np.full(W, -1)]
    want = [a.copy() for a in ring]
    for p in range(20):
        kn, vn = rand(rng, H_kv, hd), rand(rng, H_kv, hd)
        pf._launch(pf.kv_write, (pf._blocks(H_kv * hd, 256),), (256,),
                   (kn, vn, *ring, np.array([p]), np.int32(H_kv), np.int32(hd), np.int32(W), np.int32(W)))
        want[0][:, p % W], want[1][:, p % W], want[2][p % W] = kn, vn, p
    buf = [np.zeros((H_kv, 5, hd), np.float32), np.zeros((H_kv, 5, hd), np.float32), np.full(5, -1)]
    for p in (3, 5):
        pf._launch(pf.kv_write, (1,), (256,), (kn, vn, *buf, np.array([p]), np.int32(H_kv), np.int32(hd), np.int32(5), np.int32(0)))
    return [("ring k", ring[0], want[0]), ("ring v", ring[1], want[1]), ("ring pos", ring[2], want[2]),
            ("buffer pos", buf[2], np.array([-1, -1, -1, 3, -1])), ("buffer v", buf[1][:, 3], vn)]


def gemv_checks(rows, out, inp):
    rng = np.random.default_rng(rows * out + inp)
    W, x = bf16_bits(rand(rng, out, inp)), rand(rng, rows, inp)
    want = x.astype(np.float64) @ pf.bf16_to_f32(W).T.astype(np.float64)
    return [("y", pf.cuda_linear(x, W), want)]


def layer_norm_checks(rows, D):
    rng = np.random.default_rng(rows * D)
    x, p = rand(rng, rows, D, scale=3.0) + 1.0, {"weight": rand(rng, D), "bias": rand(rng, D)}
    return [("y", pf.cuda_layer_norm(x, p, np.empty_like(x), 1e-5), pf.layer_norm(x, p, 1e-5))]


def embed_checks(dtype):
    rng = np.random.default_rng(4)
    E = rand(rng, 50, 96)
    table, twin = (bf16_bits(E), pf.embed_bf16) if dtype == "bf16" else (E, pf.embed_f32)
    y = np.empty((1, 96), np.float32)
    pf._launch(twin, (1,), (256,), (table, np.array([41]), y, np.int32(96)))
    return [("row", y[0], pf.f32(table)[41])]


def case_table():
    """(kernel, case id, checks function(monkeypatch) -> [(what, got, want)]) for every kernel."""
    yield "conv1d_silu_step", "T1", lambda mp: conv_checks(1)
    yield "conv1d_silu_prefill", "T1-direct", lambda mp: conv_checks(1, direct_prefill=True)
    for T in (2, 3, 37):
        yield "conv1d_silu_prefill", f"T{T}", lambda mp, T=T: conv_checks(T)
    for T in (1, 5, 33, 100):
        yield "scan_prefill", f"T{T}", lambda mp, T=T: scan_checks(T)
    for R, N in ((4, 16), (160, 16), (7, 8)):
        yield "scan_step", f"dt_rank{R}-N{N}", lambda mp, R=R, N=N: scan_step_checks(R, N)
    for T in (1, 7, 40):
        yield "scan_prefill", f"mamba-T{T}", lambda mp, T=T: mamba_checks(T)
    for c in PREFILL_CASES:
        yield "attention_prefill", "H{}-Hkv{}-hd{}-T{}-past{}-W{}".format(*c), lambda mp, c=c: prefill_checks(*c)
    yield "attention_prefill", "prefix-view", lambda mp: prefix_view_checks()
    # (4, 2, 8, 33000): 258 splits, so that the reduce takes the splits in two chunks of REDUCE_THREADS
    for c in [(8, 4, 8, 1000, None), (4, 2, 64, 300, None), (8, 4, 8, 129, None), (8, 4, 8, 300, 8), (16, 4, 8, 77, None),
              (4, 2, 8, 33000, None)]:
        for kernel in ("attention_decode_split", "attention_decode_reduce"):
            yield kernel, "H{}-Hkv{}-hd{}-S{}-W{}".format(*c), lambda mp, c=c: decode_checks(*c)
    for kernel in ("attention_decode_split", "attention_decode_reduce"):
        yield kernel, "buffer-and-rings", lambda mp: ring_checks()
    yield "kv_write", "ring-and-append", lambda mp: kv_write_checks()
    for c in [(1, 37, 64), (3, 37, 300), (8, 37, 4), (1, 256, 2560), (2, 9, 1000)]:
        yield "gemv_bf16", "rows{}-out{}-in{}".format(*c), lambda mp, c=c: gemv_checks(*c)
    for dtype in ("bf16", "f32"):
        for c in [(1, 37, 5120), (3, 9, 300), (2, 5, 7)]:
            yield f"gemv_{dtype}", "epilogues-rows{}-out{}-in{}".format(*c), lambda mp, d=dtype, c=c: gemv_epilogue_checks(d, *c)
    for c in [(1, 64), (3, 2560), (2, 77)]:
        yield "layer_norm_rows", "rows{}-D{}".format(*c), lambda mp, c=c: layer_norm_checks(*c)
    for dtype in ("bf16", "f32"):
        yield f"embed_{dtype}", "row41", lambda mp, d=dtype: embed_checks(d)


CASES = list(case_table())
CHECKS = {(kernel, case): fn for kernel, case, fn in CASES}


def test_every_kernel_has_harness_cases():
    """A new kernel in kernels.cu without a case here fails this test."""
    assert sorted({kernel for kernel, _, _ in CASES}) == sorted(SIGNATURES)


def run_case(kernels, monkeypatch, kernel, case, **options):
    """Run a case with every launch compared against its twin -> (the comparer, host checks)."""
    compare = TwinVsKernel(kernels, **options)
    with monkeypatch.context() as m:
        m.setattr(pf, "_launch", compare)
        checks = CHECKS[kernel, case](m)
    return compare, checks


@pytest.mark.parametrize("kernel,case", [(k, c) for k, c, _ in CASES])
def test_kernel_equals_its_twin(real, monkeypatch, kernel, case):
    compare, checks = run_case(real, monkeypatch, kernel, case)
    assert kernel in compare.errors, f"the case never launched {kernel}"
    for name, err in compare.errors.items():
        assert err <= TWIN_TOL, (name, err)
    for what, got, want in checks:                                      # the host result, from real kernels
        assert relative_error(np.asarray(want), got) <= MODEL_TOL, what


# ------------------------------------------------------------------------------------------------
# 3. Real shapes (40 query / 20 KV heads, head_dim 64, window 512, d_inner 5120, d_state 16)

def test_real_shape_attention_prefill_2048_tokens_window_512(real, monkeypatch):
    """1280 blocks of 256 threads; each walks the ~33 key tiles its 16 rows can see. attend() is
    asked for three row ranges only (the start, inside the window's steady state, the ragged end):
    each query row depends on nothing but its own keys, and the kernel computes all of them."""
    rng = np.random.default_rng(2048)
    q, k, v, qpos, kpos, subln = attention_case(rng, 40, 20, 64, 2048, 0, 512)
    launches = cuda_cpu.Launcher(real)
    monkeypatch.setattr(pf, "_launch", launches)
    got = pf.cuda_attend(q, k, v, qpos, kpos, 512, np.float32(0.3), 0.6, subln)
    assert launches.counts == {"attention_prefill": 1}
    for a, b in ((0, 40), (1000, 1040), (2020, 2048)):
        want = pf.attend(q[:, a:b], k, v, qpos[a:b], kpos, 512, np.float32(0.3), 0.6, subln)
        assert relative_error(want, got[a:b]) <= MODEL_TOL, (a, b)


def test_real_shape_decode_over_65536_keys(real, monkeypatch):
    """512 splits x 10 KV groups, then the merge; against attend over the same 65,536 keys."""
    rng = np.random.default_rng(65536)
    H, H_kv, hd, S = 40, 20, 64, 65536
    q = rng.standard_normal((H, 1, hd), np.float32)
    k, v = rng.random((H_kv, S, hd), np.float32), rng.random((H_kv, S, hd), np.float32)  # uniform: 4x cheaper to draw
    k -= 0.5
    k *= 4.0                                               # scores of unit variance, as with normal keys
    v -= 0.5
    subln = 1 + rand(rng, 2 * hd, scale=0.1)
    want = pf.attend(q, k, v, np.array([S - 1]), np.arange(S), None, np.float32(0.3), 0.6, subln)
    launches = cuda_cpu.Launcher(real)
    monkeypatch.setattr(pf, "_launch", launches)
    got = pf.cuda_attend(q, k, v, np.array([S - 1]), np.arange(S), None, np.float32(0.3), 0.6, subln)
    assert launches.counts == {"attention_decode_split": 1, "attention_decode_reduce": 1}
    assert relative_error(want, got) <= MODEL_TOL


def test_real_shape_decode_through_a_wrapped_512_ring(real, monkeypatch):
    compare = TwinVsKernel(real)
    rng = np.random.default_rng(600)
    q, k, v, qpos, kpos, subln = attention_case(rng, 40, 20, 64, 1, 600, 512)
    ring_k, ring_v, ring_pos = np.zeros((20, 512, 64), np.float32), np.zeros((20, 512, 64), np.float32), np.full(512, -1)
    ring_k[:, kpos % 512], ring_v[:, kpos % 512], ring_pos[kpos % 512] = k, v, kpos
    want = pf.attend(q, k, v, qpos, kpos, 512, np.float32(0.3), 0.6, subln)
    monkeypatch.setattr(pf, "_launch", compare)
    got = pf.cuda_attend(q, ring_k, ring_v, qpos, ring_pos, 512, np.float32(0.3), 0.6, subln)
    assert set(compare.errors) == {"attention_decode_split", "attention_decode_reduce"}
    assert max(compare.errors.values()) <= TWIN_TOL and relative_error(want, got) <= MODEL_TOL


@pytest.mark.parametrize("T", [1, 3])
def test_real_shape_scan(real, monkeypatch, T):
    """160 blocks of 512 threads (32 channels x 16 states), the state carried in registers; T = 1 is
    the decode step's fused scan (dt_rank 160)."""
    compare = TwinVsKernel(real)
    monkeypatch.setattr(pf, "_launch", compare)
    checks = scan_checks(T, E=5120, N=16) if T > 1 else scan_step_checks(160, 16, E=5120)
    assert list(compare.errors) == ["scan_step" if T == 1 else "scan_prefill"]
    assert max(compare.errors.values()) <= TWIN_TOL
    for what, got, want in checks:
        assert relative_error(want, got) <= MODEL_TOL, what


@pytest.mark.parametrize("rows,out,inp", [(1, 2560, 10240), (8, 2560, 10240), (3, 10240, 2560)])
def test_real_shape_gemv(real, monkeypatch, rows, out, inp):
    """The MLP's down projection (10240 -> 2560) and up projection (2560 -> 10240) for 1..8 rows."""
    compare = TwinVsKernel(real)
    monkeypatch.setattr(pf, "_launch", compare)
    (what, got, want), = gemv_checks(rows, out, inp)
    assert list(compare.errors) == ["gemv_bf16"] and compare.errors["gemv_bf16"] <= TWIN_TOL
    assert relative_error(want, got) <= MODEL_TOL


# ------------------------------------------------------------------------------------------------
# 4. Thread/block orders and poison bytes change no bit

def recorded_launches(monkeypatch, kernel, cases=None):
    """The launches of `kernel` in its first `cases` cases (None: all), as the host code makes them
    (the twins run)."""
    recorder = Recorder()
    with monkeypatch.context() as m:
        m.setattr(pf, "_launch", recorder)
        for case in [c for k, c, _ in CASES if k == kernel][:cases]:
            CHECKS[kernel, case](m)
    return [launch for launch in recorder.launches if launch.name == kernel]


def replay(kernels, launch, **options):
    args = cuda_cpu.clone_args(launch.args)
    kernels.launch(launch.name, launch.grid, launch.block, args, **options)
    return args


@pytest.mark.parametrize("kernel", sorted(SIGNATURES))
def test_orders_and_poison_change_no_bit(real, monkeypatch, kernel):
    launches = recorded_launches(monkeypatch, kernel)
    assert launches
    for launch in launches:
        plain = replay(real, launch)
        for seed, poison in ((1, 0x00), (2, 0x7F), (3, 0xFF)):
            other = replay(real, launch, order_seed=seed, poison=poison)
            for (ctype, pname), a, b in zip(real.kernels[kernel].params, plain, other):
                if ctype in WRITTEN:
                    assert bitwise_equal(a, b), (pname, seed, poison)


# ------------------------------------------------------------------------------------------------
# 5. The sanitized build

def test_every_kernel_runs_clean_under_asan_and_ubsan(real, monkeypatch):
    """Every launch of section 2's cases (65 launches, all kernels), each pointer argument in a
    malloc of exactly its extent, in one child process; the outputs equal the -O2 build's, bit for
    bit (no FMA contraction on either side, and neither reorders float sums)."""
    asan_or_skip()
    launches = [launch for kernel in sorted(SIGNATURES) for launch in recorded_launches(monkeypatch, kernel)]
    assert sorted({launch.name for launch in launches}) == sorted(SIGNATURES)
    results = cuda_cpu.run_sanitized(launches, order_seed=5, poison=0x00)
    for launch, sanitized in zip(launches, results):
        plain = replay(real, launch)
        for (ctype, pname), a, b in zip(real.kernels[launch.name].params, plain, sanitized):
            if ctype in WRITTEN:
                assert bitwise_equal(a, b), (launch.name, pname)


# ------------------------------------------------------------------------------------------------
# 6. Mutations of kernels.cu are caught

MUTATIONS = {  # id: (text in kernels.cu, its replacement, the cases that must then fail)
    "prefill-barrier-after-tile-load-deleted": (
        "        if (tid < PREFILL_KEYS) s_kpos[tid] = tid < n_keys ? kpos[k0 + tid] : -1;\n        __syncthreads();\n",
        "        if (tid < PREFILL_KEYS) s_kpos[tid] = tid < n_keys ? kpos[k0 + tid] : -1;\n",
        [("attention_prefill", "H8-Hkv4-hd8-T37-past0-WNone")]),
    "group-sum-shuffle-width-16": (
        "v += __shfl_xor_sync(0xffffffffu, v, offset);",
        "v += __shfl_xor_sync(0xffffffffu, v, offset, 16);",
        [("gemv_bf16", "rows1-out37-in64")]),
    "window-sees-one-key-too-many": (
        "key_pos > query_pos - window",
        "key_pos >= query_pos - window",
        [("attention_prefill", "H8-Hkv4-hd8-T150-past0-W8"), ("attention_decode_split", "H8-Hkv4-hd8-S300-W8")]),
    "gemv-split-k-drops-the-last-warp": (
        "for (int p = 0; p < splits; p++) total += s_part[warp + p][t][r];",
        "for (int p = 0; p < splits - 1; p++) total += s_part[warp + p][t][r];",
        [("gemv_bf16", "epilogues-rows1-out37-in5120"), ("gemv_f32", "epilogues-rows1-out37-in5120")]),
    "scan-step-dt-dot-reads-the-wrong-row": (
        "dt += xdbc[k] * dt_proj[(long long)c * dt_rank + k];",
        "dt += xdbc[k] * dt_proj[(long long)c * d_state + k];",
        [("scan_step", "dt_rank160-N16")]),
    "prefill-query-head-ignores-gqa-factor": (
        "int t = t0 + row, head = 2 * (g * G + r) + s;",
        "int t = t0 + row, head = 2 * (g + r) + s;",
        [("attention_prefill", "H8-Hkv4-hd8-T37-past0-WNone")]),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_mutated_kernels_cu_fails_the_comparison(real, monkeypatch, tmp_path, mutation):
    """Each mutation is a plausible one-token bug; every case named must now fail (the same cases
    pass with kernels.cu itself, in section 2)."""
    old, new, cases = MUTATIONS[mutation]
    source = open(pf.KERNELS_CU).read()
    assert source.count(old) == 1, "the mutation's text is no longer in kernels.cu: update MUTATIONS"
    path = tmp_path / "kernels.cu"
    path.write_text(source.replace(old, new))
    mutant = cuda_cpu.kernels(str(path))
    for kernel, case in cases:
        try:
            compare, checks = run_case(mutant, monkeypatch, kernel, case)
        except cuda_cpu.KernelError:
            continue                                                    # the harness itself refused it
        assert compare.errors[kernel] > 0.1, (kernel, case, compare.errors)      # measured: 0.6 to 1.4


# Every barrier of kernels.cu knocked out in turn, at run time (launch(skip_barrier=line): that
# __syncthreads() does nothing, as if deleted): the twin comparison, the harness's own checks (a
# divergent barrier) or the order/poison replays must notice, except for the barriers found to be
# redundant, whose removal changes no bit under any order or poison. Barriers are named by their
# rank in the kernel, so that edits elsewhere in kernels.cu do not move them.

REDUNDANT_BARRIERS = {
    ("scan_prefill", 3): "the staging arrays are last read before barrier 2, and s_y is rewritten only after the "
                         "next chunk's barrier 1",
}
KERNELS_CU_TEXT = open(pf.KERNELS_CU).read()
BARRIER_KERNELS = [k for k in sorted(SIGNATURES) if cuda_cpu.barrier_lines(KERNELS_CU_TEXT, k)]


def knockout_is_noticed(kernels, monkeypatch, kernel, line):
    try:
        return any(knockout_changes_case(kernels, monkeypatch, kernel, case, line) for k, case, _ in CASES if k == kernel)
    except cuda_cpu.KernelError:
        return True                                                     # e.g. threads now disagree on a loop bound


def knockout_changes_case(kernels, monkeypatch, kernel, case, line):
    compare, _ = run_case(kernels, monkeypatch, kernel, case, skip_barrier=line)
    if compare.errors[kernel] > TWIN_TOL:
        return True
    for launch in (launch for launch in compare.launches if launch.name == kernel):
        plain = replay(kernels, launch, skip_barrier=line)
        for seed in (1, 2, 3):
            other = replay(kernels, launch, skip_barrier=line, order_seed=seed, poison=0x00)
            if not all(bitwise_equal(a, b) for a, b in zip(plain, other) if isinstance(a, np.ndarray)):
                return True
    return False


@pytest.mark.parametrize("kernel", BARRIER_KERNELS)
def test_every_barrier_is_needed_or_known_redundant(real, monkeypatch, kernel):
    for rank, line in enumerate(cuda_cpu.barrier_lines(KERNELS_CU_TEXT, kernel), 1):
        noticed = knockout_is_noticed(real, monkeypatch, kernel, line)
        if (kernel, rank) in REDUNDANT_BARRIERS:
            assert not noticed, f"barrier {rank} of {kernel} (kernels.cu:{line}) is needed now: update REDUNDANT_BARRIERS"
        else:
            assert noticed, f"deleting barrier {rank} of {kernel} (kernels.cu:{line}) goes unnoticed"


# ------------------------------------------------------------------------------------------------
# 7. The whole model through the real kernels
#
# test_gpu.gpu_code_path routes the model through phi4flash.py's GPU section on NumPy arrays (the
# dispatches CuPy arrays take); here each launch then runs the real kernel via cuda_cpu.Launcher,
# behind test_kernels.LaunchChecker's signature checks. Only gpu_code_path knows where the
# dispatches are, so when phi4flash.py's GPU dispatch moves, these tests follow it unchanged.

@contextlib.contextmanager
def real_kernel_path(model, monkeypatch, **launch_options):
    """-> (the model as on a GPU, the launch checker), every launch running the real kernel."""
    with gpu_code_path(model, monkeypatch) as (gpu, _), monkeypatch.context() as m:
        checker = LaunchChecker(cuda_cpu.Launcher(**launch_options))
        m.setattr(pf, "_launch", checker)
        yield gpu, checker


WHOLE_MODEL_TOL = 1e-4   # as test_gpu.py: the real kernels must meet the twins' bar


@pytest.mark.parametrize("p", PROMPTS)
def test_real_kernels_forward_matches_reference(real, model, ref, monkeypatch, p):
    with real_kernel_path(model, monkeypatch) as (gpu, launches):
        assert_forward_matches_reference(gpu, launches, ref, p, WHOLE_MODEL_TOL)


@pytest.mark.parametrize("prompt_len", [1, 5, 13])
def test_real_kernels_decode_equals_full_recompute_past_three_windows(real, model, ref, monkeypatch, prompt_len):
    W = model.config.sliding_window[1]
    prompt = np.resize(ref["p2_input_ids"], prompt_len)
    with real_kernel_path(model, monkeypatch) as (gpu, launches):
        seq, cached, cache = greedy_decode(gpu, prompt, 3 * W + 5)
    full = model.forward(seq)                                           # the plain NumPy path
    assert maxdiff(np.array(cached), full[prompt_len - 1:]) <= WHOLE_MODEL_TOL
    steps, kinds = 3 * W + 5 + (prompt_len == 1), model.config.layer_kinds
    assert launches.counts["kv_write"] == steps * (kinds.count("swa") + 1)   # sliding layers + layer L/2+1
    assert launches.counts["scan_step"] == steps * kinds.count("mamba")
    for kernel in ("embed_bf16", "layer_norm_rows", "gemv_bf16", "conv1d_silu_step", "attention_decode_reduce"):
        assert launches.counts.get(kernel), kernel


def test_real_kernels_decode_and_chunks_mix_while_the_shared_kv_grows(real, model, monkeypatch):
    """Decode steps and multi-token chunks share one cache whose shared K/V starts too small and
    grows under both; every row equals the CPU path's."""
    seq = np.random.default_rng(4).integers(0, 500, 40)
    sizes = (3, 1, 1, 5, 1, 1, 1, 9, 1, 17)
    starts = np.cumsum((0,) + sizes[:-1])
    cpu_cache = model.new_cache(2)
    want = [model.run(cpu_cache, seq[s:s + n], "all" if n > 1 else "last") for s, n in zip(starts, sizes)]
    with real_kernel_path(model, monkeypatch) as (gpu, launches):
        cache = gpu.new_cache(2)
        got = [gpu.run(cache, seq[s:s + n], "all" if n > 1 else "last") for s, n in zip(starts, sizes)]
    for g, w in zip(got, want):
        assert maxdiff(g, w) <= WHOLE_MODEL_TOL
    assert cache.shared(model.config).k.shape[1] >= 40 and launches.counts["scan_step"] == 6 * 3


def test_real_kernels_greedy_generation_matches_reference_targets(real, model, ref, monkeypatch):
    with real_kernel_path(model, monkeypatch) as (gpu, _):
        for p in PROMPTS:
            ids = list(gpu.generate(ref[f"{p}_input_ids"], 24, temperature=0.0, stop_ids=()))
            assert ids == ref[f"{p}_greedy_full_ids"].tolist(), p


def test_real_kernels_whole_model_is_order_and_poison_proof(real, model, ref, monkeypatch):
    """A prefill and a few decode steps give bitwise the same logits with shuffled orders and
    another poison byte."""
    runs = []
    for options in ({}, {"order_seed": 11, "poison": 0x00}):
        with real_kernel_path(model, monkeypatch, **options) as (gpu, _):
            _, cached, _ = greedy_decode(gpu, ref["p1_input_ids"], 4)
        runs.append(np.array(cached))
    assert bitwise_equal(*runs)
