// The seesaw MLA latent kernel (kernels/include/attn_backend/mla_seesaw.cuh), in a translation
// unit of its own so that it builds beside the other two MLA kernels.
//
// prefill_mla_seesaw: 64 packed rows, two stages of 64-key tiles, the warpgroups taking
// alternate tiles, one CTA per SM (about 226 KB); sm_90a code, 16-bit latent caches only
// (PagedPrefill takes prefill_mla_wgmma for FP8 ones).
#include "attn_backend/mla_seesaw.cuh"
#include "kernel_registry.h"
#include "torch_utils.h"

namespace attn_backend {
namespace {

using Shape = MlaSeesawShape;

void launch(const AttentionParams& params, const DTypes& dtypes, const VariantFlags& flags,
            dim3 grid, bool pdl, cudaStream_t stream) {
  dispatch_16bit_dtypes(dtypes, "prefill_mla_seesaw", [&](auto q, auto kv, auto o) {
    using Traits = MlaSeesawTraits<Shape, decltype(q), decltype(kv), decltype(o)>;
    auto* kernel = variant_kernel(flags, [](auto soft_cap, auto custom_mask) {
      return &paged_mla_seesaw_kernel<Traits, LogitsTransform<decltype(soft_cap)::value>,
                                      decltype(custom_mask)::value>;
    });
    launch_with_pdl(kernel, params, grid, Traits::kThreads, Traits::kSmemBytes, pdl, stream);
  });
}

using ProbeTraits = MlaSeesawTraits<Shape, __nv_bfloat16, __nv_bfloat16, __nv_bfloat16>;
const void* probe_kernel() {
  return reinterpret_cast<const void*>(
      &paged_mla_seesaw_kernel<ProbeTraits, LogitsTransform<false>, false>);
}

// FP8 caches are not compiled for this configuration (the planner never picks it for them):
// the occupancy of its 16-bit kernel stands for both.
int occupancy(bool /*fp8_kv*/) {
  return ctas_per_sm(&paged_mla_seesaw_kernel<ProbeTraits, LogitsTransform<false>, false>,
                     ProbeTraits::kThreads, ProbeTraits::kSmemBytes);
}

bool runs_here() { return sm90a_kernel_runs_here(probe_kernel()); }

}  // namespace

void add_mla_seesaw_configs(std::vector<KernelConfig>& configs) {
  configs.push_back({"prefill_mla_seesaw", KernelFamily::kPrefill, Shape::kHeadDimQK,
                     Shape::kHeadDimVO, Shape::kRows, Shape::kKVTile, Shape::kThreads,
                     ProbeTraits::kSmemBytes, /*wgmma=*/true, &launch, &occupancy, &runs_here,
                     /*value_in_key=*/true});
}

}  // namespace attn_backend
