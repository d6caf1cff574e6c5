// MLA's latent kernel (mla.cuh says what it computes) on Hopper's warpgroup MMAs with 64-key
// tiles, the two warpgroups taking alternate tiles ("seesaw"; DeepSeek's FlashMLA schedules its
// dense decode this way). 16-bit latent caches; FP8 ones stay on mla_wgmma.cuh.
//
// Why not mla_wgmma.cuh's schedule: there each tile's S = Q K^T is split over the dims between
// the warpgroups, as m64n32k16 products with both operands in shared memory. An m64n32 product
// reads 2 KB of Q and 1 KB of K per k-step for 16 k-steps' worth of tensor work, so the shared
// memory, not the tensor cores, sets its pace (bench/NOTES.md: the tensor pipes near 30% busy at
// 128 heads), and the halves of S pass through shared memory with two barriers a tile. Here:
// - each warpgroup computes the whole S of its own tiles (warpgroup 0 the even ones, 1 the odd
//   ones) as m64n64k16 products: Q read once per 64 keys; Q's last 64 dims (the rope part) sit
//   in registers, which frees that 8 KB block of Q's tile for the odd tiles' probabilities;
// - the output is split by columns, warpgroup g owning dims [256 g, 256 g + 256) (128
//   accumulators a thread), so each warpgroup multiplies both tiles' probabilities with its
//   half of V: its own tile's from registers, the other's from shared memory (8 KB a tile);
// - the rows' running max is shared (shared memory): the even tile's warpgroup folds its tile
//   in first, then the odd one on top, and each rescales what it holds by the steps it missed.
//   Per pair of tiles (a even, b odd), named barriers order the hand-overs:
//     wg0: softmax(a) -> [scale_even] -> O0 += P_a V_a ........ [scale_odd] -> P_a rescaled to
//          the odd max, stored -> [probs_even] -> O0 *= c_odd ... [probs_odd] -> O0 += P_b V_b
//     wg1: [scale_even] -> softmax(b) on a's max, O1 *= c_even c_odd -> [scale_odd] -> P_b
//          stored, O1 += P_b V_b ... [probs_even] -> O1 += P_a V_a -> [probs_odd]
//   and while one warpgroup runs its softmax the other's products keep the tensor cores busy.
// - loads: a tile's 72 chunks per row are copied in two parts, each by the warpgroup that reads
//   them last (chunks 0-31, V's first 256 columns: warpgroup 0; 32-71: warpgroup 1), as soon as
//   that warpgroup is done with the stage; an mbarrier per 64-column block completes when its
//   copies land (cp.async.mbarrier.arrive), so no warpgroup waits at a CTA-wide barrier for the
//   other's loads, and S starts on a part's first block while the rest are in flight (waiting
//   for a whole 32 KB part cost its transfer time, about a microsecond per SM, on every tile).
//   Each warp looks up its 16 rows' pages itself, a tile ahead, and passes the row addresses by
//   shuffles (no address table in shared memory: Q, two 72 KB stages and a probability tile
//   take 221 KB of the 227).
//
// Composed of: work_item (the prefill planner's items: decode, verify chains and trees, draft
// extends, split-KV chunks merged in the launch), wgmma, cta_sync, online_softmax (its steps,
// on the shared max), variant, epilogue, split_kv_merge.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attn_backend/common/cta_sync.cuh"
#include "attn_backend/common/epilogue.cuh"
#include "attn_backend/common/math.cuh"
#include "attn_backend/common/online_softmax.cuh"
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

struct MlaSeesawShape {
  static constexpr int kHeadDimQK = kMlaHeadDimQK;
  static constexpr int kHeadDimVO = kMlaHeadDimVO;
  static constexpr int kRows = 64;     // one wgmma M
  static constexpr int kKVTile = 64;   // keys per tile (one wgmma N of S)
  static constexpr int kStages = 2;    // the even tile's stage and the odd tile's
  static constexpr int kWarpgroups = 2;
  static constexpr int kThreads = kWarpgroups * 128;
};

