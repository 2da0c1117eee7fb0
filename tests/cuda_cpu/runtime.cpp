// runtime.cpp: runs a CUDA kernel launch on the CPU, one block after another, each thread of a
// block as a fiber. Compiled into the same shared library as kernels.cu (tests/cuda_cpu.py).
//
// A launch (cuda_cpu::launch):
//   * sets FTZ/DAZ (denormals flushed to zero), as CuPy's NVRTC compiles kernels with -ftz=true;
//   * for each block, in index order or in a shuffled order: fills the shared-memory section with
//     the poison byte, creates one fiber per thread and schedules them.
// Scheduling: a pass resumes every READY fiber once (in thread order, or shuffled per pass); a fiber
//   runs until it reaches a barrier or a warp operation, or returns, then hands over directly to
//   the next READY fiber of the pass. A warp operation completes as soon as every lane of its mask
//   has arrived (the last one computes all lanes' results). When no fiber is READY, every live
//   thread must be waiting at the same __syncthreads (same line, same kind): the barrier opens.
//   Anything else (a thread exited, threads at different barriers, lanes stuck in a shuffle) is
//   reported as an error of the launch, which stops at once.
// Fiber switches are a few instructions on x86-64 (callee-saved registers and the stack pointer,
//   no signal mask; ~50 ns per thread per barrier or shuffle, measured, mostly cache and branch
//   misses); elsewhere, or with -DCUDA_CPU_UCONTEXT, ucontext is used (about 10x slower: a system
//   call per switch). Under AddressSanitizer the switches are announced with
//   __sanitizer_{start,finish}_switch_fiber, and the shared section is poisoned around ASan's
//   redzones so that an out-of-bounds shared index is still caught.
// cp.async (cuda_on_cpu.h): each fiber keeps its pending copies, with their source bytes read at
//   issue; the destination holds the poison byte until the fiber's __pipeline_wait_prior covers
//   the copy's group. The launch's array arguments (cuda_cpu_set_arrays) bound the sources.
#include "cuda_on_cpu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <vector>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif
#if !defined(__x86_64__) || defined(CUDA_CPU_UCONTEXT)
#define CUDA_CPU_USE_UCONTEXT 1
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// The linker's bounds of the section, hidden: each library (kernels.cu, a mutated copy) has its own.
extern "C" __attribute__((visibility("hidden"))) char __start_cuda_shared[], __stop_cuda_shared[];

// The section exists even for kernels without shared memory (else the two symbols are undefined).
__attribute__((used)) __shared__ char cuda_cpu_shared_anchor[16];

