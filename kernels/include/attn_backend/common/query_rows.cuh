// A work item's tile rows: packed query rows of one request and kv head, row_start + row =
// token * group + head in group, so a request with few query tokens (decode, an extend, a
// speculative verify) still fills the MMA rows with its group's heads. The row maps say
// which token and head a tile row is; the kernels read the query rows through them and
// write the outputs (epilogue.cuh).
#pragma once

#include <cstdint>

#include "attn_backend/common/params.cuh"
#include "attn_backend/common/ptx.cuh"

namespace attn_backend {

// Packed rows of a request with any number of query tokens (prefill).
struct PackedRows {
  int qo_start;  // the request's first query token in q and out
  int row_start;
  int group;
  int first_qo_head;  // kv_head * group

  __device__ __forceinline__ int token(int row) const { return qo_start + query_in_request(row); }
  // The row's query among its request's (visibility counts positions from it).
  __device__ __forceinline__ int query_in_request(int row) const { return (row_start + row) / group; }
  __device__ __forceinline__ int head(int row) const {
    return first_qo_head + (row_start + row) % group;
  }
};

// Packed rows of a request with one query token (decode): row = a head of the group.
struct HeadRows {
  int qo_start;
  int row_start;
  int first_qo_head;

  __device__ __forceinline__ int token(int /*row*/) const { return qo_start; }
  __device__ __forceinline__ int query_in_request(int /*row*/) const { return 0; }
  __device__ __forceinline__ int head(int row) const { return first_qo_head + row_start + row; }
};

// A prefill-family CTA's work: its item, its request's lengths and its tile's packed rows.
struct PackedTileWork {
  CtaWork cta;
  WorkItem item;
  int q_len;
  int kv_len;
  int num_rows;  // valid rows of the tile (of at most kRows)
  PackedRows rows;
};

// Reads this CTA's work (false: none, the CTA returns). The schedule and the request info are
// plan() buffers, written by host-to-device copies, so they are read before the previous
// kernel finishes (decode.cuh says why); the query, caches, page table and custom mask only
// after the wait here.
template <int kRows>
__device__ __forceinline__ bool read_packed_tile_work(const AttentionParams& p,
                                                      PackedTileWork& work) {
  work.cta = cta_work();
  if (!p.work.holds(work.cta.item)) return false;
  work.item = p.work[work.cta.item];
  if (work.item.request < 0) return false;
  const int qo_start = p.requests.qo_start[work.item.request];
  work.q_len = p.requests.q_len[work.item.request];
  work.kv_len = p.requests.kv_len[work.item.request];
  ptx::wait_for_prior_grids();
  ptx::allow_dependent_grids();
  const int group = p.group_size;
  work.num_rows = min(kRows, work.q_len * group - work.item.row_start);
  work.rows = {qo_start, work.item.row_start, group, work.cta.kv_head * group};
  return true;
}

// Copies (cp.async, one commit group) the query rows [0, num_rows) of a tile of kRows rows
// into q_smem in `Layout`; rows past num_rows are zero.
template <typename DTypeQ, typename Layout, int kRows, int kThreads, typename Rows>
__device__ __forceinline__ void load_query_rows(const AttentionParams& p, const Rows& rows,
                                                int num_rows, uint8_t* q_smem) {
  constexpr int kChunks = Layout::kChunks;
  for (int i = threadIdx.x; i < kRows * kChunks; i += kThreads) {
    const int row = i / kChunks;
    const int chunk = i % kChunks;
    const bool valid = row < num_rows;
    const int source_row = valid ? row : 0;
    const uint8_t* src = static_cast<const uint8_t*>(p.q) +
                         (static_cast<int64_t>(rows.token(source_row)) * p.q_stride_token +
                          rows.head(source_row) * p.q_stride_head) *
                             static_cast<int64_t>(sizeof(DTypeQ)) +
                         chunk * 16;
    ptx::cp_async_16(q_smem + Layout::chunk_index(row, chunk) * 16, src, valid);
  }
  ptx::cp_async_commit();
}

}  // namespace attn_backend