template <typename Shape, typename DTypeQ_, typename DTypeKV_, typename DTypeO_>
struct MlaSeesawTraits : Shape {
  using DTypeQ = DTypeQ_;
  using DTypeKV = DTypeKV_;
  using DTypeO = DTypeO_;
  static_assert(sizeof(DTypeQ) == 2 && std::is_same_v<DTypeQ, DTypeKV>,
                "the seesaw MLA kernel reads 16-bit latent caches of the query's type (FP8 "
                "caches take prefill_mla_wgmma)");
  static constexpr int kChunks = chunks_per_row<DTypeQ, Shape::kHeadDimQK>();  // 72
  static constexpr int kBlockBytes = Shape::kKVTile * 128;  // one 64-column block of a tile
  using LayoutQ = Swizzled128BBlocks<kChunks, Shape::kRows>;
  using LayoutK = Swizzled128BBlocks<kChunks, Shape::kKVTile>;
  using LayoutP = Swizzled128BBlocks<Shape::kKVTile * 2 / 16, Shape::kRows>;  // 64 x 64 probabilities
  // The part of a row warpgroup 0 copies: V's first 256 columns (its half of P V).
  static constexpr int kLowChunks = Shape::kHeadDimVO / 2 * 2 / 16;  // 32
  // A row's 64-column blocks (8 chunks, 4 k-steps of S each), the unit of copy completion.
  static constexpr int kBlocks = kChunks / 8;        // 9
  static constexpr int kLowBlocks = kLowChunks / 8;  // 4: warpgroup 0's
  static constexpr int kSteps = Shape::kHeadDimQK / 16;               // 36 k-steps of S
  static constexpr int kRopeSteps = (Shape::kHeadDimQK - Shape::kHeadDimVO) / 16;  // 4, from registers
  static constexpr int kTileBytes = Shape::kKVTile * kChunks * 16;  // 72 KB
  static constexpr int kQOffset = Shape::kStages * kTileBytes;
  static constexpr int kQBytes = Shape::kRows * kChunks * 16;
  // The odd tiles' probabilities overwrite Q's rope block once it is in registers.
  static constexpr int kOddProbsOffset = kQOffset + (kSteps - kRopeSteps) / 4 * Shape::kRows * 128;
  static constexpr int kEvenProbsOffset = kQOffset + kQBytes;
  static constexpr int kProbsBytes = Shape::kRows * Shape::kKVTile * 2;
  // Per row: the running max, the even and the odd tile's corrections (at the end: the two
  // warpgroups' sums).
  static constexpr int kScalarsOffset = kEvenProbsOffset + kProbsBytes;
  static constexpr int kBarriersOffset = kScalarsOffset + 3 * Shape::kRows * 4;
  static constexpr int kAlignPad = 1024;  // the kernel aligns the dynamic base itself
  static constexpr int kSmemBytes = kBarriersOffset + kBlocks * Shape::kStages * 8 + kAlignPad;
  static_assert(kSteps - kRopeSteps == kChunks / 8 * 4 - 4 && (kSteps - kRopeSteps) % 4 == 0,
                "the rope dims are Q's last 128-byte block");
  static_assert(kTileBytes % 1024 == 0 && kQOffset % 1024 == 0 && kEvenProbsOffset % 1024 == 0 &&
                    kOddProbsOffset % 1024 == 0,
                "wgmma operands 1024-byte aligned");
  static_assert(kTileBytes >= 2 * Shape::kRows * 4, "ring too small for the merge scalars");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one CTA");
};

// Copies of latent rows for the seesaw kernel: warp w of a warpgroup copies tile rows
// [16 w, 16 w + 16); lane j < 16 holds row 16 w + j's global address (row_address), which
// the warp's lanes take by shuffles.
template <typename DTypeKV, typename Layout, int kTileTokens>
struct LatentRowCopier {
  const AttentionParams& p;
  const char* const k_base;  // this kv head's rows
  const int64_t table_row;
  const int kv_start;
  const int kv_end;
  const int num_tiles;

