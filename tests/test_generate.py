"""Sampling, stopping, and the tokens that may never be produced."""
import numpy as np
import pytest

import phi4flash


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
