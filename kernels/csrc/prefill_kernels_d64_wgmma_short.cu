// Prefill configurations for head dims (64, 64), continued: the wgmma and short-query shapes
// (prefill_kernels_d128.cu says why each), in a translation unit of their own.
#include "prefill_kernels.h"

namespace attn_backend {

void add_prefill_configs_d64_wgmma_short(std::vector<KernelConfig>& configs) {
  using namespace prefill_configs;
  configs.push_back(config<PrefillShape<64, 64, 1, 128, 2, 12, true>>("prefill_wgmma"));
  configs.push_back(config<PrefillShape<64, 64, 1, 64, 2>>("prefill_short"));
}

}  // namespace attn_backend
