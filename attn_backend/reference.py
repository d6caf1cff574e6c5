"""The float reference: what every attn_backend kernel computes, in plain torch.

This is the semantics, and the CPU execution path of the integrations.
Shapes and conventions:

- Queries are ragged: `q` is `[total_q, num_qo_heads, head_dim_k]` and request
  r owns rows `qo_indptr[r]:qo_indptr[r+1]`.
- Keys/values come from a `PagedKVCache` through CSR token slots: request r
  reads slots `kv_slots[kv_indptr[r]:kv_indptr[r+1]]` (see `paged_kv` for
  building them from SGLang's `req_to_token` or vLLM's block table).
- Positions: key j of a request sits at position j; with kv_len L and q_len n,
  query i sits at position L - n + i (the new tokens are the last n keys).
- GQA/MQA: query head h reads kv head h // (num_qo_heads // num_kv_heads).
- Score: s = sm_scale * q·k; with a soft-cap c > 0, s = c * tanh(s / c).
- Visibility of key j from query position p:
  `custom_mask` given → the mask decides (per request a row-major
  [q_len, kv_len] bool block, True = visible, blocks at `mask_indptr`);
  otherwise causal → j <= p; otherwise all keys. A window w >= 0 then also
  requires j >= p - w (SGLang's `sliding_window_size`; vLLM's `sliding_window`
  W means w = W - 1, see `window_left_from_vllm`).
- Output is softmax(s) @ v over visible keys; `lse` is the natural-log
  log-sum-exp of the visible scores. A row that sees no key gets output 0 and
  lse = -inf (the identity of `merge_states`).
- MLA (absorbed): score = q_nope·c_kv + q_pe·k_pe, value = c_kv, over one
  latent row per token; it is MQA with K = [c_kv, k_pe] and V = c_kv.

Computation is float32 by default; tests pass `compute_dtype=torch.float64`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import fp8
from .paged_kv import PagedKVCache

# Bounds the [heads, rows, kv_len] score block of one chunk, so a 32k-token
# request runs without materialising a full square of scores.
_MAX_SCORE_ELEMENTS = 1 << 26


# How close a kernel's fp16/bf16 output must come to this float reference (abs + rel, by
# output dtype; bf16 keeps 8 mantissa bits): the GPU tests and the fuzzer judge by it.
KERNEL_TOLERANCE = {torch.bfloat16: 1.5e-2, torch.float16: 4e-3}


class AttentionOutput(NamedTuple):
    out: torch.Tensor  # [total_q, num_qo_heads, head_dim_v]
    lse: torch.Tensor  # [total_q, num_qo_heads], natural log


def window_left_from_vllm(sliding_window: int | None) -> int:
    """vLLM's `sliding_window` W (W keys including the query's own) → our window_left (W - 1)."""
    return -1 if sliding_window is None or sliding_window <= 0 else sliding_window - 1


def default_mask_indptr(q_lens: list[int], kv_lens: list[int]) -> list[int]:
    offsets = [0]
    for n, length in zip(q_lens, kv_lens):
        offsets.append(offsets[-1] + n * length)
    return offsets


def visibility(q_len: int, kv_len: int, *, causal: bool, window_left: int,
               custom_mask: torch.Tensor | None, device) -> torch.Tensor:
    """Bool [q_len, kv_len]: which keys each query of one request may attend to."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    if custom_mask is not None:
        visible = custom_mask.to(device=device, dtype=torch.bool).view(q_len, kv_len).clone()
    elif causal:
        visible = k_pos <= q_pos
    else:
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if window_left >= 0:
        visible &= k_pos >= q_pos - window_left
    return visible


def _attend_one_request(q, k, v, visible, sm_scale, logits_soft_cap):
    """q [n, Hq, Dk], k [L, Hkv, Dk], v [L, Hkv, Dv], visible [n, L] → out, lse."""
    n, num_qo_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    group = num_qo_heads // num_kv_heads
    # [Hkv, group, n, D] against [Hkv, L, D]: each kv head serves its group.
    qg = q.view(n, num_kv_heads, group, -1).permute(1, 2, 0, 3)
    scores = torch.einsum("hgnd,lhd->hgnl", qg, k) * sm_scale
    if logits_soft_cap > 0:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, group, n]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows with lse=-inf → 0
    out = torch.einsum("hgnl,lhd->nhgd", probs, v).reshape(n, num_qo_heads, -1)
    return out, lse.permute(2, 0, 1).reshape(n, num_qo_heads)


