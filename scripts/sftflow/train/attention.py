"""Causal attention inside each packed sequence, with the fastest kernel the device offers.

A packed row holds several sequences back to back; the model receives their boundaries (`cu_seq_lens_q`,
flattened over the batch) and `varlen_attention` lets every token attend only to earlier tokens of its own
sequence. Four kernels compute exactly that (`training.attention` picks one; `auto` takes the first that fits):

- `flash`: flash-attn's `flash_attn_varlen_func` (CUDA, bf16/fp16, when the flash_attn package is installed);
- `varlen`: PyTorch's own `torch.nn.attention.varlen.varlen_attn` (CUDA, bf16/fp16; torch >= 2.10);
- `flex`: `flex_attention` with a block mask "causal and same sequence" (torch >= 2.5), compiled on CUDA:
  one kernel launch per layer for the whole batch, skipping every 128 x 128 block of the score matrix that
  lies outside all sequences (and masking within the blocks on a boundary). CUDA only for training: torch
  has no flex_attention backward on CPU (its forward there is unfused, materialising the whole score matrix);
- `sdpa_loop`: one `scaled_dot_product_attention` call per sequence, a Python loop of kernel launches per
  layer. The CPU kernel, and the only one here besides flash with attention dropout.

Every kernel gives each sequence exactly its own causal attention (tests/train/test_attention_kernels.py), so a
token can never attend to another sequence.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sftflow.errors import SftflowError

LOG = logging.getLogger("sftflow.train")

VARLEN_ATTENTION = "sftflow_varlen"
KERNELS = ("flash", "varlen", "flex", "sdpa_loop")
CONFIG_KEY = "training.attention"
HALF = (torch.float16, torch.bfloat16)

try:  # optional; only used on CUDA with half-precision inputs
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_varlen_func = None


def segment_bounds(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """Python ints of the boundaries (one device->host copy per forward, not per layer)."""
    return tuple(int(x) for x in cu_seqlens.tolist())


# --- what this torch offers ------------------------------------------------------------------------------


@functools.cache
def torch_varlen_attn():
    """torch's `varlen_attn` when it has the keywords used here (`scale`, `window_size`: torch >= 2.10), else None.

    torch 2.9's first version took `is_causal` instead; `enable_gqa` came in 2.12 (without it, grouped-query
    keys and values are repeated to the query heads).
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn if {"scale", "window_size"} <= params.keys() else None


@functools.cache
def _varlen_has_gqa() -> bool:
    fn = torch_varlen_attn()
    return fn is not None and "enable_gqa" in inspect.signature(fn).parameters


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _flex_functions(compiled: bool):
    """(create_block_mask, flex_attention), compiled once per process on CUDA.

    Uncompiled, flex_attention computes the full score matrix (fine for CPU tests, far too slow and large on a
    GPU), and create_block_mask materialises the L x L mask; torch.compile turns both into fused kernels.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not compiled:
        return create_block_mask, flex_attention
    return torch.compile(create_block_mask), torch.compile(flex_attention)


# --- choosing the kernel ---------------------------------------------------------------------------------


def kernel_problem(kernel: str, device: torch.device, dtype: torch.dtype, dropout: float = 0.0) -> str | None:
    """Why `kernel` cannot run here (None if it can)."""
    if kernel not in KERNELS:
        return f"unknown kernel {kernel!r} (one of auto, {', '.join(KERNELS)})"
    if kernel == "sdpa_loop":
        return None
    if dropout > 0 and kernel != "flash":
        return f"{kernel} has no attention dropout (the model's attention_dropout is {dropout}); use sdpa_loop"
    if kernel == "flex" and not flex_available():
        return f"torch {torch.__version__} has no flex_attention (needs >= 2.5)"
    if kernel == "flex":
        return None if device.type == "cuda" else f"torch has no flex_attention backward on {device.type}"
    what = {"flash": "flash-attn's flash_attn_varlen_func", "varlen": "torch's varlen_attn"}[kernel]
    if device.type != "cuda":
        return f"{what} needs a CUDA GPU (device here: {device.type})"
    if dtype not in HALF:
        return f"{what} needs bf16 or fp16 compute (here {dtype}; set training.precision: bf16)"
    if kernel == "flash" and flash_attn_varlen_func is None:
        return "the flash_attn package is not installed (pip install flash-attn)"
    if kernel == "varlen" and torch_varlen_attn() is None:
        return f"torch {torch.__version__} has no usable torch.nn.attention.varlen.varlen_attn (needs >= 2.10)"
    return None


def auto_kernel(device: torch.device, dtype: torch.dtype, dropout: float = 0.0) -> str:
    """CUDA: flash-attn, else torch's varlen, else flex; CPU: the per-sequence SDPA loop (fastest there)."""
    if device.type != "cuda":
        return "sdpa_loop"
    for kernel in ("flash", "varlen", "flex"):
        if kernel_problem(kernel, device, dtype, dropout) is None:
            return kernel
    return "sdpa_loop"


def resolve_kernel(requested: str, device: torch.device, dtype: torch.dtype, dropout: float = 0.0) -> str:
    """The kernel for config value `requested` (auto or a name); a kernel that cannot run here is refused."""
    if requested == "auto":
        return auto_kernel(device, dtype, dropout)
    problem = kernel_problem(requested, device, dtype, dropout)
    if problem:
        raise SftflowError(f"config key '{CONFIG_KEY}' is {requested!r}, which cannot run here: {problem}")
    return requested


