"""Programmatic dependent launch from the host side, without a GPU: phi4flash._launch sends a kernel
of PDL_KERNELS through cuda.bindings' cuLaunchKernelEx with the programmatic-stream-serialization
attribute. A fake cuda.bindings driver checks what a real one would be handed: the attribute, the
geometry and stream, and every packed argument read back as the C type kernels.cu declares for it.
Also the fallbacks: no cuda-bindings, a GPU below sm_90, PHI4FLASH_PDL=0, a graph capture that
refuses PDL launches. (The kernels' side of the contract is checked in tests/test_cuda_cpu.py.)"""
import contextlib
import ctypes
import io
import sys
import types

import numpy as np
import pytest

import phi4flash as pf
from cuda_cpu import parse_kernels

SIGNATURES = parse_kernels(open(pf.KERNELS_CU).read())
C_TYPES = {"int": ctypes.c_int32, "long long": ctypes.c_int64, "float": ctypes.c_float}
PROGRAMMATIC = 6   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION in cuda.h


class DeviceArray:
    """Stands in for a CuPy array: what _launch and _c_value read of one (get_xp: a 'cupy' module)."""
    __module__ = "cupy.fake"

    def __init__(self, ptr, dtype=np.float32):
        self.data, self.dtype = types.SimpleNamespace(ptr=ptr), np.dtype(dtype)


class FakeDriver(types.ModuleType):
    """cuda.bindings.driver, as much of it as _launch_pdl uses; cuLaunchKernelEx decodes the void*
    kernelParams array against the kernel's C signature and records the launch."""

    def __init__(self, functions):
        super().__init__("cuda.bindings.driver")
        self.functions, self.launches = functions, []          # CUfunction handle -> kernel name
        self.CUresult = types.SimpleNamespace(CUDA_SUCCESS=0)
        self.CUlaunchAttributeID = types.SimpleNamespace(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION=PROGRAMMATIC)
        self.CUstream = lambda handle: ("CUstream", int(handle))
        self.CUfunction = lambda handle: ("CUfunction", int(handle))
        self.CUlaunchConfig = lambda: types.SimpleNamespace(attrs=[], numAttrs=0)
        self.CUlaunchAttribute = lambda: types.SimpleNamespace(
            id=None, value=types.SimpleNamespace(programmaticStreamSerializationAllowed=0))

    def cuLaunchKernelEx(self, config, f, kernel_params, extra):
        assert f[0] == "CUfunction" and extra == 0 and isinstance(kernel_params, int)
        name = self.functions[f[1]]
        params = SIGNATURES[name].params
        slots = (ctypes.c_void_p * len(params)).from_address(kernel_params)
        values = []
        for (ctype, _), slot in zip(params, slots):
            c = ctypes.c_uint64 if ctype.endswith("*") else C_TYPES[ctype]
            values.append(c.from_address(slot).value)
        self.launches.append({"name": name, "grid": (config.gridDimX, config.gridDimY, config.gridDimZ),
                              "block": (config.blockDimX, config.blockDimY, config.blockDimZ),
                              "shared": config.sharedMemBytes, "stream": config.hStream,
                              "attrs": [(a.id, a.value.programmaticStreamSerializationAllowed)
                                        for a in config.attrs[:config.numAttrs]], "args": values})
        return (0,)


class FakeKernel:
    """What _kernel(name) returns: called for a plain launch; .kernel.ptr is its CUfunction."""

    def __init__(self, name, handle, plain):
        self.name, self.kernel, self.plain = name, types.SimpleNamespace(ptr=handle), plain

    def __call__(self, grid, block, args):
        self.plain.append((self.name, grid, block))


