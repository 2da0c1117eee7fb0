"""The GPU host path, on the CPU: what one decode step asks of the device, through a fake CuPy.

FakeCupy is a module object with the CuPy surface appendix A uses on the way to a decode step
(streams, pinned memory, cudaMemcpyAsync, graph capture and launch, synchronisation, RawModule
kernels, the array functions of new_cache / fuse_for_decode / _lambdas), and nothing else. It is
honest in three ways:
  * an attribute it does not define is recorded (FakeCupy.missing) and raises, so code that calls
    more of CuPy than the fake knows fails a test instead of passing it;
  * it behaves like a device: every operation is queued on the stream that issued it (a node of the
    graph while that stream captures) and runs only when that stream, or the whole device, is
    synchronised; memory comes poisoned (all bits set: NaN floats, -1 ints), so a read that is not
    ordered after its write sees the poison, as a race on a GPU would;
  * it refuses what a GPU refuses: a copy between pageable host memory and the device inside a
    capture, a copy whose pointers are not in the memory its kind says, an allocation or a
    synchronisation while a stream captures, an implicit conversion of a device array to NumPy.
Kernels run their NumPy twins from phi4flash.py on the arrays underneath.

The tests count what one step does after the first two (eager, captured): one graph launch and one
synchronisation of the model's stream, nothing else; the returned logits equal eager steps' bit
for bit and a kept logits array is never overwritten; a graph is captured again, never replayed,
for another model or weights fuse_for_decode made again; graphs off and a refused capture step
eagerly through the same pinned buffers.
"""
import dataclasses
import itertools
import os
import sys
import types

import numpy as np
import pytest

import phi4flash as pf
from conftest import ROOT
from test_gpu import random_model


class Strict:
    """Attributes of a fake CuPy namespace: any other is recorded in fake.missing and raises."""

    def __init__(self, fake, name, **attrs):
        self.__dict__.update(attrs, _fake=fake, _name=name)

    def __getattr__(self, attr):
        if attr.startswith("__"):  # a protocol probe (NumPy's, pytest's), not a call into CuPy
            raise AttributeError(attr)
        self._fake.missing.append(f"{self._name}.{attr}")
        raise AttributeError(f"the fake CuPy has no {self._name}.{attr}")


class FakeStream:
    def __init__(self, fake, name):
        self.fake, self.name, self.ptr = fake, name, next(fake.handles)
        self.queue, self.nodes = [], None          # nodes: the graph being captured, else None

    def __enter__(self):
        self.fake.current.append(self)
        return self

    def __exit__(self, *exc):
        self.fake.current.pop()

    def synchronize(self):
        self.fake.call("synchronize", self)
        if self.fake.capturing():
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: synchronize while a stream captures")
        self.fake.run(lambda op: op[1] is self)

    def begin_capture(self, mode=None):
        self.fake.call("begin_capture", self)
        if self.fake.refuse_capture:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: refused by the test")
        assert self.nodes is None
        self.nodes = []

    def end_capture(self):
        self.fake.call("end_capture", self)
        graph, self.nodes = FakeGraph(self.fake, self.nodes), None
        return graph

    def __getattr__(self, attr):
        self.fake.missing.append(f"Stream.{attr}")
        raise AttributeError(f"the fake CuPy's Stream has no {attr}")


class FakeGraph:
    def __init__(self, fake, nodes):
        self.fake, self.nodes = fake, nodes

    def launch(self, stream=None):
        self.fake.call("graph.launch", stream, graph=self)
        for name, fn in self.nodes:
            self.fake.queue_on(stream, name, fn)

    def __getattr__(self, attr):
        self.fake.missing.append(f"Graph.{attr}")
        raise AttributeError(f"the fake CuPy's Graph has no {attr}")


class FakePinned(bytearray):
    """What cupy.cuda.alloc_pinned_memory returns: a buffer (NumPy can view it) with a .ptr."""


