// The paged-KV loader: K and V tiles of kTileTokens consecutive keys of one request and
// kv head stream through a kStages-deep ring of shared-memory stages with cp.async.
//
// Page ids come from the page table one tile ahead of their use: thread t < kTileTokens
// fetches the page of key t of a tile into registers, and only after the current tile's
// compute turns it into the global addresses of the key's K and V rows in shared memory,
// so the table's latency hides under the math; each key reads its table entry once (and
// its slot-map entry, for SGLang's hybrid pools). A key outside the range, or on a page id
// outside the cache, is zero-filled rather than read, so a stage never holds stale or NaN
// bit patterns (the mask hides those scores). Any element type: rows are 16-byte chunks.
// kValueInKey (MLA's latent rows): V is the first columns of each K row, so only K is
// loaded and the V tile is the K tile.
//
// kTilesPerStep = P > 1: the kernel computes P consecutive tiles at a time (a step), and the
// ring holds kStages tiles, not a multiple of P, so that more of it is in flight while a step
// computes: with P = 2 and 5 stages of half-size tiles, 3 half tiles (1.5 of the kernel's
// tiles) load during each step's compute, where 2 stages of whole tiles keep 1 in flight, in
// the same shared memory plus a half tile. Step s reads tiles P s .. P s + P - 1 (their stages
// are not adjacent when the ring wraps); the tile count is rounded up to whole steps, the
// tiles past the range zero-filled.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attn_backend/common/params.cuh"
#include "attn_backend/common/ptx.cuh"
#include "attn_backend/common/smem_layout.cuh"
#include "attn_backend/common/wgmma.cuh"

namespace attn_backend {

template <typename DTypeKV, int kTileTokens_, int kStages_, int kThreads, typename LayoutK,
          typename LayoutV, bool kValueInKey = false, int kTilesPerStep_ = 1>
struct PagedKVLoader {
  static constexpr int kTileTokens = kTileTokens_;
  static constexpr int kStages = kStages_;
  static constexpr int kTilesPerStep = kTilesPerStep_;
  static constexpr int kKTileBytes = kTileTokens * LayoutK::kChunks * 16;
  static constexpr int kVTileBytes = kValueInKey ? 0 : kTileTokens * LayoutV::kChunks * 16;
  static constexpr int kStageBytes = kKTileBytes + kVTileBytes;
  static constexpr int kRingBytes = kStages * kStageBytes;
  // Per stage and key: the global addresses of its K and V rows (null: not read).
  static constexpr int kRowAddressBytes = kStages * kTileTokens * 2 * 8;
  static_assert(kStages >= 2 * kTilesPerStep, "a ring of at least two steps");
  static_assert(kTileTokens % 16 == 0 && kTilesPerStep * kTileTokens <= kThreads,
                "tiles of whole 16-key MMA steps, one page-id fetch per thread for a step's keys");
  static_assert(!kValueInKey || std::is_same_v<LayoutK, LayoutV>,
                "a V tile inside the K tile has its layout");

  struct PendingRow {
    int page;  // -1: outside the range (or an out-of-range id, never dereferenced)
    int slot_in_page;
  };

  const AttentionParams& p;
  uint8_t* const ring;
  const char** const row_addresses;
  const char* const k_base;  // this kv head's rows
  const char* const v_base;
  const int64_t table_row;
  const int kv_start;
  const int kv_end;
  const int num_tiles;  // whole steps of tiles
  const int tid;

  __device__ __forceinline__ PagedKVLoader(const AttentionParams& params, uint8_t* ring_smem,
                                           uint8_t* row_address_smem, int kv_head, int request,
                                           int first_key, int end_key)
      : p(params),
        ring(ring_smem),
        row_addresses(reinterpret_cast<const char**>(row_address_smem)),
        k_base(params.k.base + kv_head * params.k.stride_head * sizeof(DTypeKV)),
        v_base(params.v.base + kv_head * params.v.stride_head * sizeof(DTypeKV)),
        table_row(params.pages.row_of(request)),
        kv_start(first_key),
        kv_end(end_key),
        num_tiles((end_key - first_key + kTilesPerStep * kTileTokens - 1) /
                  (kTilesPerStep * kTileTokens) * kTilesPerStep),
        tid(static_cast<int>(threadIdx.x)) {}

