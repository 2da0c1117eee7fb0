"""Sampling, stopping, and the tokens that may never be produced."""
import os
import subprocess
import sys

import numpy as np
import pytest

import phi4flash
from conftest import ROOT


def test_stop_ids_default_to_end_and_endoftext(model):
    tok = model.tokenizer
    assert set(model.stop_ids) == {tok.token_to_id("<|end|>"), tok.token_to_id("<|endoftext|>")} == {3, 0}


def test_generation_stops_after_a_stop_id(model, ref):
    ids = ref["p1_input_ids"]
    greedy = ref["p1_greedy_full_ids"].tolist()
    stop = greedy[6]
    out = list(model.generate(ids, 24, temperature=0.0, stop_ids=[stop]))
    assert out == greedy[:greedy.index(stop) + 1] and len(out) < 24


def test_padded_vocab_rows_are_never_sampled(model):
    mask = model.token_mask
    assert mask.sum() == 500 and not mask[500:].any()
    logits = np.zeros(model.config.vocab_size, np.float32)
    logits[500:] = 1e4  # the rows past the tokenizer dominate, yet are masked
    rng = np.random.default_rng(0)
    draws = {phi4flash.sample(logits, mask, 1.0, 0, 1.0, rng) for _ in range(200)}
    assert max(draws) < 500 and phi4flash.sample(logits, mask, 0.0, 0, 1.0, rng) < 500


def test_sampling_filters():
    rng = np.random.default_rng(1)
    logits = np.array([5.0, 4.0, 3.0, 0.0, -1.0])
    mask = np.ones(5, bool)
    assert {phi4flash.sample(logits, mask, 1.0, 1, 1.0, rng) for _ in range(50)} == {0}  # top-k 1 = greedy
    assert {phi4flash.sample(logits, mask, 1.0, 0, 0.5, rng) for _ in range(50)} == {0}  # p(0) = 0.66 >= 0.5
    assert {phi4flash.sample(logits, mask, 1.0, 2, 1.0, rng) for _ in range(300)} == {0, 1}
    assert {phi4flash.sample(logits, mask, 1.0, 0, 0.9, rng) for _ in range(300)} == {0, 1}  # 0.66 + 0.24 >= 0.9
    draws = [phi4flash.sample(logits, mask, 100.0, 0, 1.0, rng) for _ in range(500)]
    assert set(draws) == {0, 1, 2, 3, 4}  # a high temperature flattens the distribution


def test_seed_makes_sampling_reproducible(model, ref):
    ids = ref["p2_input_ids"]
    a = list(model.generate(ids, 16, temperature=1.0, top_p=0.95, seed=11, stop_ids=()))
    b = list(model.generate(ids, 16, temperature=1.0, top_p=0.95, seed=11, stop_ids=()))
    c = list(model.generate(ids, 16, temperature=1.0, top_p=0.95, seed=12, stop_ids=()))
    assert a == b and a != c and all(0 <= t < 500 for t in a + c)


@pytest.mark.parametrize("ids,words", [([], "non-empty"), ([1, 600], "600 is outside"), ([[1, 2]], "1-D"), ([1.5], "token ids")])
def test_bad_ids_get_one_line(model, ids, words):
    with pytest.raises(phi4flash.Phi4FlashError, match=words):
        model.forward(ids)


def chat(*args, stdin=None, cache=None):
    env = {**os.environ, "PHI4FLASH_CACHE": str(cache)}
    return subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_one_shot_chat_prints_the_greedy_generation(tmp_path, model):
    """The README's first command: chat.py --prompt on the bundled tiny model (a snapshot, converted
    once into the cache) prints exactly the decoded greedy generate() output."""
    r = chat("--prompt", "Simplify 2+2", "--temp", "0", "-n", "20", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "random" in r.stderr and "huggingface-cli download" in r.stderr
    import chat as chat_module
    prompt = chat_module.render_prompt(model, [{"role": "user", "content": "Simplify 2+2"}])
    tokens = list(model.generate(model.encode(prompt), 20, temperature=0.0))
    if tokens[-1] in model.stop_ids:
        tokens = tokens[:-1]
    assert r.stdout == model.decode(tokens) + "\n"
    assert len(os.listdir(tmp_path)) == 1  # the tiny snapshot was converted into the cache


def test_piped_stdin_and_model_errors(tmp_path):
    r = chat("--temp", "0", "-n", "5", stdin="Simplify", cache=tmp_path)
    assert r.returncode == 0 and r.stdout.strip()
    r = chat(str(tmp_path / "missing"), "--prompt", "x", cache=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: MODEL")


def test_stream_decoder_never_splits_a_character(model):
    """Byte-level tokens can end mid-character: the pieces must still join to tokenizer.decode()."""
    import chat as chat_module
    tok = model.tokenizer
    for text in ["héllo wörld – 数学 ∑ 🙂", "plain ascii"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        dec = chat_module.StreamDecoder(tok)
        pieces = [dec.push(t) for t in ids] + [dec.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
        assert all("\ufffd" not in p for p in pieces)
    rng = np.random.default_rng(0)
    for _ in range(20):  # random ids (invalid UTF-8 included) still join to exactly decode()
        ids = rng.integers(0, 500, 30).tolist()
        dec = chat_module.StreamDecoder(tok)
        assert "".join([dec.push(t) for t in ids] + [dec.flush()]) == tok.decode(ids, skip_special_tokens=False)
