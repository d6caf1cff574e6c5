// Writing a work item's tile rows (query_rows.cuh maps them to tokens and heads): the
// output (and LSE) of a tile that saw all its keys, or the float partial state of one chunk
// of a split tile.
#pragma once

#include <cstdint>

#include "attn_backend/common/params.cuh"
#include "attn_backend/common/ptx.cuh"
#include "attn_backend/common/query_rows.cuh"

namespace attn_backend {

// Writes the rows of one work item: the output and LSE when it saw all of its tile's keys,
// else its partial state.
template <typename DTypeO, int kHeadDimVO, typename Rows>
struct TileWriter {
  const AttentionParams& p;
  Rows rows;
  int kv_head;
  int partial;  // -1: the final output

  __device__ __forceinline__ DTypeO* output(int row) const {
    return static_cast<DTypeO*>(p.out) + static_cast<int64_t>(rows.token(row)) * p.out_stride_token +
           rows.head(row) * p.out_stride_head;
  }
  __device__ __forceinline__ int64_t lse_index(int row) const {
    return static_cast<int64_t>(rows.token(row)) * p.num_qo_heads + rows.head(row);
  }
  __device__ __forceinline__ float* partial_row(int row) const {
    return p.split.partial_out + p.split.slot(partial, p.num_kv_heads, kv_head, row) * kHeadDimVO;
  }

  // Pairs of columns col0 + 8 i, col0 + 8 i + 1 (i < kPairs) of `row`: value(i) -> float2.
  template <int kPairs, typename Value>
  __device__ __forceinline__ void write_pairs(int row, int col0, const Value& value) const {
    if (partial < 0) {
      DTypeO* dst = output(row) + col0;
#pragma unroll
      for (int i = 0; i < kPairs; ++i) {
        const float2 v = value(i);
        *reinterpret_cast<uint32_t*>(dst + 8 * i) = ptx::pack2<DTypeO>(v.x, v.y);
      }
    } else {
      float* dst = partial_row(row) + col0;
#pragma unroll
      for (int i = 0; i < kPairs; ++i) *reinterpret_cast<float2*>(dst + 8 * i) = value(i);
    }
  }

  // Columns col .. col + 3 of `row`'s final output (col a multiple of 4), whichever
  // `partial` this writer holds: the split's merge writes the output through its chunk's writer.
  __device__ __forceinline__ void write_output4(int row, int col, float4 value) const {
    DTypeO* dst = output(row) + col;
    *reinterpret_cast<uint32_t*>(dst) = ptx::pack2<DTypeO>(value.x, value.y);
    *reinterpret_cast<uint32_t*>(dst + 2) = ptx::pack2<DTypeO>(value.z, value.w);
  }

  // Columns col .. col + 3 of `row` (col a multiple of 4): the output, or the partial state.
  __device__ __forceinline__ void write4(int row, int col, float4 value) const {
    if (partial < 0) {
      write_output4(row, col, value);
    } else {
      *reinterpret_cast<float4*>(partial_row(row) + col) = value;
    }
  }

  __device__ __forceinline__ void write_lse(int row, float lse) const {
    if (partial < 0) {
      if (p.lse != nullptr) p.lse[lse_index(row)] = lse;
    } else {
      p.split.partial_lse[p.split.slot(partial, p.num_kv_heads, kv_head, row)] = lse;
    }
  }
};

}  // namespace attn_backend
