// FP8 cache elements (float8_e4m3fn, float8_e5m2) turned into float16 in registers, two at a
// time, with the hardware conversion (cvt.rn.f16x2.e4m3x2 / e5m2x2 on sm_89+): exact (every
// FP8 value is a float16 value), NaN stays NaN. And the query's pairs into scaled float16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

namespace attn_backend {

template <typename T>
constexpr bool is_fp8() {
  return std::is_same_v<T, __nv_fp8_e4m3> || std::is_same_v<T, __nv_fp8_e5m2>;
}

namespace fp8 {

template <typename DTypeFp8>
constexpr __nv_fp8_interpretation_t interpretation() {
  return std::is_same_v<DTypeFp8, __nv_fp8_e4m3> ? __NV_E4M3 : __NV_E5M2;
}

// The two FP8 values in the low 16 bits of `pair` (element 0 in the low byte) as a packed
// float16 pair (element 0 in the low half), the layout mma.sync operands take.
template <typename DTypeFp8>
__device__ __forceinline__ uint32_t pair_to_half(uint32_t pair) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair & 0xffff),
                                                   interpretation<DTypeFp8>());
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// A packed pair of T (float16 or bfloat16) times `scale`, as a packed float16 pair (round to
// nearest; NaN and infinities carry through).
template <typename T>
__device__ __forceinline__ uint32_t scaled_pair_to_half(uint32_t pair, float scale) {
  float2 f;
  if constexpr (std::is_same_v<T, __half>) {
    f = __half22float2(*reinterpret_cast<const __half2*>(&pair));
  } else {
    f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&pair));
  }
  const __half2 h = __floats2half2_rn(f.x * scale, f.y * scale);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Four FP8 values (bytes 0..3 of `quad`) as two pairs: {0, 1} and {2, 3}.
template <typename DTypeFp8>
__device__ __forceinline__ void quad_to_half(uint32_t quad, uint32_t& low, uint32_t& high) {
  low = pair_to_half<DTypeFp8>(quad);
  high = pair_to_half<DTypeFp8>(quad >> 16);
}

// Four FP8 values as the pairs {0, 2} and {1, 3} (the even and the odd bytes).
template <typename DTypeFp8>
__device__ __forceinline__ void quad_to_half_interleaved(uint32_t quad, uint32_t& even,
                                                         uint32_t& odd) {
  const uint32_t regrouped = __byte_perm(quad, 0, 0x3120);  // bytes 0 2 1 3
  quad_to_half<DTypeFp8>(regrouped, even, odd);
}

// The part of sm_scale that the query conversion multiplies in: its power of two,
// 2^floor(log2 sm_scale), so that the float16 product is exact. Rounding q * sm_scale itself
// (1/sqrt(128) is no power of two) would cost each dim of a logit a relative 2^-12, which a
// peaked softmax turns into output errors of several bfloat16 ulps; the rest of sm_scale,
// in [1, 2), stays in the float32 logit scale (sm_scale_after_query_conversion). Infinite or
// subnormal scales are left whole to the logit scale.
__device__ __forceinline__ float query_conversion_scale(float sm_scale) {
  const uint32_t exponent_bits = __float_as_uint(sm_scale) & 0x7f800000u;
  return exponent_bits != 0u && exponent_bits != 0x7f800000u ? __uint_as_float(exponent_bits)
                                                             : 1.f;
}

__device__ __forceinline__ float sm_scale_after_query_conversion(float sm_scale) {
  return sm_scale / query_conversion_scale(sm_scale);  // exact: a division by a power of two
}

// The query tile (kBytes of DTypeQ, any chunk layout) as float16 times
// query_conversion_scale(sm_scale), in place, so that MMAs in float16 can take it (FP8
// caches); the caller synchronises before and after.
template <typename DTypeQ, int kBytes, int kThreads>
__device__ __forceinline__ void convert_query_tile(uint8_t* q_smem, float sm_scale) {
  static_assert(kBytes % 16 == 0, "whole chunks");
  const float scale = query_conversion_scale(sm_scale);
  for (int chunk = threadIdx.x; chunk < kBytes / 16; chunk += kThreads) {
    uint4* at = reinterpret_cast<uint4*>(q_smem) + chunk;
    uint4 values = *at;
    uint32_t* pairs = reinterpret_cast<uint32_t*>(&values);
#pragma unroll
    for (int i = 0; i < 4; ++i) pairs[i] = scaled_pair_to_half<DTypeQ>(pairs[i], scale);
    *at = values;
  }
}

// A tile of kRows FP8 rows of kFp8Chunks 16-byte chunks (16 values each) in layout FromLayout
// as float16 rows (2 kFp8Chunks chunks) in layout ToLayout: for MMAs that read both operands
// from shared memory (wgmma). The caller synchronises before and after (and fences for the
// async proxy).
template <typename DTypeFp8, typename FromLayout, typename ToLayout, int kRows, int kThreads>
__device__ __forceinline__ void convert_tile_to_half(const uint8_t* from, uint8_t* to) {
  constexpr int kFp8Chunks = FromLayout::kChunks;
  static_assert(ToLayout::kChunks == 2 * kFp8Chunks, "a float16 row is twice the bytes");
  for (int i = threadIdx.x; i < kRows * kFp8Chunks; i += kThreads) {
    const int row = i / kFp8Chunks;
    const int chunk = i % kFp8Chunks;
    const uint4 in = *reinterpret_cast<const uint4*>(from + FromLayout::chunk_index(row, chunk) * 16);
    uint4 low, high;  // values 0-7 and 8-15 of the chunk
    quad_to_half<DTypeFp8>(in.x, low.x, low.y);
    quad_to_half<DTypeFp8>(in.y, low.z, low.w);
    quad_to_half<DTypeFp8>(in.z, high.x, high.y);
    quad_to_half<DTypeFp8>(in.w, high.z, high.w);
    *reinterpret_cast<uint4*>(to + ToLayout::chunk_index(row, 2 * chunk) * 16) = low;
    *reinterpret_cast<uint4*>(to + ToLayout::chunk_index(row, 2 * chunk + 1) * 16) = high;
  }
}

}  // namespace fp8
}  // namespace attn_backend
