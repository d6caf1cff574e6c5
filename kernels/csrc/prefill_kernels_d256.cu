// Prefill configurations for head dims (256, 256): one 16-row tile per warp and 16-key
// tiles; no wgmma shape (a 64 x 256 accumulator per warpgroup would not fit), and the
// 64-row tile already serves short queries.
#include "prefill_kernels.h"

namespace attn_backend {

void add_prefill_configs_d256(std::vector<KernelConfig>& configs) {
  using namespace prefill_configs;
  configs.push_back(config<PrefillShape<256, 256, 1, 16, 2>>("prefill_mma"));
  configs.push_back(config<PrefillShape<256, 256, 1, 16, 2>>("prefill_short"));
}

}  // namespace attn_backend
