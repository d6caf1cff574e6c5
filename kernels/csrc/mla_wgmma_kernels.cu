// The MLA latent kernel on warpgroup MMAs (kernels/include/attn_backend/mla_wgmma.cuh), in a
// translation unit of its own so that it builds beside the mma.sync one (mla_kernels.cu).
//
// prefill_mla_wgmma: 64 packed rows, a 3-deep ring of 32-key tiles, one CTA per SM (199 KB);
// sm_90a code, taken on sm_90 GPUs (PagedPrefill's backend "auto" or "wgmma"). Also compiled
// for FP8 latent caches (their tiles turned into float16 in two more buffers: 217 KB).
#include "attn_backend/mla_wgmma.cuh"
#include "kernel_registry.h"
#include "torch_utils.h"

namespace attn_backend {
namespace {

template <typename Shape>
void launch(const AttentionParams& params, const DTypes& dtypes, const VariantFlags& flags,
            dim3 grid, bool pdl, cudaStream_t stream) {
  dispatch_dtypes(dtypes, "prefill_mla_wgmma", [&](auto q, auto kv, auto o) {
    using Traits = MlaWgmmaTraits<Shape, decltype(q), decltype(kv), decltype(o)>;
    auto* kernel = variant_kernel(flags, [](auto soft_cap, auto custom_mask) {
      return &paged_mla_wgmma_kernel<Traits, LogitsTransform<decltype(soft_cap)::value>,
                                  decltype(custom_mask)::value>;
    });
    launch_with_pdl(kernel, params, grid, Traits::kThreads, Traits::kSmemBytes, pdl, stream);
  });
}

template <typename Shape, typename DTypeKV = __nv_bfloat16>
using ProbeTraits = MlaWgmmaTraits<Shape, __nv_bfloat16, DTypeKV, __nv_bfloat16>;

template <typename Shape, typename DTypeKV>
int occupancy_with() {
  using Traits = ProbeTraits<Shape, DTypeKV>;
  return ctas_per_sm(&paged_mla_wgmma_kernel<Traits, LogitsTransform<false>, false>,
                     Traits::kThreads, Traits::kSmemBytes);
}

template <typename Shape>
int occupancy(bool fp8_kv) {
  return fp8_kv ? occupancy_with<Shape, __nv_fp8_e4m3>() : occupancy_with<Shape, __nv_bfloat16>();
}

template <typename Shape>
bool runs_here() {
  return sm90a_kernel_runs_here(reinterpret_cast<const void*>(
      &paged_mla_wgmma_kernel<ProbeTraits<Shape>, LogitsTransform<false>, false>));
}

template <typename Shape>
KernelConfig config(const char* name) {
  return {name,          KernelFamily::kPrefill, Shape::kHeadDimQK,
          Shape::kHeadDimVO, Shape::kRows,         Shape::kKVTile,
          Shape::kThreads,   ProbeTraits<Shape>::kSmemBytes, /*wgmma=*/true,
          &launch<Shape>,    &occupancy<Shape>,    &runs_here<Shape>, /*value_in_key=*/true};
}

}  // namespace

void add_mla_wgmma_configs(std::vector<KernelConfig>& configs) {
  configs.push_back(config<MlaWgmmaShape</*kStages=*/3>>("prefill_mla_wgmma"));
}

}  // namespace attn_backend
