"""kernels.cu's real kernels on the CPU, launched from Python on NumPy arrays.

kernels.cu has a NumPy twin for every kernel (phi4flash.py), but the twins are not the kernels. This
module compiles kernels.cu itself, unchanged, with the system C++ compiler:

    g++ -include cuda_cpu/cuda_on_cpu.h  <generated: #include kernels.cu + one entry per kernel>
        cuda_cpu/runtime.cpp  -> kernels.so

cuda_on_cpu.h supplies the CUDA names (threadIdx, __shared__, __syncthreads, __shfl_xor_sync, ...)
and runtime.cpp runs each block's threads as fibers on one OS thread (see both files). From Python:

    k = cuda_cpu.kernels()                           # built once, cached by content hash
    k.launch("gemv_bf16", grid, block, args)         # as CuPy's RawKernel(grid, block, args)
    monkeypatch.setattr(pf, "_launch", cuda_cpu.Launcher())   # the model through the real kernels
    cuda_cpu.run_sanitized(launches)                 # the same launches under ASan + UBSan

Every launch is checked the way a GPU would need it: arguments against the C signature parsed from
kernels.cu (count, dtypes, contiguity or the declared head stride, writability, scalar types
exactly np.int32 / np.int64 / np.float32), block size against the kernel's __launch_bounds__ and
CUDA's limits, grid limits. Errors the runtime finds while running (a divergent barrier, a shuffle
whose mask or width is wrong) raise KernelError naming the kernel, the block and the thread.

cp.async (sm_80+) runs as CUDA's pipeline primitives, which cuda_on_cpu.h implements: a copy's
destination holds the poison byte until the thread waits for it, and its source must lie inside
one of the launch's array arguments.

Options of a launch: order_seed shuffles the block order and the thread order between barriers (a
race-free kernel gives bitwise the same result for every order); poison is the byte written over
the kernel's __shared__ variables before each block (a kernel that reads shared memory it never
wrote gives different results for different bytes); skip_barrier is a source line whose
__syncthreads() does nothing, as if deleted (do the tests notice?); pdl checks kernels.cu's rules
for programmatic dependent launch (every block reaches pdl_wait, and under AddressSanitizer the
arguments not marked IMMUTABLE cannot be touched before it; cuda_on_cpu.h says how). Launcher
launches the kernels of phi4flash.PDL_KERNELS with pdl on. Denormals are flushed
(FTZ/DAZ), as CuPy's NVRTC -ftz=true does; uninitialised locals get a pattern
(-ftrivial-auto-var-init=pattern).

The sanitized build (-fsanitize=address,undefined) cannot be loaded into a Python that was not
started with libasan preloaded, so run_sanitized runs the launches in a child Python with
LD_PRELOAD=libasan; there each pointer argument is copied into a malloc'd buffer of exactly its
extent, so a read one element past a NumPy array is reported. The copy keeps the array's address
modulo 16 (the bytes before it poisoned), so a kernel that looks at alignment takes the same path.

Build folder: tests/.cuda_cpu_build/ (git-ignored), or $CUDA_CPU_BUILD_DIR; one subfolder per
hash of (sources, header, runtime, compiler, flags), so edits rebuild and reruns do not.
"""
import ctypes
import hashlib
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

import numpy as np

assert sys.byteorder == "little", "launch() packs argument values little-endian"

HERE = os.path.dirname(os.path.abspath(__file__))
SUPPORT = os.path.join(HERE, "cuda_cpu")
HEADER = os.path.join(SUPPORT, "cuda_on_cpu.h")
RUNTIME = os.path.join(SUPPORT, "runtime.cpp")

POINTERS = {"const float*": np.float32, "float*": np.float32, "const long long*": np.int64, "long long*": np.int64,
            "const unsigned short*": np.uint16, "unsigned short*": np.uint16, "const signed char*": np.int8,
            "int*": np.int32}
SCALARS = {"int": np.int32, "long long": np.int64, "float": np.float32}
STRIDED = {"kv_head_stride": ("k", "v")}   # a scalar parameter giving the head stride of these pointers

