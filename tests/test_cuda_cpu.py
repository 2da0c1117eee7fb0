"""kernels.cu itself, run on the CPU through the harness of tests/cuda_cpu.py.

test_kernels.py checks the NumPy twins against the model and kernels.cu's launches against its
signatures; it cannot run a kernel without a GPU. Here g++ compiles the unchanged kernels.cu (with
tests/cuda_cpu/cuda_on_cpu.h supplying the CUDA names), and every kernel runs for real: each block's
threads as fibers, barriers and shuffles checked, shared memory poisoned before every block.

1. The harness itself, on tests/cuda_cpu/selftest.cu (which nvcc accepts too): barriers, shared
   memory, shuffles, votes, atomics, cp.async and flushed denormals give CUDA's results; a
   divergent barrier, a bad shuffle mask or width, a read of unwritten shared memory, a missing
   barrier, a read of a cp.async destination before its wait, a bad or out-of-bounds copy, a
   launch the GPU would refuse and an out-of-bounds read are all caught; shuffled block orders
   change which block arrives last.
2. Every kernel against its twin, on test_kernels.py's cases (the host functions of phi4flash.py
   launch it; each launch runs both and compares every array the kernel writes), and the host
   result against the model's own function.
3. Real shapes: 40/20 heads, head_dim 64, T = 2048 through a 512 window; a 65,536-key decode at
   an H100's split count; the scan at d_inner 5120; the GEMV at 2560 x 10240.
4. Shuffled thread/block orders and other poison bytes change no bit of any kernel's output; the
   decode's last-block merge gives the same bits whichever block merges, its counters back at 0.
5. The AddressSanitizer + UBSan build runs every kernel without a report (and equals the -O2 build).
6. Mutations of kernels.cu (a deleted barrier, a wrong shuffle width, an off-by-one window, a wrong
   head index, a decode that reads past the live keys, scores a tile before waiting for it or
   forgets to reset its counter) make section 2's comparison fail: the harness catches those bugs.
   Every barrier a kernel runs, knocked out in turn, is noticed, except those listed as redundant
   or as beyond what the harness can show.
7. The whole model through the real kernels (test_gpu.py's GPU code path, with each launch running
   the kernel instead of the twin): reference parity, decode == full recompute, greedy targets, a
   bfloat16 K/V cache against the CPU path with the same option.

Everything skips, with the reason, when no C++ compiler is found.
"""
import contextlib
import dataclasses
import os
import subprocess

import numpy as np
import pytest

import cuda_cpu
import phi4flash as pf
from conftest import PROMPTS
from test_gpu import (assert_a_short_kv_buffer_fails_the_step_in_one_line, assert_bf16_kv_path_equals_cpu,
                      assert_forward_matches_reference, assert_int8_matches_cpu, gpu_code_path, greedy_decode, maxdiff)
from test_kernels import (EPILOGUE_SHAPES, PREFILL_CASES, SIGNATURES, LaunchChecker, StepBuffers, attention_case,
                          bf16_bits, conv_gemv_checks, find_nvcc, gemv_epilogue_checks, live_slots_case, mamba_checks,
                          norm_gemv_checks, qkv_checks, rand, scan_checks, scan_step_checks, unaligned_int8_checks,
                          weight_as, widened)

SELFTEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_cpu", "selftest.cu")
WRITTEN = ("float*", "long long*", "unsigned short*", "int*")
# Kernel vs twin, relative to max(1, |twin|). The twins follow the kernels' tiling, online-softmax
# and reduction order, so what differs is the order inside a dot product (BLAS or einsum in the
# twin, a sequential loop in the kernel) and glibc's expf/tanhf against NumPy's: a few float32 ulps.
# Measured worst over every case here: 5.5e-7 (attention_prefill), 4.0e-7 (attention_decode), 2.1e-7
# (gemv), 1.9e-7 (scan), 1e-7 (conv); the K/V the Wqkv GEMV stores, and every integer, exactly.
TWIN_TOL = 2e-6
# A K/V cache of bf16 bits: the twin's k and the kernel's differ by a few fp32 ulps (above), which may
# round to neighbouring bf16 numbers, one step of 2^-8 relative. That the kernel rounds its own k
# exactly as f32_to_bf16 does is checked bit for bit apart (test_bf16_kv_is_stored_as_f32_to_bf16_rounds).
BF16_TWIN_TOL = 2 ** -8
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


def relative_error(want, got, as_bf16=False):
    """max |got − want| / max(1, max |want|); inf where non-finite values differ; integers exact,
    unless as_bf16: uint16 arrays of bf16 bits compared as the numbers they hold."""
    if as_bf16 and want.dtype == np.uint16:
        want, got = pf.bf16_to_f32(want), pf.bf16_to_f32(got)
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
        self.errors, self.bf16_errors, self.launches = {}, {}, []

    def __call__(self, twin, grid, block, args):
        name = twin.__name__
        pdl = name in pf.PDL_KERNELS                                    # its PDL rules checked too
        self.launches.append(cuda_cpu.Launch(name, grid, block, cuda_cpu.clone_args(args), pdl))
        twin_args = cuda_cpu.clone_args(args)
        twin(*twin_args)
        self.kernels.launch(name, grid, block, args, **{"pdl": pdl, **self.options})
        params = self.kernels.kernels[name].params
        written = [(ctype, t, a) for (ctype, _), t, a in zip(params, twin_args, args) if ctype in WRITTEN]
        err = max(relative_error(t, a) for ctype, t, a in written if ctype != "unsigned short*")
        bf16 = max((relative_error(t, a, as_bf16=True) for ctype, t, a in written if ctype == "unsigned short*"),
                   default=0.0)                                         # K/V caches of bf16 bits
        self.errors[name] = max(self.errors.get(name, 0.0), err)
        self.bf16_errors[name] = max(self.bf16_errors.get(name, 0.0), bf16)


class Recorder:
    """Stands in for pf._launch: runs the twin, keeping each launch with copies of its inputs."""

    def __init__(self):
        self.launches = []

    def __call__(self, twin, grid, block, args):
        self.launches.append(cuda_cpu.Launch(twin.__name__, grid, block, cuda_cpu.clone_args(args),
                                             twin.__name__ in pf.PDL_KERNELS))
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


def test_block_arrival_order_changes_with_the_seed(selftest):
    """Shuffled block orders reach atomics: the tickets blocks take are a permutation of the blocks,
    in index order without a seed, and in another order (another last block) for each seed. The
    order depends only on the seed and the grid, so this probe tells which block of any launch
    with that grid and seed runs last."""
    lasts = set()
    for seed in (None, 1, 2, 3):
        order, counter = np.full(24, -1, np.int32), np.zeros(1, np.int32)
        selftest.launch("arrivals", (8, 3), (32,), (order, counter), order_seed=seed)
        assert sorted(order) == list(range(24)) and counter[0] == 24
        if seed is None:
            assert order.tolist() == list(range(24))
        lasts.add(int(np.argmax(order)))
    assert len(lasts) >= 3


