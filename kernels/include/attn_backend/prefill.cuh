// Paged-KV prefill / append on tensor cores: ragged queries of many requests
// against each request's paged KV (its cached prefix plus the new tokens).
//
// Rows: the query heads of one kv head's GQA group are packed with the query
// tokens, row R of a request = (token R / group, head R % group), so every K/V
// tile loaded for a kv head serves its whole group, and a request with a few
// new tokens (an extend, a speculative verify) still fills the MMA rows.
//
// A CTA (kWarps warps) runs one work item of the plan: a (request, tile of kRows
// packed rows, kv range) triple for one kv head (blockIdx.x). Warp w owns rows
// [w * 16 * kMTiles, (w + 1) * 16 * kMTiles) of the tile and all kKVTile keys of
// every K/V tile, so its online softmax needs no cross-warp merge. K and V
// stream through a kStages-deep cp.async ring with page ids fetched one tile
// ahead, as in decode. Visibility (the item's kv range, causal, window, a
// bit-packed custom mask) is evaluated per element only on the K/V tiles that
// can hide a key from some row of the tile; the others run unmasked.
//
// MMAs: mma.sync m16n8k16 (sm80+), or with Traits::kWgmma Hopper's warpgroup
// MMAs (sm_90a; wgmma.cuh), which read K, V and Q from 128-byte-swizzled shared
// memory; everything else in the kernel is shared by the two.
//
// Split-KV: when the tiles alone do not fill the GPU (a short extend on a long
// prefix), the plan cuts a tile's kv range into chunks; each chunk writes a
// float partial (output, lse) and the last chunk to finish merges them into
// the output in the same launch (counters reset in place, graph safe).
#pragma once

#include <cstdint>
#include <type_traits>

#include "attn_backend/decode.cuh"  // swizzled(), kLog2e, kLn2
#include "attn_backend/mma.cuh"
#include "attn_backend/paged_addressing.cuh"
#include "attn_backend/wgmma.cuh"

