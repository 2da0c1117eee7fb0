// kernels.cu: the hot spots of phi4flash on a CUDA GPU, loaded by phi4flash.py with cupy.RawModule.
//
// Read it next to phi4flash.py, appendix A "The GPU: CuPy + kernels.cu", which follows this file's
// order and numbers. Every kernel here has a NumPy twin there with the same name and the same
// parameter list, next to the launcher that calls it; the tests compare each kernel with its
// twin, and each twin with the model's own functions (causal_conv1d, selective_scan_sequential,
// attend, linear).
//
// Conventions
//   * Everything is float32, except bf16 weights, which stay as their raw 16 bits (unsigned short)
//     and are widened exactly (bits << 16) right before use; int8 weights (signed char, with one
//     float32 scale per GROUP = 32 of a row: w = q · s), dequantised right before use; and a K/V
//     cache of bf16 bits, rounded as phi4flash.py's f32_to_bf16 when stored. No fp16 anywhere.
//   * Flags a kernel sets and counters it shares between blocks are int (NumPy int32).
//   * Arrays are row-major, as the NumPy shapes in each header say; sizes arrive as int arguments.
//   * Positions are long long (NumPy int64), -1 marks an empty cache slot (KVCache.pos).
//   * The glossary letters are phi4flash.py's: T tokens, S key slots, d_inner, d_state (N),
//     d_conv, H / H_kv heads, head_dim (hd), G = H / H_kv, W the sliding window.
//   * CuPy compiles this file with NVRTC (-std=c++17 -ftz=true), so it includes no headers.

#define WARP 32

// ------------------------------------------------------------------------------------------------
// Small device helpers, the same formulas as phi4flash.py's sigmoid / silu / softplus.

__device__ __forceinline__ float silu(float a) {
    return a / (1.0f + expf(-fmaxf(a, -80.0f)));           // a·sigmoid(a); e^80 is finite in fp32
}

__device__ __forceinline__ float softplus(float v) {
    return v > 20.0f ? v : log1pf(expf(v));                  // log(1 + e^v), and v itself past 20
}

__device__ __forceinline__ float neg_inf() {
    return __int_as_float(0xff800000);                       // -inf without <cmath>'s INFINITY (NVRTC has no headers)
}

__device__ __forceinline__ float bf16_bits_to_float(unsigned int bits) {
    return __uint_as_float(bits << 16);                      // bf16 is the top half of an fp32
}

// Sum over the `width` lanes of an aligned lane group (width a power of two <= 32). Every lane of
// the warp must call it; each group gets its own sum in all of its lanes.
__device__ __forceinline__ float group_sum(float v, int width) {
    for (int offset = width / 2; offset > 0; offset /= 2)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum / max over the whole block; every thread gets the result. s_warp holds one float per warp;
// the second barrier lets the next call reuse it.
__device__ __forceinline__ float block_sum(float v, float* s_warp) {
    v = group_sum(v, WARP);
    if (threadIdx.x % WARP == 0) s_warp[threadIdx.x / WARP] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < (int)blockDim.x / WARP; w++) total += s_warp[w];
    __syncthreads();
    return total;
}

__device__ __forceinline__ float block_max(float v, float* s_warp) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if (threadIdx.x % WARP == 0) s_warp[threadIdx.x / WARP] = v;
    __syncthreads();
    float best = neg_inf();
    for (int w = 0; w < (int)blockDim.x / WARP; w++) best = fmaxf(best, s_warp[w]);
    __syncthreads();
    return best;
}

// ------------------------------------------------------------------------------------------------
// Programmatic dependent launch (PDL, sm_90+), for the kernels of a decode step (phi4flash.py,
// PDL_KERNELS). A decode step is a chain of a few hundred kernels. Launched with the programmatic-
// stream-serialization attribute (phi4flash.py, _launch_pdl), a kernel may start while the one
// before it still runs, so that its blocks are resident and its first weight loads are in flight
// when its predecessor ends, instead of the GPU ramping up after every kernel boundary. A kernel
// launched this way must not touch what its predecessor may still be writing. The rules, for
// every kernel in PDL_KERNELS (tests/test_cuda_cpu.py checks them on the CPU, see tests/cuda_cpu):
//   1. Before pdl_wait() a thread reads only its kernel's IMMUTABLE parameters (weights: nothing
//      writes them after loading) and writes nothing, not even shared memory. It may load weights
//      into registers and ask L2 for them (prefetch_l2).
//   2. Every thread of every block calls pdl_wait() once; no thread returns before it. (A block
//      that exited without waiting could let this kernel complete before its predecessor has, and
//      the next kernel waits only for this one.)
//   3. pdl_wait() waits until the predecessor has completed and its writes are visible
//      (griddepcontrol.wait), then at once lets the next kernel launch (griddepcontrol.
//      launch_dependents), so that the next kernel's prologue overlaps this one's body.
// Launched without the attribute (older GPUs, PHI4FLASH_PDL=0, prefill) the kernels run as before:
// the wait returns at once.
#define IMMUTABLE   // marks a parameter a kernel may read before pdl_wait(): a weight

__device__ __forceinline__ void pdl_wait() {
#ifdef __CUDA_ARCH__
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
#else   // kernels.cu on the CPU (tests/cuda_cpu): CUDA's device-runtime names for the same two steps
    cudaGridDependencySynchronize();
    cudaTriggerProgrammaticLaunchCompletion();
#endif
}

// A hint that L2 fetch the bytes [p, p + bytes) (p 16-byte aligned; bytes rounded down to a
// multiple of 16): one bulk prefetch on sm_90+, nothing before it. Only for IMMUTABLE data.
__device__ __forceinline__ void prefetch_l2(const void* p, unsigned int bytes) {
#ifdef __CUDA_ARCH__
#if __CUDA_ARCH__ >= 900
    if (bytes >= 16) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes & ~15u) : "memory");
#endif
#else
    cuda_cpu_prefetch_l2(p, bytes);
#endif
}

// ================================================================================================
// 1a. conv1d_silu_prefill: Mamba's depthwise causal conv over T new tokens, then SiLU.
//
//   out[t, c] = silu(bias[c] + sum_k weight[c, k] * xs[t + k, c]),   xs = [conv_state; x]
//
//   so weight[:, d_conv-1] multiplies the current token and conv_state holds the d_conv-1 raw
//   inputs before x. The caller updates conv_state afterwards (a tiny slice copy), because every
//   thread here may still be reading it.
//   x (T, d_inner), conv_state (d_conv-1, d_inner), weight (d_inner, d_conv), bias (d_inner,)
//   -> out (T, d_inner)
// Mapping: one thread per output element, flat index t * d_inner + c, so a warp reads 32
//   consecutive channels of one token (coalesced). Grid ceil(T * d_inner / 256), block 256.
// Traffic: x read once from DRAM (the d_conv-1 re-reads of neighbouring tokens hit L1/L2), out
//   written once: about 8 * T * d_inner bytes.
extern "C" __global__ void conv1d_silu_prefill(const float* x, const float* conv_state, const float* weight,
                                               const float* bias, float* out, int T, int d_inner, int d_conv) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * d_inner) return;
    int t = (int)(i / d_inner);
    int c = (int)(i % d_inner);
    float acc = bias[c];
    for (int k = 0; k < d_conv; k++) {
        int j = t + k;                                       // row of xs = [conv_state; x]
        float xj = j < d_conv - 1 ? conv_state[(long long)j * d_inner + c]
                                  : x[(long long)(j - (d_conv - 1)) * d_inner + c];
        acc += weight[c * d_conv + k] * xj;
    }
    out[i] = silu(acc);
}

// ------------------------------------------------------------------------------------------------
// 1b. conv1d_silu_step: the same conv for one decode token, updating conv_state in place.
//
//   out[c] = silu(bias[c] + sum_k weight[c, k] * window[k]),  window = [conv_state[:, c]; x[c]]
//   conv_state[:, c] <- window[1:]                   (the oldest raw input drops out)
//   x (d_inner,), conv_state (d_conv-1, d_inner), weight (d_inner, d_conv), bias (d_inner,) -> out (d_inner,)
// Mapping: one thread per channel c; it alone reads and writes its column of conv_state, so the
//   in-place shift has no race. Grid ceil(d_inner / 256), block 256. d_conv <= MAX_D_CONV.
//   conv_step is one channel: the decode step runs it in the epilogue of in_proj's GEMV (kernel 7,
//   gemv_*_conv), on the raw x[c] its sum has just made; this kernel serves a one-token chunk.
// Traffic: 4 * d_inner * (2 * d_conv + 2) bytes, a few hundred KB for the real model.
#define MAX_D_CONV 8

__device__ __forceinline__ float conv_step(float x_new, float* conv_state, const float* weight, const float* bias,
                                           int c, int d_inner, int d_conv) {
    float window[MAX_D_CONV];
#pragma unroll
    for (int k = 0; k < MAX_D_CONV; k++)                     // constant indices keep `window` in registers
        if (k < d_conv) window[k] = k < d_conv - 1 ? conv_state[k * d_inner + c] : x_new;
    float acc = bias[c];
#pragma unroll
    for (int k = 0; k < MAX_D_CONV; k++)
        if (k < d_conv) acc += weight[c * d_conv + k] * window[k];
#pragma unroll
    for (int k = 0; k < MAX_D_CONV - 1; k++)
        if (k < d_conv - 1) conv_state[k * d_inner + c] = window[k + 1];
    return silu(acc);
}

extern "C" __global__ void conv1d_silu_step(const float* x, float* conv_state, const float* weight,
                                            const float* bias, float* out, int d_inner, int d_conv) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < d_inner) out[c] = conv_step(x[c], conv_state, weight, bias, c, d_inner, d_conv);
}

