"""Decode time against a forced split-KV chunk size, to calibrate the planner's cost model.

    python3 -m bench.sweep_chunks
"""

from __future__ import annotations

import torch

import attn_backend
from attn_backend import PageTable, schedule

from .bench_decode import kv_bytes, make_decode, make_problem
from .common import median_ms

CASES = {(1, 512): (64, 128, 192, 256, 512), (16, 512): (64, 128, 256, 512),
         (4, 512): (64, 128, 256, 512), (8, 1024): (64, 128, 256, 512), (2, 2048): (64, 128, 256),
         (1, 1024): (64, 128, 256),
         (1, 4096): (128, 192, 256, 384, 512, 1024), (1, 32768): (256, 384, 512, 704, 1024, 2048),
         (16, 4096): (512, 1024, 1408, 2048, 4096), (64, 4096): (1024, 1408, 2048, 4096)}


def main() -> None:
    attn_backend.set_debug_checks(False)
    gen = torch.Generator().manual_seed(0)
    planned = schedule.choose_chunk
    for (batch, kv_len), chunks in CASES.items():
        cache, pages, q = make_problem(batch, kv_len, 16, gen)
        table = PageTable.from_block_table(pages.cuda())
        decode = make_decode(batch)
        decode.plan([kv_len] * batch)
        ms = median_ms(lambda: decode.run(q, cache, table))
        line = [f"b{batch} kv{kv_len} planner ({decode._planned.num_work_items} items): "
                f"{kv_bytes(batch, kv_len) / (ms * 1e-3) / 1e12:.3f} TB/s"]
        native_planner = decode._native_planner
        decode._native_planner = None  # the numpy planner, whose choose_chunk is replaced here
        try:
            for chunk in chunks:
                schedule.choose_chunk = lambda *args, c=chunk: c
                decode.plan([kv_len] * batch)
                ms = median_ms(lambda: decode.run(q, cache, table))
                line.append(f"c{chunk}: {kv_bytes(batch, kv_len) / (ms * 1e-3) / 1e12:.3f}")
        finally:
            schedule.choose_chunk = planned
            decode._native_planner = native_planner
        print(" | ".join(line), flush=True)
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