  __device__ __forceinline__ uint8_t* k_tile(int stage) const { return ring + stage * kStageBytes; }
  __device__ __forceinline__ uint8_t* v_tile(int stage) const {
    return kValueInKey ? k_tile(stage) : ring + stage * kStageBytes + kKTileBytes;
  }

  // The stage of tile `tile_in_step` of step `step` (P = 1: step % kStages).
  __device__ __forceinline__ static int stage_of(int step, int tile_in_step) {
    return (step * kTilesPerStep + tile_in_step) % kStages;
  }

  // The page of this thread's key of tiles [first_tile, first_tile + kTilesPerStep) (read from
  // the table now, used a step later): thread tid has key tid % kTileTokens of tile
  // first_tile + tid / kTileTokens.
  __device__ __forceinline__ PendingRow fetch(int first_tile) const {
    PendingRow row{-1, 0};
    const int token = kv_start + first_tile * kTileTokens + tid;
    // (Spelt out here and in store(), not a member function: through one, ptxas scheduled
    // the one-tile-per-step loaders' code differently.)
    const int tile = kTilesPerStep == 1 ? first_tile : first_tile + tid / kTileTokens;
    if (tid < kTilesPerStep * kTileTokens && tile < num_tiles && token < kv_end) {
      const TokenLocation location = p.pages.locate(table_row, token, p.page_size, p.num_pages);
      row = {location.page, location.slot_in_page};
    }
    return row;
  }

  __device__ __forceinline__ void store(int first_tile, const PendingRow& row) const {
    const int tile = kTilesPerStep == 1 ? first_tile : first_tile + tid / kTileTokens;
    if (tid < kTilesPerStep * kTileTokens && tile < num_tiles) {
      const int key = kTilesPerStep == 1 ? tid : tid % kTileTokens;
      const char** dst = row_addresses + ((tile % kStages) * kTileTokens + key) * 2;
      const bool valid = row.page >= 0;
      dst[0] = valid ? k_base + (row.page * p.k.stride_page + row.slot_in_page * p.k.stride_slot) *
                                    static_cast<int64_t>(sizeof(DTypeKV))
                     : nullptr;
      dst[1] = valid && !kValueInKey ? v_base + (row.page * p.v.stride_page + row.slot_in_page * p.v.stride_slot) *
                                    static_cast<int64_t>(sizeof(DTypeKV))
                     : nullptr;
    }
  }

