// The MLA latent kernel's configurations (kernels/include/attn_backend/mla.cuh): prefill-family
// work items (any number of query tokens per request) over DeepSeek's 576-wide latent rows.
//
// prefill_mla: 16 packed rows (16 heads of one token: DeepSeek-V3 at TP 8), 2 stages of
// 64-key tiles, one CTA per SM (173 KB), each warp's query fragments of S in registers for
// the whole kv range (216 registers; 1-4% faster than reading them from shared memory every
// tile on the H200: bench/sweep_mla.py, session 25). prefill_mla_wide: 32 rows (32+ heads, or 16 heads
// of two tokens), 200 KB; the planner takes the wide shape where the rows fill it. Both are
// also compiled for FP8 latent caches (4 stages of the half-size rows).
#include "attn_backend/mla.cuh"
#include "kernel_registry.h"
#include "torch_utils.h"

namespace attn_backend {
namespace {

template <typename Shape>
void launch(const AttentionParams& params, const DTypes& dtypes, const VariantFlags& flags,
            dim3 grid, bool pdl, cudaStream_t stream) {
  dispatch_dtypes(dtypes, "prefill_mla", [&](auto q, auto kv, auto o) {
    using Traits = MlaTraits<Shape, decltype(q), decltype(kv), decltype(o)>;
    auto* kernel = variant_kernel(flags, [](auto soft_cap, auto custom_mask) {
      return &paged_mla_kernel<Traits, LogitsTransform<decltype(soft_cap)::value>,
                                  decltype(custom_mask)::value>;
    });
    launch_with_pdl(kernel, params, grid, Traits::kThreads, Traits::kSmemBytes, pdl, stream);
  });
}

template <typename Shape, typename DTypeKV = __nv_bfloat16>
using ProbeTraits = MlaTraits<Shape, __nv_bfloat16, DTypeKV, __nv_bfloat16>;

template <typename Shape, typename DTypeKV>
int occupancy_with() {
  using Traits = ProbeTraits<Shape, DTypeKV>;
  return ctas_per_sm(&paged_mla_kernel<Traits, LogitsTransform<false>, false>, Traits::kThreads,
                     Traits::kSmemBytes);
}

template <typename Shape>
int occupancy(bool fp8_kv) {
  return fp8_kv ? occupancy_with<Shape, __nv_fp8_e4m3>() : occupancy_with<Shape, __nv_bfloat16>();
}

bool runs_everywhere() { return true; }

template <typename Shape>
KernelConfig config(const char* name) {
  return {name,          KernelFamily::kPrefill, Shape::kHeadDimQK,
          Shape::kHeadDimVO, Shape::kRows,         Shape::kKVTile,
          Shape::kThreads,   ProbeTraits<Shape>::kSmemBytes, false,
          &launch<Shape>,    &occupancy<Shape>,    &runs_everywhere, /*value_in_key=*/true};
}

}  // namespace

void add_mla_configs(std::vector<KernelConfig>& configs) {
  configs.push_back(config<MlaShape<1, 2, 64, 0, /*kQueryInRegisters=*/true>>("prefill_mla"));
  configs.push_back(config<MlaShape<2, 2>>("prefill_mla_wide"));
}

}  // namespace attn_backend
