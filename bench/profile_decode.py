"""One decode shape, ours and FlashInfer's tensor-core decode, for a profiler.

    ncu --clock-control none --kernel-name regex:"paged_decode|Prefill" --launch-skip 5 \\
        --launch-count 2 python3 -m bench.profile_decode --batch 64 --kv-len 4096
"""

from __future__ import annotations

import argparse

import torch

import attn_backend
from attn_backend import PagedDecode, PagedKVCache, PageTable

from .bench_decode import HEAD_DIM, NUM_KV_HEADS, NUM_QO_HEADS, Peers, _shuffled_pages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--kv-len", type=int, default=4096)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    attn_backend.set_debug_checks(False)
    gen = torch.Generator().manual_seed(0)
    num_slots = args.batch * args.kv_len + 1024
    k = torch.randn(num_slots, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    cache = PagedKVCache.from_sglang(k, torch.randn_like(k), args.page_size)
    pages = _shuffled_pages(args.batch, args.kv_len, args.page_size, cache.num_pages, gen)
    q = torch.randn(args.batch, NUM_QO_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    decode = PagedDecode(num_qo_heads=NUM_QO_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                         dtype=torch.bfloat16, device="cuda", max_batch_size=args.batch)
    decode.plan([args.kv_len] * args.batch)
    table = PageTable.from_block_table(pages.cuda())
    for _ in range(args.repeats):
        decode.run(q, cache, table)
    peers = Peers()
    if peers.flashinfer is not None:
        run = peers.flashinfer_decode(True, cache, pages, args.kv_len, q)
        for _ in range(args.repeats):
            run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
