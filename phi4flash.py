"""phi4flash: Microsoft's Phi-4-mini-flash-reasoning (SambaY) in one NumPy file.

Read top to bottom: config and layer schedule -> loading -> math helpers -> the mixers in paper
order (SwiGLU MLP, Mamba-1, differential attention, GMU) -> cache -> the layer loop -> sampling ->
generation -> command line. Every array op goes through `xp` (NumPy here, CuPy on a GPU).

Glossary (code name: meaning, size in the real 3.85B model)
  T          tokens in this call                      S      keys visible to a query
  D          hidden_size, 2560                        V      vocab rows, 200064 (ids past the tokenizer: no token)
  F          intermediate_size of the MLP, 10240      L      num_hidden_layers, 32
  d_inner    Mamba inner width expand*D, 5120         N      Mamba d_state, 16
  d_conv     Mamba conv width, 4                      dt_rank  rank R of the Δ projection, 160
  H, H_kv    query / key-value heads, 40 / 20         hd     head_dim, 64;  G = H / H_kv = 2
  W          sliding window: 512 keys, the current token included
  Δ (delta)  Mamba step size; A = -exp(A_log); h the SSM state (d_inner, N)      [Mamba, 2312.00752]
  λ, lambda_init  differential attention weight and its per-layer offset   [Diff Transformer, 2410.05258]
  memory     m: the pre-gate scan output of layer L/2, read by every GMU        [SambaY, 2507.06607]
  YOCO       "you only cache once": layer L/2+1's K/V serve every cross-attention layer

Layer schedule (L = 32): even i < L/2 Mamba, odd i < L/2 sliding-window attention (the
self-decoder, Samba); i = L/2 Mamba that exports `memory`; i = L/2+1 full attention whose K/V
are the one shared cache; i > L/2+1: GMU if even, cross-attention if odd (the cross-decoder).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import sys
import threading
from dataclasses import asdict, dataclass, field

import numpy as np

FORMAT = "phi4flash"
FORMAT_VERSION = "1"  # bump when the converted layout changes; load() refuses other versions


class Phi4FlashError(ValueError):
    """A problem the user can fix (a bad path, file or argument): its message is one line."""


def get_xp(a):
    """The array namespace of `a`: numpy for host arrays, cupy for device arrays."""
    if type(a).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


# ----------------------------------------------------------------------------------------------
# Config and layer schedule

@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: tuple  # per layer: W for a sliding-window attention layer, None otherwise
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int = 160
    layer_norm_eps: float = 1e-5
    context_length: int = 65536  # the longest sequence we accept (the model card says 64K)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def d_inner(self):
        return self.mamba_expand * self.hidden_size

    @property
    def memory_layer(self):  # L/2: the Mamba layer whose scan output is the GMU memory
        return self.num_hidden_layers // 2

    @property
    def kv_layer(self):  # L/2+1: the one full-attention layer; its K/V are shared (YOCO)
        return self.num_hidden_layers // 2 + 1

    @property
    def layer_kinds(self):
        return [layer_kind(self, i) for i in range(self.num_hidden_layers)]


def layer_kind(cfg, i):
    """SambaY schedule (2507.06607 §2): 'mamba', 'attn' (self-attention), 'gmu' or 'cross'."""
    if i <= cfg.memory_layer:
        return "mamba" if i % 2 == 0 else "attn"
    if i == cfg.kv_layer:
        return "attn"
    return "gmu" if i % 2 == 0 else "cross"


def lambda_init(i):
    """Differential attention's λ_init for absolute layer index i (Mamba layers counted)."""
    return 0.8 - 0.6 * math.exp(-0.3 * i)


