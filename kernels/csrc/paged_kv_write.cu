// torch binding of kernels/include/attn_backend/paged_kv_write.cuh.
// Argument validation with readable messages happens in Python
// (attn_backend/kv_write.py); these checks are the last line of defence.
#include "attn_backend/paged_kv_write.cuh"
#include "torch_utils.h"

#include <array>

namespace attn_backend {
namespace {

PagedKVWriteSide make_side(const at::Tensor& src, at::Tensor& cache) {
  PagedKVWriteSide side;
  side.src = static_cast<const char*>(src.data_ptr());
  side.src_stride_token = src.stride(0);
  side.src_stride_head = src.stride(1);
  side.cache = static_cast<char*>(cache.data_ptr());
  side.cache_stride_page = cache.stride(0);
  side.cache_stride_slot = cache.stride(1);
  side.cache_stride_head = cache.stride(2);
  side.head_dim = static_cast<int>(cache.size(3));
  return side;
}

// 16-byte copies need every row start aligned: base pointers and all strides.
bool rows_are_16_byte_aligned(const at::Tensor& src, const at::Tensor& cache) {
  const int64_t elems_per_16_bytes = 16 / src.element_size();
  const bool strides_ok = src.stride(0) % elems_per_16_bytes == 0 &&
                          src.stride(1) % elems_per_16_bytes == 0 &&
                          cache.stride(0) % elems_per_16_bytes == 0 &&
                          cache.stride(1) % elems_per_16_bytes == 0 &&
                          cache.stride(2) % elems_per_16_bytes == 0 &&
                          cache.size(3) % elems_per_16_bytes == 0;
  return strides_ok && is_16_byte_aligned(src.data_ptr()) && is_16_byte_aligned(cache.data_ptr());
}

template <typename SlotT>
void launch(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
            at::Tensor& v_cache, const at::Tensor& slots) {
  PagedKVWriteParams<SlotT> params;
  params.k = make_side(key, k_cache);
  params.v = make_side(value, v_cache);
  params.slots = slots.data_ptr<SlotT>();
  params.num_tokens = static_cast<int>(key.size(0));
  params.num_heads = static_cast<int>(key.size(1));
  params.page_size = static_cast<int>(k_cache.size(1));
  params.num_slots = k_cache.size(0) * k_cache.size(1);
  params.element_bytes = static_cast<int>(key.element_size());
  if (params.num_tokens == 0) return;

  const bool vectorized =
      rows_are_16_byte_aligned(key, k_cache) && rows_are_16_byte_aligned(value, v_cache);
  const dim3 grid(params.num_tokens);
  const dim3 block(128);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vectorized) {
    paged_kv_write_kernel<uint4, SlotT><<<grid, block, 0, stream>>>(params);
  } else {
    paged_kv_write_kernel<uint16_t, SlotT><<<grid, block, 0, stream>>>(params);
  }
  ATTN_BACKEND_CHECK_LAUNCH();
}

void paged_kv_write(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                    at::Tensor& v_cache, const at::Tensor& slots) {
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3, "key and value must be [tokens, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "k_cache and v_cache must be [pages, page_size, heads, dim] views");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() &&
                  value.scalar_type() == v_cache.scalar_type() &&
                  key.scalar_type() == value.scalar_type(),
              "key, value and the caches must share one dtype");
  TORCH_CHECK(key.element_size() == 2, "paged_kv_write supports 2-byte dtypes (fp16, bf16)");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1 && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1,
              "the last dimension of key, value and the caches must be contiguous");
  TORCH_CHECK(key.size(0) == value.size(0) && key.size(0) == slots.size(0),
              "key, value and slots must have the same number of tokens");
  TORCH_CHECK(key.size(1) == k_cache.size(2) && value.size(1) == v_cache.size(2),
              "head counts of the new rows and the cache differ");
  TORCH_CHECK(key.size(2) == k_cache.size(3) && value.size(2) == v_cache.size(3),
              "head dims of the new rows and the cache differ");
  TORCH_CHECK(k_cache.size(0) == v_cache.size(0) && k_cache.size(1) == v_cache.size(1),
              "k_cache and v_cache must have the same pages and page size");
  TORCH_CHECK(slots.dim() == 1 && slots.is_contiguous(), "slots must be a contiguous 1-D tensor");
  const std::array<const at::Tensor*, 5> all_tensors = {&key, &value, &k_cache, &v_cache, &slots};
  for (const at::Tensor* t : all_tensors) {
    TORCH_CHECK(t->is_cuda() && t->get_device() == key.get_device(),
                "all paged_kv_write tensors must be on one CUDA device");
  }
  const c10::cuda::CUDAGuard device_guard(key.device());
  if (slots.scalar_type() == at::kLong) {
    launch<int64_t>(key, value, k_cache, v_cache, slots);
  } else {
    TORCH_CHECK(slots.scalar_type() == at::kInt, "slots must be int32 or int64");
    launch<int32_t>(key, value, k_cache, v_cache, slots);
  }
}

}  // namespace
}  // namespace attn_backend

TORCH_LIBRARY_IMPL(attn_backend, CUDA, m) { m.impl("paged_kv_write", &attn_backend::paged_kv_write); }