def test_cp_async_copies_land_at_the_wait(selftest):
    """cp.async through the pipeline primitives: waited for and published by a barrier, every
    thread reads its neighbour's copy, under any thread and block order and poison byte."""
    x = np.arange(4 * 128, dtype=np.float32)
    for seed, poison in ((None, 0xFF), (1, 0x00), (2, 0x7F)):
        out = np.empty_like(x)
        selftest.launch("copy_async_rotate", (2,), (64,), (x, out, np.int32(0)), order_seed=seed, poison=poison)
        want = np.concatenate([np.roll(x[:256].reshape(64, 4), -1, 0), np.roll(x[256:].reshape(64, 4), -1, 0)])
        assert np.array_equal(out, want.reshape(-1))


@pytest.mark.parametrize("mode", [1, 2])
def test_cp_async_reads_before_the_wait_or_its_barrier_read_poison(selftest, mode):
    """Mode 1 reads its own destination before waiting, mode 2 its neighbour's before the barrier
    that follows the neighbour's wait: both read the poison byte (NaN for 0xff), so the result
    depends on the poison (and, for mode 2, on the thread order)."""
    x = np.arange(4 * 64, dtype=np.float32)
    outs = []
    for seed, poison in ((None, 0xFF), (None, 0x00), (3, 0xFF)):
        out = np.empty_like(x)
        selftest.launch("copy_async_rotate", (1,), (64,), (x, out, np.int32(mode)), order_seed=seed, poison=poison)
        outs.append(out)
    assert np.isnan(outs[0]).any() and not np.isnan(outs[1]).any()
    assert not bitwise_equal(outs[0], outs[1])
    if mode == 1:                                                        # every thread reads before its wait
        assert np.isnan(outs[0]).all() and not outs[1].any()
    else:                                                                # in index order, the neighbours had not waited yet
        assert np.isnan(outs[0][:4 * 63]).all() and not bitwise_equal(outs[0], outs[2])


def test_cp_async_wait_prior_leaves_the_newest_groups_pending(selftest):
    x = np.arange(128, dtype=np.float32) + 1
    out = np.empty(3 * 64, np.float32)
    selftest.launch("copy_async_groups", (1,), (64,), (x, out), poison=0x00)
    a, b_early, b_late = out.reshape(64, 3).T
    assert np.array_equal(a, x[:64]) and not b_early.any() and np.array_equal(b_late, x[64:])


@pytest.mark.parametrize("args,message", [
    ((0, 16, 0), None),
    ((1, 16, 0), r"16-byte copy from 0x[0-9a-f]+ to 0x[0-9a-f]+: both must be 16-byte aligned"),
    ((4, 16, 0), r"the source 0x[0-9a-f]+ \(\+16 bytes\) is outside every array argument of the launch"),
    ((0, 12, 0), r"12 bytes; a copy is 4, 8 or 16"),
    ((0, 16, 1), r"the destination 0x[0-9a-f]+ is not in shared memory"),
])
def test_cp_async_copies_are_checked_when_issued(selftest, args, message):
    """Alignment, size, a shared destination, and a source inside an array argument (x has 32
    floats: from offset 4 the last thread's copy reads 16 bytes past its end)."""
    x, out = np.arange(32, dtype=np.float32), np.zeros(32, np.float32)
    launch_args = (x, out, *(np.int32(a) for a in args))
    if message is None:
        selftest.launch("copy_async_from", (1,), (8,), launch_args)
        assert np.array_equal(out[::4], x[::4])
        return
    with pytest.raises(cuda_cpu.KernelError, match=r"^copy_async_from: block \(0,0,0\) thread \(\d+,0,0\): "
                                                   r"cp.async \(selftest.cu:\d+\): " + message):
        selftest.launch("copy_async_from", (1,), (8,), launch_args)


def test_a_thread_that_never_waits_for_its_copies_is_reported(selftest):
    x = np.arange(4 * 32, dtype=np.float32)
    with pytest.raises(cuda_cpu.KernelError, match=r"thread \(\d+,0,0\): exits with 1 cp.async copies it never "
                                                   r"waited for \(the first issued at selftest.cu:\d+\)"):
        selftest.launch("copy_async_rotate", (1,), (32,), (x, np.empty_like(x), np.int32(3)))


def last_block_runs(selftest, bug, seeds=(None, 1, 2, 3, 4, 5)):
    """last_block_sum over 16 blocks of 64 in each order -> [(total, counter after)], the partials
    NaN before each launch (what a block reads of another that has not run yet)."""
    x = np.random.default_rng(7).standard_normal(1024).astype(np.float32)
    runs, counter = [], np.zeros(1, np.int32)
    for seed in seeds:
        partial, total = np.full(16, np.nan, np.float32), np.full(1, -1.0, np.float32)
        selftest.launch("last_block_sum", (16,), (64,), (x, partial, total, counter, np.int32(bug)), order_seed=seed)
        runs.append((total[0], int(counter[0])))
    sums = [np.float32(0)] * 16
    for b in range(16):
        for v in x[64 * b:64 * (b + 1)]:
            sums[b] = np.float32(sums[b] + v)
    want = np.float32(0)
    for v in sums:
        want = np.float32(want + v)
    return runs, want


def test_a_last_block_reduction_is_order_proof_and_its_bugs_are_caught(selftest):
    """Atomics and the last-block merge under shuffled block orders: a different block finishes last
    in each order, yet the total is the same bits (the partials are added in block order) and the
    counter is back at 0 after every launch. Taking the highest block index for the last one is
    right in index order only, and the shuffled orders expose it; a counter that is not reset leaves
    the next launch without a last block."""
    runs, want = last_block_runs(selftest, bug=0)
    assert all(total == want and counter == 0 for total, counter in runs), runs
    runs, _ = last_block_runs(selftest, bug=1)
    assert runs[0] == (want, 0) and any(np.isnan(total) for total, _ in runs[1:]), runs
    runs, _ = last_block_runs(selftest, bug=2, seeds=(None, None))
    assert runs == [(want, 16), (-1.0, 32)]


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


