"""The real Phi-4-mini-flash-reasoning config (sambay-reference §2-§3): schedule, shapes, counts —
checked without materialising 7.7 GB (a sparse file carries the real headers)."""
import json
import math
import os

import numpy as np
import pytest

import convert
import phi4flash
from conftest import TINY

REAL_CONFIG = {
    "architectures": ["Phi4FlashForCausalLM"], "model_type": "phi4flash", "vocab_size": 200064, "hidden_size": 2560,
    "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 40, "num_key_value_heads": 20,
    "sliding_window": 512, "mb_per_layer": 2, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
    "mamba_dt_rank": "auto", "layer_norm_eps": 1e-5, "max_position_embeddings": 262144, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999,
}


@pytest.fixture
def cfg():
    return convert.config_from_hf(REAL_CONFIG)


def test_schedule(cfg):
    kinds = cfg.layer_kinds
    assert kinds[:16] == ["mamba", "attn"] * 8
    assert kinds[16:18] == ["mamba", "attn"] and (cfg.memory_layer, cfg.kv_layer) == (16, 17)
    assert kinds[18:] == ["gmu", "cross"] * 7
    assert cfg.sliding_window == tuple(512 if i % 2 and i < 16 else None for i in range(32))
    assert (cfg.head_dim, cfg.d_inner, cfg.mamba_dt_rank, cfg.context_length) == (64, 5120, 160, 65536)


def test_hf_tensor_table_counts(cfg):
    shapes = convert.hf_tensor_shapes(cfg)
    assert len(shapes) == 434
    assert sum(math.prod(s) for s in shapes.values()) == 3_852_562_944
    assert sum(math.prod(s) for s in shapes.values()) * 2 == 7_705_125_888  # bf16 bytes
    assert shapes["model.layers.19.attn.Wqkv.weight"] == (2560, 2560)  # cross-attention: queries only
    assert shapes["model.layers.17.attn.Wqkv.weight"] == (5120, 2560)
    assert shapes["model.layers.16.attn.x_proj.weight"] == (192, 5120)
    assert shapes["model.layers.30.attn.in_proj.weight"] == (5120, 2560) and "model.layers.30.attn.A_log" not in shapes
    per_kind = {"mamba": 41_241_600, "attn": 19_668_864, "cross": 13_112_704, "gmu": 26_214_400}
    for i, kind in enumerate(cfg.layer_kinds):
        mixer = sum(math.prod(s) for n, s in shapes.items() if n.startswith(f"model.layers.{i}.attn."))
        assert mixer == per_kind[kind], i


def test_plan_covers_every_source_row_once(cfg):
    shapes = convert.hf_tensor_shapes(cfg)
    ours = phi4flash.tensor_shapes(cfg)
    covered = {}
    for name, theirs, r0, r1, _ in convert.conversion_plan(cfg):
        assert ours[name][0] == r1 - r0 and math.prod(ours[name]) == (r1 - r0) * math.prod(shapes[theirs][1:])
        covered.setdefault(theirs, []).append((r0, r1))
    assert covered.keys() == shapes.keys()
    for theirs, spans in covered.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == shapes[theirs][0]
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert sum(math.prod(s) for s in ours.values()) == 3_852_562_944


def sparse_real_snapshot(path):
    """The real tensor table in a safetensors header, the data a hole in a sparse file: 7.7 GB long,
    a few kB on disk."""
    os.makedirs(path)
    cfg = convert.config_from_hf(REAL_CONFIG)
    header, offset = {}, 0
    for name, shape in convert.hf_tensor_shapes(cfg).items():
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    json.dump(REAL_CONFIG, open(path / "config.json", "w"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        open(path / name, "w").write(open(os.path.join(TINY, name)).read())
    return offset


def test_real_size_snapshot_passes_validation(tmp_path):
    nbytes = sparse_real_snapshot(tmp_path / "real")
    assert nbytes == 7_705_125_888
    cfg, found, plan = convert.validate(str(tmp_path / "real"))
    assert len(found) == 434 and len(plan) == len(phi4flash.tensor_shapes(cfg))
    assert cfg.layer_kinds[16:18] == ["mamba", "attn"]


@pytest.mark.parametrize("change,words", [
    ({"num_hidden_layers": 30}, "multiple of 4"),
    ({"mb_per_layer": 3}, "mb_per_layer"),
    ({"sliding_window": "512"}, "sliding_window"),
    ({"mamba_dt_rank": -1}, "mamba_dt_rank"),
    ({"num_key_value_heads": 15}, "even"),
])
def test_config_errors_name_the_key(change, words):
    with pytest.raises(phi4flash.Phi4FlashError, match=words):
        convert.config_from_hf({**REAL_CONFIG, **change})


def test_sliding_window_list_form():
    L = 32
    sw = [512 if i % 2 and i < 16 else None for i in range(L)]
    assert convert.config_from_hf({**REAL_CONFIG, "sliding_window": sw}).sliding_window == tuple(sw)
    bad = list(sw)
    bad[17] = 512
    with pytest.raises(phi4flash.Phi4FlashError, match="shared-KV layer must be full"):
        convert.config_from_hf({**REAL_CONFIG, "sliding_window": bad})
