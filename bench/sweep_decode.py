"""Ours only, a few decode shapes, one line each: for quick A/B runs of kernel variants.

    ATTN_BACKEND_DECODE_STAGES=2 python3 -m bench.sweep_decode
"""

from __future__ import annotations

import os

import torch

import attn_backend
from attn_backend import PagedDecode, PagedKVCache, PageTable

from .bench_decode import HEAD_DIM, NUM_KV_HEADS, NUM_QO_HEADS, _shuffled_pages
from .common import copy_ceiling_tbs, median_ms

SHAPES = [(64, 4096, 16), (64, 4096, 1), (256, 4096, 16), (16, 32768, 16), (1, 32768, 16),
          (64, 512, 16), (256, 512, 16)]


def main() -> None:
    attn_backend.set_debug_checks(False)
    gen = torch.Generator().manual_seed(0)
    ceiling = copy_ceiling_tbs()
    tag = os.environ.get("ATTN_BACKEND_DECODE_STAGES", "default")
    for batch, kv_len, page_size in SHAPES:
        k = torch.randn(batch * kv_len + 1024, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16,
                        device="cuda")
        cache = PagedKVCache.from_sglang(k, torch.randn_like(k), page_size)
        pages = _shuffled_pages(batch, kv_len, page_size, cache.num_pages, gen)
        q = torch.randn(batch, NUM_QO_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        decode = PagedDecode(num_qo_heads=NUM_QO_HEADS, num_kv_heads=NUM_KV_HEADS,
                             head_dim=HEAD_DIM, dtype=torch.bfloat16, device="cuda",
                             max_batch_size=batch)
        decode.plan([kv_len] * batch)
        table = PageTable.from_block_table(pages.cuda())
        out = torch.empty_like(q)
        ms = median_ms(lambda: decode.run(q, cache, table, out=out))
        moved = 2 * batch * kv_len * NUM_KV_HEADS * HEAD_DIM * 2 + 4 * q.numel()
        tbs = moved / (ms * 1e-3) / 1e12
        print(f"stages={tag} b{batch} kv{kv_len} p{page_size}: {ms * 1e3:8.1f} us "
              f"{tbs:.3f} TB/s ({tbs / ceiling:.2f} of copy {ceiling:.2f}) "
              f"cta_slots={decode.cta_slots}", flush=True)
        del k, cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
