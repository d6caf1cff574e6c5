// Building PrefillParams from torch tensors and launching one tile shape of the
// prefill kernel: shared by the op (paged_prefill.cu) and the tile-shape sweep
// (bench/prefill_variants.cu), so both run exactly the same launch path.
#pragma once

#include "attn_backend/prefill.cuh"
#include "torch_utils.h"

namespace attn_backend {

// The binding's last line of defence (readable validation is in Python), then the params.
inline PrefillParams make_prefill_params(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& page_table, const std::optional<at::Tensor>& row_index,
    const std::optional<at::Tensor>& slot_map, bool table_holds_slots,
    const at::Tensor& request_info,
    const at::Tensor& schedule, int64_t num_work_items, const std::optional<at::Tensor>& mask_bits,
    const std::optional<at::Tensor>& mask_offset, const at::Tensor& merge_indptr,
    at::Tensor& merge_counters, const at::Tensor& partial_out, const at::Tensor& partial_lse,
    double sm_scale, double logits_soft_cap, int64_t window_left, bool causal, at::Tensor& out,
    const std::optional<at::Tensor>& lse) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3, "q and out must be [tokens, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "caches must be 4-D page views");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  q.scalar_type() == out.scalar_type(),
              "q, caches and out must share one dtype");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1,
              "last dimensions must be contiguous");
  TORCH_CHECK(request_info.scalar_type() == at::kInt && request_info.dim() == 2 &&
                  request_info.size(0) == 3 && request_info.is_contiguous(),
              "request_info must be a contiguous int32 [3, capacity] tensor");
  TORCH_CHECK(schedule.scalar_type() == at::kInt && schedule.dim() == 2 && schedule.size(0) == 6 &&
                  schedule.is_contiguous(),
              "schedule must be a contiguous int32 [6, capacity] tensor");
  TORCH_CHECK(num_work_items <= schedule.size(1), "num_work_items exceeds the schedule capacity");
  TORCH_CHECK(mask_bits.has_value() == mask_offset.has_value(),
              "mask_bits and mask_offset come together");
  if (mask_bits.has_value()) {
    TORCH_CHECK(mask_bits->scalar_type() == at::kByte && mask_bits->is_contiguous(),
                "mask_bits must be contiguous uint8");
    TORCH_CHECK(mask_offset->scalar_type() == at::kLong && mask_offset->is_contiguous(),
                "mask_offset must be contiguous int64");
  }
  TORCH_CHECK(merge_indptr.scalar_type() == at::kInt && merge_counters.scalar_type() == at::kInt &&
                  merge_counters.is_contiguous(),
              "merge_indptr and merge_counters must be int32");
  TORCH_CHECK(partial_out.scalar_type() == at::kFloat && partial_lse.scalar_type() == at::kFloat &&
                  partial_out.is_contiguous() && partial_lse.is_contiguous(),
              "partial buffers must be contiguous float32");
  const int64_t num_qo_heads = q.size(1);
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(num_qo_heads % num_kv_heads == 0, "num_qo_heads must be a multiple of num_kv_heads");
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() &&
                    lse->numel() >= q.size(0) * num_qo_heads,
                "lse must be contiguous float32 [tokens, num_qo_heads]");
  }

  PrefillParams params{};
  fill_shared_params(params, q, k_cache, v_cache, page_table, row_index, slot_map,
                     table_holds_slots, merge_indptr, merge_counters, partial_out, partial_lse,
                     sm_scale, logits_soft_cap, out, lse);
  params.window_left = static_cast<int>(window_left);
  params.causal = causal;
  const int32_t* info = request_info.data_ptr<int32_t>();
  const int64_t info_capacity = request_info.size(1);
  params.qo_start = info;
  params.q_len = info + info_capacity;
  params.kv_len = info + 2 * info_capacity;
  params.mask_bits = mask_bits.has_value() ? mask_bits->data_ptr<uint8_t>() : nullptr;
  params.mask_offset = mask_offset.has_value() ? mask_offset->data_ptr<int64_t>() : nullptr;
  const int32_t* sched = schedule.data_ptr<int32_t>();
  const int64_t capacity = schedule.size(1);
  params.schedule = {sched,
                     sched + capacity,
                     sched + 2 * capacity,
                     sched + 3 * capacity,
                     sched + 4 * capacity,
                     sched + 5 * capacity};
  return params;
}

// One launch of tile shape `Traits` for the dtype of q (grid: kv heads x work items).
template <typename Traits>
void launch_prefill(const PrefillParams& params, at::ScalarType dtype, int64_t num_work_items,
                    int64_t num_kv_heads, int64_t partial_out_numel, bool pdl,
                    cudaStream_t stream) {
  TORCH_CHECK(partial_out_numel % (num_kv_heads * Traits::kRows * Traits::kHeadDimVO) == 0,
              "partial_out must be [partials * num_kv_heads * tile_rows, head_dim_vo]");
  auto launch = [&](auto type_tag) {
    using T = decltype(type_tag);
    // Soft-cap and custom masks are compiled in only where used: each costs registers.
    const bool soft_cap = params.soft_cap > 0;
    const bool custom_mask = params.mask_bits != nullptr;
    auto* kernel = soft_cap ? (custom_mask ? &paged_prefill_kernel<Traits, T, true, true>
                                           : &paged_prefill_kernel<Traits, T, true, false>)
                            : (custom_mask ? &paged_prefill_kernel<Traits, T, false, true>
                                           : &paged_prefill_kernel<Traits, T, false, false>);
    allow_dynamic_smem(kernel, Traits::kSmemBytes);
    if (num_work_items == 0) return;
    TORCH_CHECK(num_work_items <= 65535, "paged_prefill: at most 65535 work items");
    launch_with_pdl(kernel, params,
                    dim3(static_cast<unsigned>(num_kv_heads), static_cast<unsigned>(num_work_items)),
                    Traits::kThreads, Traits::kSmemBytes, pdl, stream);
  };
  if (dtype == at::kBFloat16) return launch(__nv_bfloat16{});
  if (dtype == at::kHalf) return launch(__half{});
  TORCH_CHECK(false, "paged_prefill supports float16 and bfloat16");
}

// [tile rows, kv tile, CTAs per SM, threads] of tile shape `Traits`.
template <typename Traits>
std::vector<int64_t> prefill_shape_info() {
  int ctas = 0;
  auto* kernel = &paged_prefill_kernel<Traits, __nv_bfloat16, false, false>;
  allow_dynamic_smem(kernel, Traits::kSmemBytes);
  ATTN_BACKEND_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &ctas, kernel, Traits::kThreads, Traits::kSmemBytes));
  return {Traits::kRows, Traits::kKVTile, ctas, Traits::kThreads};
}

}  // namespace attn_backend
