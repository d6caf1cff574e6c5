// Paged-KV batch decode on tensor cores: one query token per request.
//
// A CTA (kWarps warps) runs one work item of the plan: 16 packed query rows (heads of one
// kv head's GQA group; a group above 16 heads is several row tiles) of one request over a
// range of its keys. The rows are the 16 rows of an mma.sync m16n8k16 tile, so each K/V
// key is loaded once for all of them. K and V stream through the paged-KV loader's ring of
// 16 * kWarps-key tiles; warp w computes keys [16 w, 16 w + 16) of every tile with its own
// online-softmax state, and the warps' states are merged at the end (key_split_merge.cuh).
// A work item that covers a whole request writes the output; one that covers part of a
// split request writes a float partial state, and the last of its chunks to finish merges
// them into the output (split_kv_merge.cuh), so no second launch is needed.
//
// Composed of: work_item (the plan), paged_kv_loader (the ring), mma_policy (MmaSync),
// variant (logits transform, key-range visibility), online_softmax, key_split_merge,
// epilogue and split_kv_merge.
#pragma once

#include <cstdint>

#include "attn_backend/common/epilogue.cuh"
#include "attn_backend/common/fp8_convert.cuh"
#include "attn_backend/common/key_split_merge.cuh"
#include "attn_backend/common/math.cuh"
#include "attn_backend/common/mma_policy.cuh"
#include "attn_backend/common/online_softmax.cuh"
#include "attn_backend/common/paged_kv_loader.cuh"
#include "attn_backend/common/params.cuh"
#include "attn_backend/common/ptx.cuh"
#include "attn_backend/common/query_rows.cuh"
#include "attn_backend/common/smem_layout.cuh"
#include "attn_backend/common/split_kv_merge.cuh"
#include "attn_backend/common/variant.cuh"

