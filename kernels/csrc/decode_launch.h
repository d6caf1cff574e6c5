// Building DecodeParams from torch tensors and launching one shape of the
// decode kernel: shared by the op (paged_decode.cu) and the shape sweep
// (bench/sweep_decode.py), so both run exactly the same launch path.
#pragma once

#include "attn_backend/decode.cuh"
#include "torch_utils.h"

namespace attn_backend {

// The binding's last line of defence (readable validation is in Python), then the params.
inline DecodeParams make_decode_params(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& page_table, const std::optional<at::Tensor>& row_index,
    const std::optional<at::Tensor>& slot_map, bool table_holds_slots, const at::Tensor& schedule, const at::Tensor& merge_indptr,
    at::Tensor& merge_counters, int64_t num_work_items, const at::Tensor& partial_out,
    const at::Tensor& partial_lse, double sm_scale, double logits_soft_cap, at::Tensor& out,
    const std::optional<at::Tensor>& lse) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3, "q and out must be [batch, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "caches must be 4-D page views");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  q.scalar_type() == out.scalar_type(),
              "q, caches and out must share one dtype");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1,
              "last dimensions must be contiguous");
  TORCH_CHECK(schedule.scalar_type() == at::kInt && schedule.dim() == 2 && schedule.size(0) == 4 &&
                  schedule.is_contiguous(),
              "schedule must be a contiguous int32 [4, capacity] tensor");
  TORCH_CHECK(num_work_items <= schedule.size(1), "num_work_items exceeds the schedule capacity");
  TORCH_CHECK(merge_indptr.scalar_type() == at::kInt && merge_indptr.numel() >= q.size(0) + 1,
              "merge_indptr must hold batch + 1 int32 entries");
  TORCH_CHECK(merge_counters.scalar_type() == at::kInt && merge_counters.is_contiguous() &&
                  merge_counters.numel() >= q.size(0) * k_cache.size(2),
              "merge_counters must hold batch * num_kv_heads int32 zeros");
  TORCH_CHECK(partial_out.scalar_type() == at::kFloat && partial_lse.scalar_type() == at::kFloat &&
                  partial_out.is_contiguous() && partial_lse.is_contiguous(),
              "partial buffers must be contiguous float32");
  const int64_t num_qo_heads = q.size(1);
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(num_qo_heads % num_kv_heads == 0 && num_qo_heads / num_kv_heads <= 16,
              "group size (qo heads / kv heads) must be an integer in [1, 16]");
  TORCH_CHECK(partial_out.dim() == 3 && partial_out.size(1) == num_qo_heads &&
                  partial_out.size(2) == v_cache.size(3),
              "partial_out must be [capacity, num_qo_heads, head_dim_vo]");
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() &&
                    lse->numel() >= q.size(0) * num_qo_heads,
                "lse must be contiguous float32 [batch, num_qo_heads]");
  }

  DecodeParams params{};
  fill_shared_params(params, q, k_cache, v_cache, page_table, row_index, slot_map,
                     table_holds_slots, merge_indptr, merge_counters, partial_out, partial_lse,
                     sm_scale, logits_soft_cap, out, lse);
  const int32_t* sched = schedule.data_ptr<int32_t>();
  const int64_t capacity = schedule.size(1);
  params.schedule = {sched, sched + capacity, sched + 2 * capacity, sched + 3 * capacity};
  return params;
}

// One launch of shape `Traits` for dtype T (grid: kv heads x work items); `pdl`: see
// launch_with_pdl (torch_utils.h).
template <typename Traits, typename T>
void launch_decode(const DecodeParams& params, int64_t num_kv_heads, int64_t num_work_items,
                   bool pdl, cudaStream_t stream) {
  // Soft-cap is compiled in only where used: it costs registers and a tanh per score.
  auto* kernel = params.soft_cap > 0 ? &paged_decode_kernel<Traits, T, true>
                                     : &paged_decode_kernel<Traits, T, false>;
  allow_dynamic_smem(kernel, Traits::kSmemBytes);
  if (num_work_items == 0) return;
  // x = kv head, so all heads of a work item start together (their rows of a
  // token are adjacent in memory) and the schedule's longest-first order is
  // the dispatch order.
  TORCH_CHECK(num_work_items <= 65535, "paged_decode: at most 65535 work items");
  launch_with_pdl(kernel, params,
                  dim3(static_cast<unsigned>(num_kv_heads), static_cast<unsigned>(num_work_items)),
                  Traits::kThreads, Traits::kSmemBytes, pdl, stream);
}

// CTAs of shape `Traits` that fit on one SM at once: the plan sizes its
// split-KV schedule to fill the GPU with them.
template <typename Traits>
int decode_ctas_per_sm() {
  int ctas = 0;
  auto* kernel = &paged_decode_kernel<Traits, __nv_bfloat16, false>;
  allow_dynamic_smem(kernel, Traits::kSmemBytes);
  ATTN_BACKEND_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &ctas, kernel, Traits::kThreads, Traits::kSmemBytes));
  return ctas;
}

}  // namespace attn_backend
