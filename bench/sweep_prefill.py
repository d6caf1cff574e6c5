"""Time alternative tile shapes of the prefill kernel (d128, bf16) on a few shapes.

    python -m bench.sweep_prefill [--shapes 1x8192x8192,16x512x4608] [--profile VARIANT]

Each shape in VARIANTS is compiled (one translation unit per shape, built in
parallel) into a side extension whose op runs the same launch path as
`attn_backend.paged_prefill` with that tile shape; every run is checked
against the shipped op's output, and FlashInfer's fa2 prefill is timed on the
same paged data when it is installed. `--profile V` runs only variant V (and
FlashInfer fa2) a few times, for `ncu`.
"""

from __future__ import annotations

import argparse

import torch

import attn_backend
from attn_backend import PagedKVCache, PagedPrefill, PageTable

from .bench_prefill import HEAD_DIM, NUM_KV_HEADS, NUM_QO_HEADS, Peers, flops
from .variants import build_variant_extension
from .common import median_ms, shuffled_pages

# (m-tiles per warp, kv tile, stages, warps, wgmma); wgmma shapes need an sm_90 GPU.
VARIANTS = [(1, 128, 2, 12, True), (1, 128, 2, 8, True), (1, 64, 3, 12, True),
            (2, 64, 2, 8, False)]

_VARIANT_TU = """
#include "prefill_launch.h"
namespace attn_backend {{
using VariantTraits{i} = PrefillTraits<128, 128, {m}, {kv}, {stages}, {warps}, {wgmma}>;
void run_variant_{i}(const PrefillParams& params, int64_t kv_heads, int64_t items,
                     cudaStream_t stream) {{
  auto* kernel = &paged_prefill_kernel<VariantTraits{i}, __nv_bfloat16, false, false>;
  allow_dynamic_smem(kernel, VariantTraits{i}::kSmemBytes);
  const dim3 grid(static_cast<unsigned>(kv_heads), static_cast<unsigned>(items));
  kernel<<<grid, VariantTraits{i}::kThreads, VariantTraits{i}::kSmemBytes, stream>>>(params);
  ATTN_BACKEND_CHECK_LAUNCH();
}}
std::vector<int64_t> info_variant_{i}() {{ return prefill_shape_info<VariantTraits{i}>(); }}
}}  // namespace attn_backend
"""

_OPS_TU = """
#include "prefill_launch.h"
namespace attn_backend {{
{declarations}
namespace {{
void run_variant(int64_t variant, const at::Tensor& q, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& page_table,
                 bool table_holds_slots,
                 const at::Tensor& request_info, const at::Tensor& schedule,
                 int64_t num_work_items, const at::Tensor& merge_indptr,
                 at::Tensor& merge_counters, const at::Tensor& partial_out,
                 const at::Tensor& partial_lse, double sm_scale, at::Tensor& out) {{
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && q.size(2) == 128, "variants: bf16 d128 only");
  const PrefillParams params = make_prefill_params(
      q, k_cache, v_cache, page_table, std::nullopt, std::nullopt, table_holds_slots,
      request_info, schedule, num_work_items, std::nullopt, std::nullopt, merge_indptr,
      merge_counters, partial_out, partial_lse, sm_scale, 0.0, -1, true, out, std::nullopt);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t kv_heads = k_cache.size(2), items = num_work_items;
  switch (variant) {{
{run_cases}
    default: TORCH_CHECK(false, "no variant ", variant);
  }}
}}
std::vector<int64_t> variant_info(int64_t variant) {{
  switch (variant) {{
{info_cases}
    default: TORCH_CHECK(false, "no variant ", variant);
  }}
}}
}}  // namespace
}}  // namespace attn_backend

TORCH_LIBRARY(attn_backend_variants, m) {{
  m.def("run(int variant, Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, "
        "bool table_holds_slots, Tensor request_info, Tensor schedule, "
        "int num_work_items, Tensor merge_indptr, Tensor(a!) merge_counters, "
        "Tensor(b!) partial_out, Tensor(c!) partial_lse, float sm_scale, Tensor(d!) out) -> ()");
  m.def("info(int variant) -> int[]");
}}
TORCH_LIBRARY_IMPL(attn_backend_variants, CUDA, m) {{ m.impl("run", &attn_backend::run_variant); }}
TORCH_LIBRARY_IMPL(attn_backend_variants, CompositeExplicitAutograd, m) {{
  m.impl("info", &attn_backend::variant_info);
}}
"""


def build_variants():
    units = [_VARIANT_TU.format(i=i, m=m, kv=kv, stages=stages, warps=warps,
                                wgmma="true" if wgmma else "false")
             for i, (m, kv, stages, warps, wgmma) in enumerate(VARIANTS)]
    build_variant_extension("attn_backend_prefill_variants", "PrefillParams", units, _OPS_TU)
    return torch.ops.attn_backend_variants


def run_shape(variants, ops, batch, q_len, kv_len, peers, profile):
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
        rows, _, ctas, _ = ops.info(v)
        prefill = PagedPrefill(num_qo_heads=NUM_QO_HEADS, num_kv_heads=NUM_KV_HEADS,
                               head_dim=HEAD_DIM, dtype=torch.bfloat16, device="cuda",
                               max_batch_size=batch, max_num_tokens=4 * batch * q_len,
                               cta_slots=max(1, ctas) * num_sms)
        # Plan this variant's tiles whatever the queries' lengths (buffers fit any tile).
        prefill.tile_rows = prefill.short_tile_rows = rows
        prefill.plan(qo_indptr, [kv_len] * batch)
        out = torch.full_like(q, float("nan"))
        planned = prefill._planned

        def call():
            ops.run(v, q, cache.k, cache.v, table.table, table.holds_token_slots,
                    prefill._request_info.tensor.view(3, prefill.max_batch_size),
                    prefill._schedule.tensor.view(6, prefill.capacity), planned.num_work_items,
                    prefill._merge_indptr.tensor, prefill._merge_counters, prefill._partial_out,
                    prefill._partial_lse, 1 / HEAD_DIM ** 0.5, out)

        call()
        diff = (out.float() - want.float()).abs().max().item()
        if profile:
            for _ in range(3):
                call()
            continue
        results[f"v{v} {VARIANTS[v]} rows={rows} ctas/SM={ctas} diff={diff:.2g}"] = \
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
    parser.add_argument("--shapes", default="1x8192x8192,16x512x4608,1x64x32768")
    parser.add_argument("--profile", type=int, default=None)
    args = parser.parse_args()
    attn_backend.set_debug_checks(False)
    ops = build_variants()
    peers = Peers()
    variants = [args.profile] if args.profile is not None else list(range(len(VARIANTS)))
    for shape in args.shapes.split(","):
        batch, q_len, kv_len = map(int, shape.split("x"))
        run_shape(variants, ops, batch, q_len, kv_len, peers, args.profile is not None)


if __name__ == "__main__":
    main()