namespace cuda_cpu {

Indices now;

namespace {

constexpr int MAX_THREADS = 1024;
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t STACK_BYTES = 256 * 1024;       // ASan's redzones make frames several times larger
#else
constexpr size_t STACK_BYTES = 64 * 1024;
#endif

enum State { READY, AT_BARRIER, AT_WARP, DONE };

struct Fiber {
    void* sp = nullptr;                 // saved stack pointer while switched out (x86-64 path)
#if CUDA_CPU_USE_UCONTEXT
    ucontext_t context;
#endif
    char* stack = nullptr;              // lowest usable byte; a guard page lies below it
    void* fake_stack = nullptr;         // ASan's per-fiber bookkeeping
    uint3 index{};
    int linear = 0;                     // thread index within the block
    State state = DONE;
    // What the fiber waits at (barrier or warp operation), and the result it gets back.
    int kind = 0, line = 0, arg = 0, width = 0;
    const char* file = "";
    bool pdl_waited = false;            // has passed cudaGridDependencySynchronize (kernels.cu's pdl_wait)
    unsigned int mask = 0;
    unsigned long long value = 0, result = 0;
    // cp.async: the copies issued and not yet waited for, and the groups committed so far
    struct Copy { char* dst; unsigned char bytes[16]; int size, group; const char* file; int line; };
    std::vector<Copy> copies;
    int groups = 0;
};

// ------------------------------------------------------------------------------------------------
// Launch state (one launch at a time: a mutex in launch() guards it)

Fiber fibers[MAX_THREADS];
int n_threads = 0;
int warp_waiting[MAX_THREADS / 32];    // lanes of each warp now waiting at a warp operation
Fiber* current = nullptr;              // the running fiber, nullptr in the scheduler
void (*kernel_thunk)(void**) = nullptr;
void** kernel_args = nullptr;
int skip_barrier_line = 0;             // a __syncthreads() knocked out for this launch (tests)
int poison_byte = 0xFF;                // the launch's poison: also what a pending cp.async destination holds
std::vector<std::pair<const char*, const char*>> arrays;   // [begin, end) of the launch's array arguments
int pdl_checked = 0;                   // a PDL launch: every block must reach the wait
bool block_waited = false;             // the running block has passed its PDL rendezvous
const Region* regions = nullptr;       // the launch's pointer arguments (PDL checks)
int n_regions = 0;
bool failed = false;
char error[2048];
std::mutex launch_mutex;

// The scheduler's own context.
void* scheduler_sp = nullptr;
#if CUDA_CPU_USE_UCONTEXT
ucontext_t scheduler_context;
#endif
void* scheduler_fake_stack = nullptr;
const void* scheduler_stack_bottom = nullptr;
size_t scheduler_stack_size = 0;

// splitmix64: a tiny, seedable generator for the shuffled orders.
unsigned long long rng_state = 0;
unsigned long long next_random() {
    unsigned long long z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void shuffle_order(int* order, long long n) {
    for (long long i = n; i > 1; i--) std::swap(order[i - 1], order[next_random() % i]);
}

// __builtin_FILE() strings of one file are usually one literal: compare pointers before text.
bool same_file(const char* a, const char* b) { return a == b || strcmp(a, b) == 0; }

const char* base_name(const char* path) {
    const char* slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

// The first error of a launch wins; the message names the block and, inside a fiber, the thread.
void set_error(const char* format, ...) {
    if (failed) return;
    failed = true;
    int n = 0;
    if (current)
        n = snprintf(error, sizeof error, "block (%u,%u,%u) thread (%u,%u,%u): ", now.block.x, now.block.y,
                     now.block.z, current->index.x, current->index.y, current->index.z);
    else
        n = snprintf(error, sizeof error, "block (%u,%u,%u): ", now.block.x, now.block.y, now.block.z);
    va_list ap;
    va_start(ap, format);
    vsnprintf(error + n, sizeof error - n, format, ap);
    va_end(ap);
}

// ------------------------------------------------------------------------------------------------
// Fiber stacks: one mapping, MAX_THREADS stacks with a PROT_NONE guard page under each, made once.

char* stack_pool = nullptr;
size_t page_bytes = 0;

bool make_stacks() {
    if (stack_pool) return true;
    page_bytes = (size_t)sysconf(_SC_PAGESIZE);
    size_t slot = STACK_BYTES + page_bytes;
    void* p = mmap(nullptr, slot * MAX_THREADS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) return false;
    stack_pool = static_cast<char*>(p);
    for (int i = 0; i < MAX_THREADS; i++) {
        mprotect(stack_pool + i * slot, page_bytes, PROT_NONE);   // a stack overflow faults here
        fibers[i].stack = stack_pool + i * slot + page_bytes;
    }
    return true;
}

// ------------------------------------------------------------------------------------------------
// Context switches

#if !CUDA_CPU_USE_UCONTEXT
// switch_stack(save, next): push the callee-saved registers, store the stack pointer in *save,
// load `next`, pop that context's registers and return into it. The caller-saved registers are
// already saved by the compiler around the call; MXCSR (FTZ/DAZ) is the same for every fiber.
extern "C" void cuda_cpu_switch_stack(void** save, void* next);
asm(R"(
    .text
    .p2align 4
    .globl cuda_cpu_switch_stack
    .hidden cuda_cpu_switch_stack
    .type cuda_cpu_switch_stack, @function
cuda_cpu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_cpu_switch_stack, .-cuda_cpu_switch_stack
)");
#endif

void asan_start_switch(void** fake_stack_save, const void* bottom, size_t size) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
    (void)fake_stack_save, (void)bottom, (void)size;
#endif
}

void asan_finish_switch(void* fake_stack, const void** old_bottom, size_t* old_size) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_size);
#else
    (void)fake_stack, (void)old_bottom, (void)old_size;
#endif
}

// The pass now running: fibers are resumed in the order of pass_order. A fiber that has to wait
// hands over directly to the next READY fiber of the pass (one switch instead of two through the
// scheduler); the last one of the pass hands back to the scheduler.
int pass_order[MAX_THREADS];
int pass_length = 0, pass_position = 0;

Fiber* next_in_pass() {
    while (pass_position < pass_length) {
        Fiber* g = &fibers[pass_order[pass_position++]];
        if (g->state == READY) return g;
    }
    return nullptr;
}

// From `from` (nullptr: the scheduler) to `to` (nullptr: the scheduler). `for_good`: `from` is a
// fiber that ended, or whose launch failed, and is never resumed. Returns when `from` is resumed.
void switch_to(Fiber* from, Fiber* to, bool for_good) {
    void** fake_save = for_good ? nullptr : from ? &from->fake_stack : &scheduler_fake_stack;
    current = to;
    if (to) {
        now.thread = to->index;
        asan_start_switch(fake_save, to->stack, STACK_BYTES);
    } else {
        asan_start_switch(fake_save, scheduler_stack_bottom, scheduler_stack_size);
    }
#if CUDA_CPU_USE_UCONTEXT
    swapcontext(from ? &from->context : &scheduler_context, to ? &to->context : &scheduler_context);
#else
    cuda_cpu_switch_stack(from ? &from->sp : &scheduler_sp, to ? to->sp : scheduler_sp);
#endif
    asan_finish_switch(from ? from->fake_stack : scheduler_fake_stack, nullptr, nullptr);
}

// The running fiber waits (or has ended): on to the next fiber of the pass, or the scheduler.
void yield(bool for_good) {
    switch_to(current, failed ? nullptr : next_in_pass(), for_good);
}

// Where a new fiber starts: run the kernel as this thread, then leave for good.
[[noreturn]] void fiber_main() {
    const void* from_bottom = nullptr;
    size_t from_size = 0;
    asan_finish_switch(nullptr, &from_bottom, &from_size);
    if (!scheduler_stack_bottom) {                     // the launch's first fiber is started by the scheduler
        scheduler_stack_bottom = from_bottom;
        scheduler_stack_size = from_size;
    }
    kernel_thunk(kernel_args);
    if (!current->copies.empty()) {
        const Fiber::Copy& c = current->copies.front();
        set_error("exits with %d cp.async copies it never waited for (the first issued at %s:%d)",
                  (int)current->copies.size(), base_name(c.file), c.line);
    }
    current->state = DONE;
    yield(true);
    __builtin_unreachable();
}

// An error inside a fiber ends the launch: record it and leave the fiber for good.
[[noreturn]] void fail_in_fiber() {
    yield(true);
    __builtin_unreachable();
}

void start_fiber(Fiber* f) {
#if defined(__SANITIZE_ADDRESS__)
    __asan_unpoison_memory_region(f->stack, STACK_BYTES);   // frames of an abandoned fiber left poison
#endif
    f->fake_stack = nullptr;
#if CUDA_CPU_USE_UCONTEXT
    getcontext(&f->context);
    f->context.uc_stack.ss_sp = f->stack;
    f->context.uc_stack.ss_size = STACK_BYTES;
    f->context.uc_link = nullptr;
    makecontext(&f->context, (void (*)())fiber_main, 0);
#else
    // The first switch pops six zero registers and "returns" into fiber_main, which then sees the
    // stack as a called function would (a null return address at a 16-byte boundary + 8).
    // Stack tops staggered by whole cache lines: equally aligned tops would all fall into the same
    // few cache sets, and every switch would miss.
    void** top = reinterpret_cast<void**>(f->stack + STACK_BYTES - 64 * (f->linear % 64));
    top[-1] = nullptr;
    top[-2] = reinterpret_cast<void*>(&fiber_main);
    for (int i = 3; i <= 8; i++) top[-i] = nullptr;
    f->sp = top - 8;
#endif
}

// ------------------------------------------------------------------------------------------------
// Shared memory poison

// The kernel's own shared variables, [begin, end) of the section (tests/cuda_cpu.py finds them in
// the symbol table; without it, the whole section).
void poison_shared(int byte, unsigned long long begin_offset, unsigned long long end_offset) {
    const unsigned long long size = (unsigned long long)(__stop_cuda_shared - __start_cuda_shared);
    if (end_offset > size || begin_offset > end_offset) begin_offset = 0, end_offset = size;
    char* begin = __start_cuda_shared + begin_offset;
    char* end = __start_cuda_shared + end_offset;
#if defined(__SANITIZE_ADDRESS__)
    // Only the bytes ASan lets us touch: its redzones between the arrays must stay poisoned.
    for (char* p = begin; p < end;) {
        char* bad = static_cast<char*>(__asan_region_is_poisoned(p, end - p));
        char* stop = bad ? bad : end;
        memset(p, byte, stop - p);
        p = stop;
        while (p < end && __asan_address_is_poisoned(p)) p++;
    }
#else
    memset(begin, byte, end - begin);
#endif
}

// ------------------------------------------------------------------------------------------------
// Barriers

const char* barrier_name(int kind) {
    static const char* names[] = {"__syncthreads", "__syncthreads_or", "__syncthreads_and", "__syncthreads_count",
                                  "cudaGridDependencySynchronize (pdl_wait)"};
    return kind >= 0 && kind < 5 ? names[kind] : "barrier";
}

// ------------------------------------------------------------------------------------------------
// Programmatic dependent launch: the arguments a block may not touch before its wait are poisoned
// (AddressSanitizer builds only) from the start of the block until its rendezvous.

void guard_arguments(bool poison) {
#if defined(__SANITIZE_ADDRESS__)
    for (int i = 0; i < n_regions; i++) {
        if (regions[i].immutable || !regions[i].bytes) continue;
        void* p = reinterpret_cast<void*>(regions[i].begin);
        if (poison) __asan_poison_memory_region(p, regions[i].bytes);
        else __asan_unpoison_memory_region(p, regions[i].bytes);
    }
#else
    (void)poison;
#endif
}

#if defined(__SANITIZE_ADDRESS__)
// ASan's report names an address; this names the argument it belongs to, when it is one the PDL
// guard poisoned (the report itself says "use-after-poison").
void name_guarded_argument(const char*) {
    const unsigned long long a = reinterpret_cast<unsigned long long>(__asan_get_report_address());
    for (int i = 0; i < n_regions; i++)
        if (!regions[i].immutable && a >= regions[i].begin && a < regions[i].begin + regions[i].bytes && !block_waited)
            fprintf(stderr, "cuda_cpu: block (%u,%u,%u) thread (%u,%u,%u) touched argument '%s' before "
                    "cudaGridDependencySynchronize (kernels.cu's pdl_wait): PDL rule 1 allows only IMMUTABLE "
                    "arguments there\n", now.block.x, now.block.y, now.block.z, now.thread.x, now.thread.y,
                    now.thread.z, regions[i].name);
}
#endif

const char* warp_name(int kind) {
    static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                  "__ballot_sync", "__syncwarp"};
    return kind >= 0 && kind < 6 ? names[kind] : "warp operation";
}