def attention(q: torch.Tensor, qo_indptr, cache: PagedKVCache, kv_indptr, kv_slots: torch.Tensor,
              *, sm_scale: float | None = None, causal: bool = True, window_left: int = -1,
              logits_soft_cap: float = 0.0, custom_mask: torch.Tensor | None = None,
              mask_indptr=None, compute_dtype: torch.dtype = torch.float32) -> AttentionOutput:
    """Ragged queries over a paged KV cache; see the module docstring for the semantics."""
    qo = _as_list(qo_indptr)
    kv = _as_list(kv_indptr)
    if len(qo) != len(kv):
        raise ValueError(f"qo_indptr has {len(qo) - 1} requests but kv_indptr has {len(kv) - 1}")
    num_qo_heads, head_dim_k = q.shape[1], q.shape[2]
    if num_qo_heads % cache.num_kv_heads:
        raise ValueError(f"num_qo_heads={num_qo_heads} must be a multiple of num_kv_heads="
                         f"{cache.num_kv_heads}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim_k)
    q_lens = [b - a for a, b in zip(qo, qo[1:])]
    kv_lens = [b - a for a, b in zip(kv, kv[1:])]
    if custom_mask is not None:
        mask_offsets = _as_list(mask_indptr) if mask_indptr is not None else \
            default_mask_indptr(q_lens, kv_lens)
    out = torch.zeros(q.shape[0], num_qo_heads, cache.head_dim_v, dtype=compute_dtype,
                      device=q.device)
    lse = torch.full((q.shape[0], num_qo_heads), float("-inf"), dtype=compute_dtype,
                     device=q.device)
    for r, (n, length) in enumerate(zip(q_lens, kv_lens)):
        if n == 0:
            continue
        if (causal or custom_mask is not None or window_left >= 0) and length < n:
            raise ValueError(f"request {r}: kv_len {length} < q_len {n}; the queries must be the "
                             "last tokens of the sequence")
        k, v = cache.gather_values(kv_slots[kv[r]:kv[r + 1]], compute_dtype)
        mask_r = None
        if custom_mask is not None:
            mask_r = custom_mask[mask_offsets[r]:mask_offsets[r] + n * length]
        visible = visibility(n, length, causal=causal, window_left=window_left,
                             custom_mask=mask_r, device=q.device)
        rows_per_chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, num_qo_heads * length))
        for start in range(0, n, rows_per_chunk):
            stop = min(n, start + rows_per_chunk)
            rows = slice(qo[r] + start, qo[r] + stop)
            out[rows], lse[rows] = _attend_one_request(
                q[rows].to(compute_dtype), k, v, visible[start:stop], sm_scale, logits_soft_cap)
    return AttentionOutput(out, lse)


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, qo_indptr, cache: PagedKVCache,
                  kv_indptr, kv_slots: torch.Tensor, *, sm_scale: float, **kwargs) -> AttentionOutput:
    """Absorbed MLA: q_nope [T, H, R] and q_pe [T, H, Rd] over a `PagedKVCache.from_mla` cache."""
    if q_nope.shape[-1] + q_pe.shape[-1] != cache.head_dim_k:
        raise ValueError(f"q_nope ({q_nope.shape[-1]}) + q_pe ({q_pe.shape[-1]}) must equal the "
                         f"cache row width {cache.head_dim_k}")
    q = torch.cat([q_nope, q_pe], dim=-1)
    return attention(q, qo_indptr, cache, kv_indptr, kv_slots, sm_scale=sm_scale, **kwargs)


def merge_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                 lse_b: torch.Tensor) -> AttentionOutput:
    """Attention over keys A ∪ B from the partial results over A and over B."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - lse).nan_to_num(0.0)  # both -inf → nothing seen → 0
    weight_b = torch.exp(lse_b - lse).nan_to_num(0.0)
    return AttentionOutput(out_a * weight_a[..., None] + out_b * weight_b[..., None], lse)


def merge_state_list(outs: torch.Tensor, lses: torch.Tensor) -> AttentionOutput:
    """Merge partial states stacked on dim 0: outs [S, ..., D], lses [S, ...]."""
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse[None]).nan_to_num(0.0)
    return AttentionOutput((outs * weights[..., None]).sum(0), lse)


def write_kv(cache: PagedKVCache, slots: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor, *, via_input_dtype: bool = False) -> None:
    """Store new rows at token slots in place; slot -1 marks padding and is skipped. An FP8
    cache stores them quantised with its scales (attn_backend.fp8.quantize; `via_input_dtype`
    is SGLang's rounding); the caller's tensors are left as they are."""
    keep = slots >= 0
    page, offset = cache.page_and_offset(slots[keep])
    if cache.is_fp8:
        k_scale, v_scale = cache.scales_per_head()
        # Through uint8 views, as the engines store them (index_put has no float8 kernel on
        # some torch builds).
        cache.k.view(torch.uint8)[page, offset] = \
            fp8.quantize(key[keep], k_scale, cache.dtype,
                         via_input_dtype=via_input_dtype).view(torch.uint8)
        cache.v.view(torch.uint8)[page, offset] = \
            fp8.quantize(value[keep], v_scale, cache.dtype,
                         via_input_dtype=via_input_dtype).view(torch.uint8)
        return
    cache.k[page, offset] = key[keep].to(cache.dtype)
    cache.v[page, offset] = value[keep].to(cache.dtype)


def _as_list(indptr) -> list[int]:
    return indptr.tolist() if isinstance(indptr, torch.Tensor) else list(indptr)
