"""Synthetic Phi-4-mini-flash snapshots with the real layout, for the tests and notes/bench_real_size.py.

A snapshot here is what `hf download` leaves: config.json, two bf16 shards plus
model.safetensors.index.json, tokenizer files and generation_config.json. Its tensor table comes from
convert.hf_tensor_shapes(config), so with REAL_CONFIG it is the real 434-tensor table. The data is either

  * a hole (`write_snapshot(..., fill=None)`): the shards have their full 7.7 GB length, but the data
    was never written, so the filesystem stores a few kB and reads back zeros; or
  * random bf16 values at scales that keep every activation finite (`fill=random_fill(seed)`),
    generated a few MB at a time, so writing a 7.7 GB checkpoint needs only a few MB of memory.

The tokenizer is the tiny fixture's byte-level BPE with its special tokens moved to the real ids of
sambay-reference §6 (<|endoftext|> 199999, <|system|> 200022, ...), so code that looks ids up by
string, builds the vocabulary mask or renders the chat template meets the real numbers.
"""
import json
import math
import os

import numpy as np

import convert

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "fixtures", "tiny-phi4flash")

# The real config.json values (sambay-reference §2; the exact file was not available to us).
REAL_CONFIG = {
    "architectures": ["Phi4FlashForCausalLM"], "model_type": "phi4flash", "vocab_size": 200064, "hidden_size": 2560,
    "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 40, "num_key_value_heads": 20,
    "sliding_window": 512, "mb_per_layer": 2, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
    "mamba_dt_rank": "auto", "layer_norm_eps": 1e-5, "max_position_embeddings": 262144, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999,
}

# Special tokens and their ids in the real tokenizer (sambay-reference §6).
REAL_SPECIAL_IDS = {
    "<|endoftext|>": 199999, "<|endofprompt|>": 200018, "<|assistant|>": 200019, "<|end|>": 200020,
    "<|user|>": 200021, "<|system|>": 200022, "<|tool|>": 200023, "<|/tool|>": 200024, "<|tool_call|>": 200025,
    "<|/tool_call|>": 200026, "<|tool_response|>": 200027, "<|tag|>": 200028,
}

SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
CHUNK_VALUES = 4 << 20  # values generated per step when filling: 16 MB of float32


def config_with(**changes):
    """REAL_CONFIG with some keys changed (e.g. fewer layers for a reduced benchmark)."""
    return {**REAL_CONFIG, **changes}


# ----------------------------------------------------------------------------------------------
# Tokenizer files with the real special-token ids

def write_tokenizer_files(dst):
    """The fixture's tokenizer.json / tokenizer_config.json / special_tokens_map.json with every
    special token at its real id, and a generation_config.json that names the real stop ids."""
    with open(os.path.join(TINY, "tokenizer.json")) as f:
        tok = json.load(f)
    for entry in tok["added_tokens"]:
        entry["id"] = REAL_SPECIAL_IDS[entry["content"]]
    vocab = tok["model"]["vocab"]
    for name, real_id in REAL_SPECIAL_IDS.items():
        vocab[name] = real_id  # the BPE model lists the specials too: keep both tables in agreement
    with open(os.path.join(TINY, "tokenizer_config.json")) as f:
        config = json.load(f)
    config["added_tokens_decoder"] = {str(REAL_SPECIAL_IDS[v["content"]]): v for v in config["added_tokens_decoder"].values()}
    generation = {"bos_token_id": 199999, "eos_token_id": [200020, 199999], "pad_token_id": 199999}
    for name, content in (("tokenizer.json", tok), ("tokenizer_config.json", config), ("generation_config.json", generation)):
        with open(os.path.join(dst, name), "w") as f:
            json.dump(content, f, ensure_ascii=False, indent=1)
    with open(os.path.join(TINY, "special_tokens_map.json")) as src, open(os.path.join(dst, "special_tokens_map.json"), "w") as out:
        out.write(src.read())


# ----------------------------------------------------------------------------------------------
# Random values: Hugging Face init-like scales, so a forward pass stays finite and not degenerate

