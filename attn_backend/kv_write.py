"""Writing new K/V rows into a paged cache: the CUDA kernel, or the reference on CPU."""

from __future__ import annotations

import torch

from . import _extension, reference
from ._validation import (INDEX_DTYPES, KERNEL_DTYPES, KERNEL_FP8_DTYPES, check_in_range,
                          check_last_dim_contiguous, check_same_device, check_size, check_tensor,
                          debug_checks_enabled)
from .paged_kv import PagedKVCache


def write_kv(cache: PagedKVCache, slots: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, *, via_input_dtype: bool = False) -> None:
    """Store `key` [T, H, Dk] and `value` [T, H, Dv] at token `slots` [T] of `cache`, in place.

    Slot -1 marks a padding token and is skipped. On CUDA tensors this runs the
    `paged_kv_write` kernel (no host synchronisation, CUDA-graph safe); on CPU
    tensors it runs the float reference. An FP8 cache stores the rows quantised with its
    scales (`attn_backend.fp8`: x / scale in float32, rounded to nearest even, saturated;
    `via_input_dtype`: the quotient rounded to the input's dtype first, SGLang's store), the
    caller's `key` and `value` untouched; the kernel reads device scales when it runs
    (`fp8.device_scale`).
    """
    check_tensor("key", key, dims=3)
    check_tensor("value", value, dims=3)
    check_tensor("slots", slots, dims=1, dtypes=INDEX_DTYPES)
    num_tokens = key.shape[0]
    check_size("value", value, 0, num_tokens, "one row per token of key")
    check_size("slots", slots, 0, num_tokens, "one slot per token of key")
    check_size("key", key, 1, cache.num_kv_heads, "the cache's kv heads")
    check_size("value", value, 1, cache.num_kv_heads, "the cache's kv heads")
    check_size("key", key, 2, cache.head_dim_k, "the cache's K head dim")
    check_size("value", value, 2, cache.head_dim_v, "the cache's V head dim")
    check_same_device(cache=cache.k, key=key, value=value, slots=slots)
    if debug_checks_enabled():
        check_in_range("slots", slots, -1, cache.num_slots,
                       f"-1 for padding, else a slot of the {cache.num_pages} pages x "
                       f"{cache.page_size}")
    if key.device.type != "cuda":
        reference.write_kv(cache, slots, key, value, via_input_dtype=via_input_dtype)
        return
    cache_dtypes = KERNEL_DTYPES + KERNEL_FP8_DTYPES
    for name, t, accepted in (("key", key, KERNEL_DTYPES), ("value", value, KERNEL_DTYPES),
                              ("k_cache", cache.k, cache_dtypes),
                              ("v_cache", cache.v, cache_dtypes)):
        check_tensor(name, t, dtypes=accepted)
        check_last_dim_contiguous(name, t)
    if value.dtype != key.dtype or (not cache.is_fp8 and key.dtype != cache.dtype):
        raise TypeError(f"key ({key.dtype}) and value ({value.dtype}) must share a dtype, the "
                        f"cache's ({cache.dtype}) unless the cache is FP8")
    if not slots.is_contiguous():
        slots = slots.contiguous()
    scales = cache.kernel_tensors()[2:] if cache.is_fp8 else [None, None]
    _extension.load_ops().paged_kv_write(key, value, cache.k, cache.v, slots, *scales,
                                         via_input_dtype)


def write_latent_rows(pages: torch.Tensor, slots: torch.Tensor, latent: torch.Tensor,
                      rope: torch.Tensor, *, scale=None, via_input_dtype: bool = False) -> None:
    """Store MLA latent rows: `latent` [T, 1, rank] into the first `rank` columns and `rope`
    [T, 1, rope_dim] into the rest of each row of `pages` [num_pages, page_size, 1, rank +
    rope_dim] (an engine's latent cache viewed as pages) at token `slots`. The row's two parts
    are the V and K of one `write_kv`, so each byte is stored once in one launch; an FP8 cache
    is quantised with its one `scale` (K's and V's alike)."""
    rank = latent.shape[-1]
    parts = PagedKVCache(k=pages[..., rank:], v=pages[..., :rank], k_scale=scale, v_scale=scale)
    write_kv(parts, slots, rope, latent, via_input_dtype=via_input_dtype)
