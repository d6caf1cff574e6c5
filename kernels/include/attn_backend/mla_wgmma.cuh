// MLA's latent kernel (mla.cuh says what it computes) on Hopper's warpgroup MMAs (sm_90a).
//
// One wgmma M is 64 rows, so a CTA takes 64 packed rows (token * H + head of one request):
// 64 heads of a token, or 16 heads of up to four tokens (a decode of 16 heads leaves 48 rows
// idle: at that size the kernel is bound by the latent bytes, not the MMAs). Keys stream in
// tiles of 32 through a 3-deep ring (two tiles in flight while one is computed); Q, the ring
// and the tiles' score exchange take 199 KB, one CTA per SM.
//
// The CTA's two warpgroups split each tile's work so that neither product is repeated:
// - S = Q K^T: warpgroup g takes half of the 576 dims (18 k-steps of m64n32k16) for all 64
//   rows and 32 keys; the halves are swapped through shared memory and added, in the same
//   order of operands (a + b == b + a exactly), so both warpgroups hold the same scores and
//   run the same online softmax: identical maxima, sums and probabilities, no other exchange;
// - O += P V: warpgroup g owns output dims [256 g, 256 g + 256) (128 accumulators a thread:
//   two m64n128k16 per 16 keys), P from registers, V the K tile's first 512 columns.
// Two barriers per tile: the ring's and the exchange's.
//
// Composed of: work_item (the prefill planner's items: decode, verify chains and trees, draft
// extends, split-KV chunks merged in the launch), paged_kv_loader (V inside K, 128-byte
// swizzled tiles), wgmma (the instructions), online_softmax, variant, epilogue, split_kv_merge.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attn_backend/common/epilogue.cuh"
#include "attn_backend/common/online_softmax.cuh"
#include "attn_backend/common/paged_kv_loader.cuh"
#include "attn_backend/common/params.cuh"
#include "attn_backend/common/ptx.cuh"
#include "attn_backend/common/query_rows.cuh"
#include "attn_backend/common/smem_layout.cuh"
#include "attn_backend/common/split_kv_merge.cuh"
#include "attn_backend/common/variant.cuh"
#include "attn_backend/common/wgmma.cuh"
#include "attn_backend/common/work_item.cuh"
#include "attn_backend/mla.cuh"

namespace attn_backend {

template <int kStages_>
struct MlaWgmmaShape {
  static constexpr int kHeadDimQK = kMlaHeadDimQK;
  static constexpr int kHeadDimVO = kMlaHeadDimVO;
  static constexpr int kRows = 64;  // one wgmma M
  static constexpr int kKVTile = 32;
  static constexpr int kStages = kStages_;
  static constexpr int kWarpgroups = 2;
  static constexpr int kThreads = kWarpgroups * 128;
  static constexpr bool kWgmma = true;
};

// The two products of one tile, for a warpgroup (Q, K and V in Swizzled128BBlocks layouts:
// wgmma.cuh says how the descriptors step through them).
template <typename DType, int kRows, int kKVTile>
struct MlaWgmmaProducts {
  static constexpr int kStepBytes = 32;  // 16 columns of 16-bit values
  static constexpr int kStepsPerBlock = 4;  // k-steps in a 128-byte column block
  static constexpr int kOutTiles = kMlaHeadDimVO / 2 / 8;  // a warpgroup's 256 dims

  // S (64 rows x kKVTile keys) = the rows' products over k-steps [kFirstStep, +kSteps);
  // the first step overwrites s.
  template <int kFirstStep, int kSteps>
  __device__ __forceinline__ static void qk_partial(float (&s)[kKVTile / 8][4],
                                                    const uint8_t* q_smem, const uint8_t* k_smem) {
    const uint64_t q_desc = wgmma::descriptor(q_smem, /*leading (unused)=*/16, 1024);
    const uint64_t k_desc = wgmma::descriptor(k_smem, 16, 1024);
    wgmma::fence();
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      constexpr int kBlockQ = kRows * 128;
      constexpr int kBlockK = kKVTile * 128;
      const int kk = kFirstStep + i;
      const int q_bytes = (kk / kStepsPerBlock) * kBlockQ + (kk % kStepsPerBlock) * kStepBytes;
      const int k_bytes = (kk / kStepsPerBlock) * kBlockK + (kk % kStepsPerBlock) * kStepBytes;
      wgmma::Wgmma<kKVTile, DType>::template ss<0>(s, q_desc + (q_bytes >> 4),
                                                   k_desc + (k_bytes >> 4), i > 0);
    }
    wgmma::commit_group();
    wgmma::wait_group<0>();
    wgmma::pin(s);
  }

