// Synchronisation finer than __syncthreads, for kernels whose warpgroups run different steps
// at once (mla_seesaw.cuh): mbarriers that complete when some threads' cp.async copies have
// landed, and named barriers where one group of threads signals another without waiting.
// sm_90a code only (the kernels that use these are warpgroup-MMA kernels; elsewhere they trap).
#pragma once

#include <cstdint>

#include "attn_backend/common/ptx.cuh"
#include "attn_backend/common/wgmma.cuh"

namespace attn_backend {
namespace sync {

// An mbarrier in shared memory whose phase completes after `count` arrivals.
__device__ __forceinline__ void mbarrier_init(uint64_t* barrier, int count) {
  ATTN_BACKEND_WGMMA_ONLY(asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(
                                           ptx::smem_address(barrier)),
                                       "r"(count)
                                       : "memory"));
}

// One arrival on `barrier` once every cp.async this thread issued so far has landed (noinc:
// the arrival is one of the `count` the barrier was initialised with).
__device__ __forceinline__ void arrive_when_copies_land(uint64_t* barrier) {
  ATTN_BACKEND_WGMMA_ONLY(asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(
                                           ptx::smem_address(barrier))
                                       : "memory"));
}

// Waits until the phase of parity `parity` of `barrier` has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* barrier, uint32_t parity) {
  ATTN_BACKEND_WGMMA_ONLY(asm volatile(
      "{\n.reg .pred done;\nWAIT_AGAIN:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_AGAIN;\n}\n" ::"r"(ptx::smem_address(barrier)),
      "r"(parity)
      : "memory"));
}

// Named barrier `id` (1..15; 0 is __syncthreads') of `threads` threads: arrive() counts this
// thread without waiting (its earlier shared-memory writes are visible to the threads that
// pass the barrier), wait() counts it and waits for the rest.
template <int kThreads>
__device__ __forceinline__ void barrier_arrive(int id) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
}

template <int kThreads>
__device__ __forceinline__ void barrier_wait(int id) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(kThreads) : "memory");
}

}  // namespace sync
}  // namespace attn_backend