def tensor_shapes(cfg):
    """Every tensor of a converted checkpoint: our name -> shape. Linear weights are [out, in].

    The converter splits fused projections so each tensor has one meaning:
    in_proj -> in_proj_x | in_proj_z, x_proj -> x_proj_dt | x_proj_B | x_proj_C,
    Wqkv -> Wq | Wk | Wv (+ biases), fc1 -> fc1_gate | fc1_up.
    """
    D, F, V, N = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.mamba_d_state
    E, R, hd = cfg.d_inner, cfg.mamba_dt_rank, cfg.head_dim
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    shapes = {"embed_tokens.weight": (V, D), "final_layernorm.weight": (D,), "final_layernorm.bias": (D,)}
    for i, kind in enumerate(cfg.layer_kinds):
        p = f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[p + norm + ".weight"] = (D,)
            shapes[p + norm + ".bias"] = (D,)
        shapes.update({p + "mlp.fc1_gate": (F, D), p + "mlp.fc1_up": (F, D), p + "mlp.fc2": (D, F)})
        if kind == "mamba":
            m = p + "mamba."
            shapes.update({m + "in_proj_x": (E, D), m + "in_proj_z": (E, D),
                           m + "conv1d_weight": (E, cfg.mamba_d_conv), m + "conv1d_bias": (E,),
                           m + "x_proj_dt": (R, E), m + "x_proj_B": (N, E), m + "x_proj_C": (N, E),
                           m + "dt_proj": (E, R), m + "dt_proj_bias": (E,),
                           m + "A_log": (E, N), m + "D": (E,), m + "out_proj": (D, E)})
        elif kind == "gmu":
            shapes.update({p + "gmu.in_proj": (E, D), p + "gmu.out_proj": (D, E)})
        else:
            a = p + "attn."
            shapes.update({a + "Wq": (H * hd, D), a + "bq": (H * hd,)})
            if kind == "attn":  # cross-attention has no K/V projection: it reads layer L/2+1's
                shapes.update({a + "Wk": (H_kv * hd, D), a + "bk": (H_kv * hd,),
                               a + "Wv": (H_kv * hd, D), a + "bv": (H_kv * hd,)})
            shapes.update({a + "out_proj": (D, D), a + "out_proj_bias": (D,), a + "subln": (2 * hd,)})
            shapes.update({a + name: (hd,) for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")})
    return shapes


# ----------------------------------------------------------------------------------------------
# Loading: a converted folder holds ONE safetensors file, read through a memory map

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # bf16 kept as raw bits


def read_safetensors_header(path):
    """-> (header dict without '__metadata__', metadata dict, byte offset where data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise Phi4FlashError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(prefix, "little")
        if n > size - 8 or n > 100_000_000:
            raise Phi4FlashError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise Phi4FlashError(f"{path}: unreadable safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    for name, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise Phi4FlashError(f"{path}: tensor {name} has dtype {info.get('dtype')}; expected one of F32, F16, BF16")
        begin, end = info["data_offsets"]
        nbytes = math.prod(info["shape"]) * np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).itemsize
        if end - begin != nbytes:
            raise Phi4FlashError(f"{path}: tensor {name} holds {end - begin} bytes; shape {info['shape']} needs {nbytes}")
        if 8 + n + end > size:
            raise Phi4FlashError(f"{path}: truncated: tensor {name} ends at byte {8 + n + end}, the file has {size}")
    return header, metadata, 8 + n


def read_safetensors(path):
    """-> ({name: read-only array backed by the file}, metadata). BF16 tensors come back as uint16 bits."""
    header, metadata, start = read_safetensors_header(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b""
    tensors = {}
    for name, info in header.items():
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        count = math.prod(info["shape"])
        tensors[name] = np.frombuffer(buf, dtype, count, start + info["data_offsets"][0]).reshape(info["shape"])
    return tensors, metadata


def bf16_to_f32(bits):
    """bf16 is the top half of an fp32: widen the uint16 bits and shift them up (exact)."""
    xp = get_xp(bits)
    return (bits.astype(xp.uint32) << 16).view(xp.float32)


def f32(a):
    """Any stored weight as float32 (bf16 bits are widened exactly)."""
    return bf16_to_f32(a) if a.dtype == np.uint16 else a.astype(np.float32, copy=False)


@dataclass(eq=False)
class Model:
    config: Config
    embed_tokens: object          # (V, D), float32 or bf16 bits; also the tied LM head
    final_layernorm: dict         # weight, bias: (D,)
    layers: list                  # per layer {"input_layernorm": {...}, "mlp": {...}, "mamba"|"attn"|"gmu": {...}}
    tokenizer: object = None      # tokenizers.Tokenizer, when the folder has tokenizer.json
    token_mask: object = None     # (V,) bool: True for ids that have a token; the others are never sampled
    stop_ids: tuple = ()          # generation stops after sampling one of these
    path: str = ""
    files: dict = field(default_factory=dict)  # tokenizer_config / generation_config JSON, when present

    def forward(self, ids, trace=None, attn_probs=None):
        """Full forward, every position, nothing cached between calls: (T, V) float32 logits.
        trace: a dict to fill with the named intermediates (see `trace_rows`); attn_probs=(layer, j)
        adds layers.{layer}.attn_probs (2, T, T), both softmax maps of differential head j."""
        ids = check_ids(self, ids)
        if attn_probs is not None:
            check_attn_probs(self.config, attn_probs)
        logits = extend(self, new_cache(self.config, len(ids)), ids, all_positions=True, trace=trace,
                        attn_probs=attn_probs)
        return to_numpy(logits)

    def new_cache(self, capacity=None):
        return new_cache(self.config, capacity or 256)

    def prefill(self, ids, cache=None):
        """Run the prompt (or a later chunk / chat turn) into `cache`: -> (last-token logits (V,), cache)."""
        cache = cache if cache is not None else self.new_cache(len(ids) + 1024)  # room to decode without regrowing
        return to_numpy(extend(self, cache, check_ids(self, ids)))[-1], cache

    def step(self, cache, token):
        """One decode step: -> logits (V,) for the position after `token`."""
        return to_numpy(extend(self, cache, check_ids(self, [token])))[-1]

    def generate(self, ids, max_new_tokens=256, temperature=0.6, top_p=0.95, top_k=0, seed=None,
                 stop_ids=None, cache=None):
        return generate(self, ids, max_new_tokens, temperature, top_p, top_k, seed, stop_ids, cache)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def load(path, device="cpu"):
    """Load a converted folder (see convert.py). Weights stay memory-mapped: loading reads headers only."""
    if device != "cpu":
        raise Phi4FlashError(f"device {device!r}: only 'cpu' exists so far (the CuPy/CUDA backend is not built yet)")
    path = os.fspath(path)
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    folder = os.path.dirname(file)
    if not os.path.isfile(file):
        raise Phi4FlashError(f"{path}: no converted model here (expected {file}); convert a Hugging Face folder with convert.py")
    tensors, meta = read_safetensors(file)
    if meta.get("format") != FORMAT:
        raise Phi4FlashError(f"{file}: not a phi4flash converted file (a Hugging Face checkpoint? run convert.py on its folder)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise Phi4FlashError(f"{file}: converted with format version {meta.get('format_version')}, this code reads "
                             f"version {FORMAT_VERSION}; convert the original checkpoint again")
    try:
        c = json.loads(meta["config"])
        cfg = Config(**{**c, "sliding_window": tuple(c["sliding_window"])})
    except (KeyError, TypeError, ValueError) as e:
        raise Phi4FlashError(f"{file}: the model config in the metadata is missing or unreadable ({e!r}); "
                             "convert the original checkpoint again") from None
    expected = tensor_shapes(cfg)
    for name, shape in expected.items():
        if name not in tensors:
            raise Phi4FlashError(f"{file}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise Phi4FlashError(f"{file}: tensor {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    if set(tensors) - set(expected):
        raise Phi4FlashError(f"{file}: unexpected tensor {sorted(set(tensors) - set(expected))[0]}")

    def group(prefix):  # {"layers.3.attn.Wq": a} -> {"Wq": a} for prefix "layers.3.attn."
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    layers = []
    for i, kind in enumerate(cfg.layer_kinds):
        p = f"layers.{i}."
        mixer = "mamba" if kind == "mamba" else "gmu" if kind == "gmu" else "attn"
        layers.append({"input_layernorm": group(p + "input_layernorm."),
                       "post_attention_layernorm": group(p + "post_attention_layernorm."),
                       "mlp": group(p + "mlp."), mixer: group(p + mixer + ".")})
    model = Model(cfg, tensors["embed_tokens.weight"], group("final_layernorm."), layers, path=folder)
    for name in ("tokenizer_config.json", "generation_config.json"):
        if os.path.isfile(os.path.join(folder, name)):
            with open(os.path.join(folder, name)) as f:
                model.files[name] = json.load(f)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        attach_tokenizer(model, os.path.join(folder, "tokenizer.json"))
    else:
        model.token_mask = np.ones(cfg.vocab_size, bool)
        model.stop_ids = tuple(_as_list(model.files.get("generation_config.json", {}).get("eos_token_id")))
    return model


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def attach_tokenizer(model, tokenizer_json):
    """Tokenizer, the mask of ids that have a token, and the stop ids (eos of the generation config,
    plus <|end|> and <|endoftext|> looked up by string: the config's bos/eos numbers are not trusted)."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_json)
    model.tokenizer = tok
    mask = np.zeros(model.config.vocab_size, bool)
    ids = np.fromiter(tok.get_vocab(with_added_tokens=True).values(), dtype=np.int64)
    mask[ids[ids < model.config.vocab_size]] = True
    model.token_mask = mask
    stops = _as_list(model.files.get("generation_config.json", {}).get("eos_token_id"))
    stops += [tok.token_to_id(s) for s in ("<|end|>", "<|endoftext|>") if tok.token_to_id(s) is not None]
    model.stop_ids = tuple(dict.fromkeys(int(s) for s in stops))


def check_ids(model, ids):
    """Token ids from the user -> int64 array, or a one-line error."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise Phi4FlashError(f"ids: expected a non-empty 1-D sequence of token ids, got {arr.dtype} array of shape {arr.shape}")
    bad = arr[(arr < 0) | (arr >= model.config.vocab_size)]
    if bad.size:
        raise Phi4FlashError(f"ids: token id {int(bad[0])} is outside the vocabulary [0, {model.config.vocab_size})")
    return arr.astype(np.int64)


def to_numpy(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


# ----------------------------------------------------------------------------------------------
# Math helpers (all fp32)

def linear(x, W, b=None):
    """y = x·Wᵀ + b for W stored [out, in] (float32, or bf16 bits as uint16)."""
    y = bf16_matmul(x, W) if W.dtype == np.uint16 else x @ W.T           # (T, out)
    return y if b is None else y + b


# NumPy has no bf16 arithmetic, so bf16 weights are widened to fp32 a block of rows at a time into a
# scratch buffer: the bits go into the high half of zeroed uint32s (exact), the buffer stays in cache,
# and only a few MB are ever fp32. For a few rows (decode) the widening pass costs more than the
# matmul, so threads (one per core) split the blocks, each with its own buffer (NumPy releases the
# GIL in both the copy and the BLAS call). For many rows (prefill) BLAS dominates: bigger blocks, one
# thread calling multithreaded BLAS.
_scratch = threading.local()
_pool = None
_threads = min(8, os.cpu_count() or 1)


def _widen(W, r, n):
    """Rows r..r+n of bf16 bits W as a float32 view of this thread's scratch buffer."""
    size = n * W.shape[1]
    if getattr(_scratch, "buf", None) is None or _scratch.buf.size < size:
        _scratch.buf = np.zeros(size, np.uint32)  # low halves are written once, as zeros, and stay zero
    buf = _scratch.buf[:size].reshape(n, W.shape[1])
    buf.view(np.uint16)[:, 1::2] = W[r:r + n]  # little-endian: index 1 of each pair is the high half
    return buf.view(np.float32)


def bf16_matmul(x, W):
    xp = get_xp(x)
    if xp is not np:
        return x @ bf16_to_f32(W).T
    global _pool
    T, (rows, cols) = x.shape[0], W.shape
    y = np.empty((T, rows), np.float32)                                  # (T, out)
    if T >= 16:
        step = max(1, (4 << 20) // cols)                                  # 16 MB of fp32 per block
        for r in range(0, rows, step):
            n = min(step, rows - r)
            np.matmul(x, _widen(W, r, n).T, out=y[:, r:r + n])
        return y
    step = max(1, (256 << 10) // cols)                                    # 1 MB of fp32: fits in L2
    starts = range(0, rows, step)

    def work(part):
        for r in starts[part::_threads]:
            n = min(step, rows - r)
            np.matmul(x, _widen(W, r, n).T, out=y[:, r:r + n])

    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor
        _pool = ThreadPoolExecutor(_threads, thread_name_prefix="bf16")
    list(_pool.map(work, range(_threads)))
    return y


def layer_norm(x, p, eps):
    """LayerNorm with bias over the last axis: (x - mean) / sqrt(biased var + eps) ⊙ w + b."""
    xp = get_xp(x)
    mean = x.mean(-1, keepdims=True)                                      # (T, 1)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)                       # (T, 1)
    return (x - mean) / xp.sqrt(var + eps) * f32(p["weight"]) + f32(p["bias"])


def rms_norm(x, weight, eps):
    """RMSNorm over the last axis, no mean subtraction: x / sqrt(mean(x²) + eps) ⊙ w."""
    xp = get_xp(x)
    return x / xp.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def sigmoid(x):
    xp = get_xp(x)
    return 0.5 * (1.0 + xp.tanh(0.5 * x))  # = 1 / (1 + e^-x), without overflow for large |x|


def silu(x):
    return x * sigmoid(x)


def softplus(x):
    """log(1 + e^x), and x itself past 20 (as the reference): no overflow."""
    xp = get_xp(x)
    return xp.where(x > 20.0, x, xp.log1p(xp.exp(xp.minimum(x, 20.0))))


def softmax(x):
    xp = get_xp(x)
    e = xp.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# SwiGLU MLP (every layer): out = (silu(g) ⊙ u)·fc2ᵀ, with [g | u] = x·fc1ᵀ — SiLU on the FIRST half

def mlp(x, p):
    g = linear(x, p["fc1_gate"])                                          # (T, F)
    u = linear(x, p["fc1_up"])                                            # (T, F)
    return linear(silu(g) * u, p["fc2"])                                  # (T, D)


# ----------------------------------------------------------------------------------------------
# Mamba-1 (even layers of the self-decoder, and layer L/2)   [2312.00752 §3, Algorithm 2]

def causal_conv1d(x, conv_state, weight, bias):
    """Depthwise causal conv over time: x̃_t = b + Σ_k w[:, k] ⊙ x_{t-(d_conv-1)+k}, so w[:, -1]
    multiplies the current token. conv_state holds the d_conv-1 raw inputs before x (zeros at start).
    x (T, d_inner), conv_state (d_conv-1, d_inner), weight (d_inner, d_conv) -> (x̃, new conv_state)."""
    xp = get_xp(x)
    T, K = x.shape[0], weight.shape[1]
    xs = xp.concatenate([conv_state, x])                                  # (d_conv-1+T, d_inner)
    out = xp.broadcast_to(f32(bias), x.shape).copy()                      # (T, d_inner)
    for k in range(K):
        out += f32(weight[:, k]) * xs[k:k + T]
    return out, xs[T:].copy()                                             # new state: the last d_conv-1 inputs


def selective_scan_sequential(x, delta, A, B, C, D, h):
    """The scan exactly as written, one token at a time (the twin the fast form is tested against):
      h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t        y_t = h_t·C_t + D ⊙ x_t
    x, delta (T, d_inner); A (d_inner, N); B, C (T, N); D (d_inner,); h (d_inner, N) -> (y, h)."""
    xp = get_xp(x)
    y = xp.empty_like(x)                                                  # (T, d_inner)
    for t in range(x.shape[0]):
        dA = xp.exp(delta[t][:, None] * A)                                # (d_inner, N)
        h = dA * h + (delta[t] * x[t])[:, None] * B[t][None, :]           # (d_inner, N)
        y[t] = h @ C[t] + D * x[t]                                        # (d_inner,)
    return y, h


def selective_scan(x, delta, A, B, C, D, h, chunk=64):
    """Same recurrence, same arguments as selective_scan_sequential, vectorised: per chunk of time
    steps exp(ΔA) and ΔBx are formed for all steps at once, the time loop does only h = dA⊙h + ΔBx
    in place, and the readout y = h·C runs as one batched matmul over the chunk."""
    xp = get_xp(x)
    T = x.shape[0]
    y = xp.empty_like(x)                                                  # (T, d_inner)
    h = h.copy()                                                          # (d_inner, N)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        dA = xp.exp(delta[t0:t1, :, None] * A)                            # (Tc, d_inner, N)
        hs = (delta[t0:t1] * x[t0:t1])[:, :, None] * B[t0:t1, None, :]    # (Tc, d_inner, N) ΔBx, then states
        for t in range(t1 - t0):
            h *= dA[t]
            h += hs[t]
            hs[t] = h
        y[t0:t1] = (hs @ C[t0:t1, :, None])[:, :, 0] + D * x[t0:t1]       # (Tc, d_inner)
    return y, h


def mamba(u, p, conv_state, ssm_state):
    """Mamba-1 mixer. u (T, D) -> (out (T, D), y (T, d_inner), conv_state, ssm_state).
    y is the scan output with the D skip and before the z gate: layer L/2's y is the GMU memory."""
    x = linear(u, p["in_proj_x"])                                         # (T, d_inner)
    z = linear(u, p["in_proj_z"])                                         # (T, d_inner)
    x, conv_state = causal_conv1d(x, conv_state, p["conv1d_weight"], p["conv1d_bias"])
    x = silu(x)                                                           # (T, d_inner)  x̂
    dt_low = linear(x, p["x_proj_dt"])                                    # (T, dt_rank)
    B = linear(x, p["x_proj_B"])                                          # (T, N)
    C = linear(x, p["x_proj_C"])                                          # (T, N)
    delta = softplus(linear(dt_low, p["dt_proj"], f32(p["dt_proj_bias"])))  # (T, d_inner)  Δ
    A = -get_xp(u).exp(f32(p["A_log"]))                                   # (d_inner, N), all < 0
    y, ssm_state = selective_scan(x, delta, A, B, C, f32(p["D"]), ssm_state)  # (T, d_inner)
    out = linear(y * silu(z), p["out_proj"])                              # (T, D)
    return out, y, conv_state, ssm_state


# ----------------------------------------------------------------------------------------------
# Differential attention (odd self-decoder layers, layer L/2+1, cross-attention)   [2410.05258 §2.1]
#
# Heads are striped by parity: stripe 1 = heads 0, 2, 4, ...; stripe 2 = heads 1, 3, 5, ... (for
# q, k and v alike). Inside a stripe, GQA maps stripe query j to stripe KV head g = j // G. Each
# stripe-1 query and its stripe-2 twin share the value pair [v1_g ‖ v2_g] (2·hd wide), and
#   O_j = RMSNorm(softmax(q1_j k1_gᵀ/√hd) V_g − λ softmax(q2_j k2_gᵀ/√hd) V_g) ⊙ subln · (1 − λ_init)
# whose first hd features are output head 2j and last hd features head 2j+1.

def diff_lambda(p, lam_init):
    """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init: one scalar per layer."""
    xp = get_xp(p["lambda_q1"])
    return (xp.exp((f32(p["lambda_q1"]) * f32(p["lambda_k1"])).sum())
            - xp.exp((f32(p["lambda_q2"]) * f32(p["lambda_k2"])).sum()) + lam_init)


def differential_attention(q, k, v, mask, lam, lam_init, subln, eps=1e-5, probs=None):
    """q (H, Tq, hd); k, v (H_kv, S, hd); mask (Tq, S) True where a key is visible -> (Tq, H·hd).
    Tracing: probs={"head": j} receives probs["maps"], the two softmax maps of differential head j."""
    xp = get_xp(q)
    H, Tq, hd = q.shape
    H_kv, S, _ = k.shape
    G = H // H_kv
    qs = q.reshape(H // 2, 2, Tq, hd).transpose(1, 0, 2, 3)               # (2, H/2, Tq, hd)   [stripe, j]
    qs = qs.reshape(2, H_kv // 2, G, Tq, hd)                              # (2, H_kv/2, G, Tq, hd)  j = g·G + r
    ks = k.reshape(H_kv // 2, 2, S, hd).transpose(1, 0, 2, 3)[:, :, None]  # (2, H_kv/2, 1, S, hd)  [stripe, g]
    vv = v.reshape(H_kv // 2, 2, S, hd).transpose(0, 2, 1, 3).reshape(H_kv // 2, 1, S, 2 * hd)  # [v1_g ‖ v2_g]
    scores = qs @ ks.swapaxes(-1, -2) * (1.0 / math.sqrt(hd))             # (2, H_kv/2, G, Tq, S)
    scores = xp.where(mask, scores, -xp.inf)
    maps = softmax(scores)                                                # (2, H_kv/2, G, Tq, S)
    if probs is not None:  # differential head j: stripe-1 query 2j and its stripe-2 twin 2j+1
        probs["maps"] = maps[:, probs["head"] // G, probs["head"] % G]    # (2, Tq, S)
    att = maps @ vv                                                       # (2, H_kv/2, G, Tq, 2hd)
    o = rms_norm(att[0] - lam * att[1], f32(subln), eps) * (1.0 - lam_init)  # (H_kv/2, G, Tq, 2hd)
    return o.transpose(2, 0, 1, 3).reshape(Tq, H * hd)                    # pair j -> heads 2j, 2j+1


def attend(q, k, v, qpos, kpos, window, lam, lam_init, subln, block=256, probs=None):
    """Differential attention of queries at positions qpos over keys at positions kpos:
    key s is visible to query t iff s <= t and, with a window, s > t - W (W keys, the current one
    included). Queries go in blocks; with more than one block the keys are in time order and each
    block slices only the keys it can see, so a sliding window costs O(T·W), not O(T²).
    q (H, T, hd); k, v (H_kv, S, hd); qpos (T,), kpos (S,) -> (T, H·hd).
    Tracing: probs={"head": j} receives probs["maps"] (2, T, S), zero where a key is not visible."""
    xp = get_xp(q)
    T = q.shape[1]
    block = min(block, window) if window else block                       # a block sees ≤ block + W - 1 keys
    out = xp.empty((T, q.shape[0] * q.shape[2]), xp.float32)              # (T, H·hd)
    maps = None if probs is None else xp.zeros((2, T, k.shape[1]), xp.float32)  # (2, T, S)
    for a in range(0, T, block):
        b = min(T, a + block)
        lo, hi = 0, k.shape[1]
        if T > block:
            lo = int(xp.searchsorted(kpos, qpos[a] - window + 1)) if window else 0
            hi = int(xp.searchsorted(kpos, qpos[b - 1], side="right"))
        kp, qp = kpos[lo:hi][None, :], qpos[a:b][:, None]
        mask = (kp <= qp) & (kp >= 0)                                     # (Tb, Sb); -1 marks an empty slot
        if window:
            mask &= kp > qp - window
        part = None if probs is None else {"head": probs["head"]}
        out[a:b] = differential_attention(q[:, a:b], k[:, lo:hi], v[:, lo:hi], mask, lam, lam_init, subln, probs=part)
        if part is not None:
            maps[:, a:b, lo:hi] = part["maps"]
    if probs is not None:
        probs["maps"] = maps
    return out


def project_heads(x, W, b, n_heads):
    """x (T, D) -> (n_heads, T, hd): a head-major projection, heads first."""
    y = linear(x, W, f32(b))                                              # (T, n_heads·hd)
    return y.reshape(x.shape[0], n_heads, -1).transpose(1, 0, 2)


def self_attention(u, p, kv, pos, i, cfg, q_rows=slice(None), probs=None):
    """Self-attention layer i (sliding-window, or the full layer L/2+1). Writes this call's K/V into
    `kv`; queries only for u[q_rows] (layer L/2+1 in prefill needs just the last token's output).
    u (T, D), pos (T,) absolute positions -> (T_q, D)."""
    k_new = project_heads(u, p["Wk"], p["bk"], cfg.num_key_value_heads)  # (H_kv, T, hd)
    v_new = project_heads(u, p["Wv"], p["bv"], cfg.num_key_value_heads)  # (H_kv, T, hd)
    k, v, kpos = kv_extend(kv, k_new, v_new, int(pos[0]))                 # keys these queries may see
    q = project_heads(u[q_rows], p["Wq"], p["bq"], cfg.num_attention_heads)  # (H, T_q, hd)
    lam_init = lambda_init(i)
    o = attend(q, k, v, pos[q_rows], kpos, kv.window, diff_lambda(p, lam_init), lam_init, p["subln"], probs=probs)
    return linear(o, p["out_proj"], f32(p["out_proj_bias"]))              # (T_q, D)


def cross_attention(u, p, shared, pos, i, cfg, probs=None):
    """Cross-attention layer i: its own queries over layer L/2+1's K/V (YOCO), no cache of its own."""
    q = project_heads(u, p["Wq"], p["bq"], cfg.num_attention_heads)      # (H, T, hd)
    n = shared.length
    kpos = get_xp(u).arange(n)                                            # (S,)
    lam_init = lambda_init(i)
    o = attend(q, shared.k[:, :n], shared.v[:, :n], pos, kpos, None, diff_lambda(p, lam_init), lam_init, p["subln"],
               probs=probs)
    return linear(o, p["out_proj"], f32(p["out_proj_bias"]))              # (T, D)


# ----------------------------------------------------------------------------------------------
# Gated Memory Unit (even cross-decoder layers)   [2507.06607 §2.1]

def gmu(x, p, memory):
    """out = (silu(x·in_projᵀ) ⊙ m)·out_projᵀ: this layer's input gates the shared memory m.
    x (T, D), memory (T, d_inner) -> (T, D)."""
    return linear(silu(linear(x, p["in_proj"])) * memory, p["out_proj"])


# ----------------------------------------------------------------------------------------------
# Cache: everything decoding needs (batch 1). Layers past L/2+1 keep nothing.

@dataclass
class KVCache:
    k: object          # (H_kv, slots, hd)
    v: object          # (H_kv, slots, hd)
    pos: object        # (slots,) the position held in each slot, -1 = empty
    window: int | None  # ring of exactly W slots; None = append buffer (layer L/2+1, grows when full)
    length: int = 0    # positions written so far


@dataclass
class Cache:
    length: int = 0                                   # tokens the model has seen
    conv_state: dict = field(default_factory=dict)    # Mamba layer i -> (d_conv-1, d_inner): last raw inputs, oldest first
    ssm_state: dict = field(default_factory=dict)     # Mamba layer i -> (d_inner, N), fp32
    kv: dict = field(default_factory=dict)            # attention layer i -> KVCache

    def shared(self, cfg):  # the K/V every cross-attention layer reads
        return self.kv[cfg.kv_layer]


def new_cache(cfg, capacity, xp=np):
    """Empty cache; layer L/2+1's buffer starts with `capacity` slots (it doubles if exceeded)."""
    cache = Cache()
    hd, H_kv = cfg.head_dim, cfg.num_key_value_heads
    for i, kind in enumerate(cfg.layer_kinds):
        if kind == "mamba":
            cache.conv_state[i] = xp.zeros((cfg.mamba_d_conv - 1, cfg.d_inner), xp.float32)
            cache.ssm_state[i] = xp.zeros((cfg.d_inner, cfg.mamba_d_state), xp.float32)
        elif kind == "attn":
            window = None if i == cfg.kv_layer else cfg.sliding_window[i]
            slots = window or max(int(capacity), 1)
            cache.kv[i] = KVCache(xp.zeros((H_kv, slots, hd), xp.float32), xp.zeros((H_kv, slots, hd), xp.float32),
                                  xp.full(slots, -1, xp.int64), window)
    return cache


def kv_extend(kv, k_new, v_new, start):
    """Store T new K/V (positions start..start+T-1) and return the keys the new queries can see:
    (k, v, kpos) with k, v (H_kv, S, hd). Sliding layers keep a ring of W slots (slot = position % W)."""
    xp = get_xp(k_new)
    T = k_new.shape[1]
    if kv.window is None:                       # append buffer: every query sees everything before it
        if start + T > kv.k.shape[1]:             # full: at least double, so appends stay amortised O(1)
            grow = max(start + T, 2 * kv.k.shape[1]) - kv.k.shape[1]
            zeros = xp.zeros((kv.k.shape[0], grow, kv.k.shape[2]), xp.float32)
            kv.k, kv.v = xp.concatenate([kv.k, zeros], axis=1), xp.concatenate([kv.v, zeros], axis=1)
            kv.pos = xp.concatenate([kv.pos, xp.full(grow, -1, xp.int64)])
        kv.k[:, start:start + T], kv.v[:, start:start + T] = k_new, v_new
        kv.pos[start:start + T] = xp.arange(start, start + T)
        kv.length = start + T
        return kv.k[:, :kv.length], kv.v[:, :kv.length], kv.pos[:kv.length]
    W = kv.window
    if T == 1:                                  # decode: the new entry evicts position start-W; the ring is the window
        kv.k[:, start % W], kv.v[:, start % W], kv.pos[start % W] = k_new[:, 0], v_new[:, 0], start
        kv.length = start + 1
        return kv.k, kv.v, kv.pos
    past = [s % W for s in range(max(0, start - W + 1), start)]           # ring slots still in view, oldest first
    k = xp.concatenate([kv.k[:, past], k_new], axis=1)                    # (H_kv, ≤W-1+T, hd)
    v = xp.concatenate([kv.v[:, past], v_new], axis=1)                    # (H_kv, ≤W-1+T, hd)
    kpos = xp.concatenate([kv.pos[past], xp.arange(start, start + T)])    # (≤W-1+T,) in time order
    keep = range(max(0, T - W), T)                                        # the newest ≤ W entries stay
    slots = [(start + t) % W for t in keep]
    kv.k[:, slots], kv.v[:, slots] = k_new[:, keep.start:], v_new[:, keep.start:]
    kv.pos[slots] = xp.arange(start + keep.start, start + T)
    kv.length = start + T
    return k, v, kpos


# ----------------------------------------------------------------------------------------------
# The layer loop: prefill, chunked prefill, next chat turn and decode are all `extend`

def record(trace, name, x):
    if trace is not None:
        trace[name] = to_numpy(x).copy()


def extend(model, cache, ids, all_positions=False, trace=None, attn_probs=None):
    """Feed T new tokens on top of `cache` (updated in place) -> logits (T, V) if all_positions,
    else (1, V) for the last token only. With a `trace` dict, the named intermediates are recorded
    into it; attn_probs=(layer, j) also records that attention layer's differential head j maps.

    Prefill is linear (2507.06607 §2): layers 0..L/2 run on every token; layer L/2+1 writes K/V for
    every token but computes its query and output only for the rows we return; the cross-decoder
    (GMU + cross-attention, stateless) then runs on those rows only."""
    cfg = model.config
    xp = get_xp(cache.ssm_state[0])
    T = len(ids)
    pos = xp.arange(cache.length, cache.length + T)                       # (T,) absolute positions
    h = f32(model.embed_tokens[ids])                                      # (T, D); no scaling, no positional encoding
    record(trace, "embed", h)
    memory = None
    for i, (kind, layer) in enumerate(zip(cfg.layer_kinds, model.layers)):
        u = layer_norm(h, layer["input_layernorm"], cfg.layer_norm_eps)   # (T, D)
        probs = {"head": attn_probs[1]} if trace is not None and attn_probs and attn_probs[0] == i else None
        if kind == "mamba":
            out, y, cache.conv_state[i], cache.ssm_state[i] = mamba(u, layer["mamba"], cache.conv_state[i], cache.ssm_state[i])
            if i == cfg.memory_layer:
                memory = y                                                # (T, d_inner)  m
                record(trace, "memory", memory)
        elif kind == "attn" and i == cfg.kv_layer:
            rows = slice(None) if all_positions else slice(T - 1, T)
            out = self_attention(u, layer["attn"], cache.kv[i], pos, i, cfg, q_rows=rows, probs=probs)
            h, u, memory, pos = h[rows], u[rows], memory[rows], pos[rows]  # from here on: the returned rows only
            kv = cache.kv[i]
            record(trace, "shared_k", kv.k[:, :kv.length])
            record(trace, "shared_v", kv.v[:, :kv.length])
        elif kind == "attn":
            out = self_attention(u, layer["attn"], cache.kv[i], pos, i, cfg, probs=probs)
        elif kind == "gmu":
            out = gmu(u, layer["gmu"], memory)
        else:
            out = cross_attention(u, layer["attn"], cache.shared(cfg), pos, i, cfg, probs=probs)
        h = h + out                                                       # (T, D)
        m = mlp(layer_norm(h, layer["post_attention_layernorm"], cfg.layer_norm_eps), layer["mlp"])  # (T, D)
        h = h + m
        if trace is not None:
            for name, x in (("mixer_in", u), ("mixer_out", out), ("mlp_out", m), ("residual", h)):
                record(trace, f"layers.{i}.{name}", x)
            if probs is not None:
                record(trace, f"layers.{i}.attn_probs", probs["maps"])
    cache.length += T
    h = layer_norm(h, model.final_layernorm, cfg.layer_norm_eps)          # (T or 1, D)
    record(trace, "final_norm", h)
    logits = linear(h, model.embed_tokens)                                # (T or 1, V), tied head
    record(trace, "logits", logits)
    return logits


# ----------------------------------------------------------------------------------------------
# Sampling and generation

def sample(logits, token_mask, temperature, top_k, top_p, rng):
    """Mask ids without a token -> greedy if temperature == 0, else /temperature -> top-k -> top-p -> draw."""
    logits = np.where(token_mask, np.asarray(logits, np.float64), -np.inf)  # (V,)
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k and top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits >= kth, logits, -np.inf)
    probs = softmax(logits)                                               # (V,)
    if top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]              # smallest set with mass >= top_p
        probs = np.zeros_like(probs)
        probs[keep] = softmax(logits[keep])
    return int(rng.choice(probs.size, p=probs / probs.sum()))


def generate(model, ids, max_new_tokens=256, temperature=0.6, top_p=0.95, top_k=0, seed=None,
             stop_ids=None, cache=None):
    """Yield up to max_new_tokens sampled ids (python ints), stopping after a stop id.

    The prompt `ids` is fed on top of `cache` (a new one if None), then one token per step. Every
    yielded token except the last is in the cache when the loop ends; to continue a conversation,
    pass the same cache and start the next `ids` with that last token."""
    stop_ids = set(model.stop_ids if stop_ids is None else stop_ids)
    rng = np.random.default_rng(seed)
    ids = check_ids(model, ids)
    if cache is None:
        cache = model.new_cache(len(ids) + max_new_tokens)
    logits = to_numpy(extend(model, cache, ids))[-1]                       # (V,)
    for n in range(max_new_tokens):
        token = sample(logits, model.token_mask, temperature, top_k, top_p, rng)
        yield token
        if token in stop_ids or n == max_new_tokens - 1:
            return
        logits = to_numpy(extend(model, cache, np.array([token])))[-1]


# ----------------------------------------------------------------------------------------------
# Console scripts. chat.py and convert.py stay in the repository next to this file (so no generic
# `chat`/`convert` module is installed); `pip install -e .` makes phi4flash-chat/-convert run them.

def _sibling(name):
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isfile(os.path.join(here, name + ".py")):
        raise SystemExit(f"error: {name}.py is not next to {__file__}; install from a clone with: pip install -e .")
    sys.path.insert(0, here)
    import importlib
    return importlib.import_module(name)


def chat_main():
    sys.exit(_sibling("chat").main())


def convert_main():
    sys.exit(_sibling("convert").main())


# ----------------------------------------------------------------------------------------------
# Command line: trace one forward, save it, and compare it with a reference dump
#
#   python phi4flash.py trace MODEL --ids 5,68,417 [--save dump.npz] [--compare ref.npz --atol 1e-4]
#
# A dump is a plain .npz holding what forward(ids, trace=...) records, under these names (shapes
# for T tokens; notes/08-trace-and-compare.md shows how to write one from the PyTorch model):
#   input_ids (T,) int64            embed (T, D)                   final_norm (T, D)   logits (T, V)
#   layers.{i}.mixer_in (T, D)      the LayerNorm'd input of layer i's mixer
#   layers.{i}.mixer_out (T, D)     what the mixer (Mamba, attention, GMU) adds to the residual
#   layers.{i}.mlp_out (T, D)       what the MLP adds to the residual
#   layers.{i}.residual (T, D)      the residual stream after layer i
#   memory (T, d_inner)             layer L/2's scan output, read by every GMU
#   shared_k, shared_v (H_kv, T, hd)  layer L/2+1's K/V, read by every cross-attention layer
#   layers.{i}.attn_probs (2, T, T)   with --attn-probs i,j: the two softmax maps of differential head j

def trace_rows(cfg):
    """The trace table's rows in forward order: (label, kind, names made in that row, in order).
    memory and shared_k/v are made inside their layer's mixer, so they sit before its mixer_out."""
    def kind_label(i, kind):
        if i == cfg.memory_layer:
            return "mamba → memory"
        if i == cfg.kv_layer:
            return "full attn → KV"
        return f"SWA W={cfg.sliding_window[i]}" if kind == "attn" else {"cross": "cross attn"}.get(kind, kind)
    rows = [("embed", "embedding", ["embed"])]
    for i, kind in enumerate(cfg.layer_kinds):
        made = {cfg.memory_layer: ["memory"], cfg.kv_layer: ["shared_k", "shared_v"]}.get(i, [])
        p = f"layers.{i}."
        rows.append((str(i), kind_label(i, kind),
                     [p + "mixer_in", p + "attn_probs", *made, p + "mixer_out", p + "mlp_out", p + "residual"]))
    return rows + [("norm", "final LayerNorm", ["final_norm"]), ("head", "tied LM head", ["logits"])]


def check_attn_probs(cfg, attn_probs):
    """(layer, j) must name an attention layer and one of its H/2 differential heads."""
    layer, j = attn_probs
    kinds = cfg.layer_kinds
    if not 0 <= layer < len(kinds) or kinds[layer] not in ("attn", "cross"):
        attn = [i for i, k in enumerate(kinds) if k in ("attn", "cross")]
        raise Phi4FlashError(f"attn_probs: layer {layer} is not an attention layer (those are {attn})")
    if not 0 <= j < cfg.num_attention_heads // 2:
        raise Phi4FlashError(f"attn_probs: head {j} is out of range; a layer has {cfg.num_attention_heads // 2} "
                             "differential heads, numbered from 0")


def reference_to_dump(ref, prompt):
    """The bundled fixture's reference.npz (tests/fixtures/tiny-phi4flash/README.md) for one prompt
    ('p0', 'p1' or 'p2') under dump names. It has no mixer_in/mixer_out/mlp_out: a compare skips them."""
    if f"{prompt}_hidden_states" not in ref:
        prompts = sorted(k[:-len("_hidden_states")] for k in ref if k.endswith("_hidden_states"))
        raise Phi4FlashError(f"reference: no prompt {prompt!r} (it has {prompts})")
    hidden = ref[f"{prompt}_hidden_states"]                               # (L+1, T, D): [0] embed, [i+1] after layer i
    dump = {"input_ids": ref[f"{prompt}_input_ids"], "embed": hidden[0]}
    dump.update({f"layers.{i}.residual": hidden[i + 1] for i in range(len(hidden) - 1)})
    for ours, theirs in (("memory", "gmu_memory"), ("shared_k", "shared_k"), ("shared_v", "shared_v"),
                         ("final_norm", "final_norm"), ("logits", "logits")):
        dump[ours] = ref[f"{prompt}_{theirs}"]
    return dump


@dataclass
class Comparison:
    atol: float
    diffs: dict       # name -> max|ours - reference|, for the names both have, in forward order
    skipped: list     # trace names the reference does not have (not a failure)
    unknown: list     # reference names that are not trace names (misspelt? they are ignored)
    first: str | None  # the first name, in forward order, whose max|diff| exceeds atol (NaN counts)


def compare_trace(cfg, trace, ref, atol, where="reference"):
    """Compare a trace with a reference dump, name by name in forward order. A leading batch axis of
    size 1 in the reference is dropped; any other shape difference is a Phi4FlashError."""
    if "input_ids" in trace and "input_ids" in ref and not np.array_equal(np.ravel(ref["input_ids"]), trace["input_ids"]):
        raise Phi4FlashError(f"{where}: made from other token ids ({len(np.ravel(ref['input_ids']))} tokens, "
                             f"first {np.ravel(ref['input_ids'])[:5].tolist()}); trace the same ids")
    order = [name for _, _, names in trace_rows(cfg) for name in names if name in trace]
    diffs, skipped = {}, []
    for name in order:
        if name not in ref:
            skipped.append(name)
            continue
        theirs, ours = np.asarray(ref[name]), trace[name]
        if theirs.shape != ours.shape and theirs.shape == (1, *ours.shape):
            theirs = theirs[0]
        if theirs.shape != ours.shape:
            raise Phi4FlashError(f"{where}: {name} has shape {theirs.shape}, the trace has {ours.shape}")
        diffs[name] = float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max()) if ours.size else 0.0
    unknown = [name for name in ref if name not in trace and name != "input_ids"]
    first = next((name for name, d in diffs.items() if not d <= atol), None)
    return Comparison(atol, diffs, skipped, unknown, first)


def trace_table(cfg, trace, comparison=None):
    """A rich Table: one row per layer with its kind and the mean/std/max|x| of the tensor the row ends
    with (the residual after the layer). With a comparison: the row's first tensor over atol (else its
    largest difference), that tensor's max|diff|, and a marker on the row holding the FIRST tensor over atol."""
    from rich.table import Table
    table = Table(title=f"trace of {len(trace['embed'])} tokens", title_justify="left")
    for col in ("layer", "kind", "mean", "std", "max|x|"):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right", no_wrap=True)
    if comparison:
        table.add_column("max|diff|", justify="right")
        table.add_column("tensor")
        table.add_column(f"atol {comparison.atol:g}")
    for label, kind, names in trace_rows(cfg):
        x = trace[names[-1]].astype(np.float64)                           # (T, D) or (T, V): the row's last tensor
        cells = [label, kind, f"{x.mean():.4f}", f"{x.std():.4f}", f"{np.abs(x).max():.4f}"]
        style = None
        if comparison:
            d = {n: comparison.diffs[n] for n in names if n in comparison.diffs}
            over = [n for n in d if not d[n] <= comparison.atol]
            if not d:
                cells += ["", "", "not in reference"]
            else:
                worst = over[0] if over else max(reversed(list(d)), key=d.get)  # ties: the row's last
                mark = "◀ FIRST" if comparison.first in names else "over" if over else "ok"
                cells += [f"{d[worst]:.1e}", worst.split(".")[-1], mark]
                style = "bold red" if comparison.first in names else "red" if over else None
        table.add_row(*cells, style=style)
    return table


def _parse_ids(text):
    try:
        ids = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise Phi4FlashError(f"--ids {text!r}: expected comma-separated token ids, like 5,68,417") from None
    if not ids:
        raise Phi4FlashError("--ids: no token ids given")
    return ids


def _parse_attn_probs(text):
    try:
        layer, head = (int(s) for s in text.split(","))
    except ValueError:
        raise Phi4FlashError(f"--attn-probs {text!r}: expected LAYER,HEAD, like 1,0") from None
    return layer, head


def _load_npz(path):
    import zipfile
    try:
        f = np.load(path, allow_pickle=False)
        arrays = {name: f[name] for name in f.files} if hasattr(f, "files") else None
    except FileNotFoundError:
        raise Phi4FlashError(f"--compare {path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile):
        arrays = None
    if arrays is None:
        raise Phi4FlashError(f"--compare {path}: not a .npz of plain arrays (as numpy.savez writes)")
    return arrays


def trace_command(args):
    from rich.console import Console
    console = Console()
    ref = _load_npz(args.compare) if args.compare else None          # a bad file fails before the model runs
    model = load(_sibling("convert").resolve_model(args.model))
    if args.prompt is not None:
        if model.tokenizer is None:
            raise Phi4FlashError(f"MODEL {args.model}: no tokenizer.json, so --prompt cannot be encoded; pass --ids")
        ids = model.encode(args.prompt)
        if not ids:
            raise Phi4FlashError("--prompt: the text encodes to no tokens")
    else:
        ids = _parse_ids(args.ids)
    attn_probs = _parse_attn_probs(args.attn_probs) if args.attn_probs else None
    trace = {}
    model.forward(ids, trace=trace, attn_probs=attn_probs)
    trace["input_ids"] = check_ids(model, ids)
    comparison = compare_trace(model.config, trace, ref, args.atol, where=f"--compare {args.compare}") if ref else None
    if comparison and not comparison.diffs:
        raise Phi4FlashError(f"--compare {args.compare}: no array has a trace name (like layers.0.residual); "
                             "see the names in notes/08-trace-and-compare.md")
    if args.save:
        try:
            np.savez(args.save, **trace)
        except OSError as e:
            raise Phi4FlashError(f"--save {args.save}: cannot write it ({e.strerror or e})") from None
    shown = ",".join(map(str, ids[:12])) + (",..." if len(ids) > 12 else "")
    console.print(f"{model.path}: {model.config.num_hidden_layers} layers, {len(ids)} tokens: {shown}", highlight=False)
    console.print(trace_table(model.config, trace, comparison))
    if args.save:
        console.print(f"saved {len(trace)} arrays to {args.save}", highlight=False)
    if not comparison:
        return 0
    c = comparison
    if c.unknown:
        console.print(f"warning: {len(c.unknown)} arrays of {args.compare} are not in this trace and were ignored: "
                      + ", ".join(c.unknown[:4]) + (", ..." if len(c.unknown) > 4 else ""), highlight=False)
    console.print(f"{len(c.diffs)} tensors compared, {len(c.skipped)} not in the reference (skipped)", highlight=False)
    if c.first is None:
        worst = max(c.diffs, key=c.diffs.get)
        console.print(f"all within atol {c.atol:g}; largest max|diff| {c.diffs[worst]:.1e} ({worst})", highlight=False)
        return 0
    console.print(f"FIRST over atol {c.atol:g}: {c.first} (max|diff| {c.diffs[c.first]:.1e})", highlight=False)
    return 1


def main(argv=None):
    """python phi4flash.py trace ... (see --help); returns the exit code: 0 ok, 1 a tensor over atol, 2 an error."""
    import argparse
    ap = argparse.ArgumentParser(prog="phi4flash.py", description="Phi-4-mini-flash-reasoning (SambaY) in NumPy.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    tp = sub.add_parser("trace", help="run one forward and print per-layer statistics; save or compare the intermediates",
                        description="Run one full forward over the tokens and print a table with one row per layer. "
                                    "--save writes every traced tensor to a .npz; --compare checks them against a "
                                    "reference .npz of the same names and marks the first tensor over --atol "
                                    "(exit code 1). Names: see notes/08-trace-and-compare.md.")
    tp.add_argument("model", metavar="MODEL", help="a converted folder, or a Hugging Face snapshot folder (converted once into a cache folder)")
    what = tp.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="raw text, tokenized as is: no chat template, no special tokens added")
    what.add_argument("--ids", metavar="1,2,3", help="comma-separated token ids")
    tp.add_argument("--save", metavar="DUMP.npz", help="write the traced tensors (and input_ids) to this .npz")
    tp.add_argument("--compare", metavar="REF.npz", help="a reference dump with the same names (missing names are skipped)")
    tp.add_argument("--atol", type=float, default=None, help="largest allowed max|diff| per tensor (default 1e-4, fp32 vs fp32)")
    tp.add_argument("--attn-probs", metavar="LAYER,HEAD",
                    help="also trace the two softmax maps of differential head HEAD of attention layer LAYER")
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help(sys.stderr)
        return 2
    try:
        if args.atol is not None and not args.compare:
            raise Phi4FlashError("--atol: only meaningful with --compare")
        if args.atol is not None and not args.atol >= 0:
            raise Phi4FlashError(f"--atol {args.atol}: expected a number >= 0")
        args.atol = 1e-4 if args.atol is None else args.atol
        return trace_command(args)
    except Phi4FlashError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
