// Paged-KV batch decode on tensor cores: one query token per request; and the same key-split
// main loop for short prefill requests (speculative verify, draft extend).
//
// A CTA (kWarps warps) runs one work item of the plan: 16 packed query rows of one request
// (decode: heads of one kv head's GQA group, a group above 16 heads being several row tiles;
// short prefill: token * group + head, e.g. 4 draft tokens x 4 heads) over a range of its
// keys. The rows are the 16 rows of an mma.sync m16n8k16 tile, so each K/V key is loaded
// once for all of them. K and V stream through the paged-KV loader's ring of
// kTokensPerWarp * kWarps-key tiles; warp w computes keys [w kTokensPerWarp, (w + 1)
// kTokensPerWarp) of every tile with its own online-softmax state, and the warps' states are
// merged at the end (key_split_merge.cuh). A work item that covers a whole request writes the
// output; one that covers part of a split request writes a float partial state, and the last
// of its chunks to finish merges them into the output (split_kv_merge.cuh), so no second
// launch is needed.
//
// The prefill tiles (prefill.cuh) give every warp its own rows and all of a tile's keys: a
// request with few rows then leaves most of a 64-row tile as padding, each computed for every
// key. Here the warps split the keys instead, so a 16-row request keeps every MMA row busy
// and the kernel stays as memory-bound as decode.
//
// Composed of: work_item (the plan), paged_kv_loader (the ring), mma_policy (MmaSync),
// variant (logits transform, key-range or prefill visibility), online_softmax,
// key_split_merge, epilogue and split_kv_merge.
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
// A CTA's row of the trace: [entry, first tile landed, loop end, exit, SM, merge start].
constexpr int kTraceFields = 6;
struct CtaTrace {
  unsigned long long* row;
  __device__ explicit CtaTrace(unsigned long long* trace)
      : row(trace + ((static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x +
                     blockIdx.x) * kTraceFields) {
    if (threadIdx.x == 0) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      row[0] = global_ns();
      row[4] = sm;
      row[5] = 0;
    }
  }
  __device__ void mark(int i) const {
    if (threadIdx.x == 0) row[i] = global_ns();
  }
  __device__ ~CtaTrace() { mark(3); }  // every return path
};
#endif

// The CTA shape: head dims, ring depth, warps, and each warp's keys of every tile (a
// multiple of 16, the mma K of the P V product: 32 halves the tiles, barriers and softmax
// steps per key, for two more score tiles in registers). An FP8 cache's stages are half the
// bytes, so its ring may be deeper at the same CTAs per SM (kStagesFp8, default the same).
template <int kHeadDimQK_, int kHeadDimVO_, int kStages_, int kWarps_, int kTokensPerWarp_ = 16,
          int kStagesFp8_ = kStages_>
struct DecodeShape {
  static constexpr int kHeadDimQK = kHeadDimQK_;
  static constexpr int kHeadDimVO = kHeadDimVO_;
  static constexpr int kStages = kStages_;
  static constexpr int kStagesFp8 = kStagesFp8_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 16;  // mma M: packed query rows per tile
  static constexpr int kTokensPerWarp = kTokensPerWarp_;
  static constexpr int kKeySteps = kTokensPerWarp / 16;
  static constexpr int kTileTokens = kWarps * kTokensPerWarp;
  static_assert(kTokensPerWarp % 16 == 0, "a warp's keys: whole 16-key MMA steps");
};

template <typename Shape, typename DTypeQ_, typename DTypeKV_, typename DTypeO_>
struct DecodeTraits : Shape {
  using DTypeQ = DTypeQ_;
  using DTypeKV = DTypeKV_;
  using DTypeO = DTypeO_;
  // The ring depth for this cache's element size (hides Shape::kStages in the kernels).
  static constexpr int kStages = sizeof(DTypeKV_) == 1 ? Shape::kStagesFp8 : Shape::kStages;
  using LayoutQ = XorSwizzledRows<chunks_per_row<DTypeQ, Shape::kHeadDimQK>()>;
  using LayoutK = XorSwizzledRows<chunks_per_row<DTypeKV, Shape::kHeadDimQK>()>;
  using LayoutV = XorSwizzledRows<chunks_per_row<DTypeKV, Shape::kHeadDimVO>()>;
  using Loader =
      PagedKVLoader<DTypeKV, Shape::kTileTokens, kStages, Shape::kThreads, LayoutK, LayoutV>;
  using Mma = MmaSync<DTypeQ, DTypeKV>;
  using Merge = KeySplitMerge<Shape::kWarps, Shape::kRows, Shape::kHeadDimVO>;
  static constexpr int kQBytes = Shape::kRows * LayoutQ::kChunks * 16;
  // The query rows land in the ring's last stage, which the prologue leaves empty and the
  // first iteration fills only after the query is in registers: the 4 KB saved is what
  // lets a third CTA onto an SM in some shapes.
  static constexpr int kQOffset = (kStages - 1) * Loader::kStageBytes;
  // After the main loop the ring holds the warps' states for the final merge.
  static constexpr int kRowAddressOffset =
      Loader::kRingBytes > Merge::kBytes ? Loader::kRingBytes : Merge::kBytes;
  static constexpr int kSmemBytes = kRowAddressOffset + Loader::kRowAddressBytes;
  static_assert(kQBytes <= Loader::kStageBytes, "the query must fit one stage");
};

