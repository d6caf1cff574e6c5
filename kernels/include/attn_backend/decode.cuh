// Paged-KV batch decode on tensor cores: one query token per request.
//
// A CTA (kWarps warps) runs one work item of the plan: a (request, kv head,
// kv range) triple. The query heads of the kv head's GQA group (at most 16)
// are the 16 rows of an mma.sync m16n8k16 tile, so each K/V token is loaded
// once for the whole group. K and V stream through a `kStages`-deep cp.async
// ring of 16 * kWarps-token tiles in XOR-swizzled shared memory; warp w computes tokens
// [16w, 16w + 16) of every tile with its own online-softmax state, and the
// warps' states are merged at the end. A work item that covers a whole request
// writes the output; one that covers part of a split request writes a float
// partial (output, lse), and the last of the request's chunks to finish (per
// kv head) merges the partials into the output, so no second launch is needed.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attn_backend/mma.cuh"
#include "attn_backend/paged_addressing.cuh"

namespace attn_backend {

// The plan's work list, in fixed-capacity device buffers (CUDA-graph safe).
struct DecodeSchedule {
  const int32_t* work_request;  // -1: an unused slot of a graph-sized grid
  const int32_t* work_kv_start;
  const int32_t* work_kv_end;
  const int32_t* work_partial;  // -1: writes the final output; else the partial's index
};

struct DecodeParams {
  const void* q;  // [batch, num_qo_heads, head_dim_qk]
  int64_t q_stride_token;
  int64_t q_stride_head;
  void* out;  // [batch, num_qo_heads, head_dim_vo]
  int64_t out_stride_token;
  int64_t out_stride_head;
  float* lse;  // [batch, num_qo_heads] natural log, or null
  PagedCacheSide k;
  PagedCacheSide v;
  PageTableView pages;
  int page_size;
  int num_pages;
  int num_qo_heads;
  int group_size;  // query heads per kv head
  float sm_scale;
  float soft_cap;  // > 0: score = soft_cap * tanh(sm_scale * q.k / soft_cap)
  DecodeSchedule schedule;
  float* partial_out;  // [num_partials, num_qo_heads, head_dim_vo]
  float* partial_lse;  // [num_partials, num_qo_heads]
  const int32_t* merge_indptr;  // [batch + 1]: request r's partials are [indptr[r], indptr[r+1])
  // [batch * num_kv_heads] zeros between launches: counts a split request's
  // finished chunks; the CTA that finishes last merges and resets it.
  int32_t* merge_counters;
#ifdef ATTN_BACKEND_DECODE_TRACE
  // Timeline for bench/sweep_decode.py --trace (never in the shipped op): per CTA
  // (blockIdx.y * gridDim.x + blockIdx.x) globaltimer ns at entry, when its first tile has
  // landed, after its last tile, at exit; and its SM.
  unsigned long long* trace;
#endif
};

#ifdef ATTN_BACKEND_DECODE_TRACE
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
struct CtaTrace {
  unsigned long long* row;
  __device__ explicit CtaTrace(unsigned long long* trace)
      : row(trace + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * 5) {
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

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int kHeadDimQK_, int kHeadDimVO_, int kStages_, int kWarps_ = 4>
struct DecodeTraits {
  static constexpr int kHeadDimQK = kHeadDimQK_;
  static constexpr int kHeadDimVO = kHeadDimVO_;
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 16;                    // mma M: the group's query heads
  static constexpr int kTokensPerWarp = 16;           // mma K of the P·V product
  static constexpr int kTileTokens = kWarps * kTokensPerWarp;
  static constexpr int kChunksQK = kHeadDimQK / 8;    // 16-byte chunks per row
  static constexpr int kChunksVO = kHeadDimVO / 8;
  static constexpr int kKTileBytes = kTileTokens * kHeadDimQK * 2;
  static constexpr int kVTileBytes = kTileTokens * kHeadDimVO * 2;
  static constexpr int kStageBytes = kKTileBytes + kVTileBytes;
  static constexpr int kRingBytes = kStages * kStageBytes;
  // After the main loop the ring holds the warps' states for the final merge.
  static constexpr int kMergeBytes = kWarps * kRows * (kHeadDimVO + 2) * 4;
  static constexpr int kQBytes = kRows * kHeadDimQK * 2;
  // The query group lands in the ring's last stage, which the prologue leaves
  // empty and the first iteration fills only after the query is in registers:
  // the 4 KB saved is what lets a third CTA onto an SM in some shapes.
  static constexpr int kQOffset = (kStages - 1) * kStageBytes;
  // Per stage and token row: element offsets of the row in the K and V caches.
  static constexpr int kSlotBytes = kStages * kTileTokens * 2 * 8;
  static constexpr int kSlotOffset = kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes;
  static constexpr int kSmemBytes = kSlotOffset + kSlotBytes;
  static_assert(kStages >= 2 && kQBytes <= kStageBytes, "the query must fit one stage");
  static_assert(kChunksQK % 8 == 0 && kChunksVO % 8 == 0, "head dims must be multiples of 64");
};

// Element offset of 16-byte chunk `chunk` of row `row` in a tile with
// `kChunks` chunks per row. XOR-ing with the row spreads the 8 rows that one
// ldmatrix reads over all 32 banks.
template <int kChunks>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kChunks * 8 + ((chunk ^ (row & 7)) * 8);
}

// out = sum_i exp(lse_i - lse) * out_i over request `request`'s partials, for
// the query heads [first_head, first_head + num_heads) (at most 16), with
// lse = log sum_i exp(lse_i). It runs at the tail of the kernel, so it is
// latency-bound: each head's max and total weight are computed once, with the
// lanes of a warp striding over the partials, and each thread then walks the
// partials once for 4 columns with 8 partials' loads in flight. Partials
// written by other CTAs are read with ld.cg (from L2), never a stale L1 line.
template <int kHeadDimVO, typename T>
__device__ __forceinline__ void merge_partials(const DecodeParams& p, int request, int first_head,
                                               int num_heads, float* head_max, float* head_total) {
  constexpr float kNegInf = -__builtin_huge_valf();
  constexpr int kLoadsInFlight = 8;
  const int begin = p.merge_indptr[request];
  const int end = p.merge_indptr[request + 1];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int num_warps = blockDim.x / 32;
  for (int h = warp; h < num_heads; h += num_warps) {
    const float* lse = p.partial_lse + first_head + h;
    float max_lse = kNegInf;
    for (int i = begin + lane; i < end; i += 32) {
      max_lse = fmaxf(max_lse, __ldcg(lse + static_cast<int64_t>(i) * p.num_qo_heads));
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      max_lse = fmaxf(max_lse, __shfl_xor_sync(0xffffffff, max_lse, offset));
    }
    const float reference = max_lse == kNegInf ? 0.f : max_lse;
    float total = 0.f;
    for (int i = begin + lane; i < end; i += 32) {
      total += ptx::fast_exp2(
          (__ldcg(lse + static_cast<int64_t>(i) * p.num_qo_heads) - reference) * kLog2e);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      total += __shfl_xor_sync(0xffffffff, total, offset);
    }
    if (lane == 0) {
      head_max[h] = reference;
      head_total[h] = total;
      if (p.lse != nullptr) {
        p.lse[request * p.num_qo_heads + first_head + h] =
            total > 0.f ? reference + __logf(total) : kNegInf;
      }
    }
  }
  __syncthreads();
  // Each thread owns 4 consecutive columns of one head and walks the partials
  // once for all of them (float4 loads), 8 partials in flight.
  constexpr int kVectorsPerHead = kHeadDimVO / 4;
  for (int v = threadIdx.x; v < num_heads * kVectorsPerHead; v += blockDim.x) {
    const int h = v / kVectorsPerHead;
    const int col = (v % kVectorsPerHead) * 4;
    const int head = first_head + h;
    const float reference = head_max[h];
    const float total = head_total[h];
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int i0 = begin; i0 < end; i0 += kLoadsInFlight) {
      float lse[kLoadsInFlight];
      float4 value[kLoadsInFlight];
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        const int64_t index =
            static_cast<int64_t>(i0 + u < end ? i0 + u : begin) * p.num_qo_heads + head;
        lse[u] = __ldcg(p.partial_lse + index);
        value[u] = __ldcg(reinterpret_cast<const float4*>(p.partial_out + index * kHeadDimVO + col));
      }
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) {
        if (i0 + u < end) {
          const float weight = ptx::fast_exp2((lse[u] - reference) * kLog2e);
          acc.x += weight * value[u].x;
          acc.y += weight * value[u].y;
          acc.z += weight * value[u].z;
          acc.w += weight * value[u].w;
        }
      }
    }
    const float scale = total > 0.f ? 1.f / total : 0.f;
    T* out = static_cast<T*>(p.out) + request * p.out_stride_token + head * p.out_stride_head + col;
    out[0] = ptx::from_float<T>(acc.x * scale);
    out[1] = ptx::from_float<T>(acc.y * scale);
    out[2] = ptx::from_float<T>(acc.z * scale);
    out[3] = ptx::from_float<T>(acc.w * scale);
  }
}