// ================================================================================================
// 2. scan_prefill: Mamba's selective scan over T tokens, with everything around it fused.
//
//   delta_t = softplus(dt_t + dt_bias)                    (dt = dt_low · dt_projᵀ, bias not yet added)
//   A       = -exp(A_log)
//   h_t     = exp(delta_t A) ⊙ h_{t-1} + delta_t B_t x_t  (per channel c and state n)
//   y_t     = h_t · C_t + D ⊙ x_t                         (the pre-gate output: layer L/2's GMU memory)
//   y_gated = y_t ⊙ silu(z_t)                              (what out_proj reads)
//   x, dt, z (T, d_inner); dt_bias, D (d_inner,); A_log, ssm_state (d_inner, d_state); B, C (T, d_state)
//   -> y, y_gated (T, d_inner); ssm_state updated in place (h_T).
// Mapping: a block owns SCAN_CHANNELS = 32 channels; thread (c_local, n) = threadIdx.x / d_state,
//   threadIdx.x % d_state keeps h[c, n] in a register for the whole sequence (parallel over channel
//   and state, sequential over time). The sum over n of h·C is a shuffle reduction inside each group
//   of d_state lanes (d_state a power of two <= 32). Time goes in chunks of SCAN_CHUNK steps: the
//   block stages delta (softplus already applied), x, B and C of the chunk in shared memory with
//   coalesced loads, runs the chunk's recurrence from shared memory, then writes y and y_gated of the
//   chunk coalesced. Grid ceil(d_inner / 32), block 32 * d_state (512 for the real model).
// Traffic: x, dt, z read once, y and y_gated written once: 20 * T * d_inner bytes; B and C are
//   re-read by every block (8 * T * d_state * blocks, from L2); the state 8 * d_inner * d_state.
#define SCAN_CHANNELS 32
#define SCAN_CHUNK 32
extern "C" __global__ void scan_prefill(const float* x, const float* dt, const float* dt_bias, const float* A_log,
                                        const float* B, const float* C, const float* D, const float* z,
                                        float* ssm_state, float* y, float* y_gated, int T, int d_inner, int d_state) {
    __shared__ float s_delta[SCAN_CHUNK][SCAN_CHANNELS];
    __shared__ float s_x[SCAN_CHUNK][SCAN_CHANNELS];
    __shared__ float s_B[SCAN_CHUNK][WARP];
    __shared__ float s_C[SCAN_CHUNK][WARP];
    __shared__ float s_y[SCAN_CHUNK][SCAN_CHANNELS];
    int c0 = blockIdx.x * SCAN_CHANNELS;
    int c_local = threadIdx.x / d_state;
    int n = threadIdx.x % d_state;
    int c = c0 + c_local;
    bool live = c < d_inner;                                 // dead threads still join the shuffles
    float A = live ? -expf(A_log[c * d_state + n]) : 0.0f;
    float h = live ? ssm_state[c * d_state + n] : 0.0f;
    float Dc = live ? D[c] : 0.0f;
    for (int t0 = 0; t0 < T; t0 += SCAN_CHUNK) {
        int steps = min(SCAN_CHUNK, T - t0);
        for (int i = threadIdx.x; i < SCAN_CHUNK * SCAN_CHANNELS; i += blockDim.x) {
            int tt = i / SCAN_CHANNELS, cc = c0 + i % SCAN_CHANNELS;
            bool ok = tt < steps && cc < d_inner;
            long long g = (long long)(t0 + tt) * d_inner + cc;
            s_delta[tt][i % SCAN_CHANNELS] = ok ? softplus(dt[g] + dt_bias[cc]) : 0.0f;
            s_x[tt][i % SCAN_CHANNELS] = ok ? x[g] : 0.0f;
        }
        for (int i = threadIdx.x; i < SCAN_CHUNK * d_state; i += blockDim.x) {
            int tt = i / d_state, nn = i % d_state;
            bool ok = tt < steps;
            s_B[tt][nn] = ok ? B[(long long)(t0 + tt) * d_state + nn] : 0.0f;
            s_C[tt][nn] = ok ? C[(long long)(t0 + tt) * d_state + nn] : 0.0f;
        }
        __syncthreads();
        for (int tt = 0; tt < steps; tt++) {
            float delta = s_delta[tt][c_local], xt = s_x[tt][c_local];
            h = expf(delta * A) * h + delta * s_B[tt][n] * xt;
            float yt = group_sum(h * s_C[tt][n], d_state);
            if (n == 0) s_y[tt][c_local] = yt + Dc * xt;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < steps * SCAN_CHANNELS; i += blockDim.x) {
            int tt = i / SCAN_CHANNELS, cc = c0 + i % SCAN_CHANNELS;
            if (cc >= d_inner) continue;
            long long g = (long long)(t0 + tt) * d_inner + cc;
            float yt = s_y[tt][i % SCAN_CHANNELS];
            y[g] = yt;
            y_gated[g] = yt * silu(z[g]);
        }
        __syncthreads();                                     // the next chunk overwrites the staging
    }
    if (live) ssm_state[c * d_state + n] = h;
}

// ================================================================================================
// 3. scan_step: the recurrence for one decode token, with Δ's projection fused in front of it.
//
//   dt      = dt_low · dt_proj[c]ᵀ,   [dt_low | B | C] = xdbc      (x_proj's output, one GEMV)
//   delta   = softplus(dt + dt_bias[c]),  then h, y, y_gated as in scan_prefill
//   x, z (d_inner,); xdbc (dt_rank + 2·d_state,); dt_proj (d_inner, dt_rank) float32; dt_bias, D
//   (d_inner,); A_log, ssm_state (d_inner, d_state) -> y, y_gated (d_inner,); ssm_state in place.
// Mapping: thread (c, n) as in scan_prefill, 32 channels per block, block 32 * d_state, grid
//   ceil(d_inner / 32). The d_state threads of channel c first share its dt_rank-long dot product
//   (lane n takes k = n, n + d_state, ...; a shuffle sum gives every lane the total), then each
//   advances h[c, n]; lane n == 0 writes the channel's outputs.
// Traffic: dt_proj once (4 * d_inner * dt_rank bytes, 3.3 MB for the real model), the state read
//   and written (8 * d_inner * d_state), A_log (4 * d_inner * d_state), 20 * d_inner for the vectors.
extern "C" __global__ void scan_step(const float* x, const float* xdbc, IMMUTABLE const float* dt_proj,
                                     IMMUTABLE const float* dt_bias, IMMUTABLE const float* A_log,
                                     IMMUTABLE const float* D, const float* z, float* ssm_state, float* y,
                                     float* y_gated, int d_inner, int d_state, int dt_rank) {
    pdl_wait();                                              // a decode-step kernel (rules above): x, xdbc come from x_proj
    int c = blockIdx.x * SCAN_CHANNELS + threadIdx.x / d_state;
    int n = threadIdx.x % d_state;
    bool live = c < d_inner;
    const float* B = xdbc + dt_rank;
    const float* C = B + d_state;
    float dt = 0.0f;
    if (live)
        for (int k = n; k < dt_rank; k += d_state) dt += xdbc[k] * dt_proj[(long long)c * dt_rank + k];
    dt = group_sum(dt, d_state);                             // dead threads still join the shuffles
    float contribution = 0.0f, delta = 0.0f, xt = 0.0f;
    if (live) {
        delta = softplus(dt + dt_bias[c]);
        xt = x[c];
        float h = expf(delta * -expf(A_log[c * d_state + n])) * ssm_state[c * d_state + n] + delta * B[n] * xt;
        ssm_state[c * d_state + n] = h;
        contribution = h * C[n];
    }
    float yt = group_sum(contribution, d_state);
    if (live && n == 0) {
        yt += D[c] * xt;
        y[c] = yt;
        y_gated[c] = yt * silu(z[c]);
    }
}

// ================================================================================================
// Differential attention, shared by kernels 4 and 5 (phi4flash.py, section 6).
//
// Heads are striped by parity and GQA maps inside each stripe: for KV group g (0 <= g < H_kv/2)
// the 2G query heads 2(gG + r) + s (stripe s in {0, 1}, r < G) use K head 2g + s, and all of them
// read the value pair [v_{2g} ‖ v_{2g+1}] (2·hd wide). So one block per KV group loads each key's
// K_{2g}, K_{2g+1}, V_{2g}, V_{2g+1} once and serves all 2G queries, and both softmax maps of a
// pair come out of the same block, where lambda, subln and (1 - lambda_init) are applied once:
//   O_j = RMSNorm(A1_j − λ A2_j) ⊙ subln · (1 − λ_init),   written to output features [j·2hd, (j+1)·2hd)
// A key s is visible to a query at position p iff kpos[s] >= 0, kpos[s] <= p and, with a window,
// kpos[s] > p − W (W keys, the current one included). Scores are q·k / sqrt(hd), softmax in fp32.
// K and V arrive as the cache holds them (phi4flash.py, section 11): float32, or bf16 bits
// (kv_dtype "bfloat16"), widened exactly where they are used; each kernel has an instance per type.

__device__ __forceinline__ bool key_visible(long long key_pos, long long query_pos, int window) {
    return key_pos >= 0 && key_pos <= query_pos && (window == 0 || key_pos > query_pos - window);
}

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(unsigned short bits) { return bf16_bits_to_float(bits); }

// q[0..7] · k[0..7] for 8 consecutive features, k in shared memory (16-byte aligned), q float32
__device__ __forceinline__ float dot8_row(const float* q, const float* k) {
    const float4 a = reinterpret_cast<const float4*>(q)[0], b = reinterpret_cast<const float4*>(q)[1];
    const float4 x = reinterpret_cast<const float4*>(k)[0], y = reinterpret_cast<const float4*>(k)[1];
    return a.x * x.x + a.y * x.y + a.z * x.z + a.w * x.w + b.x * y.x + b.y * y.y + b.z * y.z + b.w * y.w;
}

__device__ __forceinline__ float dot8_row(const float* q, const unsigned short* k) {
    const float4 a = reinterpret_cast<const float4*>(q)[0], b = reinterpret_cast<const float4*>(q)[1];
    const uint4 w = *reinterpret_cast<const uint4*>(k);
    return a.x * bf16_bits_to_float(w.x & 0xffffu) + a.y * bf16_bits_to_float(w.x >> 16) +
           a.z * bf16_bits_to_float(w.y & 0xffffu) + a.w * bf16_bits_to_float(w.y >> 16) +
           b.x * bf16_bits_to_float(w.z & 0xffffu) + b.y * bf16_bits_to_float(w.z >> 16) +
           b.z * bf16_bits_to_float(w.w & 0xffffu) + b.w * bf16_bits_to_float(w.w >> 16);
}

// Asynchronous copies global -> shared (cp.async, sm_80+): copy_async<BYTES> issues a copy that
// runs while the thread goes on, copy_async_commit closes this thread's group of copies, and
// copy_async_wait<N> waits until at most the N newest groups are still in flight. Each thread
// waits for its own copies only: a __syncthreads() after the wait publishes the block's. 16-byte
// copies bypass L1 (.cg: a block reads each K/V row once). Below sm_80 a copy is a plain load and
// store and waiting does nothing. Where kernels.cu runs on the CPU (tests/cuda_cpu) the three are
// CUDA's pipeline primitives, which the harness implements: a copy lands at the wait, and its
// destination holds poison until then.
template <int BYTES> __device__ __forceinline__ void copy_async(void* dst, const void* src) {
    static_assert(BYTES == 8 || BYTES == 16, "copy_async: 8 or 16 bytes");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned int shared_dst = (unsigned int)__cvta_generic_to_shared(dst);
    if (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_dst), "l"(src) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(shared_dst), "l"(src) : "memory");
