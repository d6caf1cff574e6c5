// Paged-KV prefill / append on tensor cores: ragged queries of many requests against each
// request's paged KV (its cached prefix plus the new tokens).
//
// Rows: the query heads of one kv head's GQA group are packed with the query tokens, row
// R of a request = (token R / group, head R % group), so every K/V tile loaded for a kv
// head serves its whole group, and a request with a few new tokens (an extend, a
// speculative verify) still fills the MMA rows.
//
// A CTA (kWarps warps) runs one work item of the plan: a (request, tile of kRows packed
// rows, kv range) triple for one kv head. Warp w owns rows [w * 16 * kMTiles, (w + 1) * 16 *
// kMTiles) of the tile and all kKVTile keys of every K/V tile, so its online softmax needs
// no cross-warp merge. K and V stream through the paged-KV loader's ring. Visibility (the
// item's kv range, causal, window, a bit-packed custom mask) is evaluated per element only
// on the K/V tiles that can hide a key from some row of the tile; the others run unmasked.
//
// MMAs (mma_policy.cuh): mma.sync m16n8k16 (sm80+), or with Shape::kWgmma Hopper's
// warpgroup MMAs (sm_90a), which read K, V and Q from 128-byte-swizzled shared memory;
// everything else is shared by the two. FP8 caches: mma.sync converts K/V fragments in
// registers; for wgmma each FP8 K/V tile is turned into a float16 tile in shared memory.
//
// Split-KV: when the tiles alone do not fill the GPU (a short extend on a long prefix), the
// plan cuts a tile's kv range into chunks; each chunk writes a float partial state and the
// last chunk to finish merges them into the output in the same launch (split_kv_merge.cuh).
#pragma once

#include <cstdint>
#include <type_traits>

#include "attn_backend/common/epilogue.cuh"
#include "attn_backend/common/fp8_convert.cuh"
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
#include "attn_backend/common/wgmma.cuh"

