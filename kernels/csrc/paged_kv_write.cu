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

// Vectors of `elems` elements need every row start aligned to a vector: base pointers and all
// strides, in the source (16-bit) and in the cache (its element size).
bool rows_allow_vectors(const at::Tensor& src, const at::Tensor& cache, int64_t elems) {
  auto aligned = [&](const at::Tensor& t) {
    const int64_t bytes = elems * t.element_size();
    bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
    for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && t.stride(d) % elems == 0;
    return ok;
  };
  return cache.size(3) % elems == 0 && aligned(src) && aligned(cache);
}

bool rows_are_16_byte_aligned(const at::Tensor& src, const at::Tensor& cache) {
  return rows_allow_vectors(src, cache, 16 / src.element_size());
}

template <typename SlotT>
PagedKVWriteParams<SlotT> write_params(const at::Tensor& key, const at::Tensor& value,
                                       at::Tensor& k_cache, at::Tensor& v_cache,
                                       const at::Tensor& slots) {
  PagedKVWriteParams<SlotT> params;
  params.k = make_side(key, k_cache);
  params.v = make_side(value, v_cache);
  params.slots = slots.data_ptr<SlotT>();
  params.num_tokens = static_cast<int>(key.size(0));
  params.num_heads = static_cast<int>(key.size(1));
  params.page_size = static_cast<int>(k_cache.size(1));
  params.num_slots = k_cache.size(0) * k_cache.size(1);
  params.element_bytes = static_cast<int>(key.element_size());
  return params;
}

// The quantising write into an FP8 cache.
template <typename SlotT>
void launch_fp8(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
                at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& k_scale,
                const at::Tensor& v_scale, bool via_input_dtype) {
  const PagedKVWriteParams<SlotT> params = write_params<SlotT>(key, value, k_cache, v_cache, slots);
  const int k_stride =
      fp8_scale_stride(k_scale, k_cache.device(), key.size(1), "paged_kv_write", "k_scale");
  const int v_stride =
      fp8_scale_stride(v_scale, k_cache.device(), key.size(1), "paged_kv_write", "v_scale");
  const KVWriteScales scales{k_scale.data_ptr<float>(), v_scale.data_ptr<float>(), k_stride,
                             v_stride};
  if (params.num_tokens == 0) return;
  const bool vectorized = rows_allow_vectors(key, k_cache, 8) && rows_allow_vectors(value, v_cache, 8);
  const dim3 grid(params.num_tokens);
  const dim3 block(128);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto in, auto fp8, auto via_input) {
    using In = decltype(in);
    using Fp8 = decltype(fp8);
    constexpr bool kViaInput = decltype(via_input)::value;
    if (vectorized) {
      paged_kv_quantize_kernel<In, Fp8, kViaInput, 8, SlotT><<<grid, block, 0, stream>>>(params, scales);
    } else {
      paged_kv_quantize_kernel<In, Fp8, kViaInput, 1, SlotT><<<grid, block, 0, stream>>>(params, scales);
    }
  };
  auto with_format = [&](auto in) {
    auto with_rounding = [&](auto fp8) {
      if (via_input_dtype) {
        run(in, fp8, std::true_type{});
      } else {
        run(in, fp8, std::false_type{});
      }
    };
    if (k_cache.scalar_type() == at::kFloat8_e4m3fn) {
      with_rounding(__nv_fp8_e4m3{});
    } else {
      with_rounding(__nv_fp8_e5m2{});
    }
  };
  if (key.scalar_type() == at::kHalf) {
    with_format(__half{});
  } else {
    with_format(__nv_bfloat16{});
  }
  ATTN_BACKEND_CHECK_LAUNCH();
}

template <typename SlotT>
void launch(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache,
            at::Tensor& v_cache, const at::Tensor& slots) {
  const PagedKVWriteParams<SlotT> params = write_params<SlotT>(key, value, k_cache, v_cache, slots);
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
                    at::Tensor& v_cache, const at::Tensor& slots,
                    const std::optional<at::Tensor>& k_scale,
                    const std::optional<at::Tensor>& v_scale, bool via_input_dtype) {
  TORCH_CHECK(key.dim() == 3 && value.dim() == 3, "key and value must be [tokens, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "k_cache and v_cache must be [pages, page_size, heads, dim] views");
  const bool fp8_cache = is_fp8(k_cache.scalar_type());
  TORCH_CHECK(key.scalar_type() == value.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type() &&
                  (fp8_cache || key.scalar_type() == k_cache.scalar_type()),
              "key and value must share a dtype, the caches theirs or an FP8 format");
  TORCH_CHECK(key.scalar_type() == at::kHalf || key.scalar_type() == at::kBFloat16,
              "paged_kv_write writes float16 or bfloat16 rows");
  TORCH_CHECK(fp8_cache == (k_scale.has_value() && v_scale.has_value()),
              "paged_kv_write: an FP8 cache needs k_scale and v_scale, a 16-bit cache neither");
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
  TORCH_CHECK(slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt,
              "slots must be int32 or int64");
  const bool long_slots = slots.scalar_type() == at::kLong;
  if (fp8_cache) {
    if (long_slots) {
      launch_fp8<int64_t>(key, value, k_cache, v_cache, slots, *k_scale, *v_scale, via_input_dtype);
    } else {
      launch_fp8<int32_t>(key, value, k_cache, v_cache, slots, *k_scale, *v_scale, via_input_dtype);
    }
  } else if (long_slots) {
    launch<int64_t>(key, value, k_cache, v_cache, slots);
  } else {
    launch<int32_t>(key, value, k_cache, v_cache, slots);
  }
}

}  // namespace
}  // namespace attn_backend

TORCH_LIBRARY_IMPL(attn_backend, CUDA, m) { m.impl("paged_kv_write", &attn_backend::paged_kv_write); }