def test_int8_int_and_bf16_cache_pointers_are_checked(real):
    """The pointer types of the int8 and fused GEMVs: int8 values must be int8 (not uint8 bytes),
    the flag and the counter int32 (not int64, which the kernel would read half of), a bf16 cache
    uint16 (not float32) and writable."""
    rng = np.random.default_rng(0)
    W = weight_as("int8", rand(rng, 8, 64))
    x, y, hidden = rand(rng, 1, 64), np.zeros((1, 8), np.float32), np.zeros((1, 8), np.float32)
    ones, counter = np.ones(8, np.float32), np.zeros(1, np.int32)
    norm = lambda W_q, counter: (x, W_q, W.scales, ones, hidden, ones, ones, y, counter, np.int32(8),  # noqa: E731
                                 np.int32(64), np.int32(1), np.int32(1), np.float32(1e-5))
    real.launch("gemv_int8_norm", (1,), (256,), norm(W.q, counter))
    assert counter[0] == 0 and np.abs(y).max() > 0
    for args, message in ((norm(W.q.view(np.uint8), counter), r"W must be a int8 array \(const signed char\*\)"),
                          (norm(W.q, counter.astype(np.int64)), r"counter must be a int32 array \(int\*\)")):
        with pytest.raises(cuda_cpu.KernelError, match=r"^gemv_int8_norm: " + message):
            real.launch("gemv_int8_norm", (1,), (256,), args)
    cache, kpos, pos, error = np.zeros((4, 8, 8), np.uint16), np.full(8, -1), np.zeros(1, np.int64), np.zeros(1, np.int32)
    qkv = lambda k, v: (x, weight_as("bf16", rand(rng, 128, 64)), rand(rng, 128), np.zeros((1, 128), np.float32),  # noqa: E731
                        k, v, kpos, pos, error, np.int32(128), np.int32(64), np.int32(1), np.int32(64), np.int32(8),
                        np.int32(8), np.int32(8))
    for args, message in ((qkv(cache.astype(np.float32), cache), r"k_cache must be a uint16 array \(unsigned short\*\)"),
                          (qkv(cache, np.broadcast_to(cache, cache.shape)), r"v_cache \(unsigned short\*\) is written")):
        with pytest.raises(cuda_cpu.KernelError, match=r"^gemv_bf16_qkv16: " + message):
            real.launch("gemv_bf16_qkv16", (16,), (256,), args)


def test_the_compiler_sees_the_parameter_types_the_parser_reads(real):
    """cuda_cpu_params_<kernel> spells the compiled C++ types; Kernels() refuses a mismatch, so the
    launch checks rest on the real signatures. Also: every kernel of SIGNATURES is in the build."""
    assert sorted(real.kernels) == sorted(SIGNATURES)
    for name, params in SIGNATURES.items():
        assert [t for t, _ in real.kernels[name].params] == [t for t, _ in params]
    declared = {"attention_prefill_f32": pf.PREFILL_THREADS, "attention_prefill_bf16": pf.PREFILL_THREADS,
                "attention_decode_f32": pf.DECODE_THREADS, "attention_decode_bf16": pf.DECODE_THREADS,
                "layer_norm_rows": pf.NORM_THREADS, **{twin.__name__: pf.GEMV_WARPS * 32 for twin in pf.GEMV_INSTANCES.values()}}
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


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_the_sanitized_build_keeps_each_array_s_alignment_and_guards_its_start(selftest, offset):
    """An array that starts 4·offset bytes past a 16-byte boundary (a row view, say) is at the same
    address modulo 16 in the sanitized child, as a GPU path chosen by alignment needs (kernel 7's
    vector loads). A read of the element before it is still reported when that element is in an
    8-byte granule of its own (ASan's shadow cannot poison part of a granule that the array uses)."""
    asan_or_skip()
    buf = np.empty(80 * 4, np.uint8)
    x = np.ndarray((64,), np.float32, buf, (-buf.ctypes.data) % 16 + 4 * offset)   # offset floats past a boundary
    x[...] = np.arange(64)
    out = np.empty(2 * 32, np.float32)
    assert x.ctypes.data % 16 == 4 * offset
    plain = out.copy()
    selftest.launch("address_and_before", (1,), (32,), (x, plain, np.int32(0)))
    (_, sanitized, _), = cuda_cpu.run_sanitized([cuda_cpu.Launch("address_and_before", (1,), (32,), [x, out, np.int32(0)])],
                                                SELFTEST)
    assert np.array_equal(sanitized, plain) and set(plain[0::2]) == {4.0 * offset}
    if offset % 2:
        return
    with pytest.raises(cuda_cpu.KernelError, match=r"AddressSanitizer: (use-after-poison|heap-buffer-overflow)"):
        cuda_cpu.run_sanitized([cuda_cpu.Launch("address_and_before", (1,), (32,), [x, out, np.int32(1)])], SELFTEST)


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


def prefill_checks(H, H_kv, hd, T, past, window, kv_bits=False):
    rng = np.random.default_rng(T * 7 + past)
    q, k, v, qpos, kpos, subln = attention_case(rng, H, H_kv, hd, T, past, window)
    if kv_bits:                                                         # a bfloat16 K/V cache's bits
        k, v = pf.f32_to_bf16(k), pf.f32_to_bf16(v)
    want = pf.attend(q, pf.f32(k), pf.f32(v), qpos, kpos, window, np.float32(0.31), 0.62, subln)
    return [("out", pf.cuda_attend(q, k, v, qpos, kpos, window, np.float32(0.31), 0.62, subln), want)]


def prefix_view_checks():
    """The shared buffer's prefix view: k, v reach the kernel with a head stride of 64 · 8."""
    rng = np.random.default_rng(5)
    q, k, v, qpos, kpos, subln = attention_case(rng, 8, 4, 8, 19, 0, None)
    kbuf, vbuf = np.zeros((4, 64, 8), np.float32), np.zeros((4, 64, 8), np.float32)
    kbuf[:, :19], vbuf[:, :19] = k, v
    want = pf.attend(q, k, v, qpos, kpos, None, 0.2, 0.5, subln)
    return [("out", pf.cuda_attend(q, kbuf[:, :19], vbuf[:, :19], qpos, kpos, None, 0.2, 0.5, subln), want)]


def decode_checks(mp, H, H_kv, hd, S, window, sms, kv_bits=False):
    mp.setattr(pf, "CPU_SMS", sms)                                      # the split count follows it
    rng = np.random.default_rng(S + hd)
    q, k, v, qpos, kpos, subln = attention_case(rng, H, H_kv, hd, 1, S - 1, None)
    if kv_bits:
        k, v = pf.f32_to_bf16(k), pf.f32_to_bf16(v)
    want = pf.attend(q, pf.f32(k), pf.f32(v), qpos, kpos, window, 0.4, 0.7, subln)
    return [("out", pf.cuda_attend(q, k, v, qpos, kpos, window, 0.4, 0.7, subln), want)]