@contextlib.contextmanager
def fake_gpu(monkeypatch, arch="90", bindings=True, pdl_kernels=("gemv_bf16", "layer_norm_rows", "attention_decode_split")):
    """A fake cupy (stream 0x5000, a device of compute capability `arch`) and, when `bindings`, a fake
    cuda.bindings; PDL_KERNELS set, PDL's decision reset. -> (driver or None, plain launches, stderr)."""
    handles = {0x100 + i: name for i, name in enumerate(SIGNATURES)}
    plain = []
    kernels = {name: FakeKernel(name, h, plain) for h, name in handles.items()}
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(ptr=0x5000),
                                      Device=lambda: types.SimpleNamespace(compute_capability=arch))
    driver = FakeDriver(handles) if bindings else None
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
    monkeypatch.setitem(sys.modules, "cuda.bindings", types.SimpleNamespace(driver=driver) if bindings else None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
    monkeypatch.setattr(pf, "_kernel", kernels.__getitem__)
    monkeypatch.setattr(pf, "PDL_KERNELS", frozenset(pdl_kernels))
    monkeypatch.setattr(pf, "_pdl", None)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    yield driver, plain, err


def gemv_args():
    return args_for("gemv_bf16")


def args_for(name):
    """Arguments for kernel `name` built from its C signature: a distinct fake device pointer per
    pointer, and scalars whose values need their whole C width (a long long above 2^32)."""
    args = []
    for i, (ctype, _) in enumerate(SIGNATURES[name].params):
        if ctype.endswith("*"):
            args.append(DeviceArray(0x10000 * (i + 1) + 0x40))
        elif ctype == "int":
            args.append(np.int32(-7 - i))
        elif ctype == "long long":
            args.append(np.int64(2 ** 33 + i))
        else:
            args.append(np.float32(0.1 * (i + 1)))
    return tuple(args)


def expected(args):
    return [a.data.ptr if isinstance(a, DeviceArray) else a.item() for a in args]


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_a_pdl_kernel_goes_through_cuLaunchKernelEx_with_the_attribute_and_its_c_arguments(monkeypatch, name):
    """Every kernel of kernels.cu, as if it were a PDL kernel: the attribute, the geometry, the stream,
    and each argument read back with its C type equal to what was passed."""
    with fake_gpu(monkeypatch, pdl_kernels=[name]) as (driver, plain, err):
        pf._launch(getattr(pf, name), (1280, 3), (256,), args_for(name))
        pf._launch(pf.embed_bf16 if name != "embed_bf16" else pf.embed_f32, (10,), (256,),
                   args_for("embed_bf16" if name != "embed_bf16" else "embed_f32"))
    (launch,) = driver.launches
    assert launch["name"] == name and launch["grid"] == (1280, 3, 1) and launch["block"] == (256, 1, 1)
    assert launch["shared"] == 0 and launch["stream"] == ("CUstream", 0x5000) and launch["attrs"] == [(PROGRAMMATIC, 1)]
    assert launch["args"] == pytest.approx(expected(args_for(name)), rel=1e-7)
    assert len(plain) == 1 and plain[0][0] != name                  # not in PDL_KERNELS: CuPy's own launch
    assert err.getvalue() == ""


@pytest.mark.parametrize("arch, bindings, pdl, message", [
    ("90", False, True, "kernels launch without programmatic dependent launch: cuda-bindings is not installed"),
    ("80", True, True, "kernels launch without programmatic dependent launch: the GPU is sm_80, and it needs sm_90"),
    ("90", True, False, None),                                 # PHI4FLASH_PDL=0: off on purpose, nothing said
])
def test_without_pdl_the_kernels_launch_as_cupy_launches_them(monkeypatch, arch, bindings, pdl, message):
    monkeypatch.setattr(pf, "PDL", pdl)
    with fake_gpu(monkeypatch, arch=arch, bindings=bindings) as (driver, plain, err):
        for _ in range(3):
            pf._launch(pf.gemv_bf16, (1280,), (256,), gemv_args())
    assert plain == [("gemv_bf16", (1280,), (256,))] * 3 and (driver is None or driver.launches == [])
    assert err.getvalue() == ("" if message is None else err.getvalue().splitlines()[0] + "\n")
    assert err.getvalue().count("\n") == (0 if message is None else 1) and (message is None or message in err.getvalue())


def test_a_capture_that_refuses_pdl_launches_is_captured_again_without(monkeypatch):
    """_capture: when the capture fails with PDL on, PDL goes off (one line) and the step is captured
    again with plain launches; a capture failing without PDL falls back to eager steps (as before)."""
    events = []

    class Stream:
        def begin_capture(self):
            events.append("begin")

        def end_capture(self):
            events.append("end")
            return "graph"

    def step_nodes(model, cache, step, stream):
        with_pdl = pf._pdl_driver() is not None
        events.append(f"step pdl={with_pdl}")
        if with_pdl:
            raise RuntimeError("operation not permitted when stream is capturing")

    with fake_gpu(monkeypatch) as (driver, plain, err):
        monkeypatch.setattr(pf, "_step_nodes", step_nodes)
        step = types.SimpleNamespace(graph_error="")
        graph = pf._capture(None, None, step, Stream())
    assert events == ["begin", "step pdl=True", "end", "begin", "step pdl=False", "end"]
    assert graph == "graph" and step.graph_error == ""
    assert err.getvalue().count("\n") == 1 and "from now on: the CUDA graph capture refused them (RuntimeError: " \
        "operation not permitted when stream is capturing)" in err.getvalue()


def test_the_pdl_kernels_are_kernels_of_kernels_cu():
    assert set(pf.PDL_KERNELS) <= set(SIGNATURES)


@pytest.mark.parametrize("weights, kv_dtype", [("bfloat16", "float32"), ("int8", "bfloat16")])
def test_a_decode_step_launches_only_pdl_kernels_after_its_first(tmp_path, monkeypatch, weights, kv_dtype):
    """The embedding row follows the graph's copy-in node (not a kernel) and launches plainly; every
    other kernel of the step keeps the PDL rules and goes with the attribute."""
    import convert
    from conftest import TINY
    from test_gpu import gpu_code_path
    convert.convert(TINY, tmp_path / "m", dtype=weights)
    model = pf.load(tmp_path / "m", kv_dtype=kv_dtype)
    with gpu_code_path(model, monkeypatch) as (gpu, _):
        _, cache = gpu.prefill([5, 68, 417])
        launched, launch = [], pf._launch
        with monkeypatch.context() as m:
            m.setattr(pf, "_launch", lambda twin, *a: launched.append(twin.__name__) or launch(twin, *a))
            gpu.step(cache, 322)
    assert launched[0] == ("embed_int8" if weights == "int8" else "embed_bf16") and launched[0] not in pf.PDL_KERNELS
    assert set(launched[1:]) <= pf.PDL_KERNELS and len(launched) == 45        # the 8-layer fixture: 3 + 42
