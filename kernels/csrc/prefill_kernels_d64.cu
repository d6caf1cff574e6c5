// Prefill configurations for head dims (64, 64); prefill_kernels_d128.cu says why each.
#include "prefill_kernels.h"

namespace attn_backend {

// The wgmma and short shapes build in a translation unit of their own
// (prefill_kernels_d64_wgmma_short.cu), as for d128.
void add_prefill_configs_d64(std::vector<KernelConfig>& configs) {
  using namespace prefill_configs;
  configs.push_back(config<PrefillShape<64, 64, 2, 64, 2>>("prefill_mma"));
  add_prefill_configs_d64_wgmma_short(configs);
}

}  // namespace attn_backend