def live_slots_checks(mp, kv_bits):
    """Slots past the live length hold NaN (test_kernels.live_slots_case): never read."""
    mp.setattr(pf, "CPU_SMS", 132)
    q, k, v, kpos, subln, want = live_slots_case(np.random.default_rng(7), kv_bits)
    return [("out", pf.cuda_attend(q, k, v, np.array([169]), kpos, None, 0.4, 0.7, subln), want)]


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


def gemv_checks(rows, out, inp, fmt="bf16"):
    rng = np.random.default_rng(rows * out + inp)
    W, x = weight_as(fmt, rand(rng, out, inp)), rand(rng, rows, inp)
    want = x.astype(np.float64) @ widened(W).T.astype(np.float64)
    return [("y", pf.cuda_linear(x, W), want)]


def layer_norm_checks(rows, D):
    rng = np.random.default_rng(rows * D)
    x, p = rand(rng, rows, D, scale=3.0) + 1.0, {"weight": rand(rng, D), "bias": rand(rng, D)}
    return [("y", pf.cuda_layer_norm(x, p, np.empty_like(x), 1e-5), pf.layer_norm(x, p, 1e-5))]


def embed_checks(dtype):
    """The row of id 41, bit for bit the CPU path's (bf16 widened, int8 dequantised as Int8Weight rows)."""
    rng = np.random.default_rng(4)
    table = weight_as(dtype, rand(rng, 50, 96))
    y = np.empty((1, 96), np.float32)
    pf.cuda_embed(table, np.array([41]), y)
    return [("row", y[0], pf.f32(table[41]))]


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
        yield "attention_prefill_f32", "H{}-Hkv{}-hd{}-T{}-past{}-W{}".format(*c), lambda mp, c=c: prefill_checks(*c)
    yield "attention_prefill_f32", "prefix-view", lambda mp: prefix_view_checks()
    for c in [(8, 4, 8, 37, 0, 8), (8, 4, 8, 21, 13, None), (4, 2, 64, 40, 3, 32)]:
        yield "attention_prefill_bf16", "H{}-Hkv{}-hd{}-T{}-past{}-W{}".format(*c), lambda mp, c=c: prefill_checks(*c, True)
    # (sms): 4 the CPU stand-in; 132 an H100's (up to one tile per split, some splits empty); 1, a
    # single split; 1000 over 33,000 keys, DECODE_MAX_SPLITS = 256 splits, 8 per lane in the merge
    for c in [(8, 4, 8, 1000, None, 4), (4, 2, 64, 300, None, 4), (8, 4, 8, 129, None, 132), (8, 4, 8, 300, 8, 4),
              (16, 4, 8, 77, None, 1), (4, 2, 8, 33000, None, 1000), (8, 4, 8, 1000, None, 132)]:
        yield "attention_decode_f32", "H{}-Hkv{}-hd{}-S{}-W{}-sms{}".format(*c), lambda mp, c=c: decode_checks(mp, *c)
    for c in [(8, 4, 8, 300, None, 4), (4, 2, 64, 300, 32, 132)]:
        yield "attention_decode_bf16", "H{}-Hkv{}-hd{}-S{}-W{}-sms{}".format(*c), lambda mp, c=c: decode_checks(mp, *c, True)
    yield "attention_decode_f32", "buffer-and-rings", lambda mp: ring_checks()
    for kernel, bits in (("attention_decode_f32", False), ("attention_decode_bf16", True)):
        yield kernel, "live-slots-only", lambda mp, bits=bits: live_slots_checks(mp, bits)
    for c in [(1, 37, 64), (3, 37, 300), (8, 37, 4), (1, 256, 2560), (2, 9, 1000)]:
        yield "gemv_bf16", "rows{}-out{}-in{}".format(*c), lambda mp, c=c: gemv_checks(*c)
    for dtype in ("bf16", "f32", "int8"):
        for c in [(1, 37, 5120)] + EPILOGUE_SHAPES[dtype][1:2] + [(2, 5, 32 if dtype == "int8" else 7)]:
            yield f"gemv_{dtype}", "epilogues-rows{}-out{}-in{}".format(*c), lambda mp, d=dtype, c=c: gemv_epilogue_checks(d, *c)
    yield "gemv_int8", "unaligned", lambda mp: unaligned_int8_checks()
    for dtype in ("bf16", "f32", "int8"):
        for kv, suffix in (("float32", ""), ("bfloat16", "16")):   # a wrapping ring of 8; an append buffer of 32
            yield f"gemv_{dtype}_qkv{suffix}", "ring8", lambda mp, d=dtype, kv=kv: qkv_checks(d, 8, 4, 8, 64, 8, 8, range(12), kv)
            yield f"gemv_{dtype}_qkv{suffix}", "append32", lambda mp, d=dtype, kv=kv: qkv_checks(d, 8, 4, 8, 64, None, 32, (0, 5, 31), kv)
        for kv, suffix in (("float32", ""), ("bfloat16", "16")):      # split-K: 1024 inputs
            yield f"gemv_{dtype}_qkv{suffix}", "ring8-D1024", lambda mp, d=dtype, kv=kv: qkv_checks(d, 8, 4, 8, 1024, 8, 8,
                                                                                                  range(3), kv)
        yield f"gemv_{dtype}_conv", "in64-d_inner96", lambda mp, d=dtype: conv_gemv_checks(d, 64, 96)
        yield f"gemv_{dtype}_conv", "in1024-d_inner40", lambda mp, d=dtype: conv_gemv_checks(d, 1024, 40)  # split-K
        yield f"gemv_{dtype}_norm", "in320-D70", lambda mp, d=dtype: norm_gemv_checks(d, 320, 70)
        yield f"gemv_{dtype}_norm", "in5120-D37-no-bias", lambda mp, d=dtype: norm_gemv_checks(d, 5120, 37, has_bias=False)
    for c in [(1, 64), (3, 2560), (2, 77)]:
        yield "layer_norm_rows", "rows{}-D{}".format(*c), lambda mp, c=c: layer_norm_checks(*c)
    for dtype in ("bf16", "f32", "int8"):
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
        assert err <= TWIN_TOL and compare.bf16_errors[name] <= BF16_TWIN_TOL, (name, err, compare.bf16_errors[name])
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
    assert launches.counts == {"attention_prefill_f32": 1}
    for a, b in ((0, 40), (1000, 1040), (2020, 2048)):
        want = pf.attend(q[:, a:b], k, v, qpos[a:b], kpos, 512, np.float32(0.3), 0.6, subln)
        assert relative_error(want, got[a:b]) <= MODEL_TOL, (a, b)