# -fno-strict-aliasing: kernels.cu reads bf16 bits as uint4 and floats as float4, which CUDA allows
# and C++'s aliasing rules do not. No -march: without FMA instructions nothing is contracted, so
# every build (and every machine) rounds the same way. -Wno-unknown-pragmas: #pragma unroll.
COMMON_FLAGS = ["-std=c++17", "-fPIC", "-shared", "-fno-strict-aliasing", "-fvisibility=hidden",
                "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
FAST_FLAGS = ["-O2"]
SANITIZE_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=all", "-fsanitize-sections=cuda_shared"]  # redzones around shared arrays too

Launch = namedtuple("Launch", "name grid block args pdl", defaults=(False,))


class KernelError(RuntimeError):
    """A launch the GPU would refuse, or an error found while the kernel ran; names the kernel."""


class Kernel(namedtuple("Kernel", "name params bound immutable", defaults=(frozenset(),))):
    """One extern "C" __global__ function: params [(C type, name)], bound the text inside
    __launch_bounds__(...) (its first argument), or None; immutable the names of the parameters
    marked IMMUTABLE (kernels.cu: what a PDL kernel may read before its pdl_wait)."""


def default_source():
    import phi4flash
    return phi4flash.KERNELS_CU


# ------------------------------------------------------------------------------------------------
# kernels.cu parsed

def _balanced(text, start):
    """text[start] is '(' -> (the text inside the matching ')', the index after it)."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i], i + 1
    raise ValueError("unbalanced parentheses")


def _top_level_split(text):
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if cur.strip() else parts


def _bodies(lines, name):
    """[(first line, last line)] of every definition of __global__ / __device__ function `name`
    (overloads and template instances share a name), 0-based."""
    found = []
    for start, line in enumerate(lines):
        if not (re.search(rf"\b{name}\(", line.split("//")[0]) and
                re.search(r"__global__|__device__", " ".join(lines[max(0, start - 1):start + 1]))):
            continue
        depth, opened = 0, False
        for i in range(start, len(lines)):
            code = lines[i].split("//")[0]
            if not opened and ";" in code and "{" not in code and ")" in code:
                break                                          # a declaration, not a definition
            depth += code.count("{") - code.count("}")
            opened = opened or "{" in code
            if opened and depth == 0:
                found.append((start, i))
                break
    return found


def barrier_sites(src, name):
    """The plain __syncthreads() calls kernel `name` runs, as (source line, the function it is
    written in, its rank there), in order: its body's, then, in the order they are first called,
    those of the __device__ functions it calls (a template instance's body, a merge step,
    block_sum), followed through their calls in turn."""
    lines = src.split("\n")
    found, seen, todo = [], {name}, [name]
    while todo:
        function = todo.pop(0)
        bodies = _bodies(lines, function)
        if not bodies and function == name:
            raise ValueError(f"no body for {name}")
        rank = 0
        for first, last in bodies:
            for i in range(first + 1, last + 1):
                code = lines[i].split("//")[0]
                if re.search(r"__syncthreads\(\)", code):
                    rank += 1
                    found.append((i + 1, function, rank))
                for callee in re.findall(r"\b(\w+)\s*(?:<[^;{}()]*>)?\s*\(", code):
                    if callee not in seen and _bodies(lines, callee):
                        seen.add(callee)
                        todo.append(callee)
    return found


def barrier_lines(src, name):
    """Source lines of the plain __syncthreads() calls kernel `name` runs (barrier_sites), in order."""
    return [line for line, _, _ in barrier_sites(src, name)]


def parse_kernels(src):
    """{name: Kernel} for every extern "C" __global__ function of CUDA source text `src`."""
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    src = re.sub(r"//[^\n]*", " ", src)
    found = {}
    for m in re.finditer(r'extern\s+"C"\s+__global__\s+void\s+', src):
        pos, bound = m.end(), None
        lb = re.match(r"__launch_bounds__\s*(?=\()", src[pos:])
        if lb:
            inside, pos = _balanced(src, pos + lb.end())
            bound = _top_level_split(inside)[0].strip()
        name = re.match(r"\s*(\w+)\s*(?=\()", src[pos:])
        params_text, _ = _balanced(src, pos + name.end())
        params, immutable = [], set()
        for p in _top_level_split(params_text):
            p = " ".join(p.split())
            marked = re.match(r"IMMUTABLE\s+", p)
            pm = re.fullmatch(r"(.*?\*?)\s*(\w+)", p[marked.end():] if marked else p)
            params.append((pm.group(1).replace(" *", "*").strip(), pm.group(2)))
            if marked:
                immutable.add(pm.group(2))
        found[name.group(1)] = Kernel(name.group(1), params, bound, frozenset(immutable))
    return found


# ------------------------------------------------------------------------------------------------
# Building

def compiler():
    """The C++ compiler to use ($CXX, else g++, else c++), or None."""
    for c in (os.environ.get("CXX"), "g++", "c++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def asan_runtime():
    """Path of the compiler's libasan.so (to preload into the sanitized child), or None."""
    cxx = compiler()
    if cxx is None:
        return None
    out = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return out if os.path.isabs(out) and os.path.exists(out) else None


def build_root():
    root = os.environ.get("CUDA_CPU_BUILD_DIR") or os.path.join(HERE, ".cuda_cpu_build")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:                                    # a read-only checkout: fall back to the temp dir
        root = os.path.join(tempfile.gettempdir(), "cuda_cpu_build")
        os.makedirs(root, exist_ok=True)
    return root


_flag_support = {}


def _supported(cxx, flag):
    if (cxx, flag) not in _flag_support:
        probe = subprocess.run([cxx, flag, "-x", "c++", "-fsyntax-only", "-"], input="", capture_output=True, text=True)
        _flag_support[cxx, flag] = probe.returncode == 0
    return _flag_support[cxx, flag]


def _flags(cxx, sanitize):
    flags = COMMON_FLAGS + (SANITIZE_FLAGS if sanitize else FAST_FLAGS)
    if _supported(cxx, "-ftrivial-auto-var-init=pattern"):  # uninitialised locals get a pattern, not luck
        flags.append("-ftrivial-auto-var-init=pattern")
    return flags


def _entries(name, kernels):
    """The generated translation unit: the CUDA source `name` unchanged, then one launch entry per kernel."""
    lines = [f"// Generated by tests/cuda_cpu.py: {name} unchanged, then a launch entry per kernel.",
             f'#include "{name}"']
    for k in kernels.values():
        lines.append(f"CUDA_CPU_ENTRY({k.name}, {k.bound or 1024})")
    return "\n".join(lines) + "\n"


def build(source=None, sanitize=False):
    """Compile `source` (default phi4flash.KERNELS_CU) -> path of the shared library. Cached."""
    cxx = compiler()
    if cxx is None:
        raise KernelError("no C++ compiler found (g++ or c++, or set CXX)")
    source = source or default_source()
    text = open(source).read()
    name = os.path.basename(source)                            # error messages say name:line
    generated = _entries(name, parse_kernels(text))
    flags = _flags(cxx, sanitize)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([cxx, version, " ".join(flags), text, generated, open(HEADER).read(),
                                    open(RUNTIME).read(), open(__file__).read()]).encode()).hexdigest()[:16]
    root = build_root()
    final = os.path.join(root, f"{os.path.splitext(name)[0]}-{'asan' if sanitize else 'O2'}-{key}")
    lib = os.path.join(final, "kernels.so")
    if os.path.exists(lib):
        os.utime(final)                                        # recently used: kept by _prune
        return lib
    work = tempfile.mkdtemp(dir=root, prefix="tmp-")
    with open(os.path.join(work, name), "w") as f:             # by content: any path of the same text shares a build
        f.write(text)
    with open(os.path.join(work, "kernels_on_cpu.cpp"), "w") as f:
        f.write(generated)
    with open(os.path.join(work, "exports.map"), "w") as f:    # export the entries only: every other symbol stays
        f.write("{ global: cuda_cpu_*; local: *; };\n")         # in its library (a mutated copy has its own)
    cmd = [cxx, *flags, f"-fdebug-prefix-map={work}={final}", "-I", SUPPORT, "-include", HEADER,
           "kernels_on_cpu.cpp", RUNTIME, "-Wl,--version-script=exports.map", "-o", "kernels.so"]
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    with open(os.path.join(work, "build.log"), "w") as f:
        f.write(" ".join(cmd) + "\n" + run.stdout + run.stderr)
    if run.returncode != 0:
        raise KernelError(f"building {source} for the CPU failed:\n{run.stderr[-4000:]}")
    ranges = shared_ranges(os.path.join(work, "kernels.so"))
    if ranges is not None:
        with open(os.path.join(work, "shared.txt"), "w") as f:
            f.write("".join(f"{name} {begin} {end}\n" for name, (begin, end) in ranges.items()))
    try:
        os.rename(work, final)
    except OSError:                                            # another process built it meanwhile
        shutil.rmtree(work, ignore_errors=True)
    _prune(root)
    return lib


