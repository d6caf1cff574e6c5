// MLA's latent kernel (mla.cuh says what it computes) on Hopper's warpgroup MMAs (sm_90a).
//
// One wgmma M is 64 rows, so a CTA takes 64 packed rows (token * H + head of one request):
// 64 heads of a token, or 16 heads of up to four tokens. PagedPrefill takes it for requests
// of more than 16 rows (128 heads, verify); a decode of 16 heads, which would leave 48 rows
// idle, stays on mma.sync's 16-row kernel (mla.cuh), faster there on the H200. Keys stream in
// tiles of 32 through a 3-deep ring; Q, the ring and the tiles' score exchange take 199 KB,
// one CTA per SM.
//
// The CTA's two warpgroups split each tile's work so that neither product is repeated:
// - S = Q K^T: warpgroup g takes half of the 576 dims (18 k-steps of m64n32k16) for all 64
//   rows and 32 keys; the halves are swapped through shared memory and added, in the same
//   order of operands (a + b == b + a exactly), so both warpgroups hold the same scores and
//   run the same online softmax: identical maxima, sums and probabilities, no other exchange;
// - O += P V: warpgroup g owns output dims [256 g, 256 g + 256) (128 accumulators a thread:
//   two m64n128k16 per 16 keys), P from registers, V the K tile's first 512 columns.
// The next tile's S is issued before this tile's P V, so the tensor cores run it while the
// warpgroups wait for it and make its softmax (see the main loop); on the H200 that was 5-10%
// faster than running each tile's products in turn (bench_mla, both in one run).
//
// FP8 latent caches: wgmma reads both operands of S from shared memory in one 16-bit type, so
// the FP8 rows land in a ring of their own and each tile is turned into a float16 tile
// (fp8_convert.cuh) once it has landed, into one of two buffers (the tile whose P V runs and
// the tile whose S does); the query tile is turned into float16 once, times sm_scale's power
// of two, as for mma.sync (mma_policy.cuh). That costs a barrier per tile more.
//
// Measured (bench/results/mla_decode-*): the 64 x 32 x 576 products of S, m64n32k16 with A
// from shared memory, re-read Q for every 32 keys, and the tensor pipes stay near 30% busy at
// 128 heads; FlashMLA's 64-key S and deeper overlap reach about twice the rate.
//
// Composed of: work_item (the prefill planner's items: decode, verify chains and trees, draft
// extends, split-KV chunks merged in the launch), paged_kv_loader (V inside K, 128-byte
// swizzled tiles), wgmma (the instructions), online_softmax, variant, epilogue, split_kv_merge.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attn_backend/common/epilogue.cuh"
#include "attn_backend/common/fp8_convert.cuh"
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
};

// The two products of one tile, for a warpgroup (Q, K and V in Swizzled128BBlocks layouts:
// wgmma.cuh says how the descriptors step through them).
template <typename DType, int kRows, int kKVTile>
struct MlaWgmmaProducts {
  static constexpr int kOutTiles = kMlaHeadDimVO / 2 / 8;  // a warpgroup's 256 dims

  // Issues S (64 rows x kKVTile keys) = the rows' products over k-steps [kFirstStep, +kSteps)
  // as one commit group (the first step overwrites s); the caller waits for it.
  template <int kFirstStep, int kSteps>
  __device__ __forceinline__ static void qk_partial(float (&s)[kKVTile / 8][4],
                                                    const uint8_t* q_smem, const uint8_t* k_smem) {
    wgmma::issue_k_major_products<kKVTile, DType, kRows, kFirstStep, kSteps>(s, q_smem, k_smem);
  }

  // Issues O (this warpgroup's 256 dims) += P V as one commit group, V's first column block at
  // v_smem: MN-major, 16 keys a k-step, the leading byte offset reaching the next 64 dims. P
  // is packed before the fence (registers an issued wgmma reads must not change after the
  // fence before it); the caller waits for the group.
  __device__ __forceinline__ static void pv(float (&o)[kOutTiles][4],
                                            const float (&s)[kKVTile / 8][4],
                                            const uint8_t* v_smem) {
    uint32_t p_fragments[kKVTile / 16][4];
    wgmma::pack_a_fragments<DType, kKVTile>(p_fragments, s);
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
  }
};

