// The run op's arguments turned into AttentionParams, after the checks that keep a wrong call
// from reading or writing outside a tensor: the last line of defence (readable validation is in
// Python, attn_backend/_validation.py). Header-only, so the bench sweeps' side extensions
// (bench/variants.py) launch their kernel variants over exactly the op's parameters.
#pragma once

#include <algorithm>

#include "attn_backend/common/params.cuh"
#include "attn_backend/plan_info.h"
#include "torch_utils.h"

namespace attn_backend {
namespace attention_args {

// Every access of a 16-byte chunk copy lands on a 16-byte boundary.
inline void check_chunk_aligned(const at::Tensor& t, const char* name) {
  const int64_t element = t.element_size();
  bool aligned = is_16_byte_aligned(t.data_ptr());
  for (int64_t d = 0; d + 1 < t.dim(); ++d) aligned = aligned && (t.stride(d) * element) % 16 == 0;
  TORCH_CHECK(aligned, "attention: ", name, " must start 16-byte aligned with 16-byte multiples "
              "as strides (rows are copied in 16-byte chunks)");
}

template <typename T>
T* region(const at::Tensor& workspace, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<uint8_t*>(workspace.data_ptr()) + offset);
}

}  // namespace attention_args

// The parameters of a launch for plan `info`, whose kernel reads head dims (head_dim_qk,
// head_dim_vo) in tiles of `tile_rows` packed rows. `kv`: the cache's K and V page views,
// and for an FP8 cache its K and V scales after them.
inline AttentionParams make_attention_params(
    const PlanInfo& info, int64_t head_dim_qk, int64_t head_dim_vo, int64_t tile_rows,
    const at::Tensor& q, at::TensorList kv, const at::Tensor& page_table,
    const std::optional<at::Tensor>& row_index,
    const std::optional<at::Tensor>& slot_map, bool table_holds_slots,
    const at::Tensor& workspace, const std::optional<at::Tensor>& mask_bits, double sm_scale,
    double logits_soft_cap, at::Tensor& out, const std::optional<at::Tensor>& lse) {
  using attention_args::check_chunk_aligned;
  using attention_args::region;
  TORCH_CHECK(kv.size() == 2 || kv.size() == 4, "attention: kv must be [k_cache, v_cache] or "
              "[k_cache, v_cache, k_scale, v_scale]; got ", kv.size(), " tensors");
  const at::Tensor& k_cache = kv[0];
  const at::Tensor& v_cache = kv[1];
  const bool fp8_cache = is_fp8(k_cache.scalar_type());
  TORCH_CHECK(fp8_cache == (kv.size() == 4), "attention: an FP8 cache comes with its k_scale "
              "and v_scale, a 16-bit cache without; got a ", k_cache.scalar_type(), " cache and ",
              kv.size() - 2, " scales");
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && out.dim() == 3, "attention: q and out must be CUDA "
              "[tokens, heads, dim] tensors");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "attention: caches must be 4-D page views");
  const int64_t num_qo_heads = q.size(1);
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(num_kv_heads == info.num_kv_heads && v_cache.size(2) == num_kv_heads &&
                  num_qo_heads == num_kv_heads * info.group_size,
              "attention: ", num_qo_heads, " query heads over ", num_kv_heads,
              " kv heads; the plan is for ", info.num_kv_heads, " kv heads in groups of ",
              info.group_size);
  TORCH_CHECK(q.size(2) == head_dim_qk && k_cache.size(3) == head_dim_qk &&
                  v_cache.size(3) == head_dim_vo && out.size(2) == head_dim_vo &&
                  out.size(1) == num_qo_heads && out.size(0) == q.size(0),
              "attention: head dims or output shape differ from the planned configuration (",
              head_dim_qk, ", ", head_dim_vo, ")");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1,
              "attention: last dimensions must be contiguous");
  check_chunk_aligned(q, "q");
  check_chunk_aligned(k_cache, "k_cache");
  check_chunk_aligned(v_cache, "v_cache");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0 && out.stride(0) % 2 == 0 &&
                  out.stride(1) % 2 == 0,
              "attention: out must be 4-byte aligned with even strides (written in pairs)");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(),
              "attention: k_cache and v_cache must share a dtype");
  TORCH_CHECK(workspace.scalar_type() == at::kByte && workspace.is_contiguous() &&
                  workspace.numel() >= info.workspace_bytes && workspace.device() == q.device() &&
                  is_16_byte_aligned(workspace.data_ptr()),
              "attention: workspace must be the wrapper's contiguous uint8 buffer of ",
              info.workspace_bytes, " bytes on q's device");
  TORCH_CHECK(info.num_items <= info.num_work_items && info.num_work_items <= info.work_capacity &&
                  info.num_partials <= info.partial_capacity &&
                  info.num_merge_groups <= info.merge_group_capacity &&
                  info.partial_rows <= info.partial_row_capacity &&
                  info.partial_rows >= std::min(tile_rows, info.group_size),
              "attention: the plan does not fit its workspace layout");
  const bool prefill = info.kernel_family() == KernelFamily::kPrefill;
  TORCH_CHECK(q.size(0) >= info.num_query_rows, "attention: q has ", q.size(0),
              " rows; the plan reads ", info.num_query_rows);
  const int64_t page_size = k_cache.size(1);
  const int64_t columns = table_holds_slots ? info.max_kv_len
                                            : (info.max_kv_len + page_size - 1) / page_size;
  TORCH_CHECK(page_table.size(1) >= columns, "attention: page_table has ", page_table.size(1),
              " columns; the batch's longest request needs ", columns);
  TORCH_CHECK((row_index.has_value() ? row_index->numel() : page_table.size(0)) >= info.batch,
              "attention: the page table addresses fewer requests than the batch has");
  TORCH_CHECK(mask_bits.has_value() == (info.has_mask != 0),
              "attention: mask_bits must be given exactly when the plan has a custom mask");
  if (mask_bits.has_value()) {
    TORCH_CHECK(mask_bits->scalar_type() == at::kByte && mask_bits->is_contiguous() &&
                    mask_bits->device() == q.device(),
                "attention: mask_bits must be contiguous uint8 on q's device");
  }
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() &&
                    lse->numel() >= q.size(0) * num_qo_heads && lse->device() == q.device(),
                "attention: lse must be contiguous float32 [tokens, num_qo_heads]");
  }

  AttentionParams params{};
  params.q = q.data_ptr();
  params.q_stride_token = q.stride(0);
  params.q_stride_head = q.stride(1);
  params.out = out.data_ptr();
  params.out_stride_token = out.stride(0);
  params.out_stride_head = out.stride(1);
  params.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  params.k = paged_cache_side(k_cache);
  params.v = paged_cache_side(v_cache);
  if (fp8_cache) {
    const int k_stride = fp8_scale_stride(kv[2], k_cache.device(), num_kv_heads, "attention",
                                          "k_scale");
    const int v_stride = fp8_scale_stride(kv[3], k_cache.device(), num_kv_heads, "attention",
                                          "v_scale");
    params.scales = {kv[2].data_ptr<float>(), kv[3].data_ptr<float>(), k_stride, v_stride};
  }
  params.pages = page_table_view(page_table, row_index, slot_map, table_holds_slots);
  params.page_size = static_cast<int>(k_cache.size(1));
  params.num_pages = static_cast<int>(k_cache.size(0));
  params.num_qo_heads = static_cast<int>(num_qo_heads);
  params.num_kv_heads = static_cast<int>(num_kv_heads);
  params.group_size = static_cast<int>(info.group_size);
  params.sm_scale = static_cast<float>(sm_scale);
  params.soft_cap = static_cast<float>(logits_soft_cap);
  params.window_left = static_cast<int>(info.window_left);
  params.causal = info.causal != 0;
  if (prefill) {
    const int32_t* requests = region<int32_t>(workspace, info.request_info_offset);
    params.requests = {requests, requests + info.max_batch, requests + 2 * info.max_batch};
  }
  params.mask_bits = mask_bits.has_value() ? mask_bits->data_ptr<uint8_t>() : nullptr;
  params.mask_offset = mask_bits.has_value()
                           ? region<const int64_t>(workspace, info.mask_offsets_offset)
                           : nullptr;
  params.work = {region<const int32_t>(workspace, info.schedule_offset),
                 static_cast<int>(info.num_work_items)};
  params.split = {region<float>(workspace, info.partial_out_offset),
                  region<float>(workspace, info.partial_lse_offset),
                  static_cast<int>(info.partial_rows),
                  region<const int32_t>(workspace, info.merge_indptr_offset),
                  region<int32_t>(workspace, info.merge_counters_offset)};

  return params;
}

}  // namespace attn_backend
