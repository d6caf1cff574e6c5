"""One MLA latent shape (bench_mla's inputs) run a few times, for a profiler.

    ncu --clock-control none --kernel-name regex:paged_mla --launch-skip 2 --launch-count 1 \\
        python3 -m bench.profile_mla --batch 64 --kv-len 4096 --heads 128 --backend wgmma
"""

from __future__ import annotations

import argparse

import torch

import attn_backend
from attn_backend import PagedKVCache, PagedPrefill, PageTable

from .bench_mla import DTYPE, RANK, ROPE
from .common import shuffled_pages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--kv-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--q-len", type=int, default=1)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--backend", default="auto", choices=("auto", "mma", "wgmma", "seesaw"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    attn_backend.set_debug_checks(False)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(args.batch * args.kv_len + 64 * 64, 1, RANK + ROPE, dtype=DTYPE,
                         device="cuda")
    q = torch.randn(args.batch * args.q_len, args.heads, RANK + ROPE, dtype=DTYPE, device="cuda")
    cache = PagedKVCache.from_mla(latent, RANK, args.page_size)
    pages = shuffled_pages(args.batch, args.kv_len, args.page_size, cache.num_pages, gen)
    table = PageTable.from_block_table(pages.cuda())
    mla = PagedPrefill(num_qo_heads=args.heads, num_kv_heads=1, head_dim=RANK + ROPE,
                       head_dim_vo=RANK, dtype=DTYPE, device="cuda", max_batch_size=args.batch,
                       max_num_tokens=args.batch * args.q_len, backend=args.backend)
    mla.plan([args.q_len * r for r in range(args.batch + 1)], [args.kv_len] * args.batch)
    print("planned", mla._planned.config.name, mla._planned.plan["num_work_items"], "work items")
    out = torch.empty(q.shape[0], args.heads, RANK, dtype=DTYPE, device="cuda")
    for _ in range(args.repeats):
        mla.run(q, cache, table, out=out)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