template <typename Traits, typename T, bool kSoftCap>
__global__ void __launch_bounds__(Traits::kThreads)
    paged_decode_kernel(const __grid_constant__ DecodeParams p) {
  constexpr int kStages = Traits::kStages;
  constexpr int kTile = Traits::kTileTokens;
  constexpr int kChunksQK = Traits::kChunksQK;
  constexpr int kChunksVO = Traits::kChunksVO;
  constexpr int kThreads = Traits::kThreads;
  constexpr float kNegInf = -__builtin_huge_valf();

  extern __shared__ __align__(128) uint8_t smem[];
  T* const q_smem = reinterpret_cast<T*>(smem + Traits::kQOffset);
  // [stage][token][K, V]: element offset of the token's row for this kv head,
  // or -1 for a token outside the range.
  int64_t* const row_offsets = reinterpret_cast<int64_t*>(smem + Traits::kSlotOffset);

#ifdef ATTN_BACKEND_DECODE_TRACE
  const CtaTrace cta_trace(p.trace);
#endif
  const int kv_head = blockIdx.x;
  const int item = blockIdx.y;
  // The schedule may be read before the previous kernel has finished: plan() writes it
  // with a host-to-device copy, and a kernel after a copy in the stream starts only once
  // the copy is done. Everything else (query, caches, page table, the merge state) may
  // come from the kernel just before this one.
  const int request = p.schedule.work_request[item];
  if (request < 0) return;
  const int kv_start = p.schedule.work_kv_start[item];
  const int kv_end = p.schedule.work_kv_end[item];
  const int partial = p.schedule.work_partial[item];
  ptx::wait_for_prior_grids();
  // Triggered at the start, the next kernel launches once our last CTA has started, and
  // its CTAs take the SM slots that ours free in the tail (its prologue hides there).
  ptx::allow_dependent_grids();
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int first_qo_head = kv_head * p.group_size;

  auto k_tile = [&](int stage) { return reinterpret_cast<T*>(smem + stage * Traits::kStageBytes); };
  auto v_tile = [&](int stage) {
    return reinterpret_cast<T*>(smem + stage * Traits::kStageBytes + Traits::kKTileBytes);
  };

  // The group's query rows; rows past the group are zero.
  for (int i = tid; i < Traits::kRows * kChunksQK; i += kThreads) {
    const int row = i / kChunksQK;
    const int chunk = i % kChunksQK;
    const bool valid = row < p.group_size;
    const T* src = static_cast<const T*>(p.q) + request * p.q_stride_token +
                   (first_qo_head + (valid ? row : 0)) * p.q_stride_head + chunk * 8;
    ptx::cp_async_16(q_smem + swizzled<kChunksQK>(row, chunk), src, valid);
  }
  ptx::cp_async_commit();

  const int64_t table_row = p.pages.row_of(request);
  const int num_tiles = (kv_end - kv_start + kTile - 1) / kTile;

  // Page ids come from the page table one tile ahead of their use: thread
  // t < kTile fetches the page of token t of a tile into registers, and only
  // after the current tile's compute turns it into row offsets in shared
  // memory, so the table's latency hides under the math. Each token row reads
  // its page table entry once.
  struct PendingRow {
    int page;  // -1: outside the range (or an out-of-range id, never dereferenced)
    int slot_in_page;
  };
  auto fetch_row = [&](int tile) {
    PendingRow row{-1, 0};
    const int token = kv_start + tile * kTile + tid;
    if (tid < kTile && tile < num_tiles && token < kv_end) {
      const TokenLocation location = p.pages.locate(table_row, token, p.page_size, p.num_pages);
      row = {location.page, location.slot_in_page};
    }
    return row;
  };
  auto store_row = [&](int tile, const PendingRow& row) {
    if (tid < kTile && tile < num_tiles) {
      int64_t* dst = row_offsets + ((tile % kStages) * kTile + tid) * 2;
      dst[0] = row.page < 0 ? -1 : row.page * p.k.stride_page + row.slot_in_page * p.k.stride_slot;
      dst[1] = row.page < 0 ? -1 : row.page * p.v.stride_page + row.slot_in_page * p.v.stride_slot;
    }
  };

  const T* const k_base = reinterpret_cast<const T*>(p.k.base) + kv_head * p.k.stride_head;
  const T* const v_base = reinterpret_cast<const T*>(p.v.base) + kv_head * p.v.stride_head;
  // Thread `tid` copies 16-byte chunk `tid % kChunks` of rows tid / kChunks + j * (kThreads / kChunks).
  auto load_side = [&](const T* base, T* tile_smem, int stage, int side, auto chunks_tag) {
    constexpr int kChunks = decltype(chunks_tag)::value;
    constexpr int kRowsPerPass = kThreads / kChunks;
    const int chunk = tid % kChunks;
    const int first_row = tid / kChunks;
    const int64_t* offsets = row_offsets + stage * kTile * 2 + side;
#pragma unroll
    for (int j = 0; j < kTile / kRowsPerPass; ++j) {
      const int row = first_row + j * kRowsPerPass;
      const int64_t offset = offsets[row * 2];
      ptx::cp_async_16(tile_smem + swizzled<kChunks>(row, chunk),
                       base + (offset < 0 ? 0 : offset + chunk * 8), offset >= 0);
    }
  };
  auto load_tile = [&](int tile) {
    const int stage = tile % kStages;
    load_side(k_base, k_tile(stage), stage, 0, std::integral_constant<int, kChunksQK>{});
    load_side(v_base, v_tile(stage), stage, 1, std::integral_constant<int, kChunksVO>{});
  };

  // Prologue: row offsets of the first kStages - 1 tiles, their loads in
  // flight (a commit per stage even without a tile keeps the group count
  // uniform), and the page ids of the tile after them.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) store_row(s, fetch_row(s));
  __syncthreads();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s);
    ptx::cp_async_commit();
  }
  PendingRow pending = fetch_row(kStages - 1);

  ptx::cp_async_wait<kStages - 1>();  // the query group
  __syncthreads();
  uint32_t q_frag[Traits::kHeadDimQK / 16][4];
  {
    const int matrix = lane / 8;
    const int row = (matrix % 2) * 8 + lane % 8;
#pragma unroll
    for (int kk = 0; kk < Traits::kHeadDimQK / 16; ++kk) {
      ptx::ldmatrix_x4(q_frag[kk], q_smem + swizzled<kChunksQK>(row, kk * 2 + matrix / 2));
    }
  }

  float o[Traits::kHeadDimVO / 8][4];
