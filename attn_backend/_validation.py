"""Argument checks that raise before any launch, naming the argument and what is accepted.

Cheap checks (dtype, shape, device, layout) always run. Checks that need the
values of device tensors (page ids and slots in range) synchronise with the
host, so they run only in debug mode: `attn_backend.set_debug_checks(True)`
or ATTN_BACKEND_DEBUG=1. Tests turn it on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch

from .fp8 import FP8_DTYPES

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# (query, kv cache) element types the kernels compile; the output takes the query's.
# FP8 caches are read with their scales (attn_backend.fp8); the kernels convert them to
# float16 and compute in it.
KERNEL_FP8_DTYPES = FP8_DTYPES
KERNEL_DTYPE_PAIRS = tuple((q, kv) for q in KERNEL_DTYPES for kv in (q, *KERNEL_FP8_DTYPES))
# (qk, vo) head dims with decode and prefill kernels (tests/test_extension.py checks this
# against the extension's configurations).
SUPPORTED_HEAD_DIMS = ((64, 64), (128, 128), (256, 256))
# MLA's absorbed form (DeepSeek's latent rows: 512 + 64 rope, V the first 512): one kv head,
# a cache of the query's 16-bit type, on PagedPrefill (any number of query tokens per request).
MLA_HEAD_DIMS = (576, 512)
# The MHA prefill of the same models (K = 128 decompressed dims + 64 rope, V = 128): the
# prefill kernels, 16-bit caches, on PagedPrefill.
MLA_MHA_HEAD_DIMS = (192, 128)
# Query heads per kv head: decode and prefill pack a group's heads into MMA rows (decode in
# row tiles of 16), so any group works; this is the largest the tests cover.
MAX_GROUP_SIZE = 128
INDEX_DTYPES = (torch.int32, torch.int64)

_debug_checks = os.environ.get("ATTN_BACKEND_DEBUG", "0") not in ("", "0")


def set_debug_checks(enabled: bool) -> None:
    """Turn on host-side value checks (they synchronise; for tests and debugging)."""
    global _debug_checks
    _debug_checks = bool(enabled)


def debug_checks_enabled() -> bool:
    return _debug_checks


def _names(values: Iterable) -> str:
    return ", ".join(str(v).replace("torch.", "") for v in values)


def check_tensor(name: str, t, *, dims: int | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {_names([t.dtype])}; accepted: {_names(dtypes)}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}; "
                             "all tensors must be on one device")
    return first


def check_size(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name} has size {t.shape[dim]} in dimension {dim}; expected {expected} "
                         f"({what})")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)})")


def capturing_cuda_graph(device: torch.device) -> bool:
    """True while the current stream of a CUDA device is being captured into a graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_in_range(name: str, values: torch.Tensor, low: int, high: int, what: str) -> None:
    """Every value in [low, high); reads the tensor on the host.

    Skipped while a CUDA graph is being captured: reading device values there
    would invalidate the capture (the eager warm-up before capture checks them).
    """
    if values.numel() == 0 or capturing_cuda_graph(values.device):
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < low or hi >= high:
        raise ValueError(f"{name} holds values in [{lo}, {hi}]; accepted: [{low}, {high - 1}] "
                         f"({what})")


