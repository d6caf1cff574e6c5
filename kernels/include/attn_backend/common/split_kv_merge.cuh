// Split-KV in one launch: each chunk of a split tile writes its partial state; the chunk
// that finishes last (per kv head) merges all of them into the output and resets the
// counter, so no second launch is needed and a CUDA graph replays it as captured.
#pragma once

#include <cstdint>

#include "attn_backend/common/epilogue.cuh"
#include "attn_backend/common/math.cuh"
#include "attn_backend/common/params.cuh"
#include "attn_backend/common/ptx.cuh"

namespace attn_backend {

// Counts this CTA's chunk of split tile `merge_group` done; true in the CTA that finished
// last, which then sees every other chunk's partial state. One thread counts, after a
// barrier: the barrier orders the CTA's partial writes before that thread's release, and
// its acquire, with the barrier after it, orders the other chunks' partials before the
// merge's reads (the pattern of CUTLASS's generic barrier and of cooperative groups' grid
// sync), so no thread waits in a fence of its own.
__device__ __forceinline__ bool finish_split_chunk(const AttentionParams& p, int merge_group,
                                                   int kv_head) {
  __shared__ bool merges;
  __syncthreads();
  if (threadIdx.x == 0) {
    const int count = p.split.merge_indptr[merge_group + 1] - p.split.merge_indptr[merge_group];
    int32_t* counter =
        p.split.merge_counters + static_cast<int64_t>(merge_group) * p.num_kv_heads + kv_head;
    merges = ptx::atomic_add_acq_rel_gpu(counter, 1) == count - 1;
    if (merges) *counter = 0;  // ready for the next launch (and graph replay)
  }
  __syncthreads();
  return merges;
}

// out = sum_i exp(lse_i - lse) * out_i over the partials of `merge_group`, for its tile
// rows [0, num_rows), with lse = log sum_i exp(lse_i). It runs at the tail of the kernel,
// where it is latency-bound: each thread owns 4 columns of a row and walks the partials
// once, 8 loads in flight, keeping a running max (an online softmax over the partials), so
// a split of up to 8 chunks costs one L2 round trip and no barrier. Partials written by
// other CTAs are read with ld.cg (from L2), never a stale L1 line.
template <int kHeadDimVO, typename DTypeO, typename Rows>
__device__ __forceinline__ void merge_partials(const TileWriter<DTypeO, kHeadDimVO, Rows>& writer,
                                               int merge_group, int num_rows) {
  constexpr int kLoadsInFlight = 8;
  constexpr int kVectorsPerRow = kHeadDimVO / 4;
  const AttentionParams& p = writer.p;
  const SplitKVState& split = p.split;
  const int begin = split.merge_indptr[merge_group];
  const int end = split.merge_indptr[merge_group + 1];
  // Partial i of `row` is slot first_slot(row) + i * partial_stride (SplitKVState::slot).
  const int64_t partial_stride = static_cast<int64_t>(p.num_kv_heads) * split.partial_rows;
  for (int v = threadIdx.x; v < num_rows * kVectorsPerRow; v += blockDim.x) {
    const int row = v / kVectorsPerRow;
    const int col = (v % kVectorsPerRow) * 4;
    const int64_t row_slot = split.slot(0, p.num_kv_heads, writer.kv_head, row);
    // total and acc are relative to exp(running_max); -inf until a partial saw a key.
    float running_max = kNegInf;
    float total = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int i0 = begin; i0 < end; i0 += kLoadsInFlight) {
      float lse[kLoadsInFlight];
      float4 value[kLoadsInFlight];
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        const int64_t index = row_slot + (i0 + u < end ? i0 + u : begin) * partial_stride;
        lse[u] = __ldcg(split.partial_lse + index);
        value[u] = __ldcg(reinterpret_cast<const float4*>(split.partial_out + index * kHeadDimVO + col));
      }
      float new_max = running_max;
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        if (i0 + u < end) new_max = fmaxf(new_max, lse[u]);
      }
      const float reference = new_max == kNegInf ? 0.f : new_max;
      // exp2(-inf) = 0: nothing accumulated yet is dropped, not turned into a NaN.
      const float rescale = ptx::fast_exp2((running_max - reference) * kLog2e);
      total *= rescale;
      acc.x *= rescale;
      acc.y *= rescale;
      acc.z *= rescale;
      acc.w *= rescale;
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        if (i0 + u < end) {
          const float weight = ptx::fast_exp2((lse[u] - reference) * kLog2e);
          total += weight;
          acc.x += weight * value[u].x;
          acc.y += weight * value[u].y;
          acc.z += weight * value[u].z;
          acc.w += weight * value[u].w;
        }
      }
      running_max = new_max;
    }
    // total == 0: no partial saw a key; a NaN total (from a NaN input) is carried.
    const float scale = total != 0.f ? 1.f / total : 0.f;
    DTypeO* out = writer.output(row) + col;
    *reinterpret_cast<uint32_t*>(out) = ptx::pack2<DTypeO>(acc.x * scale, acc.y * scale);
    *reinterpret_cast<uint32_t*>(out + 2) = ptx::pack2<DTypeO>(acc.z * scale, acc.w * scale);
    if (col == 0 && p.lse != nullptr) {
      p.lse[writer.lse_index(row)] = total != 0.f ? running_max + __logf(total) : kNegInf;
    }
  }
}

}  // namespace attn_backend