# --- the kernels ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Heads:
    """One attention call: query [B, Hq, L, D], key / value [B, Hkv, L, D], the score scale and the dropout."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float | None
    dropout: float


def _tokens_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B*L, H, D], the layout of the varlen kernels."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads, dim)


def _flash(heads: _Heads, cu: torch.Tensor, max_len: int):
    out = flash_attn_varlen_func(
        _tokens_heads(heads.query),
        _tokens_heads(heads.key),
        _tokens_heads(heads.value),
        cu,
        cu,
        max_len,
        max_len,
        dropout_p=heads.dropout,
        softmax_scale=heads.scaling,
        causal=True,
    )
    return out  # flash-attn handles grouped-query attention itself


def _torch_varlen(heads: _Heads, cu: torch.Tensor, max_len: int):
    query, key, value = heads.query, heads.key, heads.value
    groups = query.shape[1] // key.shape[1]
    extra = {}
    if groups > 1 and _varlen_has_gqa():
        extra["enable_gqa"] = True
    elif groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return torch_varlen_attn()(
        _tokens_heads(query),
        _tokens_heads(key),
        _tokens_heads(value),
        cu,
        cu,
        max_len,
        max_len,
        scale=heads.scaling,
        window_size=(-1, 0),  # (-1, 0) is causal
        **extra,
    )


@functools.lru_cache(maxsize=4)
def _document_block_mask(bounds: tuple[int, ...], device: torch.device, compiled: bool):
    """The flex block mask "causal and same sequence" over the flattened tokens, built once per batch
    (every layer, and the recomputation under activation checkpointing, find it here)."""
    create_block_mask, _ = _flex_functions(compiled)
    lengths = torch.tensor([e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)])
    document = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)
    total = bounds[-1]

    def causal_same_document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document[q_idx] == document[kv_idx])

    return create_block_mask(causal_same_document, None, None, total, total, device=device)


def _flex(attention: _Heads, bounds: tuple[int, ...]):
    """The batch as one row of B*L tokens: the mask keeps each sequence to itself, across rows too."""
    query, key, value = attention.query, attention.key, attention.value
    batch, heads, length, dim = query.shape
    compiled = query.is_cuda
    _, flex_attention = _flex_functions(compiled)
    block_mask = _document_block_mask(bounds, query.device, compiled)

    def one_row(x):
        return x.transpose(0, 1).reshape(1, x.shape[1], batch * length, dim)

    out = flex_attention(
        one_row(query),
        one_row(key),
        one_row(value),
        block_mask=block_mask,
        scale=attention.scaling,
        enable_gqa=key.shape[1] != heads,
    )  # [1, H, B*L, D]
    return out[0].view(heads, batch, length, dim).permute(1, 2, 0, 3)


def _sdpa_loop(attention: _Heads, bounds: tuple[int, ...]):
    query, key, value = attention.query, attention.key, attention.value
    batch, heads, length, dim = query.shape
    # Heads first, then the flattened tokens: a segment is a contiguous slice [H, start:end, D].
    q = query.transpose(0, 1).reshape(heads, batch * length, dim)
    k = key.transpose(0, 1).reshape(key.shape[1], batch * length, dim)
    v = value.transpose(0, 1).reshape(value.shape[1], batch * length, dim)
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # 4-D inputs: PyTorch's fused (flash) CPU kernel only takes [batch, heads, len, dim]; 3-D inputs fall
        # back to the unfused math path, about 10x slower for a 200-token segment.
        outs.append(
            F.scaled_dot_product_attention(
                q[None, :, start:end],
                k[None, :, start:end],
                v[None, :, start:end],
                dropout_p=attention.dropout,
                is_causal=True,
                scale=attention.scaling,
                enable_gqa=key.shape[1] != heads,
            )[0]
        )
    out = torch.cat(outs, dim=1).view(heads, batch, length, dim)
    return out.permute(1, 2, 0, 3)


def varlen_attention(  # noqa: PLR0913 - transformers' AttentionInterface calls it with these names
    module: nn.Module | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    sftflow_segments: tuple[int, ...] | None = None,
    sftflow_attention: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention inside each segment of the flattened batch; returns [B, L, H, D] like transformers' SDPA.

    query [B, Hq, L, D], key/value [B, Hkv, L, D] (grouped-query attention when Hkv < Hq). Without boundaries
    every row is one causal sequence. `sftflow_attention` names the kernel (as `resolve_kernel` chose it);
    without it the kernel is chosen here as `auto` would.
    """
    if attention_mask is not None:
        raise ValueError(f"{VARLEN_ATTENTION} attention takes sequence boundaries, not an attention mask")
    batch, num_heads, length, head_dim = query.shape
    if cu_seq_lens_q is None and sftflow_segments is None:
        out = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=key.shape[1] != num_heads
        )
        return out.transpose(1, 2).contiguous(), None

    kernel = sftflow_attention or auto_kernel(query.device, query.dtype, dropout)
    heads = _Heads(query, key, value, scaling, dropout)
    if kernel in ("flash", "varlen") and cu_seq_lens_q is not None:
        cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        max_len = int(max_length_q) if max_length_q is not None else length
        if kernel == "flash":
            out = _flash(heads, cu, max_len)
        else:
            out = _torch_varlen(heads, cu, max_len)
        return out.view(batch, length, num_heads, head_dim), None

    bounds = sftflow_segments if sftflow_segments is not None else segment_bounds(cu_seq_lens_q)
    if bounds[0] != 0 or bounds[-1] != batch * length:
        raise ValueError(f"sequence boundaries {bounds[0]}..{bounds[-1]} do not cover the {batch}x{length} batch")
    if kernel == "flex":
        if dropout > 0:
            raise ValueError(f"flex attention has no dropout (got {dropout}); use sdpa_loop")
        out = _flex(heads, bounds)
    else:
        out = _sdpa_loop(heads, bounds)
    return out.contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