namespace attn_backend {

// The plan's work list, in fixed-capacity device buffers (CUDA-graph safe).
struct PrefillSchedule {
  const int32_t* work_request;    // -1: an unused slot of a graph-sized grid
  const int32_t* work_row_start;  // first packed row of the tile in its request
  const int32_t* work_kv_start;
  const int32_t* work_kv_end;
  const int32_t* work_partial;      // -1: writes the output; else the partial's index
  const int32_t* work_merge_group;  // split tile's index into merge_indptr / counters
};

struct PrefillParams {
  const void* q;  // [total_q, num_qo_heads, head_dim_qk]
  int64_t q_stride_token;
  int64_t q_stride_head;
  void* out;  // [total_q, num_qo_heads, head_dim_vo]
  int64_t out_stride_token;
  int64_t out_stride_head;
  float* lse;  // [total_q, num_qo_heads] natural log, or null
  PagedCacheSide k;
  PagedCacheSide v;
  PageTableView pages;
  int page_size;
  int num_pages;
  int num_qo_heads;
  int group_size;
  float sm_scale;
  float soft_cap;   // > 0: score = soft_cap * tanh(sm_scale * q.k / soft_cap)
  int window_left;  // >= 0: key j visible from position p only if j >= p - window_left
  bool causal;
  // Per request: first query row in q/out, number of queries, kv length.
  const int32_t* qo_start;
  const int32_t* q_len;
  const int32_t* kv_len;
  // Custom mask, or null: bit (mask_offset[r] + i * kv_len + j) of mask_bits
  // (little-endian within bytes) says whether query i of request r sees key j.
  const uint8_t* mask_bits;
  const int64_t* mask_offset;
  PrefillSchedule schedule;
  float* partial_out;  // [num_partials * num_kv_heads * kRows, head_dim_vo]
  float* partial_lse;  // [num_partials * num_kv_heads * kRows]
  const int32_t* merge_indptr;  // [groups + 1]: group g's partials are [indptr[g], indptr[g+1])
  int32_t* merge_counters;      // [groups * num_kv_heads], zeros between launches
};

// kWgmma: the MMAs are Hopper warpgroup MMAs (sm_90a): each warpgroup's 64 rows
// run S = Q K^T from shared memory and O += P V with P from registers, so no K/V
// fragment passes through registers and the tensor cores run at Hopper's rate.
// The rest of the kernel (loads, masks, softmax, epilogue, merge) is the same.
template <int kHeadDimQK_, int kHeadDimVO_, int kMTiles_, int kKVTile_, int kStages_,
          int kWarps_ = 4, bool kWgmma_ = false>
struct PrefillTraits {
  static constexpr int kHeadDimQK = kHeadDimQK_;
  static constexpr int kHeadDimVO = kHeadDimVO_;
  static constexpr int kMTiles = kMTiles_;  // 16-row MMA tiles per warp
  static constexpr int kKVTile = kKVTile_;  // keys per pipeline stage
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = 16 * kMTiles;
  static constexpr int kRows = kWarps * kRowsPerWarp;
  static constexpr int kChunksQK = kHeadDimQK / 8;
  static constexpr int kChunksVO = kHeadDimVO / 8;
  static constexpr int kKTileBytes = kKVTile * kHeadDimQK * 2;
  static constexpr int kVTileBytes = kKVTile * kHeadDimVO * 2;
  static constexpr int kStageBytes = kKTileBytes + kVTileBytes;
  static constexpr int kRingBytes = kStages * kStageBytes;
  static constexpr int kQBytes = kRows * kHeadDimQK * 2;
  static constexpr int kSlotBytes = kStages * kKVTile * 2 * 8;
  static constexpr int kQOffset = kRingBytes;
  static constexpr int kSlotOffset = kQOffset + kQBytes;
  static constexpr bool kWgmma = kWgmma_;
  // wgmma operands start 1024-byte aligned; the kernel aligns the dynamic base itself.
  static constexpr int kAlignPad = kWgmma ? 1024 : 0;
  static constexpr int kSmemBytes = kSlotOffset + kSlotBytes + kAlignPad;
  static_assert(!kWgmma || (kMTiles == 1 && kWarps % 4 == 0 && (kKVTile == 64 || kKVTile == 128) &&
                            (kHeadDimVO == 64 || kHeadDimVO == 128)),
                "wgmma tiles: one 16-row tile per warp, whole warpgroups, N of 64 or 128");
  // The merge's per-row scalars reuse the ring after the main loop.
  static_assert(kRingBytes >= 2 * kRows * 4, "ring too small for the merge scalars");
  static_assert(kChunksQK % 8 == 0 && kChunksVO % 8 == 0, "head dims must be multiples of 64");
  static_assert(kKVTile % 16 == 0 && kKVTile <= kThreads, "kv tile: multiple of 16, <= threads");
};

// Element offset of chunk `chunk` (8 elements) of row `row` of a shared-memory
// tile of kTileRows rows and kChunks chunks per row, in the layout the MMAs read.
template <typename Traits, int kChunks, int kTileRows>
__device__ __forceinline__ int prefill_smem_offset(int row, int chunk) {
  if constexpr (Traits::kWgmma) {
    return wgmma::swizzled_128b<kTileRows>(row, chunk);
  } else {
    return swizzled<kChunks>(row, chunk);
  }
}

// Merges the partials of split tile `group` into the output for one kv head's rows.
template <typename Traits, typename T>
__device__ __forceinline__ void merge_prefill_partials(const PrefillParams& p, int group,
                                                       int kv_head, int request, int row_start,
                                                       int num_rows, float* row_max,
                                                       float* row_total) {
  constexpr float kNegInf = -__builtin_huge_valf();
  constexpr int kRows = Traits::kRows;
  constexpr int kDim = Traits::kHeadDimVO;
  const int begin = p.merge_indptr[group];
  const int end = p.merge_indptr[group + 1];
  const int num_kv_heads = p.num_qo_heads / p.group_size;
  auto slot = [&](int partial, int row) {
    return (static_cast<int64_t>(partial) * num_kv_heads + kv_head) * kRows + row;
  };
  const int qo_start = p.qo_start[request];
  for (int row = threadIdx.x; row < num_rows; row += blockDim.x) {
    float max_lse = kNegInf;
    for (int i = begin; i < end; ++i) max_lse = fmaxf(max_lse, __ldcg(p.partial_lse + slot(i, row)));
    const float reference = max_lse == kNegInf ? 0.f : max_lse;
    float total = 0.f;
    for (int i = begin; i < end; ++i) {
      total += ptx::fast_exp2((__ldcg(p.partial_lse + slot(i, row)) - reference) * kLog2e);
    }
    row_max[row] = reference;
    row_total[row] = total;
    if (p.lse != nullptr) {
      const int packed = row_start + row;
      const int token = qo_start + packed / p.group_size;
      const int head = kv_head * p.group_size + packed % p.group_size;
      p.lse[static_cast<int64_t>(token) * p.num_qo_heads + head] =
          total > 0.f ? reference + __logf(total) : kNegInf;
    }
  }
  __syncthreads();
  constexpr int kVectors = kDim / 4;
  for (int v = threadIdx.x; v < num_rows * kVectors; v += blockDim.x) {
    const int row = v / kVectors;
    const int col = (v % kVectors) * 4;
    const float reference = row_max[row];
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int i = begin; i < end; ++i) {
      const float weight = ptx::fast_exp2((__ldcg(p.partial_lse + slot(i, row)) - reference) * kLog2e);
      const float4 value =
          __ldcg(reinterpret_cast<const float4*>(p.partial_out + slot(i, row) * kDim + col));
      acc.x += weight * value.x;
      acc.y += weight * value.y;
      acc.z += weight * value.z;
      acc.w += weight * value.w;
    }
    const float scale = row_total[row] > 0.f ? 1.f / row_total[row] : 0.f;
    const int packed = row_start + row;
    const int token = qo_start + packed / p.group_size;
    const int head = kv_head * p.group_size + packed % p.group_size;
    T* out = static_cast<T*>(p.out) + token * p.out_stride_token + head * p.out_stride_head + col;
    *reinterpret_cast<uint32_t*>(out) = ptx::pack2<T>(acc.x * scale, acc.y * scale);
    *reinterpret_cast<uint32_t*>(out + 2) = ptx::pack2<T>(acc.z * scale, acc.w * scale);
  }
}