#elif defined(__CUDA_ARCH__)
    if (BYTES == 16) *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    else *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
#else
    __pipeline_memcpy_async(dst, src, BYTES);
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#elif !defined(__CUDA_ARCH__)
    __pipeline_commit();
#endif
}

template <int N> __device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#elif !defined(__CUDA_ARCH__)
    __pipeline_wait_prior(N);
#endif
}

// ------------------------------------------------------------------------------------------------
// 4. attention_prefill_f32 / attention_prefill_bf16: tiled differential attention with an online
//    softmax (flash-style), K/V float32 or bf16 bits.
//
//   q (H, T, hd); k, v (H_kv, S, hd) with head stride kv_head_stride elements (so a prefix view of
//   the shared buffer needs no copy); qpos (T,); kpos (S,) ascending (keys in time order);
//   lambda (1,) on the device; subln (2·hd,) -> out (T, H·hd)
// Mapping: grid (ceil(T / BQ), H_kv / 2), block 256. A block holds PREFILL_VECTORS = 64 query
//   vectors: BQ = 64 / (2G) consecutive query rows × the group's 2G heads, vector v = s·32 + row·G + r.
//   Thread 0 binary-searches kpos once for the keys the block's rows can see ([lo, hi), as attend
//   slices them), then the block walks them in tiles of PREFILL_KEYS = 16:
//     load K (both stripes) and V of the tile into shared memory (bf16 widened on the way);
//     scores for 64 vectors × 16 keys (4 per thread), masked per (query, key) by position;
//     threads 0..63 each run the online-softmax update of one vector: m' = max(m, tile max),
//       p = exp(score − m'), l = l·exp(m − m') + Σp, and publish the rescale factor exp(m − m');
//     thread (f = tid mod 2hd) accumulates feature f of vectors tid / 2hd + k·(256 / 2hd):
//       acc = acc·rescale + Σ p·V[:, f], the accumulators in registers (hd/2 of them, <= 32).
//   A thread holding a stripe-1 vector also holds its stripe-2 twin (32 vectors later), so the
//   difference A1 − λ A2 is formed in registers; the RMS over 2hd features is a warp reduction.
//   Requires hd a power of two in [8, 64] and 2G dividing 64.
// Traffic: q read once and out written once (8 · T · H · hd bytes); each block reads the K/V rows
//   its rows can see, BQ + W − 1 keys for a window (from L2 when neighbouring blocks share them):
//   about 4 · hd · sizeof(K/V) · (BQ + W) · (T / BQ) · H_kv / 2 bytes.
#define PREFILL_THREADS 256
#define PREFILL_VECTORS 64
#define PREFILL_KEYS 16
#define MAX_HEAD_DIM 64

struct PrefillShared {
    float q[PREFILL_VECTORS][MAX_HEAD_DIM];              // reused for the differences at the end
    float k[2][PREFILL_KEYS][MAX_HEAD_DIM + 1];          // +1: the 16 keys of a score row hit 16 banks
    float v[PREFILL_KEYS][2 * MAX_HEAD_DIM];
    float p[PREFILL_VECTORS][PREFILL_KEYS + 1];
    float rescale[PREFILL_VECTORS];
    float l[PREFILL_VECTORS];
    float inv_rms[PREFILL_VECTORS / 2];
    long long kpos[PREFILL_KEYS];
    long long qpos[PREFILL_VECTORS];
    int range[2];
};

template <typename KV>
__device__ __forceinline__ void attention_prefill(const float* q, const KV* k, const KV* v, const long long* qpos,
                                                  const long long* kpos, const float* lambda, const float* subln,
                                                  float* out, int T, int S, int H, int H_kv, int head_dim,
                                                  long long kv_head_stride, int window, float lambda_init, float eps,
                                                  PrefillShared& sh) {
    const int G = H / H_kv, hd = head_dim, F2 = 2 * head_dim;
    const int rows = PREFILL_VECTORS / (2 * G);              // BQ query rows per block
    const int g = blockIdx.y;
    const int t0 = blockIdx.x * rows;
    const int tid = threadIdx.x;
    const float scale = 1.0f / sqrtf((float)hd);

    // Query vectors into shared memory: vector vec = s·32 + row·G + r is head 2(gG + r) + s at row t0 + row.
    for (int i = tid; i < PREFILL_VECTORS * hd; i += PREFILL_THREADS) {
        int vec = i / hd, d = i % hd;
        int s = vec / 32, row = (vec % 32) / G, r = vec % G;
        int t = t0 + row, head = 2 * (g * G + r) + s;
        sh.q[vec][d] = t < T ? q[((long long)head * T + t) * hd + d] : 0.0f;
    }
    if (tid < rows) sh.qpos[tid] = t0 + tid < T ? qpos[t0 + tid] : -1;
    if (tid == 0) {                                          // keys [lo, hi) that rows t0.. can see
        int last = min(T, t0 + rows) - 1;
        long long first_needed = window ? qpos[t0] - window + 1 : -1;
        int lo = 0, hi = S;
        while (lo < hi) { int mid = (lo + hi) / 2; if (kpos[mid] < first_needed) lo = mid + 1; else hi = mid; }
        sh.range[0] = window ? lo : 0;
        lo = sh.range[0]; hi = S;
        while (lo < hi) { int mid = (lo + hi) / 2; if (kpos[mid] <= qpos[last]) lo = mid + 1; else hi = mid; }
        sh.range[1] = lo;
    }
    __syncthreads();

    // Thread tid accumulates feature f of the stripe-1 vectors first_vec + a·vec_step (a < n_pairs,
    // all < 32) in acc[a], and of their stripe-2 twins (32 vectors later) in acc[16 + a]: fixed
    // register slots, so the difference A1 − λ A2 needs no data movement.
    const int f = tid % F2;
    const int first_vec = tid / F2, vec_step = PREFILL_THREADS / F2;
    const int n_pairs = (PREFILL_VECTORS / 2) / vec_step;     // = hd / 4, at most 16
    float acc[32];
#pragma unroll
    for (int a = 0; a < 32; a++) acc[a] = 0.0f;
    float m = neg_inf(), l = 0.0f;                           // softmax state of vector tid (tid < 64)

    for (int k0 = sh.range[0]; k0 < sh.range[1]; k0 += PREFILL_KEYS) {
        int n_keys = min(PREFILL_KEYS, sh.range[1] - k0);
        for (int i = tid; i < PREFILL_KEYS * hd; i += PREFILL_THREADS) {
            int kk = i / hd, d = i % hd;
            bool ok = kk < n_keys;
            long long row = (long long)(k0 + kk) * hd + d;
            sh.k[0][kk][d] = ok ? widen(k[(2 * g) * kv_head_stride + row]) : 0.0f;
            sh.k[1][kk][d] = ok ? widen(k[(2 * g + 1) * kv_head_stride + row]) : 0.0f;
            sh.v[kk][d] = ok ? widen(v[(2 * g) * kv_head_stride + row]) : 0.0f;
            sh.v[kk][hd + d] = ok ? widen(v[(2 * g + 1) * kv_head_stride + row]) : 0.0f;
        }
        if (tid < PREFILL_KEYS) sh.kpos[tid] = tid < n_keys ? kpos[k0 + tid] : -1;
        __syncthreads();
        for (int i = tid; i < PREFILL_VECTORS * PREFILL_KEYS; i += PREFILL_THREADS) {
            int vec = i / PREFILL_KEYS, kk = i % PREFILL_KEYS;
            int s = vec / 32, row = (vec % 32) / G;
            float score = neg_inf();
            if (key_visible(sh.kpos[kk], sh.qpos[row], window)) {
                float dot = 0.0f;
                for (int d = 0; d < hd; d++) dot += sh.q[vec][d] * sh.k[s][kk][d];
                score = dot * scale;
            }
            sh.p[vec][kk] = score;
        }
        __syncthreads();
        if (tid < PREFILL_VECTORS) {
            float tile_max = neg_inf();
            for (int kk = 0; kk < PREFILL_KEYS; kk++) tile_max = fmaxf(tile_max, sh.p[tid][kk]);
            float m_new = fmaxf(m, tile_max);
            float rescale = 1.0f, sum = 0.0f;
            if (m_new != neg_inf()) {                        // else nothing visible yet: keep acc = 0
                rescale = expf(m - m_new);                   // exp(-inf) = 0 on the first visible tile
                for (int kk = 0; kk < PREFILL_KEYS; kk++) {
                    float p = expf(sh.p[tid][kk] - m_new);
                    sh.p[tid][kk] = p;
                    sum += p;
                }
            } else {
                for (int kk = 0; kk < PREFILL_KEYS; kk++) sh.p[tid][kk] = 0.0f;
            }
            l = l * rescale + sum;
            m = m_new;
            sh.rescale[tid] = rescale;
        }
        __syncthreads();
#pragma unroll
        for (int a = 0; a < 16; a++) {
            if (a < n_pairs) {
                int vec = first_vec + a * vec_step;          // stripe 1; vec + 32 is its stripe-2 twin
                float sum1 = 0.0f, sum2 = 0.0f;
                for (int kk = 0; kk < PREFILL_KEYS; kk++) {
                    sum1 += sh.p[vec][kk] * sh.v[kk][f];
                    sum2 += sh.p[vec + 32][kk] * sh.v[kk][f];
                }
                acc[a] = acc[a] * sh.rescale[vec] + sum1;
                acc[16 + a] = acc[16 + a] * sh.rescale[vec + 32] + sum2;
            }
        }
        __syncthreads();                                     // the next tile overwrites sh.k, sh.v, sh.p
    }

    if (tid < PREFILL_VECTORS) sh.l[tid] = l;
    __syncthreads();
    // A1 − λ A2 for pair vector vec < 32 (stripe 1) and vec + 32 (its stripe-2 twin), into sh.q.
    float (*diff)[2 * MAX_HEAD_DIM] = reinterpret_cast<float (*)[2 * MAX_HEAD_DIM]>(&sh.q[0][0]);
    const float lam = lambda[0];
#pragma unroll
    for (int a = 0; a < 16; a++) {
        if (a < n_pairs) {
            int vec = first_vec + a * vec_step;
            float l1 = sh.l[vec], l2 = sh.l[vec + 32];
            float a1 = l1 > 0.0f ? acc[a] / l1 : 0.0f;
            float a2 = l2 > 0.0f ? acc[16 + a] / l2 : 0.0f;
            diff[vec][f] = a1 - lam * a2;
        }
    }
    __syncthreads();
    const int warp = tid / WARP, lane = tid % WARP;
    for (int pair = warp; pair < PREFILL_VECTORS / 2; pair += PREFILL_THREADS / WARP) {
        float ss = 0.0f;
        for (int ff = lane; ff < F2; ff += WARP) ss += diff[pair][ff] * diff[pair][ff];
        ss = group_sum(ss, WARP);
        if (lane == 0) sh.inv_rms[pair] = 1.0f / sqrtf(ss / F2 + eps);
    }
    __syncthreads();
    for (int i = tid; i < (PREFILL_VECTORS / 2) * F2; i += PREFILL_THREADS) {
        int pair = i / F2, ff = i % F2;
        int row = pair / G, r = pair % G, t = t0 + row;
        if (t < T)
            out[(long long)t * H * hd + (g * G + r) * F2 + ff] =
                diff[pair][ff] * sh.inv_rms[pair] * subln[ff] * (1.0f - lambda_init);
    }
}

