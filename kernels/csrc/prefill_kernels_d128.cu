// Prefill configurations for head dims (128, 128), from ptxas's register counts on sm_90a
// and the timings of bench/sweep_prefill.py on an H100.
//
// prefill_mma: two 16-row MMA tiles per warp (32 query rows) share every K/V fragment read
// from shared memory, which halves the shared-memory traffic per MMA against one tile per
// warp; 8 warps (256 rows) share each K/V tile, so every thread issues half the copies of
// a 4-warp CTA. 64-key tiles: half the barriers, copy rounds and softmax steps per key of
// 32-key ones. ptxas spills about 50 B here (a few loads per tile, from L1); the sweep
// timed this faster than 32-key tiles or 32-key compute steps.
//
// prefill_wgmma (sm_90 GPUs with sm_90a code in the build): warpgroup MMAs, 3 warpgroups x
// 64 rows, 128-key tiles, 2 stages. The sweep on an H100 (1 x 8k causal d128): 425 TFLOP/s
// against 388 with 2 warpgroups, 387 with 64-key tiles in 3 stages, 318 for the mma.sync
// shape; the third warpgroup's softmax overlaps the other two's MMAs.
//
// prefill_short serves batches whose requests have few query rows (speculative
// verification, decode-like extends: q_len * group <= 64): a tile never spans requests, so
// a 256-row tile would mostly compute padding there, turning a memory-bound batch into a
// compute-bound one. 64 rows keep it memory-bound.
#include "prefill_kernels.h"

namespace attn_backend {

// The wgmma and short shapes are compiled in their own translation unit
// (prefill_kernels_d128_wgmma_short.cu), beside this one: each unit instantiates every element
// type and variant of its shapes, and two units build in parallel.
void add_prefill_configs_d128(std::vector<KernelConfig>& configs) {
  using namespace prefill_configs;
  configs.push_back(config<PrefillShape<128, 128, 2, 64, 2, 8>>("prefill_mma"));
  add_prefill_configs_d128_wgmma_short(configs);
}

}  // namespace attn_backend