  __device__ __forceinline__ LatentRowCopier(const AttentionParams& params, int kv_head,
                                             int request, int first_key, int end_key)
      : p(params),
        k_base(params.k.base + kv_head * params.k.stride_head * sizeof(DTypeKV)),
        table_row(params.pages.row_of(request)),
        kv_start(first_key),
        kv_end(end_key),
        num_tiles((end_key - first_key + kTileTokens - 1) / kTileTokens) {}

  // This lane's row of `tile` (lanes 0-15 of warp `warp`), null outside the range or on a page
  // id outside the cache (the row is then zero-filled, never read).
  __device__ __forceinline__ const char* row_address(int tile, int warp, int lane) const {
    const int token = kv_start + tile * kTileTokens + 16 * warp + lane;
    if (lane >= 16 || tile >= num_tiles || token >= kv_end) return nullptr;
    const TokenLocation location = p.pages.locate(table_row, token, p.page_size, p.num_pages);
    if (location.page < 0) return nullptr;
    return k_base + (location.page * p.k.stride_page + location.slot_in_page * p.k.stride_slot) *
                        static_cast<int64_t>(sizeof(DTypeKV));
  }

  // One warp's copies of a 64-column block of its 16 rows: lane l copies chunk l % 8 of rows
  // l / 8 + 4 pass (passes 0-3). Everything that depends on the row only (its address, taken by
  // a shuffle; a null row; the swizzled place) is worked out once a tile: a block moves the
  // source by 128 bytes and the destination by Layout::kBlockBytes.
  static constexpr int kPasses = 16 * 8 / 32;
  struct BlockCopies {
    const char* src[kPasses];  // the lane's chunk of the pass's row in block 0 (k_base: a null row)
    uint32_t dst[kPasses];     // its byte offset in the tile's block 0
    bool valid[kPasses];
  };

  __device__ __forceinline__ BlockCopies block_copies(const char* address, int warp,
                                                      int lane) const {
    BlockCopies copies;
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int row = lane / 8 + 4 * pass;
      const int chunk = lane % 8;
      const char* src = reinterpret_cast<const char*>(
          __shfl_sync(0xffffffff, reinterpret_cast<unsigned long long>(address), row));
      copies.valid[pass] = src != nullptr;
      copies.src[pass] = (copies.valid[pass] ? src : k_base) + chunk * 16;
      copies.dst[pass] = Layout::chunk_index(16 * warp + row, chunk) * 16;
    }
    return copies;
  }

  __device__ __forceinline__ void copy_block(uint8_t* tile_smem, const BlockCopies& copies,
                                             int block) const {
    uint8_t* const block_smem = tile_smem + block * Layout::kBlockBytes;
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      ptx::cp_async_16(block_smem + copies.dst[pass], copies.src[pass] + 128 * block,
                       copies.valid[pass]);
    }
  }
};

// Named barriers of the hand-overs (the kernel's comment draws them).
enum SeesawBarrier : int {
  kScaleEvenReady = 1,  // the even tile's max and correction are in shared memory
  kScaleOddReady = 2,   // the odd tile's
  kEvenProbsReady = 3,  // the even tile's probabilities (on the odd max) are stored
  kOddProbsReady = 4,   // the odd tile's are stored and its warpgroup's P V issued
};

