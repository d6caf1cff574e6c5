"""Decode time through each page-table form on identical K/V (a quick probe, not the suite).

SGLang's token-slot table (`req_to_token`) and vLLM's block table address the same
slots; this times `PagedDecode.run` through both, with slots laid out as a fresh
SGLang pool hands them out (request after request) and as shuffled pages.

    python -m bench.probe_page_tables
"""

from __future__ import annotations

import torch

import attn_backend
from attn_backend import PagedDecode, PagedKVCache, PageTable

from .common import median_ms, shuffled_pages

HEADS, KV_HEADS, DIM = 32, 8, 128


def main() -> None:
    attn_backend.set_debug_checks(False)
    gen = torch.Generator().manual_seed(0)
    print("batch kv_len page layout table us")
    for batch, kv_len in ((64, 4096), (16, 8192), (1, 8192)):
        slots = batch * kv_len + 1024
        k = torch.randn(slots, KV_HEADS, DIM, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        q = torch.randn(batch, HEADS, DIM, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        decode = PagedDecode(num_qo_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=DIM,
                             dtype=torch.bfloat16, device="cuda", max_batch_size=batch,
                             use_cuda_graph=True)
        decode.plan([kv_len] * batch)
        for page in (1, 16):
            cache = PagedKVCache.from_sglang(k, v, page)
            pages_per_request = -(-kv_len // page)
            for layout in ("in_order", "shuffled"):
                if layout == "in_order":
                    pages = torch.arange(batch * pages_per_request, dtype=torch.int32).view(
                        batch, pages_per_request) + 1
                else:
                    pages = shuffled_pages(batch, kv_len, page, cache.num_pages, gen)
                pages = pages.cuda()
                t = torch.arange(kv_len, device="cuda")
                token_slots = (pages[:, t // page] * page + t % page).int()
                req_to_token = torch.zeros(batch + 1, kv_len + 64, dtype=torch.int32,
                                           device="cuda")
                req_to_token[1:, :kv_len] = token_slots
                rows = torch.arange(1, batch + 1, device="cuda")
                for name, table in (("block", PageTable.from_block_table(pages)),
                                    ("slots", PageTable.from_req_to_token(req_to_token, rows))):
                    us = median_ms(lambda: decode.run(q, cache, table, out=out)) * 1e3
                    print(f"{batch} {kv_len} {page} {layout} {name} {us:.1f}", flush=True)


if __name__ == "__main__":
    main()