def _prune(root, keep=32, stale_tmp_s=3600):
    """Drop all but the `keep` most recently used builds (each edit of a source makes a new one),
    and work folders of builds that died."""
    entries = [os.path.join(root, d) for d in os.listdir(root)]
    now = time.time()
    builds = sorted((e for e in entries if not os.path.basename(e).startswith("tmp-")), key=os.path.getmtime)
    old = builds[:-keep] + [e for e in entries if os.path.basename(e).startswith("tmp-")
                            and now - os.path.getmtime(e) > stale_tmp_s]
    for e in old:
        shutil.rmtree(e, ignore_errors=True)


def shared_ranges(lib):
    """{kernel: (first, last + 1)} byte offsets of its __shared__ variables in the section, from the
    symbol table (g++ names them kernel::variable), so that only they are poisoned per block.
    None (poison the whole section) without nm, or if some shared variable belongs to no kernel
    (one declared in a __device__ helper)."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    listing = subprocess.run([nm, "-C", "-S", "--defined-only", lib], capture_output=True, text=True).stdout
    symbols = {}
    for line in listing.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 4:
            symbols[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
        elif len(parts) == 3:
            symbols[parts[2]] = (int(parts[0], 16), 0)
    if "__start_cuda_shared" not in symbols or "__stop_cuda_shared" not in symbols:
        return None
    start, stop = symbols["__start_cuda_shared"][0], symbols["__stop_cuda_shared"][0]
    ranges = {}
    for name, (address, size) in symbols.items():
        if not start <= address < stop or size == 0 or name == "cuda_cpu_shared_anchor":
            continue                                             # (size 0: linker labels such as __TMC_END__)
        kernel = re.fullmatch(r"(\w+)::\w+", name)
        if kernel is None:
            return None
        lo, hi = ranges.get(kernel.group(1), (address - start, address - start + size))
        ranges[kernel.group(1)] = (min(lo, address - start), max(hi, address - start + size))
    return ranges


def build_log(lib):
    """The compiler command and its output (warnings) for the library at `lib`."""
    return open(os.path.join(os.path.dirname(lib), "build.log")).read()


# ------------------------------------------------------------------------------------------------
# Arrays: extents and layout-preserving copies

def extent(a):
    """Bytes from a's first element to the end of its last (positive strides only)."""
    if a.size == 0:
        return 0
    if any(s < 0 for s in a.strides):
        raise KernelError(f"array with negative strides {a.strides}")
    return sum((n - 1) * s for n, s in zip(a.shape, a.strides)) + a.itemsize