def check_run_call(wrapper, q, cache, page_table, *, rows_what: str, out,
                   sm_scale: float | None, logits_soft_cap: float) -> float:
    """What a kernel wrapper's run() checks before it launches; returns the softmax scale
    (default 1/sqrt(head_dim)).

    The wrapper must be planned (`wrapper._planned` holds the host `kv_lens` and the
    `num_rows` of q it takes, described by `rows_what`). Accepted: q [num_rows, heads, dim]
    of the wrapper's dtype and `out` like it, a cache of its kv_dtype and shape, all on its
    device, a page table that addresses every planned request with enough columns for the
    longest, rows the kernels can copy in 16-byte chunks, and sm_scale > 0. With debug checks
    on (outside graph capture) the page ids the batch reads must be pages of the cache and an
    FP8 cache's scales finite and > 0 (this synchronises).
    """
    name = type(wrapper).__name__
    planned = wrapper._planned
    if planned is None:
        raise RuntimeError(f"{name}.run() called before plan()")
    batch = len(planned.kv_lens)
    num_rows = planned.num_rows
    check_tensor("q", q, dims=3)
    check_size("q", q, 0, num_rows, rows_what)
    check_size("q", q, 1, wrapper.num_qo_heads, "num_qo_heads")
    check_size("q", q, 2, wrapper.head_dim, "head_dim")
    if cache.num_kv_heads != wrapper.num_kv_heads:
        raise ValueError(f"cache has {cache.num_kv_heads} kv heads; expected {wrapper.num_kv_heads}")
    if (cache.head_dim_k, cache.head_dim_v) != (wrapper.head_dim, wrapper.head_dim_vo):
        raise ValueError(f"cache head dims ({cache.head_dim_k}, {cache.head_dim_v}) differ "
                         f"from ({wrapper.head_dim}, {wrapper.head_dim_vo})")
    check_same_device(q=q, cache=cache.k, page_table=page_table.table)
    if q.device != wrapper.device:  # wrapper.device is normalised: cpu:0 is cpu
        raise ValueError(f"q is on {q.device}; this {name} was built for {wrapper.device}")
    if logits_soft_cap < 0:
        raise ValueError(f"logits_soft_cap must be >= 0 (0 = off), got {logits_soft_cap}")
    rows = page_table.row_index.shape[0] if page_table.row_index is not None \
        else page_table.table.shape[0]
    if rows < batch:
        raise ValueError(f"page_table addresses {rows} requests; the batch has {batch}")
    columns = page_table.columns_needed(planned.max_kv_len, cache.page_size)
    if page_table.table.shape[1] < columns:
        raise ValueError(f"page_table has {page_table.table.shape[1]} columns; the batch's longest "
                         f"request ({planned.max_kv_len} keys) needs {columns}")
    if out is not None:
        check_tensor("out", out, dims=3)
        expected = (num_rows, wrapper.num_qo_heads, wrapper.head_dim_vo)
        if tuple(out.shape) != expected:
            raise ValueError(f"out has shape {tuple(out.shape)}; expected {expected}")
        if out.dtype != q.dtype or out.device != q.device:
            raise ValueError("out must have q's dtype and device")
    check_tensor("q", q, dtypes=(wrapper.dtype,))
    check_tensor("k_cache", cache.k, dtypes=(wrapper.kv_dtype,))
    if q.device.type == "cuda" and (wrapper.head_dim, wrapper.head_dim_vo) == MLA_HEAD_DIMS and \
            (cache.v.data_ptr() != cache.k.data_ptr() or cache.v.stride() != cache.k.stride()):
        raise ValueError("cache: the MLA kernel reads V as the first 512 columns of each K row; "
                         "build the cache with PagedKVCache.from_mla (V a view of K)")
    if q.device.type == "cuda":
        for tensor_name, t in (("q", q), ("k_cache", cache.k), ("v_cache", cache.v)):
            check_last_dim_contiguous(tensor_name, t)
            check_chunk_aligned(tensor_name, t)
        if out is not None:
            check_last_dim_contiguous("out", out)
            if out.data_ptr() % 4 or out.stride(0) % 2 or out.stride(1) % 2:
                raise ValueError("out must be 4-byte aligned with even strides (the kernels "
                                 "write element pairs)")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(wrapper.head_dim)
    if not sm_scale > 0:
        raise ValueError(f"sm_scale must be > 0, got {sm_scale}")
    if debug_checks_enabled() and not capturing_cuda_graph(q.device):
        if cache.is_fp8:
            cache.scales_per_head()  # reads device scales: refuses values not finite and > 0
        pages = page_table.page_ids(batch, planned.kv_lens.tolist(), cache.page_size)
        if pages:
            check_in_range("page ids in page_table", torch.cat(pages), 0, cache.num_pages,
                           f"the cache has {cache.num_pages} pages")
    return float(sm_scale)


