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

// Copies one token's rows of one side in VecT-sized chunks (VecT is uint4 when
// every row start is 16-byte aligned, else a single element).
template <typename VecT>
__device__ __forceinline__ void copy_token_rows(const PagedKVWriteSide& side, int token,
                                                int64_t page, int64_t slot_in_page, int num_heads,
                                                int element_bytes) {
  const int elems_per_vec = static_cast<int>(sizeof(VecT)) / element_bytes;
  const int vecs_per_head = side.head_dim / elems_per_vec;
  const int total_vecs = num_heads * vecs_per_head;
  const int64_t cache_token_offset =
      page * side.cache_stride_page + slot_in_page * side.cache_stride_slot;
  for (int i = threadIdx.x; i < total_vecs; i += blockDim.x) {
    const int head = i / vecs_per_head;
    const int col = (i - head * vecs_per_head) * elems_per_vec;
    const int64_t src_elem = token * side.src_stride_token + head * side.src_stride_head + col;
    const int64_t dst_elem = cache_token_offset + head * side.cache_stride_head + col;
    *reinterpret_cast<VecT*>(side.cache + dst_elem * element_bytes) =
        *reinterpret_cast<const VecT*>(side.src + src_elem * element_bytes);
  }
}

// One CTA per token: the slot is read once and the token's K and V rows
// (num_heads * head_dim elements each) are copied by the whole CTA.
template <typename VecT, typename SlotT>
__global__ void paged_kv_write_kernel(const PagedKVWriteParams<SlotT> params) {
  const int token = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(params.slots[token]);
  // Padding (-1) is skipped by contract; an out-of-range slot is skipped so a
  // bad index can never write outside the cache (debug mode reports it on
  // the host before launch).
  if (slot < 0 || slot >= params.num_slots) return;
  const int64_t page = slot / params.page_size;
  const int64_t slot_in_page = slot - page * params.page_size;
  copy_token_rows<VecT>(params.k, token, page, slot_in_page, params.num_heads,
                        params.element_bytes);
  copy_token_rows<VecT>(params.v, token, page, slot_in_page, params.num_heads,
                        params.element_bytes);
}

}  // namespace attn_backend
