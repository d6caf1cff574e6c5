// Thin wrappers over Hopper's warpgroup MMA (wgmma.mma_async, sm_90a): shared-
// memory matrix descriptors, the fences and waits around an MMA batch, and the
// m64nNk16 instructions the wgmma MMA policies use (mma_policy.cuh, mla_wgmma.cuh):
// N = 32, 64 or 128, fp32 accumulators, fp16/bf16 inputs, A from shared memory or registers.
//
// Shared-memory operands use the 128-byte swizzled layout (smem_layout.cuh's
// Swizzled128BBlocks): a tile of R rows and 64*C columns (16-bit elements) is
// stored as C column blocks of R x 128 bytes. Every block must start 1024-byte
// aligned (the hardware swizzles on address bits). K-major operands (rows = M
// or N, contiguous K) step along K by moving the start address 32 bytes (16
// elements) inside a block, then to the next block; MN-major ones (rows = K,
// contiguous N: V in O = P V) step along K by 16 rows and reach the next 64
// columns through the leading byte offset.
//
// The accumulator fragment of a 64 x N tile is the m16n8 mma.sync one, for
// warp w of the warpgroup on rows [16 w, 16 w + 16), repeated over N/8 column
// tiles: d[j][e] = (row lane/4 + 8 (e/2), column 8 j + 2 (lane%4) + e%2). The
// register A operand is the m16n8k16 A fragment of the same rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attn_backend/common/ptx.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ATTN_BACKEND_HAS_WGMMA 1
#else
#define ATTN_BACKEND_HAS_WGMMA 0
#endif

namespace attn_backend {
namespace wgmma {

// Matrix descriptor: start address, leading and stride byte offsets (16-byte
// units), 128-byte swizzle. The start address field is the low 14 bits, so a
// byte offset inside shared memory is added as `desc + (bytes >> 4)`.
__device__ __forceinline__ uint64_t descriptor(const void* smem, uint32_t leading_bytes,
                                               uint32_t stride_bytes) {
  const uint32_t address = ptx::smem_address(smem);
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// `desc` as a value the compiler cannot see through: a loop whose operands sit at the same
// addresses every iteration would otherwise hoist each k-step's descriptor out of the loop and
// hold them all in registers (dozens of 64-bit values, spilled).
__device__ __forceinline__ uint64_t opaque(uint64_t desc) {
  asm volatile("" : "+l"(desc));
  return desc;
}

// Orders this thread's earlier register and shared-memory writes before the next wgmma.
__device__ __forceinline__ void fence() {
#if ATTN_BACKEND_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void commit_group() {
#if ATTN_BACKEND_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int kPending>
__device__ __forceinline__ void wait_group() {
#if ATTN_BACKEND_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Makes shared memory written through the generic proxy (st.shared, cp.async)
// visible to wgmma, which reads it through the async proxy.
__device__ __forceinline__ void fence_generic_to_async_smem() {
#if ATTN_BACKEND_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Keeps the compiler from moving reads of an accumulator across the wait that
// completes it (the registers are the asm's outputs from the issue onwards).
template <int kTiles>
__device__ __forceinline__ void pin(float (&d)[kTiles][4]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
  }
}

// The register A operand of O += P V from S's accumulators (kKeys keys): the accumulator
// layout of two 8-key column tiles is the A fragment of one 16-key k-step.
template <typename DType, int kKeys>
__device__ __forceinline__ void pack_a_fragments(uint32_t (&a)[kKeys / 16][4],
                                                 const float (&s)[kKeys / 8][4]) {
#pragma unroll
  for (int kt = 0; kt < kKeys / 16; ++kt) {
    a[kt][0] = ptx::pack2<DType>(s[2 * kt][0], s[2 * kt][1]);
    a[kt][1] = ptx::pack2<DType>(s[2 * kt][2], s[2 * kt][3]);
    a[kt][2] = ptx::pack2<DType>(s[2 * kt + 1][0], s[2 * kt + 1][1]);
    a[kt][3] = ptx::pack2<DType>(s[2 * kt + 1][2], s[2 * kt + 1][3]);
  }
}

// Operand strings of the m64nNk16 instructions, per N: the accumulator registers
// "{%0, ..., %(N/2 - 1)}", their "+f" operands, and the operands after them (ss: A and B
// descriptors, scale-d, transpose-B; rs: the 4 A registers, B descriptor, scale-d,
// transpose-B). scale-d is a predicate set from an integer operand.
#define ATTN_BACKEND_WGMMA_ACC_32 \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15" \
  "}"
#define ATTN_BACKEND_WGMMA_OUTS_32(d) \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), \
  "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), \
  "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), \
  "+f"(d[3][3])
#define ATTN_BACKEND_WGMMA_SS_SCALE_32 "%18"
#define ATTN_BACKEND_WGMMA_SS_TAIL_32 ",%16, %17, p, 1, 1, 0, %19;\n}\n"
#define ATTN_BACKEND_WGMMA_RS_SCALE_32 "%21"
#define ATTN_BACKEND_WGMMA_RS_TAIL_32 ",{%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"

#define ATTN_BACKEND_WGMMA_ACC_64 \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, " \
  "%17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
  "}"
#define ATTN_BACKEND_WGMMA_OUTS_64(d) \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), \
  "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), \
  "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), \
  "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), \
  "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), \
  "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), \
  "+f"(d[7][2]), "+f"(d[7][3])
#define ATTN_BACKEND_WGMMA_SS_SCALE_64 "%34"
#define ATTN_BACKEND_WGMMA_SS_TAIL_64 ",%32, %33, p, 1, 1, 0, %35;\n}\n"
#define ATTN_BACKEND_WGMMA_RS_SCALE_64 "%37"
#define ATTN_BACKEND_WGMMA_RS_TAIL_64 ",{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"

#define ATTN_BACKEND_WGMMA_ACC_128 \
  "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, " \
  "%17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, " \
  "%47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, " \
  "%62, %63" \
  "}"
#define ATTN_BACKEND_WGMMA_OUTS_128(d) \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), \
  "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), \
  "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), \
  "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), \
  "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), \
  "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), \
  "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), \
  "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), \
  "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), \
  "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), \
  "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), \
  "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), \
  "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define ATTN_BACKEND_WGMMA_SS_SCALE_128 "%66"
