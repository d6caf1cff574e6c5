"""Time alternative shapes of the decode kernel (d128, bf16, GQA 32/8) on a few batches.

    python -m bench.sweep_decode [--shapes 64x4096x16,1x32768x16] [--profile VARIANT]

Each (stages, warps) in VARIANTS is compiled (one translation unit per shape,
built in parallel) into a side extension whose op runs the same launch path as
`attn_backend.paged_decode` (kernels/csrc/decode_launch.h). Each variant gets
its own plan, sized for the CTAs of its shape that fit on an SM; every run is
checked against the shipped op's output, and FlashInfer's tensor-core decode
is timed on the same paged data when it is installed. `--profile V` runs only
variant V (and FlashInfer) a few times, for `ncu`.
"""

from __future__ import annotations

import argparse

import torch

import attn_backend
from attn_backend import PageTable

from .bench_decode import (DTYPE, HEAD_DIM, NUM_KV_HEADS, NUM_QO_HEADS, Peers, kv_bytes,
                           make_decode, make_problem)
from .variants import build_variant_extension
from .common import copy_ceiling_tbs, median_ms

# (stages, warps): the ring depth and the warps of a CTA (16 tokens of a tile each).
VARIANTS = [(2, 4), (3, 4), (3, 3), (4, 3), (3, 2), (2, 3)]

_VARIANT_TU = """
#include "decode_launch.h"
namespace attn_backend {{
using VariantTraits{i} = DecodeTraits<128, 128, {stages}, {warps}>;
void run_variant_{i}(const DecodeParams& params, int64_t kv_heads, int64_t items,
                     cudaStream_t stream) {{
  launch_decode<VariantTraits{i}, __nv_bfloat16>(params, kv_heads, items, stream);
}}
std::vector<int64_t> info_variant_{i}() {{
  return {{VariantTraits{i}::kTileTokens, decode_ctas_per_sm<VariantTraits{i}>()}};
}}
}}  // namespace attn_backend
"""

_OPS_TU = """
#include "decode_launch.h"
namespace attn_backend {{
{declarations}
namespace {{
void run_variant(int64_t variant, const at::Tensor& q, const at::Tensor& k_cache,
                 const at::Tensor& v_cache, const at::Tensor& page_table, bool table_holds_slots,
                 const at::Tensor& schedule, const at::Tensor& merge_indptr,
                 at::Tensor& merge_counters, int64_t num_work_items, const at::Tensor& partial_out,
                 const at::Tensor& partial_lse, double sm_scale, at::Tensor& out) {{
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && q.size(2) == 128, "variants: bf16 d128 only");
  const DecodeParams params = make_decode_params(
      q, k_cache, v_cache, page_table, std::nullopt, std::nullopt, table_holds_slots, schedule,
      merge_indptr, merge_counters, num_work_items, partial_out, partial_lse, sm_scale, 0.0, out,
      std::nullopt);
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

TORCH_LIBRARY(attn_backend_decode_variants, m) {{
  m.def("run(int variant, Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, "
        "bool table_holds_slots, Tensor schedule, Tensor merge_indptr, Tensor(a!) merge_counters, "
        "int num_work_items, Tensor partial_out, Tensor partial_lse, float sm_scale, "
        "Tensor(b!) out) -> ()");
  m.def("info(int variant) -> int[]");
}}
TORCH_LIBRARY_IMPL(attn_backend_decode_variants, CUDA, m) {{ m.impl("run", &attn_backend::run_variant); }}
TORCH_LIBRARY_IMPL(attn_backend_decode_variants, CompositeExplicitAutograd, m) {{
  m.impl("info", &attn_backend::variant_info);
}}
"""


def build_variants():
    units = [_VARIANT_TU.format(i=i, stages=stages, warps=warps)
             for i, (stages, warps) in enumerate(VARIANTS)]
    build_variant_extension("attn_backend_decode_variants", "DecodeParams", units, _OPS_TU)
    return torch.ops.attn_backend_decode_variants


def run_shape(variants, ops, batch, kv_len, page_size, peers, ceiling, profile):
    gen = torch.Generator().manual_seed(0)
    cache, pages, q = make_problem(batch, kv_len, page_size, gen)
    table = PageTable.from_block_table(pages.cuda())
    shipped = make_decode(batch)
    shipped.plan([kv_len] * batch)
    want = shipped.run(q, cache, table)
    results = {}
    if not profile:
        results["shipped"] = median_ms(lambda: shipped.run(q, cache, table, out=want))
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for v in variants:
        tile, ctas = ops.info(v)
        decode = attn_backend.PagedDecode(num_qo_heads=NUM_QO_HEADS, num_kv_heads=NUM_KV_HEADS,
                                          head_dim=HEAD_DIM, dtype=DTYPE, device="cuda",
                                          max_batch_size=batch, cta_slots=max(1, ctas) * num_sms)
        decode.plan([kv_len] * batch)
        out = torch.full_like(q, float("nan"))
        items = decode._planned.num_work_items

        def call():
            ops.run(v, q, cache.k, cache.v, table.table, table.holds_token_slots,
                    decode._schedule, decode._merge_indptr, decode._merge_counters, items,
                    decode._partial_out, decode._partial_lse, 1 / HEAD_DIM ** 0.5, out)

        call()
        diff = (out.float() - want.float()).abs().max().item()
        if profile:
            for _ in range(3):
                call()
            continue
        name = f"v{v} stages={VARIANTS[v][0]} warps={VARIANTS[v][1]} ctas/SM={ctas} items={items}"
        results[f"{name} diff={diff:.2g}"] = median_ms(call)
    if peers.flashinfer is not None:
        fn = peers.flashinfer_decode(True, cache, pages, kv_len, q)
        if profile:
            for _ in range(3):
                fn()
        else:
            results["flashinfer (tensor cores)"] = median_ms(fn)
    torch.cuda.synchronize()
    for name, ms in results.items():
        tbs = kv_bytes(batch, kv_len) / (ms * 1e-3) / 1e12
        print(f"  b{batch} kv{kv_len} p{page_size}  {name:64s} {ms * 1e3:8.1f} us "
              f"{tbs:.3f} TB/s {tbs / ceiling:.2f} of copy")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="64x4096x16,256x4096x16,1x32768x16,16x32768x16,"
                                            "1x512x16,16x4096x16,"
                                            "64x512x16")
    parser.add_argument("--variants", default=None, help="comma-separated indices (default all)")
    parser.add_argument("--profile", type=int, default=None)
    args = parser.parse_args()
    attn_backend.set_debug_checks(False)
    ops = build_variants()
    peers = Peers()
    ceiling = copy_ceiling_tbs()
    print(f"copy ceiling {ceiling:.3f} TB/s")
    if args.profile is not None:
        variants = [args.profile]
    elif args.variants:
        variants = [int(v) for v in args.variants.split(",")]
    else:
        variants = list(range(len(VARIANTS)))
    for shape in args.shapes.split(","):
        batch, kv_len, page_size = map(int, shape.split("x"))
        run_shape(variants, ops, batch, kv_len, page_size, peers, ceiling,
                  args.profile is not None)
        torch.cuda.empty_cache()  # the shape's cache is gone with run_shape's frame


if __name__ == "__main__":
    main()