#pragma unroll
  for (int n = 0; n < Traits::kHeadDimVO / 8; ++n) {
    o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  }
  float row_max[2] = {kNegInf, kNegInf};  // log2 domain; rows lane/4 and lane/4 + 8
  float row_sum[2] = {0.f, 0.f};           // this thread's share; quad-reduced at the end
  const float score_scale = kSoftCap ? p.sm_scale / p.soft_cap : p.sm_scale * kLog2e;
  const float cap_scale = p.soft_cap * kLog2e;

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int stage = tile % kStages;
    const int next = tile + kStages - 1;
    store_row(next, pending);
    ptx::cp_async_wait<kStages - 2>();
    // Tile `tile` has landed for every thread, the row offsets of `next` are
    // visible, and all warps are done with the stage that `next` reuses.
    __syncthreads();
    if (tile == 0) ATTN_BACKEND_TRACE_MARK(1);
    if (next < num_tiles) load_tile(next);
    ptx::cp_async_commit();
    pending = fetch_row(next + 1);

    const T* k_smem = k_tile(stage);
    const T* v_smem = v_tile(stage);
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    {
      const int matrix = lane / 8;
      const int row = warp * Traits::kTokensPerWarp + (matrix / 2) * 8 + lane % 8;
#pragma unroll
      for (int kk = 0; kk < Traits::kHeadDimQK / 16; ++kk) {
        uint32_t b[4];
        ptx::ldmatrix_x4(b, k_smem + swizzled<kChunksQK>(row, kk * 2 + matrix % 2));
        ptx::mma_16x8x16<T>(s[0], q_frag[kk], b[0], b[1]);
        ptx::mma_16x8x16<T>(s[1], q_frag[kk], b[2], b[3]);
      }
    }

    const int warp_first_token = kv_start + tile * kTile + warp * Traits::kTokensPerWarp;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int token = warp_first_token + nt * 8 + (lane % 4) * 2 + (e % 2);
        float x = s[nt][e];
        x = kSoftCap ? cap_scale * ptx::fast_tanh(x * score_scale) : x * score_scale;
        s[nt][e] = token < kv_end ? x : kNegInf;
      }
    }

    float correction[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float tile_max = fmaxf(fmaxf(s[0][2 * half], s[0][2 * half + 1]),
                             fmaxf(s[1][2 * half], s[1][2 * half + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
      const float new_max = fmaxf(row_max[half], tile_max);
      // With nothing seen yet the max is -inf; subtracting 0 keeps exp2 at 0.
      const float reference = new_max == kNegInf ? 0.f : new_max;
      correction[half] = ptx::fast_exp2(row_max[half] - reference);
      row_max[half] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float prob = ptx::fast_exp2(s[nt][2 * half + e] - reference);
          s[nt][2 * half + e] = prob;
          sum += prob;
        }
      }
      row_sum[half] = row_sum[half] * correction[half] + sum;
    }
    // Once the running maxima settle most tiles leave them unchanged; then the
    // output needs no rescaling (a warp-uniform test, so no divergence).
    if (__any_sync(0xffffffff, correction[0] != 1.f || correction[1] != 1.f)) {
#pragma unroll
      for (int n = 0; n < Traits::kHeadDimVO / 8; ++n) {
        o[n][0] *= correction[0];
        o[n][1] *= correction[0];
        o[n][2] *= correction[1];
        o[n][3] *= correction[1];
      }
    }

    // The probabilities, in registers, are the A operand of P·V.
    const uint32_t p_frag[4] = {ptx::pack2<T>(s[0][0], s[0][1]), ptx::pack2<T>(s[0][2], s[0][3]),
                                ptx::pack2<T>(s[1][0], s[1][1]), ptx::pack2<T>(s[1][2], s[1][3])};
    {
      const int matrix = lane / 8;
      const int row = warp * Traits::kTokensPerWarp + (matrix % 2) * 8 + lane % 8;
#pragma unroll
      for (int n16 = 0; n16 < Traits::kHeadDimVO / 16; ++n16) {
        uint32_t b[4];
        ptx::ldmatrix_x4_trans(b, v_smem + swizzled<kChunksVO>(row, n16 * 2 + matrix / 2));
        ptx::mma_16x8x16<T>(o[2 * n16], p_frag, b[0], b[1]);
        ptx::mma_16x8x16<T>(o[2 * n16 + 1], p_frag, b[2], b[3]);
      }
    }
  }

  ATTN_BACKEND_TRACE_MARK(2);
  // Merge the warps' states through shared memory (the ring is free now).
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    row_sum[half] += __shfl_xor_sync(0xffffffff, row_sum[half], 1);
    row_sum[half] += __shfl_xor_sync(0xffffffff, row_sum[half], 2);
  }
  ptx::cp_async_wait<0>();
  __syncthreads();
  constexpr int kRows = Traits::kRows;
  float* const merge_o = reinterpret_cast<float*>(smem);  // [warps][rows][head_dim_vo]
  float* const merge_max = merge_o + Traits::kWarps * kRows * Traits::kHeadDimVO;
  float* const merge_sum = merge_max + Traits::kWarps * kRows;
  if (lane % 4 == 0) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      merge_max[warp * kRows + lane / 4 + 8 * half] = row_max[half];
      merge_sum[warp * kRows + lane / 4 + 8 * half] = row_sum[half];
    }
  }
  __syncthreads();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = lane / 4 + 8 * half;
    float global_max = kNegInf;