#define ATTN_BACKEND_WGMMA_SS_TAIL_128 ",%64, %65, p, 1, 1, 0, %67;\n}\n"
#define ATTN_BACKEND_WGMMA_RS_SCALE_128 "%69"
#define ATTN_BACKEND_WGMMA_RS_TAIL_128 ",{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"

#if ATTN_BACKEND_HAS_WGMMA
#define ATTN_BACKEND_WGMMA_ONLY(...) __VA_ARGS__
#else
#define ATTN_BACKEND_WGMMA_ONLY(...) __trap()
#endif

// Wgmma<N, T>::ss: D[64 x N] (+)= A (smem, K-major) * B (smem; K-major, or MN-major with
// kTransposeB); accumulate = false overwrites D. ::rs: D += A (registers: the m16n8k16 A
// fragment of each warp's 16 rows) * B (smem). N is 32, 64 or 128, T's PTX name PTX_TYPE.
#define ATTN_BACKEND_WGMMA(N, T, PTX_TYPE)                                                    \
  template <>                                                                                 \
  struct Wgmma<N, T> {                                                                        \
    template <int kTransposeB>                                                                \
    static __device__ __forceinline__ void ss(float (&d)[N / 8][4], uint64_t a_desc,          \
                                              uint64_t b_desc, bool accumulate) {             \
      ATTN_BACKEND_WGMMA_ONLY(asm volatile(                                                   \
          "{\n.reg .pred p;\nsetp.ne.b32 p, " ATTN_BACKEND_WGMMA_SS_SCALE_##N ", 0;\n"        \
          "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " "         \
          ATTN_BACKEND_WGMMA_ACC_##N ATTN_BACKEND_WGMMA_SS_TAIL_##N                           \
          : ATTN_BACKEND_WGMMA_OUTS_##N(d)                                                    \
          : "l"(a_desc), "l"(b_desc), "r"(static_cast<int>(accumulate)), "n"(kTransposeB)));  \
    }                                                                                         \
    template <int kTransposeB>                                                                \
    static __device__ __forceinline__ void rs(float (&d)[N / 8][4], const uint32_t (&a)[4],   \
                                              uint64_t b_desc) {                              \
      ATTN_BACKEND_WGMMA_ONLY(asm volatile(                                                   \
          "{\n.reg .pred p;\nsetp.ne.b32 p, " ATTN_BACKEND_WGMMA_RS_SCALE_##N ", 0;\n"        \
          "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " "         \
          ATTN_BACKEND_WGMMA_ACC_##N ATTN_BACKEND_WGMMA_RS_TAIL_##N                           \
          : ATTN_BACKEND_WGMMA_OUTS_##N(d)                                                    \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(1),                  \
            "n"(kTransposeB)));                                                               \
    }                                                                                         \
  };

template <int kN, typename T>
struct Wgmma;
ATTN_BACKEND_WGMMA(32, __nv_bfloat16, "bf16")
ATTN_BACKEND_WGMMA(32, __half, "f16")
ATTN_BACKEND_WGMMA(64, __nv_bfloat16, "bf16")
ATTN_BACKEND_WGMMA(64, __half, "f16")
ATTN_BACKEND_WGMMA(128, __nv_bfloat16, "bf16")
ATTN_BACKEND_WGMMA(128, __half, "f16")

// D (64 x kN) = A B^T over k-steps [kFirstStep, kFirstStep + kSteps) of 16 columns, A (64
// rows) and B (kN rows) K-major in Swizzled128BBlocks layouts whose 128-byte column blocks hold
// kRowsA and kN rows; issued as one commit group (the first step overwrites d), the caller
// waits for it.
template <int kN, typename T, int kRowsA, int kFirstStep, int kSteps>
__device__ __forceinline__ void issue_k_major_products(float (&d)[kN / 8][4], const void* a_smem,
                                                       const void* b_smem) {
  constexpr int kStepBytes = 16 * sizeof(T);
  constexpr int kStepsPerBlock = 128 / kStepBytes;
  const uint64_t a_desc = descriptor(a_smem, /*leading (unused)=*/16, 1024);
  const uint64_t b_desc = descriptor(b_smem, 16, 1024);
  fence();
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    const int kk = kFirstStep + i;
    const int a_bytes = (kk / kStepsPerBlock) * kRowsA * 128 + (kk % kStepsPerBlock) * kStepBytes;
    const int b_bytes = (kk / kStepsPerBlock) * kN * 128 + (kk % kStepsPerBlock) * kStepBytes;
    Wgmma<kN, T>::template ss<0>(d, a_desc + (a_bytes >> 4), b_desc + (b_bytes >> 4), i > 0);
  }
  commit_group();
}

}  // namespace wgmma
}  // namespace attn_backend
