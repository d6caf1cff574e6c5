// The one parameter block of every attention kernel: what it reads (query, paged caches,
// page table, the plan), what it writes (output, LSE, split-KV partial states) and the
// scalars of the variant. Kernel families read the parts they use.
#pragma once

#include <cstdint>

#include "attn_backend/common/paged_addressing.cuh"
#include "attn_backend/common/work_item.cuh"

namespace attn_backend {

// Per request of a prefill batch (plan buffers): its first query row in q and out, its
// number of queries, its kv length. Query i of request r sits at position
// kv_len[r] - q_len[r] + i.
struct RequestInfo {
  const int32_t* qo_start;
  const int32_t* q_len;
  const int32_t* kv_len;
};

// Split-KV: the chunks of a split tile write float partial states (output, lse) and the
// last chunk to finish merges them in the same launch.
struct SplitKVState {
  float* partial_out;  // [partials, num_kv_heads, partial_rows, head_dim_vo]
  float* partial_lse;  // [partials, num_kv_heads, partial_rows]
  int partial_rows;    // tile rows a partial state holds
  const int32_t* merge_indptr;  // [merge groups + 1]: group g's partials [indptr[g], indptr[g+1])
  int32_t* merge_counters;      // [merge groups, num_kv_heads], zeros between launches

  // Index of row `row` of partial state `partial` of kv head `kv_head`.
  __device__ __forceinline__ int64_t slot(int partial, int num_kv_heads, int kv_head,
                                          int row) const {
    return (static_cast<int64_t>(partial) * num_kv_heads + kv_head) * partial_rows + row;
  }
};

// An FP8 cache's scales (stored = value / scale): one per kv head (stride 1) or one for all
// (stride 0), read on the device when a kernel starts, so a CUDA-graph replay reads the
// values the buffers hold then. Null for 16-bit caches (scale 1).
struct KVScales {
  const float* k;
  const float* v;
  int k_stride;
  int v_stride;

  __device__ __forceinline__ float key(int kv_head) const {
    return k != nullptr ? __ldg(k + kv_head * k_stride) : 1.f;
  }
  __device__ __forceinline__ float value(int kv_head) const {
    return v != nullptr ? __ldg(v + kv_head * v_stride) : 1.f;
  }
};

struct AttentionParams {
  const void* q;  // [tokens, num_qo_heads, head_dim_qk]
  int64_t q_stride_token;
  int64_t q_stride_head;
  void* out;  // [tokens, num_qo_heads, head_dim_vo]
  int64_t out_stride_token;
  int64_t out_stride_head;
  float* lse;  // [tokens, num_qo_heads] natural log, or null
  PagedCacheSide k;
  PagedCacheSide v;
  KVScales scales;
  PageTableView pages;
  int page_size;
  int num_pages;
  int num_qo_heads;
  int num_kv_heads;
  int group_size;  // query heads per kv head
  float sm_scale;
  float soft_cap;  // > 0: score = soft_cap * tanh(sm_scale * q.k / soft_cap)
  // Prefill only: the window (>= 0: key j visible from position i only if j >= i - window_left),
  // causality, the requests and a custom mask or null: bit (mask_offset[r] + i * kv_len + j)
  // of mask_bits (little-endian within bytes) says whether query i of request r sees key j.
  int window_left;
  bool causal;
  RequestInfo requests;
  const uint8_t* mask_bits;
  const int64_t* mask_offset;
  WorkList work;
  SplitKVState split;
#ifdef ATTN_BACKEND_DECODE_TRACE
  // Timeline for bench/sweep_decode.py --trace (never in the shipped op): per CTA globaltimer
  // ns at entry, when its first tile has landed, after its last tile, at exit; its SM; and
  // when it started merging a split's partials (0: it did not merge). decode.cuh CtaTrace.
  unsigned long long* trace;
#endif
};

// The grid is (kv heads, items, item blocks): x = the kv head, so all heads of a work item
// start together (their rows of a token are adjacent in memory) and the plan's longest-first
// order is the dispatch order; items past gridDim.y's limit of 65535 go on in z.
struct CtaWork {
  int item;
  int kv_head;
};

__device__ __forceinline__ CtaWork cta_work() {
  return {static_cast<int>(blockIdx.z * gridDim.y + blockIdx.y), static_cast<int>(blockIdx.x)};
}

}  // namespace attn_backend