namespace attn_backend {

// The CTA shape: head dims, 16-row m-tiles per warp, keys per K/V tile, ring depth, warps,
// and the MMA instruction set.
template <int kHeadDimQK_, int kHeadDimVO_, int kMTiles_, int kKVTile_, int kStages_,
          int kWarps_ = 4, bool kWgmma_ = false>
struct PrefillShape {
  static constexpr int kHeadDimQK = kHeadDimQK_;
  static constexpr int kHeadDimVO = kHeadDimVO_;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kKVTile = kKVTile_;
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = 16 * kMTiles;
  static constexpr int kRows = kWarps * kRowsPerWarp;
  static constexpr bool kWgmma = kWgmma_;
  static_assert(!kWgmma || (kMTiles == 1 && kWarps % 4 == 0),
                "wgmma tiles: one 16-row tile per warp, whole warpgroups");
  static_assert(kKVTile % 16 == 0 && kKVTile <= kThreads, "kv tile: multiple of 16, <= threads");
};

template <typename Shape, typename DTypeQ_, typename DTypeKV_, typename DTypeO_>
struct PrefillTraits : Shape {
  using DTypeQ = DTypeQ_;
  using DTypeKV = DTypeKV_;
  using DTypeO = DTypeO_;
  static constexpr bool kWgmma = Shape::kWgmma;
  // wgmma reads K and V from shared memory in its operand type: FP8 tiles are turned into
  // float16 tiles there, one K/V tile at a time, before the tile's MMAs.
  static constexpr bool kConvertsKV = kWgmma && is_fp8<DTypeKV>();
  using DTypeKVOperand = std::conditional_t<kConvertsKV, __half, DTypeKV>;
  static constexpr int kChunksQ = chunks_per_row<DTypeQ, Shape::kHeadDimQK>();
  static constexpr int kChunksK = chunks_per_row<DTypeKVOperand, Shape::kHeadDimQK>();
  static constexpr int kChunksV = chunks_per_row<DTypeKVOperand, Shape::kHeadDimVO>();
  // Q's rows are the tile's packed query rows; K's and V's the tile's keys.
  template <int kChunks, int kTileRows>
  using Layout = std::conditional_t<kWgmma, Swizzled128BBlocks<kChunks, kTileRows>,
                                    XorSwizzledRows<kChunks>>;
  using LayoutQ = Layout<kChunksQ, Shape::kRows>;
  using LayoutK = Layout<kChunksK, Shape::kKVTile>;  // the tiles the MMAs read
  using LayoutV = Layout<kChunksV, Shape::kKVTile>;
  // The ring's tiles: the MMAs' own, or the FP8 rows the conversion reads.
  using RingLayoutK = std::conditional_t<
      kConvertsKV, XorSwizzledRows<chunks_per_row<DTypeKV, Shape::kHeadDimQK>()>, LayoutK>;
  using RingLayoutV = std::conditional_t<
      kConvertsKV, XorSwizzledRows<chunks_per_row<DTypeKV, Shape::kHeadDimVO>()>, LayoutV>;
  using Loader = PagedKVLoader<DTypeKV, Shape::kKVTile, Shape::kStages, Shape::kThreads,
                               RingLayoutK, RingLayoutV>;
  using Mma = std::conditional_t<
      kWgmma,
      WgmmaMma<std::conditional_t<kConvertsKV, __half, DTypeQ>, Shape::kRows, Shape::kKVTile,
               Shape::kHeadDimQK, Shape::kHeadDimVO, kConvertsKV>,
      MmaSync<DTypeQ, DTypeKV>>;
  static constexpr int kQBytes = Shape::kRows * kChunksQ * 16;
  static constexpr int kConvertedOffset = Loader::kRingBytes;
  static constexpr int kConvertedKBytes = kConvertsKV ? Shape::kKVTile * kChunksK * 16 : 0;
  static constexpr int kConvertedVBytes = kConvertsKV ? Shape::kKVTile * kChunksV * 16 : 0;
  static constexpr int kQOffset = kConvertedOffset + kConvertedKBytes + kConvertedVBytes;
  static constexpr int kRowAddressOffset = kQOffset + kQBytes;
  // wgmma operands start 1024-byte aligned; the kernel aligns the dynamic base itself.
  static constexpr int kAlignPad = kWgmma ? 1024 : 0;
  static constexpr int kSmemBytes = kRowAddressOffset + Loader::kRowAddressBytes + kAlignPad;
  // The merge's per-row scalars reuse the ring after the main loop.
  static_assert(Loader::kRingBytes >= 2 * Shape::kRows * 4, "ring too small for the merge scalars");
  static_assert(!kWgmma || (kConvertedOffset % 1024 == 0 && kQOffset % 1024 == 0 &&
                            kConvertedKBytes % 1024 == 0),
                "wgmma operands 1024-byte aligned");
  static_assert(!kWgmma || std::is_same_v<DTypeQ, DTypeKV> || kConvertsKV,
                "wgmma reads K and V in the query's type or converted from FP8");
};

template <typename Traits, typename Logits, bool kCustomMask>
__global__ void __launch_bounds__(Traits::kThreads)
    paged_prefill_kernel(const __grid_constant__ AttentionParams p) {
  using DTypeQ = typename Traits::DTypeQ;
  using Mma = typename Traits::Mma;
  constexpr int kKV = Traits::kKVTile;
  constexpr int kM = Traits::kMTiles;
  constexpr int kRows = Traits::kRows;
  constexpr int kKVNTiles = kKV / 8;  // 8-key MMA column tiles per K/V tile
  constexpr int kVONTiles = Traits::kHeadDimVO / 8;

  extern __shared__ __align__(128) uint8_t smem_base[];
  uint8_t* const smem =
      Traits::kWgmma ? smem_base + ((1024 - (ptx::smem_address(smem_base) & 1023)) & 1023)
                     : smem_base;
  uint8_t* const q_smem = smem + Traits::kQOffset;

  PackedTileWork work;
  if (!read_packed_tile_work<kRows>(p, work)) return;
  const CtaWork& cta = work.cta;
  const WorkItem& item = work.item;
  const int q_len = work.q_len;
  const int kv_len = work.kv_len;
  const int group = p.group_size;
  const int num_rows = work.num_rows;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const PackedRows& rows = work.rows;

  load_query_rows<DTypeQ, typename Traits::LayoutQ, kRows, Traits::kThreads>(p, rows, num_rows,
                                                                            q_smem);

  const typename Traits::Loader loader(p, smem, smem + Traits::kRowAddressOffset, cta.kv_head,
                                       item.request, item.kv_start, item.kv_end);
  auto pending = loader.start();

  // This thread's rows are mma rows lane/4 and lane/4 + 8 of each m-tile; their bounds
  // are derived where a tile needs masking (registers are scarce in the main loop).
  const int warp_row0 = warp * Traits::kRowsPerWarp;
  const PrefillVisibility<kCustomMask> visibility(p, item.request, item.kv_end, q_len, kv_len,
                                                  item.row_start, num_rows);
  float o[kM][kVONTiles][4];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int n = 0; n < kVONTiles; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
  }
  OnlineSoftmax<kM, kKVNTiles> softmax;
  const Logits logits(p, Mma::qk_scale(p.sm_scale, p.scales.key(cta.kv_head)));

