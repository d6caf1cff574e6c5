// Merging the online-softmax states of warps that split a tile's keys between them (the
// key-split main loop, decode.cuh: every warp holds all kRows rows, for its own keys of each tile)
// through shared memory, once the main loop is done.
#pragma once

#include <cstdint>

#include "attn_backend/common/math.cuh"
#include "attn_backend/common/online_softmax.cuh"
#include "attn_backend/common/ptx.cuh"

namespace attn_backend {

template <int kWarps, int kRows, int kHeadDimVO>
struct KeySplitMerge {
  static_assert(kRows == 16, "one 16-row m-tile per warp");
  static constexpr int kBytes = kWarps * kRows * (kHeadDimVO + 2) * 4;
  float* const merge_o;    // [warps][rows][head_dim_vo], scaled to the rows' common max
  float* const merge_max;  // [warps][rows]
  float* const merge_sum;  // [warps][rows]

  __device__ __forceinline__ explicit KeySplitMerge(uint8_t* smem)
      : merge_o(reinterpret_cast<float*>(smem)),
        merge_max(merge_o + kWarps * kRows * kHeadDimVO),
        merge_sum(merge_max + kWarps * kRows) {}

  // Every warp's state into shared memory. The caller has waited for its last copies and
  // synchronised: the smem (the ring) is free.
  template <int kN, int kVONTiles>
  __device__ __forceinline__ void stash(const OnlineSoftmax<1, kN>& softmax,
                                        const float (&o)[1][kVONTiles][4], int warp, int lane) {
    float row_sum[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) row_sum[half] = softmax.total(0, half);
    if (lane % 4 == 0) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        merge_max[warp * kRows + lane / 4 + 8 * half] = softmax.row_max[0][half];
        merge_sum[warp * kRows + lane / 4 + 8 * half] = row_sum[half];
      }
    }
    __syncthreads();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = lane / 4 + 8 * half;
      const float reference = row_reference(row);
      const float factor = ptx::fast_exp2(softmax.row_max[0][half] - reference);
      float* dst = merge_o + (warp * kRows + row) * kHeadDimVO + (lane % 4) * 2;
#pragma unroll
      for (int n = 0; n < kVONTiles; ++n) {
        dst[n * 8] = o[0][n][2 * half] * factor;
        dst[n * 8 + 1] = o[0][n][2 * half + 1] * factor;
      }
    }
    __syncthreads();
  }

  // The rows' common max over the warps (0 where no warp saw a key).
  __device__ __forceinline__ float row_reference(int row) const {
    float global_max = kNegInf;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) global_max = fmaxf(global_max, merge_max[w * kRows + row]);
    return global_max == kNegInf ? 0.f : global_max;
  }

  // write(row, col, value, lse) for every 4 columns col .. col + 3 (value: a float4) of rows
  // [0, num_rows), the CTA's threads striding over them (lse: natural log, -inf for a row
  // that saw no key). The total is a sum of exponentials: 0 means no key, and a NaN (from a
  // NaN or Inf input) is carried into the row rather than read as "no key" (hence != 0, not
  // > 0, here and in the other epilogues).
  template <typename Write>
  __device__ __forceinline__ void for_each_output(int num_rows, const Write& write) const {
    constexpr int kVectorsPerRow = kHeadDimVO / 4;
    for (int v = threadIdx.x; v < num_rows * kVectorsPerRow; v += kWarps * 32) {
      const int row = v / kVectorsPerRow;
      const int col = (v % kVectorsPerRow) * 4;
      const float reference = row_reference(row);
      float total = 0.f;
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        total += merge_sum[w * kRows + row] * ptx::fast_exp2(merge_max[w * kRows + row] - reference);
        const float4 part =
            *reinterpret_cast<const float4*>(merge_o + (w * kRows + row) * kHeadDimVO + col);
        acc.x += part.x;
        acc.y += part.y;
        acc.z += part.z;
        acc.w += part.w;
      }
      const float inverse = total != 0.f ? 1.f / total : 0.f;
      const float lse = total != 0.f ? (reference + __log2f(total)) * kLn2 : kNegInf;
      write(row, col, make_float4(acc.x * inverse, acc.y * inverse, acc.z * inverse, acc.w * inverse),
            lse);
    }
  }
};

}  // namespace attn_backend
