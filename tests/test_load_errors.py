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


# ----------------------------------------------------------------------------------------------
# The API checks its arguments as the command lines check their flags (issue 20): one Phi4FlashError line
# naming the argument and what was expected, never an error from inside NumPy, nothing silently changed.

def bad_calls(model):
    """(call, the message's start) for every method and argument."""
    ids, cache = [5, 68, 417], model.new_cache(8)
    gen = lambda **kw: next(model.generate(ids, **{"temperature": 0.0, **kw}))  # noqa: E731
    return [
        (lambda: gen(max_new_tokens=-1), "max_new_tokens: expected an integer >= 0, got -1"),
        (lambda: gen(max_new_tokens=2.5), "max_new_tokens: expected an integer >= 0, got 2.5"),
        (lambda: gen(max_new_tokens=True), "max_new_tokens: expected an integer >= 0, got True"),
        (lambda: gen(temperature=float("nan")), "temperature: expected a finite number >= 0 (0 = greedy), got nan"),
        (lambda: gen(temperature=float("inf")), "temperature: expected a finite number >= 0 (0 = greedy), got inf"),
        (lambda: gen(temperature=-0.5), "temperature: expected a finite number >= 0 (0 = greedy), got -0.5"),
        (lambda: gen(temperature="0.6"), "temperature: expected a finite number >= 0 (0 = greedy), got '0.6'"),
        (lambda: gen(temperature=True), "temperature: expected a finite number >= 0 (0 = greedy), got True"),
        (lambda: gen(top_p=True), "top_p: expected a number in (0, 1], got True"),
        (lambda: gen(top_p=0), "top_p: expected a number in (0, 1], got 0"),
        (lambda: gen(top_p=1.5), "top_p: expected a number in (0, 1], got 1.5"),
        (lambda: gen(top_p=float("nan")), "top_p: expected a number in (0, 1], got nan"),
        (lambda: gen(top_k=1.5), "top_k: expected an integer >= 0 (0 = off), got 1.5"),
        (lambda: gen(top_k=-1), "top_k: expected an integer >= 0 (0 = off), got -1"),
        (lambda: gen(seed=-1), "seed: expected None or an integer >= 0, got -1"),
        (lambda: gen(seed=1.5), "seed: expected None or an integer >= 0, got 1.5"),
        (lambda: gen(stop_ids=7), "stop_ids: expected None or a list of token ids (integers), got 7"),
        (lambda: gen(stop_ids=[3, "x"]), "stop_ids: expected None or a list of token ids (integers), got [3, 'x']"),
        (lambda: gen(stop_ids=[3, True]), "stop_ids: expected None or a list of token ids (integers), got [3, True]"),
        (lambda: gen(cache=object()), "cache: expected None or a cache made by this model's new_cache() or prefill()"),
        (lambda: next(model.generate([5, True], 2)), "ids: expected token ids (integers), got True/False among them"),
        (lambda: next(model.generate([5, 1.0], 2)), "ids: expected a non-empty 1-D sequence of token ids, got float64"),
        (lambda: model.prefill(ids, chunk=0), "chunk: expected None or an integer >= 1 (tokens per pass), got 0"),
        (lambda: model.prefill(ids, logits="yes"), "logits: expected True or False, got 'yes'"),
        (lambda: model.prefill(ids, cache={}), "cache: expected None or a cache made by"),
        (lambda: model.forward(ids, trace=[]), "trace: expected None or a dict to fill, got []"),
        (lambda: model.forward(ids, attn_probs=(1.5, 0)), "attn_probs: expected (layer, head), two integers, got (1.5, 0)"),
        (lambda: model.forward([True, 5]), "ids: expected token ids (integers), got True/False among them"),
        (lambda: model.step(None, 5), "cache: expected a cache made by this model's new_cache() or prefill(), got None"),
        (lambda: model.step(cache, True), "token: expected token ids (integers), got True/False among them"),
        (lambda: model.step(cache, 5.0), "token: expected a non-empty 1-D sequence of token ids, got float64"),
        (lambda: model.step(cache, 10**6), "token: token id 1000000 is outside the vocabulary [0, 512)"),
        (lambda: model.new_cache(0), "capacity: expected an integer >= 1 (tokens), got 0"),
        (lambda: model.new_cache(True), "capacity: expected an integer >= 1 (tokens), got True"),
        (lambda: model.new_cache(8.0), "capacity: expected an integer >= 1 (tokens), got 8.0"),
        (lambda: model.encode(b"bytes"), "text: expected a str, got bytes"),
        (lambda: model.encode("caf\udce9"), "text: not valid UTF-8 text (byte 0xe9 at character 4)"),
        (lambda: model.decode([5, 2.5]), "ids: expected a non-empty 1-D sequence of token ids, got float64"),
    ]


