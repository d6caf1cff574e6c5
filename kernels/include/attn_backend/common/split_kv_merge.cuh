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
// rows [0, num_rows), with lse = log sum_i exp(lse_i). It runs at the tail of the kernel.
// Partials written by other CTAs are read with ld.cg (from L2), never a stale L1 line.
// Where each thread owns few 4-column vectors (decode's head groups), it is latency-bound:
// every thread walks its row's partials once, 8 loads in flight, keeping a running max (an
// online softmax over the partials), so a split of up to 8 chunks costs one L2 round trip
// and no barrier. Where threads own many (MLA's 512-wide rows), the per-vector max is
// throughput lost (on the H200, 4-8% of 1 x 32k MLA decode): each row's max and total are
// computed once by a warp into `row_max` / `row_total` (num_rows floats each of shared
// scratch), then every vector's walk uses them.
template <int kHeadDimVO, typename DTypeO, typename Rows>
__device__ __forceinline__ void merge_partials(const TileWriter<DTypeO, kHeadDimVO, Rows>& writer,
                                               int merge_group, int num_rows, float* row_max,
                                               float* row_total) {
  constexpr int kLoadsInFlight = 8;
  constexpr int kVectorsPerRow = kHeadDimVO / 4;
  constexpr int kOnePassVectorsPerThread = 4;
  const AttentionParams& p = writer.p;
  const SplitKVState& split = p.split;
  const int begin = split.merge_indptr[merge_group];
  const int end = split.merge_indptr[merge_group + 1];
  // Partial i of `row` is slot first_slot(row) + i * partial_stride (SplitKVState::slot).
  const int64_t partial_stride = static_cast<int64_t>(p.num_kv_heads) * split.partial_rows;
  auto first_slot = [&](int row) { return split.slot(0, p.num_kv_heads, writer.kv_head, row); };
  auto write_output = [&](int row, int col, float4 acc, float total) {
    const float scale = total != 0.f ? 1.f / total : 0.f;  // a NaN total is carried
    writer.write_output4(row, col,
                         make_float4(acc.x * scale, acc.y * scale, acc.z * scale, acc.w * scale));
  };
  // Loads partials i0 .. i0 + kLoadsInFlight - 1 of the vector at (row_slot, col); those past
  // `end` repeat partial `begin` (in bounds) and are skipped by the caller.
  auto load_partials = [&](int64_t row_slot, int col, int i0, float (&lse)[kLoadsInFlight],
                           float4 (&value)[kLoadsInFlight]) {
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int64_t index = row_slot + (i0 + u < end ? i0 + u : begin) * partial_stride;
      lse[u] = __ldcg(split.partial_lse + index);
      value[u] = __ldcg(reinterpret_cast<const float4*>(split.partial_out + index * kHeadDimVO + col));
    }
  };
  auto accumulate = [&](const float (&lse)[kLoadsInFlight], const float4 (&value)[kLoadsInFlight],
                        int i0, float reference, float& total, float4& acc) {
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
  };

  // The choice is the same in every thread of the CTA, so the barrier below is safe.
  if (num_rows * kVectorsPerRow <= kOnePassVectorsPerThread * static_cast<int>(blockDim.x)) {
    for (int v = threadIdx.x; v < num_rows * kVectorsPerRow; v += blockDim.x) {
      const int row = v / kVectorsPerRow;
      const int col = (v % kVectorsPerRow) * 4;
      const int64_t row_slot = first_slot(row);
      // total and acc are relative to exp(running_max); -inf until a partial saw a key.
      float running_max = kNegInf;
      float total = 0.f;
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int i0 = begin; i0 < end; i0 += kLoadsInFlight) {
        float lse[kLoadsInFlight];
        float4 value[kLoadsInFlight];
        load_partials(row_slot, col, i0, lse, value);
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
        accumulate(lse, value, i0, reference, total, acc);
        running_max = new_max;
      }
      write_output(row, col, acc, total);
      if (col == 0 && p.lse != nullptr) {
        p.lse[writer.lse_index(row)] = total != 0.f ? running_max + __logf(total) : kNegInf;
      }
    }
    return;
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int num_warps = blockDim.x / 32;
  for (int row = warp; row < num_rows; row += num_warps) {
    const float* lse = split.partial_lse + first_slot(row);
    // A lane's first partial stays in a register for the total, so up to 32 partials
    // cost one L2 round trip here, not two; further ones are read again.
    const float first_lse = begin + lane < end ? __ldcg(lse + (begin + lane) * partial_stride)
                                               : kNegInf;
    float max_lse = first_lse;
    for (int i = begin + lane + 32; i < end; i += 32) {
      max_lse = fmaxf(max_lse, __ldcg(lse + i * partial_stride));
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffff, max_lse, offset));
    }
    const float reference = max_lse == kNegInf ? 0.f : max_lse;
    // A lane without a first partial holds -inf, whose exp2 is 0: no guard needed.
    float total = ptx::fast_exp2((first_lse - reference) * kLog2e);
    for (int i = begin + lane + 32; i < end; i += 32) {
      total += ptx::fast_exp2((__ldcg(lse + i * partial_stride) - reference) * kLog2e);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      total += __shfl_xor_sync(0xffffffff, total, offset);
    }
    if (lane == 0) {
      row_max[row] = reference;
      row_total[row] = total;
      if (p.lse != nullptr) {
        p.lse[writer.lse_index(row)] = total != 0.f ? reference + __logf(total) : kNegInf;
      }
    }
  }
  __syncthreads();
  for (int v = threadIdx.x; v < num_rows * kVectorsPerRow; v += blockDim.x) {
    const int row = v / kVectorsPerRow;
    const int col = (v % kVectorsPerRow) * 4;
    const int64_t row_slot = first_slot(row);
    float unused_total = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int i0 = begin; i0 < end; i0 += kLoadsInFlight) {
      float lse[kLoadsInFlight];
      float4 value[kLoadsInFlight];
      load_partials(row_slot, col, i0, lse, value);
      accumulate(lse, value, i0, row_max[row], unused_total, acc);
    }
    write_output(row, col, acc, row_total[row]);
  }
}

}  // namespace attn_backend
