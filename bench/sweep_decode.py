"""Time alternative shapes of the decode kernel (d128, bf16 queries, GQA 32/8) on a few batches.

    python -m bench.sweep_decode [--shapes 64x4096x16,1x32768x16,64x4096x1o] [--profile VARIANT]
        [--plans shipped,balanced] [--trace] [--kv bf16|fp8e4m3]

`--kv fp8e4m3`: an e4m3 cache (scale 1) and the FP8 list of shapes (FP8_VARIANTS: half the
bytes per key, so deeper rings and wider tiles fit where bf16's do not).

Each (stages, warps, keys per warp) in VARIANTS is compiled (one translation unit per shape,
built in parallel) into a side extension whose op launches it over exactly the
run op's parameters (bench/variants.py, kernels/csrc/attention_params.h). Each
variant gets its own schedule from the planner's specification, for its tile
and the CTAs of its shape that fit on an SM, written into a shipped wrapper's
workspace (variants.install_schedule); every run is
checked against the shipped op's output, and FlashInfer's tensor-core decode
is timed on the same paged data when it is installed. `--profile V` runs only
variant V (and FlashInfer) a few times, for `ncu`. A shape ending in "o" keeps each
request's pages in address order instead of shuffled. `--plans` times each variant
under other schedules (attn_backend/schedule.py). `--trace` also runs the shipped
shape built with ATTN_BACKEND_DECODE_TRACE under each plan and prints its CTA
timeline: how long CTAs wait for their first tile, how many stream at once, the tail,
and how long the split merges take.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

import attn_backend
from attn_backend import PageTable
from attn_backend.schedule import (ITEM_OVERHEAD_TOKENS, TileShape, WorkSchedule, kv_ranges,
                                   plan_decode)

from .bench_decode import (HEAD_DIM, NUM_KV_HEADS, NUM_QO_HEADS, Peers, kv_bytes, make_decode,
                           make_problem)
from .common import copy_ceiling_tbs, median_ms
from .variants import TRACE_FIELDS, build_variant_extension, checked_run, install_schedule
from .variants import variant_unit as variant_unit_of

GROUP = NUM_QO_HEADS // NUM_KV_HEADS


def plan_decode_balanced(kv_lens: np.ndarray, *, window_left: int, num_kv_heads: int,
                         group_size: int, shape: TileShape, cta_slots: int) -> WorkSchedule:
    """Tried against plan_decode (session 7, H100): no faster at 64 x 4k (365 vs 364 us),
    16 x 8k and 1 x 32k, 0.5% faster at 256 x 4k, 4% slower at 64 x 512. Kept to retry.

    A stream-K style schedule: the keys of all requests, laid end to end, are dealt to
    `lanes` = cta_slots // num_kv_heads equal shares (tokens plus a per-item overhead);
    a request crossing a share boundary is split there (whole tiles). Items are ordered by
    the time their lane would start them, so the hardware's in-order dispatch hands each
    free CTA slot the next piece: every slot does about the same work, and CTAs start and
    finish at staggered times instead of all together. (Group sizes up to one row tile.)"""
    assert group_size <= shape.rows
    tile = shape.kv_tokens  # the chunk granularity and the smallest chunk
    batch = len(kv_lens)
    starts, ends = kv_ranges(kv_lens, window_left)
    lengths = ends - starts
    lanes = max(1, cta_slots // num_kv_heads)
    cost_total = int(lengths.sum()) + (batch + lanes) * ITEM_OVERHEAD_TOKENS
    share = max(tile + ITEM_OVERHEAD_TOKENS, -(-cost_total // lanes))
    # `dealt` runs over all lanes' costs laid end to end: lane k's share is
    # [k * share, (k + 1) * share), so rounding a cut to whole tiles never accumulates.
    request, item_start, item_end, item_lane, item_time = [], [], [], [], []
    lane, dealt = 0, 0
    for r in range(batch):
        position, end = int(starts[r]), int(ends[r])
        while True:
            room = (lane + 1) * share - dealt - ITEM_OVERHEAD_TOKENS
            if room < tile // 2 and lane < lanes - 1 and position < end:
                lane += 1
                continue
            remaining = end - position
            take = remaining
            if lane < lanes - 1 and remaining > room:
                take = max(tile, (room + tile // 2) // tile * tile)
                if remaining - take < tile // 2:
                    take = remaining  # no sliver left behind
            request.append(r)
            item_start.append(position)
            item_end.append(position + take)
            item_lane.append(lane)
            item_time.append(max(0, dealt - lane * share))
            dealt += take + ITEM_OVERHEAD_TOKENS
            position += take
            if position >= end:
                break
    request = np.array(request, dtype=np.int64)
    counts = np.bincount(request, minlength=batch)
    split = counts > 1
    group_of = np.cumsum(split) - 1  # each split request is a merge group
    merge_indptr = np.concatenate([[0], np.cumsum(counts[split])])
    first_item = np.cumsum(counts) - counts
    index_in_request = np.arange(len(request)) - first_item[request]
    merge_group = np.where(split[request], group_of[request], -1)
    partial = np.where(split[request], merge_indptr[np.maximum(merge_group, 0)] + index_in_request,
                       -1)
    order = np.lexsort((np.array(item_lane), np.array(item_time)))  # by start time, then lane
    items = np.stack([request, np.zeros_like(request), np.array(item_start), np.array(item_end),
                      partial, merge_group])[:, order].astype(np.int32)
    return WorkSchedule(items, merge_indptr.astype(np.int32), share, batch)


PLANS = {"shipped": plan_decode, "balanced": plan_decode_balanced}

# (stages, warps, keys per warp): the ring depth, the warps of a CTA and each warp's keys of
# a tile (a multiple of 16).
VARIANTS = [(2, 4, 16), (3, 4, 16), (3, 3, 16), (4, 3, 16), (3, 2, 16), (2, 3, 16)]
# FP8: the split shape (3, 4) and the full-batch family around the shipped (2, 3), which the
# plans run at 64-256 requests. Session 12 (H200, 64 x 4k p16): deeper rings (4-6 stages) and
# 8 warps lost 20-60% against the shipped shapes, so these try fewer or more warps per CTA
# (more CTAs per SM) instead; and 32 keys per warp, which halves the tiles, barriers and
# softmax steps per key (an FP8 64-key tile is only 8 KB of K and V per stage at d128).
FP8_VARIANTS = [(3, 4, 16), (2, 3, 16), (3, 3, 16), (2, 2, 16), (2, 3, 32), (2, 2, 32),
                (3, 4, 32)]
KV_TYPES = {"bf16": (torch.bfloat16, "__nv_bfloat16"),
            "fp8e4m3": (torch.float8_e4m3fn, "__nv_fp8_e4m3")}

def variant_unit(i: int, stages: int, warps: int, tokens: int, kv_type: str) -> str:
    return variant_unit_of(
        i, header="decode.cuh",
        traits=f"DecodeTraits<DecodeShape<128, 128, {stages}, {warps}, {tokens}>, __nv_bfloat16, "
               f"{kv_type}, __nv_bfloat16>",
        kernel="paged_decode_kernel<{}, LogitsTransform<false>>", tile_tokens="kTileTokens")


_TRACE_DEFINE = "#define ATTN_BACKEND_DECODE_TRACE\n"
SHIPPED_SHAPE = (2, 4, 16)  # kernels/csrc/decode_kernels.cu's SplitDecodeShape<128, 128>


def build_variants(kv="bf16"):
    kv_type = KV_TYPES[kv][1]
    units = [variant_unit(i, stages, warps, tokens, kv_type)
             for i, (stages, warps, tokens) in enumerate(variant_shapes(kv))]
    name = f"attn_backend_decode_variants_{kv}"
    build_variant_extension(name, units)
    return getattr(torch.ops, name)


def variant_shapes(kv: str) -> list[tuple[int, int, int]]:
    return FP8_VARIANTS if kv != "bf16" else VARIANTS


def build_traced(kv="bf16"):
    """The shipped shape as variant 0, with the CTA timeline compiled in."""
    unit = variant_unit(0, *SHIPPED_SHAPE, KV_TYPES[kv][1])
    name = f"attn_backend_decode_trace_{kv}"
    build_variant_extension(name, [unit], prefix=_TRACE_DEFINE)
    return getattr(torch.ops, name)


def launch(ops, variant, decode, plan, q, cache, table, out, trace=None):
    """One run of `variant` of `ops` with the schedule `plan` installed in `decode`."""
    ops.run(variant, q, cache.k, cache.v, table.table, table.holds_token_slots,
            decode._workspace.tensor, plan, HEAD_DIM, 16, 1 / HEAD_DIM ** 0.5, out, trace)


def planned_decode(batch, kv_len, tile_tokens, cta_slots, plan_name, kv_dtype=torch.bfloat16):
    """A PagedDecode whose workspace holds `plan_name`'s schedule of `batch` x `kv_len` for
    tiles of `tile_tokens` keys over `cta_slots` CTAs, the plan-info record of it and its
    number of work items (the wrapper's own plan may have another)."""
    decode = make_decode(batch, kv_dtype, cta_slots=cta_slots, backend="split")
    decode.plan([kv_len] * batch)
    schedule = PLANS[plan_name](np.full(batch, kv_len), window_left=-1,
                                num_kv_heads=NUM_KV_HEADS, group_size=GROUP,
                                shape=TileShape(16, tile_tokens), cta_slots=cta_slots)
    plan = install_schedule(decode, schedule, partial_rows=min(GROUP, 16))
    return decode, plan, schedule.num_items


def trace_summary(trace: np.ndarray, slots: int) -> str:
    """One line on a traced launch: span, waits for the first tile, epilogues, streaming CTAs,
    and the split merges: how long the merging CTAs took over their partials and how far the
    last merge ran past the last CTA that did not merge."""
    start, first_tile, loop_end, end, _, merge_start = (trace[:, i].astype(np.float64)
                                                        for i in range(TRACE_FIELDS))
    origin = start.min()
    span = end.max() - origin
    grid = np.linspace(origin, end.max(), 2000)
    resident = ((start[None, :] <= grid[:, None]) & (grid[:, None] < end[None, :])).sum(1)
    streaming = ((first_tile[None, :] <= grid[:, None]) &
                 (grid[:, None] < loop_end[None, :])).sum(1)
    full = np.flatnonzero(resident >= 0.9 * slots)
    fill = (grid[full[0]] - origin) if full.size else span
    tail = (end.max() - grid[full[-1]]) if full.size else span
    merging = merge_start > 0
    epilogue_end = np.where(merging, merge_start, end)  # a merging CTA's epilogue ends there
    line = (f"span {span / 1e3:7.1f} us | first tile after {np.median(first_tile - start) / 1e3:.2f} "
            f"us (median) | epilogue {np.median(epilogue_end - loop_end) / 1e3:.2f} us | CTA "
            f"{np.median(end - start) / 1e3:.1f} us | resident {resident.mean() / slots:.2f} "
            f"streaming {streaming.mean() / slots:.2f} of slots | fill {fill / 1e3:.1f} us "
            f"tail {tail / 1e3:.1f} us")
    # How evenly the CTAs stream: the spread of their loop ends (from the launch's first
    # start) says whether the last CTAs finish late because they got less bandwidth.
    ends_at = np.percentile(loop_end - origin, [10, 50, 90, 100]) / 1e3
    loop = np.percentile(loop_end - first_tile, [10, 50, 90, 100]) / 1e3
    line += (f" | loop ends p10/50/90/max {'/'.join(f'{v:.1f}' for v in ends_at)} us | "
             f"loop p10/50/90/max {'/'.join(f'{v:.1f}' for v in loop)} us")
    if merging.any():
        merge = end[merging] - merge_start[merging]
        others_end = end[~merging].max() if (~merging).any() else origin
        line += (f" | {int(merging.sum())} merges {np.median(merge) / 1e3:.2f} us (max "
                 f"{merge.max() / 1e3:.2f}), the last ends {(end.max() - others_end) / 1e3:.2f} us "
                 f"after the last other CTA")
    return line


def run_shape(variants, ops, batch, kv_len, page_size, ordered, peers, ceiling, profile, plans,
              traced, back_to_back=1, kv="bf16"):
    def timed(fn):
        """Device time of one call, from `back_to_back` calls queued together (as a model's
        layers run them), so that a launch may overlap the one before it (PDL)."""
        if back_to_back == 1:
            return median_ms(fn)
        return median_ms(lambda: [fn() for _ in range(back_to_back)]) / back_to_back

    gen = torch.Generator().manual_seed(0)
    kv_dtype = KV_TYPES[kv][0]
    shapes = variant_shapes(kv)
    cache, pages, q = make_problem(batch, kv_len, page_size, gen, kv_dtype)
    if ordered:  # each request's pages in address order: no random access between pages
        pages = torch.arange(pages.numel(), dtype=torch.int32).view_as(pages)
    page_size = f"{page_size}{'o' if ordered else ''}"
    table = PageTable.from_block_table(pages.cuda())
    shipped = make_decode(batch, kv_dtype)
    shipped.plan([kv_len] * batch)
    want = shipped.run(q, cache, table)
    results = {}
    if not profile:
        results[f"shipped (pdl={shipped.enable_pdl})"] = timed(
            lambda: shipped.run(q, cache, table, out=want))
        no_pdl = make_decode(batch, kv_dtype, enable_pdl=False)
        no_pdl.plan([kv_len] * batch)
        out = torch.full_like(q, float("nan"))
        no_pdl.run(q, cache, table, out=out)
        assert torch.equal(out, want), "the launch mode changed the result"
        results["shipped (pdl=False)"] = timed(lambda: no_pdl.run(q, cache, table, out=out))
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for v in variants:
        _, tile, ctas, _ = ops.info(v)
        for plan_name in plans:
            decode, plan, items = planned_decode(batch, kv_len, tile, max(1, ctas) * num_sms,
                                                 plan_name, kv_dtype)
            out = torch.full_like(q, float("nan"))

            def call():
                launch(ops, v, decode, plan, q, cache, table, out)

            diff = checked_run(call, out, want, profile)
            if diff is None:
                continue
            name = (f"v{v} stages={shapes[v][0]} warps={shapes[v][1]} keys/warp={shapes[v][2]} "
                    f"ctas/SM={ctas} "
                    f"{plan_name} items={items}")
            results[f"{name} diff={diff:.2g}"] = timed(call)
    if peers.flashinfer is not None:
        fn = peers.flashinfer_decode(True, cache, pages, kv_len, q)
        if profile:
            for _ in range(3):
                fn()
        else:
            results["flashinfer (tensor cores)"] = timed(fn)
    torch.cuda.synchronize()
    for name, ms in results.items():
        tbs = kv_bytes(batch, kv_len, kv_dtype) / (ms * 1e-3) / 1e12
        print(f"  b{batch} kv{kv_len} p{page_size}  {name:76s} {ms * 1e3:8.1f} us "
              f"{tbs:.3f} TB/s {tbs / ceiling:.2f} of copy")
    if traced is not None:
        _, tile, ctas, _ = traced.info(0)
        for plan_name in plans:
            decode, plan, items = planned_decode(batch, kv_len, tile, max(1, ctas) * num_sms,
                                                 plan_name, kv_dtype)
            out = torch.empty_like(q)
            lines = []
            for _ in range(3):  # the first launch is a warm-up
                trace = torch.zeros(NUM_KV_HEADS * items, TRACE_FIELDS, dtype=torch.int64,
                                    device="cuda")
                launch(traced, 0, decode, plan, q, cache, table, out, trace)
                torch.cuda.synchronize()
                lines.append(trace_summary(trace.cpu().numpy(), max(1, ctas) * num_sms))
            for line in lines[1:]:
                print(f"  b{batch} kv{kv_len} p{page_size}  trace {plan_name:9s} {line}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="64x4096x16,256x4096x16,1x32768x16,16x32768x16,"
                                            "1x512x16,16x4096x16,"
                                            "64x512x16")
    parser.add_argument("--variants", default=None,
                        help="comma-separated indices (default all), or none")
    parser.add_argument("--profile", type=int, default=None)
    parser.add_argument("--plans", default="shipped", help=f"comma-separated, of {list(PLANS)}")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--back-to-back", type=int, default=1,
                        help="time N calls queued together, per call (PDL overlaps them)")
    parser.add_argument("--kv", default="bf16", choices=list(KV_TYPES))
    args = parser.parse_args()
    plans = args.plans.split(",")
    attn_backend.set_debug_checks(False)
    # `--variants none` (e.g. with --trace) builds no variant extension at all.
    ops = None if args.variants == "none" and args.profile is None else build_variants(args.kv)
    traced = build_traced(args.kv) if args.trace else None
    peers = Peers()
    ceiling = copy_ceiling_tbs()
    print(f"copy ceiling {ceiling:.3f} TB/s")
    if args.profile is not None:
        variants = [args.profile]
    elif args.variants == "none":
        variants = []
    elif args.variants:
        variants = [int(v) for v in args.variants.split(",")]
    else:
        variants = list(range(len(variant_shapes(args.kv))))
    for shape in args.shapes.split(","):
        ordered = shape.endswith("o")
        batch, kv_len, page_size = map(int, shape.rstrip("o").split("x"))
        run_shape(variants, ops, batch, kv_len, page_size, ordered, peers, ceiling,
                  args.profile is not None, plans, traced, args.back_to_back, args.kv)
        torch.cuda.empty_cache()  # the shape's cache is gone with run_shape's frame


if __name__ == "__main__":
    main()
