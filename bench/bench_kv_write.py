"""Paged KV write bandwidth: new K/V rows scattered into the cache at shuffled slots.

Bytes counted: the new rows read plus the same bytes written to the cache
(slots and page tables are negligible). The peer is torch's indexed store,
which is what a backend without a kernel does (`k_buffer[loc] = k`).
"""

from __future__ import annotations

import torch

import attn_backend
from attn_backend import reference
from attn_backend.paged_kv import PagedKVCache

from .common import median_ms

CASES = [  # (tokens, kv heads, head dim, page size, layout)
    (8192, 8, 128, 16, "sglang"),
    (8192, 8, 128, 1, "sglang"),
    (8192, 8, 128, 16, "vllm_nhd"),
    (64, 8, 128, 16, "sglang"),
]


def make_cache(layout: str, num_pages: int, page_size: int, heads: int, head_dim: int):
    dtype = torch.bfloat16
    if layout == "sglang":
        shape = (num_pages * page_size, heads, head_dim)
        return PagedKVCache.from_sglang(torch.randn(shape, dtype=dtype, device="cuda"),
                                        torch.randn(shape, dtype=dtype, device="cuda"), page_size)
    packed = torch.randn(num_pages, page_size, heads, 2 * head_dim, dtype=dtype, device="cuda")
    return PagedKVCache.from_vllm(packed.transpose(1, 2), head_dim)


def run() -> tuple[str, list[dict], list[str]]:
    rows = []
    for tokens, heads, head_dim, page_size, layout in CASES:
        num_pages = max(4 * tokens // page_size, 1024)
        cache = make_cache(layout, num_pages, page_size, heads, head_dim)
        slots = torch.randperm(num_pages * page_size, device="cuda")[:tokens]
        key = torch.randn(tokens, heads, head_dim, dtype=torch.bfloat16, device="cuda")
        value = torch.randn_like(key)
        moved = 2 * 2 * key.numel() * key.element_size()  # K and V, read and written

        def ours():
            attn_backend.write_kv(cache, slots, key, value)

        def indexed_store():
            reference.write_kv(cache, slots, key, value)

        attn_backend.set_debug_checks(False)
        tbs = {name: moved / (median_ms(fn) * 1e-3) / 1e12
               for name, fn in (("ours", ours), ("torch_index_put", indexed_store))}
        rows.append({
            "case": f"t{tokens}_h{heads}_d{head_dim}_bf16_p{page_size}_{layout}",
            "ours": round(tbs["ours"], 4),
            "peers": {"torch_index_put": round(tbs["torch_index_put"], 4)},
        })
    return "TB/s", rows, []
