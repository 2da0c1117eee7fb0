"""load() and generate() fail in one line that names the file or the reason: damaged side files of a
converted folder, a file from a newer phi4flash, a prompt or a generation past the context, and
NaN/inf logits (named by the first non-finite tensor of a traced forward)."""
import dataclasses
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import phi4flash
from conftest import ROOT, write_safetensors


def copy_converted(converted, dst):
    shutil.copytree(converted, dst)
    return str(dst)


@pytest.mark.parametrize("name,content,words", [
    ("generation_config.json", "{not json", "not valid JSON"),
    ("tokenizer_config.json", "[1, 2]", "expected a JSON object, got list"),
    ("tokenizer.json", '{"version": "1.0", "model": 17}', "the tokenizers library cannot read it"),
    ("tokenizer.json", b"\xff\xfe\x00garbage", "the tokenizers library cannot read it"),
    ("generation_config.json", b"\xff\xfe{}", "not valid JSON"),
    ("generation_config.json", '{"eos_token_id": "3"}', "eos_token_id is '3'; expected a token id or a list of them"),
])
def test_a_damaged_side_file_is_one_line_naming_it(converted, tmp_path, name, content, words):
    folder = copy_converted(converted, tmp_path / "m")
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(phi4flash.Phi4FlashError) as e:
        phi4flash.load(folder)
    assert str(e.value).startswith(path + ": ") and words in str(e.value) and "\n" not in str(e.value)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "phi4flash.py"), "trace", folder, "--ids", "1,2"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PHI4FLASH_CACHE=str(tmp_path)))
    assert r.returncode == 2 and r.stderr.startswith(f"error: {path}: ") and r.stderr.count("\n") == 1, r.stderr


def test_a_missing_tokenizer_loads_without_one(converted, tmp_path):
    folder = copy_converted(converted, tmp_path / "m")
    os.remove(os.path.join(folder, "tokenizer.json"))
    model = phi4flash.load(folder)
    assert model.tokenizer is None and model.token_mask.all() and set(model.stop_ids) == {3, 0}  # generation_config's eos


def test_a_file_from_a_newer_phi4flash_says_upgrade(converted, tmp_path):
    tensors, meta = phi4flash.read_safetensors(os.path.join(converted, "model.safetensors"))
    os.makedirs(tmp_path / "new")
    newer = str(int(phi4flash.FORMAT_VERSION) + 1)
    write_safetensors(tmp_path / "new" / "model.safetensors", {k: phi4flash.f32(v) for k, v in tensors.items()},
                      {k: "F32" for k in tensors}, metadata={**meta, "format_version": newer})
    with pytest.raises(phi4flash.Phi4FlashError, match=f"format version {newer}, this code reads versions 1 to "
                                                        f"{phi4flash.FORMAT_VERSION}; upgrade phi4flash"):
        phi4flash.load(tmp_path / "new")


def with_context(model, n):
    return dataclasses.replace(model, config=dataclasses.replace(model.config, context_length=n))


def test_generate_refuses_a_prompt_longer_than_the_context(model, ref):
    small = with_context(model, 20)
    with pytest.raises(phi4flash.Phi4FlashError, match=r"ids: 23 tokens \(0 in the cache \+ 23 new\) do not fit the "
                                                       r"model's context of 20 tokens"):
        next(small.generate(ref["p1_input_ids"], 5, temperature=0.0))
    cache = small.new_cache(32)
    small.prefill(ref["p0_input_ids"], cache)                              # 5 tokens already in the cache
    with pytest.raises(phi4flash.Phi4FlashError, match=r"21 tokens \(5 in the cache \+ 16 new\)"):
        next(small.generate(np.arange(16), 5, temperature=0.0, cache=cache))


def test_generate_stops_at_the_context_with_a_reason(model, ref):
    small = with_context(model, 30)
    got = []
    with pytest.raises(phi4flash.Phi4FlashError, match="generate: stopped at the model's context of 30 tokens "
                                                       r"\(8 generated\)"):
        for token in small.generate(ref["p1_input_ids"], 24, temperature=0.0, stop_ids=()):
            got.append(token)
    assert got == ref["p1_greedy_full_ids"][:8].tolist()                  # 23 + 7 fed = 30, the 8th is yielded


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_nan_weights_stop_generation_naming_the_first_bad_tensor(converted, ref, temperature):
    model = phi4flash.load(converted)
    w = phi4flash.f32(model.layers[3]["attn"]["out_proj"]).copy()
    w[0, 0] = np.nan
    model.layers[3]["attn"]["out_proj"] = w
    with pytest.raises(phi4flash.Phi4FlashError) as e:
        list(model.generate(ref["p1_input_ids"], 5, temperature=temperature))
    message = str(e.value)
    assert message == ("generate: the logits are not finite (NaN/inf); a traced forward over the last 23 tokens "
                       "first goes non-finite at layers.3.mixer_out: check that layer's weights")
