// selftest.cu: small kernels that exercise the CPU harness itself (tests/test_cuda_cpu.py, section 1).
//
// Each one is either correct, with a result the test computes independently, or wrong in one
// known way that the harness must report or expose: a missing or divergent barrier, a shuffle with
// a bad mask or width, a read of shared memory nobody wrote, a read past the end of an array, a
// signed overflow in an index. Written in the style of kernels.cu (no headers, extern "C").

#define WARP 32

#ifdef __CUDACC__                      // nvcc: CUDA's own pipeline primitives (cp.async); the CPU
#include <cuda_pipeline_primitives.h>  // harness implements the same names (cuda_on_cpu.h)
#endif

// Shared memory across the threads of a block, behind a barrier: out[i] = x[i + 1] within the block.
extern "C" __global__ void rotate_shared(const float* x, float* out) {
    __shared__ float s[1024];
    const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
    s[t] = x[base + t];
    __syncthreads();
    out[base + t] = s[(t + 1) % blockDim.x];
}

// The same with the barrier missing: a race, whose outcome depends on the thread order.
extern "C" __global__ void rotate_shared_racy(const float* x, float* out) {
    __shared__ float s[1024];
    const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
    s[t] = x[base + t];
    out[base + t] = s[(t + 1) % blockDim.x];
}

// Half the block skips the barrier (mode 0: returns; mode 1: waits at another __syncthreads;
// mode 2: waits at __syncthreads_or instead).
extern "C" __global__ void divergent_barrier(float* out, int mode) {
    const int t = threadIdx.x;
    if (t < 16) {
        __syncthreads();
    } else if (mode == 1) {
        __syncthreads();
    } else if (mode == 2) {
        __syncthreads_or(1);
    } else {
        return;
    }
    out[t] = 1.0f;
}

// Block votes: out[t] = (or, and, count) of x[t] > 0 over the block.
extern "C" __global__ void block_votes(const float* x, float* out) {
    const int t = threadIdx.x;
    const int p = x[t] > 0.0f;
    int any = __syncthreads_or(p);
    int all = __syncthreads_and(p);
    int count = __syncthreads_count(p);
    out[3 * t] = (float)any;
    out[3 * t + 1] = (float)all;
    out[3 * t + 2] = (float)count;
}

// The shuffles with a width: out[6t..6t+5] = xor-butterfly sum over the lane's group of `width`,
// __shfl_sync from lane 3 of the group, __shfl_down_sync by 1, __shfl_up_sync by 1, and the
// warp's ballot and __all_sync of x > 0.
extern "C" __global__ void warp_ops(const float* x, float* out, int width) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = x[t];
    float sum = v;
    for (int offset = width / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset, width);
    out[6 * t] = sum;
    out[6 * t + 1] = __shfl_sync(0xffffffffu, v, 3, width);
    out[6 * t + 2] = __shfl_down_sync(0xffffffffu, v, 1, width);
    out[6 * t + 3] = __shfl_up_sync(0xffffffffu, v, 1, width);
    out[6 * t + 4] = (float)__ballot_sync(0xffffffffu, v > 0.0f);
    out[6 * t + 5] = (float)__all_sync(0xffffffffu, v > 0.0f);
}

// A shuffle with the caller's mask, lane offset and width; lanes >= `active` return first.
extern "C" __global__ void shuffle_with(const float* x, float* out, int mask, int lane_mask, int width, int active) {
    const int t = threadIdx.x;
    if (t % WARP >= active) return;
    out[t] = __shfl_xor_sync((unsigned int)mask, x[t], lane_mask, width);
}

// Threads t < written write s[t]; everybody reads s[t]. Shared memory is per block: block 1 must
// not see what block 0 wrote (all blocks write only when `written` is positive for them).
extern "C" __global__ void reads_shared(float* out, int written, int only_block0) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    if (t < written && (!only_block0 || blockIdx.x == 0)) s[t] = (float)t;
    __syncthreads();
    out[blockIdx.x * blockDim.x + t] = s[t];
}

// out[t] = x[t + 1]: the last thread reads one element past the end of x (n = threads elements).
extern "C" __global__ void reads_past_end(const float* x, float* out) {
    const int t = threadIdx.x;
    out[t] = x[t + 1];
}