def test_real_shape_decode_over_65536_keys(real, monkeypatch):
    """The split count of an H100 or H200 (132 SMs): 53 splits x 10 KV groups, 78 tiles of 16 keys
    each, merged by each group's last block; against attend over the same 65,536 keys."""
    monkeypatch.setattr(pf, "CPU_SMS", 132)
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
    assert launches.counts == {"attention_decode_f32": 1}
    assert relative_error(want, got) <= MODEL_TOL


@pytest.mark.parametrize("kv_bits", [False, True])
def test_real_shape_decode_through_a_wrapped_512_ring(real, monkeypatch, kv_bits):
    """A sliding layer's ring at 132 SMs: 32 splits of one tile each; fp32 and bf16 K/V."""
    monkeypatch.setattr(pf, "CPU_SMS", 132)
    compare = TwinVsKernel(real)
    rng = np.random.default_rng(600)
    q, k, v, qpos, kpos, subln = attention_case(rng, 40, 20, 64, 1, 600, 512)
    if kv_bits:
        k, v = pf.f32_to_bf16(k), pf.f32_to_bf16(v)
    ring_k, ring_v, ring_pos = np.zeros((20, 512, 64), k.dtype), np.zeros((20, 512, 64), k.dtype), np.full(512, -1)
    ring_k[:, kpos % 512], ring_v[:, kpos % 512], ring_pos[kpos % 512] = k, v, kpos
    want = pf.attend(q, pf.f32(k), pf.f32(v), qpos, kpos, 512, np.float32(0.3), 0.6, subln)
    monkeypatch.setattr(pf, "_launch", compare)
    got = pf.cuda_attend(q, ring_k, ring_v, qpos, ring_pos, 512, np.float32(0.3), 0.6, subln)
    assert set(compare.errors) == {"attention_decode_bf16" if kv_bits else "attention_decode_f32"}
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


@pytest.mark.parametrize("fmt,rows,out,inp", [("bf16", 1, 2560, 10240), ("bf16", 8, 2560, 10240), ("bf16", 3, 10240, 2560),
                                              ("int8", 1, 2560, 10240), ("int8", 3, 10240, 2560)])
def test_real_shape_gemv(real, monkeypatch, fmt, rows, out, inp):
    """The MLP's down projection (10240 -> 2560) and up projection (2560 -> 10240) for 1..8 rows."""
    compare = TwinVsKernel(real)
    monkeypatch.setattr(pf, "_launch", compare)
    (what, got, want), = gemv_checks(rows, out, inp, fmt)
    assert list(compare.errors) == [f"gemv_{fmt}"] and compare.errors[f"gemv_{fmt}"] <= TWIN_TOL
    assert relative_error(want, got) <= MODEL_TOL


REAL_FUSED = {  # the decode step's fused GEMVs at the real shapes: D 2560, 40/20 heads of 64, d_inner 5120
    "qkv-ring": lambda fmt: qkv_checks(fmt, 40, 20, 64, 2560, 512, 512, (1000,)),       # slot 488 of a full ring
    "qkv-append": lambda fmt: qkv_checks(fmt, 40, 20, 64, 2560, None, 4096, (77,)),
    "qkv16-ring": lambda fmt: qkv_checks(fmt, 40, 20, 64, 2560, 512, 512, (1000,), "bfloat16"),
    "conv": lambda fmt: conv_gemv_checks(fmt, 2560, 5120, steps=1),                     # in_proj, 10240 x 2560
    "norm-fc2": lambda fmt: norm_gemv_checks(fmt, 10240, 2560, has_bias=False),
    "norm-attn-out_proj": lambda fmt: norm_gemv_checks(fmt, 2560, 2560),
}


@pytest.mark.parametrize("case", sorted(REAL_FUSED))
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_real_shape_fused_gemvs(real, monkeypatch, fmt, case):
    compare = TwinVsKernel(real)
    monkeypatch.setattr(pf, "_launch", compare)
    checks = REAL_FUSED[case](fmt)
    (kernel, err), = compare.errors.items()
    assert kernel.startswith(f"gemv_{fmt}_") and err <= TWIN_TOL and compare.bf16_errors[kernel] <= BF16_TWIN_TOL
    for what, got, want in checks:
        assert relative_error(np.asarray(want), got) <= MODEL_TOL, what


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_fused_layer_norm_is_bitwise_layer_norm_rows_under_any_block_order(real, fmt):
    """The attention out_proj's GEMV with the next LayerNorm (1280 blocks at 2560 x 2560): for the
    block orders index, shuffled (another block finishes last each time) and poison bytes, the
    normalised row is bit for bit what layer_norm_rows makes of the residual it wrote, the residual
    is the same bits every time, and the counter is back at 0 after every launch."""
    rng = np.random.default_rng(2560)
    W, x, bias = weight_as(fmt, rand(rng, 2560, 2560, scale=0.02)), rand(rng, 1, 2560), rand(rng, 2560, scale=0.1)
    hidden0, norm_w, norm_b = rand(rng, 1, 2560, scale=2.0) + 0.3, 1 + rand(rng, 2560, scale=0.1), rand(rng, 2560, scale=0.1)
    twin, grid, block, splits, w = pf.gemv_launch(W, "_norm", 2560, 2560)
    assert grid[0] == 1280
    runs = []
    for seed, poison in ((None, 0xFF), (1, 0x00), (2, 0x7F), (3, 0xFF)):
        hidden, normed, counter = hidden0.copy(), np.empty((1, 2560), np.float32), np.zeros(1, np.int32)
        real.launch(twin.__name__, grid, block, (x, *w, bias, hidden, norm_w, norm_b, normed, counter, np.int32(2560),
                                                 np.int32(2560), np.int32(1), splits, np.float32(1e-5)),
                    order_seed=seed, poison=poison)
        alone = np.empty_like(normed)
        real.launch("layer_norm_rows", (1,), (pf.NORM_THREADS,), (hidden, norm_w, norm_b, alone, np.int32(2560),
                                                                  np.float32(1e-5)))
        assert counter[0] == 0 and bitwise_equal(normed, alone), seed
        runs.append((hidden, normed))
    assert all(bitwise_equal(h, runs[0][0]) and bitwise_equal(n, runs[0][1]) for h, n in runs)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_fused_conv_is_bitwise_the_gemv_then_conv1d_silu_step(real, monkeypatch, fmt):
    """in_proj's GEMV with the conv (real shape, 10240 x 2560) against the two launches it replaces,
    the plain GEMV and conv1d_silu_step: the same bits of x̂, z and conv_state (the same sums, then
    the same conv_step)."""
    rng = np.random.default_rng(5120)
    W, u = weight_as(fmt, rand(rng, 10240, 2560, scale=0.02)), rand(rng, 1, 2560)
    weight, bias, state0 = rand(rng, 5120, 4, scale=0.5), rand(rng, 5120, scale=0.1), rand(rng, 3, 5120)
    monkeypatch.setattr(pf, "_launch", cuda_cpu.Launcher(real))
    state = state0.copy()
    fused = pf.cuda_gemv_conv(u, W, np.empty((1, 10240), np.float32), state, weight, bias)
    xz, state_alone = pf.cuda_gemv(u, W, np.empty((1, 10240), np.float32)), state0.copy()
    x_hat = pf.cuda_conv1d_silu(xz[:, :5120], state_alone, weight, bias)
    assert bitwise_equal(fused[:, :5120], x_hat) and bitwise_equal(fused[:, 5120:], xz[:, 5120:])
    assert bitwise_equal(state, state_alone) and not bitwise_equal(state, state0)