template <typename Traits, typename Logits, bool kCustomMask>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    paged_mla_seesaw_kernel(const __grid_constant__ AttentionParams p) {
  using DType = typename Traits::DTypeQ;
  constexpr int kKV = Traits::kKVTile;
  constexpr int kRows = Traits::kRows;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kScoreTiles = kKV / 8;
  constexpr int kKeySteps = kKV / 16;
  constexpr int kOutTiles = Traits::kHeadDimVO / 2 / 8;  // a warpgroup's 256 columns
  constexpr int kBlock = Traits::kBlockBytes;

  extern __shared__ __align__(128) uint8_t smem_base[];
  uint8_t* const smem = smem_base + ((1024 - (ptx::smem_address(smem_base) & 1023)) & 1023);
  uint8_t* const q_smem = smem + Traits::kQOffset;
  uint8_t* const even_probs = smem + Traits::kEvenProbsOffset;
  uint8_t* const odd_probs = smem + Traits::kOddProbsOffset;
  float* const row_max = reinterpret_cast<float*>(smem + Traits::kScalarsOffset);
  float* const even_correction = row_max + kRows;
  float* const odd_correction = even_correction + kRows;
  // [stage][block]: blocks < kLowBlocks copied by warpgroup 0, the others by warpgroup 1.
  uint64_t* const landed = reinterpret_cast<uint64_t*>(smem + Traits::kBarriersOffset);

  PackedTileWork work;
  if (!read_packed_tile_work<kRows>(p, work)) return;
  const CtaWork& cta = work.cta;
  const WorkItem& item = work.item;
  const int group = p.group_size;
  const int num_rows = work.num_rows;
  const int tid = threadIdx.x;
  const int warpgroup = tid / 128;
  const int thread_in_group = tid % 128;
  const int warp = thread_in_group / 32;  // in the warpgroup
  const int lane = tid % 32;
  const int row0 = 16 * warp + lane / 4;  // this thread's accumulator rows: row0, row0 + 8
  const PackedRows& rows = work.rows;

  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < Traits::kBlocks * Traits::kStages; ++i) sync::mbarrier_init(landed + i, 128);
  }
  if (tid < kRows) row_max[tid] = kNegInf;
  load_query_rows<DType, typename Traits::LayoutQ, kRows, kThreads>(p, rows, num_rows, q_smem);
  __syncthreads();  // the barriers are initialised before any copy can arrive on them

  const LatentRowCopier<DType, typename Traits::LayoutK, kKV> copier(
      p, cta.kv_head, item.request, item.kv_start, item.kv_end);
  const int num_tiles = copier.num_tiles;
  uint8_t* const ring = smem;
  const auto stage_of = [&](int tile) { return ring + (tile % 2) * Traits::kTileBytes; };
  // This warpgroup's part of `tile`, block by block, each block's mbarrier completing when
  // its copies (and this thread's earlier ones) land, so that S can start on the first block
  // while the others are in flight. One commit group, even without a tile, so that the
  // query's group is always the third newest after the prologue.
  const auto copy_blocks = [&](int tile, const char* address, auto first_block, auto end_block) {
    constexpr int kFirstBlock = decltype(first_block)::value;
    constexpr int kEndBlock = decltype(end_block)::value;
    const auto copies = copier.block_copies(address, warp, lane);
#pragma unroll 1
    for (int block = kFirstBlock; block < kEndBlock; ++block) {
      copier.copy_block(stage_of(tile), copies, block);
      sync::arrive_when_copies_land(landed + (tile % 2) * Traits::kBlocks + block);
    }
  };
  const auto copy_part = [&](int tile, const char* address) {
    if (tile < num_tiles) {
      if (warpgroup == 0) {
        copy_blocks(tile, address, std::integral_constant<int, 0>(),
                    std::integral_constant<int, Traits::kLowBlocks>());
      } else {
        copy_blocks(tile, address, std::integral_constant<int, Traits::kLowBlocks>(),
                    std::integral_constant<int, Traits::kBlocks>());
      }
    }
    ptx::cp_async_commit();
  };
  // Before the MMAs read `block` of `tile`: it landed (the stage's (tile / 2)-th use).
  const auto wait_landed = [&](int tile, int block) {
    sync::mbarrier_wait(landed + (tile % 2) * Traits::kBlocks + block, (tile / 2) & 1);
    wgmma::fence_generic_to_async_smem();
  };

  // Row addresses a pair of tiles ahead: next_address[s] is for the next tile of stage s.
  const char* next_address[2];
  copy_part(0, copier.row_address(0, warp, lane));
  copy_part(1, copier.row_address(1, warp, lane));
  next_address[0] = copier.row_address(2, warp, lane);
  next_address[1] = copier.row_address(3, warp, lane);

  ptx::cp_async_wait<2>();  // this thread's query chunks
  __syncthreads();
  // Q's rope dims as the A fragments of S's last k-steps (warp w's rows 16 w .. 16 w + 15).
  uint32_t q_rope[Traits::kRopeSteps][4];
