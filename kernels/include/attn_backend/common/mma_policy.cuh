// MMA policies: S = Q K^T and O += P V on the tensor cores, the one place where the
// instruction set changes. Both keep scores and outputs in the m16n8 accumulator layout
// (online_softmax.cuh), so the softmax, masks and epilogue are shared.
//
// - MmaSync (sm80+): mma.sync m16n8k16; A fragments through ldmatrix from shared memory
//   (or held in registers), B fragments from K rows, or V rows transposed; FP8 K/V tiles
//   converted to float16 in registers (the MMAs then run in float16).
// - WgmmaMma (sm_90a): warpgroup MMAs; a warpgroup's 64 rows run S = Q K^T from shared
//   memory and O += P V with P from registers, so no K/V fragment passes through registers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attn_backend/common/fp8_convert.cuh"
#include "attn_backend/common/ptx.cuh"
#include "attn_backend/common/smem_layout.cuh"
#include "attn_backend/common/wgmma.cuh"

namespace attn_backend {

template <typename DTypeQ, typename DTypeKV = DTypeQ>
struct MmaSync {
  static_assert(sizeof(DTypeQ) == 2, "mma.sync m16n8k16 takes 16-bit operands");
  static_assert(std::is_same_v<DTypeQ, DTypeKV> || is_fp8<DTypeKV>(),
                "K/V of the query's 16-bit type, or FP8");
  // FP8 K/V: fragments are read from the FP8 tiles (half the bytes of ldmatrix traffic) and
  // converted in registers, one instruction per pair (cvt.rn.f16x2.e4m3x2 / e5m2x2: exact,
  // NaN stays NaN), so the MMAs run in float16 whatever the query's type: every FP8 value
  // is exact in float16, and P in [0, 1] loses less than in bfloat16. The query tile is
  // turned into float16 once, in shared memory, pre-multiplied by the power-of-two part of
  // sm_scale (kConvertsQuery: the kernel runs fp8::convert_query_tile), exactly: a bfloat16
  // query then overflows only where |q| * sm_scale > 65504 (at worst 32752).
  //
  // An FP8 row's 16-byte chunk holds 16 dims, so ldmatrix hands a thread 4 consecutive dims
  // where a 16-bit B fragment has dims {2t, 2t+1, 2t+8, 2t+9} (t = lane % 4). Q K^T sums
  // over the dims in any order, so Q's A fragments are loaded in the order K's arrive; P V's
  // output columns arrive permuted instead and are put back in the accumulator layout once,
  // after the main loop (restore_output_layout).
  static constexpr bool kFp8KV = is_fp8<DTypeKV>();
  using DType = std::conditional_t<kFp8KV, __half, DTypeQ>;  // the MMAs' operand type
  static constexpr bool kConvertsQuery = kFp8KV;

  // What one raw product q.k of the MMAs is worth: sm_scale * key_scale, less the part of
  // sm_scale that the query conversion folded into the query.
  __device__ __forceinline__ static float qk_scale(float sm_scale, float key_scale) {
    return (kFp8KV ? fp8::sm_scale_after_query_conversion(sm_scale) : sm_scale) * key_scale;
  }

  // A fragment of rows [row0, row0 + 16) and columns [16 kk, 16 kk + 16) of a tile. With FP8
  // K/V, thread t's k-columns {2t, 2t+1, 2t+8, 2t+9} are the dims 16 kk + 4t + {0..3}.
  template <typename Layout>
  __device__ __forceinline__ static void load_a(uint32_t (&a)[4], const uint8_t* smem, int row0,
                                                int kk, int lane) {
    if constexpr (kFp8KV) {
      const int t = lane % 4;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row0 + lane / 4 + 8 * half;
        const uint2 dims = *reinterpret_cast<const uint2*>(
            smem + Layout::chunk_index(row, kk * 2 + t / 2) * 16 + (t % 2) * 8);
        a[half] = dims.x;
        a[2 + half] = dims.y;
      }
    } else {
      const int matrix = lane / 8;
      const int row = row0 + (matrix % 2) * 8 + lane % 8;
      ptx::ldmatrix_x4(a, smem + Layout::chunk_index(row, kk * 2 + matrix / 2) * 16);
    }
  }