extern "C" __global__ void __launch_bounds__(PREFILL_THREADS)
attention_prefill_f32(const float* q, const float* k, const float* v, const long long* qpos, const long long* kpos,
                      const float* lambda, const float* subln, float* out, int T, int S, int H, int H_kv,
                      int head_dim, long long kv_head_stride, int window, float lambda_init, float eps) {
    __shared__ PrefillShared sh;
    attention_prefill(q, k, v, qpos, kpos, lambda, subln, out, T, S, H, H_kv, head_dim, kv_head_stride, window,
                      lambda_init, eps, sh);
}

extern "C" __global__ void __launch_bounds__(PREFILL_THREADS)
attention_prefill_bf16(const float* q, const unsigned short* k, const unsigned short* v, const long long* qpos,
                       const long long* kpos, const float* lambda, const float* subln, float* out, int T, int S, int H,
                       int H_kv, int head_dim, long long kv_head_stride, int window, float lambda_init, float eps) {
    __shared__ PrefillShared sh;
    attention_prefill(q, k, v, qpos, kpos, lambda, subln, out, T, S, H, H_kv, head_dim, kv_head_stride, window,
                      lambda_init, eps, sh);
}

// ------------------------------------------------------------------------------------------------
// 5a. attention_decode_f32 / attention_decode_bf16: one query token over the live keys of a K/V
//     cache, split across blocks and merged by the last block of each KV group (5b).
//
//   q (H, hd) for the one token at position qpos[0] (a device scalar, so a CUDA graph can replay
//   the step); k, v (H_kv, S, hd), float32 or bf16 bits, head stride kv_head_stride; kpos (S,) in
//   any order, -1 = empty (the W-slot ring of a sliding layer, or the shared buffer of layer L/2+1);
//   lambda (1,); subln (2hd,) -> out (1, H·hd), as attention_prefill's row.
//   Scratch: partial_m, partial_l (n_splits, H), partial_acc (n_splits, H, 2hd): each split's
//   softmax state per query head (the running max m of the scaled scores, l = Σ exp(score − m), and
//   acc = Σ exp(score − m)·[v1 ‖ v2], unnormalised); splits_done (H_kv / 2,): per KV group, the
//   splits that have written theirs. It is 0 before and after every launch.
// Which keys: slot s holds a position >= s in both layouts (the ring puts position p at slot
//   p mod W, the buffer at slot p), so every key the query sees lies in the live slots [0, live),
//   live = min(qpos + 1, S). The grid is fixed, (n_splits, H_kv / 2), n_splits chosen from the SM
//   count (phi4flash.decode_splits), so a captured graph stays right while the cache fills; block
//   (split, g) computes its keys at run time: the split-th of n_splits equal runs of whole tiles of
//   [0, live). The work scales with the live length, not with S. A run past the live keys is empty:
//   its block writes m = −inf, l = 0, acc = 0, which the merge skips, and still counts itself in.
// Mapping: grid (n_splits, H_kv / 2), block DECODE_THREADS = 128. Tiles of DECODE_KEYS = 16 keys,
//   double-buffered: while tile t is scored, the copies of tile t + 1 (the rows of K_{2g}, K_{2g+1},
//   V_{2g}, V_{2g+1} in 16-byte copies, a warp's 32 copies contiguous in memory, and the positions
//   in 8-byte copies) run into the other buffer.
//     scores: thread (qi, kk) = (tid / 16, tid % 16) takes query qi = s·G + r (head 2(gG + r) + s)
//       and key kk, eight features per shared load (K rows padded to an odd number of 16-byte
//       units: no bank conflicts); a query's tile max and Σp are shuffles over its 16 lanes, so its
//       softmax state (m, l) lives in those lanes' registers;
//     values: thread f < 2hd accumulates feature f of all 2G queries, in registers.
//   Then every block writes its partials, makes them visible (__threadfence) and counts itself in
//   (atomicAdd on splits_done[g]); the block that counts last merges the group (5b) and sets
//   splits_done[g] back to 0 for the next launch. Requires hd a power of two in [8, 64],
//   2G <= DECODE_MAX_QUERIES, n_splits <= DECODE_MAX_SPLITS, and k, v 16-byte aligned.
// Traffic: the live keys' K and V rows once per KV group, 4 · hd · sizeof(K/V) · live · H_kv / 2
//   bytes (the layer's live K/V once), 8 · live · H_kv / 2 of positions, the partials written and
//   read back by the merge, 8 · n_splits · H · (2hd + 2), and q and out, 8 · H · hd.
#define DECODE_THREADS 128
#define DECODE_KEYS 16
#define DECODE_MAX_QUERIES 8
#define DECODE_MAX_SPLITS 256
#if DECODE_KEYS * DECODE_MAX_QUERIES != DECODE_THREADS || DECODE_THREADS / WARP * 2 != DECODE_MAX_QUERIES
#error "attention_decode: a thread per (query, key) of a tile, and two queries per warp in the merge"
#endif

template <typename KV> struct __align__(16) DecodeTiles {    // two buffers of one tile each
    static constexpr int ROW = MAX_HEAD_DIM + 16 / (int)sizeof(KV);   // a K row: an odd number of 16-byte units
    KV k[2][2][DECODE_KEYS][ROW];                    // [buffer][stripe][key][feature]
    KV v[2][DECODE_KEYS][2 * MAX_HEAD_DIM];          // [buffer][key][v_{2g} ‖ v_{2g+1}]
    long long kpos[2][DECODE_KEYS];
};

struct __align__(16) DecodeMerge {                   // 5b's scratch, in the tiles' memory once they are done
    float w[DECODE_MAX_SPLITS][DECODE_MAX_QUERIES];  // e^(m_split − M) per split and query
    float merged[DECODE_MAX_QUERIES][2 * MAX_HEAD_DIM];
};

template <typename KV> struct DecodeShared {
    union { DecodeTiles<KV> tiles; DecodeMerge merge; } u;
    __align__(16) float q[DECODE_MAX_QUERIES][MAX_HEAD_DIM];
    float p[DECODE_MAX_QUERIES][DECODE_KEYS];
    float rescale[DECODE_MAX_QUERIES];
    float L[DECODE_MAX_QUERIES];
    float warp_sums[DECODE_THREADS / WARP];
    int last;                                        // this block counted last: it merges
};

// Issue the copies of keys [k0, k0 + n) into tile buffer b (the rest of the buffer keeps what it
// held: no key past n is read), and commit them as one group.
template <typename KV>
__device__ __forceinline__ void decode_stage(const KV* k, const KV* v, const long long* kpos, int g, int hd,
                                             long long kv_head_stride, int k0, int n, int b, DecodeTiles<KV>& tiles) {
    constexpr int PER_COPY = 16 / (int)sizeof(KV);   // K/V values per 16-byte copy
    const int units = hd / PER_COPY;                 // copies per row
    for (int i = threadIdx.x; i < 4 * DECODE_KEYS * units; i += DECODE_THREADS) {
        const int set = i / (DECODE_KEYS * units), kk = i / units % DECODE_KEYS, c = i % units * PER_COPY;
        if (kk >= n) continue;                       // set 0, 1: K of stripe 1, 2; set 2, 3: V_{2g}, V_{2g+1}
        const long long row = (2 * g + set % 2) * kv_head_stride + (long long)(k0 + kk) * hd + c;
        if (set < 2) copy_async<16>(&tiles.k[b][set][kk][c], k + row);
        else copy_async<16>(&tiles.v[b][kk][(set - 2) * hd + c], v + row);
    }
    if (threadIdx.x < DECODE_KEYS) {
        if ((int)threadIdx.x < n) copy_async<8>(&tiles.kpos[b][threadIdx.x], kpos + k0 + threadIdx.x);
        else tiles.kpos[b][threadIdx.x] = -1;        // past the run: masked
    }
    copy_async_commit();
}

