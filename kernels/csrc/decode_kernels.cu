// The decode kernel's configurations (kernels/include/attn_backend/decode.cuh).
#include "attn_backend/decode.cuh"
#include "kernel_registry.h"
#include "torch_utils.h"

namespace attn_backend {
namespace {

// Two CTA shapes per head dims. The deep shape (d64/d128: a 3-stage ring of 64-key tiles,
// 4 warps, 2 CTAs per SM) streams two tiles while it computes one; it serves small batches
// and split-KV. bench/sweep_decode.py on an H100 (d128, GQA 32/8, page 16), 3 stages x 4
// warps against 2 stages x 3 CTAs: 363 vs 370 us at 64 x 4k, 60 vs 61 us at 1 x 32k. d256
// tiles are 64 KB a stage: 2 stages, one CTA per SM, for every batch.
template <int kHeadDimQK, int kHeadDimVO>
using DeepDecodeShape =
    DecodeShape<kHeadDimQK, kHeadDimVO, (kHeadDimQK + kHeadDimVO) <= 256 ? 3 : 2, 4>;
// The full-batch shape (d128: 2 stages of 48-key tiles, 3 warps, 4 CTAs per SM) for
// batches whose whole requests fill the deep shape's CTA slots: with pages scattered over
// the cache (page 1 especially) more independent CTAs, each waiting on its own tile, keep
// more rows in flight. Same sweep, page 1: 367 vs 377 us at 64 x 4k, 375 vs 389 us at
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
  configs.push_back(config<DeepDecodeShape<64, 64>>("decode"));
  configs.push_back(config<DeepDecodeShape<128, 128>>("decode"));
  configs.push_back(config<FullBatchDecodeShape128>("decode_full_batch"));
  configs.push_back(config<DeepDecodeShape<256, 256>>("decode"));
}

}  // namespace attn_backend