def clone(a):
    """A copy of array `a` with the same shape, dtype, strides (a prefix view stays a view of a
    buffer just large enough) and address modulo 64, so that a kernel sees the same layout: an
    explicit head stride reads the same rows, and the GEMV picks the same (16-byte) path."""
    n = extent(a)
    buf = np.empty(n + 64, np.uint8)
    offset = (a.ctypes.data - buf.ctypes.data) % 64
    if n:
        ctypes.memmove(buf.ctypes.data + offset, a.ctypes.data, n)
    return np.ndarray(a.shape, a.dtype, buf, offset, a.strides)


def clone_args(args):
    return [clone(a) if isinstance(a, np.ndarray) else a for a in args]


# ------------------------------------------------------------------------------------------------
# Launching

class Region(ctypes.Structure):
    _fields_ = [("begin", ctypes.c_ulonglong), ("bytes", ctypes.c_ulonglong), ("immutable", ctypes.c_int),
                ("name", ctypes.c_char_p)]


class LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("seed", ctypes.c_ulonglong),
                ("shuffled", ctypes.c_int), ("poison", ctypes.c_int),
                ("shared_begin", ctypes.c_ulonglong), ("shared_end", ctypes.c_ulonglong),
                ("skip_barrier_line", ctypes.c_int), ("pdl", ctypes.c_int),
                ("regions", ctypes.POINTER(Region)), ("n_regions", ctypes.c_int)]


