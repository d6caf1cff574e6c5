// Helpers shared by the torch bindings (never included by kernels/include).
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "attn_backend/common/paged_addressing.cuh"

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
  TORCH_CHECK(!row_index.has_value() || ((row_index->scalar_type() == at::kInt ||
                                          row_index->scalar_type() == at::kLong) &&
                                         row_index->dim() == 1 && row_index->is_contiguous()),
              "row_index must be a contiguous int32 or int64 vector");
  TORCH_CHECK(!slot_map.has_value() || (table_holds_slots && slot_map->scalar_type() == at::kLong &&
                                        slot_map->dim() == 1 && slot_map->is_contiguous()),
              "slot_map must be a contiguous int64 vector over a table of token slots");
  PageTableView view{};
  view.table = page_table.data_ptr<int32_t>();
  view.num_rows = page_table.size(0);
  view.row_stride = page_table.stride(0);
  view.holds_token_slots = table_holds_slots;
  view.row_index = row_index.has_value() ? row_index->data_ptr() : nullptr;
  view.row_index_is_int64 = row_index.has_value() && row_index->scalar_type() == at::kLong;
  view.slot_map = slot_map.has_value() ? slot_map->data_ptr<int64_t>() : nullptr;
  view.slot_map_size = slot_map.has_value() ? slot_map->numel() : 0;
  return view;
}

inline bool is_fp8(at::ScalarType type) {
  return type == at::kFloat8_e4m3fn || type == at::kFloat8_e5m2;
}

// An FP8 cache's scale of one side, as the kernels read it: contiguous float32 on `device`,
// one value or one per kv head. Returns its stride over kv heads (0: one for all).
inline int fp8_scale_stride(const at::Tensor& scale, const at::Device& device,
                            int64_t num_kv_heads, const char* op, const char* name) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.device() == device &&
                  (scale.numel() == 1 || scale.numel() == num_kv_heads),
              op, ": ", name, " must be a contiguous float32 tensor on the cache's device with 1 "
              "or num_kv_heads (", num_kv_heads, ") elements; got ", scale.numel(),
              " elements of ", scale.scalar_type(), " on ", scale.device());
  return scale.numel() == 1 ? 0 : 1;
}

// The element types of one call: query, K/V cache, output.
struct DTypes {
  at::ScalarType q;
  at::ScalarType kv;
  at::ScalarType out;
};

// Calls fn(DTypeQ{}, DTypeKV{}, DTypeO{}) for the compiled element types of `dtypes`: the
// query and output float16 or bfloat16, the cache the same or FP8 (e4m3fn, e5m2).
template <typename Q, typename Fn>
void dispatch_kv_dtype(const DTypes& dtypes, const char* op, Fn&& fn) {
  if (dtypes.kv == dtypes.q) return fn(Q{}, Q{}, Q{});
  if (dtypes.kv == at::kFloat8_e4m3fn) return fn(Q{}, __nv_fp8_e4m3{}, Q{});
  if (dtypes.kv == at::kFloat8_e5m2) return fn(Q{}, __nv_fp8_e5m2{}, Q{});
  TORCH_CHECK(false, op, ": element types (q ", dtypes.q, ", kv cache ", dtypes.kv, ", out ",
              dtypes.out, ") are not compiled; compiled: q and out float16 or bfloat16, the "
              "cache the query's type, float8_e4m3fn or float8_e5m2");
}

template <typename Fn>
void dispatch_dtypes(const DTypes& dtypes, const char* op, Fn&& fn) {
  TORCH_CHECK(dtypes.q == dtypes.out && (dtypes.q == at::kBFloat16 || dtypes.q == at::kHalf),
              op, ": q (", dtypes.q, ") and out (", dtypes.out, ") must both be float16 or "
              "both bfloat16");
  if (dtypes.q == at::kBFloat16) return dispatch_kv_dtype<__nv_bfloat16>(dtypes, op, fn);
  return dispatch_kv_dtype<__half>(dtypes, op, fn);
}

// Calls fn(T{}, T{}, T{}) where the query, the cache and the output are all float16 or all
// bfloat16: the kernels compiled without FP8 caches (their rows are no whole 128-byte lines
// in FP8, or the family has no FP8 path yet).
template <typename Fn>
void dispatch_16bit_dtypes(const DTypes& dtypes, const char* op, Fn&& fn) {
  TORCH_CHECK(dtypes.q == dtypes.out && dtypes.kv == dtypes.q &&
                  (dtypes.q == at::kBFloat16 || dtypes.q == at::kHalf),
              op, ": element types (q ", dtypes.q, ", kv cache ", dtypes.kv, ", out ",
              dtypes.out, ") are not compiled; compiled: all float16 or all bfloat16");
  if (dtypes.q == at::kBFloat16) return fn(__nv_bfloat16{}, __nv_bfloat16{}, __nv_bfloat16{});
  return fn(__half{}, __half{}, __half{});
}

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes) {
  ATTN_BACKEND_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// CTAs of `kernel` that fit on one SM at once.
template <typename Kernel>
int ctas_per_sm(Kernel kernel, int threads, int smem_bytes) {
  int ctas = 0;
  allow_dynamic_smem(kernel, smem_bytes);
  ATTN_BACKEND_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, threads, smem_bytes));
  return ctas;
}

// The grid of `num_items` work items for `num_kv_heads` kv heads (params.cuh's cta_work):
// (kv heads, items, item blocks), the items past 65535 in z.
inline dim3 work_grid(int64_t num_items, int64_t num_kv_heads) {
  constexpr int64_t kMaxGridY = 65535;
  const int64_t blocks = (num_items + kMaxGridY - 1) / kMaxGridY;
  TORCH_CHECK(blocks <= kMaxGridY && num_kv_heads <= INT32_MAX, "attn_backend: ", num_items,
              " work items are too many for one launch");
  return dim3(static_cast<unsigned>(num_kv_heads),
              static_cast<unsigned>(std::min(num_items, kMaxGridY)),
              static_cast<unsigned>(blocks));
}

// Launches `kernel(params)` on `grid`; with `pdl` as a programmatic dependent launch
// (sm_90+): the kernel may start while the previous kernel in the stream finishes, so its
// launch and its plan reads hide in that kernel's tail. The kernel must call
// ptx::wait_for_prior_grids() before it reads anything an earlier kernel may have written.
template <typename Params>
void launch_with_pdl(void (*kernel)(Params), const Params& params, dim3 grid, int threads,
                     int smem_bytes, bool pdl, cudaStream_t stream) {
  allow_dynamic_smem(kernel, smem_bytes);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
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

// Whether `kernel`'s code runs on the current device: a wgmma kernel needs an sm_90 GPU
// and sm_90a code in this build (a build for other targets falls back to mma.sync).
// Cached per device: a launch must not pay for the driver queries.
bool sm90a_kernel_runs_here(const void* kernel);

}  // namespace attn_backend
