"""Each SambaY part against a plain re-derivation from the equations (sambay-reference §4)."""
import math

import numpy as np
import pytest

import phi4flash as pf


def naive_differential_attention(q, k, v, mask, lam, lam_init, subln, eps=1e-5):
    """One original head pair at a time, written from the striping table of §4.4: query heads 2j
    (stripe 1) and 2j+1 (stripe 2) use K heads 2g and 2g+1 with g = j // G, and both read the
    value pair [v_2g ‖ v_2g+1]; the pair's output fills heads 2j and 2j+1."""
    H, T, hd = q.shape
    H_kv = k.shape[0]
    G = H // H_kv
    out = np.zeros((T, H * hd))
    for j in range(H // 2):
        g = j // G
        vpair = np.concatenate([v[2 * g], v[2 * g + 1]], axis=-1)  # (S, 2hd)
        maps = []
        for s in (0, 1):
            scores = q[2 * j + s] @ k[2 * g + s].T / math.sqrt(hd)
            scores = np.where(mask, scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            maps.append((p / p.sum(-1, keepdims=True)) @ vpair)
        d = maps[0] - lam * maps[1]
        o = d / np.sqrt((d ** 2).mean(-1, keepdims=True) + eps) * subln * (1 - lam_init)
        out[:, 2 * j * hd:(2 * j + 2) * hd] = o
    return out


@pytest.mark.parametrize("H,H_kv", [(8, 4), (40, 20), (16, 4), (8, 2), (4, 4)])
def test_striped_gqa_mapping_matches_per_head_loop(H, H_kv):
    rng = np.random.default_rng(H * 100 + H_kv)
    T, S, hd = 5, 9, 8
    q = rng.standard_normal((H, T, hd)).astype(np.float32)
    k = rng.standard_normal((H_kv, S, hd)).astype(np.float32)
    v = rng.standard_normal((H_kv, S, hd)).astype(np.float32)
    mask = np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]
    subln = rng.standard_normal(2 * hd).astype(np.float32)
    want = naive_differential_attention(q, k, v, mask, 0.3, 0.55, subln)
    for form in (pf.differential_attention_sequential, pf.differential_attention):
        assert np.abs(form(q, k, v, mask, 0.3, 0.55, subln) - want).max() < 1e-5, form.__name__


@pytest.mark.parametrize("H,H_kv,T,S", [(8, 4, 1, 1), (8, 4, 5, 9), (40, 20, 3, 70), (16, 4, 7, 7), (4, 2, 12, 30)])
def test_differential_attention_fast_form_equals_sequential(H, H_kv, T, S):
    """The broadcast form (stripes, GQA groups and value pairs as axes) against the per-head-pair
    loop that writes the equation out. Same float32 math in another order: 1e-5 on O(1) outputs."""
    rng = np.random.default_rng(T * S)
    hd = 8
    q = rng.standard_normal((H, T, hd)).astype(np.float32)
    k = rng.standard_normal((H_kv, S, hd)).astype(np.float32)
    v = rng.standard_normal((H_kv, S, hd)).astype(np.float32)
    mask = pf.visible(np.arange(S)[None, :], np.arange(S - T, S)[:, None], 4)   # a window of 4
    mask[:, 0] |= ~mask.any(-1)                                                  # at least one key per row
    subln = rng.standard_normal(2 * hd).astype(np.float32)
    fast = pf.differential_attention(q, k, v, mask, 0.7, 0.2, subln)
    slow = pf.differential_attention_sequential(q, k, v, mask, 0.7, 0.2, subln)
    assert fast.shape == slow.shape == (T, H * hd)
    assert np.abs(fast - slow).max() < 1e-5


def test_striping_table_for_8_query_4_kv_heads():
    """§4.4's table, probed directly: q heads 0,2 -> K head 0; 4,6 -> K 2; 1,3 -> K 1; 5,7 -> K 3,
    and the pair of query heads (2j, 2j+1) reads V heads 2g and 2g+1 with g = j // G. Each K head
    points at its own key slot; each V head carries its number at that slot."""
    H, H_kv, hd = 8, 4, 4
    k = np.zeros((H_kv, hd, hd), np.float32)
    v = np.zeros((H_kv, hd, hd), np.float32)
    for g in range(H_kv):
        k[g, g, 0] = 50.0            # K head g: only key slot g scores high
        v[:, g, g] = np.arange(1, H_kv + 1)  # V head n holds n+1 at slot g, feature g
    q = np.zeros((H, 1, hd), np.float32)
    q[:, 0, 0] = 1.0
    mask = np.ones((1, hd), bool)
    table = {0: 0, 2: 0, 4: 2, 6: 2, 1: 1, 3: 1, 5: 3, 7: 3}
    for stripe, lam in ((0, 0.0), (1, 1e6)):  # λ = 0 shows stripe 1 alone; λ huge lets stripe 2 dominate
        o = pf.differential_attention(q, k, v, mask, lam, 0.5, np.ones(2 * hd, np.float32))[0]
        for j in range(H // 2):
            head = 2 * j + stripe
            first, second = o[2 * j * hd:(2 * j + 1) * hd], o[(2 * j + 1) * hd:(2 * j + 2) * hd]
            slot = int(np.argmax(np.abs(first)))
            assert slot == table[head] == int(np.argmax(np.abs(second))), head
            g = j // (H // H_kv)
            assert abs(second[slot] / first[slot] - (2 * g + 2) / (2 * g + 1)) < 1e-4  # V heads 2g ‖ 2g+1


def test_attend_blocks_slice_keys_exactly():
    """Query blocks that slice the keys (the O(T·W) prefill) equal one unblocked pass."""
    rng = np.random.default_rng(0)
    H, H_kv, hd, T = 4, 2, 8, 53
    q = rng.standard_normal((H, T, hd)).astype(np.float32)
    k = rng.standard_normal((H_kv, T + 6, hd)).astype(np.float32)
    v = rng.standard_normal((H_kv, T + 6, hd)).astype(np.float32)
    qpos, kpos = np.arange(6, T + 6), np.arange(T + 6)
    subln = np.ones(2 * hd, np.float32)
    for window in (None, 1, 5, 8, 60):
        one = pf.attend(q, k, v, qpos, kpos, window, 0.4, 0.6, subln, block=10**9)
        for block in (1, 4, 7, 16):
            assert np.abs(pf.attend(q, k, v, qpos, kpos, window, 0.4, 0.6, subln, block=block) - one).max() < 1e-6


def test_sliding_window_counts_the_current_token():
    """W keys visible, the current one included: with W = 1 a query sees only itself."""
    rng = np.random.default_rng(1)
    H, H_kv, hd, T = 2, 2, 4, 6
    q = rng.standard_normal((H, T, hd)).astype(np.float32)
    k = rng.standard_normal((H_kv, T, hd)).astype(np.float32)
    v = rng.standard_normal((H_kv, T, hd)).astype(np.float32)
    pos = np.arange(T)
    got = pf.attend(q, k, v, pos, pos, 3, 0.4, 0.6, np.ones(2 * hd, np.float32))
    for t in range(T):
        lo = max(0, t - 2)
        mask = np.ones((1, t + 1 - lo), bool)
        want = pf.differential_attention(q[:, t:t + 1], k[:, lo:t + 1], v[:, lo:t + 1], mask, 0.4, 0.6, np.ones(2 * hd, np.float32))
        assert np.abs(got[t] - want[0]).max() < 1e-6


@pytest.mark.parametrize("T,chunk", [(1, 64), (7, 3), (64, 64), (100, 16), (130, 64)])
def test_selective_scan_fast_form_equals_sequential(T, chunk):
    rng = np.random.default_rng(T)
    d_inner, N = 24, 16
    x = rng.standard_normal((T, d_inner)).astype(np.float32)
    delta = pf.softplus(rng.standard_normal((T, d_inner)).astype(np.float32))
    A = -np.exp(np.log(np.tile(np.arange(1, N + 1, dtype=np.float32), (d_inner, 1))))
    B, C = rng.standard_normal((2, T, N)).astype(np.float32)
    D = rng.standard_normal(d_inner).astype(np.float32)
    h0 = rng.standard_normal((d_inner, N)).astype(np.float32)
    h0_copy = h0.copy()
    y1, h1 = pf.selective_scan_sequential(x, delta, A, B, C, D, h0)
    y2, h2 = pf.selective_scan(x, delta, A, B, C, D, h0, chunk=chunk)
    assert np.abs(y1 - y2).max() < 1e-5 and np.abs(h1 - h2).max() < 1e-5
    assert np.array_equal(h0, h0_copy)  # the caller's state is not modified in place
    yb, hb = pf.selective_scan(x[T // 2:], delta[T // 2:], A, B[T // 2:], C[T // 2:], D,
                               pf.selective_scan(x[:T // 2], delta[:T // 2], A, B[:T // 2], C[:T // 2], D, h0)[1])
    assert np.abs(yb - y1[T // 2:]).max() < 1e-5  # the state carries a split sequence exactly


def test_causal_conv_state_carries_across_calls():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    zero = np.zeros((3, 6), np.float32)
    whole, state = pf.causal_conv1d(x, zero, w, b)
    first, s1 = pf.causal_conv1d(x[:4], zero, w, b)
    rest, s2 = pf.causal_conv1d(x[4:], s1, w, b)
    assert np.allclose(np.concatenate([first, rest]), whole) and np.array_equal(s2, state)
    # x̃_t = b + Σ_k w[:, k] x_{t-3+k}: the last tap multiplies the current token
    assert np.allclose(whole[5], b + w[:, 0] * x[2] + w[:, 1] * x[3] + w[:, 2] * x[4] + w[:, 3] * x[5])
    assert np.allclose(whole[0], b + w[:, 3] * x[0])


def test_lambda_init_table():
    table = {1: 0.355509, 3: 0.556058, 5: 0.666122, 7: 0.726526, 9: 0.759677, 17: 0.796342, 31: 0.799945}
    for i, want in table.items():
        assert abs(pf.lambda_init_for(i) - want) < 1e-6


def test_elementwise_helpers_are_overflow_safe():
    x = np.array([-1e4, -30.0, 0.0, 19.0, 21.0, 1e4], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        sp = pf.softplus(x)
        si = pf.silu(x)
    assert sp[-1] == 1e4 and sp[0] == 0.0 and abs(sp[2] - math.log(2)) < 1e-7
    assert abs(sp[3] - math.log1p(math.exp(19.0))) < 1e-5
    assert abs(si[0]) < 1e-30 and si[-1] == 1e4  # silu(-1e4) is -0 in exact math: ~1e-31 here


def test_layer_norm_uses_bias_and_biased_variance():
    x = np.array([[1.0, 2.0, 3.0, 6.0]], np.float32)
    p = {"weight": np.full(4, 2.0, np.float32), "bias": np.full(4, 0.5, np.float32)}
    got = pf.layer_norm(x, p, 1e-5)
    want = (x - 3.0) / np.sqrt(3.5 + 1e-5) * 2.0 + 0.5
    assert np.allclose(got, want, atol=1e-6)


def test_bf16_widening_is_exact():
    vals = np.array([1.0, -2.5, 3.140625, 2.0 ** -100, -65280.0, 3e38], np.float32)
    vals = ((vals.view(np.uint32) >> 16) << 16).view(np.float32)  # exactly representable in bf16
    bits = (vals.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(pf.bf16_to_f32(bits), vals)


def test_linear_bf16_blocks_equal_fp32():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((5000, 300)).astype(np.float32)
    bits = (W.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16 values
    Wf = pf.bf16_to_f32(bits)
    for T in (1, 3, 40):  # the threaded few-rows path and the big-block many-rows path
        x = rng.standard_normal((T, 300)).astype(np.float32)
        assert np.abs(pf.linear(x, bits) - x @ Wf.T).max() < 1e-4