template <typename Shape, typename DTypeQ_, typename DTypeKV_, typename DTypeO_>
struct MlaWgmmaTraits : Shape {
  using DTypeQ = DTypeQ_;
  using DTypeKV = DTypeKV_;
  using DTypeO = DTypeO_;
  static_assert(sizeof(DTypeQ) == 2 && (std::is_same_v<DTypeQ, DTypeKV> || is_fp8<DTypeKV>()),
                "MLA: a 16-bit query over a latent cache of its type or FP8");
  static constexpr bool kConvertsKV = is_fp8<DTypeKV>();
  using DTypeOperand = std::conditional_t<kConvertsKV, __half, DTypeQ>;  // the MMAs' type
  static constexpr int kChunks = chunks_per_row<DTypeOperand, Shape::kHeadDimQK>();  // 72
  using LayoutQ = Swizzled128BBlocks<kChunks, Shape::kRows>;
  using LayoutK = Swizzled128BBlocks<kChunks, Shape::kKVTile>;  // the tiles the MMAs read
  // The ring's tiles: the MMAs' own, or the FP8 rows the conversion reads.
  using RingLayout = std::conditional_t<
      kConvertsKV, XorSwizzledRows<chunks_per_row<DTypeKV, Shape::kHeadDimQK>()>, LayoutK>;
  using Loader = PagedKVLoader<DTypeKV, Shape::kKVTile, Shape::kStages, Shape::kThreads,
                               RingLayout, RingLayout, /*kValueInKey=*/true>;
  using Products = MlaWgmmaProducts<DTypeOperand, Shape::kRows, Shape::kKVTile>;
  static constexpr int kSteps = Shape::kHeadDimQK / 16;  // 36 k-steps of S
  static constexpr int kStepsPerWarpgroup = kSteps / Shape::kWarpgroups;
  static constexpr int kScoreTiles = Shape::kKVTile / 8;
  static constexpr int kQBytes = Shape::kRows * kChunks * 16;
  // FP8: two float16 tiles, tile t in buffer t % 2.
  static constexpr int kConvertedOffset = Loader::kRingBytes;
  static constexpr int kConvertedTileBytes = Shape::kKVTile * kChunks * 16;
  static constexpr int kConvertedBytes = kConvertsKV ? 2 * kConvertedTileBytes : 0;
  static constexpr int kQOffset = kConvertedOffset + kConvertedBytes;
  // Each warpgroup's partial scores, as float4 [score tile][thread of the warpgroup].
  static constexpr int kExchangeOffset = kQOffset + kQBytes;
  static constexpr int kExchangeBytes = Shape::kWarpgroups * Shape::kRows * Shape::kKVTile * 4;
  static constexpr int kRowAddressOffset = kExchangeOffset + kExchangeBytes;
  static constexpr int kAlignPad = 1024;  // the kernel aligns the dynamic base itself
  static constexpr int kSmemBytes = kRowAddressOffset + Loader::kRowAddressBytes + kAlignPad;
  static_assert(Shape::kWarpgroups == 2 && kSteps % 2 == 0 &&
                    2 * Products::kOutTiles * 8 == Shape::kHeadDimVO,
                "two warpgroups: halves of S's dims, halves of O's");
  static_assert(Loader::kKTileBytes % 1024 == 0 && kQOffset % 1024 == 0 &&
                    kConvertedTileBytes % 1024 == 0,
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

  PackedTileWork work;
  if (!read_packed_tile_work<kRows>(p, work)) return;
  const CtaWork& cta = work.cta;
  const WorkItem& item = work.item;
  const int q_len = work.q_len;
  const int kv_len = work.kv_len;
  const int group = p.group_size;
  const int num_rows = work.num_rows;
  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  const int thread_in_group = tid % 128;
  const int lane = tid % 32;
  // This thread's accumulator rows (both products): row0 and row0 + 8.
  const int row0 = 16 * (thread_in_group / 32) + lane / 4;
  const PackedRows& rows = work.rows;

  load_query_rows<typename Traits::DTypeQ, typename Traits::LayoutQ, kRows, Traits::kThreads>(
      p, rows, num_rows, q_smem);
  const typename Traits::Loader loader(p, smem, smem + Traits::kRowAddressOffset, cta.kv_head,
                                       item.request, item.kv_start, item.kv_end);
  auto pending = loader.start();

  const PrefillVisibility<kCustomMask> visibility(p, item.request, item.kv_end, q_len, kv_len,
                                                  item.row_start, num_rows);
  const float qk_scale = Traits::kConvertsKV ? fp8::sm_scale_after_query_conversion(p.sm_scale)
                                             : p.sm_scale;
  const Logits logits(p, qk_scale * p.scales.key(cta.kv_head));
  float o[1][kOutTiles][4];
#pragma unroll
  for (int n = 0; n < kOutTiles; ++n) o[0][n][0] = o[0][n][1] = o[0][n][2] = o[0][n][3] = 0.f;
  OnlineSoftmax<1, kScoreTiles> softmax;

  ptx::cp_async_wait<Traits::kStages - 1>();  // the query rows
  if constexpr (Traits::kConvertsKV) {
    __syncthreads();
    fp8::convert_query_tile<typename Traits::DTypeQ, Traits::kQBytes, Traits::kThreads>(
        q_smem, p.sm_scale);
  }
  wgmma::fence_generic_to_async_smem();
  __syncthreads();

  float4* const mine = exchange + warpgroup * kScoreTiles * 128 + thread_in_group;
  const float4* const theirs = exchange + (1 - warpgroup) * kScoreTiles * 128 + thread_in_group;
  // This warpgroup's half of a tile's S, issued as one commit group.
  const auto issue_scores = [&](float (&s)[kScoreTiles][4], const uint8_t* k_tile) {
    if (warpgroup == 0) {
      Products::template qk_partial<0, Traits::kStepsPerWarpgroup>(s, q_smem, k_tile);
    } else {
      Products::template qk_partial<Traits::kStepsPerWarpgroup, Traits::kStepsPerWarpgroup>(
          s, q_smem, k_tile);
    }
  };
  const auto publish_half = [&](const float (&s)[kScoreTiles][4]) {
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
      mine[n * 128] = make_float4(s[n][0], s[n][1], s[n][2], s[n][3]);
    }
  };
  const auto add_other_half = [&](float (&s)[kScoreTiles][4]) {
#pragma unroll
    for (int n = 0; n < kScoreTiles; ++n) {
      const float4 other = theirs[n * 128];
      s[n][0] += other.x;
      s[n][1] += other.y;
      s[n][2] += other.z;
      s[n][3] += other.w;
    }
  };
  // The tile the MMAs read: the ring's stage, or (FP8) the float16 buffer it was turned into.
  uint8_t* const converted = smem + Traits::kConvertedOffset;
  const auto operand_tile = [&](int tile) -> const uint8_t* {
    if constexpr (Traits::kConvertsKV) {
      return converted + (tile % 2) * Traits::kConvertedTileBytes;
    } else {
      return loader.k_tile(tile % Traits::kStages);
    }
  };
  const auto v_tile = [&](int tile) {
    return operand_tile(tile) + warpgroup * (kOutTiles / 8) * kKV * 128;
  };
  // FP8: turns `tile` (landed for every thread) into its float16 buffer, whose last reader
  // (the P V of tile - 2) completed for every warpgroup before the barrier the caller passed,
  // and publishes it to the MMAs.
  const auto convert_tile = [&](int tile) {
    if constexpr (Traits::kConvertsKV) {
      fp8::convert_tile_to_half<typename Traits::DTypeKV, typename Traits::RingLayout,
                                typename Traits::LayoutK, kKV, Traits::kThreads>(
          loader.k_tile(tile % Traits::kStages),
          converted + (tile % 2) * Traits::kConvertedTileBytes);
      wgmma::fence_generic_to_async_smem();
      __syncthreads();
    }
  };