// out[t] = s[t + shift] for a 64-float shared array: shift > 0 reads past its end. Through a
// pointer, as kernels often index shared memory, so only ASan (not UBSan's array bounds) sees it.
extern "C" __global__ void shared_past_end(float* out, int shift) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    s[t] = (float)t;
    __syncthreads();
    const float* p = s;
    out[t] = p[t + shift];
}

// An int index that overflows for large n (the bug class of (long long) casts missing in kernels.cu).
extern "C" __global__ void index_overflow(float* out, int n) {
    const int t = threadIdx.x;
    int i = n * n + t;
    out[t] = (float)(i % 7);
}

// Denormals: out[0] = x[0] * x[1] (a denormal result), out[1] = x[2] + 0 (a denormal input). With
// FTZ/DAZ, as NVRTC's -ftz=true compiles kernels, both are 0.
extern "C" __global__ void denormals(const float* x, float* out) {
    if (threadIdx.x == 0) {
        out[0] = x[0] * x[1];
        out[1] = x[2] + 0.0f;
    }
}

// A histogram with atomics across blocks and threads: counts[x[i]] += 1 (CUDA's 64-bit atomicAdd
// is the unsigned one).
extern "C" __global__ void histogram(const long long* x, long long* counts, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(reinterpret_cast<unsigned long long*>(&counts[x[i]]), 1ull);
}

// cp.async: thread t copies x's float4 t of its block into s[t], one group, then
// mode 0: waits, passes a barrier and reads its neighbour's s[t + 1] (correct: out = x rotated);
// mode 1: reads its own s[t] before waiting; mode 2: waits, but reads s[t + 1] with no barrier
// after the neighbour's wait; mode 3: never waits.
extern "C" __global__ void copy_async_rotate(const float* x, float* out, int mode) {
    __shared__ float4 s[256];
    const int t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
    __pipeline_memcpy_async(&s[t], x + 4 * (base + t), 16);
    __pipeline_commit();
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (mode == 1) {
        v = s[t];
        __pipeline_wait_prior(0);
    } else if (mode != 3) {
        __pipeline_wait_prior(0);
        if (mode == 0) __syncthreads();
        v = s[(t + 1) % n];
    }
    out[4 * (base + t)] = v.x, out[4 * (base + t) + 1] = v.y, out[4 * (base + t) + 2] = v.z, out[4 * (base + t) + 3] = v.w;
}

// Two groups of 4-byte copies: x[t] -> a[t], commit; x[n + t] -> b[t], commit. After waiting for all
// but the newest group, a[t] has landed and b[t] is still pending; after waiting for all, both.
// out[3t..3t+2] = a[t], b[t] after wait_prior(1), b[t] after wait_prior(0).
extern "C" __global__ void copy_async_groups(const float* x, float* out) {
    __shared__ float a[64], b[64];
    const int t = threadIdx.x, n = blockDim.x;
    __pipeline_memcpy_async(&a[t], x + t, 4);
    __pipeline_commit();
    __pipeline_memcpy_async(&b[t], x + n + t, 4);
    __pipeline_commit();
    __pipeline_wait_prior(1);
    out[3 * t] = a[t];
    out[3 * t + 1] = b[t];
    __pipeline_wait_prior(0);
    out[3 * t + 2] = b[t];
}

// One `bytes`-long copy per thread from x + offset + 4t (floats) into s[t], or (to_global) into
// out: offset 1 is misaligned for 16 bytes, an offset near the end of x reads past it.
extern "C" __global__ void copy_async_from(const float* x, float* out, int offset, int bytes, int to_global) {
    __shared__ float4 s[64];
    const int t = threadIdx.x;
    void* dst = to_global ? static_cast<void*>(out + 4 * t) : static_cast<void*>(&s[t]);
    __pipeline_memcpy_async(dst, x + offset + 4 * t, bytes);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    if (!to_global) out[4 * t] = s[t].x;
}

// The order in which blocks arrive: thread 0 of each block takes a ticket, order[block] = the
// number of blocks before it (a permutation of 0 .. blocks - 1).
extern "C" __global__ void arrivals(int* order, int* counter) {
    if (threadIdx.x == 0) order[blockIdx.y * gridDim.x + blockIdx.x] = atomicAdd(counter, 1);
}

