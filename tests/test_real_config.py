"""The real Phi-4-mini-flash-reasoning config (sambay-reference §2-§3): schedule, shapes, counts —
checked without materialising 7.7 GB (a sparse file carries the real headers)."""
import math
import os

import pytest

import convert
import phi4flash
from synthetic import REAL_CONFIG, disk_bytes, write_snapshot


@pytest.fixture
def cfg():
    return convert.config_from_hf(REAL_CONFIG)


def test_schedule(cfg):
    kinds = cfg.layer_kinds
    assert kinds[:16] == ["mamba", "swa"] * 8
    assert kinds[16:18] == ["mamba", "full"] and (cfg.memory_layer, cfg.kv_layer) == (16, 17)
    assert kinds[18:] == ["gmu", "cross"] * 7
    assert cfg.sliding_window == tuple(512 if i % 2 and i < 16 else None for i in range(32))
    assert (cfg.head_dim, cfg.d_inner, cfg.mamba_dt_rank, cfg.context_length) == (64, 5120, 160, 65536)


def test_the_space_a_conversion_needs(cfg):
    """convert checks free space before writing, with this number from the plan: what README says."""
    plan = convert.conversion_plan(cfg)
    assert convert.size_text(convert.planned_bytes(cfg, plan, "bfloat16")) == "7.7 GB"
    assert convert.size_text(convert.planned_bytes(cfg, plan, "float32")) == "15.4 GB"


def test_hf_tensor_table_counts(cfg):
    shapes = convert.hf_tensor_shapes(cfg)
    assert len(shapes) == 434
    assert sum(math.prod(s) for s in shapes.values()) == 3_852_562_944
    assert sum(math.prod(s) for s in shapes.values()) * 2 == 7_705_125_888  # bf16 bytes
    assert shapes["model.layers.19.attn.Wqkv.weight"] == (2560, 2560)  # cross-attention: queries only
    assert shapes["model.layers.17.attn.Wqkv.weight"] == (5120, 2560)
    assert shapes["model.layers.16.attn.x_proj.weight"] == (192, 5120)
    assert shapes["model.layers.30.attn.in_proj.weight"] == (5120, 2560) and "model.layers.30.attn.A_log" not in shapes
    per_kind = {"mamba": 41_241_600, "swa": 19_668_864, "full": 19_668_864, "cross": 13_112_704, "gmu": 26_214_400}
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


def test_real_size_snapshot_passes_validation(tmp_path):
    """The real tensor table in two shard headers plus the index; the data is a hole in sparse files:
    7.7 GB long, a few kB on disk."""
    nbytes = write_snapshot(tmp_path / "real")
    assert nbytes == 7_705_125_888 and disk_bytes(tmp_path / "real") < (16 << 20)
    cfg, found, plan = convert.validate(str(tmp_path / "real"))
    assert len(found) == 434 and len(plan) == len(phi4flash.tensor_shapes(cfg))
    assert {os.path.basename(f) for f, _, _ in found.values()} == {"model-00001-of-00002.safetensors",
                                                                  "model-00002-of-00002.safetensors"}
    assert cfg.layer_kinds[16:18] == ["mamba", "full"]


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
