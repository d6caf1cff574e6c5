// The key-split short-query prefill configuration (paged_short_prefill_kernel, decode.cuh):
// head dims (128, 128), tiles of 16 packed rows (q_len * group: 4 drafts x 4 heads).
//
// prefill_short gives each of its 4 warps 16 of a 64-row tile's rows and all 64 keys of every
// K/V tile: a verify of 4 drafts on GQA 32/8 (16 rows per request and kv head) computes 48
// padding rows per key, and the wide tile needs a bigger ring. Here the 16 rows are one MMA
// tile that every warp holds, each warp computing its own 16 keys of a 64-key tile, the decode
// kernel's CTA shape (3 stages x 4 warps), so a verify batch reads its K/V at decode's rate.
// plan_prefill gives it batches whose requests have at most 16 rows: a request of more is
// several such tiles, each its own CTA over the same keys, and on the H200 that was slower than
// prefill_short's one 64-row pass at 32 and 64 rows (0.61x and 0.32x; bench/NOTES.md,
// session 18), so those batches take prefill_short. The kernel itself serves any request.
#include "attn_backend/decode.cuh"
#include "kernel_registry.h"
#include "torch_utils.h"

namespace attn_backend {
namespace {

using ShortKeySplitShape = DecodeShape<128, 128, 3, 4>;

template <typename Shape>
void launch(const AttentionParams& params, const DTypes& dtypes, const VariantFlags& flags,
            dim3 grid, bool pdl, cudaStream_t stream) {
  dispatch_dtypes(dtypes, "prefill", [&](auto q, auto kv, auto o) {
    using Traits = DecodeTraits<Shape, decltype(q), decltype(kv), decltype(o)>;
    auto* kernel = variant_kernel(flags, [](auto soft_cap, auto custom_mask) {
      return &paged_short_prefill_kernel<Traits, LogitsTransform<decltype(soft_cap)::value>,
                                         decltype(custom_mask)::value>;
    });
    launch_with_pdl(kernel, params, grid, Traits::kThreads, Traits::kSmemBytes, pdl, stream);
  });
}

template <typename Shape, typename DTypeKV>
int occupancy_with() {
  using Traits = DecodeTraits<Shape, __nv_bfloat16, DTypeKV, __nv_bfloat16>;
  return ctas_per_sm(&paged_short_prefill_kernel<Traits, LogitsTransform<false>, false>,
                     Traits::kThreads, Traits::kSmemBytes);
}

template <typename Shape>
int occupancy(bool fp8_kv) {
  return fp8_kv ? occupancy_with<Shape, __nv_fp8_e4m3>() : occupancy_with<Shape, __nv_bfloat16>();
}

bool runs_everywhere() { return true; }

}  // namespace

void add_prefill_configs_short_keysplit(std::vector<KernelConfig>& configs) {
  using Shape = ShortKeySplitShape;
  using Traits = DecodeTraits<Shape, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16>;
  KernelConfig config{"prefill_short_keysplit", KernelFamily::kPrefill, Shape::kHeadDimQK,
                      Shape::kHeadDimVO, Shape::kRows, Shape::kTileTokens, Shape::kThreads,
                      Traits::kSmemBytes, false, &launch<Shape>, &occupancy<Shape>,
                      &runs_everywhere};
  configs.push_back(config);
}

}  // namespace attn_backend