  if (loader.num_tiles > 0) {
    // The next tile's S runs on the tensor cores before this tile's P V, and the next tile's
    // softmax while that P V does; the output's correction waits for the P V to complete.
    // Two barriers per tile: tile + 1 landed (and tile - 1's stage free: its refill with tile
    // + 2 is issued there, so one tile is in flight while two are computed), and the
    // exchange of S's halves.
    const auto masked_scores = [&](float (&s)[1][kScoreTiles][4], int tile) {
      const int first_key = item.kv_start + tile * kKV;
      transform_scores(s, logits, visibility.tile_needs_mask(first_key, kKV),
                       [&](int, int n, int e) {
                         const int key = first_key + n * 8 + (lane % 4) * 2 + (e % 2);
                         const int token = (item.row_start + row0 + 8 * (e / 2)) / group;
                         return visibility.visible(token, key);
                       });
    };
    float correction[1][2];
    loader.template advance<true>(0, pending);  // tile 0 landed, tile 2 requested
    convert_tile(0);
    float s[1][kScoreTiles][4];
    issue_scores(s[0], operand_tile(0));
    wgmma::wait_group<0>();
    wgmma::pin(s[0]);
    publish_half(s[0]);
    __syncthreads();
    add_other_half(s[0]);
    masked_scores(s, 0);
    softmax.probabilities(s, logits.exp_scale, correction);  // o is zero: no correction
    // `probs` holds a tile's probabilities, `next` receives the next tile's S. The two
    // buffers swap roles tile by tile (a copy would let ptxas merge them, and then serialize
    // the MMAs on the registers a running one writes).
    const auto with_next = [&](float (&probs)[1][kScoreTiles][4],
                               float (&next)[1][kScoreTiles][4], int tile) {
      const int refill = tile + 2;  // into the stage of tile - 1 (tile 2 came with tile 0)
      if (tile > 0) loader.store(refill, pending);
      if (tile == 0) {
        ptx::cp_async_wait<1>();  // tile 1 (tile 2 may be in flight)
      } else {
        ptx::cp_async_wait<0>();  // tile + 1, the newest request
      }
      wgmma::fence_generic_to_async_smem();
      // Tile + 1 landed for every thread, every warpgroup's P V on tile - 1 completed (its
      // stage is free), the refill's row addresses are out, and the other warpgroup read
      // this one's last half of S.
      __syncthreads();
      if (tile > 0) {
        if (refill < loader.num_tiles) loader.load(refill);
        ptx::cp_async_commit();
        pending = loader.fetch(refill + 1);
      }
      convert_tile(tile + 1);
      issue_scores(next[0], operand_tile(tile + 1));
      Products::pv(o[0], probs[0], v_tile(tile));
      wgmma::wait_group<1>();  // the next tile's S (committed before this P V)
      wgmma::pin(next[0]);
      publish_half(next[0]);
      __syncthreads();  // both halves published (the next write follows another barrier)
      add_other_half(next[0]);
      masked_scores(next, tile + 1);
      softmax.probabilities(next, logits.exp_scale, correction);
      wgmma::wait_group<0>();
      wgmma::pin(o[0]);
      OnlineSoftmax<1, kScoreTiles>::rescale(o, correction);
    };
    const auto last = [&](float (&probs)[1][kScoreTiles][4], int tile) {
      Products::pv(o[0], probs[0], v_tile(tile));
      wgmma::wait_group<0>();
      wgmma::pin(o[0]);
    };
    // Straight-line MMAs in the steady state (ptxas serializes wgmma where it cannot follow
    // which commit group a wait covers).
    float other[1][kScoreTiles][4];
    int tile = 0;
    for (; tile + 2 < loader.num_tiles; tile += 2) {
      with_next(s, other, tile);
      with_next(other, s, tile + 1);
    }
    if (tile + 1 < loader.num_tiles) {
      with_next(s, other, tile);
      last(other, tile + 1);
    } else {
      last(s, tile);
    }
  }
  ptx::cp_async_wait<0>();

  const TileWriter<typename Traits::DTypeO, Traits::kHeadDimVO, PackedRows> writer{
      p, rows, cta.kv_head, item.partial};
  const OutputScale output{p.scales.value(cta.kv_head)};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float total = softmax.total(0, half);
    const int row = row0 + 8 * half;
    if (row >= num_rows) continue;
    const float scale = total != 0.f ? 1.f / total : 0.f;
    writer.template write_pairs<kOutTiles>(
        row, warpgroup * kOutTiles * 8 + 2 * (lane % 4), [&](int n) {
          return make_float2(output(o[0][n][2 * half] * scale),
                             output(o[0][n][2 * half + 1] * scale));
        });
    if (warpgroup == 0 && lane % 4 == 0) writer.write_lse(row, softmax.lse(0, half, total));
  }
  if (!item.writes_partial() || !finish_split_chunk(p, item.merge_group, cta.kv_head)) return;
  // The ring is free: every warpgroup's MMAs on it completed before finish_split_chunk's barrier.
  float* const merge_scratch = reinterpret_cast<float*>(smem);
  merge_partials(writer, item.merge_group, num_rows, merge_scratch, merge_scratch + kRows);
}

}  // namespace attn_backend