def test_every_bad_argument_is_one_line_naming_it(model):
    for call, message in bad_calls(model):
        with pytest.raises(phi4flash.Phi4FlashError) as e:
            call()
        assert str(e.value).startswith(message) and "\n" not in str(e.value), (message, str(e.value))
    assert model.decode([]) == "" and next(model.generate([5], 1, temperature=0.0, seed=None, stop_ids=np.array([3])))


def test_a_cache_of_another_model_is_refused(model, tmp_path):
    import convert
    from conftest import random_snapshot
    other = tmp_path / "shorter"  # a random model of 4 layers: its cache has other layers than this model's 8
    convert.convert(random_snapshot(tmp_path / "snapshot", num_hidden_layers=4), str(other))
    with pytest.raises(phi4flash.Phi4FlashError, match="cache: expected a cache made by this model's new_cache"):
        model.step(phi4flash.load(other).new_cache(4), 5)
    bf16_kv = phi4flash.load(model.path, kv_dtype="bfloat16")           # the same model, the other K/V storage
    with pytest.raises(phi4flash.Phi4FlashError, match="cache: expected a cache made by this model's new_cache"):
        bf16_kv.step(model.new_cache(4), 5)
    with pytest.raises(phi4flash.Phi4FlashError, match="cache: expected None or a cache made by this model's new_cache"):
        next(model.generate([5], 2, cache=bf16_kv.new_cache(4)))


def test_the_cache_is_sized_by_what_the_context_holds(model):
    """generate(max_new_tokens=10**9) once allocated a cache for a billion tokens (256 GB here, 119 GiB on the
    real model): nothing past the context can be read, so no cache is larger than it."""
    context = model.config.context_length
    assert model.new_cache(10**9).shared(model.config).k.shape[1] == context
    assert next(model.generate([5, 68, 417], 10**9, temperature=0.0)) == next(model.generate([5, 68, 417], 4, temperature=0.0))


def test_prefill_forward_and_step_refuse_to_run_past_the_context(model, ref):
    small = with_context(model, 20)
    with pytest.raises(phi4flash.Phi4FlashError, match=r"^ids: 23 tokens \(0 in the cache \+ 23 new\) do not fit the "
                                                       r"model's context of 20 tokens$"):
        small.forward(ref["p1_input_ids"])
    with pytest.raises(phi4flash.Phi4FlashError, match=r"^ids: 23 tokens \(0 in the cache \+ 23 new\)"):
        small.prefill(ref["p1_input_ids"])
    _, cache = small.prefill(ref["p1_input_ids"][:19])
    with pytest.raises(phi4flash.Phi4FlashError, match=r"^ids: 21 tokens \(19 in the cache \+ 2 new\)"):
        small.prefill([5, 6], cache)
    small.step(cache, 5)                                                   # the 20th token: the context is full
    with pytest.raises(phi4flash.Phi4FlashError, match=r"^token: 21 tokens \(20 in the cache \+ 1 new\) do not fit"):
        small.step(cache, 5)
    assert cache.length == 20                                              # the refused step changed nothing
