"""convert.py: a Hugging Face Phi-4-mini-flash folder -> one phi4flash safetensors file.

    python convert.py SRC DST [--dtype bfloat16|float32|int8] [--force]

SRC is a snapshot folder (config.json, model.safetensors or model-0000K-of-0000N.safetensors +
model.safetensors.index.json, tokenizer files, generation_config.json), or a repo id such as
microsoft/Phi-4-mini-flash-reasoning that `hf download` has put in the local Hugging Face cache
(nothing is downloaded here). Everything is checked before a byte is written; tensors are then
streamed a few MB at a time into DST/model.safetensors under the names phi4flash.tensor_shapes()
lists, and DST appears only when the whole conversion succeeded.

Layout choices: fused projections are split so every tensor has one meaning (see
phi4flash.tensor_shapes); weights stay [out, in] as in the checkpoint, which is already the layout
a batch-1 matrix-vector product reads row by row; bf16 is stored as bf16 (lossless for the real
checkpoint), widened to float32 (--dtype float32, twice the size), or quantised to int8 in groups of
32 inputs with one float32 scale each (--dtype int8, 0.56 times the size; phi4flash.py section 11).
Norms, biases, A_log, D, the conv kernel and λ vectors are always float32: they are tiny and feed
fp32 statistics.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # not POSIX: conversions are not locked against each other
    fcntl = None

import numpy as np

import phi4flash
from phi4flash import Config, Phi4FlashError, f32_to_bf16, read_safetensors_header

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json")
CHUNK_BYTES = 32 << 20  # source bytes read per step: peak memory is a few of these, never a tensor
PROGRESS_BYTES = 64 << 20  # a conversion reading more shows a progress bar (on a terminal)


# ----------------------------------------------------------------------------------------------
# config.json -> Config

def config_from_hf(hf, where="config.json"):
    """Read a Hugging Face Phi4Flash config dict; one-line Phi4FlashError on anything we cannot run."""
    # The rule: model_type must be "phi4flash" (what transformers dispatches on), and architectures, when
    # the config has it, must list Phi4FlashForCausalLM. The real config has both.
    if hf.get("model_type") != "phi4flash":
        raise Phi4FlashError(f"{where}: model_type is {hf.get('model_type')!r}; expected 'phi4flash' (Phi-4-mini-flash)")
    architectures = hf.get("architectures")
    if architectures is not None and (not isinstance(architectures, list) or "Phi4FlashForCausalLM" not in architectures):
        raise Phi4FlashError(f"{where}: architectures is {architectures!r}; expected a list with 'Phi4FlashForCausalLM'")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "sliding_window"):
        if key not in hf:
            raise Phi4FlashError(f"{where}: missing key {key!r}")
    L, D = hf["num_hidden_layers"], hf["hidden_size"]
    H, H_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    if L % 4 or L < 4:
        raise Phi4FlashError(f"{where}: num_hidden_layers is {L}; SambaY needs a multiple of 4")
    if D % H or H % H_kv or H % 2 or H_kv % 2:
        raise Phi4FlashError(f"{where}: {H} heads / {H_kv} KV heads for hidden_size {D}; need H | hidden, "
                             "H_kv | H, and both even (differential attention splits heads in two stripes)")
    if hf.get("mb_per_layer", 2) != 2:
        raise Phi4FlashError(f"{where}: mb_per_layer is {hf['mb_per_layer']}; only 2 (Mamba every other layer) exists")
    dt_rank = hf.get("mamba_dt_rank", "auto")
    dt_rank = math.ceil(D / 16) if dt_rank in (None, "auto") else dt_rank
    if not isinstance(dt_rank, int) or dt_rank < 1:
        raise Phi4FlashError(f"{where}: mamba_dt_rank is {hf.get('mamba_dt_rank')!r}; expected 'auto' or a positive int")
    # sliding_window: an int means W on the self-decoder's attention layers (odd i < L/2); a list
    # (the original config class expands it) gives each layer's window, null = full. layer_types,
    # if present, is not needed: layer kinds follow from the schedule and are checked against tensors.
    sw = hf["sliding_window"]
    if isinstance(sw, int) and sw > 0:
        windows = [sw if (i % 2 and i < L // 2) else None for i in range(L)]
    elif isinstance(sw, list) and len(sw) == L and all(w is None or (isinstance(w, int) and w > 0) for w in sw):
        windows = [sw[i] if (i % 2 and i < L // 2) else None for i in range(L)]
        if sw[L // 2 + 1] is not None:
            raise Phi4FlashError(f"{where}: sliding_window[{L // 2 + 1}] is {sw[L // 2 + 1]}; the shared-KV layer must be full attention")
    else:
        raise Phi4FlashError(f"{where}: sliding_window is {sw!r}; expected a positive int or a list of {L} ints/nulls")
    ints = {"mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2}
    values = {k: hf.get(k, v) if hf.get(k) is not None else v for k, v in ints.items()}
    for k, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise Phi4FlashError(f"{where}: {k} is {v!r}; expected a positive int")
    return Config(vocab_size=hf["vocab_size"], hidden_size=D, intermediate_size=hf["intermediate_size"],
                  num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H_kv,
                  sliding_window=tuple(windows), mamba_dt_rank=dt_rank,
                  layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
                  context_length=min(int(hf.get("max_position_embeddings") or 65536), 65536), **values)


# ----------------------------------------------------------------------------------------------
# The Hugging Face tensor table and how each of our tensors is cut from it. One table is written
# out, phi4flash.tensor_shapes (ours); HF_NAMES says which Hugging Face tensor each of ours comes
# from, and the pieces of one Hugging Face tensor follow each other, in row order, in ours. The plan
# and the Hugging Face table are derived from the two.

HF_NAMES = {  # our name after "layers.{i}." -> the Hugging Face name after "model.layers.{i}."
    "input_layernorm.weight": "input_layernorm.weight", "input_layernorm.bias": "input_layernorm.bias",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "post_attention_layernorm.bias": "post_attention_layernorm.bias",
    "mlp.fc1_gate": "mlp.fc1.weight", "mlp.fc1_up": "mlp.fc1.weight", "mlp.fc2": "mlp.fc2.weight",
    "mamba.in_proj_x": "attn.in_proj.weight", "mamba.in_proj_z": "attn.in_proj.weight",
    "mamba.conv1d_weight": "attn.conv1d.weight", "mamba.conv1d_bias": "attn.conv1d.bias",
    "mamba.x_proj_dt": "attn.x_proj.weight", "mamba.x_proj_B": "attn.x_proj.weight",
    "mamba.x_proj_C": "attn.x_proj.weight", "mamba.dt_proj": "attn.dt_proj.weight",
    "mamba.dt_proj_bias": "attn.dt_proj.bias", "mamba.A_log": "attn.A_log", "mamba.D": "attn.D",
    "mamba.out_proj": "attn.out_proj.weight",
    "gmu.in_proj": "attn.in_proj.weight", "gmu.out_proj": "attn.out_proj.weight",
    "attn.Wq": "attn.Wqkv.weight", "attn.Wk": "attn.Wqkv.weight", "attn.Wv": "attn.Wqkv.weight",
    "attn.bq": "attn.Wqkv.bias", "attn.bk": "attn.Wqkv.bias", "attn.bv": "attn.Wqkv.bias",
    "attn.out_proj": "attn.out_proj.weight", "attn.out_proj_bias": "attn.out_proj.bias",
    "attn.subln": "attn.inner_cross_attn.subln.weight",
    **{f"attn.lambda_{n}": f"attn.inner_cross_attn.lambda_{n}" for n in ("q1", "k1", "q2", "k2")},
}


class Piece(NamedTuple):
    ours: str      # our tensor
    theirs: str    # the Hugging Face tensor it is cut from
    r0: int        # its rows [r0, r1) of that tensor
    r1: int
    matrix: bool   # a linear weight or the embedding: stored in --dtype; every other tensor is float32


def hf_name(ours):
    if not ours.startswith("layers."):
        return "model." + ours                                  # embed_tokens, final_layernorm
    _, i, rest = ours.split(".", 2)
    return f"model.layers.{i}.{HF_NAMES[rest]}"


def conversion_plan(cfg):
    """[Piece] in tensor_shapes' order: each of our tensors is rows [r0, r1) of a Hugging Face one."""
    plan, rows = [], {}                                         # rows: HF name -> rows taken so far
    for ours, shape in phi4flash.tensor_shapes(cfg).items():
        theirs = hf_name(ours)
        r0 = rows.get(theirs, 0)
        rows[theirs] = r0 + shape[0]
        plan.append(Piece(ours, theirs, r0, r0 + shape[0], phi4flash.is_matrix(ours)))
    return plan


