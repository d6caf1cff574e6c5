// MLA (multi-head latent attention: DeepSeek-V2/V3, Kimi-K2 class models) in its absorbed
// form, on tensor cores (mma.sync, sm80+): every query head attends over one latent row per
// token, 576 values (512 latent + 64 rope) read as K, and V is the row's first 512 values,
// read from the same shared-memory tile (one load per key serves both products).
//
// Work items are the prefill planner's (prefill.cuh): packed rows token * H + head of one
// request (one kv head, a group of all H heads), a kv range, split-KV chunks merged in the
// same launch (split_kv_merge.cuh). So decode (one token), speculative verify (several, with
// causal placement or a tree mask) and draft extends are one kernel.
//
// A 512-wide output does not fit one warp's registers (16 rows x 512 floats is 256 per
// thread), so the CTA's 8 warps split each tile's work differently for the products (here for
// tiles of 64 keys; a tile of 32 keys gives each 16-key group a quarter of the dims):
// - S = Q K^T: warp w computes keys [16 (w % 4), +16) over half of the 576 dims (w / 4) and
//   stores its partial sums in shared memory;
// - the softmax runs over the whole tile, kThreads / kRows threads per row: it adds the
//   parts, applies the logits transform and the mask, keeps each row's running max and sum
//   in shared memory, and leaves the tile's probabilities there;
// - O += P V: warp w owns output dims [64 w, 64 w + 64) of every row, over all the keys.
// Three barriers per tile: the ring's, after the partial sums, after the probabilities.
//
// FP8 latent caches (float8_e4m3fn / e5m2, one scale for the whole row): MmaSync converts the
// K and V fragments in registers and runs the products in float16 (the query tile is turned
// into float16 once, mma_policy.cuh says how); the K scale is folded into the logit scale and
// the V scale, which the callers set to the K scale (one row), into the epilogue. FP8 rows are
// half the bytes: the 16-row shape runs two CTAs per SM (two stages each, at most 128
// registers a thread), so one CTA's loads, products and softmax overlap the other's phases,
// which a CTA alone runs in turn; wider shapes keep one CTA with twice the stages (the same
// bytes in flight).
//
// Composed of: work_item (the plan), paged_kv_loader (the ring, V inside K), mma_policy
// (MmaSync fragments and products), variant (logits transform, prefill visibility),
// epilogue and split_kv_merge.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attn_backend/common/epilogue.cuh"
#include "attn_backend/common/fp8_convert.cuh"
#include "attn_backend/common/math.cuh"
#include "attn_backend/common/mma_policy.cuh"
#include "attn_backend/common/paged_kv_loader.cuh"
#include "attn_backend/common/params.cuh"
#include "attn_backend/common/ptx.cuh"
#include "attn_backend/common/query_rows.cuh"
#include "attn_backend/common/smem_layout.cuh"
#include "attn_backend/common/split_kv_merge.cuh"
#include "attn_backend/common/variant.cuh"

