"""The conversion cache (convert.resolve_model, used by chat.py MODEL=snapshot): an entry is keyed by the
content it was made from, so the same weights are converted once whatever their files' times; new
content from the same source replaces the old entry; converting says where it writes."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

import convert
import phi4flash
from conftest import ROOT, copy_snapshot, write_safetensors
from test_hf_cache import REPO, fake_hub


def chat(model, cache, *flags, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), str(model), "--prompt", "hi", "--temp", "0",
                           "-n", "2", *flags], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PHI4FLASH_CACHE": str(cache), **(env or {})})


def entries(cache):
    return sorted(os.listdir(cache))


def converting(r):
    """The entry a run said it converted into, or None."""
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("note: converting ")]
    assert len(notes) <= 1
    return notes[0].split(" once into ")[1].split(" (")[0] if notes else None


def test_same_content_is_converted_once_and_new_content_replaces_it(tmp_path):
    cache = tmp_path / "cache"
    src = copy_snapshot(tmp_path / "snapshot")
    r = chat(src, cache)
    first = converting(r)
    assert first and os.path.dirname(first) == str(cache) and entries(cache) == [os.path.basename(first)]
    assert f"note: converting {src} once into {first} (846.4 kB; PHI4FLASH_CACHE sets the folder)" in r.stderr
    mtime = os.path.getmtime(os.path.join(first, "model.safetensors"))

    for name in os.listdir(src):  # touch every file: same content, so no conversion
        os.utime(os.path.join(src, name), (1e9, 1e9))
    assert converting(chat(src, cache)) is None
    assert entries(cache) == [os.path.basename(first)] and os.path.getmtime(os.path.join(first, "model.safetensors")) == mtime

    copy = shutil.copytree(src, tmp_path / "same-weights-elsewhere")  # the same content at another path
    assert converting(chat(copy, cache)) is None and entries(cache) == [os.path.basename(first)]

    tensors, _ = phi4flash.read_safetensors(os.path.join(src, "model.safetensors"))  # new weights, same shapes
    changed = {k: phi4flash.f32(v) * (1.01 if k.endswith("fc2.weight") else 1) for k, v in tensors.items()}
    write_safetensors(os.path.join(src, "model.safetensors"), changed)
    r = chat(src, cache)
    second = converting(r)
    assert second and second != first and entries(cache) == [os.path.basename(second)]
    assert f"note: removed {first}, the conversion of this source's earlier content" in r.stderr
    a = phi4flash.load(second).layers[0]["mlp"]["fc2"]
    assert np.array_equal(phi4flash.f32(a), phi4flash.bf16_to_f32(convert.f32_to_bf16(changed["model.layers.0.mlp.fc2.weight"])))


def test_a_bf16_and_a_float32_conversion_of_one_source_coexist(tmp_path):
    cache = tmp_path / "cache"
    src = copy_snapshot(tmp_path / "snapshot")
    env = {**os.environ, "PHI4FLASH_CACHE": str(cache)}
    code = "import sys, convert; print(convert.resolve_model(sys.argv[1], dtype=sys.argv[2]))"
    out = [subprocess.run([sys.executable, "-c", code, src, dtype], capture_output=True, text=True, cwd=ROOT, env=env,
                          check=True).stdout.strip() for dtype in ("bfloat16", "float32", "bfloat16")]
    assert out[0] == out[2] != out[1] and entries(cache) == sorted(map(os.path.basename, out[:2]))
    source = json.load(open(os.path.join(out[1], convert.SOURCE_FILE)))
    assert source["dtype"] == "float32" and source["source"] == os.path.realpath(src)


def test_a_new_revision_in_the_hub_cache_replaces_the_old_conversion(tmp_path):
    hub, cache = tmp_path / "hub", tmp_path / "cache"
    env = {"HF_HUB_CACHE": str(hub)}
    old = fake_hub(hub, revision="a" * 40)
    first = converting(chat(REPO, cache, env=env))
    assert converting(chat(old, cache, env=env)) is None  # the snapshot folder itself: the same entry
    new = fake_hub(hub, revision="b" * 40)  # refs/main now names b…b: a new generation_config.json blob
    os.remove(os.path.join(new, "generation_config.json"))
    with open(os.path.join(os.path.dirname(os.path.dirname(new)), "blobs", "new-generation-config"), "w") as f:
        json.dump({"eos_token_id": [0]}, f)
    os.symlink(os.path.join("..", "..", "blobs", "new-generation-config"), os.path.join(new, "generation_config.json"))
    second = converting(chat(REPO, cache, env=env))
    assert second and second != first and entries(cache) == [os.path.basename(second)]
    assert os.path.basename(second).startswith("Phi-4-mini-flash-reasoning-")