  // Thread `tid` copies chunk tid % kChunks of rows tid / kChunks + j * (kThreads / kChunks)
  // (rows whose chunk count divides the threads); or, for rows of whole 128-byte blocks that
  // do not (MLA's 72-chunk latent rows, 24-chunk rows of head dim 192), chunk tid % 8 of
  // every block of rows tid / 8 + j * (kThreads / 8); or else the chunks tid + j * kThreads
  // of the tile in row-major order. The row-major form would serve all, with the same
  // addresses, but compiles to longer code (the row and chunk are no longer per-thread
  // constants for ptxas: each copy of the 72-chunk rows cost about 14 SASS instructions, its
  // row address read and checked again; 5% more SASS and a larger stack frame in the decode
  // and prefill kernels).
  template <typename Layout>
  __device__ __forceinline__ void load_side(uint8_t* tile_smem, int stage, int side) const {
    constexpr int kChunks = Layout::kChunks;
    const char* const* addresses = row_addresses + stage * kTileTokens * 2 + side;
    if constexpr (kThreads % kChunks != 0 && kThreads % 8 == 0 &&
                  blocks_move_by_constant_offset<Layout>()) {
      // A row's address is read and checked once for its kChunks / 8 copies.
      constexpr int kRowsPerPass = kThreads / 8;
      const int chunk = tid % 8;
      const int first_row = tid / 8;
#pragma unroll
      for (int j = 0; j < (kTileTokens + kRowsPerPass - 1) / kRowsPerPass; ++j) {
        const int row = first_row + j * kRowsPerPass;
        if (kTileTokens % kRowsPerPass == 0 || row < kTileTokens) {
          const char* src = addresses[row * 2];
          const bool valid = src != nullptr;
          const char* const row_src = (valid ? src : k_base) + chunk * 16;
          uint8_t* const row_dst = tile_smem + Layout::chunk_index(row, chunk) * 16;
#pragma unroll
          for (int block = 0; block < kChunks / 8; ++block) {
            ptx::cp_async_16(row_dst + Layout::chunk_index(0, 8 * block) * 16, row_src + 128 * block,
                             valid);
          }
        }
      }
    } else if constexpr (kThreads % kChunks != 0) {
#pragma unroll
      for (int j = 0; j < (kTileTokens * kChunks + kThreads - 1) / kThreads; ++j) {
        const int i = tid + j * kThreads;
        if ((kTileTokens * kChunks) % kThreads == 0 || i < kTileTokens * kChunks) {
          const int row = i / kChunks;
          const int chunk = i % kChunks;
          const char* src = addresses[row * 2];
          const bool valid = src != nullptr;
          ptx::cp_async_16(tile_smem + Layout::chunk_index(row, chunk) * 16,
                           (valid ? src : k_base) + chunk * 16, valid);
        }
      }
    } else {
      constexpr int kRowsPerPass = kThreads / kChunks;
      const int chunk = tid % kChunks;
      const int first_row = tid / kChunks;
#pragma unroll
      for (int j = 0; j < (kTileTokens + kRowsPerPass - 1) / kRowsPerPass; ++j) {
        const int row = first_row + j * kRowsPerPass;
        if (kTileTokens % kRowsPerPass == 0 || row < kTileTokens) {
          const char* src = addresses[row * 2];
          const bool valid = src != nullptr;
          ptx::cp_async_16(tile_smem + Layout::chunk_index(row, chunk) * 16,
                           (valid ? src : k_base) + chunk * 16, valid);
        }
      }
    }
  }

  __device__ __forceinline__ void load(int tile) const {
    const int stage = tile % kStages;
    load_side<LayoutK>(k_tile(stage), stage, 0);
    if constexpr (!kValueInKey) load_side<LayoutV>(v_tile(stage), stage, 1);
  }

  // Prologue: row addresses of the first kStages - P tiles, their loads in flight (a commit
  // per tile even without one keeps the group count uniform); returns the page ids of the P
  // tiles after them. (With P > 1 the last group of addresses may run a tile past them: the
  // same addresses are stored again before that tile loads.)
  __device__ __forceinline__ PendingRow start() const {
    constexpr int kPrologueTiles = kStages - kTilesPerStep;
#pragma unroll
    for (int s = 0; s < kPrologueTiles; s += kTilesPerStep) store(s, fetch(s));
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kPrologueTiles; ++s) {
      if (s < num_tiles) load(s);
      ptx::cp_async_commit();
    }
    return fetch(kPrologueTiles);
  }

  // Before computing `step` (tiles P step .. P step + P - 1): afterwards they have landed for
  // every thread, all warps are done with the stages that the P tiles from
  // P step + kStages - P on reuse (the last step's), whose loads are in flight, and `pending`
  // holds the page ids of the P tiles after those. kAsyncProxyReads: the MMAs read shared
  // memory through the async proxy (wgmma), which needs a fence after the generic-proxy writes.
  template <bool kAsyncProxyReads>
  __device__ __forceinline__ void advance(int step, PendingRow& pending) const {
    const int next = step * kTilesPerStep + kStages - kTilesPerStep;
    store(next, pending);
    // Committed: tiles up to next - 1; needed: up to P step + P - 1.
    ptx::cp_async_wait<kStages - 2 * kTilesPerStep>();
    if constexpr (kAsyncProxyReads) wgmma::fence_generic_to_async_smem();
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kTilesPerStep; ++j) {
      if (next + j < num_tiles) load(next + j);
      ptx::cp_async_commit();
    }
    pending = fetch(next + kTilesPerStep);
  }
};

}  // namespace attn_backend
