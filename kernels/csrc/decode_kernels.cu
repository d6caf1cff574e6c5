// The decode kernel's configurations (kernels/include/attn_backend/decode.cuh).
#include "attn_backend/decode.cuh"
#include "kernel_registry.h"
#include "torch_utils.h"

namespace attn_backend {
namespace {

// Two CTA shapes per head dims. The split shape serves small batches and split-KV. d128:
// 2 stages of 64-key tiles (4 warps), 3 CTAs per SM (164 registers); an FP8 cache keeps 3
// stages (its CTAs per SM are bounded by registers either way). bench/sweep_decode.py on the
// H200 (GQA 32/8, bf16, page 16 / 1), 2 stages x 3 CTAs against the 3 stages x 2 CTAs an
// H100 sweep had chosen: 480 vs 534 / 499 vs 548 us at 16 x 32k, 72 vs 78 / 74 vs 82 us at
// 16 x 4k, level at 1 x 512 - 1 x 32k (FlashInfer 486 / 498 and 75 / 75 us). d64 keeps a
// 3-stage ring of 16 KB stages (2 stages were not measured there); d256 tiles are 64 KB a
// stage: 2 stages, one CTA per SM, for every batch.
template <int kHeadDimQK, int kHeadDimVO>
using SplitDecodeShape =
    DecodeShape<kHeadDimQK, kHeadDimVO, (kHeadDimQK + kHeadDimVO) <= 128 ? 3 : 2, 4, 16,
                (kHeadDimQK + kHeadDimVO) <= 256 ? 3 : 2>;
// The full-batch shape (d128: 2 stages of 48-key tiles, 3 warps, 4 CTAs per SM) for
// batches whose whole requests fill the split shape's CTA slots: with pages scattered over
// the cache (page 1 especially) more independent CTAs, each waiting on its own tile, keep
// more rows in flight. An H100 sweep, page 1: 367 vs 377 us at 64 x 4k, 375 vs 389 us at
// 256 x 1k (FlashInfer 368, 374); page 16 level (363 vs 363 us at 64 x 4k); slower at
// 1 x 32k (68 vs 60 us), hence only for full batches.
using FullBatchDecodeShape128 = DecodeShape<128, 128, 2, 3>;

template <typename Shape>
void launch(const AttentionParams& params, const DTypes& dtypes, const VariantFlags& flags,
            dim3 grid, bool pdl, cudaStream_t stream) {
  dispatch_dtypes(dtypes, "decode", [&](auto q, auto kv, auto o) {
    using Traits = DecodeTraits<Shape, decltype(q), decltype(kv), decltype(o)>;
    // Soft-cap is compiled in only where used: it costs registers and a tanh per score.
    auto* kernel = flags.soft_cap ? &paged_decode_kernel<Traits, LogitsTransform<true>>
                                  : &paged_decode_kernel<Traits, LogitsTransform<false>>;
    launch_with_pdl(kernel, params, grid, Traits::kThreads, Traits::kSmemBytes, pdl, stream);
  });
}

template <typename Shape, typename DTypeKV>
int occupancy_with() {
  using Traits = DecodeTraits<Shape, __nv_bfloat16, DTypeKV, __nv_bfloat16>;
  return ctas_per_sm(&paged_decode_kernel<Traits, LogitsTransform<false>>, Traits::kThreads,
                     Traits::kSmemBytes);
}

template <typename Shape>
int occupancy(bool fp8_kv) {
  return fp8_kv ? occupancy_with<Shape, __nv_fp8_e4m3>() : occupancy_with<Shape, __nv_bfloat16>();
}

bool runs_everywhere() { return true; }

template <typename Shape>
KernelConfig config(const char* name) {
  using Traits = DecodeTraits<Shape, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16>;
  return {name, KernelFamily::kDecode, Shape::kHeadDimQK, Shape::kHeadDimVO, Shape::kRows,
          Shape::kTileTokens, Shape::kThreads, Traits::kSmemBytes, false, &launch<Shape>,
          &occupancy<Shape>, &runs_everywhere};
}

}  // namespace

void add_decode_configs(std::vector<KernelConfig>& configs) {
  configs.push_back(config<SplitDecodeShape<64, 64>>("decode"));
  configs.push_back(config<SplitDecodeShape<128, 128>>("decode"));
  configs.push_back(config<FullBatchDecodeShape128>("decode_full_batch"));
  configs.push_back(config<SplitDecodeShape<256, 256>>("decode"));
}

}  // namespace attn_backend
