// Writes new K/V rows into a paged KV cache at given token slots.
//
// Framework-free: no torch headers. The cache is described by strides so one
// kernel serves SGLang's per-layer K and V buffers ([num_slots, H, D], viewed
// as [num_pages, page_size, H, D]) and vLLM's K||V-packed per-layer tensor in
// any of its stride layouts.
#pragma once

#include <cstdint>

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
  int element_bytes;  // 2 for fp16/bf16
};

// Where vector `index` of one side of a token lives in the source and the cache.
struct RowVector {
  const char* src;
  char* dst;
};

__device__ __forceinline__ RowVector locate(const PagedKVWriteSide& side, int index, int token,
                                            int64_t page, int64_t slot_in_page,
                                            int elems_per_vec, int element_bytes) {
  const int vecs_per_head = side.head_dim / elems_per_vec;
  const int head = index / vecs_per_head;
  const int col = (index - head * vecs_per_head) * elems_per_vec;
  const int64_t src_elem = token * side.src_stride_token + head * side.src_stride_head + col;
  const int64_t dst_elem = page * side.cache_stride_page + slot_in_page * side.cache_stride_slot +
                           head * side.cache_stride_head + col;
  return {side.src + src_elem * element_bytes, side.cache + dst_elem * element_bytes};
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
                         params.element_bytes)
                : locate(params.v, index - k_vecs, token, page, slot_in_page, elems_per_vec,
                         params.element_bytes);
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

}  // namespace attn_backend
