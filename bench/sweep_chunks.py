"""Decode time against a forced split-KV chunk size, to calibrate the planner's cost model.

    python3 -m bench.sweep_chunks

Each forced chunk's schedule comes from the planner's specification (schedule.schedule_ranges)
and runs on the shipped kernel from the wrapper's workspace (bench/variants.py).
"""

from __future__ import annotations

import numpy as np
import torch

import attn_backend
from attn_backend import PageTable, schedule

from .bench_decode import NUM_KV_HEADS, NUM_QO_HEADS, kv_bytes, make_decode, make_problem
from .common import median_ms
from .variants import install_schedule, run_with_plan

# H200 (split shape: 2 stages x 3 CTAs per SM, 396 slots): the planner picks 128 keys at
# 1 x 4k, 704 at 1 x 32k, 192 at 16 x 512, 1408 at 16 x 4k.
CASES = {(1, 512): (64, 128, 256), (16, 512): (64, 128, 192, 256, 512),
         (1, 1024): (64, 128, 256), (2, 2048): (64, 128, 256),
         (1, 4096): (64, 128, 192, 256, 384, 512, 1024),
         (1, 32768): (256, 384, 512, 704, 1024, 1408, 2048, 4096),
         (16, 4096): (704, 1024, 1408, 2048, 4096)}


def main() -> None:
    attn_backend.set_debug_checks(False)
    gen = torch.Generator().manual_seed(0)
    group = NUM_QO_HEADS // NUM_KV_HEADS
    for (batch, kv_len), chunks in CASES.items():
        cache, pages, q = make_problem(batch, kv_len, 16, gen)
        table = PageTable.from_block_table(pages.cuda())
        decode = make_decode(batch)
        decode.plan([kv_len] * batch)
        out = torch.empty_like(q)
        ms = median_ms(lambda: decode.run(q, cache, table, out=out))
        line = [f"b{batch} kv{kv_len} planner (chunk {decode._planned.plan['chunk_tokens']}, "
                f"{decode._planned.plan['num_items']} items): "
                f"{kv_bytes(batch, kv_len) / (ms * 1e-3) / 1e12:.3f} TB/s"]
        starts, ends = schedule.kv_ranges(np.full(batch, kv_len), -1)
        for chunk in chunks:
            forced = schedule.schedule_ranges(np.arange(batch), np.zeros(batch, dtype=np.int64),
                                              starts, ends, row_tiles=1, tile_rows=16,
                                              chunk=chunk)
            plan = install_schedule(decode, forced, partial_rows=min(group, 16))
            ms = median_ms(lambda: run_with_plan(decode, plan, q, cache, table, out))
            line.append(f"c{chunk}: {kv_bytes(batch, kv_len) / (ms * 1e-3) / 1e12:.3f}")
        print(" | ".join(line), flush=True)
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