// What fiber g is doing, for error messages.
std::string doing(const Fiber* g) {
    char buf[256];
    switch (g->state) {
    case DONE: snprintf(buf, sizeof buf, "has exited"); break;
    case AT_BARRIER: snprintf(buf, sizeof buf, "waits at %s (%s:%d)", barrier_name(g->kind), base_name(g->file), g->line); break;
    case AT_WARP:
        snprintf(buf, sizeof buf, "waits at %s (%s:%d) with mask 0x%08x", warp_name(g->kind), base_name(g->file), g->line, g->mask);
        break;
    default: snprintf(buf, sizeof buf, "is running"); break;
    }
    return buf;
}

// No fiber is READY: open the barrier every live thread waits at, or say why the block is stuck.
bool open_barrier() {
    Fiber* first = nullptr;
    Fiber* exited = nullptr;
    for (int i = 0; i < n_threads; i++) {
        Fiber* g = &fibers[i];
        if (g->state == AT_WARP) {                 // a lane of its mask went elsewhere and can never come
            const Fiber* base = &fibers[i / 32 * 32];
            int l = 0;
            while (l < 31 && !((g->mask >> l & 1) && base[l].state != AT_WARP)) l++;
            set_error("thread (%u,%u,%u) %s, but lane %d of its mask %s", g->index.x, g->index.y, g->index.z,
                      doing(g).c_str(), l, doing(&base[l]).c_str());
            return false;
        }
        if (g->state == DONE) exited = exited ? exited : g;
        if (g->state == AT_BARRIER && !first) first = g;
    }
    if (!first) return true;                       // everybody has exited
    if (exited) {
        set_error("divergent barrier: thread (%u,%u,%u) %s while thread (%u,%u,%u) has exited", first->index.x,
                  first->index.y, first->index.z, doing(first).c_str(), exited->index.x, exited->index.y,
                  exited->index.z);
        return false;
    }
    int count = 0;
    for (int i = 0; i < n_threads; i++) {
        Fiber* g = &fibers[i];
        if (g->kind != first->kind || g->line != first->line || !same_file(g->file, first->file)) {
            set_error("divergent barrier: thread (%u,%u,%u) %s, thread (%u,%u,%u) %s", first->index.x, first->index.y,
                      first->index.z, doing(first).c_str(), g->index.x, g->index.y, g->index.z, doing(g).c_str());
            return false;
        }
        count += (int)g->value;
    }
    int result = first->kind == SYNC_OR ? count > 0 : first->kind == SYNC_AND ? count == n_threads : count;
    if (first->kind == PDL_WAIT) {                 // the predecessor is complete: the guarded arguments open
        block_waited = true;
        guard_arguments(false);
    }
    for (int i = 0; i < n_threads; i++) {
        fibers[i].result = (unsigned long long)result;
        fibers[i].state = READY;
        if (first->kind == PDL_WAIT) fibers[i].pdl_waited = true;
    }
    return true;
}