def bf16_store_checks(kernels, fmt):
    """gemv_*_qkv16 through `kernels`: (the K/V bits it stored, f32_to_bf16 of the fp32 [k | v] it
    wrote to y). Random features, and features whose W row is zero so that they are the bias
    exactly: ties (1 + 2^-8 rounds down to even, 1 + 3·2^-8 up), a signalling and a negative NaN,
    ±inf, the largest float (rounds to inf), ±0, a denormal (flushed: FTZ, as on the GPU)."""
    special = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), np.inf, -np.inf, 3.4028235e38, 0.0, -0.0, 1e-40,
                        0.0, 0.0], np.float32)
    special[-2:] = np.array([0x7F800001, 0xFFC00001], np.uint32).view(np.float32)   # NaNs
    rng = np.random.default_rng(16)
    H, H_kv, hd, D = 8, 4, 8, 64
    q_features, out = H * hd, (H + 2 * H_kv) * hd
    w, bias = rand(rng, out, D, scale=D ** -0.5), rand(rng, out)
    rows = q_features + 3 + np.arange(len(special)) * 5                 # spread over k and v
    w[rows], bias[rows] = 0.0, special
    kv = pf.KVCache(np.zeros((H_kv, 8, hd), np.uint16), np.zeros((H_kv, 8, hd), np.uint16), np.full(8, -1), 8)
    y, step = np.empty((1, out), np.float32), StepBuffers(pos=13)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pf, "_launch", cuda_cpu.Launcher(kernels))
        pf.cuda_gemv_qkv(rand(rng, 1, D), weight_as(fmt, w), bias, y, kv, step, q_features)
    assert step.buf["error"][0] == 0 and kv.pos[13 % 8] == 13
    stored = np.stack([kv.k[:, 13 % 8], kv.v[:, 13 % 8]]).reshape(-1)    # (2·H_kv·hd,) as [k | v]
    return stored, pf.f32_to_bf16(np.ascontiguousarray(y[0, q_features:])), y[0, rows]


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_bf16_kv_is_stored_as_f32_to_bf16_rounds(real, tmp_path, fmt):
    """Bit for bit the CPU path's rounding (so GPU and CPU caches hold the same bits for the same
    k, v), on the special values too; a kernels.cu whose store truncates instead is caught."""
    stored, want, specials = bf16_store_checks(real, fmt)
    assert np.isnan(specials[-2:]).all() and np.isinf(specials[3:5]).all() and specials[8] == 0   # as placed (FTZ)
    assert np.array_equal(stored, want)
    widened_specials = pf.bf16_to_f32(stored[3 + np.arange(len(specials)) * 5])
    assert widened_specials[:6].tolist() == [1.0, 1 + 4 * 2 ** -8, -1.0, np.inf, -np.inf, np.inf]  # ties to even; max -> inf
    assert np.isnan(widened_specials[-2:]).all() and stored[3 + 10 * 5] >> 15 == 1                 # NaNs, the sign kept
    source = open(pf.KERNELS_CU).read()
    old = "return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);"
    assert source.count(old) == 1, "the rounding line is no longer in kernels.cu: update this test"
    path = tmp_path / "kernels.cu"
    path.write_text(source.replace(old, "return (unsigned short)(u >> 16);"))
    stored, want, _ = bf16_store_checks(cuda_cpu.kernels(str(path)), fmt)
    assert not np.array_equal(stored, want)


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
    kernels.launch(launch.name, launch.grid, launch.block, args, **{"pdl": launch.pdl, **options})
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


@pytest.mark.parametrize("kernel", ["attention_decode_f32", "attention_decode_bf16"])
def test_decode_merge_is_the_same_bits_whichever_block_merges(real, selftest, monkeypatch, kernel):
    """attention_decode's last-block merge under shuffled block orders: which split of a group
    counts in last, and merges, changes from seed to seed (the arrivals probe of selftest.cu takes
    tickets over the same grid with the same seed, and the block order depends on nothing else), yet
    the output is the same bits, and every split counter is back to 0 for the next launch."""
    recorder = Recorder()
    with monkeypatch.context() as m:
        m.setattr(pf, "_launch", recorder)
        CHECKS[kernel, "H8-Hkv4-hd8-S300-WNone-sms4" if kernel.endswith("bf16") else "H8-Hkv4-hd8-S1000-WNone-sms4"](m)
    launch, = recorder.launches
    names = [pname for _, pname in real.kernels[kernel].params]
    n_splits, groups, _ = launch.grid + (1,) * (3 - len(launch.grid))
    assert n_splits == 8 and groups == 2
    plain = dict(zip(names, replay(real, launch)))
    mergers = set()
    for seed in range(1, 7):
        other = dict(zip(names, replay(real, launch, order_seed=seed, poison=0x7F)))
        assert bitwise_equal(plain["out"], other["out"]) and other["splits_done"].tolist() == [0, 0], seed
        order, tickets = np.zeros(n_splits * groups, np.int32), np.zeros(1, np.int32)
        selftest.launch("arrivals", (n_splits, groups), (32,), (order, tickets), order_seed=seed)
        mergers.add(tuple(order.reshape(groups, n_splits).argmax(1)))      # each group's last split
    assert len(mergers) >= 4, mergers


# ------------------------------------------------------------------------------------------------
# 5. The sanitized build

