// The prefill kernel's configurations (kernels/include/attn_backend/prefill.cuh), one
// translation unit per head dims (prefill_kernels_d*.cu) so they compile in parallel.
#pragma once

#include "attn_backend/prefill.cuh"
#include "kernel_registry.h"
#include "torch_utils.h"

namespace attn_backend {
namespace prefill_configs {

// kFp8Caches: the shape is also compiled for FP8 caches (its FP8 rows are whole 128-byte
// lines, or 64 bytes); (192, 128) is not (a 192-value FP8 key row is 12 chunks).
template <typename Shape, bool kFp8Caches = true>
void launch(const AttentionParams& params, const DTypes& dtypes, const VariantFlags& flags,
            dim3 grid, bool pdl, cudaStream_t stream) {
  auto body = [&](auto q, auto kv, auto o) {
    using Traits = PrefillTraits<Shape, decltype(q), decltype(kv), decltype(o)>;
    auto* kernel = variant_kernel(flags, [](auto soft_cap, auto custom_mask) {
      return &paged_prefill_kernel<Traits, LogitsTransform<decltype(soft_cap)::value>,
                                  decltype(custom_mask)::value>;
    });
    launch_with_pdl(kernel, params, grid, Traits::kThreads, Traits::kSmemBytes, pdl, stream);
  };
  if constexpr (kFp8Caches) {
    dispatch_dtypes(dtypes, "prefill", body);
  } else {
    dispatch_16bit_dtypes(dtypes, "prefill", body);
  }
}

template <typename Shape, typename DTypeKV = __nv_bfloat16>
using ProbeTraits = PrefillTraits<Shape, __nv_bfloat16, DTypeKV, __nv_bfloat16>;

template <typename Shape, typename DTypeKV>
int occupancy_with() {
  using Traits = ProbeTraits<Shape, DTypeKV>;
  return ctas_per_sm(&paged_prefill_kernel<Traits, LogitsTransform<false>, false>,
                     Traits::kThreads, Traits::kSmemBytes);
}

template <typename Shape, bool kFp8Caches = true>
int occupancy(bool fp8_kv) {
  if constexpr (kFp8Caches) {
    if (fp8_kv) return occupancy_with<Shape, __nv_fp8_e4m3>();
  } else if (fp8_kv) {
    return 0;  // not compiled for FP8 caches
  }
  return occupancy_with<Shape, __nv_bfloat16>();
}

template <typename Shape>
bool runs_here() {
  if constexpr (Shape::kWgmma) {
    return sm90a_kernel_runs_here(reinterpret_cast<const void*>(
        &paged_prefill_kernel<ProbeTraits<Shape>, LogitsTransform<false>, false>));
  } else {
    return true;
  }
}

template <typename Shape, bool kFp8Caches = true>
KernelConfig config(const char* name) {
  return {name,          KernelFamily::kPrefill,  Shape::kHeadDimQK,
          Shape::kHeadDimVO, Shape::kRows,          Shape::kKVTile,
          Shape::kThreads,   ProbeTraits<Shape>::kSmemBytes, Shape::kWgmma,
          &launch<Shape, kFp8Caches>, &occupancy<Shape, kFp8Caches>, &runs_here<Shape>};
}

// The wgmma and short-query shapes of head dims (kHeadDim, kHeadDim) (prefill_kernels_d128.cu
// says why each), for the translation units that build them apart from the mma shape.
template <int kHeadDim>
void add_wgmma_and_short_configs(std::vector<KernelConfig>& configs) {
  configs.push_back(config<PrefillShape<kHeadDim, kHeadDim, 1, 128, 2, 12, true>>("prefill_wgmma"));
  configs.push_back(config<PrefillShape<kHeadDim, kHeadDim, 1, 64, 2>>("prefill_short"));
}

}  // namespace prefill_configs
}  // namespace attn_backend
