// cuda_on_cpu.h: the CUDA names kernels.cu uses, for g++, so that the unchanged kernels.cu can run
// on the CPU (tests/cuda_cpu.py force-includes this header with `g++ -include`).
//
// How it works
//   * __global__ / __device__ / __forceinline__ / __launch_bounds__ vanish: a kernel becomes a
//     plain C++ function that computes what ONE CUDA thread computes.
//   * runtime.cpp runs every thread of a block as a fiber (its own small stack) on one OS thread.
//     threadIdx, blockIdx, blockDim and gridDim read the running fiber's indices.
//   * __shared__ variables become static variables in the ELF section "cuda_shared": all fibers of
//     a block see the same storage (blocks run one after another), and the runtime can fill the
//     whole section with a poison byte before each block (linker symbols __start_/__stop_cuda_shared).
//   * __syncthreads*() and the warp intrinsics (__shfl*_sync, __ballot_sync, ...) switch back to
//     the runtime's scheduler, which resumes the fibers once every thread the operation names has
//     arrived, and reports divergence (threads waiting at different barriers, lanes missing from a
//     shuffle) as an error of the launch instead of hanging or guessing.
//   * Each call site passes its own line (__builtin_LINE() as a default argument), so error
//     messages say which barrier or shuffle of kernels.cu went wrong.
//   * cp.async copies (CUDA's pipeline primitives) land when the thread waits for them, their
//     destination poisoned until then (runtime.cpp).
// What this is not: a timing model, or a model of memory visibility between barriers (a fiber's
// writes are visible at once; runtime.cpp varies the thread order to expose missing barriers).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>       // device printf works as in CUDA (handy: printf-debug a kernel on the CPU)
#include <cstring>
#include <string>
#include <utility>

// ------------------------------------------------------------------------------------------------
// Qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)                  // tests/cuda_cpu.py reads the bound from the source
#define __shared__ static __attribute__((section("cuda_shared")))
#define __constant__ static
#define __align__(n) alignas(n)

// ------------------------------------------------------------------------------------------------
// Vector types (CUDA aligns the 16-byte ones to 16: a misaligned uint4 load fails on the GPU too)

struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------------
// Thread and block indices of the running fiber (set by runtime.cpp before it resumes a fiber)

namespace cuda_cpu {
struct Indices { uint3 thread, block; dim3 block_dim, grid_dim; };
extern Indices now;
}  // namespace cuda_cpu

// Read-only, as in CUDA; re-read after every barrier because the runtime is an opaque call.
#define threadIdx (static_cast<const uint3>(::cuda_cpu::now.thread))
#define blockIdx (static_cast<const uint3>(::cuda_cpu::now.block))
#define blockDim (static_cast<const dim3>(::cuda_cpu::now.block_dim))
#define gridDim (static_cast<const dim3>(::cuda_cpu::now.grid_dim))

// ------------------------------------------------------------------------------------------------
// Bit casts and math, as CUDA defines them

template <typename To, typename From> inline To cuda_cpu_bits(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit cast between different sizes");
    To out;
    std::memcpy(&out, &v, sizeof out);
    return out;
}
inline float __int_as_float(int v) { return cuda_cpu_bits<float>(v); }
inline float __uint_as_float(unsigned int v) { return cuda_cpu_bits<float>(v); }
inline int __float_as_int(float v) { return cuda_cpu_bits<int>(v); }
inline unsigned int __float_as_uint(float v) { return cuda_cpu_bits<unsigned int>(v); }
inline double __longlong_as_double(long long v) { return cuda_cpu_bits<double>(v); }
inline long long __double_as_longlong(double v) { return cuda_cpu_bits<long long>(v); }

