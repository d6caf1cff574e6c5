// Where token t of request r lives in a paged KV cache, for both engines.
//
// A page id is `table[row(r) * row_stride + (t / page_size) * entry_stride] / divisor`:
// - vLLM's block table [batch, max_blocks]: row(r) = r, entry_stride = 1, divisor = 1;
// - SGLang's req_to_token [pool_rows, max_context] of token slots:
//   row(r) = req_pool_indices[r], entry_stride = divisor = page_size (the slot
//   of a page's first token divided by the page size is the page id).
// Either table is read in place, so replaying a CUDA graph needs no copy.
#pragma once

#include <cstdint>

namespace attn_backend {

struct PageTableView {
  const int32_t* table;
  int64_t row_stride;     // elements between rows of `table`
  int entry_stride;       // elements between consecutive pages of one row
  int divisor;            // table value / divisor = page id
  const void* row_index;  // per-request row of `table`; null = the request index itself
  bool row_index_is_int64;

  __device__ __forceinline__ int64_t row_of(int request) const {
    if (row_index == nullptr) return request;
    return row_index_is_int64 ? static_cast<const int64_t*>(row_index)[request]
                              : static_cast<const int32_t*>(row_index)[request];
  }

  __device__ __forceinline__ int page_id(int64_t row, int64_t page_in_sequence) const {
    return table[row * row_stride + page_in_sequence * entry_stride] / divisor;
  }
};

// One side (K or V) of a paged cache viewed as [num_pages, page_size, heads, dim].
struct PagedCacheSide {
  const char* base;
  int64_t stride_page;  // elements
  int64_t stride_slot;
  int64_t stride_head;
};

}  // namespace attn_backend