#pragma unroll
    for (int w = 0; w < Traits::kWarps; ++w) global_max = fmaxf(global_max, merge_max[w * kRows + row]);
    const float reference = global_max == kNegInf ? 0.f : global_max;
    const float factor = ptx::fast_exp2(row_max[half] - reference);
    float* dst = merge_o + (warp * kRows + row) * Traits::kHeadDimVO + (lane % 4) * 2;
#pragma unroll
    for (int n = 0; n < Traits::kHeadDimVO / 8; ++n) {
      dst[n * 8] = o[n][2 * half] * factor;
      dst[n * 8 + 1] = o[n][2 * half + 1] * factor;
    }
  }
  __syncthreads();

  const int out_elems = p.group_size * Traits::kHeadDimVO;
  for (int e = tid; e < out_elems; e += kThreads) {
    const int row = e / Traits::kHeadDimVO;
    const int col = e % Traits::kHeadDimVO;
    float global_max = kNegInf;
#pragma unroll
    for (int w = 0; w < Traits::kWarps; ++w) global_max = fmaxf(global_max, merge_max[w * kRows + row]);
    const float reference = global_max == kNegInf ? 0.f : global_max;
    float total = 0.f;
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < Traits::kWarps; ++w) {
      total += merge_sum[w * kRows + row] * ptx::fast_exp2(merge_max[w * kRows + row] - reference);
      acc += merge_o[(w * kRows + row) * Traits::kHeadDimVO + col];
    }
    const float value = total > 0.f ? acc / total : 0.f;
    const float lse = total > 0.f ? (global_max + __log2f(total)) * kLn2 : kNegInf;
    const int qo_head = first_qo_head + row;
    if (partial < 0) {
      T* out = static_cast<T*>(p.out) + request * p.out_stride_token + qo_head * p.out_stride_head;
      out[col] = ptx::from_float<T>(value);
      if (col == 0 && p.lse != nullptr) p.lse[request * p.num_qo_heads + qo_head] = lse;
    } else {
      const int64_t index = static_cast<int64_t>(partial) * p.num_qo_heads + qo_head;
      p.partial_out[index * Traits::kHeadDimVO + col] = value;
      if (col == 0) p.partial_lse[index] = lse;
    }
  }
  if (partial < 0) return;

  // Split request: count this chunk done; the last one merges all of them.
  __shared__ bool merges;
  __threadfence();  // this CTA's partial is visible before it is counted
  __syncthreads();
  if (tid == 0) {
    const int count = p.merge_indptr[request + 1] - p.merge_indptr[request];
    int32_t* counter = p.merge_counters + static_cast<int64_t>(request) * gridDim.x + kv_head;
    merges = atomicAdd(counter, 1) == count - 1;
    if (merges) *counter = 0;  // ready for the next launch (and graph replay)
  }
  __syncthreads();
  if (!merges) return;
  __threadfence();
  // The ring is free again: merge_max/merge_sum were read before the barrier above.
  merge_partials<Traits::kHeadDimVO, T>(p, request, first_qo_head, p.group_size, merge_max,
                                        merge_sum);
}

}  // namespace attn_backend