def hf_tensor_shapes(cfg):
    """Every tensor of the Hugging Face checkpoint: name -> shape (434 tensors for the real model):
    its pieces stacked on rows. The conv kernel is (d_inner, 1, d_conv) there, (d_inner, d_conv) here."""
    ours, shapes = phi4flash.tensor_shapes(cfg), {}
    for piece in conversion_plan(cfg):
        rest = ours[piece.ours][1:]
        shapes[piece.theirs] = (piece.r1, 1, *rest) if piece.theirs.endswith("conv1d.weight") else (piece.r1, *rest)
    return shapes


# ----------------------------------------------------------------------------------------------
# Reading the source folder (headers only) and validating it

def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise Phi4FlashError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Phi4FlashError(f"{path}: not valid JSON ({e})") from None


def find_tensors(src):
    """{hf name: (file, header entry, data start)} for a single file or an indexed set of shards."""
    index = os.path.join(src, "model.safetensors.index.json")
    single = os.path.join(src, "model.safetensors")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise Phi4FlashError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
        weight_map, files = None, ["model.safetensors"]
    else:
        shards = [f for f in os.listdir(src) if f.endswith(".safetensors")]
        hint = f" (found {shards[0]} but no model.safetensors.index.json)" if shards else ""
        raise Phi4FlashError(f"{src}: no model.safetensors or model.safetensors.index.json{hint}")
    found = {}
    for name in files:
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            raise Phi4FlashError(f"{path}: missing shard (listed in model.safetensors.index.json)")
        header, _, start = read_safetensors_header(path)
        for tensor, info in header.items():
            if tensor in found:
                raise Phi4FlashError(f"{path}: tensor {tensor} also stored in {found[tensor][0]}")
            found[tensor] = (path, info, start)
    if weight_map is not None:
        for tensor, name in weight_map.items():
            if tensor not in found or os.path.basename(found[tensor][0]) != name:
                raise Phi4FlashError(f"{os.path.join(src, name)}: tensor {tensor} is listed in the index but not stored in this shard")
    return found