  ptx::cp_async_wait<Traits::kStages - 1>();  // the query tile
  if constexpr (Mma::kConvertsQuery) {
    __syncthreads();
    fp8::convert_query_tile<DTypeQ, Traits::kQBytes, Traits::kThreads>(q_smem, p.sm_scale);
  }
  if constexpr (Traits::kWgmma) wgmma::fence_generic_to_async_smem();
  __syncthreads();

  for (int tile = 0; tile < loader.num_tiles; ++tile) {
    loader.template advance<Traits::kWgmma>(tile, pending);
    const int stage = tile % Traits::kStages;
    const uint8_t* k_tile = loader.k_tile(stage);
    const uint8_t* v_tile = loader.v_tile(stage);
    if constexpr (Traits::kConvertsKV) {
      // After advance()'s barrier every warpgroup is done with the last tile's MMAs, so the
      // float16 tiles may be rewritten.
      uint8_t* const k_half = smem + Traits::kConvertedOffset;
      uint8_t* const v_half = k_half + Traits::kConvertedKBytes;
      fp8::convert_tile_to_half<typename Traits::DTypeKV, typename Traits::RingLayoutK,
                                typename Traits::LayoutK, kKV, Traits::kThreads>(k_tile, k_half);
      fp8::convert_tile_to_half<typename Traits::DTypeKV, typename Traits::RingLayoutV,
                                typename Traits::LayoutV, kKV, Traits::kThreads>(v_tile, v_half);
      wgmma::fence_generic_to_async_smem();
      __syncthreads();
      k_tile = k_half;
      v_tile = v_half;
    }
    float s[kM][kKVNTiles][4];
    if constexpr (Traits::kWgmma) {
      Mma::qk(s[0], q_smem, k_tile, warp / 4);
    } else {
      Mma::template qk<typename Traits::LayoutQ, typename Traits::LayoutK, Traits::kHeadDimQK>(
          s, q_smem, warp_row0, k_tile, lane);
    }
    const int first_key = item.kv_start + tile * kKV;
    transform_scores(s, logits, visibility.tile_needs_mask(first_key, kKV),
                     [&](int mt, int n, int e) {
                       const int key = first_key + n * 8 + (lane % 4) * 2 + (e % 2);
                       const int token =
                           (item.row_start + warp_row0 + mt * 16 + lane / 4 + 8 * (e / 2)) / group;
                       return visibility.visible(token, key);
                     });
    softmax.update(s, o, logits.exp_scale);
    if constexpr (Traits::kWgmma) {
      Mma::pv(o[0], s[0], v_tile);
    } else {
      Mma::template pv<typename Traits::LayoutV, kM, kKV / 16>(o, s, v_tile, 0, lane);
    }
  }
  ptx::cp_async_wait<0>();
  Mma::restore_output_layout(o, lane);

  // Epilogue: each quad holds whole rows, so no cross-warp merge is needed.
  const TileWriter<typename Traits::DTypeO, Traits::kHeadDimVO, PackedRows> writer{
      p, rows, cta.kv_head, item.partial};
  const OutputScale output{p.scales.value(cta.kv_head)};
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float total = softmax.total(mt, half);
      const int row = warp_row0 + mt * 16 + lane / 4 + 8 * half;
      if (row >= num_rows) continue;
      const float scale = total != 0.f ? 1.f / total : 0.f;
      writer.template write_pairs<kVONTiles>(row, (lane % 4) * 2, [&](int n) {
        return make_float2(output(o[mt][n][2 * half] * scale), output(o[mt][n][2 * half + 1] * scale));
      });
      if (lane % 4 == 0) writer.write_lse(row, softmax.lse(mt, half, total));
    }
  }
  if (!item.writes_partial() || !finish_split_chunk(p, item.merge_group, cta.kv_head)) return;
  float* const merge_scratch = reinterpret_cast<float*>(smem);  // the ring is free now
  merge_partials(writer, item.merge_group, num_rows, merge_scratch, merge_scratch + kRows);
}

}  // namespace attn_backend
