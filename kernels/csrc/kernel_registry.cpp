#include "kernel_registry.h"

namespace attn_backend {

const std::vector<KernelConfig>& kernel_configs() {
  static const std::vector<KernelConfig> configs = [] {
    std::vector<KernelConfig> all;
    add_decode_configs(all);
    add_prefill_configs_d64(all);
    add_prefill_configs_d128(all);
    add_prefill_configs_d256(all);
    add_prefill_configs_d192(all);
    add_prefill_configs_short_keysplit(all);
    add_mla_configs(all);
    add_mla_wgmma_configs(all);
    add_mla_seesaw_configs(all);
    return all;
  }();
  return configs;
}

const KernelConfig& kernel_config(int64_t id) {
  const auto& configs = kernel_configs();
  TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(configs.size()),
              "attn_backend: kernel configuration ", id, " does not exist (", configs.size(),
              " compiled)");
  return configs[id];
}

}  // namespace attn_backend