// ------------------------------------------------------------------------------------------------
// 5b. attention_decode_merge: the last block of KV group g merges the group's splits in split
//     order, then the differential combine.
//
//   For each of the group's 2G query heads: M = max_s m_s over the splits with l_s > 0 (a split
//   that saw no key is skipped), w_s = e^{m_s − M}, L = Σ_s l_s w_s, a = Σ_s w_s acc_s / L. For
//   pair j = gG + r (heads 2j, 2j+1): out[j·2hd + f] = RMSNorm(a_{2j} − λ a_{2j+1})[f] · subln[f] · (1 − λ_init).
// Mapping: warp w takes queries w and w + 4: its lanes walk the splits for M (a warp max), then
//   put each w_s in shared memory and sum L (a warp sum). Thread i then sums float4 i of the 2G
//   acc rows (2hd / 4 each) over the splits in order, 8 loads in flight, read with __ldcg from L2
//   (other blocks wrote them). The RMS of each pair is a block sum. Each sum runs in the same order
//   whichever block merges, so the output is the same bits under any block order.
// Traffic: the group's partials once, from L2: 4 · n_splits · 2G · (2hd + 2) bytes; out 4 · 2G · hd.
template <typename KV>
__device__ __forceinline__ void attention_decode_merge(const float* partial_acc, const float* partial_m,
                                                       const float* partial_l, const float* lambda, const float* subln,
                                                       float* out, int g, int H, int H_kv, int head_dim, int n_splits,
                                                       float lambda_init, float eps, DecodeShared<KV>& sh) {
    const int G = H / H_kv, Q = 2 * G, F2 = 2 * head_dim, quads = F2 / 4;
    const int tid = threadIdx.x, warp = tid / WARP, lane = tid % WARP;
#pragma unroll
    for (int a = 0; a < 2; a++) {
        const int qi = warp + a * (DECODE_THREADS / WARP), head = 2 * (g * G + qi % G) + qi / G;
        if (qi >= Q) break;                          // uniform across the warp
        float M = neg_inf();
        for (int split = lane; split < n_splits; split += WARP)
            if (__ldcg(&partial_l[split * H + head]) > 0.0f) M = fmaxf(M, __ldcg(&partial_m[split * H + head]));
        for (int offset = WARP / 2; offset > 0; offset /= 2) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, offset));
        float L = 0.0f;
        for (int split = lane; split < n_splits; split += WARP) {
            const float l = __ldcg(&partial_l[split * H + head]);
            const float w = l > 0.0f ? expf(__ldcg(&partial_m[split * H + head]) - M) : 0.0f;
            sh.u.merge.w[split][qi] = w;
            L += l * w;
        }
        L = group_sum(L, WARP);
        if (lane == 0) sh.L[qi] = L;
    }
    __syncthreads();
    for (int i = tid; i < Q * quads; i += DECODE_THREADS) {
        const int qi = i / quads, c = i % quads, head = 2 * (g * G + qi % G) + qi / G;
        float4 A = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
        for (int split = 0; split < n_splits; split++) {
            const float4 x = __ldcg(reinterpret_cast<const float4*>(partial_acc + ((long long)split * H + head) * F2) + c);
            const float w = sh.u.merge.w[split][qi];
            A.x += x.x * w, A.y += x.y * w, A.z += x.z * w, A.w += x.w * w;
        }
        const float L = sh.L[qi];
        float* merged = &sh.u.merge.merged[qi][4 * c];
        merged[0] = L > 0.0f ? A.x / L : 0.0f, merged[1] = L > 0.0f ? A.y / L : 0.0f;
        merged[2] = L > 0.0f ? A.z / L : 0.0f, merged[3] = L > 0.0f ? A.w / L : 0.0f;
    }
    __syncthreads();
    const float lam = lambda[0];
    for (int r = 0; r < G; r++) {                    // pair j = gG + r: stripe-1 query r, stripe-2 query G + r
        const float d = tid < F2 ? sh.u.merge.merged[r][tid] - lam * sh.u.merge.merged[G + r][tid] : 0.0f;
        const float ss = block_sum(d * d, sh.warp_sums);
        if (tid < F2) out[(g * G + r) * F2 + tid] = d / sqrtf(ss / F2 + eps) * subln[tid] * (1.0f - lambda_init);
    }
}

template <typename KV>
__device__ __forceinline__ void attention_decode(const float* q, const KV* k, const KV* v, const long long* qpos,
                                                 const long long* kpos, const float* lambda, const float* subln,
                                                 float* partial_acc, float* partial_m, float* partial_l,
                                                 int* splits_done, float* out, int S, int H, int H_kv, int head_dim,
                                                 long long kv_head_stride, int window, int n_splits, float lambda_init,
                                                 float eps, DecodeShared<KV>& sh) {
    pdl_wait();                                      // a decode-step kernel: q, the K/V and qpos are the step's own
    const int G = H / H_kv, hd = head_dim, F2 = 2 * head_dim, Q = 2 * G;
    const int split = blockIdx.x, g = blockIdx.y, tid = threadIdx.x;
    const float scale = 1.0f / sqrtf((float)hd);
    const long long query_pos = qpos[0];
    // this split's run of the live slots: whole tiles, an equal share of them per split
    const int live = (int)min((long long)S, query_pos + 1);
    const int per_split = ((live + DECODE_KEYS - 1) / DECODE_KEYS + n_splits - 1) / n_splits * DECODE_KEYS;
    const int begin = min(live, split * per_split), end = min(live, begin + per_split);
    const int n_tiles = (end - begin + DECODE_KEYS - 1) / DECODE_KEYS;
    if (n_tiles > 0) decode_stage(k, v, kpos, g, hd, kv_head_stride, begin, min(DECODE_KEYS, end - begin), 0, sh.u.tiles);
    // local query qi = s·G + r is head 2(gG + r) + s
    for (int i = tid; i < Q * hd; i += DECODE_THREADS) {
        int qi = i / hd, d = i % hd, s = qi / G, r = qi % G;
        sh.q[qi][d] = q[(2 * (g * G + r) + s) * hd + d];
    }
    float acc[DECODE_MAX_QUERIES];
#pragma unroll
    for (int a = 0; a < DECODE_MAX_QUERIES; a++) acc[a] = 0.0f;
    const int qi = tid / DECODE_KEYS, kk = tid % DECODE_KEYS, stripe = qi / G;
    float m = neg_inf(), l = 0.0f;                   // softmax state of query qi (its 16 lanes agree)

    for (int t = 0; t < n_tiles; t++) {
        const int b = t % 2, k0 = begin + t * DECODE_KEYS, n = min(DECODE_KEYS, end - k0);
        copy_async_wait<0>();
        __syncthreads();                             // tile t has landed; buffer 1 − b (tile t − 1) is free
        if (t + 1 < n_tiles)                         // in flight while tile t is scored
            decode_stage(k, v, kpos, g, hd, kv_head_stride, k0 + DECODE_KEYS, min(DECODE_KEYS, end - k0 - DECODE_KEYS),
                         1 - b, sh.u.tiles);
        if (qi < Q) {                                // uniform across a warp: its two queries are both < Q or not
            float score = neg_inf();
            if (key_visible(sh.u.tiles.kpos[b][kk], query_pos, window)) {
                float dot = 0.0f;
                for (int d = 0; d < hd; d += 8) dot += dot8_row(&sh.q[qi][d], &sh.u.tiles.k[b][stripe][kk][d]);
                score = dot * scale;
            }
            float tile_max = score;
            for (int offset = DECODE_KEYS / 2; offset > 0; offset /= 2)
                tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
            const float m_new = fmaxf(m, tile_max);
            float p = 0.0f, rescale = 1.0f;          // a tile with no key visible yet changes nothing
            if (m_new != neg_inf()) p = expf(score - m_new), rescale = expf(m - m_new);
            l = l * rescale + group_sum(p, DECODE_KEYS);
            m = m_new;
            sh.p[qi][kk] = p;
            if (kk == 0) sh.rescale[qi] = rescale;
        }
        __syncthreads();
        if (tid < F2) {
#pragma unroll
            for (int a = 0; a < DECODE_MAX_QUERIES; a++) {
                if (a < Q) {
                    float sum = 0.0f;
                    for (int j = 0; j < n; j++) sum += sh.p[a][j] * widen(sh.u.tiles.v[b][j][tid]);
                    acc[a] = acc[a] * sh.rescale[a] + sum;
                }
            }
        }
    }
    // this split's partials, query head 2(gG + r) + s
    if (qi < Q && kk == 0) {
        const int head = 2 * (g * G + qi % G) + qi / G;
        partial_m[split * H + head] = m;
        partial_l[split * H + head] = l;
    }
    if (tid < F2) {
#pragma unroll
        for (int a = 0; a < DECODE_MAX_QUERIES; a++)
            if (a < Q) partial_acc[((long long)split * H + 2 * (g * G + a % G) + a / G) * F2 + tid] = acc[a];
    }
    __threadfence();                                 // this thread's partials, visible to every block ...
    __syncthreads();                                 // ... for all threads before the block counts itself in
    if (tid == 0) sh.last = atomicAdd(&splits_done[g], 1) == n_splits - 1;
    __syncthreads();
    if (!sh.last) return;                            // uniform: the whole block
    __threadfence();                                 // the other blocks' partials, read by the merge
    attention_decode_merge(partial_acc, partial_m, partial_l, lambda, subln, out, g, H, H_kv, head_dim, n_splits,
                           lambda_init, eps, sh);
    if (tid == 0) splits_done[g] = 0;                // every split has counted: ready for the next launch
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
attention_decode_f32(const float* q, const float* k, const float* v, const long long* qpos, const long long* kpos,
                     IMMUTABLE const float* lambda, IMMUTABLE const float* subln, float* partial_acc,
                     float* partial_m, float* partial_l, int* splits_done, float* out, int S, int H, int H_kv,
                     int head_dim, long long kv_head_stride, int window, int n_splits, float lambda_init, float eps) {
    __shared__ DecodeShared<float> sh;
    attention_decode(q, k, v, qpos, kpos, lambda, subln, partial_acc, partial_m, partial_l, splits_done, out, S, H,
                     H_kv, head_dim, kv_head_stride, window, n_splits, lambda_init, eps, sh);
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
attention_decode_bf16(const float* q, const unsigned short* k, const unsigned short* v, const long long* qpos,
                      const long long* kpos, IMMUTABLE const float* lambda, IMMUTABLE const float* subln,
                      float* partial_acc, float* partial_m, float* partial_l, int* splits_done, float* out, int S,
                      int H, int H_kv, int head_dim, long long kv_head_stride, int window, int n_splits,
                      float lambda_init, float eps) {
    __shared__ DecodeShared<unsigned short> sh;
    attention_decode(q, k, v, qpos, kpos, lambda, subln, partial_acc, partial_m, partial_l, splits_done, out, S, H,
                     H_kv, head_dim, kv_head_stride, window, n_splits, lambda_init, eps, sh);
}

// ================================================================================================
// 6. kv_store: one decode token's K/V into a layer's cache, at a slot computed on the device. It is
//    the epilogue of the Wqkv GEMV (kernel 7, gemv_*_qkv and gemv_*_qkv16): the thread that has
//    just made feature f of [k | v] stores it, so no launch of its own is needed.
//
//   slot = pos % W for a sliding layer (the W-slot ring), pos for the append buffer (window = 0);
//   k_cache[h, slot, d] = k[h·hd + d], v_cache likewise, kpos[slot] = pos.
//   k_cache, v_cache (H_kv, slots, hd) float32, or bf16 bits rounded to nearest even exactly as
//   phi4flash.py's f32_to_bf16 (a NaN stays a NaN), so GPU and CPU store the same bits; kpos
//   (slots,); pos (1,). The host grows the append buffer before each step, so a slot past the end
//   means a bug: nothing is stored, *error = KV_SLOT_PAST_END, and the host says so after the step.
// Traffic: 4 or 2 bytes per stored number: (8 or 4) · H_kv · hd per layer and step.
#define KV_SLOT_PAST_END 1

__device__ __forceinline__ unsigned short f32_to_bf16(float v) {
    const unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);   // NaN: quiet, never inf
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);   // + half an ulp, ties to the even one
}