namespace attn_backend {

// DeepSeek's latent row: kv_lora_rank 512 and rope 64.
constexpr int kMlaHeadDimQK = 576;
constexpr int kMlaHeadDimVO = 512;

// The CTA shape: 16-row m-tiles (kMTiles of them: up to 32 packed rows), the ring depth and
// the keys per tile (64, or 32: half the ring for the same depth); 8 warps always (the warp
// split above is built on them). kCtasPerSm_: CTAs an SM runs at once (0: as the cache type
// decides, see MlaTraits; 2 asks for at most 128 registers a thread). kLoadsPerTile_ = 2: the
// ring's stages are half tiles (kStages of them, e.g. 5: three halves load while a tile
// computes; PagedKVLoader's steps). kSChains_ = 2 (with the query in registers): S's steps
// accumulate in two chains of MMAs, not one.
template <int kMTiles_, int kStages_, int kKVTile_ = 64, int kCtasPerSm_ = 0,
          bool kQueryInRegisters_ = false, int kLoadsPerTile_ = 1, int kSChains_ = 1>
struct MlaShape {
  static constexpr int kLoadsPerTile = kLoadsPerTile_;
  static constexpr int kSChains = kSChains_;
  static constexpr int kCtasPerSmAsked = kCtasPerSm_;
  static constexpr bool kQueryInRegisters = kQueryInRegisters_;
  static constexpr int kHeadDimQK = kMlaHeadDimQK;
  static constexpr int kHeadDimVO = kMlaHeadDimVO;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kRows = 16 * kMTiles;
  static constexpr int kKVTile = kKVTile_;
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
};

template <typename Shape, typename DTypeQ_, typename DTypeKV_, typename DTypeO_>
struct MlaTraits : Shape {
  using DTypeQ = DTypeQ_;
  using DTypeKV = DTypeKV_;
  using DTypeO = DTypeO_;
  static_assert(sizeof(DTypeQ) == 2 && (std::is_same_v<DTypeQ, DTypeKV> || is_fp8<DTypeKV>()),
                "MLA: a 16-bit query over a latent cache of its type or FP8");
  static constexpr bool kFp8 = is_fp8<DTypeKV>();
  static constexpr int kCtasPerSm =
      Shape::kCtasPerSmAsked > 0 ? Shape::kCtasPerSmAsked : (kFp8 && Shape::kRows == 16 ? 2 : 1);
  // FP8 caches keep whole tiles: the shape's ring of whole tiles (2 deep where it is one of
  // half tiles), doubled where one CTA has the SM; the half-tile ring and the two S chains
  // are options of 16-bit caches, so one configuration serves both.
  static constexpr int kLoadsPerTile = kFp8 ? 1 : Shape::kLoadsPerTile;
  static constexpr int kWholeTileStages = Shape::kLoadsPerTile == 1 ? Shape::kStages : 2;
  static constexpr int kStages =
      kFp8 ? (kCtasPerSm == 1 ? 2 * kWholeTileStages : kWholeTileStages) : Shape::kStages;
  // Where one CTA holds the SM (up to 255 registers a thread): two CTAs need the registers.
  static constexpr bool kQueryInRegisters = Shape::kQueryInRegisters && kCtasPerSm == 1;
  static constexpr int kSChains = kQueryInRegisters ? Shape::kSChains : 1;
  static constexpr int kChunksQ = chunks_per_row<DTypeQ, Shape::kHeadDimQK>();  // 72
  static constexpr int kChunksK = chunks_per_row<DTypeKV, Shape::kHeadDimQK>();  // 72, FP8 36
  using LayoutQ = XorSwizzledRows<kChunksQ>;
  using LayoutK = XorSwizzledRows<kChunksK>;
  // The ring's tiles: kLoadsPerTile of them per tile of kKVTile keys.
  static constexpr int kLoadTokens = Shape::kKVTile / kLoadsPerTile;
  static_assert(kLoadTokens % 16 == 0 && kLoadTokens * kLoadsPerTile == Shape::kKVTile,
                "ring tiles of whole 16-key steps that make up a tile");
  static_assert(kSChains == 1 || kSChains == 2, "S in one chain of MMAs or two");
  using Loader = PagedKVLoader<DTypeKV, kLoadTokens, kStages, Shape::kThreads, LayoutK, LayoutK,
                               /*kValueInKey=*/true, kLoadsPerTile>;
  using Mma = MmaSync<DTypeQ, DTypeKV>;
  static constexpr int kKeyGroups = Shape::kKVTile / 16;  // S: 16-key groups of a tile
  static constexpr int kDimParts = Shape::kWarps / kKeyGroups;  // S: the dims' shares
  static constexpr int kStepsPerPart = Shape::kHeadDimQK / 16 / kDimParts;
  static constexpr int kColsPerWarp = Shape::kHeadDimVO / Shape::kWarps;  // P V's dims
  static constexpr int kThreadsPerRow = Shape::kThreads / Shape::kRows;  // the softmax's
  static constexpr int kKeysPerThread = Shape::kKVTile / kThreadsPerRow;
  // Floats per score row: the 8 rows a quad pattern touches start 8 banks apart, so the
  // warps' float2 stores and loads of a 16-row tile hit each bank pair once per half-warp.
  static constexpr int kScorePitch = Shape::kKVTile + 8;
  static constexpr int kQBytes = Shape::kRows * kChunksQ * 16;
  static constexpr int kQOffset = Loader::kRingBytes;
  static constexpr int kScoreOffset = kQOffset + kQBytes;
  static constexpr int kScoreBytes = kDimParts * Shape::kRows * kScorePitch * 4;
  static constexpr int kRowStateOffset = kScoreOffset + kScoreBytes;
  static constexpr int kRowStateBytes = 3 * Shape::kRows * 4;  // max, sum, this tile's rescale
  static constexpr int kRowAddressOffset = kRowStateOffset + kRowStateBytes;
  static constexpr int kSmemBytes = kRowAddressOffset + Loader::kRowAddressBytes;
  static_assert(kKeyGroups * kDimParts == Shape::kWarps && (kDimParts == 2 || kDimParts == 4) &&
                    (Shape::kHeadDimQK / 16) % kDimParts == 0,
                "S: every warp one 16-key group over a half or a quarter of the dims");
  static_assert(kColsPerWarp == 64, "P V: 8 column tiles of 8 dims per warp");
  static_assert(kThreadsPerRow <= 32 && 32 % kThreadsPerRow == 0 && kKeysPerThread >= 1,
                "softmax: a row's threads within one warp");
  static_assert(Loader::kRingBytes >= 2 * Shape::kRows * 4, "ring too small for the merge scalars");
  static_assert(kCtasPerSm * (kSmemBytes + 1024) <= 228 * 1024, "shared memory of an SM");
};

template <typename Traits, typename Logits, bool kCustomMask>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kCtasPerSm)
    paged_mla_kernel(const __grid_constant__ AttentionParams p) {
  using DTypeKV = typename Traits::DTypeKV;
  using Mma = typename Traits::Mma;
  constexpr int kKV = Traits::kKVTile;
  constexpr int kM = Traits::kMTiles;
  constexpr int kRows = Traits::kRows;
  constexpr int kPitch = Traits::kScorePitch;

  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* const q_smem = smem + Traits::kQOffset;
  float* const scores = reinterpret_cast<float*>(smem + Traits::kScoreOffset);  // [part][row][key]
  float* const row_max = reinterpret_cast<float*>(smem + Traits::kRowStateOffset);  // log2 domain
  float* const row_sum = row_max + kRows;
  float* const row_rescale = row_sum + kRows;

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

  load_query_rows<typename Traits::DTypeQ, typename Traits::LayoutQ, kRows, Traits::kThreads>(
      p, rows, num_rows, q_smem);
  for (int row = tid; row < kRows; row += Traits::kThreads) {
    row_max[row] = kNegInf;
    row_sum[row] = 0.f;
  }
  const typename Traits::Loader loader(p, smem, smem + Traits::kRowAddressOffset, cta.kv_head,
                                       item.request, item.kv_start, item.kv_end);
  auto pending = loader.start();  // its barrier also publishes the row state
  ptx::cp_async_wait<Traits::kStages - Traits::kLoadsPerTile>();  // the query rows
  __syncthreads();
  if constexpr (Mma::kConvertsQuery) {
    fp8::convert_query_tile<typename Traits::DTypeQ, Traits::kQBytes, Traits::kThreads>(
        q_smem, p.sm_scale);
    __syncthreads();
  }

  const PrefillVisibility<kCustomMask> visibility(p, item.request, item.kv_end, q_len, kv_len,
                                                  item.row_start, num_rows);
  const Logits logits(p, Mma::qk_scale(p.sm_scale, p.scales.key(cta.kv_head)));
  // S: this warp's 16 keys and its part of the dims.
  const int key0 = 16 * (warp % Traits::kKeyGroups);
  const int dim_part = warp / Traits::kKeyGroups;
  float* const my_partial = scores + dim_part * kRows * kPitch;
  // Softmax: this thread's row and keys.
  const int soft_row = tid / Traits::kThreadsPerRow;
  const int soft_key0 = (tid % Traits::kThreadsPerRow) * Traits::kKeysPerThread;
  const int soft_token = (item.row_start + soft_row) / group;
  // P V: this warp's output dims, a column block of V rows of 128 bytes (FP8: 64) from byte
  // col0 * sizeof(DTypeKV) on: the XOR swizzle keeps each aligned 8-chunk block (FP8 rows:
  // 4-chunk group) in place, so the block's tile is the tile from that chunk on.
  const int col0 = warp * Traits::kColsPerWarp;
  // kQueryInRegisters: this warp's A fragments of S, read from shared memory once, not per tile.
  uint32_t query[Traits::kQueryInRegisters ? Traits::kStepsPerPart : 1][kM][4];
  if constexpr (Traits::kQueryInRegisters) {
#pragma unroll
    for (int step = 0; step < Traits::kStepsPerPart; ++step) {
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        Mma::template load_a<typename Traits::LayoutQ>(
            query[step][mt], q_smem, mt * 16, dim_part * Traits::kStepsPerPart + step, lane);
      }
    }
  }
  float o[kM][Traits::kColsPerWarp / 8][4];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int n = 0; n < Traits::kColsPerWarp / 8; ++n) {
      o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    }
  }

  constexpr bool kWholeTiles = Traits::kLoadsPerTile == 1;  // the ring's tiles are the kernel's
  const int num_tiles = loader.num_tiles / Traits::kLoadsPerTile;
  for (int tile = 0; tile < num_tiles; ++tile) {
    loader.template advance<false>(tile, pending);  // every warp is done with the last tile
    // This warp's keys of S: in the ring tile (a half with kLoadsPerTile 2) that holds them.
    const uint8_t* const k_tile =
        loader.k_tile(kWholeTiles ? tile % Traits::kStages
                                  : Traits::Loader::stage_of(tile, key0 / Traits::kLoadTokens));
    const int k_row0 = kWholeTiles ? key0 : key0 % Traits::kLoadTokens;
    {
      // S accumulates in kSChains chains of MMAs (step i into chain i % kSChains), added into
      // the first at the end.
      float chains[Traits::kSChains][kM][2][4];
#pragma unroll
      for (int c = 0; c < Traits::kSChains; ++c) {
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            chains[c][mt][n][0] = chains[c][mt][n][1] = chains[c][mt][n][2] =
                chains[c][mt][n][3] = 0.f;
          }
        }
      }
      float (&s)[kM][2][4] = chains[0];
      if constexpr (Traits::kQueryInRegisters) {
#pragma unroll
        for (int step = 0; step < Traits::kStepsPerPart; ++step) {
          const int kk = dim_part * Traits::kStepsPerPart + step;
          Mma::template qk_step<typename Traits::LayoutK, kM, 1>(
              chains[step % Traits::kSChains], query[step], k_tile, k_row0, kk, lane);
        }
#pragma unroll
        for (int c = 1; c < Traits::kSChains; ++c) {
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
            for (int n = 0; n < 2; ++n) {
#pragma unroll
              for (int e = 0; e < 4; ++e) s[mt][n][e] += chains[c][mt][n][e];
            }
          }
        }
      } else {
        // Two CTAs per SM (at most 128 registers): a few steps in flight, not all 18.
#pragma unroll(Traits::kCtasPerSm == 2 ? 3 : Traits::kStepsPerPart)
        for (int step = 0; step < Traits::kStepsPerPart; ++step) {
          const int kk = dim_part * Traits::kStepsPerPart + step;
          uint32_t a[kM][4];
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
            Mma::template load_a<typename Traits::LayoutQ>(a[mt], q_smem, mt * 16, kk, lane);
          }
          Mma::template qk_step<typename Traits::LayoutK, kM, 1>(s, a, k_tile, k_row0, kk, lane);
        }
      }
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row = mt * 16 + lane / 4 + 8 * half;
            *reinterpret_cast<float2*>(my_partial + row * kPitch + key0 + 8 * n + 2 * (lane % 4)) =
                make_float2(s[mt][n][2 * half], s[mt][n][2 * half + 1]);
          }
        }
      }
    }
    __syncthreads();  // the partial sums of every key group and part

    {
      const int first_key = item.kv_start + tile * kKV;
      const bool masked = visibility.tile_needs_mask(first_key, kKV);
      float* const sums = scores + soft_row * kPitch + soft_key0;  // part 0, then the probabilities
      const float* const second = sums + kRows * kPitch;  // part 1
      float x[Traits::kKeysPerThread];
      float tile_max = kNegInf;
#pragma unroll
      for (int k = 0; k < Traits::kKeysPerThread; ++k) {
        float sum_of_parts = sums[k] + second[k];
#pragma unroll
        for (int part = 2; part < Traits::kDimParts; ++part) {
          sum_of_parts += sums[k + part * kRows * kPitch];
        }
        float value = logits(sum_of_parts);
        if (masked && !visibility.visible(soft_token, first_key + soft_key0 + k)) value = kNegInf;
        x[k] = value;
        tile_max = fmaxf(tile_max, value);
      }
#pragma unroll
      for (int offset = Traits::kThreadsPerRow / 2; offset > 0; offset /= 2) {
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, offset));
      }
      const float old_max = row_max[soft_row];
      const float new_max = fmaxf(old_max, tile_max * logits.exp_scale);
      // With nothing seen yet the max is -inf; subtracting 0 keeps exp2 at 0.
      const float reference = new_max == kNegInf ? 0.f : new_max;
      float sum = 0.f;
