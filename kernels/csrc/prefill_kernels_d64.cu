// Prefill configurations for head dims (64, 64); prefill_kernels_d128.cu says why each.
#include "prefill_kernels.h"

namespace attn_backend {

void add_prefill_configs_d64(std::vector<KernelConfig>& configs) {
  using namespace prefill_configs;
  configs.push_back(config<PrefillShape<64, 64, 2, 64, 2>>("prefill_mma"));
  configs.push_back(config<PrefillShape<64, 64, 1, 128, 2, 12, true>>("prefill_wgmma"));
  configs.push_back(config<PrefillShape<64, 64, 1, 64, 2>>("prefill_short"));
}

}  // namespace attn_backend
