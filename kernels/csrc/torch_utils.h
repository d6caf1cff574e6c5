// Helpers shared by the torch bindings (never included by kernels/include).
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "attn_backend/paged_addressing.cuh"

// Turns a failed launch or CUDA call into a Python RuntimeError instead of a
// silent wrong result.
#define ATTN_BACKEND_CUDA_CHECK(expr)                                             \
  do {                                                                            \
    const cudaError_t attn_backend_err_ = (expr);                                 \
    TORCH_CHECK(attn_backend_err_ == cudaSuccess, "attn_backend CUDA error: ",    \
                cudaGetErrorString(attn_backend_err_), " (", #expr, ")");         \
  } while (0)

#define ATTN_BACKEND_CHECK_LAUNCH() ATTN_BACKEND_CUDA_CHECK(cudaGetLastError())

namespace attn_backend {

inline bool is_16_byte_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// One side of a cache viewed as [num_pages, page_size, heads, dim].
inline PagedCacheSide paged_cache_side(const at::Tensor& cache) {
  return {static_cast<const char*>(cache.data_ptr()), cache.stride(0), cache.stride(1),
          cache.stride(2)};
}

// The engine's table, read in place by the kernels.
inline PageTableView page_table_view(const at::Tensor& page_table,
                                     const std::optional<at::Tensor>& row_index,
                                     const std::optional<at::Tensor>& slot_map,
                                     bool table_holds_slots) {
  TORCH_CHECK(page_table.scalar_type() == at::kInt && page_table.dim() == 2 &&
                  page_table.stride(1) == 1,
              "page_table must be a row-contiguous int32 matrix");
  TORCH_CHECK(!slot_map.has_value() || (table_holds_slots && slot_map->scalar_type() == at::kLong &&
                                        slot_map->dim() == 1 && slot_map->is_contiguous()),
              "slot_map must be a contiguous int64 vector over a table of token slots");
  PageTableView view{};
  view.table = page_table.data_ptr<int32_t>();
  view.row_stride = page_table.stride(0);
  view.holds_token_slots = table_holds_slots;
  view.row_index = row_index.has_value() ? row_index->data_ptr() : nullptr;
  view.row_index_is_int64 = row_index.has_value() && row_index->scalar_type() == at::kLong;
  view.slot_map = slot_map.has_value() ? slot_map->data_ptr<int64_t>() : nullptr;
  return view;
}

// The fields DecodeParams and PrefillParams share: query, output, the paged
// cache and its table, head counts, scales and the split-KV merge buffers.
template <typename Params>
void fill_shared_params(Params& params, const at::Tensor& q, const at::Tensor& k_cache,
                        const at::Tensor& v_cache, const at::Tensor& page_table,
                        const std::optional<at::Tensor>& row_index,
                        const std::optional<at::Tensor>& slot_map, bool table_holds_slots,
                        const at::Tensor& merge_indptr, at::Tensor& merge_counters,
                        const at::Tensor& partial_out, const at::Tensor& partial_lse,
                        double sm_scale, double logits_soft_cap, at::Tensor& out,
                        const std::optional<at::Tensor>& lse) {
  const int64_t num_qo_heads = q.size(1);
  const int64_t num_kv_heads = k_cache.size(2);
  params.q = q.data_ptr();
  params.q_stride_token = q.stride(0);
  params.q_stride_head = q.stride(1);
  params.out = out.data_ptr();
  params.out_stride_token = out.stride(0);
  params.out_stride_head = out.stride(1);
  params.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  params.k = paged_cache_side(k_cache);
  params.v = paged_cache_side(v_cache);
  params.pages = page_table_view(page_table, row_index, slot_map, table_holds_slots);
  params.page_size = static_cast<int>(k_cache.size(1));
  params.num_pages = static_cast<int>(k_cache.size(0));
  params.num_qo_heads = static_cast<int>(num_qo_heads);
  params.group_size = static_cast<int>(num_qo_heads / num_kv_heads);
  params.sm_scale = static_cast<float>(sm_scale);
  params.soft_cap = static_cast<float>(logits_soft_cap);
  params.partial_out = partial_out.data_ptr<float>();
  params.partial_lse = partial_lse.data_ptr<float>();
  params.merge_indptr = merge_indptr.data_ptr<int32_t>();
  params.merge_counters = merge_counters.data_ptr<int32_t>();
}

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes) {
  ATTN_BACKEND_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// Launches `kernel(params)`; with `pdl` as a programmatic dependent launch (sm_90+): the
// kernel may start while the previous kernel in the stream finishes, so its launch and its
// plan reads hide in that kernel's tail. The kernel must call ptx::wait_for_prior_grids()
// before it reads anything an earlier kernel may have written.
template <typename Params>
void launch_with_pdl(void (*kernel)(Params), const Params& params, dim3 grid, int threads,
                     int smem_bytes, bool pdl, cudaStream_t stream) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = pdl ? 1 : 0;
  ATTN_BACKEND_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, params));
}

}  // namespace attn_backend
