"""Work counts, not timings: prefill is linear in the prompt length past the window."""
import numpy as np

import phi4flash as pf


def count_prefill_work(model, T, monkeypatch):
    """Prefill T random tokens -> ({layer: attention score elements, heads x queries x keys},
    [rows given to each selective_scan call])."""
    layer, scores, scans = [None], {}, []
    core, scan = pf.differential_attention, pf.selective_scan

    def tag(mixer):  # remember which layer the attention core is working for
        def tagged(u, p, kv, pos, i, cfg, **kw):
            layer[0] = i
            return mixer(u, p, kv, pos, i, cfg, **kw)
        return tagged

    def counting_core(q, k, v, mask, *args, **kw):
        scores[layer[0]] = scores.get(layer[0], 0) + q.shape[0] * mask.size
        return core(q, k, v, mask, *args, **kw)

    def counting_scan(x, *args, **kw):
        scans.append(x.shape[0])
        return scan(x, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(pf, "self_attention", tag(pf.self_attention))
        m.setattr(pf, "cross_attention", tag(pf.cross_attention))
        m.setattr(pf, "differential_attention", counting_core)
        m.setattr(pf, "selective_scan", counting_scan)
        model.prefill(np.random.default_rng(T).integers(0, 500, T))
    return scores, scans


def test_prefill_work_is_linear_past_the_window(model, monkeypatch):
    cfg = model.config
    N = 4 * cfg.sliding_window[1]
    small, _ = count_prefill_work(model, N, monkeypatch)
    large, scans = count_prefill_work(model, 4 * N, monkeypatch)
    assert sum(large.values()) / sum(small.values()) <= 4.4, (small, large)
    for i in small:
        assert large[i] / small[i] <= 4.4, (i, small[i], large[i])
    # layer L/2+1 and the cross layers: the last token's query only, over all 4N keys
    H = cfg.num_attention_heads
    assert large[cfg.kv_layer] == large[cfg.kv_layer + 2] == H * 4 * N
    # one vectorised scan call per Mamba layer over all tokens, never one call per token
    assert scans == [4 * N] * cfg.layer_kinds.count("mamba")