def random_fill(seed=0):
    """-> fill(name, shape, r0, r1): float32 rows [r0, r1) of tensor `name`. Matrices are N(0, 1/fan_in)
    (each output ~ unit size whatever the width); norms near 1; A_log = log(1..N) as Mamba's init;
    the Δ bias puts softplus(bias) between 1e-3 and 1e-1 as Mamba's dt init."""
    rng = np.random.default_rng(seed)

    def fill(name, shape, r0, r1):
        rows = (r1 - r0,) + tuple(shape[1:])
        if name.endswith("A_log"):
            return np.broadcast_to(np.log(np.arange(1, shape[1] + 1, dtype=np.float32)), rows).copy()
        if name.endswith(".D") or name.endswith("subln.weight"):
            return np.ones(rows, np.float32)
        if name.endswith("dt_proj.bias"):
            dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), rows)).astype(np.float32)
            return np.log(np.expm1(dt))                                        # softplus⁻¹(dt)
        if "layernorm.weight" in name:
            return 1 + 0.1 * rng.standard_normal(rows, np.float32)
        if "lambda_" in name:
            return 0.1 * rng.standard_normal(rows, np.float32)
        if len(shape) == 1:                                                    # biases
            return 0.02 * rng.standard_normal(rows, np.float32)
        if name.endswith("embed_tokens.weight"):
            return 0.02 * rng.standard_normal(rows, np.float32)               # also the tied head: logits ~ 1
        fan_in = math.prod(shape[1:])
        return rng.standard_normal(rows, np.float32) / np.float32(math.sqrt(fan_in))
    return fill


# ----------------------------------------------------------------------------------------------
# The snapshot writer

def _shards(shapes, count):
    """Tensor names in table order, cut into `count` runs of about equal size: [[names], ...]."""
    total = sum(math.prod(s) for s in shapes.values())
    runs, size = [[] for _ in range(count)], 0
    for name, shape in shapes.items():
        runs[min(count - 1, size * count // total)].append(name)
        size += math.prod(shape)
    return [r for r in runs if r]


def write_snapshot(dst, hf_config=REAL_CONFIG, fill=None, shards=2, progress=None):
    """Write a snapshot folder; -> bytes of tensor data (7,705,125,888 for REAL_CONFIG).

    fill None leaves the data a hole (sparse files: full length, almost no disk); otherwise
    fill(name, shape, r0, r1) gives the float32 values of rows r0..r1, stored as bf16."""
    os.makedirs(dst)
    cfg = convert.config_from_hf(hf_config)
    shapes = convert.hf_tensor_shapes(cfg)
    runs = _shards(shapes, shards)
    weight_map, total = {}, 0
    for k, names in enumerate(runs):
        file = SHARD_NAME.format(k + 1, len(runs)) if len(runs) > 1 else "model.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            n = math.prod(shapes[name]) * 2
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(os.path.join(dst, file), "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            if fill is not None:
                for name in names:
                    shape = shapes[name]
                    row = math.prod(shape[1:])
                    step = max(1, CHUNK_VALUES // row)
                    for r0 in range(0, shape[0], step):
                        r1 = min(shape[0], r0 + step)
                        f.write(convert.f32_to_bf16(np.ascontiguousarray(fill(name, shape, r0, r1), np.float32)).tobytes())
                        if progress:
                            progress((r1 - r0) * row * 2)
            f.truncate(8 + len(blob) + offset)  # with no fill: the whole data region is a hole
        total += offset
    if len(runs) > 1:
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    write_tokenizer_files(dst)
    return total


# ----------------------------------------------------------------------------------------------
# Disk use

def disk_bytes(path):
    """Bytes a file or folder really occupies (allocated blocks, like `du`), not its length."""
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, files in os.walk(path) for f in files)


def holes_supported(folder):
    """Does this filesystem store a never-written region as a hole? (ext4, xfs, btrfs, tmpfs do.)"""
    probe = os.path.join(folder, ".sparse-probe")
    try:
        with open(probe, "wb") as f:
            f.truncate(64 << 20)
        return os.stat(probe).st_blocks * 512 < (1 << 20)
    finally:
        os.remove(probe)