namespace attn_backend {

#ifdef ATTN_BACKEND_DECODE_TRACE
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
struct CtaTrace {
  unsigned long long* row;
  __device__ explicit CtaTrace(unsigned long long* trace)
      : row(trace + ((static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x +
                     blockIdx.x) * 5) {
    if (threadIdx.x == 0) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      row[0] = global_ns();
      row[4] = sm;
    }
  }
  __device__ void mark(int i) const {
    if (threadIdx.x == 0) row[i] = global_ns();
  }
  __device__ ~CtaTrace() { mark(3); }  // every return path
};
#define ATTN_BACKEND_TRACE_MARK(i) cta_trace.mark(i)
#else
#define ATTN_BACKEND_TRACE_MARK(i)
#endif

// The CTA shape: head dims, ring depth and warps (each warp 16 keys of every tile).
template <int kHeadDimQK_, int kHeadDimVO_, int kStages_, int kWarps_>
struct DecodeShape {
  static constexpr int kHeadDimQK = kHeadDimQK_;
  static constexpr int kHeadDimVO = kHeadDimVO_;
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 16;           // mma M: packed query rows (heads) per tile
  static constexpr int kTokensPerWarp = 16;  // mma K of the P V product
  static constexpr int kTileTokens = kWarps * kTokensPerWarp;
};

template <typename Shape, typename DTypeQ_, typename DTypeKV_, typename DTypeO_>
struct DecodeTraits : Shape {
  using DTypeQ = DTypeQ_;
  using DTypeKV = DTypeKV_;
  using DTypeO = DTypeO_;
  using LayoutQ = XorSwizzledRows<chunks_per_row<DTypeQ, Shape::kHeadDimQK>()>;
  using LayoutK = XorSwizzledRows<chunks_per_row<DTypeKV, Shape::kHeadDimQK>()>;
  using LayoutV = XorSwizzledRows<chunks_per_row<DTypeKV, Shape::kHeadDimVO>()>;
  using Loader =
      PagedKVLoader<DTypeKV, Shape::kTileTokens, Shape::kStages, Shape::kThreads, LayoutK, LayoutV>;
  using Mma = MmaSync<DTypeQ, DTypeKV>;
  using Merge = KeySplitMerge<Shape::kWarps, Shape::kRows, Shape::kHeadDimVO>;
  static constexpr int kQBytes = Shape::kRows * LayoutQ::kChunks * 16;
  // The query rows land in the ring's last stage, which the prologue leaves empty and the
  // first iteration fills only after the query is in registers: the 4 KB saved is what
  // lets a third CTA onto an SM in some shapes.
  static constexpr int kQOffset = (Shape::kStages - 1) * Loader::kStageBytes;
  // After the main loop the ring holds the warps' states for the final merge.
  static constexpr int kRowAddressOffset =
      Loader::kRingBytes > Merge::kBytes ? Loader::kRingBytes : Merge::kBytes;
  static constexpr int kSmemBytes = kRowAddressOffset + Loader::kRowAddressBytes;
  static_assert(kQBytes <= Loader::kStageBytes, "the query must fit one stage");
};

template <typename Traits, typename Logits>
__global__ void __launch_bounds__(Traits::kThreads)
    paged_decode_kernel(const __grid_constant__ AttentionParams p) {
  using DTypeQ = typename Traits::DTypeQ;
  using Mma = typename Traits::Mma;
  constexpr int kRows = Traits::kRows;
  constexpr int kVONTiles = Traits::kHeadDimVO / 8;

  extern __shared__ __align__(128) uint8_t smem[];
#ifdef ATTN_BACKEND_DECODE_TRACE
  const CtaTrace cta_trace(p.trace);
#endif
  const CtaWork cta = cta_work();
  // The schedule may be read before the previous kernel has finished: plan() writes it
  // with a host-to-device copy, and a kernel after a copy in the stream starts only once
  // the copy is done. Everything else (query, caches, page table, the merge state) may
  // come from the kernel just before this one.
  if (!p.work.holds(cta.item)) return;
  const WorkItem item = p.work[cta.item];
  if (item.request < 0) return;
  ptx::wait_for_prior_grids();
  // Triggered at the start, the next kernel launches once our last CTA has started, and
  // its CTAs take the SM slots that ours free in the tail (its prologue hides there).
  ptx::allow_dependent_grids();
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const HeadRows rows{item.request, item.row_start, cta.kv_head * p.group_size};
  const int num_rows = min(kRows, p.group_size - item.row_start);

  uint8_t* const q_smem = smem + Traits::kQOffset;
  load_query_rows<DTypeQ, typename Traits::LayoutQ, kRows, Traits::kThreads>(p, rows, num_rows,
                                                                            q_smem);

  const typename Traits::Loader loader(p, smem, smem + Traits::kRowAddressOffset, cta.kv_head,
                                       item.request, item.kv_start, item.kv_end);
  auto pending = loader.start();
  ptx::cp_async_wait<Traits::kStages - 1>();  // the query rows
  __syncthreads();
  if constexpr (Mma::kConvertsQuery) {
    fp8::convert_query_tile<DTypeQ, Traits::kQBytes, Traits::kThreads>(q_smem, p.sm_scale);
    __syncthreads();
  }
  uint32_t q_frag[Traits::kHeadDimQK / 16][1][4];
#pragma unroll
  for (int kk = 0; kk < Traits::kHeadDimQK / 16; ++kk) {
    Mma::template load_a<typename Traits::LayoutQ>(q_frag[kk][0], q_smem, 0, kk, lane);
  }

  float o[1][kVONTiles][4];
#pragma unroll
  for (int n = 0; n < kVONTiles; ++n) o[0][n][0] = o[0][n][1] = o[0][n][2] = o[0][n][3] = 0.f;
  OnlineSoftmax<1, 2> softmax;
  const Logits logits(p, Mma::qk_scale(p.sm_scale, p.scales.key(cta.kv_head)));
  const KeyRangeVisibility visibility{item.kv_end};
  const int warp_key0 = warp * Traits::kTokensPerWarp;

  for (int tile = 0; tile < loader.num_tiles; ++tile) {
    loader.template advance<false>(tile, pending);
    if (tile == 0) ATTN_BACKEND_TRACE_MARK(1);
    const int stage = tile % Traits::kStages;
    float s[1][2][4] = {{{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}}};
#pragma unroll
    for (int kk = 0; kk < Traits::kHeadDimQK / 16; ++kk) {
      Mma::template qk_step<typename Traits::LayoutK, 1, 1>(s, q_frag[kk], loader.k_tile(stage),
                                                            warp_key0, kk, lane);
    }
    const int first_key = item.kv_start + tile * Traits::kTileTokens;
    const int warp_first_key = first_key + warp_key0;
    transform_scores(s, logits, visibility.tile_needs_mask(first_key, Traits::kTileTokens),
                     [&](int, int n, int e) {
                       return visibility.visible(0, warp_first_key + n * 8 + (lane % 4) * 2 + e % 2);
                     });
    softmax.update(s, o, logits.exp_scale);
    Mma::template pv<typename Traits::LayoutV, 1, 1>(o, s, loader.v_tile(stage), warp_key0, lane);
  }

  ATTN_BACKEND_TRACE_MARK(2);
  Mma::restore_output_layout(o, lane);
  ptx::cp_async_wait<0>();
  __syncthreads();
  typename Traits::Merge merge(smem);  // the ring is free now
  merge.stash(softmax, o, warp, lane);
  const TileWriter<typename Traits::DTypeO, Traits::kHeadDimVO, HeadRows> writer{
      p, rows, cta.kv_head, item.partial};
  const OutputScale output{p.scales.value(cta.kv_head)};
  merge.for_each_output(num_rows, [&](int row, int col, float value, float lse) {
    writer.write(row, col, output(value));
    if (col == 0) writer.write_lse(row, lse);
  });
  if (!item.writes_partial() || !finish_split_chunk(p, item.merge_group, cta.kv_head)) return;
  // The ring is free again: the warps' states were read before the barrier above.
  merge_partials(writer, item.merge_group, num_rows, merge.merge_max, merge.merge_sum);
}

}  // namespace attn_backend