__device__ __forceinline__ void store_kv(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_kv(unsigned short* p, float v) { *p = f32_to_bf16(v); }

// Feature f (0 <= f < 2·kv_features) of [k | v], value v, into its cache.
template <typename KV>
__device__ __forceinline__ void kv_store(float v, int f, KV* k_cache, KV* v_cache, long long* kpos,
                                         const long long* pos, int* error, int kv_features, int head_dim, int slots,
                                         int window) {
    const long long p = pos[0];
    const long long slot = window ? p % window : p;
    if (slot >= slots) {
        *error = KV_SLOT_PAST_END;                           // every storing thread writes the same value
        return;
    }
    const int e = f % kv_features, h = e / head_dim, d = e % head_dim;
    store_kv((f < kv_features ? k_cache : v_cache) + ((long long)h * slots + slot) * head_dim + d, v);
    if (f == 0) kpos[slot] = p;
}

// ================================================================================================
// 7. The GEMVs: y = epilogue(x · Wᵀ) for a few rows of x (decode), fp32 sums. W comes in three
//    formats, one instance each: bf16 bits (gemv_bf16*: widened exactly, bits << 16), float32
//    (gemv_f32*), and int8 groups (gemv_int8*: w = q · s, one fp32 scale per GROUP = 32 weights of a
//    row, phi4flash.py section 11; the instance takes q as W and the scales (out, in / GROUP)).
//
//   acc[t, o] = Σ_k x[t, k] · W[o, k]
//   gemv_bf16, gemv_f32, gemv_int8 (rows <= GEMV_MAX_ROWS), the epilogue `mode`:
//     mode 0 (GEMV_PLAIN):    y[t, o] = acc + bias[o]                   (no bias unless has_bias)
//     mode 1 (GEMV_RESIDUAL): y[t, o] = aux[t, o] + (acc + bias[o])     (aux: the residual stream; y may be aux)
//     mode 2 (GEMV_SWIGLU):   y[t, o] = silu(acc[t, o]) · acc[t, o + out_features]   (W = [gate; up], 2·out rows)
//     mode 3 (GEMV_GATE):     y[t, o] = silu(acc) · aux[t, o]           (the GMU: aux = the memory m)
//   The decode step's fused instances (one row; each saves the launch that followed the GEMV):
//     _qkv, _qkv16: y = acc + bias = [q | k | v] of a "swa" or "full" layer (q_features = H·hd), and
//                   feature f of [k | v] also goes into the layer's cache (kv_store, section 6):
//                   float32 K/V (_qkv) or bf16 bits (_qkv16).
//     _conv:        W = in_proj = [x; z] (out_features = 2·d_inner): y[c] = conv_step(acc[c]) for
//                   c < d_inner (Mamba's conv + SiLU of the new raw x[c], conv_state[:, c] shifted;
//                   section 1b), y[c] = acc[c] above (z). So y = [x̂ | z].
//     _norm:        hidden[o] = hidden[o] + (acc + bias[o]) (out_proj, fc2: the residual stream, in
//                   place), then normed = LayerNorm(hidden) with the NEXT LayerNorm's weight and bias,
//                   by whichever block finishes last: each block, once its outputs are written and
//                   fenced (__threadfence), adds 1 to *counter; the one that sees gridDim.x − 1 runs
//                   layer_norm_row (section 8: the code and thread layout of layer_norm_rows, so the
//                   same bits) over the whole row and sets *counter back to 0 for the next launch (a
//                   CUDA graph replays the same one). The block must be NORM_THREADS threads.
//   x (rows, in_features); W (out_features or 2·out_features, in_features); bias, aux, y as above.
// Mapping: 8 warps per block; `splits` (1, 2, 4 or 8) consecutive warps share one output feature
//   (split-K), so a small output (x_proj's 192 rows, out_proj, fc2) still gives every SM work:
//   grid ceil(out_features / (8 / splits)). Warp part p of output o reads the vector groups
//   j = lane + 32·(p + splits·i), i = 0, 1, ..., of W's row: 8 weights per lane for bf16 (one 16-byte
//   load) and fp32 (two), 16 for int8 (one 16-byte load, and the group's fp32 scale, which the two
//   lanes of a group share). GEMV_UNROLL groups are loaded before any is used (2 KB per warp in
//   flight for bf16 and int8); they are widened and multiplied by the matching x columns for every
//   row of x at once (x is small and comes from L1/L2): each weight is read once per call. One row (a
//   decode step) has its own instance, without the per-row predicates of up to GEMV_MAX_ROWS rows.
//   When in_features is not a multiple of the vector group, or W or x is not 16-byte aligned, lanes take
//   single columns lane + 32·(p + splits·i) instead. Lane sums meet in a butterfly, the splits of an
//   output in shared memory; then lane 0 of the output's first warp runs the epilogue.
//   int8 → float without a conversion instruction: int-to-float (I2F) issues at a fraction of the
//   FP32 rate (the CUDA programming guide's throughput table), and this GEMV needs one per byte it
//   reads. So each byte, sign-flipped (q ^ 0x80 = q + 128, in 0..255), becomes the low mantissa bits of
//   2^23 (0x4B000000 | byte is the float 2^23 + byte, exactly), and 2^23 + 128 is subtracted: an
//   integer OR and an FP32 add, exact. A lane's 16 products are summed, then scaled once: (Σ x·q)·s.
// Traffic: the weights once (2, 4 or 1.125 · out · in bytes, twice that for SwiGLU's two rows): the
//   decode roofline; plus 4 · rows · out written (and read, for aux); x re-reads hit the caches.
//   _qkv: + (4 or 2) · (out − q_features) for the cache; _conv: + 4 · d_inner · (3·d_conv − 1) for
//   conv_state (read and written), the conv weights and bias; _norm: + 20 · out (hidden read for the
//   residual and again by the last block, the norm's weight and bias, normed written).
#define GEMV_WARPS 8
#define GEMV_MAX_ROWS 8
#define GEMV_UNROLL 4          // vector groups in flight per lane: 64 bytes of bf16 or int8, 128 of fp32
#define GEMV_UNROLL_ROWS 2     // the same for up to GEMV_MAX_ROWS rows (their sums take the registers)
#define GEMV_PLAIN 0
#define GEMV_RESIDUAL 1
#define GEMV_SWIGLU 2
#define GEMV_GATE 3
#define GROUP 32               // int8 weights per fp32 scale, along a row

// 16 bytes of weights that are only read: not kept in L1, and L2 fetches the whole 256-byte line.
__device__ __forceinline__ uint4 load16(const void* p) {
    uint4 v;
#ifdef __CUDA_ARCH__  // read-only, not kept in L1, and L2 fetches the whole 256-byte line: +4% (notes/gpu.md)
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#else                 // the same load where kernels.cu runs on the CPU (tests/cuda_cpu)
    v = __ldg(reinterpret_cast<const uint4*>(p));
#endif
    return v;
}

// The L2 prefetch of a GEMV's prologue (before its pdl_wait: weights only), when the rows are 16-byte
// aligned (a bulk prefetch needs it). PDL_PREFETCH=0 (phi4flash.py compiles kernels.cu with it when
// PHI4FLASH_PDL_PREFETCH=0) leaves it out, to measure what it buys.
#ifndef PDL_PREFETCH
#define PDL_PREFETCH 1
#endif
__device__ __forceinline__ void prefetch_rows(const void* p, unsigned int bytes) {
#if PDL_PREFETCH
    if ((unsigned long long)p % 16 == 0) prefetch_l2(p, bytes);
#endif
}

// The three weight formats. Each reads VEC consecutive weights of a row at element index i (row ·
// in_features + column) into Raw, and multiplies them by the VEC matching floats of x (dot); load1
// reads one weight, for the unaligned path; prefetch asks L2 for n whole rows from row `first`.
struct Bf16Weights {
    static constexpr int VEC = 8;
    struct Raw { uint4 a; };
    const unsigned short* w;
    __device__ bool aligned() const { return ((unsigned long long)w % 16) == 0; }
    __device__ void load(long long i, Raw& r) const { r.a = load16(w + i); }
    __device__ float load1(long long i) const { return bf16_bits_to_float(w[i]); }
    __device__ void prefetch(long long first, int n, int in_features) const {
        prefetch_rows(w + first * in_features, 2u * n * in_features);
    }
    __device__ static float dot(const float* x, const Raw& r) {
        float4 a = reinterpret_cast<const float4*>(x)[0], b = reinterpret_cast<const float4*>(x)[1];
        return a.x * bf16_bits_to_float(r.a.x & 0xffffu) + a.y * bf16_bits_to_float(r.a.x >> 16) +
               a.z * bf16_bits_to_float(r.a.y & 0xffffu) + a.w * bf16_bits_to_float(r.a.y >> 16) +
               b.x * bf16_bits_to_float(r.a.z & 0xffffu) + b.y * bf16_bits_to_float(r.a.z >> 16) +
               b.z * bf16_bits_to_float(r.a.w & 0xffffu) + b.w * bf16_bits_to_float(r.a.w >> 16);
    }
};

struct F32Weights {
    static constexpr int VEC = 8;
    struct Raw { float4 a, b; };
    const float* w;
    __device__ bool aligned() const { return ((unsigned long long)w % 16) == 0; }
    __device__ void load(long long i, Raw& r) const {
        r.a = __ldg(reinterpret_cast<const float4*>(w + i));
        r.b = __ldg(reinterpret_cast<const float4*>(w + i) + 1);
    }
    __device__ float load1(long long i) const { return w[i]; }
    __device__ void prefetch(long long first, int n, int in_features) const {
        prefetch_rows(w + first * in_features, 4u * n * in_features);
    }
    __device__ static float dot(const float* x, const Raw& r) {
        float4 a = reinterpret_cast<const float4*>(x)[0], b = reinterpret_cast<const float4*>(x)[1];
        return a.x * r.a.x + a.y * r.a.y + a.z * r.a.z + a.w * r.a.w + b.x * r.b.x + b.y * r.b.y + b.z * r.b.z +
               b.w * r.b.w;
    }
};

// Byte k of a sign-flipped word of four int8 numbers, as the exact float q (see the header above):
// (2^23 + q + 128) − (2^23 + 128).
__device__ __forceinline__ float int8_at(unsigned int flipped, int k) {
    return __uint_as_float(0x4B000000u | ((flipped >> (8 * k)) & 0xffu)) - 8388736.0f;
}

__device__ __forceinline__ float int8_dot4(float4 x, unsigned int q) {
    const unsigned int u = q ^ 0x80808080u;
    return x.x * int8_at(u, 0) + x.y * int8_at(u, 1) + x.z * int8_at(u, 2) + x.w * int8_at(u, 3);
}

struct Int8Weights {
    static constexpr int VEC = 16;
    struct Raw { uint4 q; float s; };
    const signed char* q;
    const float* scales;       // (out, in_features / GROUP): in_features is a multiple of GROUP
    __device__ bool aligned() const { return ((unsigned long long)q % 16) == 0; }
    __device__ void load(long long i, Raw& r) const {
        r.q = load16(q + i);
        r.s = __ldg(scales + i / GROUP);
    }
    __device__ float load1(long long i) const {
        return int8_at((unsigned char)q[i] ^ 0x80u, 0) * scales[i / GROUP];
    }
    __device__ void prefetch(long long first, int n, int in_features) const {
        prefetch_rows(q + first * in_features, 1u * n * in_features);
        prefetch_rows(scales + first * (in_features / GROUP), 4u * n * (in_features / GROUP));
    }
    __device__ static float dot(const float* x, const Raw& r) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        return (int8_dot4(x4[0], r.q.x) + int8_dot4(x4[1], r.q.y) + int8_dot4(x4[2], r.q.z) +
                int8_dot4(x4[3], r.q.w)) * r.s;
    }
};