  // s[mt][2 nn + {0, 1}] += a[mt] (columns [16 kk, 16 kk + 16)) times the keys
  // key0 + 16 nn + [0, 16) of K (rows = keys) for nn < kKeySteps.
  template <typename Layout, int kM, int kKeySteps>
  __device__ __forceinline__ static void qk_step(float (&s)[kM][2 * kKeySteps][4],
                                                 const uint32_t (&a)[kM][4],
                                                 const uint8_t* k_smem, int key0, int kk,
                                                 int lane) {
    const int matrix = lane / 8;
#pragma unroll
    for (int nn = 0; nn < kKeySteps; ++nn) {
      uint32_t b[4];
      if constexpr (kFp8KV) {
        // One FP8 chunk is the step's 16 dims: matrix 0 keys [0, 8), matrix 1 keys [8, 16).
        const int key_row = key0 + nn * 16 + (matrix % 2) * 8 + lane % 8;
        uint32_t quads[2];
        ptx::ldmatrix_x2(quads, k_smem + Layout::chunk_index(key_row, kk) * 16);
        fp8::quad_to_half<DTypeKV>(quads[0], b[0], b[1]);
        fp8::quad_to_half<DTypeKV>(quads[1], b[2], b[3]);
      } else {
        const int key_row = key0 + nn * 16 + (matrix / 2) * 8 + lane % 8;
        ptx::ldmatrix_x4(b, k_smem + Layout::chunk_index(key_row, kk * 2 + matrix % 2) * 16);
      }
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        ptx::mma_16x8x16<DType>(s[mt][2 * nn], a[mt], b[0], b[1]);
        ptx::mma_16x8x16<DType>(s[mt][2 * nn + 1], a[mt], b[2], b[3]);
      }
    }
  }

  // s = Q K^T for the kM m-tiles of rows [row0, row0 + 16 kM) of Q (A loaded per step)
  // and the keys [0, 8 kN) of the K tile.
  template <typename LayoutQ, typename LayoutK, int kHeadDimQK, int kM, int kN>
  __device__ __forceinline__ static void qk(float (&s)[kM][kN][4], const uint8_t* q_smem,
                                            int row0, const uint8_t* k_smem, int lane) {
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
      for (int n = 0; n < kN; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kHeadDimQK / 16; ++kk) {
      uint32_t a[kM][4];
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) load_a<LayoutQ>(a[mt], q_smem, row0 + mt * 16, kk, lane);
      qk_step<LayoutK, kM, kN / 2>(s, a, k_smem, 0, kk, lane);
    }
  }

  // o[mt] += P[mt] V over the keys key0 + [0, 16 kKeySteps): P is the probabilities s,
  // packed to DType in registers (the A operand), V rows are keys (B through ldmatrix.trans).
  template <typename LayoutV, int kM, int kKeySteps, int kVONTiles>
  __device__ __forceinline__ static void pv(float (&o)[kM][kVONTiles][4],
                                            const float (&s)[kM][2 * kKeySteps][4],
                                            const uint8_t* v_smem, int key0, int lane) {
    const int matrix = lane / 8;
#pragma unroll
    for (int kt = 0; kt < kKeySteps; ++kt) {
      uint32_t a[kM][4];
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        a[mt][0] = ptx::pack2<DType>(s[mt][2 * kt][0], s[mt][2 * kt][1]);
        a[mt][1] = ptx::pack2<DType>(s[mt][2 * kt][2], s[mt][2 * kt][3]);
        a[mt][2] = ptx::pack2<DType>(s[mt][2 * kt + 1][0], s[mt][2 * kt + 1][1]);
        a[mt][3] = ptx::pack2<DType>(s[mt][2 * kt + 1][2], s[mt][2 * kt + 1][3]);
      }
      const int key_row = key0 + kt * 16 + (matrix % 2) * 8 + lane % 8;
      if constexpr (kFp8KV) {
        // 32 dims (two FP8 chunks) per ldmatrix: matrix m holds keys [8 (m % 2), +8) of chunk
        // 2 c + m / 2, and a thread's register of it keys 2t, 2t+1 x dims 2g, 2g+1 of the
        // chunk (g = lane / 4). Its even and odd dims are the B fragments of two output
        // tiles: tile 4c + 2h + parity covers dims 32 c + 16 h + 2 [0, 8) + parity.
        static_assert(kVONTiles % 4 == 0, "FP8 V: head_dim_vo a multiple of 32");
#pragma unroll
        for (int c = 0; c < kVONTiles / 4; ++c) {
          uint32_t quads[4];
          ptx::ldmatrix_x4_trans(quads,
                                 v_smem + LayoutV::chunk_index(key_row, 2 * c + matrix / 2) * 16);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t even_low, odd_low, even_high, odd_high;  // keys 2t.. / 2t + 8..
            fp8::quad_to_half_interleaved<DTypeKV>(quads[2 * h], even_low, odd_low);
            fp8::quad_to_half_interleaved<DTypeKV>(quads[2 * h + 1], even_high, odd_high);
#pragma unroll
            for (int mt = 0; mt < kM; ++mt) {
              ptx::mma_16x8x16<DType>(o[mt][4 * c + 2 * h], a[mt], even_low, even_high);
              ptx::mma_16x8x16<DType>(o[mt][4 * c + 2 * h + 1], a[mt], odd_low, odd_high);
            }
          }
        }
      } else {
#pragma unroll
        for (int n16 = 0; n16 < kVONTiles / 2; ++n16) {
          uint32_t b[4];
          ptx::ldmatrix_x4_trans(b, v_smem + LayoutV::chunk_index(key_row, n16 * 2 + matrix / 2) * 16);
#pragma unroll
          for (int mt = 0; mt < kM; ++mt) {
            ptx::mma_16x8x16<DType>(o[mt][2 * n16], a[mt], b[0], b[1]);
            ptx::mma_16x8x16<DType>(o[mt][2 * n16 + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }
  }

  // After the last pv: the accumulators in the m16n8 layout (column 8 n + 2t + e % 2 of
  // tile n), which the softmax's rescaling never needed but the epilogues do. With FP8 V,
  // thread t holds columns 32 c + 16 h + 4t + {0..3} of group c (pv above); column
  // 32 c + 8 j + 2t + u is held by quad lane 2 (j % 2) + t / 2, in its tile 4c + 2 (j / 2) + u,
  // element parity t % 2 of the row's pair. 16-bit V: nothing to do.
  template <int kM, int kVONTiles>
  __device__ __forceinline__ static void restore_output_layout(float (&o)[kM][kVONTiles][4],
                                                               int lane) {
    if constexpr (kFp8KV) {
      const int t = lane % 4;
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
        for (int c = 0; c < kVONTiles / 4; ++c) {
          float held[4][4];
#pragma unroll
          for (int q = 0; q < 4; ++q) {
#pragma unroll
            for (int e = 0; e < 4; ++e) held[q][e] = o[mt][4 * c + q][e];
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int source = (lane & ~3) | (2 * (j % 2) + t / 2);
#pragma unroll
            for (int e = 0; e < 4; ++e) {  // row half e / 2, column parity u = e % 2
              const float* pair = held[2 * (j / 2) + e % 2] + 2 * (e / 2);
              const float even = __shfl_sync(0xffffffff, pair[0], source);
              const float odd = __shfl_sync(0xffffffff, pair[1], source);
              o[mt][4 * c + j][e] = t % 2 ? odd : even;
            }
          }
        }
      }
    }
  }
};

// Warpgroup MMAs over a Q tile of kRows rows (warpgroup g owns rows [64 g, 64 g + 64)) and
// K/V tiles of kKVTile keys, all in Swizzled128BBlocks layouts. kQueryConverted (FP8 caches,
// whose tiles the kernel turns into float16 tiles for it): the kernel turns the query tile into
// float16 first, times sm_scale's power of two, as for MmaSync.
template <typename DType, int kRows, int kKVTile, int kHeadDimQK, int kHeadDimVO,
          bool kQueryConverted = false>
struct WgmmaMma {
  static_assert(sizeof(DType) == 2, "wgmma m64nNk16 with 16-bit operands");
  static_assert((kKVTile == 64 || kKVTile == 128) && (kHeadDimVO == 64 || kHeadDimVO == 128),
                "wgmma N of 64 or 128");
  static constexpr bool kConvertsQuery = kQueryConverted;
  static_assert(!kQueryConverted || std::is_same_v<DType, __half>,
                "a converted query is float16");

  __device__ __forceinline__ static float qk_scale(float sm_scale, float key_scale) {
    return (kQueryConverted ? fp8::sm_scale_after_query_conversion(sm_scale) : sm_scale) *
           key_scale;
  }

  // The accumulators are in the m16n8 layout already (see MmaSync's).
  template <int kM, int kVONTiles>
  __device__ __forceinline__ static void restore_output_layout(float (&)[kM][kVONTiles][4], int) {}

  // S (this warpgroup's 64 rows x kKVTile keys) = Q K^T; the first k-step overwrites s.
  __device__ __forceinline__ static void qk(float (&s)[kKVTile / 8][4], const uint8_t* q_smem,
                                            const uint8_t* k_smem, int warpgroup) {
    wgmma::issue_k_major_products<kKVTile, DType, kRows, 0, kHeadDimQK / 16>(
        s, q_smem + warpgroup * 64 * 128, k_smem);
    wgmma::wait_group<0>();
    wgmma::pin(s);
  }

  // O += P V. V is MN-major (keys x contiguous dims): 16 keys per step are 16 rows of 128
  // bytes; the leading byte offset reaches the next 64 dims. All of P is packed before the
  // fence: registers an issued wgmma reads must not be written after the fence before it.
  __device__ __forceinline__ static void pv(float (&o)[kHeadDimVO / 8][4],
                                            const float (&s)[kKVTile / 8][4],
                                            const uint8_t* v_smem) {
    uint32_t p_fragments[kKVTile / 16][4];
    wgmma::pack_a_fragments<DType, kKVTile>(p_fragments, s);
    const uint64_t v_desc = wgmma::descriptor(v_smem, kKVTile * 128, 1024);
    wgmma::fence();
#pragma unroll
    for (int kt = 0; kt < kKVTile / 16; ++kt) {
      wgmma::Wgmma<kHeadDimVO, DType>::template rs<1>(o, p_fragments[kt],
                                                      v_desc + ((kt * 16 * 128) >> 4));
    }
    wgmma::commit_group();
    wgmma::wait_group<0>();
    wgmma::pin(o);
  }
};

}  // namespace attn_backend