SOURCE_DTYPES = ("BF16", "F16", "F32")  # what a Hugging Face checkpoint may hold (the real one: BF16)


def validate(src):
    """Check SRC completely; -> (Config, tensors found, plan). Raises Phi4FlashError with one line."""
    if not os.path.isdir(src):
        raise Phi4FlashError(f"SRC {src}: not a folder (expected a Hugging Face snapshot folder)")
    repo, _ = source_of(src)  # a snapshot in the Hugging Face cache: how to download a file it lost again
    again = (f"download it again with: {download_command(os.path.basename(repo)[len('models--'):].replace('--', '/'))}"
             if repo != os.path.realpath(src) else "download or copy that file again")
    for name in sorted(os.listdir(src)):  # a link whose blob is gone is named, never taken for an absent file
        if name.endswith((".json", ".safetensors")) or name in TOKENIZER_FILES:
            phi4flash.check_not_dangling(os.path.join(src, name), again)
    cfg = config_from_hf(_read_json(os.path.join(src, "config.json")), os.path.join(src, "config.json"))
    if not os.path.isfile(os.path.join(src, "tokenizer.json")):
        raise Phi4FlashError(f"{os.path.join(src, 'tokenizer.json')}: missing (the tokenizer is needed to chat)")
    found = find_tensors(src)
    expected = hf_tensor_shapes(cfg)
    for name, shape in expected.items():
        if name not in found:
            raise Phi4FlashError(f"{src}: tensor {name} is missing (expected shape {list(shape)})")
        path, info, _ = found[name]
        if info["dtype"] not in SOURCE_DTYPES:
            raise Phi4FlashError(f"{path}: tensor {name} has dtype {info['dtype']}; expected one of {', '.join(SOURCE_DTYPES)}")
        if tuple(info["shape"]) != shape:
            raise Phi4FlashError(f"{path}: tensor {name} has shape {info['shape']}, the config implies {list(shape)}")
    unknown = sorted(set(found) - set(expected))
    if unknown:
        raise Phi4FlashError(f"{found[unknown[0]][0]}: unexpected tensor {unknown[0]} (not part of Phi-4-mini-flash"
                             f"{'; ' + str(len(unknown)) + ' unexpected in all' if len(unknown) > 1 else ''})")
    return cfg, found, conversion_plan(cfg)


# ----------------------------------------------------------------------------------------------
# Writing: header first (every size is known), then each tensor in chunks of rows

def _convert_rows(raw, src_dtype, to_bf16):
    if src_dtype == "BF16":
        return raw if to_bf16 else phi4flash.bf16_to_f32(raw)
    x = raw.astype(np.float32)  # F16 widens exactly; F32 is a no-op copy
    return f32_to_bf16(x) if to_bf16 else x