class FakeArray:
    """A device array: a NumPy view into memory the fake allocated; its values are read only by
    queued operations (kernels, copies), never by the host."""
    __module__ = "cupy._fake"  # get_xp's test for a device array

    def __init__(self, fake, a):
        self._fake, self._a = fake, a

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.ctypes.data))

    def _view(self, a):
        assert np.shares_memory(a, self._a), "the fake supports views only here"
        return FakeArray(self._fake, a)

    def __getitem__(self, index):
        return self._view(self._a[index])

    def reshape(self, *shape):
        return self._view(self._a.reshape(*shape))

    def view(self, dtype):
        return self._view(self._a.view(dtype))

    def astype(self, dtype, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return self._fake.compute("astype", lambda a: a.astype(dtype), self)

    def sum(self):
        return self._fake.compute("sum", lambda a: a.sum(), self)

    def __mul__(self, other):
        return self._fake.compute("multiply", lambda a, b: a * b, self, other)

    def __add__(self, other):
        return self._fake.compute("add", lambda a, b: a + b, self, other)

    def __lshift__(self, other):
        return self._fake.compute("left_shift", lambda a, b: a << b, self, other)

    def __sub__(self, other):
        return self._fake.compute("subtract", lambda a, b: a - b, self, other)

    def __setitem__(self, index, value):
        self._fake.call("setitem", self._fake.current[-1])
        self._fake.queue("setitem", lambda: self._a.__setitem__(index, self._fake.host(value)))

    def copy(self):
        return self._fake.compute("copy", lambda a: a.copy(), self)

    def fill(self, value):
        self._fake.call("fill", self._fake.current[-1])
        self._fake.queue("fill", lambda: self._a.fill(value))

    def get(self, stream=None):
        stream = stream or self._fake.current[-1]
        self._fake.call("get", stream)
        self._fake.run(lambda op: op[1] is stream)
        return self._a.copy()

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (as CuPy)")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        self._fake.missing.append(f"ndarray.{attr}")
        raise AttributeError(f"the fake CuPy's ndarray has no {attr}")


class FakeCupy(types.ModuleType):
    """The fake `cupy` module (see the docstring of this file). calls: [(what, stream name)], in order."""

    def __init__(self):
        super().__init__("cupy")
        self.missing, self.calls, self.pending, self.refuse_capture = [], [], [], False
        self.handles, self.order = itertools.count(0x1000), itertools.count()
        self.device_memory, self.pinned_memory, self.made = [], [], []
        null = FakeStream(self, "null")
        self.current = [null]
        self.float32, self.int64, self.int32, self.int8, self.uint16, self.uint32 = (np.float32, np.int64, np.int32,
                                                                                 np.int8, np.uint16, np.uint32)
        runtime = Strict(self, "cuda.runtime", memcpyHostToDevice=1, memcpyDeviceToHost=2,
                         memcpyAsync=self.memcpyAsync, deviceSynchronize=self.deviceSynchronize,
                         getDeviceProperties=lambda device: {"multiProcessorCount": 4})
        self.cuda = Strict(self, "cuda", runtime=runtime, alloc_pinned_memory=self.alloc_pinned_memory,
                           Stream=self.Stream, Device=lambda: types.SimpleNamespace(id=0))  # device_sms asks once

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        self.missing.append(attr)
        raise AttributeError(f"the fake CuPy has no {attr}")

    # --- the device: queues, memory, calls

    def call(self, what, stream, **detail):
        self.calls.append((what, getattr(stream, "name", stream), *detail.values()))

    def capturing(self):
        return any(s.nodes is not None for s in self.streams())

    def streams(self):
        return {op[1] for op in self.pending} | set(self.current) | set(self.made)

    def queue(self, name, fn):
        self.queue_on(self.current[-1], name, fn)

    def queue_on(self, stream, name, fn):
        if stream.nodes is not None:
            stream.nodes.append((name, fn))
        else:
            self.pending.append((next(self.order), stream, name, fn))

    def run(self, which):
        """Run the queued operations `which` selects, in the order they were issued."""
        ready = [op for op in self.pending if which(op)]
        self.pending = [op for op in self.pending if not which(op)]
        for op in ready:
            op[3]()

    def alloc(self, shape, dtype):
        if self.capturing():
            raise RuntimeError("an allocation while a stream captures: the graph would keep its address")
        a = np.empty(shape, dtype)
        a.reshape(-1).view(np.uint8).fill(0xFF)   # poison: NaN floats, -1 ints
        self.device_memory.append(a)
        return FakeArray(self, a)

    def host(self, x):
        return x._a if isinstance(x, FakeArray) else x

    def compute(self, name, fn, *inputs):
        """out = fn(*inputs), queued on the current stream; out is allocated now (poisoned)."""
        meta = fn(*(np.zeros_like(x._a) if isinstance(x, FakeArray) else x for x in inputs))
        out = self.alloc(np.shape(meta), np.asarray(meta).dtype)
        self.call(name, self.current[-1])
        self.queue(name, lambda: out._a.__setitem__(..., fn(*map(self.host, inputs))))
        return out

    def region(self, ptr, n, memory):
        return any(a.ctypes.data <= ptr and ptr + n <= a.ctypes.data + a.nbytes for a in memory)

    # --- the CuPy surface

    def Stream(self, non_blocking=False):
        assert non_blocking, "phi4flash's stream must not synchronise with the legacy default stream"
        stream = FakeStream(self, "model")
        self.made.append(stream)
        return stream

    def alloc_pinned_memory(self, nbytes):
        self.call("alloc_pinned_memory", None)
        mem = FakePinned(b"\xff" * nbytes)
        mem.ptr = np.frombuffer(mem, np.uint8).ctypes.data
        self.pinned_memory.append(np.frombuffer(mem, np.uint8))
        return mem

    def memcpyAsync(self, dst, src, nbytes, kind, stream_ptr):
        stream = next(s for s in self.streams() if s.ptr == stream_ptr)
        self.call({1: "memcpy H2D", 2: "memcpy D2H"}[kind], stream)
        host, device = (src, dst) if kind == 1 else (dst, src)
        assert self.region(host, nbytes, self.pinned_memory), "a host side that is not pinned memory"
        assert self.region(device, nbytes, self.device_memory), "a device side that is not device memory"
        import ctypes
        self.queue_on(stream, f"memcpy {'H2D' if kind == 1 else 'D2H'}", lambda: ctypes.memmove(dst, src, nbytes))

    def deviceSynchronize(self):
        self.call("deviceSynchronize", None)
        self.run(lambda op: True)

    def zeros(self, shape, dtype=np.float32):
        return self.compute("zeros", lambda: np.zeros(shape, dtype))

    def full(self, shape, value, dtype=None):
        return self.compute("full", lambda: np.full(shape, value, dtype))

    def concatenate(self, arrays, axis=0):
        return self.compute("concatenate", lambda *a: np.concatenate(a, axis), *arrays)

    def exp(self, a):
        return self.compute("exp", np.exp, a)

    def asarray(self, a, dtype=None):
        if isinstance(a, FakeArray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        a = np.array(a, dtype)
        return self.compute("asarray (host to device)", lambda: a)

    def ascontiguousarray(self, a, dtype=None):
        if a._a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        return self.compute("ascontiguousarray", lambda x: np.ascontiguousarray(x, dtype), a)

    def RawModule(self, code, options=()):
        return Strict(self, "RawModule", get_function=lambda name: self.kernel(name))

    def kernel(self, name):
        twin = getattr(pf, name)

        def launch(grid, block, args):
            self.call("kernel", self.current[-1], name=name)
            self.queue(name, lambda: twin(*map(self.host, args)))
        return launch


LAUNCH = pf._launch  # as imported: a test elsewhere may leave a wrapper of it in place


@pytest.fixture
def fake(monkeypatch):
    cupy = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(pf, "_module", None)     # kernels "compiled" by the fake, forgotten afterwards
    monkeypatch.setattr(pf, "_launch", LAUNCH)
    yield cupy
    assert cupy.missing == [], f"the code used CuPy beyond the fake: {cupy.missing}"


def on_fake(cpu_model, fake):
    """cpu_model as load(device="cuda") makes it, on the fake device: every array copied to device
    memory (split projections only), then fuse_for_decode there."""
    dev = fake.asarray
    fused = {"mamba": ("in_proj", "x_proj"), "attn": ("Wqkv", "bqkv"), "mlp": ("fc1",)}  # fuse_for_decode's own
    layers = [{g: {k: dev(a) for k, a in p.items() if k not in fused.get(g, ())} for g, p in layer.items()}
              for layer in cpu_model.layers]
    gpu = dataclasses.replace(cpu_model, embed_tokens=dev(cpu_model.embed_tokens), layers=layers, device="cuda",
                              final_layernorm={k: dev(a) for k, a in cpu_model.final_layernorm.items()})
    return pf.fuse_for_decode(gpu)


def greedy(model, cache, token, steps, keep=None):
    """`steps` greedy decode steps from `token` -> the logits of each (the arrays model.step returned)."""
    out = []
    for _ in range(steps):
        out.append(model.step(cache, token))
        token = int(np.argmax(out[-1]))
    return out


def calls_of(fake, fn):
    """The device calls made while fn() runs -> (fn's result, [calls])."""
    n = len(fake.calls)
    result = fn()
    return result, fake.calls[n:]


# ------------------------------------------------------------------------------------------------

def test_a_steady_decode_step_is_one_graph_launch_and_one_sync(model, fake):
    gpu = on_fake(model, fake)
    cache = gpu.new_cache(64)
    _, eager = calls_of(fake, lambda: gpu.step(cache, 5))
    _, captured = calls_of(fake, lambda: gpu.step(cache, 68))
    device_work = [c for c in eager if c[0] not in ("deviceSynchronize", "alloc_pinned_memory")]
    assert eager[0] == ("deviceSynchronize", None)                        # once: the cache new_cache() zeroed
    assert all(c[1] == "model" for c in device_work)                      # the step's buffers, λ, kernels: one stream
    kernels = [c for c in device_work if c[0] == "kernel"]
    assert device_work[-len(kernels) - 4:] == [("memcpy H2D", "model"), *kernels, ("memcpy D2H", "model"),  # error flag
                                               ("memcpy D2H", "model"),                                  # logits
                                               ("synchronize", "model")]
    assert [c[0] for c in captured] == ["begin_capture", "memcpy H2D", *["kernel"] * len(kernels), "memcpy D2H", "memcpy D2H",
                                        "end_capture", "graph.launch", "synchronize"]
    graph = cache.cuda.graph
    assert [n for n, _ in graph.nodes][0] == "memcpy H2D" and [n for n, _ in graph.nodes][-1] == "memcpy D2H"
    for token in (417, 322, 76, 5):
        _, steady = calls_of(fake, lambda: gpu.step(cache, token))
        assert steady == [("graph.launch", "model", graph), ("synchronize", "model")], steady
    assert cache.cuda.eager_steps == 1 and cache.length == 6


@pytest.mark.parametrize("capacity", [64, 2])  # 2: the shared K/V grows at steps 3, 5 and 9: captured again each time
def test_graph_replays_equal_eager_steps_and_kept_logits_stay(model, fake, monkeypatch, capacity):
    gpu = on_fake(model, fake)
    cache = gpu.new_cache(capacity)
    logits = greedy(gpu, cache, 5, 12)
    kept = [a.copy() for a in logits]
    monkeypatch.setattr(pf, "CUDA_GRAPHS", False)
    eager_cache = gpu.new_cache(capacity)
    eager = greedy(gpu, eager_cache, 5, 12)
    for got, want, still in zip(logits, eager, kept):
        assert np.array_equal(got, want)                                  # replays = eager steps, bit for bit
        assert np.array_equal(got, still)                                 # and no later step wrote into them
        assert not np.shares_memory(got, cache.cuda.host_logits)
    assert cache.cuda.eager_steps == 1 and eager_cache.cuda.eager_steps == 12 and eager_cache.cuda.graph is None
    captures = sum(c[0] == "begin_capture" for c in fake.calls)
    assert captures == (1 if capacity == 64 else 4)
    cpu_cache = model.new_cache(capacity)
    want = greedy(model, cpu_cache, 5, 12)
    assert max(float(np.abs(a - b).max()) for a, b in zip(logits, want)) <= 1e-4  # the twins vs the CPU path


def test_graphs_off_steps_eagerly_through_the_same_pinned_buffers(model, fake, monkeypatch):
    monkeypatch.setattr(pf, "CUDA_GRAPHS", False)
    gpu = on_fake(model, fake)
    cache = gpu.new_cache(64)
    gpu.step(cache, 5)
    for token in (68, 417):
        _, calls = calls_of(fake, lambda: gpu.step(cache, token))
        whats = [c[0] for c in calls]
        assert whats[0] == "memcpy H2D" and whats[-3:] == ["memcpy D2H", "memcpy D2H", "synchronize"]  # flag, logits
        assert set(whats[1:-3]) == {"kernel"} and all(c[1] == "model" for c in calls)


def test_a_refused_capture_falls_back_to_eager_steps(model, fake, capsys):
    fake.refuse_capture = True
    gpu = on_fake(model, fake)
    cache = gpu.new_cache(64)
    logits = greedy(gpu, cache, 5, 4)
    assert cache.cuda.graph is None and cache.cuda.eager_steps == 4
    assert "cudaErrorStreamCaptureUnsupported" in cache.cuda.graph_error
    assert capsys.readouterr().err.count("CUDA graph capture failed") == 1
    fake.refuse_capture = False
    want = greedy(gpu, gpu.new_cache(64), 5, 4)
    assert all(np.array_equal(a, b) for a, b in zip(logits, want))


def test_a_graph_is_captured_again_for_another_model(model, fake):
    """A cache decoded by model A, then by model B (same config, other weights): B's step is
    captured again with B's weights and λ, never A's graph replayed."""
    a, b_cpu = on_fake(model, fake), dataclasses.replace(random_model(model.config, seed=7), device="cpu")
    b = on_fake(b_cpu, fake)
    cache = a.new_cache(64)
    greedy(a, cache, 5, 3)
    old = cache.cuda.graph
    got, calls = calls_of(fake, lambda: b.step(cache, 68))
    assert "begin_capture" in [c[0] for c in calls] and ("graph.launch", "model", old) not in calls
    cpu_cache = model.new_cache(64)
    greedy(model, cpu_cache, 5, 3)
    want = b_cpu.step(cpu_cache, 68)
    assert float(np.abs(got - want).max()) <= 1e-4
    assert float(np.abs(model.step(model.new_cache(8), 68) - want).max()) > 1e-2  # A's logits would differ


def test_a_graph_is_captured_again_after_fuse_for_decode_made_the_weights_again(model, fake):
    """The same model, its weights copied to new device memory and fused again: the next step is
    captured again. The old weights' memory is then poisoned, as when it is freed and reused: a
    replay of the old graph would read NaN."""
    gpu = on_fake(model, fake)
    cache = gpu.new_cache(64)
    greedy(gpu, cache, 5, 3)
    old = [a for layer in gpu.layers for p in layer.values() for a in p.values()]
    fresh = on_fake(model, fake)
    gpu.embed_tokens, gpu.layers, gpu.final_layernorm = fresh.embed_tokens, fresh.layers, fresh.final_layernorm
    fake.deviceSynchronize()                                              # the copies done, then the old memory reused
    for a in old:
        a._a.reshape(-1).view(np.uint8).fill(0xFF)
    got, calls = calls_of(fake, lambda: gpu.step(cache, 68))
    assert [c[0] for c in calls].count("begin_capture") == 1
    cpu_cache = model.new_cache(64)
    greedy(model, cpu_cache, 5, 3)
    assert float(np.abs(got - model.step(cpu_cache, 68)).max()) <= 1e-4


def test_graph_key_names_the_model_and_every_weight_address(model, fake):
    gpu = on_fake(model, fake)
    cache = gpu.new_cache(64)
    gpu.step(cache, 5)
    key = pf._graph_key(gpu, cache, cache.cuda)
    weights = [gpu.embed_tokens, *gpu.final_layernorm.values(),
               *(a for layer in gpu.layers for p in layer.values() for a in p.values())]
    assert key[0] == id(gpu) and set(a.data.ptr for a in weights) <= set(key[1:])
    assert pf._graph_key(dataclasses.replace(gpu), cache, cache.cuda) != key  # same arrays, another model


def test_a_prefill_runs_on_the_model_stream_and_returns_host_logits(model, fake, monkeypatch):
    """cuda_extend around cuda_layers (stubbed: the fake has no cuBLAS): it runs with the model's
    stream current, its logits come back as a NumPy array copied on that stream, and a chunk
    without logits returns with the stream synchronised."""
    gpu = on_fake(model, fake)
    seen = []

    def layers(model, cache, ids, logits, trace):
        seen.append(fake.current[-1].name)
        cache.length += len(ids)
        return None if logits is None else fake.full((len(ids), 4), 2.5, np.float32)
    monkeypatch.setattr(pf, "cuda_layers", layers)
    cache = gpu.new_cache(64)
    assert calls_of(fake, lambda: gpu.run(cache, np.array([5, 68]), None)) == (None, [
        ("deviceSynchronize", None), ("synchronize", "model")])
    out, calls = calls_of(fake, lambda: gpu.run(cache, np.array([5, 68, 417]), "all"))
    assert type(out) is np.ndarray and out.tolist() == [[2.5] * 4] * 3 and seen == ["model", "model"]
    assert calls == [("full", "model"), ("get", "model")]                 # no device sync: the cache is not new


class FakeEvent:
    """CUDA events for notes/bench.py's timing (phi4flash itself records none): the time a recorded
    event ran, in queue order."""

    def __init__(self, fake):
        self.fake, self.at = fake, None

    def record(self, stream):
        self.stream = stream
        self.fake.queue_on(stream, "event", lambda: setattr(self, "at", __import__("time").perf_counter()))

    def synchronize(self):
        self.fake.run(lambda op: op[1] is self.stream)


def test_bench_host_profile_runs_on_the_fake(model, fake, monkeypatch):
    """notes/bench.py --host-profile, prepared for a GPU session: it runs (on the fake, with the
    prefill stubbed) and reports the graph's time, the host's and its parts."""
    sys.path.insert(0, os.path.join(ROOT, "notes"))
    import bench
    fake.cuda.Event = lambda: FakeEvent(fake)
    fake.cuda.get_elapsed_time = lambda start, end: 1e3 * (end.at - start.at)

    def layers(model, cache, ids, logits, trace):                     # no cuBLAS on the fake: the prefill only counts
        cache.length += len(ids)
        for kv in cache.kv.values():
            kv.length += len(ids)
        return None if logits is None else fake.zeros((1, model.config.vocab_size))
    monkeypatch.setattr(pf, "cuda_layers", layers)
    monkeypatch.setattr(bench, "_cupy", fake)
    row = bench.host_profile(on_fake(model, fake), 12, 4)
    assert set(row) == {"context", "model_step_ms", "graph_ms", "host_ms", "graph_key_us", "launch_call_us",
                        "logits_copy_us"}
    assert row["context"] == 12 and row["graph_ms"] > 0 and row["graph_key_us"] > 0
    assert row["host_ms"] == pytest.approx(row["model_step_ms"] - row["graph_ms"])


# ------------------------------------------------------------------------------------------------
# The fake itself catches what it is meant to

def test_the_fake_records_and_refuses_what_it_does_not_define():
    fake = FakeCupy()
    with pytest.raises(AttributeError):
        fake.cuda.Event()
    with pytest.raises(AttributeError):
        fake.zeros(3).transpose()
    with pytest.raises(TypeError):
        np.asarray(fake.zeros(3))
    assert fake.missing == ["cuda.Event", "ndarray.transpose"]


def test_the_fake_runs_work_in_stream_order_and_shows_a_race_as_poison():
    fake = FakeCupy()
    x = fake.zeros(4)                                                     # queued on the legacy stream
    stream = fake.Stream(non_blocking=True)
    with stream:
        y = x.copy()                                                      # not ordered after x's zeros
    stream.synchronize()
    assert np.isnan(y._a).all()                                           # the race, as poison
    fake.deviceSynchronize()
    with stream:
        y = x.copy()
    stream.synchronize()
    assert np.array_equal(y._a, np.zeros(4, np.float32))


def test_the_fake_refuses_pageable_copies_and_syncs_inside_a_capture():
    fake = FakeCupy()
    stream, x = fake.Stream(non_blocking=True), fake.zeros(2, np.int64)
    pageable, pinned = np.zeros(2, np.int64), np.frombuffer(fake.alloc_pinned_memory(16), np.int64)
    with pytest.raises(AssertionError, match="not pinned"):
        fake.memcpyAsync(x.data.ptr, pageable.ctypes.data, 16, 1, stream.ptr)
    stream.begin_capture()
    fake.memcpyAsync(x.data.ptr, pinned.ctypes.data, 16, 1, stream.ptr)   # becomes a node, runs at launch
    with pytest.raises(RuntimeError, match="allocation while a stream captures"):
        fake.zeros(2)
    with pytest.raises(RuntimeError, match="synchronize while a stream captures"):
        stream.synchronize()
    graph = stream.end_capture()
    pinned[:] = 7, 9
    fake.deviceSynchronize()
    graph.launch(stream)
    stream.synchronize()
    assert x._a.tolist() == [7, 9]                                        # read at launch, not at capture
