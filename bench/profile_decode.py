"""One decode shape, ours and FlashInfer's tensor-core decode, for a profiler.

    ncu --clock-control none --kernel-name regex:"paged_decode|Prefill" --launch-skip 4 \\
        --launch-count 1 python3 -m bench.profile_decode --batch 64 --kv-len 4096
"""

from __future__ import annotations

import argparse

import torch

import attn_backend
from attn_backend import PageTable

from .bench_decode import Peers, make_decode, make_problem


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--kv-len", type=int, default=4096)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    attn_backend.set_debug_checks(False)
    cache, pages, q = make_problem(args.batch, args.kv_len, args.page_size,
                                   torch.Generator().manual_seed(0))
    decode = make_decode(args.batch)
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