// One work item of key-split attention over `rows` (16 packed query rows of one request and
// kv head, num_rows of them valid) seeing the keys `visibility` allows of [item.kv_start,
// item.kv_end): the main loop, the warps' merge and the output (or the partial state, and the
// split's merge by its last chunk). `mark(i)` marks the trace points (decode's probe build).
template <typename Traits, typename Logits, typename Rows, typename Visibility, typename Mark>
__device__ __forceinline__ void key_split_attention(const AttentionParams& p, uint8_t* smem,
                                                    const CtaWork& cta, const WorkItem& item,
                                                    const Rows& rows, int num_rows,
                                                    const Visibility& visibility,
                                                    const Mark& mark) {
  using DTypeQ = typename Traits::DTypeQ;
  using Mma = typename Traits::Mma;
  constexpr int kRows = Traits::kRows;
  constexpr int kKeySteps = Traits::kKeySteps;
  constexpr int kVONTiles = Traits::kHeadDimVO / 8;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

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
  OnlineSoftmax<1, 2 * kKeySteps> softmax;
  const Logits logits(p, Mma::qk_scale(p.sm_scale, p.scales.key(cta.kv_head)));
  const int warp_key0 = warp * Traits::kTokensPerWarp;

  for (int tile = 0; tile < loader.num_tiles; ++tile) {
    loader.template advance<false>(tile, pending);
    if (tile == 0) mark(1);
    const int stage = tile % Traits::kStages;
    float s[1][2 * kKeySteps][4];
#pragma unroll
    for (int n = 0; n < 2 * kKeySteps; ++n) s[0][n][0] = s[0][n][1] = s[0][n][2] = s[0][n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < Traits::kHeadDimQK / 16; ++kk) {
      Mma::template qk_step<typename Traits::LayoutK, 1, kKeySteps>(
          s, q_frag[kk], loader.k_tile(stage), warp_key0, kk, lane);
    }
    const int first_key = item.kv_start + tile * Traits::kTileTokens;
    const int warp_first_key = first_key + warp_key0;
    transform_scores(s, logits, visibility.tile_needs_mask(first_key, Traits::kTileTokens),
                     [&](int, int n, int e) {
                       return visibility.visible(rows.query_in_request(lane / 4 + 8 * (e / 2)),
                                                 warp_first_key + n * 8 + (lane % 4) * 2 + e % 2);
                     });
    softmax.update(s, o, logits.exp_scale);
    Mma::template pv<typename Traits::LayoutV, 1, kKeySteps>(o, s, loader.v_tile(stage),
                                                             warp_key0, lane);
  }

  mark(2);
  Mma::restore_output_layout(o, lane);
  ptx::cp_async_wait<0>();
  __syncthreads();
  typename Traits::Merge merge(smem);  // the ring is free now
  merge.stash(softmax, o, warp, lane);
  const TileWriter<typename Traits::DTypeO, Traits::kHeadDimVO, Rows> writer{
      p, rows, cta.kv_head, item.partial};
  const OutputScale output{p.scales.value(cta.kv_head)};
  merge.for_each_output(num_rows, [&](int row, int col, float4 value, float lse) {
    writer.write4(row, col, output(value));
    if (col == 0) writer.write_lse(row, lse);
  });
  if (!item.writes_partial() || !finish_split_chunk(p, item.merge_group, cta.kv_head)) return;
  // The ring is free again: the warps' states were read before the barrier above.
  mark(5);
  merge_partials(writer, item.merge_group, num_rows, merge.merge_max, merge.merge_sum);
}

template <typename Traits, typename Logits>
__global__ void __launch_bounds__(Traits::kThreads)
    paged_decode_kernel(const __grid_constant__ AttentionParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
#ifdef ATTN_BACKEND_DECODE_TRACE
  const CtaTrace cta_trace(p.trace);
  const auto mark = [&](int i) { cta_trace.mark(i); };
#else
  const auto mark = [](int) {};
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
  const HeadRows rows{item.request, item.row_start, cta.kv_head * p.group_size};
  const int num_rows = min(Traits::kRows, p.group_size - item.row_start);
  key_split_attention<Traits, Logits>(p, smem, cta, item, rows, num_rows,
                                      KeyRangeVisibility{item.kv_end}, mark);
}

// Short prefill requests (speculative verify, draft extend) on the key-split loop: causal,
// window and custom masks as prefill.cuh's. It serves requests of any length, a 16-row tile
// per CTA; plan_prefill gives it only those of at most 16 packed rows (plan_ops.cpp).
template <typename Traits, typename Logits, bool kCustomMask>
__global__ void __launch_bounds__(Traits::kThreads)
    paged_short_prefill_kernel(const __grid_constant__ AttentionParams p) {
  extern __shared__ __align__(128) uint8_t smem[];
  PackedTileWork work;
  if (!read_packed_tile_work<Traits::kRows>(p, work)) return;
  const PrefillVisibility<kCustomMask> visibility(p, work.item.request, work.item.kv_end,
                                                  work.q_len, work.kv_len, work.item.row_start,
                                                  work.num_rows);
  key_split_attention<Traits, Logits>(p, smem, work.cta, work.item, work.rows, work.num_rows,
                                      visibility, [](int) {});
}

}  // namespace attn_backend