# All-zero data becomes a hole in the output: the file is sparse (full length, no disk blocks
# there) and reads back as the same zeros. Real weights have no all-zero chunk, so for them nothing
# changes; it lets the real-size dry run (tests/test_dry_run.py) convert a 7.7 GB synthetic checkpoint
# whose data is one big hole using a few kB of disk. (The source is still read in full: asking the
# filesystem where its holes are, SEEK_DATA, would be faster, but a filesystem bug there would turn
# real weights into zeros without a word.)

def _all_zero_bits(a):
    """Every byte zero? (-0.0 is not: its sign bit is set.) Real weights fail the first test at once."""
    b = a.view(np.uint8)
    return not b[:64].any() and not b.any()


class Stored(NamedTuple):
    shape: tuple
    dtype: str     # safetensors dtype: BF16, F32, or I8 (with NAME.scales, F32)
    offset: int    # where its data starts, from the start of the data


BYTES = {"BF16": 2, "F32": 4, "I8": 1}


def converted_header(cfg, plan, dtype):
    """The safetensors header of a converted file, as bytes padded so the data starts 64-byte aligned;
    -> (header bytes, {our name: Stored} in file order: phi4flash.stored_tensors, int8 scales included)."""
    header = {"__metadata__": {"format": phi4flash.FORMAT, "format_version": phi4flash.format_version_for(dtype),
                               "config": json.dumps(_config_json(cfg)), "weights_dtype": dtype}}
    layout, offset = {}, 0
    for name, (shape, stored) in phi4flash.stored_tensors(cfg, dtype).items():
        nbytes = math.prod(shape) * BYTES[stored]
        header[name] = {"dtype": stored, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        layout[name] = Stored(shape, stored, offset)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 64)
    return len(blob).to_bytes(8, "little") + blob, layout


def stays_bf16(cfg, plan, dtype):
    """The matrices an int8 conversion keeps bf16 (their input width is not a multiple of the group)."""
    layout = phi4flash.stored_tensors(cfg, dtype)
    return [p.ours for p in plan if p.matrix and layout[p.ours][1] == "BF16"] if dtype == "int8" else []


def write_converted(path, cfg, found, plan, dtype, progress=None):
    """Stream every piece of the plan into `path`, a few MB of source rows at a time, in the layout
    converted_header gives. An int8 matrix's chunk of rows is quantised (phi4flash.quantize_int8) and
    its values and scales are written at their two places in the file."""
    header, layout = converted_header(cfg, plan, dtype)

    def put(data, at):
        out.seek(len(header) + at)
        if not _all_zero_bits(data):          # else a hole instead of zeros
            out.write(data.tobytes())

    with open(path, "wb") as out:
        out.write(header)
        files = {}
        try:
            for ours, theirs, r0, r1, _ in plan:
                file, info, start = found[theirs]
                shape, stored, offset = layout[ours]
                f = files.get(file) or files.setdefault(file, open(file, "rb"))
                src_dtype = np.dtype(phi4flash.SAFETENSORS_DTYPES[info["dtype"]])
                row = math.prod(info["shape"][1:]) if len(info["shape"]) > 1 else 1
                step = max(1, CHUNK_BYTES // (row * src_dtype.itemsize))
                for a in range(r0, r1, step):
                    n = min(r1, a + step) - a
                    raw = np.empty(n * row, src_dtype)
                    f.seek(start + info["data_offsets"][0] + a * row * src_dtype.itemsize)
                    if f.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                        raise Phi4FlashError(f"{file}: truncated while reading {theirs}")
                    rows = _convert_rows(raw, info["dtype"], stored == "BF16")
                    if stored != "I8":
                        put(rows, offset + (a - r0) * row * BYTES[stored])
                    elif not _all_zero_bits(rows):  # zeros quantise to q = 0, s = 0: left as holes
                        q, scales = phi4flash.quantize_int8(rows.reshape(n, row))  # (n, in) int8, (n, in/32) fp32
                        if not np.isfinite(scales).all():
                            raise Phi4FlashError(f"{file}: tensor {theirs} has a NaN or infinite weight in rows "
                                                 f"{a}..{a + n - 1}; int8 cannot store it (convert with --dtype bfloat16)")
                        put(q, offset + (a - r0) * row)
                        put(scales, layout[ours + ".scales"].offset + (a - r0) * scales.shape[1] * 4)
                    if progress:
                        progress(raw.nbytes)
            out.truncate(len(header) + _data_bytes(layout))  # the full length, also when the file ends in a hole
        finally:
            for f in files.values():
                f.close()


def _config_json(cfg):
    from dataclasses import asdict
    return {**asdict(cfg), "sliding_window": list(cfg.sliding_window)}


def size_text(n):
    """Bytes as people read them: 7.7 GB, 812.3 MB, 4.1 kB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def planned_bytes(cfg, plan, dtype):
    """The length of the converted model.safetensors: its header and every tensor as stored. For the
    real model: 7.7 GB in bf16, 15.4 GB in float32, 4.3 GB in int8 (scales included)."""
    header, layout = converted_header(cfg, plan, dtype)
    return len(header) + _data_bytes(layout)


def _data_bytes(layout):
    return sum(math.prod(t.shape) * BYTES[t.dtype] for t in layout.values())


def output_bytes(src, cfg, found, plan, dtype):
    """The disk space a conversion takes: planned_bytes and the copied side files. When the source
    shards are sparse files (the real-size dry run's), the tensor data is scaled by the share of them
    that is on disk: their holes are zeros, and zero chunks become holes in the output too."""
    header, layout = converted_header(cfg, plan, dtype)
    data = _data_bytes(layout)
    shards = [os.stat(f) for f in {file for file, _, _ in found.values()}]
    length, stored = sum(st.st_size for st in shards), sum(getattr(st, "st_blocks", 0) * 512 for st in shards)
    if 0 < stored < length:
        data = data * stored // length
    side = sum(os.path.getsize(os.path.join(src, n)) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n)))
    return len(header) + data + side


# A conversion writes into a hidden sibling of DST, .NAME.partial-PID, renamed into place at the end.
# Ctrl-C, SIGTERM and SIGHUP remove it; a process killed outright (SIGKILL, a power cut) cannot, so each
# run also removes the partial folders of processes that are no longer alive.
PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>\d+)(?:\.old)?")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a conversion, raised as Ctrl-C raises KeyboardInterrupt, so the same
    cleanup runs; `signum` gives the exit status 128 + signum."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt():
    """While converting, SIGTERM and SIGHUP raise Interrupted (a signal someone set to be ignored,
    such as SIGHUP under nohup, stays ignored). Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def interrupt(signum, frame):
        raise Interrupted(signum)

    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        pass
    return True


def remove_stale_partials(folder, name=None):
    """Remove the partial folders (of DST `name`, or of any DST) that dead processes left in `folder`;
    -> the paths removed."""
    if os.name != "posix" or not os.path.isdir(folder):  # os.kill(pid, 0) is a liveness test only on POSIX
        return []
    removed = []
    for entry in os.listdir(folder):
        m = PARTIAL.fullmatch(entry)
        path = os.path.join(folder, entry)
        if m and (name is None or m["name"] == name) and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])) \
                and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _inside(path, folder):
    return os.path.commonpath([path, folder]) == folder


