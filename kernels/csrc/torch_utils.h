// Helpers shared by the torch bindings (never included by kernels/include).
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

// Turns a failed launch or CUDA call into a Python RuntimeError instead of a
// silent wrong result.
#define ATTN_BACKEND_CUDA_CHECK(expr)                                             \
  do {                                                                            \
    const cudaError_t attn_backend_err_ = (expr);                                 \
    TORCH_CHECK(attn_backend_err_ == cudaSuccess, "attn_backend CUDA error: ",    \
                cudaGetErrorString(attn_backend_err_), " (", #expr, ")");         \
  } while (0)

#define ATTN_BACKEND_CHECK_LAUNCH() ATTN_BACKEND_CUDA_CHECK(cudaGetLastError())

namespace attn_backend {

inline bool is_16_byte_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

}  // namespace attn_backend