// expf, log1pf, tanhf, sqrtf, fmaxf, ... are <cmath>'s (glibc's, so results differ from the GPU's
// in the last bits; the tests compare with tolerances). The fast intrinsics map to the same.
inline float __expf(float v) { return expf(v); }
inline float __logf(float v) { return logf(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline float __saturatef(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }

// CUDA's integer and float min/max overloads (the ones kernels are likely to call).
#define CUDA_CPU_MIN_MAX(T)                                   \
    inline T min(T a, T b) { return a < b ? a : b; }          \
    inline T max(T a, T b) { return a > b ? a : b; }
CUDA_CPU_MIN_MAX(int)
CUDA_CPU_MIN_MAX(unsigned int)
CUDA_CPU_MIN_MAX(long long)
CUDA_CPU_MIN_MAX(unsigned long long)
#undef CUDA_CPU_MIN_MAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ------------------------------------------------------------------------------------------------
// Memory: loads, fences and atomics. Fibers never interrupt each other between barriers, so a
// read-modify-write is atomic as written, and every write is already visible to every thread.
// (The atomics accept any type, more than CUDA does: nvcc, in test_kernels.py, is the judge of that.)

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }     // through L2 on a GPU: the same value here
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T> inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
template <typename T> inline T atomicMin(T* p, T v) { T old = *p; *p = old < v ? old : v; return old; }
template <typename T> inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T> inline T atomicCAS(T* p, T compare, T v) { T old = *p; if (old == compare) *p = v; return old; }

// ------------------------------------------------------------------------------------------------
// Block barriers and warp intrinsics: implemented in runtime.cpp

namespace cuda_cpu {
enum BarrierKind { SYNC = 0, SYNC_OR = 1, SYNC_AND = 2, SYNC_COUNT = 3, PDL_WAIT = 4 };
enum WarpKind { SHFL_IDX = 0, SHFL_UP = 1, SHFL_DOWN = 2, SHFL_XOR = 3, BALLOT = 4, SYNCWARP = 5 };

int block_sync(int kind, int predicate, const char* file, int line);
unsigned long long warp_op(int kind, unsigned int mask, unsigned long long bits, int arg, int width,
                           const char* file, int line);

template <typename T>
inline T shuffle(int kind, unsigned int mask, T v, int arg, int width, const char* file, int line) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof v);
    bits = warp_op(kind, mask, bits, arg, width, file, line);
    std::memcpy(&v, &bits, sizeof v);
    return v;
}
}  // namespace cuda_cpu

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_cpu::block_sync(::cuda_cpu::SYNC, 0, file, line);
}
inline int __syncthreads_or(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_cpu::block_sync(::cuda_cpu::SYNC_OR, p != 0, file, line);
}
inline int __syncthreads_and(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_cpu::block_sync(::cuda_cpu::SYNC_AND, p != 0, file, line);
}
inline int __syncthreads_count(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_cpu::block_sync(::cuda_cpu::SYNC_COUNT, p != 0, file, line);
}