# Two processes may convert into one folder at once: two chats started together on a new snapshot,
# a chat and a trace. They take turns: each holds an exclusive flock on the folder itself while it
# looks for what it needs and, when that is not there yet, makes it. The second one waits (and says
# so), then finds the first one's entry and uses it. Locking the folder, not a lock file, leaves
# nothing behind; the kernel releases the lock of a process that dies.
_HELD = set()  # the folders this process holds locked (resolve_model's convert() locks its folder again)


@contextlib.contextmanager
def folder_lock(folder, waiting=None):
    """Hold `folder` locked against other processes; waiting() is called once if one holds it already.
    A folder that cannot be opened (not there, not POSIX) or locked (a filesystem without flock) is
    not locked: whatever then fails is reported by the code that writes."""
    key, fd = os.path.realpath(folder), None
    if fcntl is not None and key not in _HELD:
        with contextlib.suppress(OSError):
            fd = os.open(folder, os.O_RDONLY)
    if fd is not None:
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting:
                    waiting()
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock: go on unlocked
            os.close(fd)
            fd = None
        except BaseException:  # Ctrl-C while waiting
            os.close(fd)
            raise
    if fd is not None:
        _HELD.add(key)
    try:
        yield
    finally:
        if fd is not None:
            _HELD.discard(key)
            os.close(fd)  # releases the lock