// Every GEMV kernel starts here (kernels.cu's PDL rules): its prologue asks L2 for the block's rows of
// W (n_w = 2 for SwiGLU's gate and up rows), which nothing writes; then it waits for the step's
// previous kernel, after which it may read x and the rest.
template <typename F>
__device__ __noinline__ void gemv_prefetch(const F W, int out_features, int in_features, int n_w, int splits) {
    const int first = blockIdx.x * (GEMV_WARPS / splits), n = min(GEMV_WARPS / splits, out_features - first);
    for (int r = 0; r < n_w && n > 0; r++) W.prefetch(first + (long long)r * out_features, n, in_features);
}

template <typename F>
__device__ __forceinline__ void gemv_prologue(const F& W, int out_features, int in_features, int n_w, int splits) {
    if (threadIdx.x == 0) gemv_prefetch(W, out_features, in_features, n_w, splits);  // (out of line: no registers
    pdl_wait();                                                                      // kept from the body)
}

// The output feature of this thread's warp, and whether this thread writes it (lane 0 of its first warp).
__device__ __forceinline__ int gemv_output(int splits) {
    return blockIdx.x * (GEMV_WARPS / splits) + threadIdx.x / WARP / splits;
}

__device__ __forceinline__ bool gemv_writer(int o, int out_features, int splits) {
    return o < out_features && threadIdx.x / WARP % splits == 0 && threadIdx.x % WARP == 0;
}

// The sums of output gemv_output(splits), rows t < rows, weight rows r < n_w (SwiGLU: the gate row o
// and the up row o + out_features), complete in the writer thread. Every thread must call it.
// ROWS: the most rows of x this instance handles (rows <= ROWS), UNROLL: groups in flight per lane.
template <typename F, int ROWS, int UNROLL>
__device__ __forceinline__ void gemv_sums(const F& W, const float* x, int rows, int out_features, int in_features,
                                          int n_w, int splits, float (*s_part)[GEMV_MAX_ROWS][2],
                                          float (&sum)[2][ROWS]) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int o = gemv_output(splits), part = warp % splits;
    const bool live = o < out_features;                      // a whole warp is live or not: no divergence
#pragma unroll
    for (int r = 0; r < 2; r++)
#pragma unroll
        for (int t = 0; t < ROWS; t++) sum[r][t] = 0.0f;
    const bool vector_path = in_features % F::VEC == 0 && W.aligned() && ((unsigned long long)x % 16) == 0;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (r >= n_w || !live) break;
        const long long row = (long long)(o + r * out_features) * in_features;
        if (vector_path) {
            const int step = F::VEC * WARP * splits;         // columns between a lane's groups
            for (int col = F::VEC * (lane + WARP * part); col < in_features; col += UNROLL * step) {
                typename F::Raw w[UNROLL];
#pragma unroll
                for (int u = 0; u < UNROLL; u++)        // every load issued before any FMA
                    if (col + u * step < in_features) W.load(row + col + u * step, w[u]);
#pragma unroll
                for (int u = 0; u < UNROLL; u++)
                    if (col + u * step < in_features) {
#pragma unroll
                        for (int t = 0; t < ROWS; t++)
                            if (t < rows) sum[r][t] += F::dot(x + (long long)t * in_features + col + u * step, w[u]);
                    }
            }
        } else {
            for (int col = lane + WARP * part; col < in_features; col += WARP * splits) {
                float w = W.load1(row + col);
#pragma unroll
                for (int t = 0; t < ROWS; t++)
                    if (t < rows) sum[r][t] += x[(long long)t * in_features + col] * w;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++)
#pragma unroll
        for (int t = 0; t < ROWS; t++)
            if (r < n_w && t < rows) {
                sum[r][t] = group_sum(sum[r][t], WARP);       // every lane of the warp calls it
                if (splits > 1 && lane == 0) s_part[warp][t][r] = sum[r][t];
            }
    if (splits > 1) {
        __syncthreads();                                     // no thread has returned: all reach it
        if (part == 0) {
#pragma unroll
            for (int r = 0; r < 2; r++)
#pragma unroll
                for (int t = 0; t < ROWS; t++)               // constant indices keep sum[][] in registers
                    if (r < n_w && t < rows) {
                        float total = 0.0f;
                        for (int p = 0; p < splits; p++) total += s_part[warp + p][t][r];
                        sum[r][t] = total;
                    }
        }
    }
}

template <typename F, int ROWS, int UNROLL>
__device__ __forceinline__ void gemv_rows(const F& W, const float* x, const float* bias, const float* aux, float* y,
                                          int rows, int out_features, int in_features, int mode, int has_bias,
                                          int splits, float (*s_part)[GEMV_MAX_ROWS][2]) {
    float sum[2][ROWS];
    gemv_sums<F, ROWS, UNROLL>(W, x, rows, out_features, in_features, mode == GEMV_SWIGLU ? 2 : 1, splits, s_part,
                               sum);
    const int o = gemv_output(splits);
    if (!gemv_writer(o, out_features, splits)) return;
#pragma unroll
    for (int t = 0; t < ROWS; t++) {
        if (t >= rows) break;
        long long i = (long long)t * out_features + o;
        float acc = sum[0][t], v;
        if (mode == GEMV_SWIGLU) v = silu(acc) * sum[1][t];
        else if (mode == GEMV_GATE) v = silu(acc) * aux[i];
        else {
            v = has_bias ? acc + bias[o] : acc;
            if (mode == GEMV_RESIDUAL) v = aux[i] + v;
        }
        y[i] = v;
    }
}

template <typename F>
__device__ __forceinline__ void gemv(const F& W, const float* x, const float* bias, const float* aux, float* y,
                                     int rows, int out_features, int in_features, int mode, int has_bias, int splits,
                                     float (*s_part)[GEMV_MAX_ROWS][2]) {
    gemv_prologue(W, out_features, in_features, mode == GEMV_SWIGLU ? 2 : 1, splits);
    if (rows == 1)  // a decode step: one row, no per-row predicates (they cost a quarter of its speed)
        gemv_rows<F, 1, GEMV_UNROLL>(W, x, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits,
                                     s_part);
    else
        gemv_rows<F, GEMV_MAX_ROWS, GEMV_UNROLL_ROWS>(W, x, bias, aux, y, rows, out_features, in_features, mode,
                                                      has_bias, splits, s_part);
}

template <typename F, typename KV>
__device__ __forceinline__ void gemv_qkv(const F& W, const float* x, const float* bias, float* y, KV* k_cache,
                                         KV* v_cache, long long* kpos, const long long* pos, int* error,
                                         int out_features, int in_features, int splits, int q_features, int head_dim,
                                         int slots, int window, float (*s_part)[GEMV_MAX_ROWS][2]) {
    gemv_prologue(W, out_features, in_features, 1, splits);
    float sum[2][1];
    gemv_sums<F, 1, GEMV_UNROLL>(W, x, 1, out_features, in_features, 1, splits, s_part, sum);
    const int o = gemv_output(splits);
    if (!gemv_writer(o, out_features, splits)) return;
    const float v = sum[0][0] + bias[o];
    y[o] = v;
    if (o >= q_features)
        kv_store(v, o - q_features, k_cache, v_cache, kpos, pos, error, (out_features - q_features) / 2, head_dim,
                 slots, window);
}

template <typename F>
__device__ __forceinline__ void gemv_conv(const F& W, const float* x, float* y, float* conv_state,
                                          const float* conv_weight, const float* conv_bias, int out_features,
                                          int in_features, int splits, int d_conv, float (*s_part)[GEMV_MAX_ROWS][2]) {
    gemv_prologue(W, out_features, in_features, 1, splits);
    float sum[2][1];
    gemv_sums<F, 1, GEMV_UNROLL>(W, x, 1, out_features, in_features, 1, splits, s_part, sum);
    const int o = gemv_output(splits), d_inner = out_features / 2;
    if (!gemv_writer(o, out_features, splits)) return;
    y[o] = o < d_inner ? conv_step(sum[0][0], conv_state, conv_weight, conv_bias, o, d_inner, d_conv) : sum[0][0];
}

__device__ __forceinline__ void layer_norm_row(const float* x, const float* weight, const float* bias, float* y, int D,
                                               float eps, float* s_warp);   // section 8

template <typename F>
__device__ __forceinline__ void gemv_norm(const F& W, const float* x, const float* bias, float* hidden,
                                          const float* norm_weight, const float* norm_bias, float* normed,
                                          int* counter, int out_features, int in_features, int has_bias, int splits,
                                          float eps, float (*s_part)[GEMV_MAX_ROWS][2], float* s_warp, int* s_last) {
    gemv_prologue(W, out_features, in_features, 1, splits);
    float sum[2][1];
    gemv_sums<F, 1, GEMV_UNROLL>(W, x, 1, out_features, in_features, 1, splits, s_part, sum);
    const int o = gemv_output(splits);
    if (gemv_writer(o, out_features, splits)) {
        hidden[o] = hidden[o] + (has_bias ? sum[0][0] + bias[o] : sum[0][0]);
        __threadfence();                                     // visible to every block before this one counts
    }
    __syncthreads();
    if (threadIdx.x == 0) *s_last = atomicAdd(counter, 1) == (int)gridDim.x - 1;
    __syncthreads();
    if (!*s_last) return;                                    // the whole block, or none of it
    __threadfence();                                         // every other block's hidden[] before the reads below
    layer_norm_row(hidden, norm_weight, norm_bias, normed, out_features, eps, s_warp);
    if (threadIdx.x == 0) *counter = 0;                      // for the next launch
}