def test_every_kernel_runs_clean_under_asan_and_ubsan(real, monkeypatch):
    """Every launch of section 2's cases (all kernels), each pointer argument in a malloc of exactly
    its extent, in one child process; the outputs equal the -O2 build's, bit for bit (no FMA
    contraction on either side, and neither reorders float sums). The kernels of PDL_KERNELS run as
    PDL launches: every argument not marked IMMUTABLE is poisoned until the block's pdl_wait, so an
    access before it would be reported (kernels.cu's PDL rule 1)."""
    asan_or_skip()
    launches = [launch for kernel in sorted(SIGNATURES) for launch in recorded_launches(monkeypatch, kernel)]
    assert sorted({launch.name for launch in launches}) == sorted(SIGNATURES)
    assert {launch.name for launch in launches if launch.pdl} == pf.PDL_KERNELS
    results = cuda_cpu.run_sanitized(launches, order_seed=5, poison=0x00)
    for launch, sanitized in zip(launches, results):
        plain = replay(real, launch)
        for (ctype, pname), a, b in zip(real.kernels[launch.name].params, plain, sanitized):
            if ctype in WRITTEN:
                assert bitwise_equal(a, b), (launch.name, pname)


PDL_MUTATIONS = {  # id: (text in kernels.cu, its replacement, the kernel, the error, caught by ASan)
    "layer-norm-reads-x-before-its-wait": (
        "    pdl_wait();                                              // a decode-step kernel: x is the embedding just "
        "written\n    layer_norm_row(x + (long long)blockIdx.x * D, weight, bias, y + (long long)blockIdx.x * D, D, eps, "
        "s_warp);\n",
        "    layer_norm_row(x + (long long)blockIdx.x * D, weight, bias, y + (long long)blockIdx.x * D, D, eps, s_warp);\n"
        "    pdl_wait();\n",
        "layer_norm_rows", r"touched argument 'x' before cudaGridDependencySynchronize", True),
    "scan-step-writes-its-state-before-its-wait": (
        "    pdl_wait();                                              // a decode-step kernel (rules above): x, xdbc come "
        "from x_proj\n",
        "    if (threadIdx.x == 0 && blockIdx.x == 0) ssm_state[0] = 0.0f;\n    pdl_wait();\n",
        "scan_step", r"touched argument 'ssm_state' before cudaGridDependencySynchronize", True),
    "gemv-block-leaves-before-its-wait": (
        "    gemv(Bf16Weights{W}, x, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits, s_part);",
        "    if (blockIdx.x == 1) return;\n"
        "    gemv(Bf16Weights{W}, x, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits, s_part);",
        "gemv_bf16", r"the block exited without reaching cudaGridDependencySynchronize", False),
}


@pytest.mark.parametrize("mutation", sorted(PDL_MUTATIONS))
def test_a_kernel_breaking_a_pdl_rule_is_caught(real, monkeypatch, tmp_path, mutation):
    """A read or a write before the wait (AddressSanitizer: the argument is named), a block that
    leaves without waiting (the -O2 build): each on its kernel's section-2 launches, as PDL launches."""
    old, new, kernel, error, sanitized = PDL_MUTATIONS[mutation]
    source = open(pf.KERNELS_CU).read()
    assert source.count(old) == 1, "the mutation's text is no longer in kernels.cu: update PDL_MUTATIONS"
    path = tmp_path / "kernels.cu"
    path.write_text(source.replace(old, new))
    launches = recorded_launches(monkeypatch, kernel, cases=1)
    assert launches and all(launch.pdl for launch in launches)
    if sanitized:
        asan_or_skip()
        with pytest.raises(cuda_cpu.KernelError, match=error):
            cuda_cpu.run_sanitized(launches, source=str(path))
        cuda_cpu.run_sanitized(launches)                                # kernels.cu itself: clean
    else:
        with pytest.raises(cuda_cpu.KernelError, match=error):
            replay(cuda_cpu.kernels(str(path)), launches[0])


# ------------------------------------------------------------------------------------------------
# 6. Mutations of kernels.cu are caught

