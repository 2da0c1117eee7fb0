// selftest.cu: small kernels that exercise the CPU harness itself (tests/test_cuda_cpu.py, section 1).
//
// Each one is either correct, with a result the test computes independently, or wrong in one
// known way that the harness must report or expose: a missing or divergent barrier, a shuffle with
// a bad mask or width, a read of shared memory nobody wrote, a read past the end of an array, a
// signed overflow in an index. Written in the style of kernels.cu (no headers, extern "C").

#define WARP 32

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
