"""Cached decoding must equal full recompute (fp32: <= 1e-4 abs on logits, identical greedy ids),
over sequences of at least 3 windows, from prompts shorter and longer than the window — exactly
where the reference's own cache fails (sliding ring rolled one step early, global keys truncated)."""
import numpy as np
import pytest

import phi4flash

TOL = 1e-4  # fp32 vs fp32 over the same weights: only summation order differs


def decode_and_compare(model, prompt, steps, rng=None):
    """Decode `steps` tokens through the cache (greedy, or random teacher-forced tokens with rng),
    then check every step's logits against one full forward over the whole sequence."""
    logits, cache = model.prefill(prompt)
    seq, cached = list(prompt), [logits]
    for _ in range(steps):
        token = int(rng.integers(0, 500)) if rng is not None else int(np.argmax(np.where(model.token_mask, logits, -np.inf)))
        seq.append(token)
        logits = model.step(cache, token)
        cached.append(logits)
    full = model.forward(seq)
    n = len(prompt)
    diff = np.abs(np.array(cached) - full[n - 1:]).max()
    assert diff <= TOL, diff
    assert np.array_equal(np.argmax(np.array(cached), -1), np.argmax(full[n - 1:], -1))
    return cache


@pytest.mark.parametrize("prompt_len", [1, 5, 8, 13, 30])
def test_cached_decode_equals_full_recompute_past_three_windows(model, ref, prompt_len):
    W = model.config.sliding_window[1]
    prompt = np.resize(ref["p2_input_ids"], prompt_len)
    decode_and_compare(model, prompt, steps=3 * W + 5)  # ends past position 3W: the ring wraps many times


def test_teacher_forced_random_tokens(model):
    rng = np.random.default_rng(7)
    decode_and_compare(model, rng.integers(0, 500, 6), steps=40, rng=rng)


def test_chunked_prefill_and_later_turns_equal_one_forward(model):
    """Feeding a sequence in uneven chunks (a prompt, then chat turns) gives the rows of one forward:
    this exercises the ring with T > 1 on a non-empty cache and the growing shared buffer."""
    rng = np.random.default_rng(3)
    seq = rng.integers(0, 500, 70)
    full = model.forward(seq)
    cache = model.new_cache(4)  # deliberately too small: the shared K/V must grow
    rows, start = [], 0
    for size in (3, 1, 9, 2, 17, 1, 1, 30, 6):
        rows.append(phi4flash.extend(model, cache, seq[start:start + size], logits="all"))
        start += size
    assert start == len(seq)
    assert np.abs(np.concatenate(rows) - full).max() <= TOL
    assert cache.shared(model.config).k.shape[1] >= len(seq)


def test_generate_continues_a_conversation_from_its_cache(model, ref):
    """Two generate() calls sharing a cache equal one generate over the joined sequence."""
    prompt, more = ref["p1_input_ids"], ref["p0_input_ids"]
    cache = model.new_cache(200)
    first = list(model.generate(prompt, 10, temperature=0.0, stop_ids=(), cache=cache))
    assert cache.length == len(prompt) + len(first) - 1  # the last yielded token is not fed yet
    second = list(model.generate([first[-1], *more], 10, temperature=0.0, stop_ids=(), cache=cache))
    whole = [*prompt, *first, *more]
    assert second == list(model.generate(whole, 10, temperature=0.0, stop_ids=()))


def test_cache_sizes_are_fixed_except_the_shared_kv(model, ref):
    cfg = model.config
    W = cfg.sliding_window[1]
    cache = model.new_cache(len(ref["p0_input_ids"]) + 60)
    before = {i: kv.k.shape for i, kv in cache.kv.items()}
    tokens = list(model.generate(ref["p0_input_ids"], 60, temperature=0.0, stop_ids=(), cache=cache))
    assert len(tokens) == 60
    for i, kind in enumerate(cfg.layer_kinds):
        if kind == "swa":
            assert cache.kv[i].k.shape == (cfg.num_key_value_heads, W, cfg.head_dim)  # a ring of exactly W
            assert sorted(cache.kv[i].pos.tolist()) == list(range(cache.length - W, cache.length))
        if kind == "mamba":
            assert cache.conv_state[i].shape == (cfg.mamba_d_conv - 1, cfg.d_inner)
            assert cache.ssm_state[i].shape == (cfg.d_inner, cfg.mamba_d_state)
    assert {i: kv.k.shape for i, kv in cache.kv.items()} == before  # preallocated: nothing grew
    assert set(cache.kv) == {i for i, k in enumerate(cfg.layer_kinds) if k in ("swa", "full")}  # GMU/cross layers hold nothing


def test_prefill_in_chunks_runs_the_cross_decoder_once(model, monkeypatch):
    """Model.prefill feeds a prompt chunk by chunk; chunks before the last stop after layer L/2+1
    (nothing above writes to the cache), yet the cache and the last logits equal one extend()."""
    ids = np.random.default_rng(5).integers(0, 500, 45)
    one = model.new_cache(64)
    want = phi4flash.extend(model, one, ids)[-1]
    calls = []
    gmu = phi4flash.gmu
    monkeypatch.setattr(phi4flash, "gmu", lambda *a: calls.append(1) or gmu(*a))
    chunked = model.new_cache(64)
    got, _ = model.prefill(ids, chunked, chunk=8)
    assert len(calls) == model.config.layer_kinds.count("gmu")  # one chunk (the last) reached the GMUs
    assert np.abs(got - want).max() <= TOL and chunked.length == one.length == 45
    for i in one.ssm_state:
        assert np.abs(one.ssm_state[i] - chunked.ssm_state[i]).max() <= 1e-5
        assert np.abs(one.conv_state[i] - chunked.conv_state[i]).max() <= 1e-5
    for i in one.kv:
        assert np.array_equal(one.kv[i].pos, chunked.kv[i].pos)
        assert np.abs(one.kv[i].k - chunked.kv[i].k).max() <= 1e-5
    assert model.prefill(ids[:10], chunked, logits=False)[0] is None and chunked.length == 55
