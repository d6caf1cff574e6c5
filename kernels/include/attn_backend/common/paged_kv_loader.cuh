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
#pragma once

#include <cstdint>
#include <type_traits>

#include "attn_backend/common/params.cuh"
#include "attn_backend/common/ptx.cuh"
#include "attn_backend/common/smem_layout.cuh"
#include "attn_backend/common/wgmma.cuh"

namespace attn_backend {

template <typename DTypeKV, int kTileTokens_, int kStages_, int kThreads, typename LayoutK,
          typename LayoutV, bool kValueInKey = false>
struct PagedKVLoader {
  static constexpr int kTileTokens = kTileTokens_;
  static constexpr int kStages = kStages_;
  static constexpr int kKTileBytes = kTileTokens * LayoutK::kChunks * 16;
  static constexpr int kVTileBytes = kValueInKey ? 0 : kTileTokens * LayoutV::kChunks * 16;
  static constexpr int kStageBytes = kKTileBytes + kVTileBytes;
  static constexpr int kRingBytes = kStages * kStageBytes;
  // Per stage and key: the global addresses of its K and V rows (null: not read).
  static constexpr int kRowAddressBytes = kStages * kTileTokens * 2 * 8;
  static_assert(kStages >= 2, "a ring of at least two stages");
  static_assert(kTileTokens % 16 == 0 && kTileTokens <= kThreads,
                "tiles of whole 16-key MMA steps, one page-id fetch per thread");
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
  const int num_tiles;
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
        num_tiles((end_key - first_key + kTileTokens - 1) / kTileTokens),
        tid(static_cast<int>(threadIdx.x)) {}

  __device__ __forceinline__ uint8_t* k_tile(int stage) const { return ring + stage * kStageBytes; }
  __device__ __forceinline__ uint8_t* v_tile(int stage) const {
    return kValueInKey ? k_tile(stage) : ring + stage * kStageBytes + kKTileBytes;
  }

  // The page of this thread's key of `tile` (read from the table now, used a tile later).
  __device__ __forceinline__ PendingRow fetch(int tile) const {
    PendingRow row{-1, 0};
    const int token = kv_start + tile * kTileTokens + tid;
    if (tid < kTileTokens && tile < num_tiles && token < kv_end) {
      const TokenLocation location = p.pages.locate(table_row, token, p.page_size, p.num_pages);
      row = {location.page, location.slot_in_page};
    }
    return row;
  }

  __device__ __forceinline__ void store(int tile, const PendingRow& row) const {
    if (tid < kTileTokens && tile < num_tiles) {
      const char** dst = row_addresses + ((tile % kStages) * kTileTokens + tid) * 2;
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

  // Prologue: row addresses of the first kStages - 1 tiles, their loads in flight (a commit
  // per stage even without a tile keeps the group count uniform); returns the page ids of
  // the tile after them.
  __device__ __forceinline__ PendingRow start() const {
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) store(s, fetch(s));
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < num_tiles) load(s);
      ptx::cp_async_commit();
    }
    return fetch(kStages - 1);
  }

  // Before computing `tile`: afterwards it has landed for every thread, all warps are done
  // with the stage that tile + kStages - 1 reuses, whose loads are in flight, and `pending`
  // holds the page ids of the tile after that. kAsyncProxyReads: the MMAs read shared memory
  // through the async proxy (wgmma), which needs a fence after the generic-proxy writes.
  template <bool kAsyncProxyReads>
  __device__ __forceinline__ void advance(int tile, PendingRow& pending) const {
    const int next = tile + kStages - 1;
    store(next, pending);
    ptx::cp_async_wait<kStages - 2>();
    if constexpr (kAsyncProxyReads) wgmma::fence_generic_to_async_smem();
    __syncthreads();
    if (next < num_tiles) load(next);
    ptx::cp_async_commit();
    pending = fetch(next + 1);
  }
};

}  // namespace attn_backend
