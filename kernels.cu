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
//     and are widened exactly (bits << 16) right before use. No fp16 anywhere.
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
// Traffic: 4 * d_inner * (2 * d_conv + 2) bytes, a few hundred KB for the real model.
#define MAX_D_CONV 8
extern "C" __global__ void conv1d_silu_step(const float* x, float* conv_state, const float* weight,
                                            const float* bias, float* out, int d_inner, int d_conv) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d_inner) return;
    float window[MAX_D_CONV];
#pragma unroll
    for (int k = 0; k < MAX_D_CONV; k++)                     // constant indices keep `window` in registers
        if (k < d_conv) window[k] = k < d_conv - 1 ? conv_state[k * d_inner + c] : x[c];
    float acc = bias[c];
#pragma unroll
    for (int k = 0; k < MAX_D_CONV; k++)
        if (k < d_conv) acc += weight[c * d_conv + k] * window[k];
    out[c] = silu(acc);
#pragma unroll
    for (int k = 0; k < MAX_D_CONV - 1; k++)
        if (k < d_conv - 1) conv_state[k * d_inner + c] = window[k + 1];
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
extern "C" __global__ void scan_step(const float* x, const float* xdbc, const float* dt_proj, const float* dt_bias,
                                     const float* A_log, const float* D, const float* z, float* ssm_state,
                                     float* y, float* y_gated, int d_inner, int d_state, int dt_rank) {
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

__device__ __forceinline__ void store4(float* dst, float4 v) {   // to shared rows that are not 16-byte aligned
    dst[0] = v.x, dst[1] = v.y, dst[2] = v.z, dst[3] = v.w;
}

__device__ __forceinline__ bool key_visible(long long key_pos, long long query_pos, int window) {
    return key_pos >= 0 && key_pos <= query_pos && (window == 0 || key_pos > query_pos - window);
}

// ------------------------------------------------------------------------------------------------
// 4. attention_prefill: tiled differential attention with an online softmax (flash-style).
//
//   q (H, T, hd); k, v (H_kv, S, hd) with head stride kv_head_stride elements (so a prefix view of
//   the shared buffer needs no copy); qpos (T,); kpos (S,) ascending (keys in time order);
//   lambda (1,) on the device; subln (2·hd,) -> out (T, H·hd)
// Mapping: grid (ceil(T / BQ), H_kv / 2), block 256. A block holds PREFILL_VECTORS = 64 query
//   vectors: BQ = 64 / (2G) consecutive query rows × the group's 2G heads, vector v = s·32 + row·G + r.
//   Thread 0 binary-searches kpos once for the keys the block's rows can see ([lo, hi), as attend
//   slices them), then the block walks them in tiles of PREFILL_KEYS = 16:
//     load K (both stripes) and V of the tile into shared memory;
//     scores for 64 vectors × 16 keys (4 per thread), masked per (query, key) by position;
//     threads 0..63 each run the online-softmax update of one vector: m' = max(m, tile max),
//       p = exp(score − m'), l = l·exp(m − m') + Σp, and publish the rescale factor exp(m − m');
//     thread (f = tid mod 2hd) accumulates feature f of vectors tid / 2hd + k·(256 / 2hd):
//       acc = acc·rescale + Σ p·V[:, f], the accumulators in registers (hd/2 of them, <= 32).
//   A thread holding a stripe-1 vector also holds its stripe-2 twin (32 vectors later), so the
//   difference A1 − λ A2 is formed in registers; the RMS over 2hd features is a warp reduction.
//   Requires hd a power of two in [4, 64] and 2G dividing 64.
// Traffic: q read once and out written once (8 · T · H · hd bytes); each block reads the K/V rows
//   its rows can see, BQ + W − 1 keys for a window (from L2 when neighbouring blocks share them):
//   about 16 · hd · (BQ + W) · (T / BQ) · H_kv / 2 bytes.
#define PREFILL_THREADS 256
#define PREFILL_VECTORS 64
#define PREFILL_KEYS 16
#define MAX_HEAD_DIM 64
extern "C" __global__ void __launch_bounds__(PREFILL_THREADS)
attention_prefill(const float* q, const float* k, const float* v, const long long* qpos, const long long* kpos,
                  const float* lambda, const float* subln, float* out, int T, int S, int H, int H_kv, int head_dim,
                  long long kv_head_stride, int window, float lambda_init, float eps) {
    __shared__ float s_q[PREFILL_VECTORS][MAX_HEAD_DIM];     // reused for the differences at the end
    __shared__ float s_k[2][PREFILL_KEYS][MAX_HEAD_DIM + 1];  // +1: the 16 keys of a score row hit 16 banks
    __shared__ float s_v[PREFILL_KEYS][2 * MAX_HEAD_DIM];
    __shared__ float s_p[PREFILL_VECTORS][PREFILL_KEYS + 1];
    __shared__ float s_rescale[PREFILL_VECTORS];
    __shared__ float s_l[PREFILL_VECTORS];
    __shared__ float s_inv_rms[PREFILL_VECTORS / 2];
    __shared__ long long s_kpos[PREFILL_KEYS];
    __shared__ long long s_qpos[PREFILL_VECTORS];
    __shared__ int s_range[2];

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
        s_q[vec][d] = t < T ? q[((long long)head * T + t) * hd + d] : 0.0f;
    }
    if (tid < rows) s_qpos[tid] = t0 + tid < T ? qpos[t0 + tid] : -1;
    if (tid == 0) {                                          // keys [lo, hi) that rows t0.. can see
        int last = min(T, t0 + rows) - 1;
        long long first_needed = window ? qpos[t0] - window + 1 : -1;
        int lo = 0, hi = S;
        while (lo < hi) { int mid = (lo + hi) / 2; if (kpos[mid] < first_needed) lo = mid + 1; else hi = mid; }
        s_range[0] = window ? lo : 0;
        lo = s_range[0]; hi = S;
        while (lo < hi) { int mid = (lo + hi) / 2; if (kpos[mid] <= qpos[last]) lo = mid + 1; else hi = mid; }
        s_range[1] = lo;
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

    for (int k0 = s_range[0]; k0 < s_range[1]; k0 += PREFILL_KEYS) {
        int n_keys = min(PREFILL_KEYS, s_range[1] - k0);
        for (int i = tid; i < PREFILL_KEYS * hd; i += PREFILL_THREADS) {
            int kk = i / hd, d = i % hd;
            bool ok = kk < n_keys;
            long long row = (long long)(k0 + kk) * hd + d;
            s_k[0][kk][d] = ok ? k[(2 * g) * kv_head_stride + row] : 0.0f;
            s_k[1][kk][d] = ok ? k[(2 * g + 1) * kv_head_stride + row] : 0.0f;
            s_v[kk][d] = ok ? v[(2 * g) * kv_head_stride + row] : 0.0f;
            s_v[kk][hd + d] = ok ? v[(2 * g + 1) * kv_head_stride + row] : 0.0f;
        }
        if (tid < PREFILL_KEYS) s_kpos[tid] = tid < n_keys ? kpos[k0 + tid] : -1;
        __syncthreads();
        for (int i = tid; i < PREFILL_VECTORS * PREFILL_KEYS; i += PREFILL_THREADS) {
            int vec = i / PREFILL_KEYS, kk = i % PREFILL_KEYS;
            int s = vec / 32, row = (vec % 32) / G;
            float score = neg_inf();
            if (key_visible(s_kpos[kk], s_qpos[row], window)) {
                float dot = 0.0f;
                for (int d = 0; d < hd; d++) dot += s_q[vec][d] * s_k[s][kk][d];
                score = dot * scale;
            }
            s_p[vec][kk] = score;
        }
        __syncthreads();
        if (tid < PREFILL_VECTORS) {
            float tile_max = neg_inf();
            for (int kk = 0; kk < PREFILL_KEYS; kk++) tile_max = fmaxf(tile_max, s_p[tid][kk]);
            float m_new = fmaxf(m, tile_max);
            float rescale = 1.0f, sum = 0.0f;
            if (m_new != neg_inf()) {                        // else nothing visible yet: keep acc = 0
                rescale = expf(m - m_new);                   // exp(-inf) = 0 on the first visible tile
                for (int kk = 0; kk < PREFILL_KEYS; kk++) {
                    float p = expf(s_p[tid][kk] - m_new);
                    s_p[tid][kk] = p;
                    sum += p;
                }
            } else {
                for (int kk = 0; kk < PREFILL_KEYS; kk++) s_p[tid][kk] = 0.0f;
            }
            l = l * rescale + sum;
            m = m_new;
            s_rescale[tid] = rescale;
        }
        __syncthreads();
#pragma unroll
        for (int a = 0; a < 16; a++) {
            if (a < n_pairs) {
                int vec = first_vec + a * vec_step;          // stripe 1; vec + 32 is its stripe-2 twin
                float sum1 = 0.0f, sum2 = 0.0f;
                for (int kk = 0; kk < PREFILL_KEYS; kk++) {
                    sum1 += s_p[vec][kk] * s_v[kk][f];
                    sum2 += s_p[vec + 32][kk] * s_v[kk][f];
                }
                acc[a] = acc[a] * s_rescale[vec] + sum1;
                acc[16 + a] = acc[16 + a] * s_rescale[vec + 32] + sum2;
            }
        }
        __syncthreads();                                     // the next tile overwrites s_k, s_v, s_p
    }

    if (tid < PREFILL_VECTORS) s_l[tid] = l;
    __syncthreads();
    // A1 − λ A2 for pair vector vec < 32 (stripe 1) and vec + 32 (its stripe-2 twin), into s_q.
    float (*s_diff)[2 * MAX_HEAD_DIM] = reinterpret_cast<float (*)[2 * MAX_HEAD_DIM]>(&s_q[0][0]);
    const float lam = lambda[0];
#pragma unroll
    for (int a = 0; a < 16; a++) {
        if (a < n_pairs) {
            int vec = first_vec + a * vec_step;
            float l1 = s_l[vec], l2 = s_l[vec + 32];
            float a1 = l1 > 0.0f ? acc[a] / l1 : 0.0f;
            float a2 = l2 > 0.0f ? acc[16 + a] / l2 : 0.0f;
            s_diff[vec][f] = a1 - lam * a2;
        }
    }
    __syncthreads();
    const int warp = tid / WARP, lane = tid % WARP;
    for (int pair = warp; pair < PREFILL_VECTORS / 2; pair += PREFILL_THREADS / WARP) {
        float ss = 0.0f;
        for (int ff = lane; ff < F2; ff += WARP) ss += s_diff[pair][ff] * s_diff[pair][ff];
        ss = group_sum(ss, WARP);
        if (lane == 0) s_inv_rms[pair] = 1.0f / sqrtf(ss / F2 + eps);
    }
    __syncthreads();
    for (int i = tid; i < (PREFILL_VECTORS / 2) * F2; i += PREFILL_THREADS) {
        int pair = i / F2, ff = i % F2;
        int row = pair / G, r = pair % G, t = t0 + row;
        if (t < T)
            out[(long long)t * H * hd + (g * G + r) * F2 + ff] =
                s_diff[pair][ff] * s_inv_rms[pair] * subln[ff] * (1.0f - lambda_init);
    }
}

// ------------------------------------------------------------------------------------------------
// 5a. attention_decode_split: one query token over a long K/V, the keys split across blocks.
//
//   q (H, hd) for the one token at position qpos[0] (a device scalar, so a CUDA graph can replay
//   the step); k, v (H_kv, S, hd) with head stride kv_head_stride, kpos (S,) in any order (the
//   W-slot ring of a sliding layer, or the shared buffer of layer L/2+1, -1 = empty slot)
//   -> for each split and query head: partial_m (running max of the scaled scores), partial_l
//   (sum of exp(score − m)) and partial_acc (2hd, the unnormalised exp-weighted sum of [v1 ‖ v2]).
//   Layout: partial_m, partial_l (n_splits, H); partial_acc (n_splits, H, 2hd).
// Mapping: grid (n_splits, H_kv / 2), block DECODE_THREADS. Block (split, g) takes keys
//   [split · keys_per_split, ...) (keys_per_split <= DECODE_THREADS, a multiple of DECODE_KEYS = 32):
//   thread i loads key i's position, and warp w votes whether tile w (keys 32w .. 32w + 31) has a
//   visible key, so a tile with none (empty ring slots, slots past the current length of a
//   preallocated buffer) is skipped without touching its K/V, and a buffer sized for 32K tokens
//   costs little at 2K. For a tile: load K_{2g}, K_{2g+1}, V_{2g} ‖ V_{2g+1} (float4s, all in flight
//   at once); warp w takes query heads w and w + 4 with one key per lane: the score, then the tile
//   max and Σp by warp shuffles, so each query's softmax state (m, l) lives in its warp's registers;
//   thread f < 2hd accumulates feature f for all 2G heads (registers).
//   Requires hd a power of two in [4, 64], 2G <= DECODE_MAX_QUERIES, and k, v 16-byte aligned (float4
//   loads; every CuPy allocation and every prefix view of one is).
// Traffic: every visible key's K and V rows once per KV group: 16 · hd · S_visible · H_kv / 2 bytes
//   in total (the whole layer's K/V once), plus 8 · S positions per group; partials are small.
#define DECODE_THREADS 128
#define DECODE_KEYS 32
#define DECODE_MAX_QUERIES 8
#define DECODE_TILE_VECTORS (DECODE_KEYS * MAX_HEAD_DIM / 4 / DECODE_THREADS)   // float4s per thread per K/V row set
#if DECODE_KEYS != WARP || DECODE_MAX_QUERIES != 2 * DECODE_THREADS / WARP
#error "attention_decode_split: a tile's keys are a warp's lanes, and each warp scores two queries"
#endif
extern "C" __global__ void __launch_bounds__(DECODE_THREADS)
attention_decode_split(const float* q, const float* k, const float* v, const long long* qpos, const long long* kpos,
                       float* partial_acc, float* partial_m, float* partial_l, int S, int H, int H_kv, int head_dim,
                       long long kv_head_stride, int window, int keys_per_split) {
    __shared__ float s_q[DECODE_MAX_QUERIES][MAX_HEAD_DIM];
    __shared__ float s_k[2][DECODE_KEYS][MAX_HEAD_DIM + 1];
    __shared__ float s_v[DECODE_KEYS][2 * MAX_HEAD_DIM];
    __shared__ float s_p[DECODE_MAX_QUERIES][DECODE_KEYS + 1];
    __shared__ float s_rescale[DECODE_MAX_QUERIES];
    __shared__ long long s_kpos[DECODE_THREADS];             // the split's positions, one per thread
    __shared__ int s_tile_seen[DECODE_THREADS / WARP];       // tile w has a visible key (warp w's vote)

    const int G = H / H_kv, hd = head_dim, F2 = 2 * head_dim, Q = 2 * G;
    const int split = blockIdx.x, g = blockIdx.y, tid = threadIdx.x;
    const float scale = 1.0f / sqrtf((float)hd);
    const long long query_pos = qpos[0];
    // local query qi = s·G + r is head 2(gG + r) + s
    for (int i = tid; i < Q * hd; i += DECODE_THREADS) {
        int qi = i / hd, d = i % hd, s = qi / G, r = qi % G;
        s_q[qi][d] = q[(2 * (g * G + r) + s) * hd + d];
    }
    float acc[DECODE_MAX_QUERIES];
#pragma unroll
    for (int a = 0; a < DECODE_MAX_QUERIES; a++) acc[a] = 0.0f;
    const int warp = tid / WARP, lane = tid % WARP;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};   // softmax state of queries warp, warp + 4

    // every position of the split at once, so that each tile costs one trip to memory (its K/V)
    const int begin = split * keys_per_split, end = min(S, begin + keys_per_split);
    const long long kp = begin + tid < end ? kpos[begin + tid] : -1;
    s_kpos[tid] = kp;
    const int seen = __any_sync(0xffffffffu, key_visible(kp, query_pos, window));
    if (lane == 0) s_tile_seen[warp] = seen;
    __syncthreads();
    for (int tile = 0; tile * DECODE_KEYS < end - begin; tile++) {
        if (!s_tile_seen[tile]) continue;                    // uniform: the whole block skips the tile
        const int k0 = begin + tile * DECODE_KEYS, n_keys = min(DECODE_KEYS, end - k0);
        // the tile's rows as float4s, all loads issued before the stores to shared memory
        float4 t[DECODE_TILE_VECTORS][4];
#pragma unroll
        for (int it = 0; it < DECODE_TILE_VECTORS; it++) {
            int i = tid + it * DECODE_THREADS, kk = 4 * i / hd;
            if (4 * i < DECODE_KEYS * hd && kk < n_keys) {
                long long row = (long long)(k0 + kk) * hd + 4 * i % hd;
                t[it][0] = *reinterpret_cast<const float4*>(k + (2 * g) * kv_head_stride + row);
                t[it][1] = *reinterpret_cast<const float4*>(k + (2 * g + 1) * kv_head_stride + row);
                t[it][2] = *reinterpret_cast<const float4*>(v + (2 * g) * kv_head_stride + row);
                t[it][3] = *reinterpret_cast<const float4*>(v + (2 * g + 1) * kv_head_stride + row);
            } else {
                t[it][0] = t[it][1] = t[it][2] = t[it][3] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
        }
#pragma unroll
        for (int it = 0; it < DECODE_TILE_VECTORS; it++) {
            int i = tid + it * DECODE_THREADS, kk = 4 * i / hd, d = 4 * i % hd;
            if (4 * i < DECODE_KEYS * hd) {
                store4(&s_k[0][kk][d], t[it][0]);
                store4(&s_k[1][kk][d], t[it][1]);
                store4(&s_v[kk][d], t[it][2]);
                store4(&s_v[kk][hd + d], t[it][3]);
            }
        }
        __syncthreads();
        // warp w scores queries w and w + 4 against the tile's keys, lane = key, and updates their
        // softmax state: tile max and Σp by shuffles, so every lane holds the same m and l
#pragma unroll
        for (int a = 0; a < 2; a++) {
            const int qi = warp + a * (DECODE_THREADS / WARP), s = qi / G;
            if (qi >= Q) break;                              // uniform across the warp
            float score = neg_inf();
            if (key_visible(s_kpos[tile * DECODE_KEYS + lane], query_pos, window)) {
                float dot = 0.0f;
                for (int d = 0; d < hd; d++) dot += s_q[qi][d] * s_k[s][lane][d];
                score = dot * scale;
            }
            float tile_max = score;
            for (int offset = WARP / 2; offset > 0; offset /= 2)
                tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
            const float m_new = fmaxf(m[a], tile_max);       // this tile has a visible key: finite
            const float p = expf(score - m_new), rescale = expf(m[a] - m_new);
            l[a] = l[a] * rescale + group_sum(p, WARP);
            m[a] = m_new;
            s_p[qi][lane] = p;
            if (lane == 0) s_rescale[qi] = rescale;
        }
        __syncthreads();
        if (tid < F2) {
#pragma unroll
            for (int a = 0; a < DECODE_MAX_QUERIES; a++) {
                if (a < Q) {
                    float sum = 0.0f;
                    for (int kk = 0; kk < DECODE_KEYS; kk++) sum += s_p[a][kk] * s_v[kk][tid];
                    acc[a] = acc[a] * s_rescale[a] + sum;
                }
            }
        }
        __syncthreads();
    }
    // partials of query head 2(gG + r) + s for this split
#pragma unroll
    for (int a = 0; a < 2; a++) {
        const int qi = warp + a * (DECODE_THREADS / WARP);
        if (qi < Q && lane == 0) {
            int head = 2 * (g * G + qi % G) + qi / G;
            partial_m[split * H + head] = m[a];
            partial_l[split * H + head] = l[a];
        }
    }
    if (tid < F2) {
#pragma unroll
        for (int a = 0; a < DECODE_MAX_QUERIES; a++) {
            if (a < Q) {
                int head = 2 * (g * G + a % G) + a / G;
                partial_acc[((long long)split * H + head) * F2 + tid] = acc[a];
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// 5b. attention_decode_reduce: merge the splits, then the differential combine.
//
//   For each query head: M = max_s m_s, L = Σ_s l_s e^{m_s − M}, A = Σ_s acc_s e^{m_s − M}, a = A / L
//   (splits with l = 0 saw no key and are skipped). For pair j (heads 2j, 2j+1):
//   out[j·2hd + f] = RMSNorm(a_{2j} − λ a_{2j+1})[f] · subln[f] · (1 − λ_init)
//   partial_* as written by attention_decode_split; lambda (1,); subln (2hd,) -> out (H·hd,)
// Mapping: grid H / 2 (one block per pair j), block REDUCE_THREADS, the two heads in turn. M is a
//   block max over the splits. Then the splits go REDUCE_THREADS at a time: thread i puts split i's
//   weight e^{m − M} in shared memory (and adds l·e^{m − M} to its part of L); thread t reads float4
//   q = t mod (2hd/4) of the acc rows of splits t div (2hd/4), + 256 / (2hd/4), ... (so 8 splits
//   are read at once for hd 64, every load 16 bytes); the lanes' float4 sums meet in shared memory.
//   L is a block sum; the RMS over the pair's 2hd features is another.
// Traffic: the partials once: 4 · n_splits · H · (2hd + 2) bytes, and the output 4 · H · hd.
#define REDUCE_THREADS 256
extern "C" __global__ void __launch_bounds__(REDUCE_THREADS)
attention_decode_reduce(const float* partial_acc, const float* partial_m, const float* partial_l,
                        const float* lambda, const float* subln, float* out, int n_splits, int H, int head_dim,
                        float lambda_init, float eps) {
    __shared__ float s_warp[REDUCE_THREADS / WARP];
    __shared__ float s_weight[REDUCE_THREADS];
    __shared__ float s_sum[REDUCE_THREADS * 4];              // each thread's float4 of A, [lane][feature]
    const int j = blockIdx.x, tid = threadIdx.x, F2 = 2 * head_dim;
    const int quads = F2 / 4, lanes = REDUCE_THREADS / quads, quad = tid % quads, lane = tid / quads;
    float merged[2];
#pragma unroll
    for (int s = 0; s < 2; s++) {
        const int head = 2 * j + s;
        float M = neg_inf();
        for (int i = tid; i < n_splits; i += REDUCE_THREADS)
            if (partial_l[i * H + head] > 0.0f) M = fmaxf(M, partial_m[i * H + head]);
        M = block_max(M, s_warp);
        float L = 0.0f;
        float4 A = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (int i0 = 0; i0 < n_splits; i0 += REDUCE_THREADS) {
            const int i = i0 + tid, n = min(REDUCE_THREADS, n_splits - i0);
            float w = 0.0f;
            if (i < n_splits && partial_l[i * H + head] > 0.0f) {
                w = expf(partial_m[i * H + head] - M);
                L += partial_l[i * H + head] * w;
            }
            s_weight[tid] = w;
            __syncthreads();
#pragma unroll 4
            for (int c = lane; c < n; c += lanes) {
                const float4 a = reinterpret_cast<const float4*>(partial_acc + ((long long)(i0 + c) * H + head) * F2)[quad];
                const float wc = s_weight[c];
                A.x += a.x * wc, A.y += a.y * wc, A.z += a.z * wc, A.w += a.w * wc;
            }
            __syncthreads();                                 // the next chunk overwrites s_weight
        }
        store4(&s_sum[lane * F2 + 4 * quad], A);
        L = block_sum(L, s_warp);                            // (its barrier also publishes s_sum)
        float total = 0.0f;
        if (tid < F2)
            for (int l = 0; l < lanes; l++) total += s_sum[l * F2 + tid];
        merged[s] = L > 0.0f ? total / L : 0.0f;             // the next head's block_max orders these reads
    }                                                        // before its writes to s_sum
    float d = tid < F2 ? merged[0] - lambda[0] * merged[1] : 0.0f;
    float ss = block_sum(d * d, s_warp);
    if (tid < F2) out[j * F2 + tid] = d / sqrtf(ss / F2 + eps) * subln[tid] * (1.0f - lambda_init);
}

// ================================================================================================
// 6. kv_write: store one decode token's K/V into a layer's cache, at a slot computed on the device.
//
//   slot = pos % W for a sliding layer (the W-slot ring), pos for the append buffer (window = 0);
//   k_cache[h, slot, :] = k_new[h, :], v_cache likewise, kpos[slot] = pos.
//   k_new, v_new (H_kv, hd); k_cache, v_cache (H_kv, slots, hd); kpos (slots,); pos (1,)
// Mapping: one thread per element of k_new, grid ceil(H_kv · hd / 256), block 256. The host makes
//   sure the append buffer has room before the step; a slot past the end is not written.
// Traffic: 16 · H_kv · hd bytes.
extern "C" __global__ void kv_write(const float* k_new, const float* v_new, float* k_cache, float* v_cache,
                                    long long* kpos, const long long* pos, int H_kv, int head_dim, int slots,
                                    int window) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    long long p = pos[0];
    long long slot = window ? p % window : p;
    if (i >= H_kv * head_dim || slot >= slots) return;
    int h = i / head_dim, d = i % head_dim;
    k_cache[((long long)h * slots + slot) * head_dim + d] = k_new[i];
    v_cache[((long long)h * slots + slot) * head_dim + d] = v_new[i];
    if (i == 0) kpos[slot] = p;
}

// ================================================================================================
// 7. gemv_bf16 / gemv_f32: y = epilogue(x · Wᵀ) for a few rows of x (decode), fp32 sums, W stored as
//    bf16 bits (widened exactly, bits << 16) or float32; the two kernels differ only in W's type.
//
//   acc[t, o] = Σ_k x[t, k] · W[o, k]
//   mode 0 (GEMV_PLAIN):    y[t, o] = acc + bias[o]                   (no bias unless has_bias)
//   mode 1 (GEMV_RESIDUAL): y[t, o] = aux[t, o] + (acc + bias[o])     (aux: the residual stream; y may be aux)
//   mode 2 (GEMV_SWIGLU):   y[t, o] = silu(acc[t, o]) · acc[t, o + out_features]   (W = [gate; up], 2·out rows)
//   mode 3 (GEMV_GATE):     y[t, o] = silu(acc) · aux[t, o]           (the GMU: aux = the memory m)
//   x (rows, in_features); W (out_features or 2·out_features, in_features); bias, aux, y as above.
// Mapping: 8 warps per block; `splits` (1, 2, 4 or 8) consecutive warps share one output feature
//   (split-K), so a small output (x_proj's 192 rows, out_proj, fc2) still gives every SM work:
//   grid ceil(out_features / (8 / splits)). Warp part p of output o reads the 8-weight groups
//   j = lane + 32·(p + splits·i), i = 0, 1, ..., of W's row (16 or 32 contiguous bytes per lane;
//   GEMV_UNROLL groups loaded before any is used: 2 KB per warp in flight for bf16), widens them and
//   multiplies by the matching x columns for every row of x at once (x is small and comes from
//   L1/L2): each weight is read once per call. One row (a decode step) has its own instance, without
//   the per-row predicates of up to GEMV_MAX_ROWS rows.
//   When in_features is not a multiple of 8, or a pointer is not 16-byte aligned, lanes take single
//   columns lane + 32·(p + splits·i) instead. Lane sums meet in a butterfly, the splits of an output
//   in shared memory; then the epilogue. rows <= GEMV_MAX_ROWS.
// Traffic: the weights once (2 or 4 · out · in bytes, twice that for SwiGLU's two rows): the decode
//   roofline; plus 4 · rows · out written (and read, for aux); x re-reads hit the caches.
#define GEMV_WARPS 8
#define GEMV_MAX_ROWS 8
#define GEMV_UNROLL 4          // 8-weight groups in flight per lane: 64 bytes of bf16, 128 of fp32
#define GEMV_UNROLL_ROWS 2     // the same for up to GEMV_MAX_ROWS rows (their sums take the registers)
#define GEMV_PLAIN 0
#define GEMV_RESIDUAL 1
#define GEMV_SWIGLU 2
#define GEMV_GATE 3

// 8 consecutive weights as loaded: 16 bytes of bf16 bits or 32 bytes of float32, widened at use
template <typename WT> struct Raw8;
template <> struct Raw8<unsigned short> { uint4 a; };
template <> struct Raw8<float> { float4 a, b; };

__device__ __forceinline__ void load8(const unsigned short* p, Raw8<unsigned short>& w) {
#ifdef __CUDA_ARCH__  // read-only, not kept in L1, and L2 fetches the whole 256-byte line: +4% (notes/gpu.md)
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(w.a.x), "=r"(w.a.y), "=r"(w.a.z), "=r"(w.a.w) : "l"(p));
#else                 // the same load where kernels.cu runs on the CPU (tests/cuda_cpu)
    w.a = __ldg(reinterpret_cast<const uint4*>(p));
#endif
}

__device__ __forceinline__ void load8(const float* p, Raw8<float>& w) {
    w.a = __ldg(reinterpret_cast<const float4*>(p));
    w.b = __ldg(reinterpret_cast<const float4*>(p) + 1);
}

__device__ __forceinline__ float dot8(const float* x, const Raw8<unsigned short>& w) {
    float4 a = reinterpret_cast<const float4*>(x)[0], b = reinterpret_cast<const float4*>(x)[1];
    return a.x * bf16_bits_to_float(w.a.x & 0xffffu) + a.y * bf16_bits_to_float(w.a.x >> 16) +
           a.z * bf16_bits_to_float(w.a.y & 0xffffu) + a.w * bf16_bits_to_float(w.a.y >> 16) +
           b.x * bf16_bits_to_float(w.a.z & 0xffffu) + b.y * bf16_bits_to_float(w.a.z >> 16) +
           b.z * bf16_bits_to_float(w.a.w & 0xffffu) + b.w * bf16_bits_to_float(w.a.w >> 16);
}

__device__ __forceinline__ float dot8(const float* x, const Raw8<float>& w) {
    float4 a = reinterpret_cast<const float4*>(x)[0], b = reinterpret_cast<const float4*>(x)[1];
    return a.x * w.a.x + a.y * w.a.y + a.z * w.a.z + a.w * w.a.w + b.x * w.b.x + b.y * w.b.y + b.z * w.b.z + b.w * w.b.w;
}

__device__ __forceinline__ float load1(const unsigned short* p) { return bf16_bits_to_float(*p); }
__device__ __forceinline__ float load1(const float* p) { return *p; }

// ROWS: the most rows of x this instance handles (rows <= ROWS), UNROLL: groups in flight per lane.
template <typename WT, int ROWS, int UNROLL>
__device__ __forceinline__ void gemv_body(const float* x, const WT* W, const float* bias, const float* aux, float* y,
                                          int rows, int out_features, int in_features, int mode, int has_bias,
                                          int splits, float (*s_part)[GEMV_MAX_ROWS][2]) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int o = blockIdx.x * (GEMV_WARPS / splits) + warp / splits, part = warp % splits;
    const bool live = o < out_features;                      // a whole warp is live or not: no divergence
    const int n_w = mode == GEMV_SWIGLU ? 2 : 1;             // SwiGLU: the gate row o and the up row o + out
    float sum[2][ROWS];
#pragma unroll
    for (int r = 0; r < 2; r++)
#pragma unroll
        for (int t = 0; t < ROWS; t++) sum[r][t] = 0.0f;
    const bool vector_path = in_features % 8 == 0 && ((unsigned long long)W % 16) == 0 &&
                             ((unsigned long long)x % 16) == 0;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (r >= n_w || !live) break;
        const WT* w_row = W + (long long)(o + r * out_features) * in_features;
        if (vector_path) {
            const int step = 8 * WARP * splits;              // columns between a lane's groups
            for (int col = 8 * (lane + WARP * part); col < in_features; col += UNROLL * step) {
                Raw8<WT> w[UNROLL];
#pragma unroll
                for (int u = 0; u < UNROLL; u++)        // every load issued before any FMA
                    if (col + u * step < in_features) load8(w_row + col + u * step, w[u]);
#pragma unroll
                for (int u = 0; u < UNROLL; u++)
                    if (col + u * step < in_features) {
#pragma unroll
                        for (int t = 0; t < ROWS; t++)
                            if (t < rows) sum[r][t] += dot8(x + (long long)t * in_features + col + u * step, w[u]);
                    }
            }
        } else {
            for (int col = lane + WARP * part; col < in_features; col += WARP * splits) {
                float w = load1(w_row + col);
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
    if (!live || part != 0 || lane != 0) return;
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

template <typename WT>
__device__ __forceinline__ void gemv(const float* x, const WT* W, const float* bias, const float* aux, float* y,
                                     int rows, int out_features, int in_features, int mode, int has_bias, int splits,
                                     float (*s_part)[GEMV_MAX_ROWS][2]) {
    if (rows == 1)  // a decode step: one row, no per-row predicates (they cost a quarter of its speed)
        gemv_body<WT, 1, GEMV_UNROLL>(x, W, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits,
                                      s_part);
    else
        gemv_body<WT, GEMV_MAX_ROWS, GEMV_UNROLL_ROWS>(x, W, bias, aux, y, rows, out_features, in_features, mode,
                                                       has_bias, splits, s_part);
}

extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 4)
gemv_bf16(const float* x, const unsigned short* W, const float* bias, const float* aux, float* y, int rows,
          int out_features, int in_features, int mode, int has_bias, int splits) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv(x, W, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits, s_part);
}

// (at least 2 blocks per SM, so up to 128 registers: ptxas spills fp32's 8-wide loads when it keeps 64)
extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP, 2)
gemv_f32(const float* x, const float* W, const float* bias, const float* aux, float* y, int rows,
         int out_features, int in_features, int mode, int has_bias, int splits) {
    __shared__ float s_part[GEMV_WARPS][GEMV_MAX_ROWS][2];
    gemv(x, W, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits, s_part);
}

// ================================================================================================
// 8. layer_norm_rows: y = (x − mean) / sqrt(biased var + eps) ⊙ weight + bias, per row.
//
//   x, y (rows, D); weight, bias (D,). y may not be x.
// Mapping: one block of NORM_THREADS per row (grid rows); thread tid holds features tid, tid + 256, ...
//   (at most NORM_PER_THREAD of them: D <= 4096) of x, weight and bias in registers, all loaded at
//   once (one trip to memory); the mean, then the variance about it, are block sums (warp shuffles,
//   one shared slot per warp, every thread adds the slots).
// Traffic: x read and y written once, 8 · rows · D bytes, and weight and bias, 8 · D bytes.
#define NORM_THREADS 256
#define NORM_PER_THREAD 16

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
layer_norm_rows(const float* x, const float* weight, const float* bias, float* y, int D, float eps) {
    __shared__ float s_warp[NORM_THREADS / WARP];
    const float* xr = x + (long long)blockIdx.x * D;
    float* yr = y + (long long)blockIdx.x * D;
    float xv[NORM_PER_THREAD], wv[NORM_PER_THREAD], bv[NORM_PER_THREAD];
#pragma unroll
    for (int j = 0; j < NORM_PER_THREAD; j++) {
        const int i = (int)threadIdx.x + j * NORM_THREADS;
        const bool in = i < D;
        xv[j] = in ? xr[i] : 0.0f, wv[j] = in ? weight[i] : 0.0f, bv[j] = in ? bias[i] : 0.0f;
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
        if (i < D) yr[i] = (xv[j] - mean) / sd * wv[j] + bv[j];
    }
}

// ================================================================================================
// 9. embed_bf16 / embed_f32: the decode step's first op, y = E[token[0]] widened to float32.
//
//   E (V, D) bf16 bits or float32; token (1,) int64 on the device (a CUDA graph replays the step
//   with a new id written there) -> y (D,).
// Mapping: one thread per feature, grid ceil(D / 256), block 256. Traffic: 2 or 4 · D + 4 · D bytes.
extern "C" __global__ void embed_bf16(const unsigned short* E, const long long* token, float* y, int D) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < D) y[i] = bf16_bits_to_float(E[token[0] * D + i]);
}

extern "C" __global__ void embed_f32(const float* E, const long long* token, float* y, int D) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < D) y[i] = E[token[0] * D + i];
}
