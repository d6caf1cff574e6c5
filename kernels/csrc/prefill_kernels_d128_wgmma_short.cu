// Prefill configurations for head dims (128, 128), continued: the wgmma and short-query
// shapes, in a translation unit of their own so that it builds beside the mma one.
#include "prefill_kernels.h"

namespace attn_backend {

void add_prefill_configs_d128_wgmma_short(std::vector<KernelConfig>& configs) {
  prefill_configs::add_wgmma_and_short_configs<128>(configs);
}

}  // namespace attn_backend