  // O (this warpgroup's 256 dims) += P V, V's first column block at v_smem: MN-major, 16 keys
  // a k-step, the leading byte offset reaching the next 64 dims. P is packed before the fence
  // (registers an issued wgmma reads must not change after the fence before it).
  __device__ __forceinline__ static void pv(float (&o)[kOutTiles][4],
                                            const float (&s)[kKVTile / 8][4],
                                            const uint8_t* v_smem) {
    uint32_t p_fragments[kKVTile / 16][4];
#pragma unroll
    for (int kt = 0; kt < kKVTile / 16; ++kt) {
      p_fragments[kt][0] = ptx::pack2<DType>(s[2 * kt][0], s[2 * kt][1]);
      p_fragments[kt][1] = ptx::pack2<DType>(s[2 * kt][2], s[2 * kt][3]);
      p_fragments[kt][2] = ptx::pack2<DType>(s[2 * kt + 1][0], s[2 * kt + 1][1]);
      p_fragments[kt][3] = ptx::pack2<DType>(s[2 * kt + 1][2], s[2 * kt + 1][3]);
    }
    constexpr int kBlock = kKVTile * 128;
    const uint64_t v_desc = wgmma::descriptor(v_smem, kBlock, 1024);
    float (&low)[kOutTiles / 2][4] = *reinterpret_cast<float (*)[kOutTiles / 2][4]>(&o[0]);
    float (&high)[kOutTiles / 2][4] =
        *reinterpret_cast<float (*)[kOutTiles / 2][4]>(&o[kOutTiles / 2]);
    wgmma::fence();
#pragma unroll
    for (int kt = 0; kt < kKVTile / 16; ++kt) {
      const int step_bytes = kt * 16 * 128;
      wgmma::Wgmma<128, DType>::template rs<1>(low, p_fragments[kt],
                                               v_desc + (step_bytes >> 4));
      wgmma::Wgmma<128, DType>::template rs<1>(high, p_fragments[kt],
                                               v_desc + ((2 * kBlock + step_bytes) >> 4));
    }
    wgmma::commit_group();
    wgmma::wait_group<0>();
    wgmma::pin(o);
  }
};

template <typename Shape, typename DTypeQ_, typename DTypeKV_, typename DTypeO_>
struct MlaWgmmaTraits : Shape {
  using DTypeQ = DTypeQ_;
  using DTypeKV = DTypeKV_;
  using DTypeO = DTypeO_;
  static_assert(std::is_same_v<DTypeQ, DTypeKV> && sizeof(DTypeQ) == 2,
                "MLA: a 16-bit latent cache of the query's type");
  static constexpr int kChunks = chunks_per_row<DTypeQ, Shape::kHeadDimQK>();  // 72
  using LayoutQ = Swizzled128BBlocks<kChunks, Shape::kRows>;
  using LayoutK = Swizzled128BBlocks<kChunks, Shape::kKVTile>;
  using Loader = PagedKVLoader<DTypeKV, Shape::kKVTile, Shape::kStages, Shape::kThreads,
                               LayoutK, LayoutK, /*kValueInKey=*/true>;
  using Products = MlaWgmmaProducts<DTypeQ, Shape::kRows, Shape::kKVTile>;
  static constexpr int kSteps = Shape::kHeadDimQK / 16;  // 36 k-steps of S
  static constexpr int kStepsPerWarpgroup = kSteps / Shape::kWarpgroups;
  static constexpr int kScoreTiles = Shape::kKVTile / 8;
  static constexpr int kQBytes = Shape::kRows * kChunks * 16;
  static constexpr int kQOffset = Loader::kRingBytes;
  // Each warpgroup's partial scores, as float4 [score tile][thread of the warpgroup].
  static constexpr int kExchangeOffset = kQOffset + kQBytes;
  static constexpr int kExchangeBytes = Shape::kWarpgroups * Shape::kRows * Shape::kKVTile * 4;
  static constexpr int kRowAddressOffset = kExchangeOffset + kExchangeBytes;
  static constexpr int kAlignPad = 1024;  // the kernel aligns the dynamic base itself
  static constexpr int kSmemBytes = kRowAddressOffset + Loader::kRowAddressBytes + kAlignPad;
  static_assert(Shape::kWarpgroups == 2 && kSteps % 2 == 0 &&
                    2 * Products::kOutTiles * 8 == Shape::kHeadDimVO,
                "two warpgroups: halves of S's dims, halves of O's");
  static_assert(Loader::kKTileBytes % 1024 == 0 && kQOffset % 1024 == 0,
                "wgmma operands 1024-byte aligned");
  static_assert(Loader::kRingBytes >= 2 * Shape::kRows * 4, "ring too small for the merge scalars");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA");
};