def convert(src, dst, dtype="bfloat16", force=False, show_progress=None, what="DST", hint="", announce=None,
            extra_files=None):
    """Validate SRC (a snapshot folder, or a repo id found in the local Hugging Face cache), then write
    DST atomically (a temporary sibling folder renamed into place). Every failure is one Phi4FlashError
    line and leaves nothing behind; an existing DST (with --force) is replaced only once the new one is
    complete. `what` and `hint` word the errors about DST (resolve_model writes into its cache);
    announce(dst, size) is called once the checks pass, before writing; extra_files {name: JSON value}
    are written into DST with the conversion."""
    src, dst = os.path.abspath(snapshot_folder(src, "SRC")), os.path.abspath(dst)

    def dst_error(text):
        return Phi4FlashError(f"{what} {dst}: {text}" + (f"; {hint}" if hint else ""))

    if dtype not in phi4flash.WEIGHTS_DTYPES:
        raise Phi4FlashError(f"--dtype {dtype}: expected {', '.join(phi4flash.WEIGHTS_DTYPES)}")
    if os.path.exists(dst) and not force:
        raise dst_error("already exists (use --force to replace it)")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise dst_error("exists and is not a folder")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_dst == real_src:
        raise dst_error("is SRC itself")
    if _inside(real_dst, real_src):  # refused: a snapshot folder (the hub's, too) holds the download only
        raise dst_error(f"is inside SRC {src}; write the conversion outside the snapshot folder")
    if _inside(real_src, real_dst):
        raise dst_error(f"contains SRC {src}; replacing it would delete the snapshot")
    cfg, found, plan = validate(src)
    kept = stays_bf16(cfg, plan, dtype)
    if kept:
        print(f"note: {len(kept)} of the {sum(p.matrix for p in plan)} matrices stay bf16 in the int8 conversion, their "
              f"input width not a multiple of {phi4flash.GROUP}: {', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''}",
              file=sys.stderr)

    parent = os.path.dirname(dst)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise dst_error(f"cannot create the folder {e.filename or parent} ({e.strerror})") from None
    remove_stale_partials(parent, os.path.basename(dst))
    need = output_bytes(src, cfg, found, plan, dtype)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise dst_error(f"needs {size_text(need)} free in {parent}, which has {size_text(free)}")
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.mkdir(tmp)
    except OSError as e:
        raise dst_error(f"cannot write in {parent} ({e.strerror})") from None
    try:
        with signals_interrupt():
            if announce:
                announce(dst, need)
            _write(src, tmp, cfg, found, plan, dtype, show_progress, extra_files or {})
            with folder_lock(parent):  # another conversion into the same DST may finish at the same time
                if os.path.exists(dst) and not force:
                    raise dst_error("already exists: another process wrote it while this one converted (use --force "
                                    "to replace it)")
                old = tmp + ".old" if os.path.exists(dst) else None
                if old:
                    os.rename(dst, old)
                    try:
                        os.rename(tmp, dst)
                    except BaseException:
                        os.rename(old, dst)
                        raise
                else:
                    os.rename(tmp, dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise dst_error(f"the disk of {parent} is full ({e.strerror}); the conversion needs {size_text(need)}, "
                            "nothing was kept") from None
        if e.filename and not _inside(os.path.realpath(e.filename), os.path.realpath(tmp)):
            raise Phi4FlashError(f"{e.filename}: cannot read it ({e.strerror})") from None  # a source file
        raise dst_error(f"cannot write in {parent} ({e.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:  # DST is the new conversion now; a signal from here on finds nothing to undo
        shutil.rmtree(old, ignore_errors=True)
    return cfg


def _write(src, tmp, cfg, found, plan, dtype, show_progress, extra_files):
    total = sum((p.r1 - p.r0) * math.prod(found[p.theirs][1]["shape"][1:] or [1])
                * np.dtype(phi4flash.SAFETENSORS_DTYPES[found[p.theirs][1]["dtype"]]).itemsize for p in plan)
    # A bar only on a terminal: in a file or a pipe it is a line cut to 80 columns (the note says it all)
    show = total > PROGRESS_BYTES and sys.stderr.isatty() if show_progress is None else show_progress
    if show:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeRemainingColumn(), transient=False,
                      console=Console(stderr=True)) as bar:
            task = bar.add_task(f"converting {source_of(src)[1]}", total=total)  # a hub snapshot: its repo's name
            write_converted(os.path.join(tmp, "model.safetensors"), cfg, found, plan, dtype,
                            lambda n: bar.advance(task, n))
    else:
        write_converted(os.path.join(tmp, "model.safetensors"), cfg, found, plan, dtype)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
    for name, value in extra_files.items():
        with open(os.path.join(tmp, name), "w") as f:
            json.dump(value, f, indent=1)
    phi4flash.load(tmp)  # read back: headers, names and shapes must be what load() expects


# ----------------------------------------------------------------------------------------------
# A repo id ("microsoft/Phi-4-mini-flash-reasoning"), found in the local Hugging Face cache that
# `hf download REPO_ID` fills. huggingface_hub itself finds it (its cache folder, refs/main, the
# snapshot that names), with local_files_only=True: nothing is downloaded, no connection is made.

HF_REPO_ID = "microsoft/Phi-4-mini-flash-reasoning"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name: anything else is taken as a path


def download_command(repo_id):
    """The command that puts repo_id into the local Hugging Face cache (the `hf` CLI of huggingface_hub
    0.34 and later; older hubs called it `huggingface-cli download`)."""
    return f"hf download {repo_id}"


def find_snapshot(repo_id, what="MODEL"):
    """owner/name -> the snapshot folder of revision main in the local Hugging Face cache; a one-line
    Phi4FlashError that says how to download it when it is not there."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except HFValidationError:
        raise Phi4FlashError(f"{what} {repo_id}: not a folder, and not a Hugging Face repo id") from None
    except LocalEntryNotFoundError:
        raise Phi4FlashError(f"{what} {repo_id}: not a folder, and not in the local Hugging Face cache "
                             f"({constants.HF_HUB_CACHE}); download it with: {download_command(repo_id)}") from None


def snapshot_folder(arg, what="MODEL"):
    """A folder argument as it is; owner/name that is not a folder -> its snapshot in the hub cache."""
    arg = os.fspath(arg)
    return find_snapshot(arg, what) if not os.path.isdir(arg) and REPO_ID.fullmatch(arg) else arg


# ----------------------------------------------------------------------------------------------
# A model argument that may be a converted folder, a Hugging Face snapshot or a repo id

def cache_root():
    return os.environ.get("PHI4FLASH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "phi4flash")


def is_converted(path):
    """A complete converted folder: its model.safetensors says phi4flash in its metadata."""
    try:
        _, meta, _ = read_safetensors_header(os.path.join(path, "model.safetensors"))
    except (OSError, Phi4FlashError):
        return False
    return meta.get("format") == phi4flash.FORMAT


def meant_as_converted(path):
    """A folder the user gives that is a converted one, damaged or not: a model.safetensors and no
    config.json (which every Hugging Face snapshot has). Loading it names what is wrong with it."""
    return is_converted(path) or (os.path.isfile(os.path.join(path, "model.safetensors"))
                                  and not os.path.lexists(os.path.join(path, "config.json")))


# The conversion cache. An entry is named after the content it was made from, never after times:
#   CACHE/NAME-KEY/   a converted folder, plus SOURCE_FILE = {"source", "key", "dtype"}
# (NAME is the first source's, for people; only KEY is looked up, so the same content in another
# folder finds the entry too).
# KEY hashes, for each file convert reads, what identifies its content:
#   * in the Hugging Face cache, the blob a snapshot file links to: its name is the hash of its bytes;
#   * elsewhere, a JSON or tokenizer file's bytes; a .safetensors file's size, header, and 4 KiB at the
#     start, middle and end of every tensor's data (new weights change all three; reading them costs
#     a few MB where hashing the whole real model would read 7.7 GB at every start);
# and the dtype and the format version. "source" is the snapshot folder, or the repo's folder in the
# hub cache: a conversion of new content from the same source replaces the old entry.
SOURCE_FILE = "phi4flash-source.json"
SAMPLE = 4096


def _file_identity(path):
    real = os.path.realpath(path)
    if os.path.basename(os.path.dirname(real)) == "blobs":
        return "blob " + os.path.basename(real)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if not path.endswith(".safetensors"):
            h.update(f.read())
            return "sha256 " + h.hexdigest()
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        try:
            header, _, start = read_safetensors_header(path)
        except Phi4FlashError:  # convert will say what is wrong with it; the key only has to differ
            header, start = {}, 0
        f.seek(0)
        h.update(f.read(start or SAMPLE))
        for name in sorted(header):
            begin, end = (start + o for o in header[name]["data_offsets"])
            for at in sorted({begin, max(begin, (begin + end - SAMPLE) // 2), max(begin, end - SAMPLE)}):
                f.seek(at)
                h.update(f.read(min(SAMPLE, end - at)))
    return f"size {size} sampled {h.hexdigest()}"


def source_key(path, dtype):
    """The cache key of converting snapshot folder `path` to `dtype` (see above)."""
    h = hashlib.sha256(f"{dtype} {phi4flash.format_version_for(dtype)}\n".encode())
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if (name.endswith((".safetensors", ".json")) or name in TOKENIZER_FILES) and os.path.isfile(file):
            h.update(f"{name} {_file_identity(file)}\n".encode())
    return h.hexdigest()


def source_of(path):
    """-> (the source an entry belongs to, the entry's readable name): a hub-cache snapshot belongs to
    its repo, any other folder to itself."""
    real = os.path.realpath(path)
    repo, snapshots = os.path.split(os.path.dirname(real))
    if snapshots == "snapshots" and os.path.basename(repo).startswith("models--"):
        return repo, os.path.basename(repo).split("--")[-1]
    return real, os.path.basename(real)


def _entry_source(entry):
    try:
        with open(os.path.join(entry, SOURCE_FILE)) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def resolve_model(path, dtype="bfloat16", show_progress=None):
    """Converted folder -> itself. Hugging Face snapshot, or a repo id in the local hub cache -> its
    conversion, made once into the cache folder and reused while the content is the same (see above).
    Converting says where it writes, on stderr; a new conversion replaces the entry of the same
    source's older content."""
    path = snapshot_folder(path)
    if not os.path.isdir(path):
        raise Phi4FlashError(f"MODEL {path}: not a folder (expected a converted folder, a Hugging Face snapshot "
                             f"or a repo id such as {HF_REPO_ID})")
    if meant_as_converted(path):
        return path
    root = cache_root()
    source, name = source_of(path)
    key = source_key(path, dtype)
    entry = cached_entry(root, key)
    if entry:
        return entry
    validate(path)  # a bad snapshot is its one line before anything is made or waited for
    with contextlib.suppress(OSError):  # to lock it; a folder that cannot be made is convert()'s one-line error
        os.makedirs(root, exist_ok=True)

    def waiting():
        print(f"note: another process is converting into {root}; waiting for it to finish", file=sys.stderr, flush=True)

    with folder_lock(root, waiting):
        entry = cached_entry(root, key)  # the process we waited for may have made it
        if entry:
            print(f"note: using {entry}, which the other process converted", file=sys.stderr)
            return entry
        return _convert_into_cache(path, root, source, name, key, dtype, show_progress)


def cached_entry(root, key):
    """The complete entry of content `key` in the cache folder, whatever its name (the same content converted
    from this folder or another), or None."""
    made = [os.path.join(root, e) for e in (sorted(os.listdir(root)) if os.path.isdir(root) else [])
            if e.endswith(f"-{key[:16]}") and not e.startswith(".")]
    return next((entry for entry in made if is_converted(entry)), None)


def _convert_into_cache(path, root, source, name, key, dtype, show_progress):
    """resolve_model's conversion, with the cache folder locked: -> the new entry. It replaces the entry of the
    same source's older content."""
    dst = os.path.join(root, f"{name}-{key[:16]}")
    remove_stale_partials(root)

    def announce(dst, size):
        print(f"note: converting {path} once into {dst} ({size_text(size)}; PHI4FLASH_CACHE sets the folder)",
              file=sys.stderr, flush=True)

    convert(path, dst, dtype, force=os.path.exists(dst), show_progress=show_progress, what="cache folder",
            hint="set PHI4FLASH_CACHE to a folder with room that you can write", announce=announce,
            extra_files={SOURCE_FILE: {"source": source, "key": key, "dtype": dtype}})
    for entry in sorted(os.listdir(root)):  # the same source's older content: its entry is stale now
        old = os.path.join(root, entry)
        info = _entry_source(old) if old != dst and os.path.isdir(old) else None
        if info and info.get("source") == source and info.get("dtype") == dtype and info.get("key") != key:
            shutil.rmtree(old, ignore_errors=True)
            print(f"note: removed {old}, the conversion of this source's earlier content", file=sys.stderr)
    return dst


def main(argv=None):
    ap = phi4flash.OneLineParser(description="Convert a Hugging Face Phi-4-mini-flash folder for phi4flash.")
    ap.add_argument("src", metavar="SRC", help="Hugging Face snapshot folder, or a repo id downloaded into the local "
                    f"Hugging Face cache (e.g. {HF_REPO_ID})")
    ap.add_argument("dst", metavar="DST", help="output folder (must not exist unless --force)")
    ap.add_argument("--dtype", choices=phi4flash.WEIGHTS_DTYPES, default="bfloat16",
                    help="storage of the weight matrices (default bfloat16: lossless for the bf16 checkpoint; "
                    "int8: groups of 32 with a float32 scale, 0.56x the size, not exact)")
    ap.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = ap.parse_args(argv)
    try:
        cfg = convert(args.src, args.dst, args.dtype, args.force)
    except Phi4FlashError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (Interrupted)
        which, code = phi4flash.interruption(e)
        print(f"interrupted{which}: nothing was written", file=sys.stderr)
        return code
    n = sum(math.prod(s) for s in phi4flash.tensor_shapes(cfg).values())
    print(f"wrote {os.path.join(args.dst, 'model.safetensors')}: {cfg.num_hidden_layers} layers, {n:,} parameters, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