// out[t] = the address of x modulo 16 (every thread), and x[t - shift]: shift > 0 reads before x's
// start. Kernel 7 picks its path by alignment, so the sanitized build must keep it.
extern "C" __global__ void address_and_before(const float* x, float* out, int shift) {
    const int t = threadIdx.x;
    out[2 * t] = (float)((unsigned long long)x % 16);
    out[2 * t + 1] = x[t - shift];
}

// A last-block reduction, as kernel 7's _norm instances run the LayerNorm: each block writes the sum
// of its x into partial[block], fences, counts itself on *counter; the block that finds the count
// at gridDim.x − 1 adds the partials in block order into total[0] and sets *counter back to 0.
// bug 1: block gridDim.x − 1 takes itself for the last one (true in index order only);
// bug 2: the counter is never reset (a second launch, or a graph replay, finds no last block).
extern "C" __global__ void last_block_sum(const float* x, float* partial, float* total, int* counter, int bug) {
    __shared__ float s[1024];
    __shared__ int s_last;
    const int t = threadIdx.x;
    s[t] = x[blockIdx.x * blockDim.x + t];
    __syncthreads();
    if (t == 0) {
        float sum = 0.0f;
        for (int i = 0; i < (int)blockDim.x; i++) sum += s[i];
        partial[blockIdx.x] = sum;
        __threadfence();
        const int done = atomicAdd(counter, 1);
        s_last = bug == 1 ? blockIdx.x == gridDim.x - 1 : done == (int)gridDim.x - 1;
    }
    __syncthreads();
    if (!s_last || t != 0) return;
    __threadfence();
    float sum = 0.0f;
    for (int b = 0; b < (int)gridDim.x; b++) sum += __ldcg(partial + b);
    total[0] = sum;
    if (bug != 2) *counter = 0;
}

// Programmatic dependent launch, kernels.cu's rules (see there): before the wait, only IMMUTABLE
// arguments are read and nothing is written. pdl_wait below is kernels.cu's, spelled with CUDA's
// device-runtime names (nvcc declares them for sm_90; tests/cuda_cpu supplies them on the CPU).
#define IMMUTABLE
__device__ __forceinline__ void pdl_wait() {
    cudaGridDependencySynchronize();
    cudaTriggerProgrammaticLaunchCompletion();
}

__device__ __forceinline__ void prefetch_l2(const void* p, unsigned int bytes) {
#ifdef __CUDA_ARCH__
    if (bytes >= 16) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes & ~15u) : "memory");
#else
    cuda_cpu_prefetch_l2(p, bytes);
#endif
}

// mode 0: correct: w[i] loaded before the wait, x[i] after it; out[i] = w[i] + x[i]; the L2 hint
//         covers the block's slice of w.
// mode 1: reads x before the wait.   mode 2: writes out before the wait.
// mode 3: block 1 returns before the wait.   mode 4: threads t >= 16 return before it.
// mode 5: the trigger before the wait.   mode 6: waits twice.
// mode 7: prefetches x (not IMMUTABLE).   mode 8: prefetches past the end of w.
extern "C" __global__ void pdl_rules(IMMUTABLE const float* w, const float* x, float* out, int mode) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float wi = w[i];
    float early = 0.0f;
    if (threadIdx.x == 0) {
        if (mode == 0) prefetch_l2(w + blockIdx.x * blockDim.x, blockDim.x * sizeof(float));
        if (mode == 7) prefetch_l2(x, 16);
        if (mode == 8) prefetch_l2(w + blockIdx.x * blockDim.x, 2 * gridDim.x * blockDim.x * sizeof(float));
    }
    if (mode == 1) early = x[i];
    if (mode == 2) out[i] = 0.0f;
    if (mode == 3 && blockIdx.x == 1) return;
    if (mode == 4 && threadIdx.x >= 16) return;
    if (mode == 5) cudaTriggerProgrammaticLaunchCompletion();
    pdl_wait();
    if (mode == 6) pdl_wait();
    out[i] = wi + x[i] + early;
}