// ------------------------------------------------------------------------------------------------
// Warp operations

bool power_of_two_width(int w) { return w >= 1 && w <= 32 && (w & (w - 1)) == 0; }

// The lane whose value lane `lane` receives, as the PTX shfl modes define it: lanes outside the
// lane's segment of `width` lanes (above it for down/xor, below it for up) return the lane's own.
int source_lane(int kind, int lane, int arg, int width) {
    int low = lane & ~(width - 1), high = low + width - 1;
    switch (kind) {
    case SHFL_IDX: return low + (arg & (width - 1));
    case SHFL_UP: return lane - arg < low ? lane : lane - arg;
    case SHFL_DOWN: return lane + arg > high ? lane : lane + arg;
    case SHFL_XOR: return (lane ^ arg) > high ? lane : (lane ^ arg);
    default: return lane;
    }
}

// Every lane of the mask has arrived: give each its result and let them all go on.
bool complete_warp_op(Fiber* base, unsigned int mask) {
    const Fiber* f = current;
    unsigned int ballot = 0;
    for (int l = 0; l < 32; l++)
        if ((mask >> l & 1) && base[l].value) ballot |= 1u << l;
    for (int l = 0; l < 32; l++) {
        if (!(mask >> l & 1)) continue;
        Fiber* g = &base[l];
        if (f->kind == BALLOT) {
            g->result = ballot;
        } else if (f->kind != SYNCWARP) {
            int src = source_lane(f->kind, l, g->arg, f->width);
            if (!(mask >> src & 1)) {
                set_error("%s (%s:%d): lane %d reads lane %d, which is not in the mask 0x%08x", warp_name(f->kind),
                          base_name(f->file), f->line, l, src, mask);
                return false;
            }
            g->result = base[src].value;
        }
        g->state = READY;
        warp_waiting[g->linear / 32]--;
    }
    return true;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Called by the kernels (through cuda_on_cpu.h)

int block_sync(int kind, int predicate, const char* file, int line) {
    if (kind == SYNC && line == skip_barrier_line) return 0;
    Fiber* f = current;
    if (kind == PDL_WAIT && f->pdl_waited) {
        set_error("%s (%s:%d) reached a second time: kernels.cu's PDL rule 2 (once per thread)", barrier_name(kind),
                  base_name(file), line);
        fail_in_fiber();
    }
    f->state = AT_BARRIER;
    f->kind = kind, f->file = file, f->line = line, f->value = (unsigned long long)predicate;
    yield(false);
    if (failed) fail_in_fiber();
    return (int)f->result;
}

unsigned long long warp_op(int kind, unsigned int mask, unsigned long long bits, int arg, int width,
                           const char* file, int line) {
    Fiber* f = current;
    const int lane = f->linear % 32, warp = f->linear / 32;
    Fiber* base = &fibers[warp * 32];
    const int lanes_here = n_threads - warp * 32 < 32 ? n_threads - warp * 32 : 32;
    const unsigned int existing = lanes_here == 32 ? 0xffffffffu : (1u << lanes_here) - 1;
    if (!power_of_two_width(width))
        set_error("%s (%s:%d): width %d is not a power of two in [1, 32]", warp_name(kind), base_name(file), line, width);
    else if (!(mask >> lane & 1))
        set_error("%s (%s:%d): lane %d calls it with mask 0x%08x, which leaves the lane out", warp_name(kind),
                  base_name(file), line, lane, mask);
    else if (mask & ~existing)
        set_error("%s (%s:%d): mask 0x%08x names lanes that do not exist (warp %d has %d threads: a block of %d "
                  "threads is not a whole number of warps)", warp_name(kind), base_name(file), line, mask, warp,
                  lanes_here, n_threads);
    if (failed) fail_in_fiber();
    f->state = AT_WARP;
    f->kind = kind, f->mask = mask, f->value = bits, f->arg = arg, f->width = width, f->file = file, f->line = line;
    // Until as many lanes wait as the mask names, the operation cannot be complete: wait without
    // looking at the others (a lane that never comes is then reported by open_barrier).
    bool all_here = ++warp_waiting[warp] >= __builtin_popcount(mask);
    for (int l = 0; l < 32 && all_here && !failed; l++) {
        if (!(mask >> l & 1) || l == lane) continue;
        const Fiber* g = &base[l];
        if (g->state == AT_WARP && (g->kind != kind || g->line != line || !same_file(g->file, file) ||
                                    g->mask != mask || g->width != width))
            set_error("%s (%s:%d) with mask 0x%08x width %d: lane %d of its mask %s (width %d)", warp_name(kind),
                      base_name(file), line, mask, width, l, doing(g).c_str(), g->width);
        else if (g->state == DONE || g->state == AT_BARRIER)
            set_error("%s (%s:%d) with mask 0x%08x: lane %d of its mask %s", warp_name(kind), base_name(file), line,
                      mask, l, doing(g).c_str());
        else if (g->state != AT_WARP)
            all_here = false;
    }
    if (failed) fail_in_fiber();
    if (all_here) {
        if (!complete_warp_op(base, mask)) fail_in_fiber();
    } else {
        yield(false);
        if (failed) fail_in_fiber();
    }
    return f->result;
}

// cp.async: issue, commit, wait (see cuda_on_cpu.h)

void copy_async(void* dst, const void* src, std::size_t bytes, std::size_t zfill, const char* file, int line) {
    Fiber* f = current;
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    bool in_array = arrays.empty();                    // no arguments registered: nothing to check against
    for (const auto& a : arrays) in_array = in_array || (s >= a.first && s + (bytes - zfill) <= a.second);
    if (bytes != 4 && bytes != 8 && bytes != 16)
        set_error("cp.async (%s:%d): %zu bytes; a copy is 4, 8 or 16", base_name(file), line, bytes);
    else if (zfill > bytes)
        set_error("cp.async (%s:%d): zfill %zu > %zu bytes", base_name(file), line, zfill, bytes);
    else if ((reinterpret_cast<std::uintptr_t>(d) | reinterpret_cast<std::uintptr_t>(s)) % bytes)
        set_error("cp.async (%s:%d): %zu-byte copy from %p to %p: both must be %zu-byte aligned", base_name(file),
                  line, bytes, src, dst, bytes);
    else if (d < __start_cuda_shared || d + bytes > __stop_cuda_shared)
        set_error("cp.async (%s:%d): the destination %p is not in shared memory", base_name(file), line, dst);
    else if (!in_array)
        set_error("cp.async (%s:%d): the source %p (+%zu bytes) is outside every array argument of the launch",
                  base_name(file), line, src, bytes - zfill);
    if (failed) fail_in_fiber();
    Fiber::Copy c{d, {}, (int)bytes, f->groups, file, line};
    memcpy(c.bytes, s, bytes - zfill);                 // read now; the zfill tail stays zero
    memset(d, poison_byte, bytes);                     // until the wait, the destination is poison
    f->copies.push_back(c);
}

void copy_async_commit() { current->groups++; }

void copy_async_wait(std::size_t prior) {
    Fiber* f = current;
    const long long done_below = (long long)f->groups - (long long)prior;   // groups older than the `prior` newest
    std::size_t kept = 0;
    for (const Fiber::Copy& c : f->copies) {
        if (c.group < done_below) memcpy(c.dst, c.bytes, c.size);
        else f->copies[kept++] = c;
    }
    f->copies.resize(kept);
}

void pdl_trigger(const char* file, int line) {
    if (!current->pdl_waited) {
        set_error("cudaTriggerProgrammaticLaunchCompletion (%s:%d) before this thread's "
                  "cudaGridDependencySynchronize: kernels.cu's PDL rule 3 (the trigger right after the wait)",
                  base_name(file), line);
        fail_in_fiber();
    }
}

void prefetch_l2(const void* p, unsigned int bytes, const char* file, int line) {
    const unsigned long long a = reinterpret_cast<unsigned long long>(p), n = bytes & ~15u;
    if (a % 16) {
        set_error("prefetch_l2 (%s:%d) of address 0x%llx: not 16-byte aligned (cp.async.bulk.prefetch needs it)",
                  base_name(file), line, a);
        fail_in_fiber();
    }
    for (int i = 0; i < n_regions; i++)
        if (a >= regions[i].begin && a + n <= regions[i].begin + regions[i].bytes) {
            if (regions[i].immutable) return;
            set_error("prefetch_l2 (%s:%d) of argument '%s', which is not IMMUTABLE (kernels.cu: only weights)",
                      base_name(file), line, regions[i].name);
            fail_in_fiber();
        }
    set_error("prefetch_l2 (%s:%d) of %llu bytes at 0x%llx: not inside any argument of the launch", base_name(file),
              line, n, a);
    fail_in_fiber();
}

// ------------------------------------------------------------------------------------------------
// A launch

namespace {

// All threads of the current block, until they have all exited (true) or the launch failed.
bool run_block(int threads, bool shuffled) {
    n_threads = threads;
    const dim3 b = now.block_dim;
    for (int i = 0; i < threads; i++) {
        Fiber* f = &fibers[i];
        f->linear = i;
        f->index = {i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
        f->state = READY;
        f->result = 0;
        f->copies.clear();
        f->groups = 0;
        f->pdl_waited = false;
        start_fiber(f);
        pass_order[i] = i;
    }
    pass_length = threads;
    for (int w = 0; w < (threads + 31) / 32; w++) warp_waiting[w] = 0;
    for (;;) {
        if (shuffled) shuffle_order(pass_order, threads);
        pass_position = 0;
        if (Fiber* first = next_in_pass()) {
            switch_to(nullptr, first, false);          // back here when the pass is over
            if (failed) return false;
            continue;
        }
        bool all_done = true;
        for (int i = 0; i < threads; i++) all_done = all_done && fibers[i].state == DONE;
        if (all_done && pdl_checked && !block_waited) {
            set_error("the block exited without reaching cudaGridDependencySynchronize (kernels.cu's pdl_wait): PDL "
                      "rule 2 (with the PDL attribute, the kernel could complete before its predecessor)");
            return false;
        }
        if (all_done) return true;
        if (!open_barrier()) return false;
    }
}

}  // namespace

int launch(const LaunchConfig* c, void (*thunk)(void**), void** args) {
    std::lock_guard<std::mutex> lock(launch_mutex);
    failed = false;
    error[0] = 0;
    const int threads = (int)(c->block[0] * c->block[1] * c->block[2]);
    if (threads < 1 || threads > MAX_THREADS) {
        snprintf(error, sizeof error, "block of %d threads (1..%d)", threads, MAX_THREADS);
        return 1;
    }
    if (!make_stacks()) {
        snprintf(error, sizeof error, "cannot map fiber stacks");
        return 1;
    }
    kernel_thunk = thunk, kernel_args = args, skip_barrier_line = c->skip_barrier_line, poison_byte = c->poison;
    pdl_checked = c->pdl, regions = c->regions, n_regions = c->n_regions;
#if defined(__SANITIZE_ADDRESS__)
    __asan_set_error_report_callback(name_guarded_argument);
#endif
    now.block_dim = dim3(c->block[0], c->block[1], c->block[2]);
    now.grid_dim = dim3(c->grid[0], c->grid[1], c->grid[2]);
    rng_state = c->seed;
    const long long blocks = (long long)c->grid[0] * c->grid[1] * c->grid[2];
#if defined(__x86_64__)
    const unsigned int saved_csr = _mm_getcsr();
    _mm_setcsr(saved_csr | 0x8040);              // FTZ (bit 15) and DAZ (bit 6), like -ftz=true
#endif
    std::vector<long long> block_order;
    if (c->shuffled) {
        block_order.resize(blocks);
        for (long long i = 0; i < blocks; i++) block_order[i] = i;
        for (long long i = blocks; i > 1; i--) std::swap(block_order[i - 1], block_order[next_random() % i]);
    }
    scheduler_stack_bottom = nullptr;            // this thread's stack: the first fiber tells ASan's view
    for (long long n = 0; n < blocks && !failed; n++) {
        long long i = c->shuffled ? block_order[n] : n;
        now.block = {(unsigned)(i % c->grid[0]), (unsigned)(i / c->grid[0] % c->grid[1]),
                     (unsigned)(i / ((long long)c->grid[0] * c->grid[1]))};
        poison_shared(c->poison, c->shared_begin, c->shared_end);
        block_waited = false;
        guard_arguments(pdl_checked != 0);       // until the block's rendezvous (ASan builds)
        run_block(threads, c->shuffled != 0);
        guard_arguments(false);
    }
#if defined(__x86_64__)
    _mm_setcsr(saved_csr);
#endif
    return failed ? 1 : 0;
}

}  // namespace cuda_cpu

// ------------------------------------------------------------------------------------------------
// For Python

CUDA_CPU_EXPORT const char* cuda_cpu_error() { return cuda_cpu::error; }

// Memory from this library's malloc: under ASan, an exact-size allocation with redzones around it.
// It starts `misalign` (< 16) bytes past malloc's 16-byte boundary, where the array it copies lay
// modulo 16 (a kernel may choose its path by alignment: kernel 7 does); those bytes are poisoned
// like a redzone, so a read before the array is still caught (to ASan's 8-byte granules: bytes that
// share a granule with the array's first ones cannot be poisoned).
CUDA_CPU_EXPORT void* cuda_cpu_malloc(size_t n, size_t misalign) {
    char* p = static_cast<char*>(malloc(n + misalign));
    if (!p) return nullptr;
#if defined(__SANITIZE_ADDRESS__)
    __asan_poison_memory_region(p, misalign);
#endif
    return p + misalign;
}
CUDA_CPU_EXPORT void cuda_cpu_free(void* p, size_t misalign) {
    char* start = static_cast<char*>(p) - misalign;
#if defined(__SANITIZE_ADDRESS__)
    __asan_unpoison_memory_region(start, misalign);
#endif
    free(start);
}

// The next launch's array arguments, n pairs of [begin, end) addresses: cp.async sources must lie in one.
CUDA_CPU_EXPORT void cuda_cpu_set_arrays(const unsigned long long* bounds, int n) {
    cuda_cpu::arrays.clear();
    for (int i = 0; i < n; i++)
        cuda_cpu::arrays.emplace_back(reinterpret_cast<const char*>(bounds[2 * i]),
                                      reinterpret_cast<const char*>(bounds[2 * i + 1]));
}

CUDA_CPU_EXPORT size_t cuda_cpu_shared_bytes() { return (size_t)(__stop_cuda_shared - __start_cuda_shared); }
