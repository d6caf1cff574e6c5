// Writes new K/V rows into a paged KV cache at given token slots.
//
// Framework-free: no torch headers. The cache is described by strides so one
// kernel serves SGLang's per-layer K and V buffers ([num_slots, H, D], viewed
// as [num_pages, page_size, H, D]) and vLLM's K||V-packed per-layer tensor in
// any of its stride layouts.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <type_traits>

namespace attn_backend {

// One side (K or V) of the copy: rows of the new tokens and where they go.
struct PagedKVWriteSide {
  const char* src;           // [num_tokens, num_heads, head_dim] rows
  int64_t src_stride_token;  // in elements
  int64_t src_stride_head;
  char* cache;               // [num_pages, page_size, num_heads, head_dim] view
  int64_t cache_stride_page;  // in elements
  int64_t cache_stride_slot;  // between tokens of one page
  int64_t cache_stride_head;
  int head_dim;
};

template <typename SlotT>
struct PagedKVWriteParams {
  PagedKVWriteSide k;
  PagedKVWriteSide v;
  const SlotT* slots;  // [num_tokens]; -1 marks a padding token that is skipped
  int num_tokens;
  int num_heads;
  int page_size;
  int64_t num_slots;  // num_pages * page_size; slots beyond it are skipped
  int element_bytes;  // of the 16-bit copy (the FP8 kernel knows its types)
};

// Where vector `index` of one side of a token lives in the source and the cache, and its head.
struct RowVector {
  const char* src;
  char* dst;
  int head;
};

__device__ __forceinline__ RowVector locate(const PagedKVWriteSide& side, int index, int token,
                                            int64_t page, int64_t slot_in_page,
                                            int elems_per_vec, int src_element_bytes,
                                            int cache_element_bytes) {
  const int vecs_per_head = side.head_dim / elems_per_vec;
  const int head = index / vecs_per_head;
  const int col = (index - head * vecs_per_head) * elems_per_vec;
  const int64_t src_elem = token * side.src_stride_token + head * side.src_stride_head + col;
  const int64_t dst_elem = page * side.cache_stride_page + slot_in_page * side.cache_stride_slot +
                           head * side.cache_stride_head + col;
  return {side.src + src_elem * src_element_bytes, side.cache + dst_elem * cache_element_bytes,
          head};
}

// One CTA per token: the slot is read once and the CTA copies the token's K
// rows then V rows (num_heads * head_dim elements each) in VecT chunks (uint4
// when every row start is 16-byte aligned, else one element). Each thread
// issues kLoadsInFlight loads before its stores so the copy is not bound by
// one round trip per vector.
template <typename VecT, typename SlotT>
__global__ void paged_kv_write_kernel(const PagedKVWriteParams<SlotT> params) {
  constexpr int kLoadsInFlight = 4;
  const int token = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(params.slots[token]);
  // Padding (-1) is skipped by contract; an out-of-range slot is skipped so a
  // bad index can never write outside the cache (debug mode reports it on
  // the host before launch).
  if (slot < 0 || slot >= params.num_slots) return;
  const int64_t page = slot / params.page_size;
  const int64_t slot_in_page = slot - page * params.page_size;
  const int elems_per_vec = static_cast<int>(sizeof(VecT)) / params.element_bytes;
  const int k_vecs = params.num_heads * (params.k.head_dim / elems_per_vec);
  const int total_vecs = k_vecs + params.num_heads * (params.v.head_dim / elems_per_vec);

  for (int first = threadIdx.x; first < total_vecs; first += kLoadsInFlight * blockDim.x) {
    VecT data[kLoadsInFlight];
    char* dst[kLoadsInFlight];
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int index = first + u * blockDim.x;
      dst[u] = nullptr;
      if (index < total_vecs) {
        const RowVector at =
            index < k_vecs
                ? locate(params.k, index, token, page, slot_in_page, elems_per_vec,
                         params.element_bytes, params.element_bytes)
                : locate(params.v, index - k_vecs, token, page, slot_in_page, elems_per_vec,
                         params.element_bytes, params.element_bytes);
        data[u] = *reinterpret_cast<const VecT*>(at.src);
        dst[u] = at.dst;
      }
    }
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      if (dst[u] != nullptr) *reinterpret_cast<VecT*>(dst[u]) = data[u];
    }
  }
}

