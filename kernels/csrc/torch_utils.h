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

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes) {
  ATTN_BACKEND_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

}  // namespace attn_backend
