"""phi4flash: Microsoft's Phi-4-mini-flash-reasoning (SambaY) in one NumPy file.

Read top to bottom; the sections come in the paper's order, and `generate` (section 9) ends the model:
  1. config and layer schedule       6. differential attention (sliding window, full, cross)
  2. loading a converted file        7. Gated Memory Unit
  3. math helpers                    8. cache, and the layer loop `extend`
  4. SwiGLU MLP                      9. sampling, and the Model: forward / new_cache / prefill / step / generate
  5. Mamba-1
After the model:
 10. the API's arguments, checked; the checkpoint's side files (tokenizer, stop ids, generation config)
 11. fewer bytes per token on a CPU: how `linear` multiplies bf16 bits and int8 groups fast, and
     the bf16 K/V cache
Appendix A: the GPU (CuPy + kernels.cu): the same layer loop on kernels, entered from Model.run only.
Appendix B: the command line (`python phi4flash.py trace ...`), and the traced search for the first
non-finite layer that `generate` reports.
Every array op of sections 1-9 goes through `xp` (NumPy here, CuPy on a GPU).

Glossary (code name: meaning, size in the real 3.85B model)
  T          tokens in this call (T_q: query rows)    S      keys visible to a query
  D          hidden_size, 2560                        V      vocab rows, 200064 (ids past the tokenizer: no token)
  F          intermediate_size of the MLP, 10240      L      num_hidden_layers, 32
  d_inner    Mamba inner width expand*D, 5120         N      Mamba d_state, 16
  d_conv     Mamba conv width, 4                      dt_rank  rank of the Δ projection, 160
  H, H_kv    query / key-value heads, 40 / 20         hd     head_dim, 64;  G = H / H_kv = 2
  W          sliding window: 512 keys, the current token included
  hidden     the residual stream (T, D) that every layer adds to
  Δ (delta)  Mamba step size; A = -exp(A_log); h the SSM state (d_inner, N)      [Mamba, 2312.00752]
  lam, lambda_init  differential attention's λ and its per-layer offset λ_init  [Diff Transformer, 2410.05258]
  memory     m: the pre-gate scan output of layer L/2, read by every GMU        [SambaY, 2507.06607]
  YOCO       "you only cache once": layer L/2+1's K/V serve every cross-attention layer

Layer kinds (L = 32): "mamba" at even i < L/2 and at i = L/2 (which exports `memory`); "swa"
(sliding-window attention) at odd i < L/2 (the self-decoder, Samba); "full" at i = L/2+1, full
attention whose K/V are the one shared cache; then "gmu" at even and "cross" (cross-attention) at
odd i > L/2+1 (the cross-decoder).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import mmap
import os
import sys
import threading
import weakref
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

FORMAT = "phi4flash"
FORMAT_VERSION = "2"  # the newest converted layout: 1 bf16/float32 matrices, 2 int8 groups too (section 11)


class Phi4FlashError(ValueError):
    """A problem the user can fix (a bad path, file or argument): its message is one line."""


def get_xp(a):
    """The array namespace of `a` (of an Int8Weight's values): numpy for host arrays, cupy for device arrays."""
    if type(a.q if isinstance(a, Int8Weight) else a).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


# ----------------------------------------------------------------------------------------------
# 1. Config and layer schedule

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

    @cached_property
    def layer_kinds(self):
        return [layer_kind(self, i) for i in range(self.num_hidden_layers)]


def layer_kind(cfg, i):
    """SambaY schedule (2507.06607 §2): 'mamba', 'swa', 'full', 'gmu' or 'cross' (see the glossary)."""
    if i <= cfg.memory_layer:
        return "mamba" if i % 2 == 0 else "swa"
    if i == cfg.kv_layer:
        return "full"
    return "gmu" if i % 2 == 0 else "cross"


def lambda_init_for(i):
    """Differential attention's λ_init for absolute layer index i (Mamba layers counted)."""
    return 0.8 - 0.6 * math.exp(-0.3 * i)


def tensor_shapes(cfg):
    """Every tensor of a converted checkpoint: our name -> shape. Linear weights are [out, in].

    The converter splits fused projections so each tensor has one meaning:
    in_proj -> in_proj_x | in_proj_z, x_proj -> x_proj_dt | x_proj_B | x_proj_C,
    Wqkv -> Wq | Wk | Wv (+ biases), fc1 -> fc1_gate | fc1_up.
    """
    D, F, V, N = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.mamba_d_state
    d_inner, dt_rank, hd = cfg.d_inner, cfg.mamba_dt_rank, cfg.head_dim
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
            shapes.update({m + "in_proj_x": (d_inner, D), m + "in_proj_z": (d_inner, D),
                           m + "conv1d_weight": (d_inner, cfg.mamba_d_conv), m + "conv1d_bias": (d_inner,),
                           m + "x_proj_dt": (dt_rank, d_inner), m + "x_proj_B": (N, d_inner),
                           m + "x_proj_C": (N, d_inner), m + "dt_proj": (d_inner, dt_rank), m + "dt_proj_bias": (d_inner,),
                           m + "A_log": (d_inner, N), m + "D": (d_inner,), m + "out_proj": (D, d_inner)})
        elif kind == "gmu":
            shapes.update({p + "gmu.in_proj": (d_inner, D), p + "gmu.out_proj": (D, d_inner)})
        else:
            a = p + "attn."
            shapes.update({a + "Wq": (H * hd, D), a + "bq": (H * hd,)})
            if kind != "cross":  # cross-attention has no K/V projection: it reads layer L/2+1's
                shapes.update({a + "Wk": (H_kv * hd, D), a + "bk": (H_kv * hd,),
                               a + "Wv": (H_kv * hd, D), a + "bv": (H_kv * hd,)})
            shapes.update({a + "out_proj": (D, D), a + "out_proj_bias": (D,), a + "subln": (2 * hd,)})
            shapes.update({a + name: (hd,) for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")})
    return shapes


# Linear weights: what `linear` multiplies (and embed_tokens, the tied head). They stay as stored (bf16 bits,
# int8 groups or float32), memory-mapped; norms, biases, conv taps, A_log, D and λ are widened to fp32 at load.
LINEAR_WEIGHTS = {"fc1_gate", "fc1_up", "fc2", "in_proj_x", "in_proj_z", "x_proj_dt",
                  "x_proj_B", "x_proj_C", "dt_proj", "out_proj", "in_proj", "Wq", "Wk", "Wv"}


# ----------------------------------------------------------------------------------------------
# 2. Loading: a converted folder holds ONE safetensors file, read through a memory map

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I8": np.int8}  # bf16: raw bits


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
            raise Phi4FlashError(f"{path}: tensor {name} has dtype {info.get('dtype')}; expected one of {', '.join(SAFETENSORS_DTYPES)}")
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
    """A stored tensor as float32 (bf16 bits are widened exactly)."""
    return bf16_to_f32(a) if a.dtype == np.uint16 else a.astype(np.float32, copy=False)


def read_converted(file):
    """A converted model.safetensors -> (Config, {name: array}), its format and every shape checked."""
    tensors, meta = read_safetensors(file)
    if meta.get("format") != FORMAT:
        raise Phi4FlashError(f"{file}: not a phi4flash converted file (a Hugging Face checkpoint? run convert.py on its folder)")
    version = meta.get("format_version")
    if not (str(version).isdigit() and 1 <= int(version) <= int(FORMAT_VERSION)):
        newer = str(version).isdigit() and int(version) > int(FORMAT_VERSION)
        raise Phi4FlashError(f"{file}: converted with format version {version}, this code reads versions 1 to {FORMAT_VERSION}; "
                             + ("upgrade phi4flash (pip install -U -e . in its clone)" if newer
                                else "convert the original checkpoint again"))
    try:
        c = json.loads(meta["config"])
        cfg = Config(**{**c, "sliding_window": tuple(c["sliding_window"])})
    except (KeyError, TypeError, ValueError) as e:
        raise Phi4FlashError(f"{file}: the model config in the metadata is missing or unreadable ({e!r}); "
                             "convert the original checkpoint again") from None
    expected = stored_tensors(cfg, meta.get("weights_dtype"), file)   # {name: (shape, dtype)}, int8's scales too
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            raise Phi4FlashError(f"{file}: tensor {name} is missing")
        if (tuple(tensors[name].shape), tensors[name].dtype) != (shape, SAFETENSORS_DTYPES[dtype]):
            raise Phi4FlashError(f"{file}: tensor {name} is {stored_as(tensors[name])}, expected {dtype} {shape}")
    if set(tensors) - set(expected):
        raise Phi4FlashError(f"{file}: unexpected tensor {sorted(set(tensors) - set(expected))[0]}")
    return cfg, with_scales(tensors)                                      # int8 matrices paired with their scales


def load(path, device="cpu", kv_dtype="float32"):
    """Load a converted folder (convert.py) -> Model (section 9). Its matrices stay memory-mapped (loading reads
    the headers); device="cuda" copies them to the GPU. kv_dtype: "float32" K/V (exact) or "bfloat16" (section 11)."""
    check_load_options(device, kv_dtype)
    if device == "cuda":
        require_cupy()                          # fail in one line before reading anything
    path = os.fspath(path)
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    folder = os.path.dirname(file)
    if not os.path.isfile(file):
        raise Phi4FlashError(f"{path}: no converted model here (expected {file}); convert a Hugging Face folder with convert.py")
    try:
        cfg, tensors = read_converted(file)
    except OSError as e:
        raise Phi4FlashError(f"{file}: cannot read it ({e.strerror or e})") from None

    def group(prefix):  # {"layers.3.attn.Wq": a} -> {"Wq": a} for prefix "layers.3.attn."
        return {k[len(prefix):]: (v if k[len(prefix):] in LINEAR_WEIGHTS else f32(v).copy())
                for k, v in tensors.items() if k.startswith(prefix)}

    layers = []
    for i, kind in enumerate(cfg.layer_kinds):
        p = f"layers.{i}."
        mixer = kind if kind in ("mamba", "gmu") else "attn"          # the converted names' group
        layers.append({"input_layernorm": group(p + "input_layernorm."),
                       "post_attention_layernorm": group(p + "post_attention_layernorm."),
                       "mlp": group(p + "mlp."), mixer: group(p + mixer + ".")})
    model = Model(cfg, tensors["embed_tokens.weight"], group("final_layernorm."), layers, path=folder, kv_dtype=kv_dtype)
    read_side_files(model, folder)
    return to_device(model) if device == "cuda" else model


# ----------------------------------------------------------------------------------------------
# 3. Math helpers (all fp32)

def linear(x, W, b=None):
    """y = x·Wᵀ + b for W stored [out, in]: float32, bf16 bits (uint16) or int8 groups (section 11)."""
    y = x @ W.T if W.dtype == np.float32 else stored_matmul(x, W)        # (T, out)
    return y if b is None else y + b


def layer_norm(x, p, eps):
    """LayerNorm with bias over the last axis: (x - mean) / sqrt(biased var + eps) ⊙ w + b."""
    xp = get_xp(x)
    centred = x - x.mean(-1, keepdims=True)                               # (T, D)
    var = (centred * centred).mean(-1, keepdims=True)                     # (T, 1)  biased
    return centred / xp.sqrt(var + eps) * p["weight"] + p["bias"]


def rms_norm(x, weight, eps):
    """RMSNorm over the last axis, no mean subtraction: x / sqrt(mean(x²) + eps) ⊙ w."""
    xp = get_xp(x)
    return x / xp.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def sigmoid(x):
    xp = get_xp(x)
    return 1.0 / (1.0 + xp.exp(-xp.maximum(x, -80.0)))  # e^80 is finite in fp32; σ(-80) < 2e-35 anyway


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
# 4. SwiGLU MLP (every layer): out = (silu(g) ⊙ u)·fc2ᵀ, with [g | u] = x·fc1ᵀ — SiLU on the FIRST half

def mlp(x, p):
    g = linear(x, p["fc1_gate"])                                          # (T, F)
    u = linear(x, p["fc1_up"])                                            # (T, F)
    return linear(silu(g) * u, p["fc2"])                                  # (T, D)


# ----------------------------------------------------------------------------------------------
# 5. Mamba-1 (even layers of the self-decoder, and layer L/2)   [2312.00752 §3, Algorithm 2]

def causal_conv1d(x, conv_state, weight, bias):
    """Depthwise causal conv over time: x̃_t = b + Σ_k w[:, k] ⊙ x_{t-(d_conv-1)+k}, so w[:, -1]
    multiplies the current token. conv_state holds the d_conv-1 raw inputs before x (zeros at start).
    x (T, d_inner), conv_state (d_conv-1, d_inner), weight (d_inner, d_conv) -> (x̃, new conv_state)."""
    xp = get_xp(x)
    T, d_conv = x.shape[0], weight.shape[1]
    xs = xp.concatenate([conv_state, x])                                  # (d_conv-1+T, d_inner)
    out = xp.broadcast_to(bias, x.shape).copy()                           # (T, d_inner)
    for k in range(d_conv):
        out += weight[:, k] * xs[k:k + T]
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
        dA = xp.exp(delta[t0:t1, :, None] * A)                            # (t1-t0, d_inner, N)
        hs = (delta[t0:t1] * x[t0:t1])[:, :, None] * B[t0:t1, None, :]    # (t1-t0, d_inner, N) ΔBx, then states
        for t in range(t1 - t0):
            h *= dA[t]
            h += hs[t]
            hs[t] = h
        y[t0:t1] = (hs @ C[t0:t1, :, None])[:, :, 0] + D * x[t0:t1]       # (t1-t0, d_inner)
    return y, h


def mamba(u, p, conv_state, ssm_state):
    """Mamba-1 mixer. u (T, D) -> (out (T, D), y (T, d_inner), conv_state, ssm_state).
    y is the scan output with the D skip and before the z gate: layer L/2's y is the GMU memory."""
    xp = get_xp(u)
    x = linear(u, p["in_proj_x"])                                         # (T, d_inner)
    z = linear(u, p["in_proj_z"])                                         # (T, d_inner)
    x, conv_state = causal_conv1d(x, conv_state, p["conv1d_weight"], p["conv1d_bias"])
    x = silu(x)                                                           # (T, d_inner)  x̂
    dt_low = linear(x, p["x_proj_dt"])                                    # (T, dt_rank)
    B = linear(x, p["x_proj_B"])                                          # (T, N)
    C = linear(x, p["x_proj_C"])                                          # (T, N)
    delta = softplus(linear(dt_low, p["dt_proj"], p["dt_proj_bias"]))     # (T, d_inner)  Δ
    A = -xp.exp(p["A_log"])                                               # (d_inner, N), all < 0
    y, ssm_state = selective_scan(x, delta, A, B, C, p["D"], ssm_state)   # (T, d_inner)
    out = linear(y * silu(z), p["out_proj"])                              # (T, D)
    return out, y, conv_state, ssm_state


# ----------------------------------------------------------------------------------------------
# 6. Differential attention (sliding-window layers, layer L/2+1, cross-attention)   [2410.05258 §2.1]
#
# Heads are striped by parity: stripe 1 = heads 0, 2, 4, ...; stripe 2 = heads 1, 3, 5, ... (for
# q, k and v alike). Inside a stripe, GQA maps stripe query j to stripe KV head g = j // G. Each
# stripe-1 query and its stripe-2 twin share the value pair [v1_g ‖ v2_g] (2·hd wide), and
#   O_j = RMSNorm(softmax(q1_j k1_gᵀ/√hd) V_g − λ softmax(q2_j k2_gᵀ/√hd) V_g) ⊙ subln · (1 − λ_init)
# whose first hd features are output head 2j and last hd features head 2j+1.

def diff_lambda(p, lambda_init):
    """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init: one scalar per layer."""
    xp = get_xp(p["lambda_q1"])
    return (xp.exp((p["lambda_q1"] * p["lambda_k1"]).sum())
            - xp.exp((p["lambda_q2"] * p["lambda_k2"]).sum()) + lambda_init)


def differential_attention_sequential(q, k, v, mask, lam, lambda_init, subln, eps=1e-5):
    """The equation above as written, one differential head j at a time (the twin the fast form is
    tested against). Same arguments and result as differential_attention."""
    xp = get_xp(q)
    H, T, hd = q.shape
    G = H // k.shape[0]
    out = xp.empty((T, H * hd), xp.float32)                               # (T, H·hd)
    for j in range(H // 2):
        g = j // G
        V_g = xp.concatenate([v[2 * g], v[2 * g + 1]], axis=-1)           # (S, 2hd)  [v1_g ‖ v2_g]
        P1 = softmax(xp.where(mask, q[2 * j] @ k[2 * g].T / math.sqrt(hd), -xp.inf))          # (T, S)
        P2 = softmax(xp.where(mask, q[2 * j + 1] @ k[2 * g + 1].T / math.sqrt(hd), -xp.inf))  # (T, S)
        O_j = rms_norm(P1 @ V_g - lam * (P2 @ V_g), subln, eps) * (1.0 - lambda_init)         # (T, 2hd)
        out[:, 2 * j * hd:(2 * j + 2) * hd] = O_j                         # heads 2j, 2j+1
    return out


def differential_attention(q, k, v, mask, lam, lambda_init, subln, eps=1e-5):
    """All heads at once. K head 2g+s serves the G stripe-s queries of group g, and V heads 2g, 2g+1
    serve all 2G queries of the group, so a group's queries are stacked as the rows of one matrix:
    each K and V row is read once per call (decoding is bound by reading them).
    q (H, T, hd); k, v (H_kv, S, hd); mask (T, S) True where a key is visible -> (T, H·hd)."""
    if _cpu.compiled_step and q.shape[1] == 1:                            # a bf16 decode step: section 11
        return attention_row(q, k, v, mask, lam, lambda_init, subln, eps)
    xp = get_xp(q)
    H, T, hd = q.shape
    H_kv, S, _ = k.shape
    G, n_groups = H // H_kv, H_kv // 2
    qs = q.reshape(n_groups, G, 2, T, hd).transpose(0, 2, 1, 3, 4)       # (H_kv/2, 2, G, T, hd)  head 2(gG+r)+s
    qs = qs.reshape(n_groups, 2, G * T, hd)                               # (H_kv/2, 2, G·T, hd)   rows (r, t)
    ks = f32(k).reshape(n_groups, 2, S, hd)                               # (H_kv/2, 2, S, hd)     K head 2g+s
    scores = qs @ ks.swapaxes(-1, -2) * (1.0 / math.sqrt(hd))             # (H_kv/2, 2, G·T, S)
    scores = xp.where(mask, scores.reshape(n_groups, 2, G, T, S), -xp.inf)  # (H_kv/2, 2, G, T, S)
    maps = softmax(scores).reshape(n_groups, 1, 2 * G * T, S)            # (H_kv/2, 1, 2·G·T, S)  rows (s, r, t)
    vs = f32(v).reshape(n_groups, 2, S, hd)                               # (H_kv/2, 2, S, hd)     V heads 2g, 2g+1
    att = maps @ vs                                                       # (H_kv/2, 2, 2·G·T, hd) [g, V head, (s, r, t)]
    att = att.reshape(n_groups, 2, 2, G, T, hd).transpose(2, 0, 3, 4, 1, 5)  # (2, H_kv/2, G, T, 2, hd)
    att = att.reshape(2, n_groups, G, T, 2 * hd)                          # P_s·[v_2g ‖ v_2g+1] per stripe s
    o = rms_norm(att[0] - lam * att[1], subln, eps) * (1.0 - lambda_init)  # (H_kv/2, G, T, 2hd)
    return o.transpose(2, 0, 1, 3).reshape(T, H * hd)                     # pair j = gG + r -> heads 2j, 2j+1


def visible(kpos, qpos, window):
    """Key at position kpos is visible to the query at qpos iff kpos <= qpos and, with a window,
    kpos > qpos - W (W keys, the current one included); kpos = -1 marks an empty cache slot."""
    mask = (kpos >= 0) & (kpos <= qpos)
    return mask & (kpos > qpos - window) if window else mask


def attend(q, k, v, qpos, kpos, window, lam, lambda_init, subln, block=256):
    """Differential attention of queries at positions qpos over keys at positions kpos. Queries go
    in blocks; with more than one block the keys are in time order and each block slices only the
    keys it can see, so a sliding window costs O(T·W), not O(T²).
    q (H, T, hd); k, v (H_kv, S, hd); qpos (T,), kpos (S,) -> (T, H·hd)."""
    xp = get_xp(q)
    T = q.shape[1]
    block = min(block, window) if window else block                       # a block sees ≤ block + W - 1 keys
    out = xp.empty((T, q.shape[0] * q.shape[2]), xp.float32)              # (T, H·hd)
    for a in range(0, T, block):
        b = min(T, a + block)
        lo, hi = 0, k.shape[1]
        if T > block:
            lo = int(xp.searchsorted(kpos, qpos[a] - window + 1)) if window else 0
            hi = int(xp.searchsorted(kpos, qpos[b - 1], side="right"))
        mask = visible(kpos[lo:hi][None, :], qpos[a:b][:, None], window)  # (b-a, hi-lo)
        out[a:b] = differential_attention(q[:, a:b], k[:, lo:hi], v[:, lo:hi], mask, lam, lambda_init, subln)
    return out


def project_heads(x, W, b, n_heads):
    """x (T, D) -> (n_heads, T, hd): a head-major projection, heads first."""
    y = linear(x, W, b)                                                   # (T, n_heads·hd)
    return y.reshape(x.shape[0], n_heads, -1).transpose(1, 0, 2)


def self_attention(u, p, kv, pos, i, cfg, q_rows=slice(None)):
    """Attention layer i of kind "swa" (its K/V in a ring of W slots) or "full" (layer L/2+1, its
    K/V appended to the shared buffer). Writes this call's K/V into `kv`; queries only for u[q_rows]
    (layer L/2+1 in prefill needs just the last token's output). u (T, D), pos (T,) -> (T_q, D)."""
    k_new = project_heads(u, p["Wk"], p["bk"], cfg.num_key_value_heads)  # (H_kv, T, hd)
    v_new = project_heads(u, p["Wv"], p["bv"], cfg.num_key_value_heads)  # (H_kv, T, hd)
    k, v, kpos = (kv_ring if kv.window else kv_append)(kv, *kv_stored(kv, k_new, v_new), int(pos[0]))  # keys in view
    q = project_heads(u[q_rows], p["Wq"], p["bq"], cfg.num_attention_heads)  # (H, T_q, hd)
    lambda_init = lambda_init_for(i)
    o = attend(q, k, v, pos[q_rows], kpos, kv.window, diff_lambda(p, lambda_init), lambda_init, p["subln"])
    return linear(o, p["out_proj"], p["out_proj_bias"])                   # (T_q, D)


def cross_attention(u, p, shared, pos, i, cfg):
    """Cross-attention layer i: its own queries over layer L/2+1's K/V (YOCO), no cache of its own."""
    q = project_heads(u, p["Wq"], p["bq"], cfg.num_attention_heads)      # (H, T, hd)
    n = shared.length
    kpos = get_xp(u).arange(n)                                            # (S,)
    lambda_init = lambda_init_for(i)
    o = attend(q, shared.k[:, :n], shared.v[:, :n], pos, kpos, None, diff_lambda(p, lambda_init), lambda_init,
               p["subln"])                                                # (T, H·hd)
    return linear(o, p["out_proj"], p["out_proj_bias"])                   # (T, D)


# ----------------------------------------------------------------------------------------------
# 7. Gated Memory Unit (even cross-decoder layers)   [2507.06607 §2.1]

def gmu(x, p, memory):
    """out = (silu(x·in_projᵀ) ⊙ m)·out_projᵀ: this layer's input gates the shared memory m.
    x (T, D), memory (T, d_inner) -> (T, D)."""
    return linear(silu(linear(x, p["in_proj"])) * memory, p["out_proj"])


# ----------------------------------------------------------------------------------------------
# 8. Cache (batch 1) and the layer loop. Layers past L/2+1 keep nothing.

@dataclass
class KVCache:
    k: object          # (H_kv, slots, hd) float32, or bf16 bits (uint16) with kv_dtype "bfloat16"
    v: object          # (H_kv, slots, hd)
    pos: object        # (slots,) the position held in each slot, -1 = empty
    window: int | None  # "swa": a ring of exactly W slots; None: the append buffer of layer L/2+1
    length: int = 0    # positions written so far


@dataclass(repr=False)
class Cache:
    length: int = 0                                   # tokens the model has seen
    conv_state: dict = field(default_factory=dict)    # Mamba layer i -> (d_conv-1, d_inner): last raw inputs, oldest first
    ssm_state: dict = field(default_factory=dict)     # Mamba layer i -> (d_inner, N), fp32
    kv: dict = field(default_factory=dict)            # "swa"/"full" layer i -> KVCache
    cuda: object = None                               # appendix A only: the GPU decode step's buffers (CudaStep)

    def shared(self, cfg):  # the K/V every cross-attention layer reads
        return self.kv[cfg.kv_layer]

    def __repr__(self):  # a summary: the default prints every state array
        slots = next((kv.k.shape[1] for kv in self.kv.values() if kv.window is None), 0)
        return (f"Cache(length {self.length}, {len(self.ssm_state)} Mamba states, {len(self.kv)} K/V buffers, "
                f"shared K/V of {slots} slots)")


def empty_cache(cfg, capacity, xp=np, kv_dtype="float32"):
    """All zeros; layer L/2+1's buffer starts with `capacity` slots (it doubles when full); K/V in kv_dtype."""
    cache, kv_bits = Cache(), KV_DTYPES[kv_dtype]                       # float32, or bf16 bits (uint16)
    hd, H_kv = cfg.head_dim, cfg.num_key_value_heads
    for i, kind in enumerate(cfg.layer_kinds):
        if kind == "mamba":
            cache.conv_state[i] = xp.zeros((cfg.mamba_d_conv - 1, cfg.d_inner), xp.float32)
            cache.ssm_state[i] = xp.zeros((cfg.d_inner, cfg.mamba_d_state), xp.float32)
        elif kind in ("swa", "full"):
            window = cfg.sliding_window[i] if kind == "swa" else None
            slots = window or max(int(capacity), 1)
            cache.kv[i] = KVCache(xp.zeros((H_kv, slots, hd), kv_bits), xp.zeros((H_kv, slots, hd), kv_bits),
                                  xp.full(slots, -1, xp.int64), window)
    return cache


def kv_grow(kv, needed):
    """Make the append buffer hold at least `needed` slots, at least doubling it (appends stay
    amortised O(1)). The new slots are empty."""
    xp = get_xp(kv.k)
    grow = max(needed, 2 * kv.k.shape[1]) - kv.k.shape[1]
    zeros = xp.zeros((kv.k.shape[0], grow, kv.k.shape[2]), kv.k.dtype)   # (H_kv, grow, hd)
    kv.k, kv.v = xp.concatenate([kv.k, zeros], axis=1), xp.concatenate([kv.v, zeros], axis=1)
    kv.pos = xp.concatenate([kv.pos, xp.full(grow, -1, xp.int64)])


def kv_append(kv, k_new, v_new, start):
    """Layer L/2+1: append T new K/V (positions start..start+T-1) to the shared buffer -> the keys
    every new query may see, (k, v, kpos) with k, v (H_kv, start+T, hd)."""
    xp = get_xp(k_new)
    T = k_new.shape[1]
    if start + T > kv.k.shape[1]:
        kv_grow(kv, start + T)
    kv.k[:, start:start + T], kv.v[:, start:start + T] = k_new, v_new
    kv.pos[start:start + T] = xp.arange(start, start + T)
    kv.length = start + T
    return kv.k[:, :kv.length], kv.v[:, :kv.length], kv.pos[:kv.length]


def kv_ring(kv, k_new, v_new, start):
    """A sliding layer: the ring of W slots holds positions p at slot p % W. Store T new K/V and
    return the keys the new queries may see, (k, v, kpos) with k, v (H_kv, S, hd)."""
    xp = get_xp(k_new)
    T, W = k_new.shape[1], kv.window
    kv.length = start + T
    if T == 1:                                  # decode: the new entry evicts position start-W; the ring is the window
        kv.k[:, start % W], kv.v[:, start % W], kv.pos[start % W] = k_new[:, 0], v_new[:, 0], start
        return kv.k, kv.v, kv.pos
    past = [s % W for s in range(max(0, start - W + 1), start)]           # ring slots still in view, oldest first
    k = xp.concatenate([kv.k[:, past], k_new], axis=1)                    # (H_kv, ≤W-1+T, hd)
    v = xp.concatenate([kv.v[:, past], v_new], axis=1)                    # (H_kv, ≤W-1+T, hd)
    kpos = xp.concatenate([kv.pos[past], xp.arange(start, start + T)])    # (≤W-1+T,) in time order
    keep = range(max(0, T - W), T)                                        # the newest ≤ W entries stay
    slots = [(start + t) % W for t in keep]
    kv.k[:, slots], kv.v[:, slots] = k_new[:, keep.start:], v_new[:, keep.start:]
    kv.pos[slots] = xp.arange(start + keep.start, start + T)
    return k, v, kpos


def record(trace, name, x):
    if trace is not None:
        trace[name] = f32(to_numpy(x)).copy()                            # bf16 K/V bits widened


def extend(model, cache, ids, logits="last", trace=None):
    """Feed T new tokens on top of `cache` (updated in place): prefill, a chunk of a prompt, the
    next chat turn and a decode step are all this one loop. logits: "all" -> (T, V); "last" -> (1, V)
    for the last token; None -> nothing (it only fills the cache). With a `trace` dict, the named
    intermediates (appendix B) are recorded into it at layer boundaries.

    Prefill is linear (2507.06607 §2): layers 0..L/2 run on every token; layer L/2+1 writes K/V for
    every token but computes its query and output only for the rows we return; the cross-decoder
    (GMU + cross-attention, stateless) then runs on those rows only, and not at all without logits."""
    cfg, eps = model.config, model.config.layer_norm_eps
    xp = get_xp(model.embed_tokens)
    T = len(ids)
    pos = xp.arange(cache.length, cache.length + T)                       # (T,) absolute positions
    hidden = f32(model.embed_tokens[ids])                                 # (T, D); no scaling, no positional encoding
    record(trace, "embed", hidden)
    memory = None
    for i, (kind, layer) in enumerate(zip(cfg.layer_kinds, model.layers)):
        if kind in ("gmu", "cross") and logits is None:  # the cache is complete: nothing past L/2+1 writes to it
            break
        u = layer_norm(hidden, layer["input_layernorm"], eps)             # (T, D)
        if kind == "mamba":
            out, y, cache.conv_state[i], cache.ssm_state[i] = mamba(u, layer["mamba"], cache.conv_state[i], cache.ssm_state[i])
            if i == cfg.memory_layer:
                memory = y                                                # (T, d_inner)  m
                record(trace, "memory", memory)
        elif kind == "swa":
            out = self_attention(u, layer["attn"], cache.kv[i], pos, i, cfg)
        elif kind == "full":
            rows = slice(None) if logits == "all" else slice(T - 1, T)
            out = self_attention(u, layer["attn"], cache.kv[i], pos, i, cfg, q_rows=rows)
            hidden, u, memory, pos = hidden[rows], u[rows], memory[rows], pos[rows]  # from here on: those rows only
            record(trace, "shared_k", cache.kv[i].k[:, :cache.kv[i].length])
            record(trace, "shared_v", cache.kv[i].v[:, :cache.kv[i].length])
        elif kind == "gmu":
            out = gmu(u, layer["gmu"], memory)
        else:
            out = cross_attention(u, layer["attn"], cache.shared(cfg), pos, i, cfg)
        hidden = hidden + out                                             # (T, D)
        mlp_out = mlp(layer_norm(hidden, layer["post_attention_layernorm"], eps), layer["mlp"])  # (T, D)
        hidden = hidden + mlp_out
        for name, x in (("mixer_in", u), ("mixer_out", out), ("mlp_out", mlp_out), ("residual", hidden)):
            record(trace, f"layers.{i}.{name}", x)
    cache.length += T
    if logits is None:
        return None
    hidden = layer_norm(hidden, model.final_layernorm, eps)               # (T or 1, D)
    record(trace, "final_norm", hidden)
    out = linear(hidden, model.embed_tokens)                              # (T or 1, V), tied head
    record(trace, "logits", out)
    return out


# ----------------------------------------------------------------------------------------------
# 9. Sampling, and the Model: the weights plus the API (forward, new_cache, prefill, step, generate)

def sample(logits, token_mask, temperature, top_k, top_p, rng):
    """Mask ids without a token -> greedy if temperature == 0, else /temperature -> top-k -> top-p ->
    draw one id from the renormalised probabilities (inverse CDF of one uniform number)."""
    logits = np.where(token_mask, np.asarray(logits, np.float32), -np.inf)  # (V,)
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits / np.float32(temperature)
    if top_k and top_k < logits.size:
        logits = np.where(logits >= np.partition(logits, -top_k)[-top_k], logits, -np.inf)
    probs = softmax(logits)                                               # (V,)
    ids = nucleus(probs, top_p) if top_p < 1.0 else np.arange(probs.size)  # (n,)
    cum = np.cumsum(probs[ids], dtype=np.float64)                         # (n,)
    return int(ids[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(ids) - 1)])


def nucleus(probs, top_p):
    """Top-p: the smallest set of ids whose probabilities sum to at least top_p, most likely first.
    Only the k most likely ids are sorted, k growing until they hold top_p of the mass (the set
    takes the most likely first, so it is among them): a peaked distribution over 200K ids costs no
    full sort. A flat one jumps to it: k grows by the mass still missing, and past a quarter of the
    vocabulary one sort of everything is cheaper than more partitions."""
    V, k = probs.size, 256
    while True:
        if k >= V // 4:
            top = np.argsort(-probs)                                      # (V,) most likely first
        else:
            top = np.argpartition(probs, V - k)[V - k:]                   # (k,) the k most likely
            top = top[np.argsort(-probs[top])]                            # (k,) most likely first
        cum = np.cumsum(probs[top], dtype=np.float64)                     # (k,)
        if cum[-1] >= top_p or top.size == V:
            return top[:min(int(np.searchsorted(cum, top_p)), top.size - 1) + 1]
        k *= max(16, int(2 * top_p / max(cum[-1], 1e-12)))  # the k most likely of a flat distribution hold little


PREFILL_CHUNK = 512  # prompt tokens per extend(): activations stay a few MB (cache-friendly), memory stays flat


@dataclass(eq=False, repr=False)
class Model:
    config: Config
    embed_tokens: object          # (V, D), float32, bf16 bits or Int8Weight; also the tied LM head
    final_layernorm: dict         # weight, bias: (D,)
    layers: list                  # per layer {"input_layernorm", "post_attention_layernorm", "mlp", "mamba"|"attn"|"gmu"}
    tokenizer: object = None      # tokenizers.Tokenizer, when the folder has tokenizer.json
    token_mask: object = None     # (V,) bool: True for ids that have a token; the others are never sampled
    stop_ids: tuple = ()          # generation stops after sampling one of these
    path: str = ""
    files: dict = field(default_factory=dict)  # tokenizer_config / generation_config JSON, when present
    device: str = "cpu"           # "cuda": run() takes appendix A's kernels instead of extend()
    prefill_chunk: int = PREFILL_CHUNK  # prompt tokens per run(); larger on a GPU (CUDA_PREFILL_CHUNK)
    kv_dtype: str = "float32"     # the K/V cache: "float32" (exact) or "bfloat16" (bits, section 11)

    def __repr__(self):  # a summary: the default prints every weight
        c, weights = self.config, {"uint16": "bf16"}.get(str(self.embed_tokens.dtype), str(self.embed_tokens.dtype))
        return (f"Model({c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, context "
                f"{c.context_length}, {weights} weights, {self.device}, {self.path!r})")

    def run(self, cache, ids, logits="last", trace=None):
        """The layer loop on this model's device: extend() on the CPU (with the BLAS threads section 11
        asks for), cuda_extend() on a GPU."""
        if self.device == "cuda":
            return cuda_extend(self, cache, ids, logits, trace)
        with cpu_threads(self, len(ids)):
            return extend(self, cache, ids, logits, trace)

    def forward(self, ids, trace=None, attn_probs=None):
        """Full forward, every position, nothing cached between calls: (T, V) float32 logits.
        trace: a dict to fill with the named intermediates (appendix B); attn_probs=(layer, j) adds
        layers.{layer}.attn_probs (2, T, T), both softmax maps of differential head j."""
        ids = check_ids(self, ids, room=None)
        check_args(self, trace=trace)
        if attn_probs is not None:
            check_attn_probs(self.config, attn_probs)
            trace = {} if trace is None else trace
        logits = to_numpy(self.run(self.new_cache(len(ids)), ids, "all", trace))
        if attn_probs is not None:
            trace[f"layers.{attn_probs[0]}.attn_probs"] = attention_maps(self, trace, *attn_probs)
        return logits

    def new_cache(self, capacity=256):
        """An empty cache whose shared K/V has room for `capacity` tokens (it grows when full, up to the
        context: more is never needed)."""
        check_args(self, capacity=capacity)
        return empty_cache(self.config, min(capacity, self.config.context_length), get_xp(self.embed_tokens), self.kv_dtype)

    def prefill(self, ids, cache=None, logits=True, chunk=None):
        """Run the prompt (or a later chat turn) into `cache`: -> (last-token logits (V,), cache).
        It goes in chunks; only the last one runs the cross-decoder and the head, the ones before it
        just fill the cache. logits=False only fills the cache and returns (None, cache)."""
        check_args(self, logits=logits, chunk=chunk)
        check_cache(self, cache)
        ids = check_ids(self, ids, room=cache)
        cache = cache if cache is not None else self.new_cache(len(ids) + 1024)  # room to decode without regrowing
        chunk = chunk or self.prefill_chunk
        for a in range(0, len(ids), chunk):
            last = self.run(cache, ids[a:a + chunk], "last" if logits and a + chunk >= len(ids) else None)
        return (to_numpy(last)[-1] if logits else None), cache

    def step(self, cache, token):
        """One decode step: -> logits (V,) for the position after `token`."""
        check_cache(self, cache, optional=False)
        return to_numpy(self.run(cache, check_ids(self, [token], "token", room=cache)))[-1]

    def generate(self, ids, max_new_tokens=256, temperature=0.6, top_p=0.95, top_k=0, seed=None,
                 stop_ids=None, cache=None):
        """Yield up to max_new_tokens sampled ids (python ints), stopping after a stop id.

        The prompt `ids` is fed on top of `cache` (a new one if None), then one token per step. Every
        yielded token except the last is in the cache when the loop ends; to continue a conversation,
        pass the same cache and start the next `ids` with that last token."""
        check_args(self, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                   stop_ids=stop_ids)
        check_cache(self, cache)
        stop_ids = set(self.stop_ids if stop_ids is None else stop_ids)
        rng = np.random.default_rng(seed)
        ids, limit = check_ids(self, ids, room=cache), self.config.context_length
        logits, cache = self.prefill(ids, cache if cache is not None else self.new_cache(len(ids) + max_new_tokens))
        fed = list(ids)
        for n in range(max_new_tokens):
            if not np.isfinite(logits).all():
                raise Phi4FlashError(nonfinite_message(self, fed))
            token = sample(logits, self.token_mask, temperature, top_k, top_p, rng)
            yield token
            if token in stop_ids or n == max_new_tokens - 1:
                return
            if cache.length + 1 > limit:
                raise Phi4FlashError(f"generate: stopped at the model's context of {limit} tokens "
                                     f"({n + 1} generated); start a new conversation or a shorter prompt")
            logits = self.step(cache, token)
            fed.append(token)

    def encode(self, text):
        return tokenizer_of(self).encode(check_text(text), add_special_tokens=False).ids

    def decode(self, ids):
        return tokenizer_of(self).decode(check_ids(self, ids, empty=True).tolist(), skip_special_tokens=False)


def to_numpy(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


# ----------------------------------------------------------------------------------------------
# 10. The edges of the model: the API's arguments; the checkpoint's side files (the tokenizer, the
# stop ids, the generation config)
#
# The Model's methods check what a caller passes with these, as the command lines check their flags:
# a bad argument is one Phi4FlashError line naming it and what was expected, never an error from
# deep inside NumPy, and nothing runs past the model's context.

def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v):
    return _is_int(v) or isinstance(v, (float, np.floating))             # bool is neither


API_ARGS = {  # argument -> (is it acceptable, given the model; what is expected)
    "max_new_tokens": (lambda m, v: _is_int(v) and v >= 0, "an integer >= 0"),
    "temperature": (lambda m, v: _is_number(v) and 0 <= v < math.inf, "a finite number >= 0 (0 = greedy)"),
    "top_p": (lambda m, v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda m, v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "seed": (lambda m, v: v is None or _is_int(v) and v >= 0, "None or an integer >= 0"),
    "stop_ids": (lambda m, v: v is None or isinstance(v, (list, tuple, set, frozenset, np.ndarray))
                 and all(_is_int(i) for i in v), "None or a list of token ids (integers)"),
    "capacity": (lambda m, v: _is_int(v) and v >= 1, "an integer >= 1 (tokens)"),
    "chunk": (lambda m, v: v is None or _is_int(v) and v >= 1, "None or an integer >= 1 (tokens per pass)"),
    "logits": (lambda m, v: isinstance(v, (bool, np.bool_)), "True or False"),
    "trace": (lambda m, v: v is None or isinstance(v, dict), "None or a dict to fill"),
}


def check_args(model, **args):
    """Model's arguments, by name -> a one-line Phi4FlashError for the first that API_ARGS refuses."""
    for name, value in args.items():
        ok, expected = API_ARGS[name]
        if not ok(model, value):
            raise Phi4FlashError(f"{name}: expected {expected}, got {_shown(value)}")


def _shown(value):
    return repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."


def check_cache(model, cache, optional=True):
    """`cache` is one that new_cache() or prefill() of a model with this config made (or None, when optional)."""
    if not (optional and cache is None or cache_matches(model.config, cache, KV_DTYPES[model.kv_dtype])):
        raise Phi4FlashError(f"cache: expected {'None or ' if optional else ''}a cache made by this model's new_cache() "
                             f"or prefill(), got {_shown(cache)}")


def cache_matches(cfg, cache, kv_bits=np.float32):
    """A Cache with the layers and shapes of this config and K/V stored as kv_bits (not one made for
    another model, or for the same one loaded with another kv_dtype)."""
    kinds = cfg.layer_kinds
    return (isinstance(cache, Cache) and sorted(cache.ssm_state) == [i for i, k in enumerate(kinds) if k == "mamba"]
            and sorted(cache.kv) == [i for i, k in enumerate(kinds) if k in ("swa", "full")]
            and all(tuple(h.shape) == (cfg.d_inner, cfg.mamba_d_state) for h in cache.ssm_state.values())
            and all(tuple(kv.k.shape[::2]) == (cfg.num_key_value_heads, cfg.head_dim) for kv in cache.kv.values())
            and all(kv.k.dtype == kv_bits and kv.v.dtype == kv_bits for kv in cache.kv.values()))


def check_ids(model, ids, name="ids", room=False, empty=False):
    """Token ids from the user -> int64 array, or a one-line error naming `name`. room: a cache (None for
    a new one) that the ids must fit into, with what it holds, within the model's context."""
    arr = np.asarray(ids)
    if arr.size == 0 and arr.ndim == 1 and empty:
        return arr.astype(np.int64)
    if isinstance(ids, (list, tuple)) and any(isinstance(i, (bool, np.bool_)) for i in ids):
        raise Phi4FlashError(f"{name}: expected token ids (integers), got True/False among them")
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise Phi4FlashError(f"{name}: expected a non-empty 1-D sequence of token ids, got {arr.dtype} array of shape {arr.shape}")
    bad = arr[(arr < 0) | (arr >= model.config.vocab_size)]
    if bad.size:
        raise Phi4FlashError(f"{name}: token id {int(bad[0])} is outside the vocabulary [0, {model.config.vocab_size})")
    limit, seen = model.config.context_length, getattr(room, "length", 0)
    if room is not False and seen + arr.size > limit:
        raise Phi4FlashError(f"{name}: {seen + arr.size} tokens ({seen} in the cache + {arr.size} new) do not fit the "
                             f"model's context of {limit} tokens")
    return arr.astype(np.int64)


def check_text(text):
    """Text to encode -> itself, or a one-line error: not a str, or not valid UTF-8 (Python keeps the bytes of
    invalid UTF-8, from a command line or a pipe, as lone surrogates, U+DC80-U+DCFF; the tokenizer takes
    none). invalid_utf8 says where."""
    if not isinstance(text, str):
        raise Phi4FlashError(f"text: expected a str, got {type(text).__name__}")
    bad = invalid_utf8(text)
    if bad:
        raise Phi4FlashError(f"text: {bad}")
    return text


def invalid_utf8(text):
    """'' for text that is valid UTF-8, else what is wrong and where, for a one-line message."""
    try:
        text.encode("utf-8")
        return ""
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"a lone surrogate U+{c:04X}"
        return f"not valid UTF-8 text ({what} at character {e.start + 1})"


def tokenizer_of(model):
    if model.tokenizer is None:
        raise Phi4FlashError(f"{os.path.join(model.path, 'tokenizer.json')}: missing, so there is no tokenizer to "
                             "encode or decode text")
    return model.tokenizer


def read_side_files(model, folder):
    """tokenizer_config.json, generation_config.json and tokenizer.json, when present; a damaged one
    is a one-line error naming it. A link whose target is gone (a Hugging Face cache that lost a blob)
    is such an error too, never taken for an absent file: without tokenizer_config.json the chat
    template would silently vanish."""
    for name in ("tokenizer_config.json", "generation_config.json", "tokenizer.json"):
        check_not_dangling(os.path.join(folder, name))
    for name in ("tokenizer_config.json", "generation_config.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    model.files[name] = json.load(f)
            except OSError as e:
                raise Phi4FlashError(f"{path}: cannot read it ({e.strerror or e})") from None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise Phi4FlashError(f"{path}: not valid JSON ({e}); restore it from the original checkpoint "
                                     "or convert it again") from None
            if not isinstance(model.files[name], dict):
                raise Phi4FlashError(f"{path}: expected a JSON object, got {type(model.files[name]).__name__}")
    eos = model.files.get("generation_config.json", {}).get("eos_token_id")
    if not (eos is None or type(eos) is int or isinstance(eos, list) and all(type(i) is int for i in eos)):
        raise Phi4FlashError(f"{os.path.join(folder, 'generation_config.json')}: eos_token_id is {eos!r}; "
                             "expected a token id or a list of them")
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        attach_tokenizer(model, os.path.join(folder, "tokenizer.json"))
    else:
        model.token_mask = np.ones(model.config.vocab_size, bool)
        model.stop_ids = tuple(_as_list(model.files.get("generation_config.json", {}).get("eos_token_id")))


def check_not_dangling(path, again="download or copy that file again"):
    """A one-line error when `path` is a symbolic link whose target does not exist."""
    if os.path.islink(path) and not os.path.exists(path):
        raise Phi4FlashError(f"{path}: a broken link: its target {os.readlink(path)} is missing (a Hugging Face "
                             f"cache whose file was deleted?); {again}")


def _as_list(x):
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def attach_tokenizer(model, tokenizer_json):
    """Tokenizer, the mask of ids that have a token, and the stop ids (eos of the generation config,
    plus <|end|> and <|endoftext|> looked up by string: the config's bos/eos numbers are not trusted)."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(tokenizer_json)
    except Exception as e:  # the library's own error types: a bad file, or a format it does not know
        raise Phi4FlashError(f"{tokenizer_json}: the tokenizers library cannot read it "
                             f"({(str(e).strip() or type(e).__name__).splitlines()[0][:200]})") from None
    model.tokenizer = tok
    mask = np.zeros(model.config.vocab_size, bool)
    ids = np.fromiter(tok.get_vocab(with_added_tokens=True).values(), dtype=np.int64)
    mask[ids[ids < model.config.vocab_size]] = True
    model.token_mask = mask
    stops = _as_list(model.files.get("generation_config.json", {}).get("eos_token_id"))
    stops += [tok.token_to_id(s) for s in ("<|end|>", "<|endoftext|>") if tok.token_to_id(s) is not None]
    model.stop_ids = tuple(dict.fromkeys(int(s) for s in stops))


# ----------------------------------------------------------------------------------------------
# 11. Fewer bytes per token on a CPU: bf16 weights, int8 weights, a bf16 K/V cache
#
# A decode step reads every weight, and the K/V its attention layers look at, once: its time is
# those bytes over the RAM bandwidth. This section stores them in fewer bytes and multiplies them
# without ever widening a whole matrix.
#
# bf16 weights (convert.py's default). NumPy has no bf16 arithmetic. A bf16 number is the top half
# of an fp32, so its 16 bits shifted into the high half of a uint32 are the fp32 value: the widening
# is exact. linear() multiplies bf16 bits W in one of two ways:
#   * a few rows of x (a decode step, a chunk of up to CPU_GEMV_ROWS tokens): gemv_bf16_cpu, compiled
#     with numba, widens each weight inside the dot product, so every weight is read once, 2 bytes,
#     at about the RAM bandwidth (decoding reads all of them per token: that is its floor);
#   * many rows (prefill, compute-bound), or no numba (PHI4FLASH_NUMBA=0, or not installed): a block
#     of rows is widened into an fp32 scratch buffer and BLAS multiplies it (bf16_matmul_blocks).
# Both accumulate in fp32 and match x·widen(W)ᵀ to ~1e-7 relative (only the summation order
# differs). gemv_bf16_reference is the compiled kernel's NumPy twin. In such a few-row step the
# attention of a one-row query is compiled too (attention_row, whose twin is differential_attention),
# and BLAS gets one thread (cpu_threads): numba's threads and BLAS's stall each other on 2 cores.
# int8 weights (convert.py --dtype int8) and the bf16 K/V cache (load(..., kv_dtype="bfloat16"))
# follow, under their own headings; they go the same two ways.

CPU_GEMV_ROWS = 32        # up to this many rows take the compiled product (measured crossover: 32-64)
USE_NUMBA = os.environ.get("PHI4FLASH_NUMBA", "1") != "0"
_nb = None                # numba once imported (with the intrinsics below); False when off or missing
_gemv = None              # the compiled bf16 kernel once built
_blas = None              # threadpoolctl's controller of the BLAS thread pool
_scratch = threading.local()  # the blocks' fp32 buffer, one per thread so concurrent callers do not share it


def stored_matmul(x, W):
    """x·Wᵀ in fp32 for W stored as bf16 bits (uint16) or int8 groups (Int8Weight) [out, in].
    x (T, in) -> (T, out)."""
    return bf16_matmul(x, W) if W.dtype == np.uint16 else int8_matmul(x, W)


def bf16_matmul(x, W):
    """x·Wᵀ for bf16 bits W (uint16) [out, in], in fp32. x (T, in) -> (T, out)."""
    gemv = compiled_gemv() if x.shape[0] <= CPU_GEMV_ROWS else None
    if gemv is None:
        return bf16_matmul_blocks(x, W)
    y = np.empty((x.shape[0], W.shape[0]), np.float32)                   # (T, out)
    gemv(np.ascontiguousarray(x, np.float32), W, y)
    return y


def gemv_bf16_reference(x, W):
    """The compiled kernel's twin: y[t, o] = Σ_k x[t, k] · bf16_to_f32(W[o, k]), in NumPy (float64
    sums, so the tests measure the kernel's fp32 rounding). x (T, in), W (out, in) -> (T, out)."""
    return (x.astype(np.float64) @ bf16_to_f32(W).astype(np.float64).T).astype(np.float32)


def _numba():
    """numba, imported on first use, with two intrinsics defined: widen_bf16 (uint16 bits -> float32)
    and as_f32 (a float32 as it is, bf16 bits widened); None when numba is off or missing."""
    global _nb, widen_bf16, as_f32
    if _nb is None:
        _nb = False
        if not USE_NUMBA:
            return None
        try:
            import numba
            from llvmlite import ir
            from numba.extending import intrinsic
        except ImportError:
            return None

        def widen(builder, bits):  # the 16 bits into the high half of a 32-bit word, read as a float
            word = builder.shl(builder.zext(bits, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(word, ir.FloatType())

        @intrinsic
        def widen_bf16(typingctx, bits):  # numba itself would promote uint32 << 16 to uint64
            return numba.float32(numba.uint16), lambda context, builder, sig, args: widen(builder, args[0])

        @intrinsic
        def as_f32(typingctx, a):  # a K/V element of either cache: float32, or bf16 bits (uint16)
            if a == numba.uint16:
                return numba.float32(numba.uint16), lambda context, builder, sig, args: widen(builder, args[0])
            return numba.float32(numba.float32), lambda context, builder, sig, args: args[0]

        _nb = numba
    return _nb or None


def compiled_gemv():
    """gemv_bf16_cpu compiled by numba on first use (then cached on disk where numba can write), or
    None when numba is off or missing."""
    global _gemv
    numba = _numba()
    if numba is None:
        return None
    if _gemv is None:
        def gemv_bf16_cpu(x, W, y):
            """y[t, o] = Σ_k x[t, k] · widen_bf16(W[o, k]) in fp32. The output features o go to the
            threads; each widened weight serves four rows of x at a time (then the rest one by one)."""
            T, K = x.shape                                                # x (T, K); W (out, K) bits; y (T, out)
            for o in numba.prange(W.shape[0]):
                w = W[o]                                                  # (K,) output feature o's weights
                for t in range(0, T - 3, 4):                              # rows t..t+3 share each widened w[k]
                    a0 = a1 = a2 = a3 = numba.float32(0.0)
                    for k in range(K):
                        w_k = widen_bf16(w[k])
                        a0 += x[t, k] * w_k
                        a1 += x[t + 1, k] * w_k
                        a2 += x[t + 2, k] * w_k
                        a3 += x[t + 3, k] * w_k
                    y[t, o], y[t + 1, o], y[t + 2, o], y[t + 3, o] = a0, a1, a2, a3
                for t in range(T - T % 4, T):
                    acc = numba.float32(0.0)
                    for k in range(K):
                        acc += x[t, k] * widen_bf16(w[k])
                    y[t, o] = acc

        _gemv = _njit(numba, gemv_bf16_cpu)
    return _gemv


def _njit(numba, fn):
    """fn compiled for numba's threads, with fp32 sums reassociated (so they vectorise), and cached on
    disk where numba can write: in every process otherwise."""
    options = dict(parallel=True, fastmath={"reassoc", "contract"}, nogil=True)
    try:
        return numba.njit(cache=True, **options)(fn)
    except Exception:  # nowhere to write numba's cache
        return numba.njit(**options)(fn)


@contextlib.contextmanager
def cpu_threads(model, T):
    """How extend() feeding T tokens uses the cores. A bf16 or int8 model's few-row step is compiled
    work: the products (gemv_bf16_cpu, gemv_int8_cpu) and a decode step's attention (attention_row)
    run on numba's threads, and BLAS gets one thread for what is left (numba's threads and BLAS's
    spinning ones stall each other on a small machine). Anything else: BLAS as configured."""
    global _blas
    if T > CPU_GEMV_ROWS or model.embed_tokens.dtype == np.float32 or compiled_gemv() is None:
        yield
        return
    if _blas is None:
        from threadpoolctl import ThreadpoolController
        _blas = ThreadpoolController()
    with _blas.limit(limits=1, user_api="blas"):
        _cpu.compiled_step = True
        try:
            yield
        finally:
            _cpu.compiled_step = False


class _CpuState(threading.local):
    compiled_step = False     # inside cpu_threads' compiled regime (per thread: concurrent callers differ)


_cpu = _CpuState()


def attention_row(q, k, v, mask, lam, lambda_init, subln, eps):
    """differential_attention for ONE query row, compiled (attention_row_cpu): the KV groups go to
    numba's threads, each reading its K and V rows once (float32, or the bf16 cache's bits, widened
    as they are read). Same arguments and result."""
    H, _, hd = q.shape
    out = np.empty((1, H * hd), np.float32)                               # (1, H·hd)
    _compiled_attention()(np.ascontiguousarray(q[:, 0]), _whole(k), _whole(v), k.shape[1], np.ascontiguousarray(mask[0]),
                          np.float32(lam), np.float32(lambda_init), np.ascontiguousarray(subln, np.float32),
                          np.float32(eps), out[0])
    return out


def _whole(a):
    """The C-contiguous buffer (H_kv, slots, hd) that `a` = buffer[:, :S] is a prefix view of, or a
    contiguous copy: the compiled loops then know the feature stride is 1 (and vectorise)."""
    b = a.base
    if (not a.flags.c_contiguous and isinstance(b, np.ndarray) and b.flags.c_contiguous and b.ndim == 3
            and b.dtype == a.dtype and b.shape[0] == a.shape[0] and b.shape[2] == a.shape[2]
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.strides == b.strides):
        return b
    return np.ascontiguousarray(a)


_row = None


def _compiled_attention():
    """attention_row_cpu compiled by numba on first use (cached as compiled_gemv's); numba compiles
    one version for float32 K/V and one for bf16 bits."""
    global _row
    if _row is None:
        numba = _numba()

        def attention_row_cpu(q, k, v, S, mask, lam, lambda_init, subln, eps, out):
            """Per KV group g: scores of its 2G queries against K heads 2g, 2g+1 (a key row read once
            for the G queries of its stripe), both softmaxes, P·[v_2g ‖ v_2g+1] (a value row read once
            for all 2G maps), then RMSNorm(A1 − λ A2) ⊙ subln · (1 − λ_init) per head pair. Plain
            loops only: numba compiles array expressions inside a parallel loop slowly."""
            H, hd = q.shape
            H_kv = k.shape[0]                                             # keys 0..S-1 of k's slots
            G = H // H_kv
            scale = numba.float32(1.0 / math.sqrt(hd))
            for g in numba.prange(H_kv // 2):
                P = np.empty((2, G, S), np.float32)                       # the two maps of each query
                A = np.zeros((2, G, 2 * hd), np.float32)                  # P_s · [v_2g ‖ v_2g+1]
                for s in range(2):
                    keys = k[2 * g + s]
                    for j in range(S):                                    # key row j serves the G queries
                        for r in range(G):
                            query = q[2 * (g * G + r) + s]
                            acc = numba.float32(0.0)
                            for d in range(hd):
                                acc += query[d] * as_f32(keys[j, d])
                            P[s, r, j] = acc * scale if mask[j] else -np.inf
                    for r in range(G):
                        top = -np.inf
                        for j in range(S):
                            top = max(top, P[s, r, j])
                        total = numba.float32(0.0)
                        for j in range(S):
                            P[s, r, j] = math.exp(P[s, r, j] - top)
                            total += P[s, r, j]
                        for j in range(S):
                            P[s, r, j] /= total
                v1, v2 = v[2 * g], v[2 * g + 1]
                for j in range(S):
                    for s in range(2):
                        for r in range(G):
                            p = P[s, r, j]
                            for d in range(hd):
                                A[s, r, d] += p * as_f32(v1[j, d])
                                A[s, r, hd + d] += p * as_f32(v2[j, d])
                for r in range(G):
                    ss = numba.float32(0.0)
                    for f in range(2 * hd):
                        ss += (A[0, r, f] - lam * A[1, r, f]) ** 2
                    inv = (numba.float32(1.0) - lambda_init) / math.sqrt(ss / (2 * hd) + eps)
                    base = (g * G + r) * 2 * hd
                    for f in range(2 * hd):
                        out[base + f] = (A[0, r, f] - lam * A[1, r, f]) * inv * subln[f]

        _row = _njit(numba, attention_row_cpu)
    return _row


def _scratch_rows(n, cols):
    """This thread's reused 4-byte buffer, as (n, cols) uint32: a block of widened weights."""
    if getattr(_scratch, "buf", np.empty(0)).size < n * cols:
        _scratch.buf = np.empty(n * cols, np.uint32)
    return _scratch.buf[:n * cols].reshape(n, cols)


def _block_rows(T, cols):
    """Weight rows per widened block: 16 MB of fp32 for 16 rows of x and more, else 1 MB (stays in L2)."""
    return max(1, ((4 << 20) if T >= 16 else (256 << 10)) // cols)


def bf16_matmul_blocks(x, W):
    """x·Wᵀ by widening a block of W's rows at a time into a reused fp32 buffer: only a few MB are
    ever fp32, and BLAS multiplies each block. x (T, in) -> (T, out)."""
    T, (rows, cols) = x.shape[0], W.shape
    y = np.empty((T, rows), np.float32)                                  # (T, out)
    step = _block_rows(T, cols)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        buf = _scratch_rows(n, cols)                                      # (n, in)
        buf[...] = W[r:r + n]   # uint16 -> uint32: two contiguous passes beat one strided copy into the high halves
        buf <<= 16
        np.matmul(x, buf.view(np.float32).T, out=y[:, r:r + n])
    return y


# --- int8 weights (convert.py --dtype int8)
#
# Each row of a matrix is cut into groups of GROUP = 32 consecutive inputs. A group keeps one fp32
# scale and 32 int8 numbers:
#     s = max|w| / 127        q = round(w / s), in [-127, 127]        w ≈ q · s
# That is 1 byte per weight plus 4 per group, 1.125 bytes against bf16's 2: the real model's 7.7 GB
# become 4.3 GB. Each weight is off by at most s/2, and s is set by its own group's largest weight,
# so an outlier coarsens only the 31 weights that share its scale, not its whole row. The scales are
# fp32 rather than fp16 (which would save 1/16 byte per weight): exact at any magnitude (fp16's
# normal range ends at 6.1e-5, so a group of small weights would get a subnormal scale with few
# significant bits), and numba and CuPy read them as they are (numba has no fp16 on a CPU). A matrix
# whose input width is not a multiple of GROUP stays bf16; norms, biases, A_log, D, conv and λ stay
# fp32. Products dequantise inside the dot product (gemv_int8_cpu, a few rows) or a block of rows
# at a time for BLAS (int8_matmul_blocks), as bf16 widens; both equal x·(q·s)ᵀ in fp32.

GROUP = 32
WEIGHTS_DTYPES = ("bfloat16", "float32", "int8")  # convert.py --dtype: how a converted file stores its matrices


@dataclass(frozen=True)
class Int8Weight:
    """A matrix [out, in] stored as int8 groups: W ≈ q · s. It has dtype and shape as an array has,
    so linear() dispatches on it; indexing rows dequantises them (the embedding lookup)."""
    q: np.ndarray               # (out, in) int8
    scales: np.ndarray          # (out, in / GROUP) float32
    dtype = np.dtype(np.int8)

    @property
    def shape(self):
        return self.q.shape

    @property
    def nbytes(self):
        return self.q.nbytes + self.scales.nbytes

    def __getitem__(self, rows):
        return dequantize_int8(self.q[rows], self.scales[rows])          # (T, in) for T ids


def quantize_int8(w):
    """fp32 rows w (n, in) -> (q (n, in) int8, scales (n, in/GROUP) fp32): the formula above, in
    fp32 (a group of zeros gets s = 0 and q = 0; one with a NaN or inf gets a non-finite scale and
    meaningless q, which convert.py checks for and refuses)."""
    groups = w.reshape(w.shape[0], -1, GROUP)                            # (n, in/GROUP, GROUP)
    scales = np.abs(groups).max(-1) / np.float32(127)                    # (n, in/GROUP)
    q = np.rint(groups / np.where(scales > 0, scales, np.float32(1))[..., None])  # (n, in/GROUP, GROUP)
    with np.errstate(invalid="ignore"):                                  # NaN -> int8: see above
        return np.clip(q, -127, 127).astype(np.int8).reshape(w.shape), scales.astype(np.float32)


def dequantize_int8(q, scales):
    """q (..., in) int8, scales (..., in/GROUP) -> w = q · s, (..., in) fp32."""
    return (q.reshape(*q.shape[:-1], -1, GROUP) * scales[..., None]).reshape(q.shape)


def is_matrix(name):
    """A linear weight or the tied embedding: stored as convert.py --dtype says (the rest is fp32)."""
    return name == "embed_tokens.weight" or name.rsplit(".", 1)[-1] in LINEAR_WEIGHTS


def stored_tensors(cfg, weights_dtype, where="converted file"):
    """Every tensor of a converted file, as convert.py writes it: name -> (shape, safetensors dtype).
    Matrices are BF16 or F32 as weights_dtype says; with "int8" those whose input width is a multiple
    of GROUP are I8, each followed by NAME.scales (out, in/GROUP) F32. Everything else is F32."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise Phi4FlashError(f"{where}: its matrices are stored as {weights_dtype!r}; this code reads "
                             f"{', '.join(WEIGHTS_DTYPES)} (upgrade phi4flash, or convert the checkpoint again)")
    out = {}
    for name, shape in tensor_shapes(cfg).items():
        if not is_matrix(name):
            out[name] = (shape, "F32")
        elif weights_dtype == "int8" and shape[1] % GROUP == 0:
            out[name], out[name + ".scales"] = (shape, "I8"), ((shape[0], shape[1] // GROUP), "F32")
        else:
            out[name] = (shape, "F32" if weights_dtype == "float32" else "BF16")
    return out


def format_version_for(weights_dtype):
    """The format version a converted file is written with: the lowest that holds it, so that older
    phi4flash versions still read bf16 and float32 conversions (version 2 added int8)."""
    return "2" if weights_dtype == "int8" else "1"


def stored_as(a):
    """'I8 (64, 128)': a stored array's safetensors dtype and shape, for messages."""
    names = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    return f"{names.get(a.dtype, a.dtype)} {tuple(a.shape)}"


def with_scales(tensors):
    """A converted file's {name: array} -> the same, with each int8 matrix and its NAME.scales
    joined into one Int8Weight (read_converted has checked that both are there, with their shapes)."""
    return {name: Int8Weight(a, tensors[name + ".scales"]) if a.dtype == np.int8 else a
            for name, a in tensors.items() if not name.endswith(".scales")}


_gemv_int8 = None


def int8_matmul(x, W):
    """x·Wᵀ for an Int8Weight W [out, in], in fp32: the compiled product for a few rows of x, else
    dequantised blocks through BLAS. x (T, in) -> (T, out)."""
    gemv = compiled_gemv_int8() if x.shape[0] <= CPU_GEMV_ROWS else None
    if gemv is None:
        return int8_matmul_blocks(x, W)
    y = np.empty((x.shape[0], W.shape[0]), np.float32)                   # (T, out)
    gemv(np.ascontiguousarray(x, np.float32), W.q, W.scales, y)
    return y


def gemv_int8_reference(x, q, scales):
    """The compiled kernel's twin: y[t, o] = Σ_k x[t, k] · q[o, k] · s[o, k // GROUP], in NumPy
    (float64 sums, as gemv_bf16_reference). x (T, in), q (out, in) -> (T, out)."""
    return (x.astype(np.float64) @ dequantize_int8(q, scales).astype(np.float64).T).astype(np.float32)


def compiled_gemv_int8():
    """gemv_int8_cpu compiled by numba on first use (cached as compiled_gemv's), or None."""
    global _gemv_int8
    numba = _numba()
    if numba is None:
        return None
    if _gemv_int8 is None:
        def gemv_int8_cpu(x, q, scales, y):
            """y[t, o] = Σ_k x[t, k] · q[o, k] · scales[o, k // GROUP] in fp32: each int8 weight is
            dequantised inside the dot product and read once, 1 byte. Threads and rows as gemv_bf16_cpu."""
            T, K = x.shape                                                # x (T, K); q (out, K); y (T, out)
            for o in numba.prange(q.shape[0]):
                w, s = q[o], scales[o]                                    # (K,) int8, (K / GROUP,) fp32
                for t in range(0, T - 3, 4):
                    a0 = a1 = a2 = a3 = numba.float32(0.0)
                    for k in range(K):
                        w_k = numba.float32(w[k]) * s[k // GROUP]
                        a0 += x[t, k] * w_k
                        a1 += x[t + 1, k] * w_k
                        a2 += x[t + 2, k] * w_k
                        a3 += x[t + 3, k] * w_k
                    y[t, o], y[t + 1, o], y[t + 2, o], y[t + 3, o] = a0, a1, a2, a3
                for t in range(T - T % 4, T):
                    acc = numba.float32(0.0)
                    for k in range(K):
                        acc += numba.float32(w[k]) * x[t, k] * s[k // GROUP]
                    y[t, o] = acc

        _gemv_int8 = _njit(numba, gemv_int8_cpu)
    return _gemv_int8


def int8_matmul_blocks(x, W):
    """x·Wᵀ by dequantising a block of W's rows at a time (q · s) into the reused fp32 buffer; BLAS
    multiplies each block. x (T, in) -> (T, out)."""
    T, (rows, cols) = x.shape[0], W.shape
    y = np.empty((T, rows), np.float32)                                  # (T, out)
    step = _block_rows(T, cols)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        buf = _scratch_rows(n, cols).view(np.float32)                     # (n, in)
        buf[...] = W.q[r:r + n]                                           # int8 -> fp32, exact
        groups = buf.reshape(n, -1, GROUP)                                # (n, in/GROUP, GROUP)
        groups *= W.scales[r:r + n, :, None]                              # q · s
        np.matmul(x, buf.T, out=y[:, r:r + n])
    return y


# --- The bf16 K/V cache (load(..., kv_dtype="bfloat16"); chat.py --kv-dtype bfloat16)
#
# The shared K/V is read at every step by layer L/2+1 and every cross-attention layer (8 layers of
# the real model): 10 KiB per context token each in fp32, 2.7 GB per step at 32K context, as much as
# the int8 weights. Kept as bf16 it is half that. K and V are rounded once, when written into the
# rings and the shared buffer (kv_stored: round to nearest even, the converter's f32_to_bf16), and
# widened exactly where they are read: f32() in differential_attention, as_f32 in attention_row_cpu,
# which reads the bits directly. Only that rounding (≤ 2⁻⁹ relative per element) differs from fp32,
# and cached decoding still equals a full recompute with the same option: both read rounded K/V.

KV_DTYPES = {"float32": np.float32, "bfloat16": np.uint16}  # kv_dtype -> what the cache's K/V arrays hold


def f32_to_bf16(x):
    """float32 -> bf16 bits (uint16), rounding to nearest even: add 0x7FFF plus the lowest kept bit,
    keep the top half. A NaN stays a NaN (the rounding's carry would turn some into inf or zero)."""
    xp = get_xp(x)
    u = x.view(xp.uint32)
    bits = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(xp.uint16)
    return xp.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16).astype(xp.uint16) | 0x0040, bits)


def kv_stored(kv, k, v):
    """New K/V (H_kv, T, hd) as the cache `kv` stores them: fp32 as they are, or bf16 bits."""
    return (k, v) if kv.k.dtype == np.float32 else (f32_to_bf16(k), f32_to_bf16(v))


def check_load_options(device, kv_dtype):
    """load()'s options: a one-line Phi4FlashError naming the one that is not among its choices."""
    for name, value, choices in (("device", device, ("cpu", "cuda")), ("kv_dtype", kv_dtype, tuple(KV_DTYPES))):
        if not isinstance(value, str) or value not in choices:
            raise Phi4FlashError(f"{name} {value!r}: expected {' or '.join(map(repr, choices))}")


# ----------------------------------------------------------------------------------------------
# Appendix A. The GPU: CuPy + kernels.cu
#
# load(path, device="cuda") copies the weights to the GPU (bf16 matrices stay bf16 bits, uint16,
# since CuPy has no bf16 dtype; everything else float32) and sets model.device = "cuda", so that
# Model.run calls cuda_extend instead of extend. cuda_extend is the same layer loop: a decode step
# (one token, last logits) goes to cuda_decode, which reads every position-dependent index from
# device memory so that a CUDA graph can replay it; anything else goes to cuda_layers, extend()
# with Mamba's conv + scan, the attention and the bf16 products on kernels.cu.
#
# Each kernel of kernels.cu has a NumPy twin here, in kernels.cu's order and under its number, with
# the same name and parameter list, computing the same thing with the same tiling and state layout
# into the same output arrays; its launcher follows it. `_launch` runs the kernel on CuPy arrays
# and the twin on NumPy arrays, so every function of this appendix also runs on the CPU, where the
# tests compare it with the model's own functions. The constants below mirror kernels.cu's
# #defines (a test checks they agree).

# The kernels a decode step launches after its first one (the embedding row, which follows the graph's
# copy-in node, not a kernel): they keep kernels.cu's rules for programmatic dependent launch, and
# _launch gives them its attribute (wherever they are launched: the rules make that safe anywhere).
PDL_KERNELS = frozenset({"layer_norm_rows", "scan_step", "attention_decode_f32", "attention_decode_bf16",
                         *(f"gemv_{w}{e}" for w in ("bf16", "f32", "int8") for e in ("", "_qkv", "_qkv16", "_conv", "_norm"))})
CUDA_PREFILL_CHUNK = 4096  # prompt tokens per cuda_layers(): each chunk widens the bf16 weights once
KERNELS_CU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cu")
CUDA_GRAPHS = os.environ.get("PHI4FLASH_CUDA_GRAPHS", "1") != "0"  # replay the decode step as a CUDA graph

MAX_D_CONV = 8            # conv1d_silu_step keeps the conv window in registers
SCAN_CHANNELS = 32        # channels per scan block; a block is SCAN_CHANNELS * d_state threads
PREFILL_THREADS = 256
PREFILL_VECTORS = 64      # query vectors per attention_prefill block: 64 / (2G) rows x 2G heads
PREFILL_KEYS = 16         # keys per attention_prefill tile
MAX_HEAD_DIM = 64
DECODE_THREADS = 128
DECODE_KEYS = 16          # keys per attention_decode tile: a thread per (query, key) of 8 queries
DECODE_MAX_QUERIES = 8    # 2G query heads per KV group
DECODE_MAX_SPLITS = 256   # splits per KV group the merge's weights have room for
DECODE_BLOCKS_PER_SM = 4  # attention_decode blocks per SM that decode_splits aims at (one wave)
CPU_SMS = 4               # the SM count the CPU path (NumPy arrays) stands in with; tests vary it
GEMV_WARPS = 8            # warps per gemv block: 8 / splits output features
GEMV_MAX_ROWS = 8         # more rows than this go to the widened-tile cuBLAS path
GEMV_PLAIN, GEMV_RESIDUAL, GEMV_SWIGLU, GEMV_GATE = 0, 1, 2, 3  # gemv epilogues (kernel 7)
KV_SLOT_PAST_END = 1      # the decode step's error flag: a K/V slot past the end of its buffer (kv_store)
NORM_THREADS = 256        # threads per layer_norm_rows block (one row each)
NORM_PER_THREAD = 16      # features per layer_norm_rows thread, in registers: hidden_size <= 4096


def require_cupy():
    """The cupy module, or a one-line Phi4FlashError saying why the GPU path cannot run here."""
    try:
        import cupy
    except ImportError:
        raise Phi4FlashError("device 'cuda': CuPy is not installed (pip install cupy-cuda13x, "
                             "or cupy-cuda12x for CUDA 12)") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, or one older than CuPy's CUDA
        raise Phi4FlashError(f"device 'cuda': no usable CUDA device ({(str(e) or type(e).__name__).splitlines()[0]})") from None
    if count < 1:
        raise Phi4FlashError("device 'cuda': no CUDA device is visible")
    if not os.path.isfile(KERNELS_CU):
        raise Phi4FlashError(f"device 'cuda': {KERNELS_CU} is missing; install from a clone with: pip install -e .")
    return cupy


def check_cuda_config(cfg):
    """kernels.cu's shape limits, checked once at load time rather than deep inside a kernel."""
    hd, H, H_kv, N = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.mamba_d_state
    if hd not in (8, 16, 32, 64):
        problem = f"head_dim {hd} is not a power of two in [8, {MAX_HEAD_DIM}]"
    elif not H_kv or H % H_kv or H_kv % 2 or 64 % (2 * (H // H_kv)) or 2 * (H // H_kv) > DECODE_MAX_QUERIES:
        problem = (f"{H} query / {H_kv} KV heads: need H_kv even, G = H/H_kv with 2G dividing 64 "
                   f"and 2G <= {DECODE_MAX_QUERIES}")
    elif N not in (1, 2, 4, 8, 16, 32):
        problem = f"mamba_d_state {N} is not a power of two <= 32"
    elif cfg.mamba_d_conv > MAX_D_CONV:
        problem = f"mamba_d_conv {cfg.mamba_d_conv} > {MAX_D_CONV}"
    elif cfg.hidden_size > NORM_THREADS * NORM_PER_THREAD:
        problem = f"hidden_size {cfg.hidden_size} > {NORM_THREADS * NORM_PER_THREAD}"
    else:
        return
    raise Phi4FlashError(f"device 'cuda': kernels.cu does not support this config: {problem}")


def to_device(model):
    """Copy every weight to the GPU: bf16 bits stay uint16, int8 groups stay int8 with their float32
    scales (an Int8Weight of CuPy arrays), float32 stays float32."""
    cupy = require_cupy()
    check_cuda_config(model.config)
    def copy(a):
        return Int8Weight(cupy.asarray(a.q), cupy.asarray(a.scales)) if isinstance(a, Int8Weight) else cupy.asarray(a)
    model.embed_tokens = copy(model.embed_tokens)
    model.final_layernorm = {k: copy(a) for k, a in model.final_layernorm.items()}
    model.layers = [{group: {k: copy(a) for k, a in params.items()} for group, params in layer.items()}
                    for layer in model.layers]
    model.device, model.prefill_chunk = "cuda", CUDA_PREFILL_CHUNK
    return fuse_for_decode(model)


_module = None


def _kernel(name):
    """Kernel `name` of kernels.cu, compiled once by NVRTC for the current GPU (PHI4FLASH_PDL_PREFETCH=0:
    without the GEMVs' L2 prefetch, to measure it)."""
    global _module
    if _module is None:
        import cupy
        with open(KERNELS_CU) as f:
            prefetch = () if os.environ.get("PHI4FLASH_PDL_PREFETCH", "1") != "0" else ("-DPDL_PREFETCH=0",)
            _module = cupy.RawModule(code=f.read(), options=("-std=c++17", "-ftz=true", *prefetch))
    return _module.get_function(name)


def _launch(twin, grid, block, args):
    """Run kernels.cu's kernel named like `twin` on CuPy arrays, or the NumPy `twin` itself on NumPy
    arrays. Scalars must be np.int32 / np.int64 / np.float32, as the kernel's C parameters. A kernel
    of PDL_KERNELS goes with programmatic dependent launch where it can (_pdl_driver)."""
    if get_xp(args[0]) is np:
        twin(*args)
    elif twin.__name__ in PDL_KERNELS and _pdl_driver() is not None:
        _launch_pdl(_pdl_driver(), _kernel(twin.__name__), grid, block, args)
    else:
        _kernel(twin.__name__)(grid, block, args)


# Programmatic dependent launch (kernels.cu, "Programmatic dependent launch", states the rules its
# kernels keep). CuPy launches with cuLaunchKernel, which takes no launch attributes; the attribute
# that lets a kernel start while its predecessor still runs needs cuLaunchKernelEx, which NVIDIA's
# cuda-bindings expose (installed with the cuda12 / cuda13 extras, optional like CuPy itself). In a
# CUDA graph the launches become programmatic edges. PHI4FLASH_PDL=0 turns it off.
PDL = os.environ.get("PHI4FLASH_PDL", "1") != "0"
_pdl = None               # [cuda.bindings' driver module, or None when PDL is off here], once decided


def _pdl_driver():
    """cuda.bindings' driver module when kernels go with PDL, else None; the first call decides, and
    says on stderr why not when it cannot (no cuda-bindings, a GPU below sm_90)."""
    global _pdl
    if _pdl is None:
        driver, why = None, None
        if PDL:
            try:
                from cuda.bindings import driver
            except ImportError:
                why = "cuda-bindings is not installed (pip install cuda-bindings, or the cuda12 / cuda13 extra)"
            else:
                import cupy
                arch = int(cupy.cuda.Device().compute_capability)    # e.g. 90 for sm_90
                why = f"the GPU is sm_{arch}, and it needs sm_90 or newer" if arch < 90 else None
        if why:
            print(f"phi4flash: kernels launch without programmatic dependent launch: {why}", file=sys.stderr)
        _pdl = [driver if PDL and not why else None]
    return _pdl[0]


def pdl_off(reason):
    """Launch plainly from now on (a CUDA graph refused the PDL launches): one stderr line says why."""
    global _pdl
    if _pdl is not None and _pdl[0] is not None:
        print(f"phi4flash: kernels launch without programmatic dependent launch from now on: {reason}", file=sys.stderr)
    _pdl = [None]


def _c_value(a):
    """A kernel argument as the C value cuLaunchKernelEx copies: a device pointer for a CuPy array,
    else the scalar with the width of its C type (np.int32 -> int, np.int64 -> long long, np.float32 -> float)."""
    if hasattr(a, "data") and hasattr(a.data, "ptr"):
        return ctypes.c_void_p(a.data.ptr)
    return {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.float32: ctypes.c_float}[type(a)](a.item())


def _launch_pdl(driver, kernel, grid, block, args):
    """kernel(grid, block, args) on the current CuPy stream, as CuPy would launch it, plus the
    programmatic-stream-serialization attribute: the kernel may begin while the one before it ends."""
    import cupy
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = (tuple(grid) + (1, 1))[:3]
    config.blockDimX, config.blockDimY, config.blockDimZ = (tuple(block) + (1, 1))[:3]
    config.sharedMemBytes = 0
    config.hStream = driver.CUstream(cupy.cuda.get_current_stream().ptr)
    attribute = driver.CUlaunchAttribute()
    attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attribute.value.programmaticStreamSerializationAllowed = 1
    config.attrs, config.numAttrs = [attribute], 1
    values = [_c_value(a) for a in args]                                  # alive until the launch has copied them
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])  # void* kernelParams[]
    error, = driver.cuLaunchKernelEx(config, driver.CUfunction(kernel.kernel.ptr), ctypes.addressof(pointers), 0)
    if error != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuLaunchKernelEx of {kernel.name}: {error!r}")


def _blocks(n, per_block):
    return (n + per_block - 1) // per_block


def _contiguous(a, dtype=np.float32):
    return get_xp(a).ascontiguousarray(a, dtype=dtype)


# --- 1a, 1b. Mamba's causal conv + SiLU

def conv1d_silu_prefill(x, conv_state, weight, bias, out, T, d_inner, d_conv):
    """Twin of kernel 1a: out = silu(bias + Σ_k weight[:, k] ⊙ xs[t+k]), xs = [conv_state; x].
    x, out (T, d_inner)."""
    xs = np.concatenate([conv_state, x])                                  # (d_conv-1+T, d_inner)
    acc = np.broadcast_to(bias, (T, d_inner)).copy()                      # (T, d_inner)
    for k in range(d_conv):                                               # the kernel's order: tap 0 first
        acc += weight[:, k] * xs[k:k + T]
    out[...] = silu(acc)


def conv1d_silu_step(x, conv_state, weight, bias, out, d_inner, d_conv):
    """Twin of kernel 1b, one token: out = silu(bias + Σ_k weight[:, k] ⊙ window[k]), then
    conv_state <- window[1:]."""
    window = np.concatenate([conv_state, x.reshape(1, d_inner)])          # (d_conv, d_inner)
    acc = bias.copy()                                                     # (d_inner,)
    for k in range(d_conv):
        acc += weight[:, k] * window[k]
    out.reshape(d_inner)[...] = silu(acc)
    conv_state[...] = window[1:]


def cuda_conv1d_silu(x, conv_state, weight, bias):
    """silu(causal_conv1d(x)) with conv_state (d_conv-1, d_inner) updated in place -> (T, d_inner)."""
    xp = get_xp(x)
    T, d_inner = x.shape
    d_conv = weight.shape[1]
    x = _contiguous(x)
    out = xp.empty((T, d_inner), xp.float32)                              # (T, d_inner)  x̂
    if T == 1:
        _launch(conv1d_silu_step, (_blocks(d_inner, 256),), (256,),
                (x, conv_state, weight, bias, out, np.int32(d_inner), np.int32(d_conv)))
        return out
    _launch(conv1d_silu_prefill, (_blocks(T * d_inner, 256),), (256,),
            (x, conv_state, weight, bias, out, np.int32(T), np.int32(d_inner), np.int32(d_conv)))
    keep = d_conv - 1                                                     # after the kernel: it reads the old state
    conv_state[...] = x[T - keep:] if T >= keep else xp.concatenate([conv_state[T:], x])
    return out


# --- 2, 3. The selective scan, with softplus, the D skip and the z gate fused

def scan_prefill(x, dt, dt_bias, A_log, B, C, D, z, ssm_state, y, y_gated, T, d_inner, d_state):
    """Twin of kernel 2: the selective scan with softplus(dt + dt_bias), the D skip and the z gate
    fused; the state h (d_inner, d_state) is updated in place. The kernel stages SCAN_CHUNK steps at
    a time in shared memory, which changes no number, so the twin simply walks the tokens."""
    A = -np.exp(A_log)                                                    # (d_inner, N)
    h = ssm_state.copy()                                                  # (d_inner, N)
    for t in range(T):
        delta = softplus(dt[t] + dt_bias)                                 # (d_inner,)
        h = np.exp(delta[:, None] * A) * h + (delta * x[t])[:, None] * B[t]
        y[t] = (h * C[t]).sum(-1) + D * x[t]
    y_gated[...] = y * silu(z)
    ssm_state[...] = h


def scan_step(x, xdbc, dt_proj, dt_bias, A_log, D, z, ssm_state, y, y_gated, d_inner, d_state, dt_rank):
    """Twin of kernel 3, one decode token, Δ's projection fused: dt = xdbc[:dt_rank]·dt_projᵀ, then
    scan_prefill's step with B, C from xdbc. x, z, y, y_gated (1, d_inner); dt_proj (d_inner, dt_rank)."""
    dt_low, B, C = xdbc.reshape(-1)[:dt_rank], xdbc.reshape(-1)[dt_rank:dt_rank + d_state], xdbc.reshape(-1)[dt_rank + d_state:]
    dt = (dt_proj @ dt_low).reshape(1, d_inner)                          # (1, d_inner)
    scan_prefill(x.reshape(1, d_inner), dt, dt_bias, A_log, B.reshape(1, d_state), C.reshape(1, d_state), D,
                 z.reshape(1, d_inner), ssm_state, y.reshape(1, d_inner), y_gated.reshape(1, d_inner), 1, d_inner, d_state)


def cuda_selective_scan(x, dt, dt_bias, A_log, B, C, D, z, ssm_state):
    """The fused scan over T >= 1 tokens (scan_prefill): -> (y pre-gate (T, d_inner), y ⊙ silu(z)
    (T, d_inner)); ssm_state updated in place."""
    xp = get_xp(x)
    T, d_inner = x.shape
    N = A_log.shape[1]
    y = xp.empty((T, d_inner), xp.float32)                                # (T, d_inner)  m at layer L/2
    y_gated = xp.empty((T, d_inner), xp.float32)                          # (T, d_inner)
    _launch(scan_prefill, (_blocks(d_inner, SCAN_CHANNELS),), (SCAN_CHANNELS * N,),
            (*[_contiguous(a) for a in (x, dt, dt_bias, A_log, B, C, D, z)], ssm_state, y, y_gated, np.int32(T),
             np.int32(d_inner), np.int32(N)))
    return y, y_gated


def cuda_mamba(u, p, conv_state, ssm_state):
    """mamba() with the conv+SiLU and the scan as kernels; the states are updated in place (their
    device addresses never change, which the decode graph relies on). -> (out (T, D), y (T, d_inner))."""
    x = cuda_linear(u, p["in_proj_x"])                                    # (T, d_inner)
    z = cuda_linear(u, p["in_proj_z"])                                    # (T, d_inner)
    x = cuda_conv1d_silu(x, conv_state, p["conv1d_weight"], p["conv1d_bias"])  # (T, d_inner)  x̂
    dt = cuda_linear(cuda_linear(x, p["x_proj_dt"]), p["dt_proj"])        # (T, d_inner); the bias is added in the scan
    B = cuda_linear(x, p["x_proj_B"])                                     # (T, N)
    C = cuda_linear(x, p["x_proj_C"])                                     # (T, N)
    y, y_gated = cuda_selective_scan(x, dt, p["dt_proj_bias"], p["A_log"], B, C, p["D"], z, ssm_state)
    return cuda_linear(y_gated, p["out_proj"]), y                         # (T, D), (T, d_inner)


# --- 4, 5a, 5b. Differential attention: tiled prefill; split-K decode, merged by the last block of each group

def _visible(kpos, qpos, window):
    """(..., S) key positions vs (..., 1) query positions -> True where the query sees the key."""
    return (kpos >= 0) & (kpos <= qpos) & ((window == 0) | (kpos > qpos - window))


def _online_softmax_update(m, l, acc, scores, vt):
    """One key tile of the online softmax: running max m and sum l (...,), accumulator acc (..., 2hd),
    scores (..., keys) with -inf where masked, values vt (keys, 2hd). Rows with nothing visible
    yet keep m = -inf, l = 0, acc = 0, as in the kernels."""
    m_new = np.maximum(m, scores.max(-1))                                 # (...,)
    live = m_new > -np.inf
    m_safe = np.where(live, m_new, 0.0).astype(np.float32)
    rescale = np.where(live, np.exp(m - m_safe), 1.0).astype(np.float32)  # exp(-inf) = 0 on a first visible tile
    p = np.exp(scores - m_safe[..., None])                                # (..., keys), 0 where masked
    return m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + p @ vt


def _differential_combine(a1, a2, lam, subln, lambda_init, eps):
    """RMSNorm(A1 − λ A2) ⊙ subln · (1 − λ_init) over the last axis (2hd)."""
    d = a1 - lam * a2
    return d / np.sqrt((d * d).mean(-1, keepdims=True) + eps) * subln * (1.0 - lambda_init)


def attention_prefill_f32(q, k, v, qpos, kpos, lambda_, subln, out, T, S, H, H_kv, head_dim, kv_head_stride,
                          window, lambda_init, eps):
    """Twin of kernel 4: tiled differential attention with an online softmax, the kernel's tiles
    exactly: per KV group g and block of BQ = 64 / (2G) query rows, the keys [lo, hi) the rows can
    see (binary search on the ascending kpos), walked PREFILL_KEYS at a time. (NumPy views carry
    their own strides, so kv_head_stride is only the kernel's.) q (H, T, hd); k, v (H_kv, S, hd)
    -> out (T, H·hd)."""
    G, hd = H // H_kv, head_dim
    rows = PREFILL_VECTORS // (2 * G)
    scale = np.float32(1.0 / math.sqrt(hd))
    lam = lambda_.reshape(-1)[0]
    for g in range(H_kv // 2):
        heads = [[2 * (g * G + r) + s for r in range(G)] for s in (0, 1)]  # stripe s, GQA index r
        vg = np.concatenate([v[2 * g], v[2 * g + 1]], axis=-1)            # (S, 2hd)  [v1 ‖ v2]
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            qb = q[np.array(heads), t0:t1]                                # (2, G, t1-t0, hd)
            qp = qpos[t0:t1, None]                                        # (t1-t0, 1)
            lo = int(np.searchsorted(kpos, qpos[t0] - window + 1)) if window else 0
            hi = int(np.searchsorted(kpos, qpos[t1 - 1], side="right"))
            m = np.full((2, G, t1 - t0), -np.inf, np.float32)
            l = np.zeros((2, G, t1 - t0), np.float32)
            acc = np.zeros((2, G, t1 - t0, 2 * hd), np.float32)
            for k0 in range(lo, hi, PREFILL_KEYS):
                k1 = min(hi, k0 + PREFILL_KEYS)
                kt = k[[2 * g, 2 * g + 1], k0:k1]                         # (2, k1-k0, hd) K of stripe 1, 2
                scores = (qb @ kt[:, None].swapaxes(-1, -2)) * scale      # (2, G, t1-t0, k1-k0)
                scores = np.where(_visible(kpos[k0:k1], qp, window), scores, -np.inf)
                m, l, acc = _online_softmax_update(m, l, acc, scores, vg[k0:k1])
            a = np.where(l[..., None] > 0, acc / np.maximum(l, 1e-30)[..., None], 0.0)  # (2, G, t1-t0, 2hd)
            o = _differential_combine(a[0], a[1], lam, subln, lambda_init, eps)  # (G, t1-t0, 2hd)
            out[t0:t1, g * G * 2 * hd:(g + 1) * G * 2 * hd] = o.transpose(1, 0, 2).reshape(t1 - t0, -1)


def attention_prefill_bf16(q, k, v, qpos, kpos, lambda_, subln, out, T, S, H, H_kv, head_dim, kv_head_stride,
                           window, lambda_init, eps):
    """Twin of kernel 4 over a bf16 K/V cache: the bits widened (exact), then attention_prefill_f32."""
    attention_prefill_f32(q, bf16_to_f32(k), bf16_to_f32(v), qpos, kpos, lambda_, subln, out, T, S, H, H_kv,
                          head_dim, kv_head_stride, window, lambda_init, eps)


def attention_decode_f32(q, k, v, qpos, kpos, lambda_, subln, partial_acc, partial_m, partial_l, splits_done, out,
                         S, H, H_kv, head_dim, kv_head_stride, window, n_splits, lambda_init, eps):
    """Twin of kernel 5a: one query token over the live slots [0, min(qpos + 1, S)) (every key it
    sees lies there: a slot holds a position >= its index), cut into n_splits equal runs of whole
    DECODE_KEYS tiles (keys_per_split); each split's online softmax over its tiles goes to its
    partials, and when the last split of KV group g has counted itself in, the group is merged
    (attention_decode_merge) and splits_done[g] goes back to 0. The kernel's blocks run in any
    order; the merge reads the partials in split order, so the order changes nothing.
    q (H, hd); k, v (H_kv, S, hd); kpos (S,) any order -> out (1, H·hd); partial_m, partial_l
    (n_splits, H), partial_acc (n_splits, H, 2hd); splits_done (H_kv / 2,)."""
    G, hd = H // H_kv, head_dim
    scale = np.float32(1.0 / math.sqrt(hd))
    query_pos = int(qpos.reshape(-1)[0])
    live = min(S, query_pos + 1)
    keys = keys_per_split(live, n_splits)
    for g in range(H_kv // 2):
        heads = np.array([2 * (g * G + qi % G) + qi // G for qi in range(2 * G)])  # local qi = s·G + r
        stripe = np.arange(2 * G) // G                                    # (2G,) which K head each uses
        vg = np.concatenate([v[2 * g, :live], v[2 * g + 1, :live]], axis=-1)  # (live, 2hd)
        for split in range(n_splits):
            m = np.full(2 * G, -np.inf, np.float32)
            l = np.zeros(2 * G, np.float32)
            acc = np.zeros((2 * G, 2 * hd), np.float32)
            begin = min(live, split * keys)
            end = min(live, begin + keys)                                 # begin == end: an empty split
            for k0 in range(begin, end, DECODE_KEYS):
                k1 = min(end, k0 + DECODE_KEYS)
                kt = k[2 * g + stripe, k0:k1]                             # (2G, k1-k0, hd)
                scores = (kt @ q[heads][:, :, None])[..., 0] * scale      # (2G, k1-k0)
                scores = np.where(_visible(kpos[k0:k1], query_pos, window), scores, -np.inf)
                m, l, acc = _online_softmax_update(m, l, acc, scores, vg[k0:k1])
            partial_m[split, heads], partial_l[split, heads], partial_acc[split, heads] = m, l, acc
            splits_done[g] += 1                                           # this block counts itself in
            if splits_done[g] == n_splits:                                # the last one merges the group
                attention_decode_merge(partial_acc, partial_m, partial_l, lambda_, subln, out, g, H, H_kv, head_dim,
                                       n_splits, lambda_init, eps)
                splits_done[g] = 0


def attention_decode_bf16(q, k, v, qpos, kpos, lambda_, subln, partial_acc, partial_m, partial_l, splits_done, out,
                          S, H, H_kv, head_dim, kv_head_stride, window, n_splits, lambda_init, eps):
    """Twin of kernel 5a over a bf16 K/V cache: the bits widened (exact), then attention_decode_f32."""
    attention_decode_f32(q, bf16_to_f32(k), bf16_to_f32(v), qpos, kpos, lambda_, subln, partial_acc, partial_m,
                         partial_l, splits_done, out, S, H, H_kv, head_dim, kv_head_stride, window, n_splits,
                         lambda_init, eps)


def attention_decode_merge(partial_acc, partial_m, partial_l, lambda_, subln, out, g, H, H_kv, head_dim, n_splits,
                           lambda_init, eps):
    """Twin of 5b, the merge kernel 5a's last block of KV group g runs: over the group's 2G query
    heads, M = max m over the splits that saw a key (l > 0), w = e^(m − M), L = Σ l w,
    a = Σ w acc / L; then pair r of the group (heads 2j, 2j+1, j = gG + r) -> out features
    [j·2hd, (j+1)·2hd)."""
    G = H // H_kv
    heads = [2 * (g * G + qi % G) + qi // G for qi in range(2 * G)]      # qi = s·G + r
    m, l = partial_m[:n_splits, heads], partial_l[:n_splits, heads]       # (n_splits, 2G)
    seen = l > 0
    M = np.where(seen, m, -np.inf).max(0)                                 # (2G,)
    w = np.where(seen, np.exp(np.where(seen, m, 0.0) - np.where(seen, M, 0.0)), 0.0).astype(np.float32)  # (n_splits, 2G)
    L = (l * w).sum(0)                                                    # (2G,)
    a = (partial_acc[:n_splits, heads] * w[..., None]).sum(0) / np.where(L > 0, L, 1.0)[:, None]  # (2G, 2hd)
    o = _differential_combine(a[:G], a[G:], lambda_.reshape(-1)[0], subln, lambda_init, eps)  # (G, 2hd)
    out.reshape(-1)[g * G * 2 * head_dim:(g + 1) * G * 2 * head_dim] = o.reshape(-1)


def _kv_views(k, v):
    """K/V as the kernels read them: float32, or the cache's bf16 bits as they are; rows of hd
    contiguous values, heads kv_head_stride values apart (so a prefix view of the shared buffer is
    passed without a copy) -> (k, v, kv_head_stride)."""
    xp = get_xp(k)
    dtype = np.uint16 if k.dtype == v.dtype == np.uint16 else np.float32  # bits stay bits
    size, hd = np.dtype(dtype).itemsize, k.shape[2]
    if k.dtype != dtype or v.dtype != dtype or k.strides[1:] != (size * hd, size) or v.strides != k.strides:
        k, v = (xp.ascontiguousarray(a if dtype == np.uint16 else f32(a), dtype) for a in (k, v))
    return k, v, k.strides[0] // size


def cuda_prefill_attention(q, k, v, qpos, kpos, window, lam, lambda_init, subln, eps=1e-5):
    """attention_prefill over T > 1 query rows; kpos must be ascending (true for every multi-token
    call: keys come in time order). q (H, T, hd); k, v (H_kv, S, hd) float32 or bf16 bits; lam (1,)
    -> (T, H·hd)."""
    xp = get_xp(q)
    H, T, hd = q.shape
    H_kv, S, _ = k.shape
    k, v, stride = _kv_views(k, v)
    out = xp.empty((T, H * hd), xp.float32)                               # (T, H·hd)
    rows = PREFILL_VECTORS // (2 * (H // H_kv))
    _launch(attention_prefill_bf16 if k.dtype == np.uint16 else attention_prefill_f32,
            (_blocks(T, rows), H_kv // 2), (PREFILL_THREADS,),
            (_contiguous(q), k, v, _contiguous(qpos, np.int64), _contiguous(kpos, np.int64), lam,
             subln, out, np.int32(T), np.int32(S), np.int32(H), np.int32(H_kv), np.int32(hd),
             np.int64(stride), np.int32(window or 0), np.float32(lambda_init), np.float32(eps)))
    return out


def cuda_decode_attention(q, k, v, qpos, kpos, window, lam, lambda_init, subln, eps=1e-5, out=None, scratch=None,
                          sms=None):
    """Differential attention of ONE query token over the live slots of a cache, in one launch:
    attention_decode, split across blocks and merged by the last block of each KV group.
    q (H, hd); k, v (H_kv, S, hd) float32 or bf16 bits; qpos (1,) int64 on the device; kpos (S,)
    -1 = empty; lam (1,) -> (1, H·hd), into `out` when given. scratch: (partial_m, partial_l,
    partial_acc, splits_done) with room for the splits (the decode step's, so that it allocates
    nothing), else made here. sms: the SM count the splits are chosen for (this GPU's by default)."""
    xp = get_xp(q)
    H, hd = q.shape
    H_kv, S, _ = k.shape
    k, v, stride = _kv_views(k, v)
    n_splits = decode_splits(S, H_kv, device_sms(xp) if sms is None else sms)
    partial_m, partial_l, partial_acc, splits_done = scratch or decode_scratch(H, H_kv, hd, n_splits, xp)
    out = xp.empty((1, H * hd), xp.float32) if out is None else out       # (1, H·hd)
    _launch(attention_decode_bf16 if k.dtype == np.uint16 else attention_decode_f32,
            (n_splits, H_kv // 2), (DECODE_THREADS,),
            (_contiguous(q), k, v, _contiguous(qpos, np.int64), _contiguous(kpos, np.int64), lam, subln,
             partial_acc[:n_splits], partial_m[:n_splits], partial_l[:n_splits], splits_done, out, np.int32(S),
             np.int32(H), np.int32(H_kv), np.int32(hd), np.int64(stride), np.int32(window or 0), np.int32(n_splits),
             np.float32(lambda_init), np.float32(eps)))
    return out


def decode_scratch(H, H_kv, hd, n_splits, xp):
    """attention_decode's scratch for n_splits splits: its partials, and the split counters of the
    KV groups, 0 (each launch leaves them 0)."""
    return (xp.zeros((n_splits, H), xp.float32),                          # partial_m (n_splits, H)
            xp.zeros((n_splits, H), xp.float32),                          # partial_l (n_splits, H)
            xp.zeros((n_splits, H, 2 * hd), xp.float32),                  # partial_acc (n_splits, H, 2hd)
            xp.zeros(H_kv // 2, xp.int32))                                # splits_done (H_kv / 2,)


def decode_splits(S, H_kv, sms):
    """Splits per KV group of attention_decode over a cache of S slots: DECODE_BLOCKS_PER_SM blocks
    per SM over the H_kv / 2 groups, at most one per tile the cache holds and DECODE_MAX_SPLITS.
    It follows the cache's size, not its length: the grid of a captured graph stays right while
    the cache fills, and the kernel divides the live keys among the splits at run time."""
    return max(1, min(_blocks(DECODE_BLOCKS_PER_SM * sms, H_kv // 2), _blocks(S, DECODE_KEYS), DECODE_MAX_SPLITS))


def keys_per_split(live, n_splits):
    """Keys per split of attention_decode over `live` slots: an equal share of whole tiles."""
    return _blocks(_blocks(live, DECODE_KEYS), n_splits) * DECODE_KEYS


_sms = {}


def device_sms(xp):
    """Streaming multiprocessors of the current GPU (queried once), or CPU_SMS for NumPy arrays."""
    if xp is np:
        return CPU_SMS
    device = xp.cuda.Device().id
    if device not in _sms:
        _sms[device] = int(xp.cuda.runtime.getDeviceProperties(device)["multiProcessorCount"])
    return _sms[device]


def cuda_attend(q, k, v, qpos, kpos, window, lam, lambda_init, subln):
    """attend() on kernels: one query row -> attention_decode; more -> attention_prefill.
    q (H, T, hd); k, v (H_kv, S, hd) float32 or bf16 bits; qpos (T,), kpos (S,); lam (1,) on the
    device -> (T, H·hd)."""
    H, T, hd = q.shape
    lam = get_xp(q).asarray(lam, np.float32).reshape(1)                   # a no-op for the model's own (1,) arrays
    if T == 1:
        return cuda_decode_attention(q.reshape(H, hd), k, v, qpos, kpos, window, lam, lambda_init, subln)
    return cuda_prefill_attention(q, k, v, qpos, kpos, window, lam, lambda_init, subln)


# --- 6. kv_store: one decode token's K/V into its cache slot (the Wqkv GEMV's epilogue)

def kv_store(kv, k_cache, v_cache, kpos, pos, error, slots, window):
    """Twin of kernels.cu's kv_store for all of [k | v] (2, H_kv, hd) at once: slot pos % W (ring) or
    pos (append buffer), kpos[slot] = pos, the K/V as float32 or bf16 bits (f32_to_bf16, as the CPU
    path stores them). A slot past the buffer stores nothing and sets error[0] = KV_SLOT_PAST_END."""
    p = int(pos.reshape(-1)[0])
    slot = p % window if window else p
    if slot >= slots:
        error[0] = KV_SLOT_PAST_END
        return
    k, v = kv if k_cache.dtype == np.float32 else f32_to_bf16(np.ascontiguousarray(kv))  # (H_kv, hd) each
    k_cache[:, slot], v_cache[:, slot], kpos[slot] = k, v, p


def check_step_error(cache, step, flag):
    """A decode step's device error flag, read after its synchronisation: nothing when 0, else the
    flag is cleared and the step's failure is one Phi4FlashError line (only a bug gets here: the host
    grows the shared K/V before each step)."""
    if not flag:
        return
    step.buf["error"].fill(0)
    p = cache.length
    short = [f"layer {i}'s has {kv.k.shape[1]} slots" for i, kv in sorted(cache.kv.items())
             if (p % kv.window if kv.window else p) >= kv.k.shape[1]]
    where = ", ".join(short) or "a buffer too short"
    raise Phi4FlashError(f"decode step at position {p}: no K/V slot for it ({where}); its K/V were not stored, "
                         "so this cache cannot be used further")


# --- 7. The GEMVs: the products of a decode step, with their epilogues; bf16, float32 or int8 weights

def gemv_f32(x, W, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits):
    """Twin of kernel 7 (float32 W): acc = x·Wᵀ in fp32, then the epilogue of `mode`: GEMV_PLAIN acc
    (+ bias), GEMV_RESIDUAL aux + (acc (+ bias)), GEMV_SWIGLU silu(acc[:, :out]) ⊙ acc[:, out:]
    (W = [gate; up]), GEMV_GATE silu(acc) ⊙ aux. The kernel's split-K and lane order change only the
    summation order. x (rows, in) -> y (rows, out). The other formats widen W and call this."""
    acc = x.reshape(rows, in_features) @ W.T                              # (rows, out) or (rows, 2·out)
    if mode == GEMV_SWIGLU:
        out = silu(acc[:, :out_features]) * acc[:, out_features:]
    elif mode == GEMV_GATE:
        out = silu(acc) * aux.reshape(rows, out_features)
    else:
        out = acc + bias if has_bias else acc
        if mode == GEMV_RESIDUAL:
            out = aux.reshape(rows, out_features) + out
    y.reshape(rows, out_features)[...] = out


def gemv_bf16(x, W, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits):
    """Twin of kernel 7 with bf16 bits W (widened exactly); see gemv_f32."""
    gemv_f32(x, bf16_to_f32(W), bias, aux, y, rows, out_features, in_features, mode, has_bias, splits)


def gemv_int8(x, W, scales, bias, aux, y, rows, out_features, in_features, mode, has_bias, splits):
    """Twin of kernel 7 with int8 groups W and their scales (w = q · s); see gemv_f32. The kernel
    scales a lane's sum of 16 products once, (Σ x·q)·s: only the rounding differs."""
    gemv_f32(x, dequantize_int8(W, scales), bias, aux, y, rows, out_features, in_features, mode, has_bias, splits)


# The decode step's fused instances (one row). Each is written once over fp32 W; the bf16 and int8
# twins below it are the same over W widened (bits << 16) or dequantised (q · s).

def gemv_f32_qkv(x, W, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits, q_features,
                 head_dim, slots, window):
    """Twin of kernel 7's Wqkv instance (one row): y = x·Wᵀ + bias = [q | k | v], and [k | v] stored
    into the layer's cache at the step's slot (kv_store)."""
    gemv_f32(x, W, bias, y, y, 1, out_features, in_features, GEMV_PLAIN, 1, splits)
    kv = y.reshape(-1)[q_features:].reshape(2, -1, head_dim)             # (2, H_kv, hd)  [k | v]
    kv_store(kv, k_cache, v_cache, kpos, pos, error, slots, window)


def gemv_f32_qkv16(x, W, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits, q_features,
                   head_dim, slots, window):
    """gemv_f32_qkv into a cache of bf16 bits."""
    gemv_f32_qkv(x, W, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits, q_features,
                 head_dim, slots, window)


def gemv_bf16_qkv(x, W, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits, q_features,
                  head_dim, slots, window):
    gemv_f32_qkv(x, bf16_to_f32(W), bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits,
                 q_features, head_dim, slots, window)


def gemv_bf16_qkv16(x, W, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits,
                    q_features, head_dim, slots, window):
    gemv_f32_qkv(x, bf16_to_f32(W), bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits,
                 q_features, head_dim, slots, window)


def gemv_int8_qkv(x, W, scales, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits,
                  q_features, head_dim, slots, window):
    gemv_f32_qkv(x, dequantize_int8(W, scales), bias, y, k_cache, v_cache, kpos, pos, error, out_features,
                 in_features, splits, q_features, head_dim, slots, window)


def gemv_int8_qkv16(x, W, scales, bias, y, k_cache, v_cache, kpos, pos, error, out_features, in_features, splits,
                    q_features, head_dim, slots, window):
    gemv_f32_qkv(x, dequantize_int8(W, scales), bias, y, k_cache, v_cache, kpos, pos, error, out_features,
                 in_features, splits, q_features, head_dim, slots, window)


def gemv_f32_conv(x, W, y, conv_state, conv_weight, conv_bias, out_features, in_features, splits, d_conv):
    """Twin of kernel 7's in_proj instance (one row): [x | z] = x·Wᵀ, then the new raw x through
    conv1d_silu_step (conv_state shifted): y = [x̂ | z]."""
    gemv_f32(x, W, y, y, y, 1, out_features, in_features, GEMV_PLAIN, 0, splits)
    d_inner = out_features // 2
    x_new = y[:, :d_inner].copy()                                         # (1, d_inner) raw x
    conv1d_silu_step(x_new, conv_state, conv_weight, conv_bias, y[:, :d_inner], d_inner, d_conv)


def gemv_bf16_conv(x, W, y, conv_state, conv_weight, conv_bias, out_features, in_features, splits, d_conv):
    gemv_f32_conv(x, bf16_to_f32(W), y, conv_state, conv_weight, conv_bias, out_features, in_features, splits, d_conv)


def gemv_int8_conv(x, W, scales, y, conv_state, conv_weight, conv_bias, out_features, in_features, splits, d_conv):
    gemv_f32_conv(x, dequantize_int8(W, scales), y, conv_state, conv_weight, conv_bias, out_features, in_features,
                  splits, d_conv)


def gemv_f32_norm(x, W, bias, hidden, norm_weight, norm_bias, normed, counter, out_features, in_features, has_bias,
                  splits, eps):
    """Twin of kernel 7's residual + LayerNorm instance (one row): hidden += x·Wᵀ (+ bias), then
    normed = LayerNorm(hidden) (layer_norm_rows: the kernel's last block runs its code); the block
    counter is back at 0 when the kernel ends."""
    gemv_f32(x, W, bias, hidden, hidden, 1, out_features, in_features, GEMV_RESIDUAL, has_bias, splits)
    layer_norm_rows(hidden, norm_weight, norm_bias, normed, out_features, eps)


def gemv_bf16_norm(x, W, bias, hidden, norm_weight, norm_bias, normed, counter, out_features, in_features, has_bias,
                   splits, eps):
    gemv_f32_norm(x, bf16_to_f32(W), bias, hidden, norm_weight, norm_bias, normed, counter, out_features, in_features,
                  has_bias, splits, eps)


def gemv_int8_norm(x, W, scales, bias, hidden, norm_weight, norm_bias, normed, counter, out_features, in_features,
                   has_bias, splits, eps):
    gemv_f32_norm(x, dequantize_int8(W, scales), bias, hidden, norm_weight, norm_bias, normed, counter, out_features,
                  in_features, has_bias, splits, eps)


GEMV_INSTANCES = {(fmt, epilogue): globals()[f"gemv_{fmt}{epilogue}"]  # kernel 7's instance: weight format, epilogue
                  for fmt in ("bf16", "f32", "int8") for epilogue in ("", "_qkv", "_qkv16", "_conv", "_norm")}


def gemv_splits(out_features, in_features, vec=8):
    """Warps per output feature: enough outputs x splits for every SM to have warps in flight, yet
    at least one vector step per warp (32 lanes x `vec` weights: 8 for bf16 and fp32, 16 for int8)."""
    splits = 1
    while splits < GEMV_WARPS and out_features * splits < 8192 and in_features >= 2 * 32 * vec * splits:
        splits *= 2
    return splits


def gemv_launch(W, epilogue, out_features, in_features):
    """How kernel 7 multiplies by W: (its instance for W's format and the epilogue, grid, block,
    splits, W's pointer arguments: the bf16 bits or float32 matrix, or an int8 matrix's q and scales)."""
    int8 = isinstance(W, Int8Weight)
    fmt = "int8" if int8 else "bf16" if W.dtype == np.uint16 else "f32"
    splits = gemv_splits(out_features, in_features, 16 if int8 else 8)
    return (GEMV_INSTANCES[fmt, epilogue], (_blocks(out_features, GEMV_WARPS // splits),), (GEMV_WARPS * 32,),
            np.int32(splits), (W.q, W.scales) if int8 else (W,))


def cuda_gemv(x, W, y, mode=GEMV_PLAIN, bias=None, aux=None, out_features=None):
    """Launch kernel 7 into y (rows, out) with epilogue `mode`. bias and aux may be None (then y itself
    stands in for the unused pointer: the kernel does not read it)."""
    rows, in_features = x.shape
    out_features = out_features or W.shape[0]
    twin, grid, block, splits, w = gemv_launch(W, "", out_features, in_features)
    _launch(twin, grid, block, (x, *w, y if bias is None else bias, y if aux is None else aux, y, np.int32(rows),
                                np.int32(out_features), np.int32(in_features), np.int32(mode),
                                np.int32(bias is not None), splits))
    return y


def cuda_gemv_qkv(x, W, bias, y, kv, step, q_features):
    """[q | k | v] = x·Wᵀ + bias into y (1, out) for the decode step, k and v also into the layer's
    cache `kv` (a KVCache: fp32 or bf16 bits) at the slot of step.pos; a slot past the buffer sets
    the step's error flag."""
    out_features, in_features = W.shape[0], x.shape[1]
    twin, grid, block, splits, w = gemv_launch(W, "_qkv" if kv.k.dtype == np.float32 else "_qkv16", out_features,
                                               in_features)
    _launch(twin, grid, block, (x, *w, bias, y, kv.k, kv.v, kv.pos, step.pos, step.buf["error"],
                                np.int32(out_features), np.int32(in_features), splits, np.int32(q_features),
                                np.int32(kv.k.shape[2]), np.int32(kv.k.shape[1]), np.int32(kv.window or 0)))
    return y


def cuda_gemv_conv(x, W, y, conv_state, conv_weight, conv_bias):
    """Mamba's in_proj for the decode step: y (1, 2·d_inner) = [x̂ | z], x̂ = the conv + SiLU of the
    new raw x with conv_state (d_conv-1, d_inner) shifted in place."""
    out_features, in_features = W.shape[0], x.shape[1]
    twin, grid, block, splits, w = gemv_launch(W, "_conv", out_features, in_features)
    _launch(twin, grid, block, (x, *w, y, conv_state, conv_weight, conv_bias, np.int32(out_features),
                                np.int32(in_features), splits, np.int32(conv_weight.shape[1])))
    return y


def cuda_gemv_norm(x, W, bias, hidden, norm, normed, step, eps):
    """hidden (1, D) += x·Wᵀ (+ bias) in place, then normed = LayerNorm(hidden) with norm's weight
    and bias, in the same launch (the decode step's residual products: out_proj, fc2)."""
    out_features, in_features = W.shape[0], x.shape[1]
    twin, grid, block, splits, w = gemv_launch(W, "_norm", out_features, in_features)
    _launch(twin, grid, block, (x, *w, hidden if bias is None else bias, hidden, norm["weight"], norm["bias"], normed,
                                step.buf["counter"], np.int32(out_features), np.int32(in_features),
                                np.int32(bias is not None), splits, np.float32(eps)))
    return normed


def cuda_linear(x, W, b=None):
    """linear() on the GPU. A few rows (decode, short chunks): kernel 7 reads each weight once, the
    roofline of a decode step. Many rows (prefill): the product is compute-bound and goes to cuBLAS,
    bf16 bits widened (int8 groups dequantised, q · s) a block of rows at a time, exactly as on the
    CPU; see matmul_t for its precision."""
    xp = get_xp(x)
    T, rows = x.shape[0], W.shape[0]
    if T <= GEMV_MAX_ROWS:
        return cuda_gemv(_contiguous(x), W, xp.empty((T, rows), xp.float32), bias=b)
    x, y = _contiguous(x), xp.empty((T, rows), xp.float32)                # (T, in), (T, out)
    step = rows if W.dtype == np.float32 else max(1, (16 << 20) // W.shape[1])  # 64 MB of fp32 per widened block
    for r in range(0, rows, step):
        matmul_t(x, f32(W[r:r + step]), y[:, r:r + step])                # an Int8Weight's rows come dequantised
    return y if b is None else y + b


CUDA_TF32 = os.environ.get("PHI4FLASH_TF32", "1") != "0"
TF32_MIN_MACS = 1 << 30   # products at least this big (a real-size prompt chunk) take TF32 tensor cores


def matmul_t(x, W, out):
    """out = x·Wᵀ in fp32, into out (a column block of a row-major (T, out) array). On the GPU a
    product of >= TF32_MIN_MACS multiply-adds runs on TF32 tensor cores (cuBLAS rounds x and W to
    10-bit mantissas, sums in fp32): bf16 weights lose nothing, x about 2^-11 of itself, and the
    logits of a real-size prompt stay within 1e-2 relative RMSE of fp32 (notes/gpu.md), at several
    times SGEMM's speed. Smaller products, the CPU, and PHI4FLASH_TF32=0 keep plain fp32.
    x (T, K) contiguous; W (N, K) contiguous; out (T, N) with unit column stride."""
    global CUDA_TF32
    xp = get_xp(x)
    T, K = x.shape
    N = W.shape[0]
    if xp is np or not CUDA_TF32 or T * K * N < TF32_MIN_MACS:
        out[...] = x @ W.T                                                # (T, N)
        return out
    from cupy.cuda import cublas, device
    try:
        handle = device.get_cublas_handle()
        cublas.setPointerMode(handle, CUBLAS_POINTER_MODE_HOST)
        one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
        # column-major: outᵀ (N, T) = W (K, N)ᵀ · xᵀ (K, T); out's rows are out.strides[0] / 4 floats apart
        cublas.gemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, one.ctypes.data, W.data.ptr, CUDA_R_32F, K,
                      x.data.ptr, CUDA_R_32F, K, zero.ctypes.data, out.data.ptr, CUDA_R_32F, out.strides[0] // 4,
                      CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT)
    except Exception as e:  # an old cuBLAS or CuPy: say so once, then plain fp32 products
        CUDA_TF32 = False
        print(f"phi4flash: TF32 products unavailable ({(str(e) or type(e).__name__).splitlines()[0]}); "
              "using fp32", file=sys.stderr)
        out[...] = x @ W.T
    return out


# cuda_runtime / cublas_api enums
CUDA_R_32F, CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_POINTER_MODE_HOST = 0, 0, 1, 0
CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT = 77, -1


# --- 8. layer_norm_rows: a LayerNorm of its own (the decode step's first; the others run in kernel 7's _norm)

def layer_norm_rows(x, weight, bias, y, D, eps):
    """Twin of kernel 8: layer_norm() of every row of x into y."""
    y[...] = layer_norm(x.reshape(-1, D), {"weight": weight, "bias": bias}, eps).reshape(y.shape)


def cuda_layer_norm(x, p, y, eps):
    """LayerNorm of x (rows, D) into y (rows, D) with p's weight and bias."""
    _launch(layer_norm_rows, (x.shape[0],), (NORM_THREADS,), (x, p["weight"], p["bias"], y, np.int32(x.shape[1]),
                                                              np.float32(eps)))
    return y


# --- 9. embed_bf16 / embed_f32 / embed_int8: the decode step's embedding row

def embed_bf16(E, token, y, D):
    """Twin of kernel 9 (bf16 bits E): y = widen(E[token[0]])."""
    y.reshape(D)[...] = bf16_to_f32(E[int(token.reshape(-1)[0])])


def embed_f32(E, token, y, D):
    """Twin of kernel 9 (float32 E): y = E[token[0]]."""
    y.reshape(D)[...] = E[int(token.reshape(-1)[0])]


def embed_int8(E, scales, token, y, D):
    """Twin of kernel 9 (int8 groups E): y = E[token[0]] · its scales, the row dequantised."""
    t = int(token.reshape(-1)[0])
    y.reshape(D)[...] = dequantize_int8(E[t], scales[t])


def cuda_embed(E, token, y):
    """y (1, D) = the embedding row of the id in token (1,), read on the device."""
    D = y.shape[-1]
    if isinstance(E, Int8Weight):
        twin, table = embed_int8, (E.q, E.scales)
    else:
        twin, table = embed_bf16 if E.dtype == np.uint16 else embed_f32, (E,)
    _launch(twin, (_blocks(D, 256),), (256,), (*table, token, y, np.int32(D)))
    return y


# --- The layer loop on the GPU

def cuda_extend(model, cache, ids, logits="last", trace=None):
    """extend() on the GPU -> host (NumPy) logits, or None: a decode step (one token, its logits, no
    trace) is cuda_decode; everything else is cuda_layers.

    Every device operation of a model runs in order on its own non-blocking stream (model_stream):
    the prefill, each decode step (its graph's launch), the growth of the shared K/V, the copies of
    the logits. A non-blocking stream does not wait for work on the legacy default stream, so a step
    there after a prefill on the caller's stream would need an event recorded after the prefill;
    on one stream, the stream's order is that event. Each call returns with the stream idle (the
    logits are on the host, or it is synchronised), so no work of the model is left running when the
    caller, or another stream reusing memory freed here, goes on."""
    decode = len(ids) == 1 and logits == "last" and trace is None
    if get_xp(model.embed_tokens) is np:  # this appendix on the CPU (the tests): the twins, no stream
        return cuda_decode(model, cache, ids) if decode else cuda_layers(model, cache, ids, logits, trace)
    with _cuda_lock:
        stream = model_stream(model)
        if cache.length == 0:  # a new cache, zeroed by new_cache() (and the weights copied by load) on the
            get_xp(model.embed_tokens).cuda.runtime.deviceSynchronize()  # caller's stream: wait for that, once
        if decode:
            return cuda_decode(model, cache, ids, stream)
        with stream:
            out = cuda_layers(model, cache, ids, logits, trace)           # (T or 1, V) on the device, or None
            if out is None:
                stream.synchronize()
                return None
            return out.get(stream)                                        # copied on this stream; get() waits for it


_streams = weakref.WeakKeyDictionary()  # model -> its stream, made at its first use on the GPU
_cuda_lock = threading.Lock()   # one thread drives the GPU at a time: a capture would record another's launches


def model_stream(model):
    """The non-blocking CUDA stream all of this model's device work runs on, in order."""
    if model not in _streams:
        _streams[model] = get_xp(model.embed_tokens).cuda.Stream(non_blocking=True)
    return _streams[model]


def _lambdas(model, xp):
    """λ of every attention layer, (1,) float32 on the device (a kernel argument: no host sync)."""
    return {i: xp.asarray(diff_lambda(model.layers[i]["attn"], lambda_init_for(i)), xp.float32).reshape(1)
            for i, kind in enumerate(model.config.layer_kinds) if kind in ("swa", "full", "cross")}


def cuda_layers(model, cache, ids, logits, trace):
    """extend(), line for line, with Mamba's conv + scan, the attention and the bf16 products on
    kernels.cu. The conv and SSM states are updated in place."""
    cfg, eps = model.config, model.config.layer_norm_eps
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    xp = get_xp(model.embed_tokens)
    T, start = len(ids), cache.length
    lam = _lambdas(model, xp)
    pos = xp.arange(start, start + T)                                     # (T,)
    hidden = f32(model.embed_tokens[xp.asarray(ids)])                     # (T, D)
    record(trace, "embed", hidden)
    memory = None
    for i, (kind, layer) in enumerate(zip(cfg.layer_kinds, model.layers)):
        if kind in ("gmu", "cross") and logits is None:
            break
        u = layer_norm(hidden, layer["input_layernorm"], eps)             # (T, D)
        if kind == "mamba":
            out, y = cuda_mamba(u, layer["mamba"], cache.conv_state[i], cache.ssm_state[i])
            if i == cfg.memory_layer:
                memory = y                                                # (T, d_inner)  m
                record(trace, "memory", memory)
        elif kind == "gmu":
            p = layer["gmu"]
            out = cuda_linear(silu(cuda_linear(u, p["in_proj"])) * memory, p["out_proj"])  # (T, D)
        else:
            p, rows = layer["attn"], slice(T - 1, T) if kind == "full" and logits != "all" else slice(None)
            if kind == "cross":
                kv = cache.shared(cfg)
                k, v, kpos = kv.k[:, :kv.length], kv.v[:, :kv.length], xp.arange(kv.length)
            else:
                kv = cache.kv[i]
                k_new = cuda_linear(u, p["Wk"], p["bk"]).reshape(T, H_kv, -1).transpose(1, 0, 2)  # (H_kv, T, hd)
                v_new = cuda_linear(u, p["Wv"], p["bv"]).reshape(T, H_kv, -1).transpose(1, 0, 2)  # (H_kv, T, hd)
                k, v, kpos = (kv_ring if kv.window else kv_append)(kv, *kv_stored(kv, k_new, v_new), start)
            q = cuda_linear(u[rows], p["Wq"], p["bq"]).reshape(-1, H, cfg.head_dim).transpose(1, 0, 2)  # (H, T_q, hd)
            o = cuda_attend(q, k, v, pos[rows], kpos, kv.window, lam[i], lambda_init_for(i), p["subln"])  # (T_q, H·hd)
            out = cuda_linear(o, p["out_proj"], p["out_proj_bias"])       # (T_q, D)
            if kind == "full":
                hidden, memory, pos = hidden[rows], memory[rows], pos[rows]
                record(trace, "shared_k", kv.k[:, :kv.length])
                record(trace, "shared_v", kv.v[:, :kv.length])
        hidden = hidden + out                                             # (T, D)
        x, p = layer_norm(hidden, layer["post_attention_layernorm"], eps), layer["mlp"]
        mlp_out = cuda_linear(silu(cuda_linear(x, p["fc1_gate"])) * cuda_linear(x, p["fc1_up"]), p["fc2"])  # (T, D)
        hidden = hidden + mlp_out
        for name, a in (("mixer_in", u), ("mixer_out", out), ("mlp_out", mlp_out), ("residual", hidden)):
            record(trace, f"layers.{i}.{name}", a)
    cache.length += T
    if logits is None:
        return None
    hidden = layer_norm(hidden, model.final_layernorm, eps)               # (T or 1, D)
    record(trace, "final_norm", hidden)
    out = cuda_linear(hidden, model.embed_tokens)                         # (T or 1, V)
    record(trace, "logits", out)
    return out


# --- The decode step: a fixed sequence of kernels.cu's kernels, every position read from device memory

def fuse_for_decode(model):
    """One matrix per product of a decode step: the converter's split projections are concatenated
    back (mamba in_proj = [x; z], x_proj = [dt; B; C]; attention Wqkv = [Wq; Wk; Wv] and bqkv;
    mlp fc1 = [gate; up]) and the split names become row views of them, so nothing is stored twice;
    dt_proj becomes float32 for the fused scan step (3.3 MB per layer). An int8 matrix's values and
    scales are concatenated alike (an Int8Weight of the whole, row views of it). Done once, by to_device."""
    xp = get_xp(model.embed_tokens)

    def rows(a, r0, r1):
        return Int8Weight(a.q[r0:r1], a.scales[r0:r1]) if isinstance(a, Int8Weight) else a[r0:r1]

    def fuse(p, whole_name, parts):
        if whole_name in p:
            return
        if isinstance(p[parts[0]], Int8Weight):
            whole = Int8Weight(xp.concatenate([p[n].q for n in parts]), xp.concatenate([p[n].scales for n in parts]))
        else:
            whole = xp.concatenate([p[n] for n in parts])                # (Σ rows, in) or (Σ rows,)
        p[whole_name], r = whole, 0
        for n in parts:
            p[n], r = rows(whole, r, r + p[n].shape[0]), r + p[n].shape[0]

    for kind, layer in zip(model.config.layer_kinds, model.layers):
        fuse(layer["mlp"], "fc1", ("fc1_gate", "fc1_up"))
        if kind == "mamba":
            p = layer["mamba"]
            fuse(p, "in_proj", ("in_proj_x", "in_proj_z"))
            fuse(p, "x_proj", ("x_proj_dt", "x_proj_B", "x_proj_C"))
            p["dt_proj"] = xp.ascontiguousarray(f32(p["dt_proj"][:]))      # (d_inner, dt_rank); int8 dequantised
        elif kind in ("swa", "full"):
            fuse(layer["attn"], "Wqkv", ("Wq", "Wk", "Wv"))
            fuse(layer["attn"], "bqkv", ("bq", "bk", "bv"))
    return model


@dataclass(eq=False)
class CudaStep:
    """A cache's decode step on the GPU. Every buffer keeps its address from step to step, so a CUDA
    graph captured once replays every later step. The host talks to it through two pinned buffers
    only: it writes [token, position] into host_in before the step, and reads host_logits after it."""
    token: object                 # (1,) int64 on the device, the id fed this step (a view of token_pos)
    pos: object                   # (1,) int64 on the device, its position (a view of token_pos)
    lam: dict                     # attention layer i -> (1,) float32 λ, made from the model's weights
    buf: dict                     # every intermediate of the step, (1, n) float32, and attention_decode's scratch
    token_pos: object = None      # (2,) int64 on the device: [token, position], the graph's first node writes it
    host_in: object = None        # (2,) int64 in pinned host memory: [token, position], written by the host
    host_logits: object = None    # (1, V) float32 in pinned host memory: the graph's last node writes the logits
    host_error: object = None     # (1,) int32 in pinned host memory: the kernels' error flag, copied out before them
    graph: object = None          # the captured step, valid for graph_key
    graph_key: tuple = ()         # what the step's λ and graph were made for (_graph_key)
    eager_steps: int = 0          # the first step runs eagerly (it compiles the kernels), then a graph
    graph_error: str = ""         # why capture failed; then every step runs eagerly
    sms: int = CPU_SMS            # the GPU's SM count (device_sms), asked once: it sets the attention's splits


def _pinned(xp, shape, dtype):
    """A host array that a graph's copy node can read or write at every replay: page-locked memory
    (a copy from pageable memory cannot be captured). Plain NumPy when the step runs on the CPU."""
    n = math.prod(shape)
    if xp is np:
        return np.zeros(shape, dtype)
    return np.frombuffer(xp.cuda.alloc_pinned_memory(n * np.dtype(dtype).itemsize), dtype, n).reshape(shape)


def new_cuda_step(model, xp):
    """The buffers of a cache's decode step, made at its first step (on the model's stream)."""
    cfg = model.config
    d_inner, N, hd = cfg.d_inner, cfg.mamba_d_state, cfg.head_dim
    widths = {"hidden": cfg.hidden_size, "normed": cfg.hidden_size, "xz": 2 * d_inner,
              "xdbc": cfg.mamba_dt_rank + 2 * N, "y": d_inner, "y_gated": d_inner, "memory": d_inner,
              "qkv": (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd, "attn": cfg.num_attention_heads * hd,
              "mlp": cfg.intermediate_size, "gmu": d_inner, "logits": cfg.vocab_size}
    token_pos = xp.zeros(2, xp.int64)                                     # (2,) [token, position]
    step = CudaStep(token_pos[0:1], token_pos[1:2], _lambdas(model, xp),
                    {name: xp.zeros((1, n), xp.float32) for name, n in widths.items()}, token_pos,
                    _pinned(xp, (2,), np.int64), _pinned(xp, (1, cfg.vocab_size), np.float32),
                    _pinned(xp, (1,), np.int32), sms=device_sms(xp))
    step.buf["counter"] = xp.zeros(1, xp.int32)   # kernel 7's _norm: blocks done; the last one resets it to 0
    step.buf["error"] = xp.zeros(1, xp.int32)     # set by a kernel that could not do its work (kv_store)
    return step


def step_partials(cfg, step, slots, xp):
    """attention_decode's scratch for caches of these sizes (every cache a step reads): partials for
    the most splits any of them takes, grown with them (decode_splits stops at the SM count's), and
    the split counters."""
    H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    n_splits = max(decode_splits(S, H_kv, step.sms) for S in slots)
    if "partial_m" not in step.buf or step.buf["partial_m"].shape[0] < n_splits:
        scratch = decode_scratch(H, H_kv, cfg.head_dim, n_splits, xp)
        step.buf.update(zip(("partial_m", "partial_l", "partial_acc", "splits_done"), scratch))


def cuda_step_layers(model, cache, step):
    """extend() for the one token in step.token at position step.pos, as a fixed sequence of kernel
    launches into the step's buffers: nothing is allocated, nothing synchronises, no index depends
    on the position on the host, so a CUDA graph can replay it. The embedding and the first
    LayerNorm, then per layer the mixer (Mamba: in_proj with the conv, x_proj, scan with dt_proj;
    attention: Wqkv storing K/V, attention_decode; GMU: in_proj ⊙ memory), its out_proj + residual +
    the next LayerNorm, fc1 with SwiGLU, fc2 + residual + the next LayerNorm (the next layer's, or
    the final one); the head. The states and K/V caches are updated in place -> logits (1, V), the
    step's buffer."""
    cfg, eps, b = model.config, model.config.layer_norm_eps, step.buf
    d_inner, N, H, hd = cfg.d_inner, cfg.mamba_d_state, cfg.num_attention_heads, cfg.head_dim
    scratch = (b["partial_m"], b["partial_l"], b["partial_acc"], b["splits_done"])  # attention_decode's
    next_norms = [layer["input_layernorm"] for layer in model.layers[1:]] + [model.final_layernorm]
    cuda_embed(model.embed_tokens, step.token, b["hidden"])
    cuda_layer_norm(b["hidden"], model.layers[0]["input_layernorm"], b["normed"], eps)
    for i, (kind, layer, next_norm) in enumerate(zip(cfg.layer_kinds, model.layers, next_norms)):
        if kind == "mamba":
            p = layer["mamba"]
            cuda_gemv_conv(b["normed"], p["in_proj"], b["xz"], cache.conv_state[i], p["conv1d_weight"],
                           p["conv1d_bias"])                              # (1, 2·d_inner)  [x̂ | z]
            x, z = b["xz"][:, :d_inner], b["xz"][:, d_inner:]
            cuda_gemv(x, p["x_proj"], b["xdbc"])                          # (1, dt_rank + 2N)  [dt_low | B | C]
            y = b["memory"] if i == cfg.memory_layer else b["y"]          # layer L/2's y is the GMU memory
            _launch(scan_step, (_blocks(d_inner, SCAN_CHANNELS),), (SCAN_CHANNELS * N,),
                    (x, b["xdbc"], p["dt_proj"], p["dt_proj_bias"], p["A_log"], p["D"], z, cache.ssm_state[i],
                     y, b["y_gated"], np.int32(d_inner), np.int32(N), np.int32(cfg.mamba_dt_rank)))
            mixed, out_proj, out_bias = b["y_gated"], p["out_proj"], None   # what out_proj reads, (1, d_inner)
        elif kind == "gmu":
            p = layer["gmu"]
            cuda_gemv(b["normed"], p["in_proj"], b["gmu"], GEMV_GATE, aux=b["memory"])  # silu(x·in_projᵀ) ⊙ m
            mixed, out_proj, out_bias = b["gmu"], p["out_proj"], None       # (1, d_inner)
        else:
            p, q = layer["attn"], b["qkv"][:, :H * hd]
            if kind == "cross":
                cuda_gemv(b["normed"], p["Wq"], q, bias=p["bq"])          # (1, H·hd)
                kv = cache.shared(cfg)                                    # layer L/2+1's K/V
            else:
                kv = cache.kv[i]                                          # [q | k | v], k and v stored in kv
                cuda_gemv_qkv(b["normed"], p["Wqkv"], p["bqkv"], b["qkv"], kv, step, H * hd)
            cuda_decode_attention(q.reshape(H, hd), kv.k, kv.v, step.pos, kv.pos, kv.window, step.lam[i],
                                  lambda_init_for(i), p["subln"], out=b["attn"], scratch=scratch, sms=step.sms)
            mixed, out_proj, out_bias = b["attn"], p["out_proj"], p["out_proj_bias"]  # (1, H·hd)
        post_norm = layer["post_attention_layernorm"]                     # hidden += mixer out; normed = LN2(hidden)
        cuda_gemv_norm(mixed, out_proj, out_bias, b["hidden"], post_norm, b["normed"], step, eps)
        cuda_gemv(b["normed"], layer["mlp"]["fc1"], b["mlp"], GEMV_SWIGLU, out_features=cfg.intermediate_size)
        cuda_gemv_norm(b["mlp"], layer["mlp"]["fc2"], None, b["hidden"], next_norm, b["normed"], step, eps)  # next LN1
    return cuda_gemv(b["normed"], model.embed_tokens, b["logits"])        # (1, V), the tied head


def _graph_key(model, cache, step):
    """What a captured step has baked in: the model (its identity) and the device address of every
    array the step reads or writes: each weight, state, K/V buffer and intermediate. A graph is
    replayed only while all of them hold, so a graph captured for one model is never replayed with
    another's weights (a cache used with a second model), with weights fuse_for_decode made again,
    or with a shared K/V that grew. It is computed on every step, so it is one flat pass (~660
    addresses for the real model)."""
    arrays = [model.embed_tokens, *model.final_layernorm.values()]
    arrays += [a for layer in model.layers for p in layer.values() for a in p.values()]
    arrays = [b for a in arrays for b in ((a.q, a.scales) if isinstance(a, Int8Weight) else (a,))]  # int8: both parts
    arrays += [*cache.conv_state.values(), *cache.ssm_state.values(), *step.buf.values(), step.token_pos]
    arrays += [a for kv in cache.kv.values() for a in (kv.k, kv.v, kv.pos)]
    if isinstance(step.token_pos, np.ndarray):                            # the twins on the CPU
        return (id(model), *(a.ctypes.data for a in arrays))
    return (id(model), *[a.data.ptr for a in arrays])


def cuda_decode(model, cache, ids, stream=None):
    """extend(model, cache, ids) for one token -> its logits (1, V), a host array of the caller's own.

    The step is _step_nodes: [token, position] copied in from pinned host memory, the kernels of
    cuda_step_layers, the logits copied out to pinned host memory. The first step runs it eagerly (it
    compiles the kernels); the second captures it as a CUDA graph, and every later step is that
    graph's launch and one synchronisation: nothing else touches the device (no event, no fill, no
    device-to-device copy, no pageable transfer). When _graph_key changes (the shared K/V grew,
    another model or moved weights), λ is made again and the step captured again. CUDA_GRAPHS off
    or a failed capture: every step runs eagerly, through the same pinned buffers. stream: the
    model's (model_stream); None runs the same step on NumPy arrays through the twins."""
    cfg, xp = model.config, get_xp(cache.ssm_state[0])
    shared = cache.shared(cfg)
    with stream if stream is not None else contextlib.nullcontext():  # all but the graph's launch, on that stream
        if cache.length >= shared.k.shape[1]:
            kv_grow(shared, cache.length + 1)
        if cache.cuda is None:
            cache.cuda = new_cuda_step(model, xp)
        step = cache.cuda
        step_partials(cfg, step, [kv.k.shape[1] for kv in cache.kv.values()], xp)
        key = _graph_key(model, cache, step)
        if key != step.graph_key:
            step.lam, step.graph, step.graph_key = _lambdas(model, xp), None, key
        step.host_in[:] = int(ids[0]), cache.length                      # [token, position]: the first node reads it
        graphs = CUDA_GRAPHS and stream is not None and not step.graph_error
        if graphs and step.graph is None and step.eager_steps:
            step.graph = _capture(model, cache, step, stream)
        if graphs and step.graph is not None:
            step.graph.launch(stream)
        else:
            _step_nodes(model, cache, step, stream)
            step.eager_steps += 1
    if stream is not None:
        stream.synchronize()                                              # the one sync: the logits are in host_logits
    check_step_error(cache, step, int(step.host_error[0]))               # a kernel's error flag, copied out with them
    cache.length += 1
    for kv in cache.kv.values():
        kv.length += 1
    return step.host_logits.copy()  # copied out: the next step overwrites host_logits, and a caller may keep these


def _step_nodes(model, cache, step, stream):
    """One decode step as its graph's nodes, in order on `stream`: host_in -> token_pos (the first),
    the kernels of cuda_step_layers, the kernels' error flag -> host_error, the logits -> host_logits
    (the last)."""
    _copy(step.token_pos, step.host_in, stream)
    logits = cuda_step_layers(model, cache, step)
    _copy(step.host_error, step.buf["error"], stream)
    _copy(step.host_logits, logits, stream)


def _copy(dst, src, stream):
    """dst[...] = src between pinned host memory and the device: a cudaMemcpyAsync on `stream` (a
    graph's copy node while it captures). With stream None both are NumPy arrays."""
    if stream is None:
        dst[...] = src
    elif isinstance(src, np.ndarray):                                     # pinned host -> device
        runtime = get_xp(dst).cuda.runtime
        runtime.memcpyAsync(dst.data.ptr, src.ctypes.data, src.nbytes, runtime.memcpyHostToDevice, stream.ptr)
    else:                                                                 # device -> pinned host
        runtime = get_xp(src).cuda.runtime
        runtime.memcpyAsync(dst.ctypes.data, src.data.ptr, src.nbytes, runtime.memcpyDeviceToHost, stream.ptr)


def _capture(model, cache, step, stream):
    """One decode step (_step_nodes) recorded as a CUDA graph -> the graph; None when capture is
    refused (one line on stderr, and that cache decodes eagerly from then on). Nothing runs while
    recording, and the step allocates nothing, so the graph is exactly those nodes: each launch reads
    host_in and writes host_logits as they are then."""
    try:
        stream.begin_capture()
        try:
            _step_nodes(model, cache, step, stream)
        finally:
            graph = stream.end_capture()
    except Exception as e:  # any CUDA/CuPy refusal: without PDL once more, then eager steps for this cache
        error = f"{type(e).__name__}: {(str(e) or '-').splitlines()[0]}"
        if _pdl_driver() is not None:
            pdl_off(f"the CUDA graph capture refused them ({error})")
            return _capture(model, cache, step, stream)
        step.graph_error = error
        print(f"phi4flash: CUDA graph capture failed ({step.graph_error}); decoding without graphs", file=sys.stderr)
        return None
    return graph


# ----------------------------------------------------------------------------------------------
# Appendix B. The command line: trace one forward, save it, and compare it with a reference dump
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

def nonfinite_message(model, ids):
    """Why the logits are NaN/inf, in one line: the first traced tensor (in forward order) that is
    not finite, from a full forward over the tokens this generation fed (at most the last 512)."""
    ids = list(ids)[-512:]
    trace = {}
    with np.errstate(all="ignore"):
        model.forward(ids, trace=trace)
    first = next((name for _, _, names in trace_rows(model.config) for name in names
                  if name in trace and not np.isfinite(trace[name]).all()), None)
    if first is None:
        return (f"generate: the logits are not finite (NaN/inf), yet a fresh forward over the last {len(ids)} tokens "
                "is finite: the cached state overflowed")
    return (f"generate: the logits are not finite (NaN/inf); a traced forward over the last {len(ids)} tokens "
            f"first goes non-finite at {first}: check that layer's weights")


def trace_rows(cfg):
    """The trace table's rows in forward order: (label, kind, names made in that row, in order).
    memory and shared_k/v are made inside their layer's mixer, so they sit before its mixer_out."""
    def kind_label(i, kind):
        if i == cfg.memory_layer:
            return "mamba → memory"
        if i == cfg.kv_layer:
            return "full attn → KV"
        return f"SWA W={cfg.sliding_window[i]}" if kind == "swa" else {"cross": "cross attn"}.get(kind, kind)
    rows = [("embed", "embedding", ["embed"])]
    for i, kind in enumerate(cfg.layer_kinds):
        made = {cfg.memory_layer: ["memory"], cfg.kv_layer: ["shared_k", "shared_v"]}.get(i, [])
        p = f"layers.{i}."
        rows.append((str(i), kind_label(i, kind),
                     [p + "mixer_in", p + "attn_probs", *made, p + "mixer_out", p + "mlp_out", p + "residual"]))
    return rows + [("norm", "final LayerNorm", ["final_norm"]), ("head", "tied LM head", ["logits"])]


def check_attn_probs(cfg, attn_probs):
    """(layer, j) must name an attention layer and one of its H/2 differential heads."""
    if not (isinstance(attn_probs, (tuple, list)) and len(attn_probs) == 2 and all(map(_is_int, attn_probs))):
        raise Phi4FlashError(f"attn_probs: expected (layer, head), two integers, got {_shown(attn_probs)}")
    layer, j = attn_probs
    kinds = cfg.layer_kinds
    if not 0 <= layer < len(kinds) or kinds[layer] not in ("swa", "full", "cross"):
        attn = [i for i, k in enumerate(kinds) if k in ("swa", "full", "cross")]
        raise Phi4FlashError(f"attn_probs: layer {layer} is not an attention layer (those are {attn})")
    if not 0 <= j < cfg.num_attention_heads // 2:
        raise Phi4FlashError(f"attn_probs: head {j} is out of range; a layer has {cfg.num_attention_heads // 2} "
                             "differential heads, numbered from 0")


def attention_maps(model, trace, i, j):
    """Both softmax maps of differential head j of attention layer i, recomputed from what a full
    forward's trace records: the layer's mixer input (its queries, and its keys for a "swa"/"full"
    layer) or the shared K/V (a cross layer). Positions are 0..T-1. -> (2, T, T) float32, the
    stripe-1 map of query head 2j and the stripe-2 map of query head 2j+1 (section 6)."""
    cfg, p = model.config, model.layers[i]["attn"]
    H, H_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    u = trace[f"layers.{i}.mixer_in"]                                     # (T, D)
    weights = {name: to_numpy(a) for name, a in p.items()}               # host copies on a GPU model
    q = project_heads(u, weights["Wq"], weights["bq"], H)                 # (H, T, hd)
    k = trace["shared_k"] if cfg.layer_kinds[i] == "cross" else project_heads(u, weights["Wk"], weights["bk"], H_kv)
    pos = np.arange(len(u))                                               # (T,)
    mask = visible(pos[None, :], pos[:, None], cfg.sliding_window[i] if cfg.layer_kinds[i] == "swa" else None)
    g = j // (H // H_kv)                                                  # the KV group of head pair j
    return np.stack([softmax(np.where(mask, q[2 * j + s] @ k[2 * g + s].T / math.sqrt(hd), -np.inf))
                     for s in (0, 1)]).astype(np.float32)                 # (2, T, T)


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


def save_npz(path, arrays):
    """np.savez into a temporary file beside `path`, renamed over it when complete: an error or a
    Ctrl-C never leaves a half-written dump."""
    path = os.fspath(path)
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        raise Phi4FlashError(f"--save {path}: cannot write it ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def trace_model(model):
    """MODEL -> a converted folder. One (or its model.safetensors) is used as it is, which needs nothing
    but this file, so it works from a `pip install .`. A Hugging Face snapshot or a repo id goes to
    convert.py's resolve_model, which sits next to this file in a clone (a pip install has no convert.py)."""
    file = os.path.join(model, "model.safetensors") if os.path.isdir(model) else model
    if os.path.isfile(file):  # converted: no config.json (every snapshot has one; load names what else is wrong), or says so
        if not os.path.lexists(os.path.join(os.path.dirname(file), "config.json")):
            return model
        with contextlib.suppress(OSError, Phi4FlashError):
            if read_safetensors_header(file)[1].get("format") == FORMAT:
                return model
    here = os.path.dirname(os.path.abspath(__file__))
    if not os.path.isfile(os.path.join(here, "convert.py")):
        what = "a Hugging Face snapshot" if os.path.isdir(model) else "not a folder; a repo id"
        raise Phi4FlashError(f"MODEL {model}: {what} needs convert.py to be converted first, and convert.py is not "
                             f"next to {__file__} (a pip install has only the library); in a clone of phi4flash run: "
                             f"python convert.py {model} CONVERTED, then trace CONVERTED")
    sys.path.insert(0, here)
    import convert
    return convert.resolve_model(model)


def trace_command(args):
    from rich.console import Console
    console = Console()
    if not console.is_terminal:  # a file or a pipe: the table at its full width, not squeezed into 80 columns
        console = Console(width=1000)
    ref = _load_npz(args.compare) if args.compare else None          # bad arguments fail before the model loads
    ids = _parse_ids(args.ids) if args.prompt is None else None
    attn_probs = _parse_attn_probs(args.attn_probs) if args.attn_probs else None
    model = load(trace_model(args.model))
    if args.prompt is not None:
        if model.tokenizer is None:
            raise Phi4FlashError(f"MODEL {args.model}: no tokenizer.json, so --prompt cannot be encoded; pass --ids")
        ids = model.encode(args.prompt)
        if not ids:
            raise Phi4FlashError("--prompt: the text encodes to no tokens")
    trace = {}
    model.forward(ids, trace=trace, attn_probs=attn_probs)
    trace["input_ids"] = check_ids(model, ids)
    comparison = compare_trace(model.config, trace, ref, args.atol, where=f"--compare {args.compare}") if ref else None
    if comparison and not comparison.diffs:
        raise Phi4FlashError(f"--compare {args.compare}: no array has a trace name (like layers.0.residual); "
                             "see the names in notes/08-trace-and-compare.md")
    if args.save:
        save_npz(args.save, trace)
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


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser with errors in one line, `error: argument --x: ...`, exit code 2 (no usage
    block: --help has it). Every command line of the project (trace, chat.py, convert.py) uses it."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def interruption(e):
    """A KeyboardInterrupt -> (" (SIGTERM)" or "", exit code): Ctrl-C exits 130; SIGTERM or SIGHUP,
    which convert.py turns into its Interrupted while it writes, exits 128 + the signal's number."""
    signum = getattr(e, "signum", None)
    return (f" ({e})", 128 + signum) if signum else ("", 130)


def main(argv=None):
    """python phi4flash.py trace ... (see --help); returns the exit code: 0 ok, 1 a tensor over atol,
    2 an error, 130 Ctrl-C, 128 + the signal for SIGTERM / SIGHUP while a snapshot is converted."""
    ap = OneLineParser(prog="phi4flash.py", description="Phi-4-mini-flash-reasoning (SambaY) in NumPy.")
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
    except KeyboardInterrupt as e:  # Ctrl-C, or convert.Interrupted (SIGTERM / SIGHUP while converting)
        which, code = interruption(e)
        print(f"interrupted{which}: nothing was saved", file=sys.stderr)
        return code


if __name__ == "__main__":
    # Run as a script this file is __main__; convert.py imports it again as phi4flash. Running the
    # imported module's main makes both one module, with one Phi4FlashError class.
    import phi4flash
    sys.exit(phi4flash.main())