template <typename Traits, typename Logits, bool kCustomMask>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    paged_mla_wgmma_kernel(const __grid_constant__ AttentionParams p) {
  using Products = typename Traits::Products;
  constexpr int kKV = Traits::kKVTile;
  constexpr int kRows = Traits::kRows;
  constexpr int kScoreTiles = Traits::kScoreTiles;
  constexpr int kOutTiles = Products::kOutTiles;

  extern __shared__ __align__(128) uint8_t smem_base[];
  uint8_t* const smem = smem_base + ((1024 - (ptx::smem_address(smem_base) & 1023)) & 1023);
  uint8_t* const q_smem = smem + Traits::kQOffset;
  float4* const exchange = reinterpret_cast<float4*>(smem + Traits::kExchangeOffset);

  const CtaWork cta = cta_work();
  // The schedule and request info are plan() buffers (decode.cuh says why they may be read
  // before the previous kernel finishes); everything else only after wait_for_prior_grids().
  if (!p.work.holds(cta.item)) return;
  const WorkItem item = p.work[cta.item];
  if (item.request < 0) return;
  const int qo_start = p.requests.qo_start[item.request];
  const int q_len = p.requests.q_len[item.request];
  const int kv_len = p.requests.kv_len[item.request];
  ptx::wait_for_prior_grids();
  ptx::allow_dependent_grids();
  const int group = p.group_size;
  const int num_rows = min(kRows, q_len * group - item.row_start);
  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  const int thread_in_group = tid % 128;
  const int lane = tid % 32;
  // This thread's accumulator rows (both products): row0 and row0 + 8.
  const int row0 = 16 * (thread_in_group / 32) + lane / 4;
  const PackedRows rows{qo_start, item.row_start, group, cta.kv_head * group};

  load_query_rows<typename Traits::DTypeQ, typename Traits::LayoutQ, kRows, Traits::kThreads>(
      p, rows, num_rows, q_smem);
  const typename Traits::Loader loader(p, smem, smem + Traits::kRowAddressOffset, cta.kv_head,
                                       item.request, item.kv_start, item.kv_end);
  auto pending = loader.start();

  const PrefillVisibility<kCustomMask> visibility(p, item.request, item.kv_end, q_len, kv_len,
                                                  item.row_start, num_rows);
  const Logits logits(p, p.sm_scale * p.scales.key(cta.kv_head));
  float o[1][kOutTiles][4];
#pragma unroll
  for (int n = 0; n < kOutTiles; ++n) o[0][n][0] = o[0][n][1] = o[0][n][2] = o[0][n][3] = 0.f;
  OnlineSoftmax<1, kScoreTiles> softmax;

  ptx::cp_async_wait<Traits::kStages - 1>();  // the query rows
  wgmma::fence_generic_to_async_smem();
  __syncthreads();

  float4* const mine = exchange + warpgroup * kScoreTiles * 128 + thread_in_group;
  const float4* const theirs = exchange + (1 - warpgroup) * kScoreTiles * 128 + thread_in_group;
  for (int tile = 0; tile < loader.num_tiles; ++tile) {
    loader.template advance<true>(tile, pending);
    const uint8_t* const k_tile = loader.k_tile(tile % Traits::kStages);
    float s[1][kScoreTiles][4];
    if (warpgroup == 0) {
      Products::template qk_partial<0, Traits::kStepsPerWarpgroup>(s[0], q_smem, k_tile);
    } else {
      Products::template qk_partial<Traits::kStepsPerWarpgroup, Traits::kStepsPerWarpgroup>(
          s[0], q_smem, k_tile);
    }
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
      mine[n * 128] = make_float4(s[0][n][0], s[0][n][1], s[0][n][2], s[0][n][3]);
    }
    // Both halves written; the next tile rewrites them only after the ring's barrier.
    __syncthreads();
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
      const float4 other = theirs[n * 128];
      s[0][n][0] += other.x;
      s[0][n][1] += other.y;
      s[0][n][2] += other.z;
      s[0][n][3] += other.w;
    }
    const int first_key = item.kv_start + tile * kKV;
    transform_scores(s, logits, visibility.tile_needs_mask(first_key, kKV),
                     [&](int, int n, int e) {
                       const int key = first_key + n * 8 + (lane % 4) * 2 + (e % 2);
                       const int token = (item.row_start + row0 + 8 * (e / 2)) / group;
                       return visibility.visible(token, key);
                     });
    softmax.update(s, o, logits.exp_scale);
    Products::pv(o[0], s[0], k_tile + warpgroup * (kOutTiles / 8) * kKV * 128);
  }
  ptx::cp_async_wait<0>();

  const TileWriter<typename Traits::DTypeO, Traits::kHeadDimVO, PackedRows> writer{
      p, rows, cta.kv_head, item.partial};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float total = softmax.total(0, half);
    const int row = row0 + 8 * half;
    if (row >= num_rows) continue;
    const float scale = total != 0.f ? 1.f / total : 0.f;
    writer.template write_pairs<kOutTiles>(
        row, warpgroup * kOutTiles * 8 + 2 * (lane % 4), [&](int n) {
          return make_float2(o[0][n][2 * half] * scale, o[0][n][2 * half + 1] * scale);
        });
    if (warpgroup == 0 && lane % 4 == 0) writer.write_lse(row, softmax.lse(0, half, total));
  }
  if (!item.writes_partial() || !finish_split_chunk(p, item.merge_group, cta.kv_head)) return;
  // The ring is free: every warpgroup's MMAs on it completed before finish_split_chunk's barrier.
  float* const merge_scratch = reinterpret_cast<float*>(smem);
  merge_partials(writer, item.merge_group, num_rows, merge_scratch, merge_scratch + kRows);
}

}  // namespace attn_backend