#pragma unroll
      for (int k = 0; k < Traits::kKeysPerThread; ++k) {
        const float prob = ptx::fast_exp2(fmaf(x[k], logits.exp_scale, -reference));
        sums[k] = prob;
        sum += prob;
      }
#pragma unroll
      for (int offset = Traits::kThreadsPerRow / 2; offset > 0; offset /= 2) {
        sum += __shfl_xor_sync(0xffffffff, sum, offset);
      }
      __syncwarp();  // every lane of the row has read the old max
      if (tid % Traits::kThreadsPerRow == 0) {
        const float rescale = ptx::fast_exp2(old_max - reference);
        row_rescale[soft_row] = rescale;
        row_sum[soft_row] = row_sum[soft_row] * rescale + sum;
        row_max[soft_row] = new_max;
      }
    }
    __syncthreads();  // the probabilities and the rows' rescales

    {
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float rescale = row_rescale[mt * 16 + lane / 4 + 8 * half];
#pragma unroll
          for (int n = 0; n < Traits::kColsPerWarp / 8; ++n) {
            o[mt][n][2 * half] *= rescale;
            o[mt][n][2 * half + 1] *= rescale;
          }
        }
      }
      // 16 keys at a time: only one step's probabilities live in registers.
      constexpr int kStepsPerLoad = Traits::kLoadTokens / 16;
      const uint8_t* const whole_v_tile =
          loader.v_tile(tile % Traits::kStages) + col0 * sizeof(DTypeKV);