MUTATIONS = {  # id: (text in kernels.cu, its replacement, the cases that must then fail)
    "prefill-barrier-after-tile-load-deleted": (
        "        if (tid < PREFILL_KEYS) sh.kpos[tid] = tid < n_keys ? kpos[k0 + tid] : -1;\n        __syncthreads();\n",
        "        if (tid < PREFILL_KEYS) sh.kpos[tid] = tid < n_keys ? kpos[k0 + tid] : -1;\n",
        [("attention_prefill_f32", "H8-Hkv4-hd8-T37-past0-WNone")]),
    "group-sum-shuffle-width-16": (
        "v += __shfl_xor_sync(0xffffffffu, v, offset);",
        "v += __shfl_xor_sync(0xffffffffu, v, offset, 16);",
        [("gemv_bf16", "rows1-out37-in64")]),
    "window-sees-one-key-too-many": (
        "key_pos > query_pos - window",
        "key_pos >= query_pos - window",
        [("attention_prefill_f32", "H8-Hkv4-hd8-T150-past0-W8"), ("attention_decode_f32", "H8-Hkv4-hd8-S300-W8-sms4")]),
    "gemv-split-k-drops-the-last-warp": (
        "for (int p = 0; p < splits; p++) total += s_part[warp + p][t][r];",
        "for (int p = 0; p < splits - 1; p++) total += s_part[warp + p][t][r];",
        [("gemv_bf16", "epilogues-rows1-out37-in5120"), ("gemv_f32", "epilogues-rows1-out37-in5120")]),
    "int8-bytes-not-sign-flipped": (
        "const unsigned int u = q ^ 0x80808080u;",
        "const unsigned int u = q;",
        [("gemv_int8", "epilogues-rows1-out37-in5120"), ("gemv_int8_norm", "in320-D70")]),
    "kv-slot-ignores-the-window": (
        "const long long slot = window ? p % window : p;",
        "const long long slot = p;",
        [("gemv_bf16_qkv", "ring8"), ("gemv_int8_qkv16", "ring8")]),
    "conv-state-not-shifted": (
        "if (k < d_conv - 1) conv_state[k * d_inner + c] = window[k + 1];",
        "if (k < d_conv - 1) conv_state[k * d_inner + c] = window[k];",
        [("gemv_bf16_conv", "in64-d_inner96"), ("conv1d_silu_step", "T1")]),
    "norm-run-by-the-block-before-the-last": (
        "*s_last = atomicAdd(counter, 1) == (int)gridDim.x - 1;",
        "*s_last = atomicAdd(counter, 1) == (int)gridDim.x - 2;",
        [("gemv_bf16_norm", "in320-D70"), ("gemv_f32_norm", "in5120-D37-no-bias")]),
    "norm-counter-not-reset": (
        "if (threadIdx.x == 0) *counter = 0;",
        "if (threadIdx.x == 0) *counter += 0;",
        [("gemv_int8_norm", "in320-D70")]),
    "scan-step-dt-dot-reads-the-wrong-row": (
        "dt += xdbc[k] * dt_proj[(long long)c * dt_rank + k];",
        "dt += xdbc[k] * dt_proj[(long long)c * d_state + k];",
        [("scan_step", "dt_rank160-N16")]),
    "prefill-query-head-ignores-gqa-factor": (
        "int t = t0 + row, head = 2 * (g * G + r) + s;",
        "int t = t0 + row, head = 2 * (g + r) + s;",
        [("attention_prefill_f32", "H8-Hkv4-hd8-T37-past0-WNone")]),
    "decode-covers-the-capacity-not-the-live-slots": (
        "const int live = (int)min((long long)S, query_pos + 1);",
        "const int live = S;",
        [("attention_decode_f32", "live-slots-only"), ("attention_decode_bf16", "live-slots-only")]),
    "decode-split-counter-not-reset": (
        "if (tid == 0) splits_done[g] = 0;",
        "if (tid == 0) splits_done[g] = splits_done[g];",
        [("attention_decode_f32", "H8-Hkv4-hd8-S1000-WNone-sms4")]),
    "decode-merge-skips-the-last-split": (
        "for (int split = 0; split < n_splits; split++) {",
        "for (int split = 0; split < n_splits - 1; split++) {",
        [("attention_decode_f32", "H8-Hkv4-hd8-S1000-WNone-sms4")]),
    "decode-scores-a-tile-before-its-copies-land": (
        "copy_async_wait<0>();",
        "copy_async_wait<1>();",
        [("attention_decode_f32", "H8-Hkv4-hd8-S1000-WNone-sms4")]),
    "decode-tile-rescale-forgotten": (
        "acc[a] = acc[a] * sh.rescale[a] + sum;",
        "acc[a] = acc[a] + sum;",
        [("attention_decode_f32", "H4-Hkv2-hd64-S300-WNone-sms4")]),
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


# Every barrier a kernel runs knocked out in turn, at run time (launch(skip_barrier=line): that
# __syncthreads() does nothing, as if deleted): the twin comparison, the harness's own checks (a
# divergent barrier) or the order/poison replays must notice. The barriers of the __device__
# functions a kernel calls count as its own (a template instance's body, block_sum). A barrier is
# named by the function it is written in and its rank there, so that edits elsewhere in kernels.cu
# do not move it. Two lists say which knock-outs go unnoticed, and why: barriers found redundant
# (their removal changes no bit under any order or poison), and barriers a GPU needs that the
# harness cannot show missing (its blocks run one after another; within a block its scheduler
# resumes every ready thread once per pass, so no warp runs ahead of the others by more than one
# step between two waits).

REDUNDANT_BARRIERS = {
    ("scan_prefill", 3): "the staging arrays are last read before barrier 2, and s_y is rewritten only after the "
                         "next chunk's barrier 1",
}
BEYOND_THE_HARNESS = {
    ("attention_decode", 3): "every thread's partials are written before thread 0 counts the block in; another "
                             "block, running at the same time on a GPU, could otherwise merge before them",
    ("block_sum", 2): "a warp that runs ahead could write the next sum's slot before a slower warp read this "
                      "sum's: every thread reads the slots in the pass before the first shuffle of the next sum",
    ("gemv_norm", 1): "every writer's output is written and fenced before thread 0 counts the block in; another "
                      "block, running at the same time on a GPU, could otherwise normalise a row missing it",
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
    for line, function, rank in cuda_cpu.barrier_sites(KERNELS_CU_TEXT, kernel):
        noticed = knockout_is_noticed(real, monkeypatch, kernel, line)
        where = f"barrier {rank} of {function} (kernels.cu:{line}), in {kernel}"
        if (function, rank) in REDUNDANT_BARRIERS or (function, rank) in BEYOND_THE_HARNESS:
            assert not noticed, f"{where} is noticed now: update REDUNDANT_BARRIERS / BEYOND_THE_HARNESS"
        else:
            assert noticed, f"deleting {where} goes unnoticed"


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
    assert launches.counts["gemv_bf16_qkv"] == steps * (kinds.count("swa") + 1)   # sliding layers + layer L/2+1
    assert launches.counts["gemv_bf16_conv"] == launches.counts["scan_step"] == steps * kinds.count("mamba")
    assert launches.counts["gemv_bf16_norm"] == steps * 2 * len(kinds) and "conv1d_silu_step" not in launches.counts
    for kernel in ("embed_bf16", "layer_norm_rows", "gemv_bf16", "attention_decode_f32"):
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


def test_real_kernels_with_a_bf16_kv_cache_equal_the_cpu_path(real, model, monkeypatch):
    """kv_dtype "bfloat16" through the real kernels: chunks, decode steps past three windows and the
    shared K/V's growth against the CPU path with the same option (test_gpu's bounds: the real
    kernels must meet the twins')."""
    with real_kernel_path(dataclasses.replace(model, kv_dtype="bfloat16"), monkeypatch) as (gpu, launches):
        assert_bf16_kv_path_equals_cpu(model, gpu, launches, monkeypatch)


def test_real_kernels_greedy_generation_matches_reference_targets(real, model, ref, monkeypatch):
    with real_kernel_path(model, monkeypatch) as (gpu, _):
        for p in PROMPTS:
            ids = list(gpu.generate(ref[f"{p}_input_ids"], 24, temperature=0.0, stop_ids=()))
            assert ids == ref[f"{p}_greedy_full_ids"].tolist(), p


def test_real_kernels_int8_model_equals_the_cpu_int8_model(real, model_int8, ref, monkeypatch):
    """int8 weights through the real kernels (gemv_int8 and its fused instances, embed_int8) against
    the CPU int8 model, test_gpu.py's bar (INT8_TOL: only the order of fp32 sums differs); the
    longest prompt (41 tokens: its prefill on dequantised blocks, its decode steps on the int8 instances)."""
    with real_kernel_path(model_int8, monkeypatch) as (gpu, launches):
        assert_int8_matches_cpu(gpu, launches, model_int8, ref, steps=8, prompts=("p2",))


def test_real_kernels_a_short_kv_buffer_fails_the_decode_step_in_one_line(real, model, monkeypatch):
    with real_kernel_path(model, monkeypatch) as (gpu, launches):
        assert_a_short_kv_buffer_fails_the_step_in_one_line(gpu, monkeypatch)
    assert launches.counts["gemv_bf16_qkv"]


def test_real_kernels_whole_model_is_order_and_poison_proof(real, model, ref, monkeypatch):
    """A prefill and a few decode steps give bitwise the same logits with shuffled orders and
    another poison byte."""
    runs = []
    for options in ({}, {"order_seed": 11, "poison": 0x00}):
        with real_kernel_path(model, monkeypatch, **options) as (gpu, _):
            _, cached, _ = greedy_decode(gpu, ref["p1_input_ids"], 4)
        runs.append(np.array(cached))
    assert bitwise_equal(*runs)