template <typename Traits, typename T, bool kSoftCap, bool kCustomMask>
__global__ void __launch_bounds__(Traits::kThreads)
    paged_prefill_kernel(const __grid_constant__ PrefillParams p) {
  constexpr int kStages = Traits::kStages;
  constexpr int kKV = Traits::kKVTile;
  constexpr int kM = Traits::kMTiles;
  constexpr int kRows = Traits::kRows;
  constexpr int kChunksQK = Traits::kChunksQK;
  constexpr int kChunksVO = Traits::kChunksVO;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kKVNTiles = kKV / 8;  // 8-key MMA column tiles per K/V tile
  constexpr int kVONTiles = Traits::kHeadDimVO / 8;
  constexpr float kNegInf = -__builtin_huge_valf();

  extern __shared__ __align__(128) uint8_t smem_base[];
  uint8_t* const smem =
      Traits::kWgmma ? smem_base + ((1024 - (ptx::smem_address(smem_base) & 1023)) & 1023)
                     : smem_base;
  T* const q_smem = reinterpret_cast<T*>(smem + Traits::kQOffset);
  // [stage][token][K, V]: global address of the token's row for this kv head,
  // or null for a token outside the range.
  const T** const row_addresses = reinterpret_cast<const T**>(smem + Traits::kSlotOffset);

  const int kv_head = blockIdx.x;
  const int item = blockIdx.y;
  // The schedule and the request info are plan() buffers, written by host-to-device
  // copies, so they may be read before the previous kernel finishes (decode.cuh says why);
  // the query, caches, page table and custom mask only after wait_for_prior_grids().
  const int request = p.schedule.work_request[item];
  if (request < 0) return;
  const int row_start = p.schedule.work_row_start[item];
  const int kv_start = p.schedule.work_kv_start[item];
  const int kv_end = p.schedule.work_kv_end[item];
  const int partial = p.schedule.work_partial[item];
  const int qo_start = p.qo_start[request];
  const int q_len = p.q_len[request];
  const int kv_len = p.kv_len[request];
  ptx::wait_for_prior_grids();
  ptx::allow_dependent_grids();
  const int group = p.group_size;
  const int num_rows = min(kRows, q_len * group - row_start);  // valid rows of this tile
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int first_qo_head = kv_head * group;
  // Query i of the request sits at position kv_len - q_len + i.
  const int position_offset = kv_len - q_len;

  auto k_tile = [&](int stage) { return reinterpret_cast<T*>(smem + stage * Traits::kStageBytes); };
  auto v_tile = [&](int stage) {
    return reinterpret_cast<T*>(smem + stage * Traits::kStageBytes + Traits::kKTileBytes);
  };

  // The tile's query rows; rows past the request are zero.
  for (int i = tid; i < kRows * kChunksQK; i += kThreads) {
    const int row = i / kChunksQK;
    const int chunk = i % kChunksQK;
    const bool valid = row < num_rows;
    const int packed = row_start + (valid ? row : 0);
    const T* src = static_cast<const T*>(p.q) +
                   static_cast<int64_t>(qo_start + packed / group) * p.q_stride_token +
                   (first_qo_head + packed % group) * p.q_stride_head + chunk * 8;
    ptx::cp_async_16(q_smem + prefill_smem_offset<Traits, kChunksQK, kRows>(row, chunk), src,
                     valid);
  }
  ptx::cp_async_commit();

  const int64_t table_row = p.pages.row_of(request);
  const int num_tiles = (kv_end - kv_start + kKV - 1) / kKV;

  struct PendingRow {
    int page;
    int slot_in_page;
  };
  auto fetch_row = [&](int tile) {
    PendingRow row{-1, 0};
    const int token = kv_start + tile * kKV + tid;
    if (tid < kKV && tile < num_tiles && token < kv_end) {
      const TokenLocation location = p.pages.locate(table_row, token, p.page_size, p.num_pages);
      row = {location.page, location.slot_in_page};
    }
    return row;
  };
  const T* const k_base = reinterpret_cast<const T*>(p.k.base) + kv_head * p.k.stride_head;
  const T* const v_base = reinterpret_cast<const T*>(p.v.base) + kv_head * p.v.stride_head;
  auto store_row = [&](int tile, const PendingRow& row) {
    if (tid < kKV && tile < num_tiles) {
      const T** dst = row_addresses + ((tile % kStages) * kKV + tid) * 2;
      const bool valid = row.page >= 0;
      dst[0] = valid ? k_base + row.page * p.k.stride_page + row.slot_in_page * p.k.stride_slot
                     : nullptr;
      dst[1] = valid ? v_base + row.page * p.v.stride_page + row.slot_in_page * p.v.stride_slot
                     : nullptr;
    }
  };

  // Each thread copies one 16-byte chunk column of a tile's rows. A row outside
  // the range is zero-filled (not read), so a stage never holds stale or NaN bit
  // patterns; the mask sets those scores to -inf.
  auto load_side = [&](T* tile_smem, int stage, int side, auto chunks_tag) {
    constexpr int kChunks = decltype(chunks_tag)::value;
    constexpr int kRowsPerPass = kThreads / kChunks;
    const int chunk = tid % kChunks;
    const int first_row = tid / kChunks;
    const T* const* addresses = row_addresses + stage * kKV * 2 + side;
#pragma unroll
    for (int j = 0; j < (kKV + kRowsPerPass - 1) / kRowsPerPass; ++j) {
      const int row = first_row + j * kRowsPerPass;
      if (kKV % kRowsPerPass == 0 || row < kKV) {
        const T* src = addresses[row * 2];
        const bool valid = src != nullptr;
        ptx::cp_async_16(tile_smem + prefill_smem_offset<Traits, kChunks, kKV>(row, chunk),
                         (valid ? src : k_base) + chunk * 8, valid);
      }
    }
  };
  auto load_tile = [&](int tile) {
    const int stage = tile % kStages;
    load_side(k_tile(stage), stage, 0, std::integral_constant<int, kChunksQK>{});
    load_side(v_tile(stage), stage, 1, std::integral_constant<int, kChunksVO>{});
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) store_row(s, fetch_row(s));
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s);
    ptx::cp_async_commit();
  }
  PendingRow pending = fetch_row(kStages - 1);

  // This thread's rows are mma rows lane/4 and lane/4 + 8 of each m-tile; their bounds
  // are derived where a tile needs masking (registers are scarce in the main loop).
  const int warp_row0 = warp * Traits::kRowsPerWarp;
  // Whether a K/V tile needs per-element masking is CTA-uniform: it does when it reaches
  // below the window of the tile's last row, or past the first row's causal end (or the
  // item's end).
  const int first_position = position_offset + row_start / group;
  const int last_position = position_offset + (row_start + num_rows - 1) / group;
  const int unmasked_from = p.window_left >= 0 ? last_position - p.window_left : 0;
  const int unmasked_to = p.causal && !kCustomMask ? min(first_position + 1, kv_end) : kv_end;
  const int64_t mask_base = kCustomMask ? p.mask_offset[request] : 0;

  float o[kM][kVONTiles][4];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int n = 0; n < kVONTiles; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
  }
  float row_max[kM][2];
  float row_sum[kM][2];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
    row_max[mt][0] = row_max[mt][1] = kNegInf;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  // Soft-cap: s = cap * log2(e) * tanh(q.k * sm_scale / cap), already in the
  // log2 domain (exp_scale 1); otherwise s = q.k and exp_scale = sm_scale * log2(e).
  const float score_scale = p.sm_scale / p.soft_cap;
  const float cap_scale = p.soft_cap * kLog2e;
  const float exp_scale = kSoftCap ? 1.f : p.sm_scale * kLog2e;

  ptx::cp_async_wait<kStages - 1>();  // the query tile
  if constexpr (Traits::kWgmma) wgmma::fence_generic_to_async_smem();
  __syncthreads();

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile % kStages;
    const int next = tile + kStages - 1;
    store_row(next, pending);
    ptx::cp_async_wait<kStages - 2>();
    if constexpr (Traits::kWgmma) wgmma::fence_generic_to_async_smem();
    __syncthreads();
    if (next < num_tiles) load_tile(next);
    ptx::cp_async_commit();
    pending = fetch_row(next + 1);

    const T* k_smem = k_tile(stage);
    const T* v_smem = v_tile(stage);
    float s[kM][kKVNTiles][4];
    if constexpr (Traits::kWgmma) {
      // This warpgroup's 64 query rows times the tile's keys; the first k-step overwrites s.
      const uint64_t q_desc =
          wgmma::descriptor(q_smem + (warp / 4) * 64 * 64, /*leading (unused)=*/16, 1024);
      const uint64_t k_desc = wgmma::descriptor(k_smem, 16, 1024);
      wgmma::fence();
#pragma unroll
      for (int kk = 0; kk < Traits::kHeadDimQK / 16; ++kk) {
        const int q_bytes = (kk / 4) * kRows * 128 + (kk % 4) * 32;
        const int k_bytes = (kk / 4) * kKV * 128 + (kk % 4) * 32;
        wgmma::Wgmma<kKV, T>::template ss<0>(s[0], q_desc + (q_bytes >> 4),
                                             k_desc + (k_bytes >> 4), kk > 0);
      }
      wgmma::commit_group();
      wgmma::wait_group<0>();
      wgmma::pin(s[0]);
    } else {
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
        for (int n = 0; n < kKVNTiles; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
      }
      const int matrix = lane / 8;
#pragma unroll
      for (int kk = 0; kk < Traits::kHeadDimQK / 16; ++kk) {
        uint32_t a[kM][4];
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          const int row = warp_row0 + mt * 16 + (matrix % 2) * 8 + lane % 8;
          ptx::ldmatrix_x4(a[mt], q_smem + swizzled<kChunksQK>(row, kk * 2 + matrix / 2));
        }
#pragma unroll
        for (int nn = 0; nn < kKV / 16; ++nn) {
          uint32_t b[4];
          const int key_row = nn * 16 + (matrix / 2) * 8 + lane % 8;
          ptx::ldmatrix_x4(b, k_smem + swizzled<kChunksQK>(key_row, kk * 2 + matrix % 2));
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
            ptx::mma_16x8x16<T>(s[mt][2 * nn], a[mt], b[0], b[1]);
            ptx::mma_16x8x16<T>(s[mt][2 * nn + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }

    // Without a soft-cap the scores stay raw q.k here: the max commutes with
    // the positive scale, which is folded into the exponent's FMA below. Mask
    // per element only where some key of this tile may be hidden from some row
    // of the CTA tile (a CTA-uniform test).
    const int first_key = kv_start + tile * kKV;
    const bool needs_mask = kCustomMask || first_key < unmasked_from ||
                            first_key + kKV > unmasked_to;
    if (kSoftCap || needs_mask) {
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
        for (int n = 0; n < kKVNTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float x = s[mt][n][e];
            if (kSoftCap) x = cap_scale * ptx::fast_tanh(x * score_scale);
            if (needs_mask) {
              // Without a custom mask the row sees the keys [window start, causal end).
              const int key = first_key + n * 8 + (lane % 4) * 2 + (e % 2);
              const int token = (row_start + warp_row0 + mt * 16 + lane / 4 + 8 * (e / 2)) / group;
              const int position = position_offset + token;
              bool visible = key < kv_end && (p.window_left < 0 || key >= position - p.window_left);
              if (kCustomMask) {
                if (visible && token < q_len) {
                  const int64_t bit = mask_base + static_cast<int64_t>(token) * kv_len + key;
                  visible = (__ldg(p.mask_bits + (bit >> 3)) >> (bit & 7)) & 1;
                }
              } else if (p.causal) {
                visible = visible && key <= position;
              }
              x = visible ? x : kNegInf;
            }
            s[mt][n][e] = x;
          }
        }
      }
    }

    // Online softmax per row, in the log2 domain: row_max holds max * exp_scale.
    // A row's 4 quad lanes share it.
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float tile_max = kNegInf;
#pragma unroll
        for (int n = 0; n < kKVNTiles; ++n) {
          tile_max = fmaxf(tile_max, fmaxf(s[mt][n][2 * half], s[mt][n][2 * half + 1]));
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
        const float new_max = fmaxf(row_max[mt][half], tile_max * exp_scale);
        // With nothing seen yet the max is -inf; subtracting 0 keeps exp2 at 0.
        const float reference = new_max == kNegInf ? 0.f : new_max;
        const float correction = ptx::fast_exp2(row_max[mt][half] - reference);
        row_max[mt][half] = new_max;
        // Once the running maxima settle most tiles leave them unchanged; then these
        // rows' outputs need no rescaling (a warp-uniform test, so no divergence).
        if (__any_sync(0xffffffff, correction != 1.f)) {
#pragma unroll
          for (int n = 0; n < kVONTiles; ++n) {
            o[mt][n][2 * half] *= correction;
            o[mt][n][2 * half + 1] *= correction;
          }
        }
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < kKVNTiles; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float prob = ptx::fast_exp2(fmaf(s[mt][n][2 * half + e], exp_scale, -reference));
            s[mt][n][2 * half + e] = prob;
            sum += prob;
          }
        }
        row_sum[mt][half] = row_sum[mt][half] * correction + sum;
      }
    }

    // O += P V: the probabilities, in registers, are the A operand.
    if constexpr (Traits::kWgmma) {
      // V is MN-major (keys x contiguous dims): 16 keys per step are 16 rows of 128 bytes;
      // the leading byte offset reaches the next 64 dims.
      // All of P is packed before the fence: registers an issued wgmma reads must not be
      // written after the fence that precedes it.
      uint32_t p_fragments[kKV / 16][4];
#pragma unroll
      for (int kt = 0; kt < kKV / 16; ++kt) {
        p_fragments[kt][0] = ptx::pack2<T>(s[0][2 * kt][0], s[0][2 * kt][1]);
        p_fragments[kt][1] = ptx::pack2<T>(s[0][2 * kt][2], s[0][2 * kt][3]);
        p_fragments[kt][2] = ptx::pack2<T>(s[0][2 * kt + 1][0], s[0][2 * kt + 1][1]);
        p_fragments[kt][3] = ptx::pack2<T>(s[0][2 * kt + 1][2], s[0][2 * kt + 1][3]);
      }
      const uint64_t v_desc = wgmma::descriptor(v_smem, kKV * 128, 1024);
      wgmma::fence();
#pragma unroll
      for (int kt = 0; kt < kKV / 16; ++kt) {
        wgmma::Wgmma<Traits::kHeadDimVO, T>::template rs<1>(o[0], p_fragments[kt],
                                                            v_desc + ((kt * 16 * 128) >> 4));
      }
      wgmma::commit_group();
      wgmma::wait_group<0>();
      wgmma::pin(o[0]);
    } else {
      const int matrix = lane / 8;
#pragma unroll
      for (int kt = 0; kt < kKV / 16; ++kt) {
        uint32_t a[kM][4];
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          a[mt][0] = ptx::pack2<T>(s[mt][2 * kt][0], s[mt][2 * kt][1]);
          a[mt][1] = ptx::pack2<T>(s[mt][2 * kt][2], s[mt][2 * kt][3]);
          a[mt][2] = ptx::pack2<T>(s[mt][2 * kt + 1][0], s[mt][2 * kt + 1][1]);
          a[mt][3] = ptx::pack2<T>(s[mt][2 * kt + 1][2], s[mt][2 * kt + 1][3]);
        }
        const int key_row = kt * 16 + (matrix % 2) * 8 + lane % 8;
#pragma unroll
        for (int n16 = 0; n16 < Traits::kHeadDimVO / 16; ++n16) {
          uint32_t b[4];
          ptx::ldmatrix_x4_trans(b, v_smem + swizzled<kChunksVO>(key_row, n16 * 2 + matrix / 2));
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
            ptx::mma_16x8x16<T>(o[mt][2 * n16], a[mt], b[0], b[1]);
            ptx::mma_16x8x16<T>(o[mt][2 * n16 + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }
  }
  ptx::cp_async_wait<0>();

  // Epilogue: each quad holds whole rows, so no cross-warp merge is needed.
  const int num_kv_heads = p.num_qo_heads / group;
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float total = row_sum[mt][half];
      total += __shfl_xor_sync(0xffffffff, total, 1);
      total += __shfl_xor_sync(0xffffffff, total, 2);
      const int row = warp_row0 + mt * 16 + lane / 4 + 8 * half;
      if (row >= num_rows) continue;
      const float scale = total > 0.f ? 1.f / total : 0.f;
      const float lse = total > 0.f ? (row_max[mt][half] + __log2f(total)) * kLn2 : kNegInf;
      const int packed = row_start + row;
      const int token = qo_start + packed / group;
      const int head = first_qo_head + packed % group;
      const int col0 = (lane % 4) * 2;
      if (partial < 0) {
        T* out = static_cast<T*>(p.out) + static_cast<int64_t>(token) * p.out_stride_token +
                 head * p.out_stride_head + col0;
#pragma unroll
        for (int n = 0; n < kVONTiles; ++n) {
          *reinterpret_cast<uint32_t*>(out + n * 8) =
              ptx::pack2<T>(o[mt][n][2 * half] * scale, o[mt][n][2 * half + 1] * scale);
        }
        if (lane % 4 == 0 && p.lse != nullptr) {
          p.lse[static_cast<int64_t>(token) * p.num_qo_heads + head] = lse;
        }
      } else {
        const int64_t slot = (static_cast<int64_t>(partial) * num_kv_heads + kv_head) * kRows + row;
        float* dst = p.partial_out + slot * Traits::kHeadDimVO + col0;
#pragma unroll
        for (int n = 0; n < kVONTiles; ++n) {
          *reinterpret_cast<float2*>(dst + n * 8) =
              make_float2(o[mt][n][2 * half] * scale, o[mt][n][2 * half + 1] * scale);
        }
        if (lane % 4 == 0) p.partial_lse[slot] = lse;
      }
    }
  }
  if (partial < 0) return;

  // Split tile: count this chunk done; the last one merges all of them.
  __shared__ bool merges;
  const int merge_group = p.schedule.work_merge_group[item];
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const int count = p.merge_indptr[merge_group + 1] - p.merge_indptr[merge_group];
    int32_t* counter = p.merge_counters + static_cast<int64_t>(merge_group) * gridDim.x + kv_head;
    merges = atomicAdd(counter, 1) == count - 1;
    if (merges) *counter = 0;  // ready for the next launch (and graph replay)
  }
  __syncthreads();
  if (!merges) return;
  __threadfence();
  float* const merge_max = reinterpret_cast<float*>(smem);  // the ring is free now
  merge_prefill_partials<Traits, T>(p, merge_group, kv_head, request, row_start, num_rows,
                                    merge_max, merge_max + kRows);
}

}  // namespace attn_backend
