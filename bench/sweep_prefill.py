"""Time alternative tile shapes of the prefill kernel (d128, bf16) on a few shapes.

    python -m bench.sweep_prefill [--shapes 1x8192x8192,16x512x4608] [--profile VARIANT]
    python -m bench.sweep_prefill --short [--shapes 64x4x4096,64x8x4096,64x16x4096]

Each shape in VARIANTS is compiled (one translation unit per shape, built in
parallel) into a side extension whose op launches it over exactly the run op's
parameters (bench/variants.py); each variant's schedule comes from the planner's
specification for its tile and CTA slots, written into a shipped wrapper's
workspace. Every run is checked against the shipped op's output, and
FlashInfer's fa2 prefill is timed on the same paged data when it is installed.
`--profile V` runs only variant V (and FlashInfer fa2) a few times, for `ncu`.
`--short` sweeps SHORT_VARIANTS on speculative-verify shapes instead (shape BATCHxQxKV: 64
requests of 4, 8 and 16 tokens on 4k, GQA 32/8: 16, 32 and 64 packed rows per request and kv
head), for the short-query tile between the key-split kernel (16 rows) and the long shapes.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import attn_backend
from attn_backend import PagedKVCache, PagedPrefill, PageTable

from attn_backend.schedule import TileShape, plan_prefill

from .bench_prefill import HEAD_DIM, NUM_KV_HEADS, NUM_QO_HEADS, Peers, flops
from .common import median_ms, shuffled_pages
from .variants import build_variant_extension, checked_run, install_schedule
from .variants import variant_unit as variant_unit_of

# (m-tiles per warp, kv tile, stages, warps, wgmma); wgmma shapes need an sm_90 GPU.
VARIANTS = [(1, 128, 2, 12, True), (1, 128, 2, 8, True), (1, 64, 3, 12, True),
            (2, 64, 2, 8, False)]
# Short queries on mma.sync: the shipped prefill_short (4 warps of 16 rows, 64-key tiles), then
# 32-row tiles (2 warps: a 32-row request computes no padding rows, and twice the CTAs fit an
# SM), deeper rings and 32-key tiles for them, and 64 rows in 2 warps of 2 m-tiles (each K/V
# tile's fragments serve two row tiles per warp).
SHORT_VARIANTS = [(1, 64, 2, 4, False), (1, 64, 2, 2, False), (1, 64, 3, 2, False),
                  (1, 32, 3, 2, False), (2, 64, 2, 2, False), (2, 32, 3, 2, False)]
# A sweep: (its side extension's name, its variants, its default shapes).
SWEEPS = {"long": ("attn_backend_prefill_variants", VARIANTS,
                   "1x8192x8192,16x512x4608,1x64x32768"),
          "short": ("attn_backend_prefill_short_variants", SHORT_VARIANTS,
                    "64x4x4096,64x8x4096,64x16x4096")}

def variant_unit(i: int, m: int, kv: int, stages: int, warps: int, wgmma: bool) -> str:
    flag = "true" if wgmma else "false"
    return variant_unit_of(
        i, header="prefill.cuh",
        traits=f"PrefillTraits<PrefillShape<128, 128, {m}, {kv}, {stages}, {warps}, {flag}>, "
               "__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>",
        kernel="paged_prefill_kernel<{}, LogitsTransform<false>, false>", tile_tokens="kKVTile")


def build_variants(name, shapes):
    units = [variant_unit(i, *shape) for i, shape in enumerate(shapes)]
    build_variant_extension(name, units)
    return getattr(torch.ops, name)


def run_shape(variants, shapes, ops, batch, q_len, kv_len, peers, profile):
    gen = torch.Generator().manual_seed(0)
    k_buffer = torch.randn(batch * kv_len + 1024, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16,
                           device="cuda")
    cache = PagedKVCache.from_sglang(k_buffer, torch.randn_like(k_buffer), 16)
    pages = shuffled_pages(batch, kv_len, 16, cache.num_pages, gen)
    table = PageTable.from_block_table(pages.cuda())
    q = torch.randn(batch * q_len, NUM_QO_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    qo_indptr = [q_len * r for r in range(batch + 1)]
    shipped = PagedPrefill(num_qo_heads=NUM_QO_HEADS, num_kv_heads=NUM_KV_HEADS,
                           head_dim=HEAD_DIM, dtype=torch.bfloat16, device="cuda",
                           max_batch_size=batch, max_num_tokens=4 * batch * q_len)
    shipped.plan(qo_indptr, [kv_len] * batch)
    want = shipped.run(q, cache, table)
    results = {}
    if not profile:
        results["shipped"] = median_ms(lambda: shipped.run(q, cache, table, out=want), iters=20)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for v in variants:
        rows, kv_tile, ctas, _ = ops.info(v)
        slots = max(1, ctas) * num_sms
        # The mma backend's buffers hold partial states of up to 256 rows (any variant's).
        prefill = PagedPrefill(num_qo_heads=NUM_QO_HEADS, num_kv_heads=NUM_KV_HEADS,
                               head_dim=HEAD_DIM, dtype=torch.bfloat16, device="cuda",
                               max_batch_size=batch, max_num_tokens=4 * batch * q_len,
                               cta_slots=slots, backend="mma")
        prefill.plan(qo_indptr, [kv_len] * batch)
        schedule = plan_prefill(np.full(batch, q_len), np.full(batch, kv_len),
                                group_size=NUM_QO_HEADS // NUM_KV_HEADS,
                                shape=TileShape(rows, kv_tile), causal=True, window_left=-1,
                                has_mask=False, num_kv_heads=NUM_KV_HEADS, cta_slots=slots)
        plan = install_schedule(prefill, schedule, partial_rows=rows)
        out = torch.full_like(q, float("nan"))

        def call():
            ops.run(v, q, cache.k, cache.v, table.table, table.holds_token_slots,
                    prefill._workspace.tensor, plan, HEAD_DIM, rows, 1 / HEAD_DIM ** 0.5, out)

        diff = checked_run(call, out, want, profile)
        if diff is None:
            continue
        results[f"v{v} {shapes[v]} rows={rows} ctas/SM={ctas} diff={diff:.2g}"] = \
            median_ms(call, iters=20)
    if peers.flashinfer is not None:
        fn, _ = peers.flashinfer_prefill("fa2", cache, pages, q_len, kv_len, q)
        if profile:
            for _ in range(3):
                fn()
        else:
            results["flashinfer_fa2"] = median_ms(fn, iters=20)
    torch.cuda.synchronize()
    work = flops(batch, q_len, kv_len)
    for name, ms in results.items():
        print(f"  {batch}x{q_len}x{kv_len}  {name:60s} {ms * 1e3:9.1f} us "
              f"{work / (ms * 1e-3) / 1e12:7.1f} TFLOP/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=None,
                        help="BATCHxQxKV,... (default: 1x8192x8192,16x512x4608,1x64x32768; "
                             "with --short 64x4x4096,64x8x4096,64x16x4096)")
    parser.add_argument("--short", action="store_true",
                        help="sweep SHORT_VARIANTS (short-query tiles) on verify shapes")
    parser.add_argument("--profile", type=int, default=None)
    args = parser.parse_args()
    attn_backend.set_debug_checks(False)
    name, shapes, default_shapes = SWEEPS["short" if args.short else "long"]
    ops = build_variants(name, shapes)
    peers = Peers()
    variants = [args.profile] if args.profile is not None else list(range(len(shapes)))
    for shape in (args.shapes or default_shapes).split(","):
        batch, q_len, kv_len = map(int, shape.split("x"))
        run_shape(variants, shapes, ops, batch, q_len, kv_len, peers, args.profile is not None)


if __name__ == "__main__":
    main()
