// torch binding of kernels/include/attn_backend/prefill.cuh (one launch; split
// tiles are merged inside it). Readable validation happens in Python
// (attn_backend/prefill.py); prefill_launch.h holds the last line of defence.
#include <atomic>

#include "prefill_launch.h"

namespace attn_backend {
namespace {

// Tile shapes per head dims, from ptxas's register counts on sm_90a and the
// timings of bench/sweep_prefill.py on an H100. Two 16-row MMA tiles per warp
// (32 query rows) share every K/V fragment read from shared memory, which
// halves the shared-memory traffic per MMA against one tile per warp. d128:
// 8 warps (256 rows) share each K/V tile, so every thread issues half the
// copies of a 4-warp CTA. d256 keeps one 16-row tile per warp and 16-key tiles.
//
// `HopperTraits` replace `Traits` on sm_90 GPUs (when the build holds sm_90a
// code): warpgroup MMAs (wgmma), 3 warpgroups x 64 rows, 128-key tiles, 2
// stages. The sweep on an H100 (1 x 8k causal d128): 425 TFLOP/s against 388
// with 2 warpgroups, 387 with 64-key tiles in 3 stages, 318 for the mma.sync
// shape; the third warpgroup's softmax overlaps the other two's MMAs.
//
// `ShortTraits` serve batches whose requests have few query rows (speculative
// verification, decode-like extends: q_len * group <= 64): a tile never spans
// requests, so a 256-row tile would mostly compute padding there, turning a
// memory-bound batch into a compute-bound one. 64 rows keep it memory-bound.
template <int kHeadDimQK, int kHeadDimVO>
struct PrefillConfig;
template <>
struct PrefillConfig<64, 64> {
  using Traits = PrefillTraits<64, 64, 2, 64, 2>;
  using HopperTraits = PrefillTraits<64, 64, 1, 128, 2, 12, true>;
  using ShortTraits = PrefillTraits<64, 64, 1, 64, 2>;
};
template <>
struct PrefillConfig<128, 128> {
  // 64-key tiles: half the barriers, copy rounds and softmax steps per key of 32-key
  // ones. ptxas spills about 50 B here (a few loads per tile, from L1); the sweep
  // (bench/sweep_prefill.py) timed this faster than 32-key tiles or 32-key compute steps.
  using Traits = PrefillTraits<128, 128, 2, 64, 2, 8>;
  using HopperTraits = PrefillTraits<128, 128, 1, 128, 2, 12, true>;
  using ShortTraits = PrefillTraits<128, 128, 1, 64, 2>;
};
template <>
struct PrefillConfig<256, 256> {
  using Traits = PrefillTraits<256, 256, 1, 16, 2>;
  using HopperTraits = Traits;  // a 64 x 256 accumulator per warpgroup would not fit
  using ShortTraits = Traits;   // already 64 rows
};

// Whether `kernel` (a wgmma tile shape) runs on the current device: an sm_90 GPU
// and sm_90a code in this build (a build for other targets falls back to mma.sync).
// Cached per device: a launch must not pay for the driver queries.
inline bool wgmma_kernel_runs_here(const void* kernel) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int8_t> cached[kMaxDevices] = {};  // 0: unknown, 1: yes, 2: no
  int device = 0;
  ATTN_BACKEND_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kMaxDevices && cached[device].load() != 0) return cached[device].load() == 1;
  int major = 0;
  ATTN_BACKEND_CUDA_CHECK(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  bool runs = false;
  if (major == 9) {
    cudaFuncAttributes attributes{};
    ATTN_BACKEND_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    runs = attributes.binaryVersion == 90;
  }
  if (device < kMaxDevices) cached[device].store(runs ? 1 : 2);
  return runs;
}

// Off: long queries run the mma.sync shape on sm_90 too (tests and benchmarks
// compare the two; plans made before a change keep failing loudly on tile_rows).
std::atomic<bool> wgmma_allowed{true};

void prefill_allow_wgmma(bool allowed) { wgmma_allowed.store(allowed); }

// Calls fn(LongTraits{}) with the long-query tile shape of `Config` on this device.
template <typename Config, typename Fn>
void with_long_tiles(Fn&& fn) {
  using Hopper = typename Config::HopperTraits;
  if constexpr (Hopper::kWgmma) {
    const void* kernel =
        reinterpret_cast<const void*>(&paged_prefill_kernel<Hopper, __nv_bfloat16, false, false>);
    if (wgmma_allowed.load() && wgmma_kernel_runs_here(kernel)) return fn(Hopper{});
  }
  return fn(typename Config::Traits{});
}

template <typename Fn>
void dispatch_head_dims(int64_t head_dim_qk, int64_t head_dim_vo, Fn&& fn) {
  if (head_dim_qk == 64 && head_dim_vo == 64) return fn(PrefillConfig<64, 64>{});
  if (head_dim_qk == 128 && head_dim_vo == 128) return fn(PrefillConfig<128, 128>{});
  if (head_dim_qk == 256 && head_dim_vo == 256) return fn(PrefillConfig<256, 256>{});
  TORCH_CHECK(false, "paged_prefill: head dims (", head_dim_qk, ", ", head_dim_vo,
              ") are not compiled; supported: (64, 64), (128, 128), (256, 256)");
}

void paged_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& page_table, const std::optional<at::Tensor>& row_index,
                   const std::optional<at::Tensor>& slot_map,
                   bool table_holds_slots,
                   const at::Tensor& request_info, const at::Tensor& schedule,
                   int64_t num_work_items, int64_t tile_rows,
                   const std::optional<at::Tensor>& mask_bits,
                   const std::optional<at::Tensor>& mask_offset, const at::Tensor& merge_indptr,
                   at::Tensor& merge_counters, const at::Tensor& partial_out,
                   const at::Tensor& partial_lse, double sm_scale, double logits_soft_cap,
                   int64_t window_left, bool causal, bool enable_pdl, at::Tensor& out,
                   const std::optional<at::Tensor>& lse) {
  const PrefillParams params = make_prefill_params(
      q, k_cache, v_cache, page_table, row_index, slot_map, table_holds_slots, request_info,
      schedule, num_work_items, mask_bits, mask_offset, merge_indptr, merge_counters, partial_out,
      partial_lse, sm_scale, logits_soft_cap, window_left, causal, out, lse);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_head_dims(q.size(2), v_cache.size(3), [&](auto config) {
    using Config = decltype(config);
    using Short = typename Config::ShortTraits;
    with_long_tiles<Config>([&](auto long_traits) {
      using Long = decltype(long_traits);
      // The plan cut the batch into tiles of `tile_rows`; the launch must use that shape.
      TORCH_CHECK(tile_rows == Long::kRows || tile_rows == Short::kRows,
                  "paged_prefill: tile_rows ", tile_rows, " is not a tile shape of this device (",
                  Long::kRows, " or ", Short::kRows, ")");
      if (tile_rows == Short::kRows) {
        launch_prefill<Short>(params, q.scalar_type(), num_work_items, k_cache.size(2),
                              partial_out.numel(), enable_pdl, stream);
      } else {
        launch_prefill<Long>(params, q.scalar_type(), num_work_items, k_cache.size(2),
                             partial_out.numel(), enable_pdl, stream);
      }
    });
  });
}

// [tile rows, kv tile, CTAs per SM, threads]: what the plan needs to cut work
// into the kernel's tiles and to size split-KV to the GPU.
std::vector<int64_t> paged_prefill_config(int64_t head_dim_qk, int64_t head_dim_vo,
                                          bool short_queries) {
  std::vector<int64_t> result;
  dispatch_head_dims(head_dim_qk, head_dim_vo, [&](auto config) {
    using Config = decltype(config);
    if (short_queries) {
      result = prefill_shape_info<typename Config::ShortTraits>();
    } else {
      with_long_tiles<Config>(
          [&](auto long_traits) { result = prefill_shape_info<decltype(long_traits)>(); });
    }
  });
  return result;
}

}  // namespace
}  // namespace attn_backend

TORCH_LIBRARY_IMPL(attn_backend, CUDA, m) { m.impl("paged_prefill", &attn_backend::paged_prefill); }

TORCH_LIBRARY_IMPL(attn_backend, CompositeExplicitAutograd, m) {
  m.impl("paged_prefill_config", &attn_backend::paged_prefill_config);
  m.impl("prefill_allow_wgmma", &attn_backend::prefill_allow_wgmma);
}
