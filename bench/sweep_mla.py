"""Time alternative shapes of the 16-row mma.sync MLA latent kernel (mla.cuh; bf16 caches, 16
heads of one token: DeepSeek-V3's decode at TP 8) on the mla_decode shapes, beside the shipped
kernel and FlashMLA in the same run.

    python -m bench.sweep_mla [--shapes 64x4096x64,1x32768x64] [--profile VARIANT] [--out DIR]
    python -m bench.sweep_mla --plot bench/results/mla_sweep-<date>-h200.json   (CPU: its PNG)

Shape BATCHxKVxPAGE. Each variant `MlaShape<m-tiles, stages, keys per tile, CTAs per SM,
query in registers, ring tiles per tile, S's accumulator chains>` (mla.cuh) is
compiled into a side extension (bench/variants.py) whose op launches it over exactly the run
op's parameters; its schedule is the planner's specification for its tile and CTA slots (split
partials priced as the shipped MLA configurations price them), written into a shipped wrapper's
workspace. Every variant's output is checked against the shipped kernel's; the printed
TB/s count the latent bytes as bench/bench_mla.py does. `--out DIR` also writes the rows as
`mla_sweep-<date>-<gpu>.json` (bench/results' format) with the copy ceiling of the same run,
and its plot beside it: each variant's and FlashMLA's TB/s over the shipped kernel's, per case.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import attn_backend
from attn_backend import PagedKVCache, PagedPrefill, PageTable
from attn_backend.schedule import TileShape, plan_prefill

from .bench_mla import DTYPE, RANK, ROPE, TIMING_NOTE, Peers, case_name
from .common import copy_ceiling_tbs, median_ms, shuffled_pages, write_results
from .variants import build_variant_extension, checked_run, install_schedule, variant_unit

HEADS = 16
# (m-tiles, stages, keys per tile, CTAs per SM (0: as the cache type decides), query fragments
# in registers, ring tiles per tile, S's accumulator chains). The first is prefill_mla as it
# was before session 25 (64-key tiles in a 2-deep ring, one CTA per SM, S's A fragments read
# from shared memory every tile); the second is the shipped prefill_mla (those fragments held
# in registers across tiles: 1-4% faster on the H200); then a ring of 5 half tiles (32 keys
# each: three halves, 1.5 tiles, load while a tile computes, where the 2-deep ring keeps one in
# flight; aimed at page 1, whose scattered rows arrive later); S's 18 steps in two chains of
# MMAs (the 16-row kernel waits on its phases, not on HBM: ncu, session 25), alone and with the
# half-tile ring; and two CTAs per SM of 2-deep 32-key rings (each CTA's phases overlap the
# other's: faster at page 1, slower at page 64). Deeper rings of 32-key tiles computed one at a
# time (4 or 5 stages, one CTA) were 0.80-0.99x the shipped shape
# (bench/results/sweep_mla-2026-12-04-h200.txt).
VARIANTS = [(1, 2, 64, 0, False, 1, 1), (1, 2, 64, 0, True, 1, 1), (1, 5, 64, 0, True, 2, 1),
            (1, 2, 64, 0, True, 1, 2), (1, 5, 64, 0, True, 2, 2), (1, 2, 32, 2, False, 1, 1)]
DEFAULT_SHAPES = ("64x4096x64,64x4096x1,128x4096x64,128x4096x1,16x4096x64,64x32768x64,"
                  "16x32768x64,16x32768x1,64x1024x64,1x32768x64,1x4096x64")


def variant_units(shapes) -> list[str]:
    units = []
    for i, (m, stages, kv, ctas, query_in_registers, loads, chains) in enumerate(shapes):
        flag = "true" if query_in_registers else "false"
        units.append(variant_unit(
            i, header="mla.cuh",
            traits=f"MlaTraits<MlaShape<{m}, {stages}, {kv}, {ctas}, {flag}, {loads}, {chains}>, "
                   "__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>",
            kernel="paged_mla_kernel<{}, LogitsTransform<false>, false>", tile_tokens="kKVTile"))
    return units


def run_shape(variants, ops, batch, kv_len, page_size, peers, profile) -> dict | None:
    """Times the shape; returns its results row (None when profiling): `ours` the shipped
    kernel's TB/s, `variants` each variant's (by its index and shape), `variant_max_abs_diff`
    against the shipped output, `peers` FlashMLA's where it runs (page 64)."""
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(batch * kv_len + 64 * 64, 1, RANK + ROPE, dtype=DTYPE, device="cuda")
    cache = PagedKVCache.from_mla(latent, RANK, page_size)
    pages = shuffled_pages(batch, kv_len, page_size, cache.num_pages, gen)
    table = PageTable.from_block_table(pages.cuda())
    q = torch.randn(batch, HEADS, RANK + ROPE, dtype=DTYPE, device="cuda")
    qo_indptr = list(range(batch + 1))
    shape = dict(num_qo_heads=HEADS, num_kv_heads=1, head_dim=RANK + ROPE, head_dim_vo=RANK,
                 dtype=DTYPE, device="cuda", max_batch_size=batch, max_num_tokens=batch)
    shipped = PagedPrefill(**shape)
    shipped.plan(qo_indptr, [kv_len] * batch)
    want = shipped.run(q, cache, table)
    moved = batch * kv_len * (RANK + ROPE) * 2 + q.numel() * 2 + want.numel() * 2
    # A split partial's price in keys, as the planner prices the shipped configuration's, per
    # row (the partial of a row is the same 512 floats whatever the tile).
    shipped_config = shipped._planned.config
    results = {}
    variant_times, variant_diffs = {}, {}
    if not profile:
        shipped_out = torch.empty_like(want)
        results[f"shipped ({shipped._planned.config.name})"] = shipped_ms = median_ms(
            lambda: shipped.run(q, cache, table, out=shipped_out), iters=50)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for v in variants:
        rows, kv_tile, ctas, _ = ops.info(v)
        slots = max(1, ctas) * num_sms
        # backend="mma": its buffers hold the 16-row kernel's partials for `slots` CTAs.
        wrapper = PagedPrefill(**shape, cta_slots=slots, backend="mma")
        wrapper.plan(qo_indptr, [kv_len] * batch)
        schedule = plan_prefill(np.ones(batch, dtype=np.int64), np.full(batch, kv_len),
                                group_size=HEADS,
                                shape=TileShape(rows, kv_tile, shipped_config.partial_tokens
                                                * rows // shipped_config.tile_rows),
                                causal=True, window_left=-1, has_mask=False, num_kv_heads=1,
                                cta_slots=slots)
        plan = install_schedule(wrapper, schedule, partial_rows=rows)
        out = torch.full_like(want, float("nan"))

        def call():
            ops.run(v, q, cache.k, cache.v, table.table, table.holds_token_slots,
                    wrapper._workspace.tensor, plan, RANK + ROPE, rows, (RANK + ROPE) ** -0.5,
                    out)

        diff = checked_run(call, out, want, profile)
        if diff is None:
            continue
        label = (f"v{v} MlaShape<{','.join(map(str, VARIANTS[v]))}> ctas/SM={ctas} "
                 f"items={schedule.num_items} diff={diff:.2g}")
        results[label] = variant_times[variant_name(v)] = median_ms(call, iters=50)
        variant_diffs[variant_name(v)] = diff
    peer_times = {}
    if peers.flash_mla is not None and page_size == 64 and not profile:
        results["flashmla"] = peer_times["flashmla"] = median_ms(
            peers.flashmla(latent, pages, kv_len, q, 1), iters=50)
    torch.cuda.synchronize()
    for name, ms in results.items():
        print(f"  {batch}x{kv_len} p{page_size}  {name:64s} {ms * 1e3:8.1f} us "
              f"{moved / (ms * 1e-3) / 1e12:6.3f} TB/s", flush=True)
    if profile:
        return None
    tbs = lambda ms: round(moved / (ms * 1e-3) / 1e12, 4)  # noqa: E731
    return {"case": case_name(batch, kv_len, HEADS, page_size), "ours": tbs(shipped_ms),
            "kernel": shipped_config.name, "ours_us": round(shipped_ms * 1e3, 2),
            "variants": {name: tbs(ms) for name, ms in variant_times.items()},
            "variant_max_abs_diff": {name: float(f"{d:.3g}") for name, d in variant_diffs.items()},
            "peers": {name: tbs(ms) for name, ms in peer_times.items()}}


def variant_name(v: int) -> str:
    """A variant's key in the results: its index and its MlaShape arguments."""
    return f"v{v}_" + "-".join(str(int(x)) for x in VARIANTS[v])


def plot(result: dict, path: Path) -> None:
    """Bars of each variant's (and FlashMLA's) TB/s over the shipped kernel's, one group per case:
    a sweep is read as ratios within one run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = sorted({name for row in rows for name in row["variants"]})
    names += sorted({name for row in rows for name in row["peers"]})
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 4.8))
    width = 0.8 / len(names)
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        ratios = [({**row["variants"], **row["peers"]}.get(name, np.nan)) / row["ours"]
                  for row in rows]
        ax.bar(np.arange(len(rows)) + (i - (len(names) - 1) / 2) * width, ratios, width,
               label=name, color="black" if name == "flashmla" else colors(i))
    ax.axhline(1.0, color="gray", linewidth=1)
    ax.set_xticks(np.arange(len(rows)))
    ax.set_xticklabels([row["case"].replace("_mla512-64_bf16", "") for row in rows],
                       rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0.75, 1.15)
    ax.set_ylabel("TB/s / shipped kernel's TB/s")
    ax.legend(fontsize=7, ncol=4)
    ax.set_title(f"16-row MLA kernel shapes, 16 heads, bf16 ({result['device']}, "
                 f"{result['date']}, {result['git_commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="BATCHxKVxPAGE,...")
    parser.add_argument("--profile", type=int, default=None,
                        help="run only variant V, a few times, for ncu")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the rows as bench/results JSON (benchmark mla_sweep) here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="only draw the PNG of a written sweep JSON (no GPU needed)")
    args = parser.parse_args()
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    attn_backend.set_debug_checks(False)
    build_variant_extension("attn_backend_mla_variants", variant_units(VARIANTS))
    ops = torch.ops.attn_backend_mla_variants
    peers = Peers()
    variants = [args.profile] if args.profile is not None else list(range(len(VARIANTS)))
    rows = []
    for shape in args.shapes.split(","):
        batch, kv_len, page_size = map(int, shape.split("x"))
        row = run_shape(variants, ops, batch, kv_len, page_size, peers, args.profile is not None)
        if row is not None:
            rows.append(row)
    for note in peers.notes:
        print("note:", note)
    if args.out is not None and rows:
        ceiling = {"name": "device-to-device copy", "unit": "TB/s",
                   "value": round(copy_ceiling_tbs(), 3)}
        notes = peers.notes + [
            "variants: MlaShape<m-tiles, stages, keys per tile, CTAs per SM, query in "
            "registers, ring tiles per tile, S chains> of bench/sweep_mla.py VARIANTS; v1 is "
            "the shipped shape as of session 25", TIMING_NOTE]
        path = write_results("mla_sweep", "TB/s", ceiling, rows, args.out, notes)
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        print("->", path, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
