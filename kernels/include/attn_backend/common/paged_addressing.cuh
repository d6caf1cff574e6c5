// Where token t of request r lives in a paged KV cache, for both engines.
//
// The engine's table is read in place (a CUDA graph replay needs no copy), at
// row(r) = row_index[r] (or r itself when there is no row index):
// - vLLM's block table [batch, max_blocks] holds page ids: token t is on page
//   table[row, t / page_size] at offset t % page_size.
// - SGLang's req_to_token [pool_rows, max_context] holds token slots: token t
//   is at slot s = table[row, t], i.e. page s / page_size, offset s % page_size.
//   Reading each token's own slot is exact for any slot layout, including
//   pages whose tokens the allocator did not place in order. With a slot map
//   (SGLang's hybrid sliding-window pools: full-pool slot -> window-pool
//   slot), the slot read is map[table[row, t]].
// Either way one table entry is read per token, so the costs are the same.
#pragma once

#include <cstdint>

namespace attn_backend {

struct TokenLocation {
  int page;  // -1: outside the cache (never dereferenced)
  int slot_in_page;
};

struct PageTableView {
  const int32_t* table;
  int64_t num_rows;        // rows of `table`
  int64_t row_stride;      // elements between rows of `table`
  bool holds_token_slots;  // true: SGLang's per-token slots; false: per-page ids
  const void* row_index;   // per-request row of `table`; null = the request index itself
  bool row_index_is_int64;
  // Token slots only: slot -> slot in the cache read; null = identity. The map
  // should cover every slot the table holds (SGLang's full-to-SWA map covers the
  // whole full pool); debug mode checks this on the host before launch.
  const int64_t* slot_map;
  int64_t slot_map_size;

  // The request's row of `table`, or -1 for a row index outside it. A wrong index, a slot
  // past the map or a page id past the cache reads nothing outside the buffers (debug mode
  // reports them on the host): the keys it would name are skipped.
  __device__ __forceinline__ int64_t row_of(int request) const {
    if (row_index == nullptr) return request;
    const int64_t row = row_index_is_int64 ? static_cast<const int64_t*>(row_index)[request]
                                           : static_cast<const int32_t*>(row_index)[request];
    return row >= 0 && row < num_rows ? row : -1;
  }

  // Page and offset of token `token` of table row `row` (row_of's); ids outside
  // [0, num_pages) give page -1.
  __device__ __forceinline__ TokenLocation locate(int64_t row, int token, int page_size,
                                                  int num_pages) const {
    if (row < 0) return {-1, 0};
    const int32_t* entries = table + row * row_stride;
    int page, slot_in_page;
    if (holds_token_slots) {
      int slot = entries[token];
      if (slot_map != nullptr && slot >= 0) {
        slot = slot < slot_map_size ? static_cast<int>(slot_map[slot]) : -1;
      }
      page = slot / page_size;
      slot_in_page = slot - page * page_size;
      if (slot < 0) page = -1;
    } else {
      const int page_in_sequence = token / page_size;
      page = entries[page_in_sequence];
      slot_in_page = token - page_in_sequence * page_size;
    }
    if (page < 0 || page >= num_pages) return {-1, 0};
    return {page, slot_in_page};
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