// The instances: one per weight format and epilogue. bf16 and int8 keep 4 blocks per SM (at most 64
// registers); fp32 takes 2 (up to 128: ptxas spills its 8-wide loads when it keeps 64).
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 4)
gemv_bf16(const float* x, IMMUTABLE const unsigned short* W, IMMUTABLE const float* bias, const float* aux, float* y,
          int rows, int out_features, int in_features, int mode, int has_bias, int splits) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv(Bf16Weights{W}, x, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits, s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 2)
gemv_f32(const float* x, IMMUTABLE const float* W, IMMUTABLE const float* bias, const float* aux, float* y, int rows,
         int out_features, int in_features, int mode, int has_bias, int splits) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv(F32Weights{W}, x, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits, s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 4)
gemv_int8(const float* x, IMMUTABLE const signed char* W, IMMUTABLE const float* scales, IMMUTABLE const float* bias,
          const float* aux, float* y, int rows, int out_features, int in_features, int mode, int has_bias,
          int splits) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv(Int8Weights{W, scales}, x, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits, s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 4)
gemv_bf16_qkv(const float* x, IMMUTABLE const unsigned short* W, IMMUTABLE const float* bias, float* y,
              float* k_cache, float* v_cache, long long* kpos, const long long* pos, int* error, int out_features,
              int in_features, int splits, int q_features, int head_dim, int slots, int window) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv_qkv(Bf16Weights{W}, x, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits,
             q_features, head_dim, slots, window, s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 2)
gemv_f32_qkv(const float* x, IMMUTABLE const float* W, IMMUTABLE const float* bias, float* y, float* k_cache,
             float* v_cache, long long* kpos, const long long* pos, int* error, int out_features, int in_features,
             int splits, int q_features, int head_dim, int slots, int window) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv_qkv(F32Weights{W}, x, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits,
             q_features, head_dim, slots, window, s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 4)
gemv_int8_qkv(const float* x, IMMUTABLE const signed char* W, IMMUTABLE const float* scales,
              IMMUTABLE const float* bias, float* y, float* k_cache, float* v_cache, long long* kpos,
              const long long* pos, int* error, int out_features, int in_features, int splits, int q_features,
              int head_dim, int slots, int window) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv_qkv(Int8Weights{W, scales}, x, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features,
             splits, q_features, head_dim, slots, window, s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 4)
gemv_bf16_qkv16(const float* x, IMMUTABLE const unsigned short* W, IMMUTABLE const float* bias, float* y,
                unsigned short* k_cache, unsigned short* v_cache, long long* kpos, const long long* pos, int* error,
                int out_features, int in_features, int splits, int q_features, int head_dim, int slots, int window) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv_qkv(Bf16Weights{W}, x, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits,
             q_features, head_dim, slots, window, s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 2)
gemv_f32_qkv16(const float* x, IMMUTABLE const float* W, IMMUTABLE const float* bias, float* y, unsigned short* k_cache,
               unsigned short* v_cache, long long* kpos, const long long* pos, int* error, int out_features,
               int in_features, int splits, int q_features, int head_dim, int slots, int window) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv_qkv(F32Weights{W}, x, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits,
             q_features, head_dim, slots, window, s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 4)
gemv_int8_qkv16(const float* x, IMMUTABLE const signed char* W, IMMUTABLE const float* scales,
                IMMUTABLE const float* bias, float* y, unsigned short* k_cache, unsigned short* v_cache,
                long long* kpos, const long long* pos, int* error, int out_features, int in_features, int splits,
                int q_features, int head_dim, int slots, int window) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv_qkv(Int8Weights{W, scales}, x, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features,
             splits, q_features, head_dim, slots, window, s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 4)
gemv_bf16_conv(const float* x, IMMUTABLE const unsigned short* W, float* y, float* conv_state,
               IMMUTABLE const float* conv_weight, IMMUTABLE const float* conv_bias, int out_features,
               int in_features, int splits, int d_conv) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv_conv(Bf16Weights{W}, x, y, conv_state, conv_weight, conv_bias, out_features, in_features, splits, d_conv,
              s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 2)
gemv_f32_conv(const float* x, IMMUTABLE const float* W, float* y, float* conv_state, IMMUTABLE const float* conv_weight,
              IMMUTABLE const float* conv_bias, int out_features, int in_features, int splits, int d_conv) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv_conv(F32Weights{W}, x, y, conv_state, conv_weight, conv_bias, out_features, in_features, splits, d_conv,
              s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 4)
gemv_int8_conv(const float* x, IMMUTABLE const signed char* W, IMMUTABLE const float* scales, float* y,
               float* conv_state, IMMUTABLE const float* conv_weight, IMMUTABLE const float* conv_bias,
               int out_features, int in_features, int splits, int d_conv) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv_conv(Int8Weights{W, scales}, x, y, conv_state, conv_weight, conv_bias, out_features, in_features, splits,
              d_conv, s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 4)
gemv_bf16_norm(const float* x, IMMUTABLE const unsigned short* W, IMMUTABLE const float* bias, float* hidden,
               IMMUTABLE const float* norm_weight, IMMUTABLE const float* norm_bias, float* normed, int* counter,
               int out_features, int in_features, int has_bias, int splits, float eps) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    __shared__ float s_warp[GEMV_WARPS];
    __shared__ int s_last;
    gemv_norm(Bf16Weights{W}, x, bias, hidden, norm_weight, norm_bias, normed, counter, out_features, in_features,
              has_bias, splits, eps, s_part, s_warp, &s_last);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 2)
gemv_f32_norm(const float* x, IMMUTABLE const float* W, IMMUTABLE const float* bias, float* hidden,
              IMMUTABLE const float* norm_weight, IMMUTABLE const float* norm_bias, float* normed, int* counter,
              int out_features, int in_features, int has_bias, int splits, float eps) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    __shared__ float s_warp[GEMV_WARPS];
    __shared__ int s_last;
    gemv_norm(F32Weights{W}, x, bias, hidden, norm_weight, norm_bias, normed, counter, out_features, in_features,
              has_bias, splits, eps, s_part, s_warp, &s_last);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 4)
gemv_int8_norm(const float* x, IMMUTABLE const signed char* W, IMMUTABLE const float* scales,
               IMMUTABLE const float* bias, float* hidden, IMMUTABLE const float* norm_weight,
               IMMUTABLE const float* norm_bias, float* normed, int* counter, int out_features, int in_features,
               int has_bias, int splits, float eps) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    __shared__ float s_warp[GEMV_WARPS];
    __shared__ int s_last;
    gemv_norm(Int8Weights{W, scales}, x, bias, hidden, norm_weight, norm_bias, normed, counter, out_features,
              in_features, has_bias, splits, eps, s_part, s_warp, &s_last);
}

// ================================================================================================
// 8. layer_norm_rows: y = (x − mean) / sqrt(biased var + eps) ⊙ weight + bias, per row.
//
//   x, y (rows, D); weight, bias (D,). y may not be x.
// Mapping: one block of NORM_THREADS per row (grid rows); thread tid holds features tid, tid + 256, ...
//   (at most NORM_PER_THREAD of them: D <= 4096) of x in registers, all loaded at once (one trip to
//   memory); the mean, then the variance about it, are block sums (warp shuffles, one shared slot per
//   warp, every thread adds the slots); weight and bias are read as y is written. layer_norm_row is
//   one row; kernel 7's _norm instances run it too, in the block that finishes last. x is read
//   through L2 (ld.global.cg): there other blocks wrote it during the launch, and L1 is not coherent.
// Traffic: x read and y written once, 8 · rows · D bytes, and weight and bias, 8 · D bytes.
#define NORM_THREADS 256
#define NORM_PER_THREAD 16
static_assert(NORM_THREADS == GEMV_WARPS * WARP, "kernel 7's _norm instances run layer_norm_row with their block");

__device__ __forceinline__ void layer_norm_row(const float* x, const float* weight, const float* bias, float* y, int D,
                                               float eps, float* s_warp) {
    float xv[NORM_PER_THREAD];
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
        const int i = (int)threadIdx.x + j * NORM_THREADS;
        xv[j] = i < D ? __ldcg(x + i) : 0.0f;
    }
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) s += xv[j];
    const float mean = block_sum(s, s_warp) / D;
    float v = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++)
        if ((int)threadIdx.x + j * NORM_THREADS < D) v += (xv[j] - mean) * (xv[j] - mean);
    const float sd = sqrtf(block_sum(v, s_warp) / D + eps);
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
        const int i = (int)threadIdx.x + j * NORM_THREADS;
        if (i < D) y[i] = (xv[j] - mean) / sd * weight[i] + bias[i];
    }
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
layer_norm_rows(const float* x, IMMUTABLE const float* weight, IMMUTABLE const float* bias, float* y, int D,
                float eps) {
    __shared__ float s_warp[NORM_THREADS / WARP];
    pdl_wait();                                              // a decode-step kernel: x is the embedding just written
    layer_norm_row(x + (long long)blockIdx.x * D, weight, bias, y + (long long)blockIdx.x * D, D, eps, s_warp);
}

// ================================================================================================
// 9. embed_bf16 / embed_f32 / embed_int8: the decode step's first op, y = E[token[0]] as float32.
//
//   E (V, D) bf16 bits, float32, or int8 with scales (V, D / GROUP) (dequantised: q · s, as the CPU
//   path's Int8Weight rows); token (1,) int64 on the device (a CUDA graph replays the step with a new
//   id written there) -> y (D,).
// Mapping: one thread per feature, grid ceil(D / 256), block 256. Traffic: (2, 4 or 1.125) · D + 4 · D bytes.
extern "C" __global__ void embed_bf16(const unsigned short* E, const long long* token, float* y, int D) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < D) y[i] = bf16_bits_to_float(E[token[0] * D + i]);
}

extern "C" __global__ void embed_f32(const float* E, const long long* token, float* y, int D) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < D) y[i] = E[token[0] * D + i];
}

extern "C" __global__ void embed_int8(const signed char* E, const float* scales, const long long* token, float* y,
                                      int D) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < D) {
        long long e = token[0] * D + i;
        y[i] = (float)E[e] * scales[e / GROUP];
    }
}