template <typename T>
inline T __shfl_sync(unsigned int mask, T v, int src_lane, int width = warpSize,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_cpu::shuffle(::cuda_cpu::SHFL_IDX, mask, v, src_lane, width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_cpu::shuffle(::cuda_cpu::SHFL_UP, mask, v, (int)delta, width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T v, unsigned int delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_cpu::shuffle(::cuda_cpu::SHFL_DOWN, mask, v, (int)delta, width, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return ::cuda_cpu::shuffle(::cuda_cpu::SHFL_XOR, mask, v, lane_mask, width, file, line);
}
inline unsigned int __ballot_sync(unsigned int mask, int p, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
    return (unsigned int)::cuda_cpu::warp_op(::cuda_cpu::BALLOT, mask, p != 0, 0, warpSize, file, line);
}
inline int __any_sync(unsigned int mask, int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return __ballot_sync(mask, p, file, line) != 0;
}
inline int __all_sync(unsigned int mask, int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return __ballot_sync(mask, p, file, line) == mask;
}
inline void __syncwarp(unsigned int mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    ::cuda_cpu::warp_op(::cuda_cpu::SYNCWARP, mask, 0, 0, warpSize, file, line);
}

// ------------------------------------------------------------------------------------------------
// Asynchronous copies global -> shared (PTX cp.async, sm_80+), under the names of CUDA's pipeline
// primitives (cuda_pipeline_primitives.h), which kernels.cu calls where it runs on the CPU:
//   __pipeline_memcpy_async(dst, src, 4 | 8 | 16)   issue one copy (cp.async)
//   __pipeline_commit()                             close this thread's group of copies (commit_group)
//   __pipeline_wait_prior(n)                        wait until at most the n newest groups are pending
// A copy is checked when it is issued (size, alignment, the destination in shared memory, the
// source inside one of the launch's array arguments), its source is read then, and its destination
// is filled with the launch's poison byte; the bytes land only when this thread waits for the
// copy's group. So a kernel that reads a destination before waiting, or before the barrier after
// another thread's wait, reads poison; one that overwrites a buffer other threads still read
// poisons it under them. A thread that exits with copies it never waited for is an error.

namespace cuda_cpu {
void copy_async(void* dst, const void* src, std::size_t bytes, std::size_t zfill, const char* file, int line);
void copy_async_commit();
void copy_async_wait(std::size_t prior);
}  // namespace cuda_cpu

inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, std::size_t size_and_align,
                                    std::size_t zfill = 0, const char* file = __builtin_FILE(),
                                    int line = __builtin_LINE()) {
    ::cuda_cpu::copy_async(dst_shared, src_global, size_and_align, zfill, file, line);
}
inline void __pipeline_commit() { ::cuda_cpu::copy_async_commit(); }
inline void __pipeline_wait_prior(std::size_t prior) { ::cuda_cpu::copy_async_wait(prior); }

// Programmatic dependent launch (kernels.cu's pdl_wait and prefetch_l2), checked against the rules
// kernels.cu states. On the CPU the predecessor has always completed, so what is checked is the
// kernel's side of the contract (runtime.cpp):
//   * cudaGridDependencySynchronize() is a rendezvous of the whole block, like a barrier: every
//     thread must reach it (a thread that exits first is a divergent-barrier error), at most once;
//     in a launch checked for PDL (LaunchConfig.pdl) a block that ends without it is an error;
//   * cudaTriggerProgrammaticLaunchCompletion() must come after the thread's wait;
//   * in the AddressSanitizer build, every pointer argument not marked IMMUTABLE is poisoned from
//     the start of each block until its rendezvous, so a read or a write of it before the wait is
//     reported, naming the argument;
//   * cuda_cpu_prefetch_l2(p, bytes) does nothing but check that p is 16-byte aligned and that the
//     bytes lie inside an IMMUTABLE argument.

namespace cuda_cpu {
void pdl_trigger(const char* file, int line);
void prefetch_l2(const void* p, unsigned int bytes, const char* file, int line);
}  // namespace cuda_cpu

inline void cudaGridDependencySynchronize(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_cpu::block_sync(::cuda_cpu::PDL_WAIT, 0, file, line);
}
inline void cudaTriggerProgrammaticLaunchCompletion(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_cpu::pdl_trigger(file, line);
}
inline void cuda_cpu_prefetch_l2(const void* p, unsigned int bytes, const char* file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
    ::cuda_cpu::prefetch_l2(p, bytes, file, line);
}

// ------------------------------------------------------------------------------------------------
// Launch entries: the file tests/cuda_cpu.py generates includes kernels.cu, then one
// CUDA_CPU_ENTRY(kernel, launch bound) per kernel. Python calls cuda_cpu_launch_<kernel> with the
// launch geometry and an array of pointers to the argument values, as cudaLaunchKernel takes them.

namespace cuda_cpu {
// A pointer argument of a launch: where it lies, its name, and whether it may be read before the
// PDL wait (IMMUTABLE). Under AddressSanitizer the others are poisoned until the wait.
struct Region {
    unsigned long long begin, bytes;
    int immutable;
    const char* name;
};

struct LaunchConfig {
    unsigned int grid[3], block[3];
    unsigned long long seed;     // thread/block order when shuffled
    int shuffled;                // 0: blocks and threads in index order
    int poison;                  // byte written over the kernel's shared memory before each block
    unsigned long long shared_begin, shared_end;   // that memory: byte offsets into the section
    int skip_barrier_line;       // > 0: the __syncthreads() on this source line does nothing, as if deleted
    int pdl;                     // checked as a PDL launch: every block must reach cudaGridDependencySynchronize
    const Region* regions;       // the pointer arguments, for the PDL checks
    int n_regions;
};


int launch(const LaunchConfig* config, void (*thunk)(void** args), void** args);

template <typename... A, std::size_t... I>
inline void call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<A*>(args[I])...);    // args[i] points at the value of parameter i
}
template <typename... A> inline void call(void (*kernel)(A...), void** args) {
    call(kernel, args, std::index_sequence_for<A...>());
}

// The C parameter types, spelled as tests/cuda_cpu.py spells kernels.cu's, to cross-check its parser.
template <typename T> inline const char* type_name() { return "?"; }
template <> inline const char* type_name<const float*>() { return "const float*"; }
template <> inline const char* type_name<float*>() { return "float*"; }
template <> inline const char* type_name<const long long*>() { return "const long long*"; }
template <> inline const char* type_name<long long*>() { return "long long*"; }
template <> inline const char* type_name<int*>() { return "int*"; }
template <> inline const char* type_name<const unsigned short*>() { return "const unsigned short*"; }
template <> inline const char* type_name<unsigned short*>() { return "unsigned short*"; }
template <> inline const char* type_name<const signed char*>() { return "const signed char*"; }
template <> inline const char* type_name<int>() { return "int"; }
template <> inline const char* type_name<long long>() { return "long long"; }
template <> inline const char* type_name<float>() { return "float"; }

template <typename... A> inline const char* param_types(void (*)(A...)) {
    static const std::string joined = [] {
        std::string s;
        for (const char* t : {type_name<A>()...}) s += (s.empty() ? "" : ",") + std::string(t);
        return s;
    }();
    return joined.c_str();
}
}  // namespace cuda_cpu

#define CUDA_CPU_EXPORT extern "C" __attribute__((visibility("default")))
#define CUDA_CPU_ENTRY(kernel, bound)                                                              \
    static void cuda_cpu_thunk_##kernel(void** args) { ::cuda_cpu::call(kernel, args); }            \
    CUDA_CPU_EXPORT int cuda_cpu_launch_##kernel(const ::cuda_cpu::LaunchConfig* c, void** args) {  \
        return ::cuda_cpu::launch(c, cuda_cpu_thunk_##kernel, args);                                \
    }                                                                                              \
    CUDA_CPU_EXPORT int cuda_cpu_bound_##kernel() { return (bound); }                              \
    CUDA_CPU_EXPORT const char* cuda_cpu_params_##kernel() { return ::cuda_cpu::param_types(kernel); }
