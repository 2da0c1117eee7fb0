"""Shared fixtures: the bundled tiny checkpoint (Hugging Face layout) and its conversions."""
import json
import os
import shutil
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import convert  # noqa: E402
import phi4flash  # noqa: E402

TINY = os.path.join(ROOT, "tests", "fixtures", "tiny-phi4flash")
PROMPTS = ("p0", "p1", "p2")


@pytest.fixture(scope="session")
def ref():
    return np.load(os.path.join(TINY, "reference.npz"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """An empty conversion cache (PHI4FLASH_CACHE) for the programs a test module runs."""
    return tmp_path_factory.mktemp("phi4flash-cache")


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The tiny fixture converted with the default settings (bf16 weight matrices)."""
    dst = tmp_path_factory.mktemp("conv") / "tiny"
    convert.convert(TINY, str(dst))
    return str(dst)


@pytest.fixture(scope="session")
def model(converted):
    return phi4flash.load(converted)


@pytest.fixture(scope="session")
def model_f32(tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv32") / "tiny32"
    convert.convert(TINY, str(dst), dtype="float32")
    return phi4flash.load(str(dst))


@pytest.fixture(scope="session")
def converted_int8(tmp_path_factory):
    """The tiny fixture converted with int8 weight matrices (groups of 32, one scale each)."""
    dst = tmp_path_factory.mktemp("conv8") / "tiny8"
    convert.convert(TINY, str(dst), dtype="int8")
    return str(dst)


@pytest.fixture(scope="session")
def model_int8(converted_int8):
    return phi4flash.load(converted_int8)


def copy_snapshot(dst, **config_changes):
    """A writable copy of the tiny Hugging Face snapshot, optionally with config.json edited."""
    shutil.copytree(TINY, dst)
    for name in os.listdir(dst):
        os.chmod(os.path.join(dst, name), 0o644)
    if config_changes:
        path = os.path.join(dst, "config.json")
        cfg = json.load(open(path))
        for k, v in config_changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        json.dump(cfg, open(path, "w"))
    return str(dst)


def write_safetensors(path, tensors, dtypes=None, metadata=None):
    """Minimal safetensors writer for test checkpoints: {name: float array}, dtype per name (default BF16)."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        dtype = (dtypes or {}).get(name, "BF16")
        a = np.ascontiguousarray(a, np.float32)
        data = {"BF16": lambda x: convert.f32_to_bf16(x), "F32": lambda x: x, "F16": lambda x: x.astype(np.float16)}[dtype](a)
        b = data.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def random_snapshot(dst, seed=0, **config_changes):
    """A tiny random Hugging Face snapshot with the fixture's tokenizer and an edited config."""
    copy_snapshot(dst, **config_changes)
    cfg = convert.config_from_hf(json.load(open(os.path.join(dst, "config.json"))))
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in convert.hf_tensor_shapes(cfg).items():
        if name.endswith("A_log"):
            tensors[name] = np.log(np.tile(np.arange(1, shape[1] + 1, dtype=np.float32), (shape[0], 1)))
        elif "layernorm.weight" in name or name.endswith("subln.weight"):
            tensors[name] = 1 + 0.1 * rng.standard_normal(shape)
        else:
            tensors[name] = 0.2 * rng.standard_normal(shape) / np.sqrt(shape[-1] if len(shape) > 1 else 8)
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    return str(dst)


def cupy_or_skip(what):
    """CuPy with a CUDA device, or skip this test saying why (`what` says what the test needs it for)."""
    try:
        import cupy
    except ImportError:
        pytest.skip(f"CuPy not installed: {what}")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as e:
        pytest.skip(f"no CUDA device ({(str(e) or type(e).__name__).splitlines()[0]})")
    return cupy