def check_chunk_aligned(name: str, t: torch.Tensor) -> None:
    """The kernels copy rows in 16-byte chunks: the start and every stride but the last must be
    multiples of 16 bytes."""
    element = t.element_size()
    if t.data_ptr() % 16 or any((t.stride(d) * element) % 16 for d in range(t.dim() - 1)):
        raise ValueError(f"{name} must start 16-byte aligned with strides of multiples of 16 "
                         f"bytes (got strides {t.stride()} of {element}-byte elements)")


# MLA's head dims: what each serves, and whether it reads one latent row for all heads.
_MLA_SHAPES = {MLA_HEAD_DIMS: ("MLA's latent rows", True),
               MLA_MHA_HEAD_DIMS: ("MLA models' MHA prefill", False)}


def _check_mla_shape(dims, num_qo_heads: int, num_kv_heads: int, dtype: torch.dtype,
                     kv_dtype: torch.dtype, serves_mla: bool) -> None:
    what, one_latent_row = _MLA_SHAPES[dims]
    if not serves_mla:
        raise ValueError(f"head dims {dims} ({what}) run on PagedPrefill, which takes any "
                         "number of query tokens per request")
    if one_latent_row and num_kv_heads != 1:
        raise ValueError(f"MLA: {num_qo_heads} query heads over {num_kv_heads} kv heads; "
                         f"supported: 1..{MAX_GROUP_SIZE} query heads over one latent row")
    if not 1 <= num_qo_heads // num_kv_heads <= MAX_GROUP_SIZE:
        raise ValueError(f"head dims {dims}: group size {num_qo_heads // num_kv_heads}; "
                         f"supported: 1..{MAX_GROUP_SIZE}")
    # The latent kernels also read FP8 caches; the MHA prefill's 192-value FP8 key rows are
    # no whole 128-byte lines (its kernel is compiled for 16-bit caches only).
    cache_dtypes = (dtype, *KERNEL_FP8_DTYPES) if one_latent_row else (dtype,)
    if dtype not in KERNEL_DTYPES or kv_dtype not in cache_dtypes:
        accepted = "the query's type or FP8 (float8_e4m3fn, float8_e5m2)" if one_latent_row \
            else "the query's type"
        raise TypeError(f"head dims {dims} ({what}): dtype {_names([dtype])} with kv_dtype "
                        f"{_names([kv_dtype])}; compiled: float16 or bfloat16, the cache "
                        f"{accepted}")


def check_kernel_shape(num_qo_heads: int, num_kv_heads: int, head_dim: int, head_dim_vo: int,
                       dtype: torch.dtype, kv_dtype: torch.dtype, *, on_cuda: bool,
                       serves_mla: bool = False) -> None:
    """Head counts always; on CUDA also the head dims, group size and element types the
    compiled kernels serve (the CPU reference serves any). `serves_mla`: the wrapper has the
    MLA kernel (PagedPrefill)."""
    if num_kv_heads < 1 or num_qo_heads < 1 or num_qo_heads % num_kv_heads:
        raise ValueError(f"num_qo_heads={num_qo_heads} must be a positive multiple of "
                         f"num_kv_heads={num_kv_heads}")
    if not on_cuda:
        return
    dims = (head_dim, head_dim_vo)
    if dims in _MLA_SHAPES:
        _check_mla_shape(dims, num_qo_heads, num_kv_heads, dtype, kv_dtype, serves_mla)
        return
    if (head_dim, head_dim_vo) not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dims (qk={head_dim}, vo={head_dim_vo}) are not compiled; "
                         f"supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
    if not 1 <= num_qo_heads // num_kv_heads <= MAX_GROUP_SIZE:
        raise ValueError(f"group size num_qo_heads/num_kv_heads = "
                         f"{num_qo_heads // num_kv_heads}; supported: 1..{MAX_GROUP_SIZE}")
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"dtype {_names([dtype])}; accepted: {_names(KERNEL_DTYPES)}")
    if (dtype, kv_dtype) not in KERNEL_DTYPE_PAIRS:
        raise TypeError(f"kv_dtype {_names([kv_dtype])} with dtype {_names([dtype])}; compiled "
                        "(dtype, kv_dtype): " +
                        ", ".join(f"({_names([a])}, {_names([b])})" for a, b in KERNEL_DTYPE_PAIRS))