#pragma unroll
      for (int step = 0; step < kKV / 16; ++step) {
        float prob[kM][2][4];
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row = mt * 16 + lane / 4 + 8 * half;
#pragma unroll
            for (int n = 0; n < 2; ++n) {
              const float2 pair = *reinterpret_cast<const float2*>(
                  scores + row * kPitch + 16 * step + 8 * n + 2 * (lane % 4));
              prob[mt][n][2 * half] = pair.x;
              prob[mt][n][2 * half + 1] = pair.y;
            }
          }
        }
        const uint8_t* const v_tile =
            kWholeTiles ? whole_v_tile
                        : loader.v_tile(Traits::Loader::stage_of(tile, step / kStepsPerLoad)) +
                              col0 * sizeof(DTypeKV);
        Mma::template pv<typename Traits::LayoutK, kM, 1>(o, prob, v_tile,
                                                          16 * (step % kStepsPerLoad), lane);
      }
    }
  }
  ptx::cp_async_wait<0>();
  Mma::restore_output_layout(o, lane);

  const TileWriter<typename Traits::DTypeO, Traits::kHeadDimVO, PackedRows> writer{
      p, rows, cta.kv_head, item.partial};
  const OutputScale output{p.scales.value(cta.kv_head)};
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = mt * 16 + lane / 4 + 8 * half;
      if (row >= num_rows) continue;
      const float total = row_sum[row];
      const float scale = total != 0.f ? 1.f / total : 0.f;
      writer.template write_pairs<Traits::kColsPerWarp / 8>(row, col0 + 2 * (lane % 4), [&](int n) {
        return make_float2(output(o[mt][n][2 * half] * scale),
                           output(o[mt][n][2 * half + 1] * scale));
      });
      if (warp == 0 && lane % 4 == 0) {
        writer.write_lse(row, total != 0.f ? (row_max[row] + __log2f(total)) * kLn2 : kNegInf);
      }
    }
  }
  if (!item.writes_partial() || !finish_split_chunk(p, item.merge_group, cta.kv_head)) return;
  // The ring is free: every warp's last reads of it were before finish_split_chunk's barrier.
  float* const merge_scratch = reinterpret_cast<float*>(smem);
  merge_partials(writer, item.merge_group, num_rows, merge_scratch, merge_scratch + kRows);
}

}  // namespace attn_backend