#pragma unroll
  for (int k = 0; k < Traits::kRopeSteps; ++k) {
    const int chunk = 2 * (Traits::kSteps - Traits::kRopeSteps + k) + lane / 16;
    ptx::ldmatrix_x4(q_rope[k],
                     q_smem + Traits::LayoutQ::chunk_index(16 * warp + lane % 16, chunk) * 16);
  }
  __syncthreads();  // every thread holds them before the odd tiles' probabilities replace them

  const PrefillVisibility<kCustomMask> visibility(p, item.request, item.kv_end, work.q_len,
                                                  work.kv_len, item.row_start, num_rows);
  const Logits logits(p, p.sm_scale * p.scales.key(cta.kv_head));
  const float exp_scale = logits.exp_scale;
  // The output half and the tile's scores in OnlineSoftmax's shapes (one m-tile of 16 rows per
  // warp), whose steps run here on the shared max.
  using Softmax = OnlineSoftmax<1, kScoreTiles>;
  float o[1][kOutTiles][4];
#pragma unroll
  for (int n = 0; n < kOutTiles; ++n) o[0][n][0] = o[0][n][1] = o[0][n][2] = o[0][n][3] = 0.f;
  float row_sum[2] = {0.f, 0.f};  // this thread's share of its own tiles' sums, on the shared max
  float s[1][kScoreTiles][4];     // its current tile's scores, then probabilities
  uint32_t probs[kKeySteps][4];   // the same, packed as A fragments

  // S of `tile` = Q K^T, each 64-column block's 4 k-steps as soon as that block has landed, the
  // calling warpgroup's own part (std::integral_constant: 0 or 1) first, copied earlier or just
  // now by itself: part 0 = blocks 0-3, part 1 = the rest, the rope block with Q from registers.
  // Two commit groups; the caller waits for both. (The parts are compile-time: a wgmma on a
  // path that depends on a runtime value makes ptxas serialize every wgmma of the kernel.)
  const auto issue_scores_part = [&](int tile, auto part, bool first) {
    constexpr int kPart = decltype(part)::value;
    constexpr int kFirstBlock = kPart == 0 ? 0 : Traits::kLowBlocks;
    constexpr int kEndBlock = kPart == 0 ? Traits::kLowBlocks : Traits::kBlocks;
    constexpr int kSmemBlocks = (Traits::kSteps - Traits::kRopeSteps) / 4;  // Q's blocks in smem
    const uint64_t a_desc = wgmma::opaque(wgmma::descriptor(q_smem, 16, 1024));
    const uint64_t b_desc = wgmma::opaque(wgmma::descriptor(stage_of(tile), 16, 1024));
#pragma unroll
    for (int block = kFirstBlock; block < kEndBlock; ++block) {
      wait_landed(tile, block);
      // After every wait, not only the first: a fence that ptxas inserts itself after the wait
      // loop (a divergent path) makes it serialize every wgmma of the kernel (C7520).
      wgmma::fence();
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int bytes = block * kRows * 128 + k * 32;  // Q and K tiles: 64 rows a block
        if (block < kSmemBlocks) {
          wgmma::Wgmma<kKV, DType>::template ss<0>(s[0], a_desc + (bytes >> 4),
                                                  b_desc + (bytes >> 4),
                                                  !first || block > kFirstBlock || k > 0);
        } else {
          wgmma::Wgmma<kKV, DType>::template rs<0>(s[0], q_rope[k], b_desc + (bytes >> 4));
        }
      }
    }
    wgmma::commit_group();
  };
  const std::integral_constant<int, 0> part0;
  const std::integral_constant<int, 1> part1;
  const auto issue_scores = [&](int tile, auto own_part) {
    if constexpr (decltype(own_part)::value == 0) {
      issue_scores_part(tile, part0, true);
      issue_scores_part(tile, part1, false);
    } else {
      issue_scores_part(tile, part1, true);
      issue_scores_part(tile, part0, false);
    }
  };
  // This warpgroup's 256 columns of V in `tile`'s stage: MN-major, 16 keys a k-step.
  const auto v_descriptor = [&](int tile) {
    return wgmma::opaque(
        wgmma::descriptor(stage_of(tile) + warpgroup * (kOutTiles / 8) * kBlock, kBlock, 1024));
  };
  float (&o_low)[kOutTiles / 2][4] = *reinterpret_cast<float (*)[kOutTiles / 2][4]>(&o[0][0]);
  float (&o_high)[kOutTiles / 2][4] =
      *reinterpret_cast<float (*)[kOutTiles / 2][4]>(&o[0][kOutTiles / 2]);
  // O += P V of `tile`, P this warpgroup's probabilities (registers); one commit group.
  const auto issue_own_pv = [&](int tile) {
    const uint64_t v_desc = v_descriptor(tile);
    wgmma::fence();
#pragma unroll
    for (int kt = 0; kt < kKeySteps; ++kt) {
      const int step_bytes = kt * 16 * 128;
      wgmma::Wgmma<128, DType>::template rs<1>(o_low, probs[kt], v_desc + (step_bytes >> 4));
      wgmma::Wgmma<128, DType>::template rs<1>(o_high, probs[kt],
                                               v_desc + ((2 * kBlock + step_bytes) >> 4));
    }
    wgmma::commit_group();
  };
  // O += P V of `tile`, P the other warpgroup's (shared memory); one commit group.
  const auto issue_other_pv = [&](const uint8_t* p_smem, int tile) {
    const uint64_t p_desc = wgmma::opaque(wgmma::descriptor(p_smem, 16, 1024));
    const uint64_t v_desc = v_descriptor(tile);
    wgmma::fence();
#pragma unroll
    for (int kt = 0; kt < kKeySteps; ++kt) {
      const int step_bytes = kt * 16 * 128;
      const uint64_t a = p_desc + ((kt * 32) >> 4);
      wgmma::Wgmma<128, DType>::template ss<1>(o_low, a, v_desc + (step_bytes >> 4), true);
      wgmma::Wgmma<128, DType>::template ss<1>(o_high, a, v_desc + ((2 * kBlock + step_bytes) >> 4),
                                               true);
    }
    wgmma::commit_group();
  };
  // The probabilities (packed) into `p_smem` in LayoutP, as the other warpgroup's A operand.
  const auto store_probs = [&](uint8_t* p_smem) {
#pragma unroll
    for (int kt = 0; kt < kKeySteps; ++kt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row0 + 8 * half;
        const int byte = (lane % 4) * 4;
        *reinterpret_cast<uint32_t*>(
            p_smem + Traits::LayoutP::chunk_index(row, 2 * kt) * 16 + byte) = probs[kt][half];
        *reinterpret_cast<uint32_t*>(
            p_smem + Traits::LayoutP::chunk_index(row, 2 * kt + 1) * 16 + byte) =
            probs[kt][2 + half];
      }
    }
    wgmma::fence_generic_to_async_smem();
  };
  const auto masked_scores = [&](int tile) {
    const int first_key = item.kv_start + tile * kKV;
    transform_scores(s, logits, visibility.tile_needs_mask(first_key, kKV),
                     [&](int, int n, int e) {
                       const int key = first_key + n * 8 + (lane % 4) * 2 + (e % 2);
                       const int token = (item.row_start + row0 + 8 * (e / 2)) / group;
                       return visibility.visible(token, key);
                     });
  };
  // This thread's rows' new max and the tile's correction into shared memory (one lane of the
  // quad writes, after every lane read the old max), for the other warpgroup.
  const auto publish_max = [&](const float (&max)[2], const float (&correction)[2],
                               float* corrections) {
    __syncwarp();
    if (lane % 4 == 0) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        row_max[row0 + 8 * half] = max[half];
        corrections[row0 + 8 * half] = correction[half];
      }
    }
  };

  // Warpgroup 0, the pair (a, a + 1) with kHasOdd (a + 1 exists) and kHasNextEven (a + 2
  // exists); on entry s holds S of a, no MMA in flight.
  const auto even_pair = [&](auto has_odd, auto has_next_even, int a) {
    constexpr bool kHasOdd = decltype(has_odd)::value;
    constexpr bool kHasNextEven = decltype(has_next_even)::value;
    masked_scores(a);
    float correction[1][2], max[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + 8 * half;
      const float old_max = row_max[row];
      max[half] = fmaxf(old_max, Softmax::tile_max(s, 0, half) * exp_scale);
      const float reference = Softmax::reference_of(max[half]);
      correction[0][half] = ptx::fast_exp2(old_max - reference);
      row_sum[half] = row_sum[half] * correction[0][half] +
                      Softmax::exponentiate_row(s, 0, half, exp_scale, reference);
    }
    Softmax::rescale(o, correction);
    publish_max(max, correction[0], even_correction);
    sync::barrier_arrive<kThreads>(kScaleEvenReady);
    wgmma::pack_a_fragments<DType, kKV>(probs, s[0]);
    issue_own_pv(a);
    sync::barrier_wait<kThreads>(kScaleOddReady);
    wgmma::wait_group<0>();
    wgmma::pin(o[0]);
    // Chunks 0-31 of stage a % 2: this warpgroup was their last reader.
    copy_part(a + 2, next_address[0]);
    next_address[0] = copier.row_address(a + 4, warp, lane);
    // P_a on the odd tile's max, for warpgroup 1's half of the output; O0 likewise.
    float odd[1][2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float factor = odd_correction[row0 + 8 * half];
      odd[0][half] = factor;
      row_sum[half] *= factor;
#pragma unroll
      for (int n = 0; n < kScoreTiles; ++n) {
        s[0][n][2 * half] *= factor;
        s[0][n][2 * half + 1] *= factor;
      }
    }
    wgmma::pack_a_fragments<DType, kKV>(probs, s[0]);
    store_probs(even_probs);
    sync::barrier_arrive<kThreads>(kEvenProbsReady);
    Softmax::rescale(o, odd);
    if constexpr (kHasOdd) {
      sync::barrier_wait<kThreads>(kOddProbsReady);
      wgmma::fence_generic_to_async_smem();
      issue_other_pv(odd_probs, a + 1);
      if constexpr (kHasNextEven) {
        issue_scores(a + 2, part0);
        wgmma::wait_group<2>();  // the odd tile's P V (S's two groups may be in flight)
        copy_part(a + 3, next_address[1]);  // chunks 0-31 of the odd stage: read
        next_address[1] = copier.row_address(a + 5, warp, lane);
        wgmma::wait_group<0>();
        wgmma::pin(s[0]);
      } else {
        wgmma::wait_group<0>();
      }
      wgmma::pin(o[0]);
    }
  };

  // Warpgroup 1, the pair (a, a + 1): kHasOdd, kHasNextEven as above, kHasNextOdd (a + 3
  // exists); on entry s holds S of a + 1 (with kHasOdd), no MMA in flight.
  const auto odd_pair = [&](auto has_odd, auto has_next_even, auto has_next_odd, int a) {
    constexpr bool kHasOdd = decltype(has_odd)::value;
    constexpr bool kHasNextEven = decltype(has_next_even)::value;
    constexpr bool kHasNextOdd = decltype(has_next_odd)::value;
    sync::barrier_wait<kThreads>(kScaleEvenReady);
    if constexpr (kHasOdd) masked_scores(a + 1);
    float factor[1][2], max[2], correction[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + 8 * half;
      const float even_max = row_max[row];
      const float even = even_correction[row];
      if constexpr (kHasOdd) {
        max[half] = fmaxf(even_max, Softmax::tile_max(s, 0, half) * exp_scale);
        const float reference = Softmax::reference_of(max[half]);
        correction[half] = ptx::fast_exp2(even_max - reference);
        factor[0][half] = even * correction[half];
        row_sum[half] = row_sum[half] * factor[0][half] +
                        Softmax::exponentiate_row(s, 0, half, exp_scale, reference);
      } else {
        max[half] = even_max;
        correction[half] = 1.f;
        factor[0][half] = even;
        row_sum[half] *= even;
      }
    }
    Softmax::rescale(o, factor);
    publish_max(max, correction, odd_correction);
    sync::barrier_arrive<kThreads>(kScaleOddReady);
    if constexpr (kHasOdd) {
      wgmma::pack_a_fragments<DType, kKV>(probs, s[0]);
      store_probs(odd_probs);
      issue_own_pv(a + 1);
    }
    sync::barrier_wait<kThreads>(kEvenProbsReady);
    wgmma::fence_generic_to_async_smem();
    issue_other_pv(even_probs, a);
    if constexpr (kHasOdd) {
      sync::barrier_arrive<kThreads>(kOddProbsReady);
      wgmma::wait_group<1>();  // the odd tile's own P V: chunks 32-71 of the odd stage read
      copy_part(a + 3, next_address[1]);
      next_address[1] = copier.row_address(a + 5, warp, lane);
    }
    wgmma::wait_group<0>();
    wgmma::pin(o[0]);
    if constexpr (kHasNextEven) {
      copy_part(a + 2, next_address[0]);  // chunks 32-71 of the even stage: read
      next_address[0] = copier.row_address(a + 4, warp, lane);
    }
    if constexpr (kHasNextOdd) {
      issue_scores(a + 3, part1);
      wgmma::wait_group<0>();
      wgmma::pin(s[0]);
    }
  };

  if (num_tiles > 0) {
    const std::true_type yes;
    const std::false_type no;
    int a = 0;
    if (warpgroup == 0) {
      issue_scores(0, part0);
      wgmma::wait_group<0>();
      wgmma::pin(s[0]);
      for (; a + 2 < num_tiles; a += 2) even_pair(yes, yes, a);
      if (a + 1 < num_tiles) {
        even_pair(yes, no, a);
      } else {
        even_pair(no, no, a);
      }
    } else {
      if (num_tiles > 1) {
        issue_scores(1, part1);
        wgmma::wait_group<0>();
        wgmma::pin(s[0]);
      }
      for (; a + 3 < num_tiles; a += 2) odd_pair(yes, yes, yes, a);
      if (a + 2 < num_tiles) {
        odd_pair(yes, yes, no, a);
        a += 2;
      }
      if (a + 1 < num_tiles) {
        odd_pair(yes, no, no, a);
      } else {
        odd_pair(no, no, no, a);
      }
    }
  }
  ptx::cp_async_wait<0>();

  // Each row's total: both warpgroups' sums, exchanged through the correction scalars (their
  // last readers are behind this barrier).
  __syncthreads();
  float* const sums = warpgroup == 0 ? even_correction : odd_correction;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float t = row_sum[half];
    t += __shfl_xor_sync(0xffffffff, t, 1);
    t += __shfl_xor_sync(0xffffffff, t, 2);
    if (lane % 4 == 0) sums[row0 + 8 * half] = t;
  }
  __syncthreads();

  const TileWriter<typename Traits::DTypeO, Traits::kHeadDimVO, PackedRows> writer{
      p, rows, cta.kv_head, item.partial};
  const OutputScale output{p.scales.value(cta.kv_head)};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + 8 * half;
    const float total = even_correction[row] + odd_correction[row];
    if (row >= num_rows) continue;
    const float scale = total != 0.f ? 1.f / total : 0.f;
    writer.template write_pairs<kOutTiles>(
        row, warpgroup * kOutTiles * 8 + 2 * (lane % 4), [&](int n) {
          return make_float2(output(o[0][n][2 * half] * scale),
                             output(o[0][n][2 * half + 1] * scale));
        });
    if (warpgroup == 0 && lane % 4 == 0) {
      writer.write_lse(row, total != 0.f ? (row_max[row] + __log2f(total)) * kLn2 : kNegInf);
    }
  }
  if (!item.writes_partial() || !finish_split_chunk(p, item.merge_group, cta.kv_head)) return;
  // The ring is free: every copy landed and every MMA on it completed before the barriers above.
  float* const merge_scratch = reinterpret_cast<float*>(smem);
  merge_partials(writer, item.merge_group, num_rows, merge_scratch, merge_scratch + kRows);
}

}  // namespace attn_backend