// FP8 caches: each element is stored as fp8 = cvt(x / scale) with round-to-nearest-even and
// saturation at the largest finite value (NaN stays NaN), x / scale in float32: vLLM's
// reshape_and_cache_flash convention. kViaInput rounds the quotient to the input's type
// first: SGLang's pool store, which divides the bf16/fp16 rows in place before the cast.
// Scales: per kv head (stride 1) or one for all (stride 0), read on the device.
struct KVWriteScales {
  const float* k;
  const float* v;
  int k_stride;
  int v_stride;
};

template <typename DTypeIn>
__device__ __forceinline__ float to_float(DTypeIn x) {
  if constexpr (std::is_same_v<DTypeIn, __half>) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}

template <typename DTypeIn, typename DTypeFp8, bool kViaInput>
__device__ __forceinline__ uint8_t quantize(DTypeIn x, float scale) {
  float quotient = __fdiv_rn(to_float(x), scale);
  if constexpr (kViaInput) {
    if constexpr (std::is_same_v<DTypeIn, __half>) {
      quotient = __half2float(__float2half_rn(quotient));
    } else {
      quotient = __bfloat162float(__float2bfloat16_rn(quotient));
    }
  }
  constexpr __nv_fp8_interpretation_t kFormat =
      std::is_same_v<DTypeFp8, __nv_fp8_e4m3> ? __NV_E4M3 : __NV_E5M2;
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(quotient, __NV_SATFINITE, kFormat));
}

// As paged_kv_write_kernel, quantising: kElems input elements per vector (8: 16-byte loads,
// 8-byte stores, where every row start allows them; else 1).
template <typename DTypeIn, typename DTypeFp8, bool kViaInput, int kElems, typename SlotT>
__global__ void paged_kv_quantize_kernel(const PagedKVWriteParams<SlotT> params,
                                         const KVWriteScales scales) {
  static_assert(kElems == 8 || kElems == 1, "vectors of 8 elements or single elements");
  constexpr int kLoadsInFlight = 4;
  using InVec = std::conditional_t<kElems == 8, uint4, DTypeIn>;
  using OutVec = std::conditional_t<kElems == 8, uint2, uint8_t>;
  const int token = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(params.slots[token]);
  if (slot < 0 || slot >= params.num_slots) return;  // padding, or never outside the cache
  const int64_t page = slot / params.page_size;
  const int64_t slot_in_page = slot - page * params.page_size;
  const int k_vecs = params.num_heads * (params.k.head_dim / kElems);
  const int total_vecs = k_vecs + params.num_heads * (params.v.head_dim / kElems);

  for (int first = threadIdx.x; first < total_vecs; first += kLoadsInFlight * blockDim.x) {
    InVec data[kLoadsInFlight];
    char* dst[kLoadsInFlight];
    float scale[kLoadsInFlight];
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int index = first + u * blockDim.x;
      dst[u] = nullptr;
      if (index < total_vecs) {
        const bool is_k = index < k_vecs;
        const RowVector at =
            is_k ? locate(params.k, index, token, page, slot_in_page, kElems, sizeof(DTypeIn), 1)
                 : locate(params.v, index - k_vecs, token, page, slot_in_page, kElems,
                          sizeof(DTypeIn), 1);
        data[u] = *reinterpret_cast<const InVec*>(at.src);
        dst[u] = at.dst;
        scale[u] = is_k ? scales.k[at.head * scales.k_stride] : scales.v[at.head * scales.v_stride];
      }
    }
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      if (dst[u] == nullptr) continue;
      const DTypeIn* in = reinterpret_cast<const DTypeIn*>(&data[u]);
      OutVec out;
      uint8_t* bytes = reinterpret_cast<uint8_t*>(&out);
#pragma unroll
      for (int e = 0; e < kElems; ++e) bytes[e] = quantize<DTypeIn, DTypeFp8, kViaInput>(in[e], scale[u]);
      *reinterpret_cast<OutVec*>(dst[u]) = out;
    }
  }
}

}  // namespace attn_backend
