"""Ours only, a few decode shapes, one line each: for quick A/B runs of kernel variants.

    python3 -m bench.sweep_decode
"""

from __future__ import annotations

import torch

import attn_backend
from attn_backend import PageTable

from .bench_decode import kv_bytes, make_decode, make_problem
from .common import copy_ceiling_tbs, median_ms

SHAPES = [(64, 4096, 16), (64, 4096, 1), (256, 4096, 16), (16, 32768, 16), (1, 32768, 16),
          (64, 512, 16), (256, 512, 16)]


def main() -> None:
    attn_backend.set_debug_checks(False)
    gen = torch.Generator().manual_seed(0)
    ceiling = copy_ceiling_tbs()
    for batch, kv_len, page_size in SHAPES:
        cache, pages, q = make_problem(batch, kv_len, page_size, gen)
        decode = make_decode(batch)
        decode.plan([kv_len] * batch)
        table = PageTable.from_block_table(pages.cuda())
        out = torch.empty_like(q)
        ms = median_ms(lambda: decode.run(q, cache, table, out=out))
        tbs = kv_bytes(batch, kv_len) / (ms * 1e-3) / 1e12
        print(f"b{batch} kv{kv_len} p{page_size}: {ms * 1e3:8.1f} us {tbs:.3f} TB/s "
              f"({tbs / ceiling:.2f} of copy {ceiling:.2f}), {decode._planned.num_work_items} "
              f"items x {decode.num_kv_heads} heads on {decode.cta_slots} CTA slots", flush=True)
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