def _dims(what, dims):
    dims = tuple(int(d) for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
    if not 1 <= len(dims) <= 3:
        raise KernelError(f"{what} {dims}: 1 to 3 dimensions")
    return dims + (1,) * (3 - len(dims))


class Kernels:
    """The kernels of one CUDA source file, compiled for the CPU and loaded with ctypes."""

    def __init__(self, source=None, lib=None, exact_buffers=False):
        self.source = source or default_source()
        self.kernels = parse_kernels(open(self.source).read())
        self.path = lib or build(self.source)
        self.lib = ctypes.CDLL(self.path)
        self.lib.cuda_cpu_error.restype = ctypes.c_char_p
        self.lib.cuda_cpu_malloc.restype = ctypes.c_void_p
        self.lib.cuda_cpu_malloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
        self.lib.cuda_cpu_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.lib.cuda_cpu_set_arrays.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.exact_buffers = exact_buffers              # copy pointer arguments into exact-size mallocs (ASan)
        self.shared = self._shared_ranges()
        self.bounds, self.entries = {}, {}
        for name, k in self.kernels.items():
            params = getattr(self.lib, f"cuda_cpu_params_{name}")
            params.restype = ctypes.c_char_p
            compiled = params().decode().split(",")
            if compiled != [t for t, _ in k.params]:     # the C++ compiler's view vs our parser's
                raise KernelError(f"{name}: parsed parameter types {[t for t, _ in k.params]} != compiled {compiled}")
            self.bounds[name] = getattr(self.lib, f"cuda_cpu_bound_{name}")()
            entry = getattr(self.lib, f"cuda_cpu_launch_{name}")
            entry.argtypes, entry.restype = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p], ctypes.c_int
            self.entries[name] = entry

    def _shared_ranges(self):
        """kernel -> (begin, end) of its shared variables in the section, as build() found them;
        (0, 0) for a kernel without any; everything when they could not be found."""
        path = os.path.join(os.path.dirname(self.path), "shared.txt")
        if not os.path.exists(path):
            return {name: (0, 2 ** 64 - 1) for name in self.kernels}
        ranges = {name: (0, 0) for name in self.kernels}
        for line in open(path):
            name, begin, end = line.split()
            ranges[name] = (int(begin), int(end))
        return ranges

    def __contains__(self, name):
        return name in self.kernels

    def check_geometry(self, name, grid, block):
        grid, block = _dims("grid", grid), _dims("block", block)
        if min(grid) < 1 or grid[0] > 2 ** 31 - 1 or grid[1] > 65535 or grid[2] > 65535:
            raise KernelError(f"{name}: grid {grid} outside CUDA's limits (x < 2^31, y, z <= 65535, all >= 1)")
        threads = math.prod(block)
        if min(block) < 1 or block[0] > 1024 or block[1] > 1024 or block[2] > 64 or threads > 1024:
            raise KernelError(f"{name}: block {block} outside CUDA's limits (<= 1024 threads, z <= 64)")
        if threads > self.bounds[name]:
            raise KernelError(f"{name}: block of {threads} threads exceeds __launch_bounds__({self.kernels[name].bound})"
                              f" = {self.bounds[name]}")
        return grid, block

    def check_args(self, name, args):
        """Each argument against its C parameter, as the GPU would need it -> the values to pass."""
        params = self.kernels[name].params
        if len(args) != len(params):
            raise KernelError(f"{name}: {len(args)} arguments for {len(params)} parameters")
        named = dict(zip((p for _, p in params), args))
        strided = {p for stride, ptrs in STRIDED.items() if stride in named for p in ptrs}
        values = []
        for (ctype, pname), a in zip(params, args):
            if ctype in POINTERS:
                if not isinstance(a, np.ndarray) or a.dtype != POINTERS[ctype]:
                    raise KernelError(f"{name}: {pname} must be a {np.dtype(POINTERS[ctype])} array ({ctype}), "
                                      f"got {type(a).__name__} {getattr(a, 'dtype', '')}")
                if not ctype.startswith("const") and not a.flags.writeable:
                    raise KernelError(f"{name}: {pname} ({ctype}) is written but the array is read-only")
                if pname in strided:
                    self._check_strided(name, pname, a, named)
                elif not a.flags.c_contiguous:
                    raise KernelError(f"{name}: {pname} must be C-contiguous, strides {a.strides}")
                values.append(a)
            elif ctype in SCALARS:
                want = SCALARS[ctype]
                if type(a) is not want:                  # CuPy would pass a Python int as 8 bytes
                    raise KernelError(f"{name}: {pname} ({ctype}) must be {want.__name__}, got {type(a).__name__}")
                values.append(a)
            else:
                raise KernelError(f"{name}: parameter type {ctype} of {pname} is not supported by the harness")
        return values

    @staticmethod
    def _check_strided(name, pname, a, named):
        stride = next(int(named[s]) for s, ptrs in STRIDED.items() if pname in ptrs)
        want = (a.itemsize * stride, a.itemsize * a.shape[2], a.itemsize) if a.ndim == 3 else None
        if a.strides != want:
            raise KernelError(f"{name}: {pname} must be (heads, rows, hd) with contiguous rows and heads "
                              f"{stride} elements apart, got strides {a.strides}")

    def launch(self, name, grid, block, args, order_seed=None, poison=0xFF, skip_barrier=None, pdl=False):
        """Run kernel `name` over `grid` x `block` on the NumPy arrays in `args` (outputs in place).
        order_seed: None for index order, else the seed of a shuffled block and thread order.
        skip_barrier: a source line whose __syncthreads() is to do nothing, as if deleted (to show
        that the tests notice; no rebuild needed). pdl: check kernels.cu's PDL rules (every block
        reaches pdl_wait; under ASan, the arguments not marked IMMUTABLE are untouchable until it)."""
        if name not in self.kernels:
            raise KernelError(f"no kernel {name} in {self.source}")
        grid, block = self.check_geometry(name, grid, block)
        values = self.check_args(name, args)
        config = LaunchConfig(grid, block, 0 if order_seed is None else int(order_seed), order_seed is not None,
                              int(poison) & 0xFF, *self.shared[name], skip_barrier or 0, int(bool(pdl)))
        # As cudaLaunchKernel takes them: an array of pointers to the argument values, here one
        # 8-byte slot per argument (little-endian, so an int32 or float sits in the low 4 bytes).
        slots = (ctypes.c_uint64 * len(values))()
        copies, bounds, regions = [], [], []
        for i, ((ctype, pname), v) in enumerate(zip(self.kernels[name].params, values)):
            if isinstance(v, np.ndarray):
                slots[i] = self._pointer(v, not ctype.startswith("const"), copies)
                bounds += [slots[i], slots[i] + extent(v)]        # cp.async sources must lie in an argument
                regions.append(Region(slots[i], extent(v), pname in self.kernels[name].immutable, pname.encode()))
            else:
                slots[i] = int(v.view(np.uint32 if v.itemsize == 4 else np.uint64))
        config.regions, config.n_regions = (Region * len(regions))(*regions), len(regions)
        base = ctypes.addressof(slots)
        argv = (ctypes.c_void_p * len(values))(*range(base, base + 8 * len(values), 8))
        self.lib.cuda_cpu_set_arrays((ctypes.c_uint64 * len(bounds))(*bounds), len(bounds) // 2)
        try:
            rc = self.entries[name](ctypes.byref(config), argv)
        finally:
            for ptr, v, n, written in copies:
                if written:
                    ctypes.memmove(v.ctypes.data, ptr, n)
                self.lib.cuda_cpu_free(ptr, v.ctypes.data % 16)
        if rc:
            raise KernelError(f"{name}: {self.lib.cuda_cpu_error().decode()}")

    def _pointer(self, a, written, copies):
        """The address to pass for array `a`: its own, or with exact_buffers that of a malloc'd copy
        of exactly its extent at the same address modulo 16 (recorded in `copies` to be copied back
        and freed)."""
        if not self.exact_buffers:
            return a.ctypes.data
        n = extent(a)
        ptr = self.lib.cuda_cpu_malloc(n, a.ctypes.data % 16)
        if n:
            ctypes.memmove(ptr, a.ctypes.data, n)
        copies.append((ptr, a, n, written))
        return ptr or 0


_loaded = {}


def kernels(source=None):
    """Kernels of `source` (default kernels.cu), built and loaded once per process and content."""
    source = os.path.realpath(source or default_source())
    key = (source, hashlib.sha256(open(source, "rb").read()).hexdigest())
    if key not in _loaded:
        _loaded[key] = Kernels(source)
    return _loaded[key]


class Launcher:
    """A drop-in for phi4flash._launch(twin, grid, block, args): runs the REAL kernel named like the
    twin on the NumPy arrays, and counts the launches per kernel. The kernels phi4flash launches with
    programmatic dependent launch (PDL_KERNELS) are launched with their PDL rules checked."""

    def __init__(self, compiled=None, **launch_options):
        self.kernels = compiled or kernels()
        self.options, self.counts = launch_options, {}       # order_seed, poison, skip_barrier

    def __call__(self, twin, grid, block, args):
        import phi4flash
        name = twin.__name__
        self.kernels.launch(name, grid, block, args, **{"pdl": name in phi4flash.PDL_KERNELS, **self.options})
        self.counts[name] = self.counts.get(name, 0) + 1


def launcher(**options):
    """Launcher(**options): e.g. monkeypatch.setattr(pf, "_launch", cuda_cpu.launcher(order_seed=3))."""
    return Launcher(**options)


# ------------------------------------------------------------------------------------------------
# The sanitized build, in a child process

def _pack(a):
    """An array argument as picklable (bytes of its extent, dtype, shape, strides, address modulo 64):
    pickle alone would make a strided view contiguous, or move it, and change what the kernel sees."""
    n = extent(a)
    return ("array", ctypes.string_at(a.ctypes.data, n) if n else b"", a.dtype.str, a.shape, a.strides,
            a.ctypes.data % 64)


def _unpack(p):
    _, data, dtype, shape, strides, address = p
    buf = np.empty(len(data) + 64, np.uint8)
    offset = (address - buf.ctypes.data) % 64
    buf[offset:offset + len(data)] = np.frombuffer(data, np.uint8)
    return np.ndarray(shape, np.dtype(dtype), buf, offset, strides)


def _pack_args(args):
    return [_pack(a) if isinstance(a, np.ndarray) else a for a in args]


def _unpack_args(args):
    return [_unpack(a) if isinstance(a, tuple) and a and a[0] == "array" else a for a in args]


def run_sanitized(launches, source=None, order_seed=None, poison=0xFF, timeout=900):
    """Run [Launch(name, grid, block, args)] with the ASan + UBSan build in a child Python, in order
    -> the argument lists after each launch (the inputs are not modified). Raises KernelError with
    the sanitizer's report if it finds anything, or with the harness's own message."""
    source = os.path.realpath(source or default_source())
    libasan = asan_runtime()
    if libasan is None:
        raise KernelError("the compiler's libasan.so was not found")
    lib = build(source, sanitize=True)
    with tempfile.TemporaryDirectory() as tmp:
        request, reply = os.path.join(tmp, "request.pkl"), os.path.join(tmp, "reply.pkl")
        with open(request, "wb") as f:
            pickle.dump({"source": source, "lib": lib, "order_seed": order_seed, "poison": poison,
                         "launches": [(n, g, b, _pack_args(a), pdl) for n, g, b, a, pdl in (Launch(*x) for x in launches)]},
                        f)
        env = dict(os.environ)
        env["LD_PRELOAD"] = libasan + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
        env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:exitcode=66"   # Python itself leaks by design
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=67"
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--sanitized-worker", request, reply],
                             env=env, capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0 or not os.path.exists(reply):
            raise KernelError(f"sanitized run failed (exit {run.returncode}):\n{run.stderr[-6000:]}")
        with open(reply, "rb") as f:
            result = pickle.load(f)
    if "error" in result:
        raise KernelError(result["error"])
    return [_unpack_args(a) for a in result["args"]]


def _sanitized_worker(request, reply):
    with open(request, "rb") as f:
        job = pickle.load(f)
    k = Kernels(job["source"], lib=job["lib"], exact_buffers=True)
    out = []
    try:
        for name, grid, block, args, pdl in job["launches"]:
            args = _unpack_args(args)
            k.launch(name, grid, block, args, job["order_seed"], job["poison"], pdl=pdl)
            out.append(_pack_args(args))
        result = {"args": out}
    except KernelError as e:
        result = {"error": str(e)}
    with open(reply, "wb") as f:
        pickle.dump(result, f)


if __name__ == "__main__" and sys.argv[1:2] == ["--sanitized-worker"]:
    _sanitized_worker(*sys.argv[2:4])
