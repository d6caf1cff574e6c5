// Prefill configurations for head dims (192, 128): the MHA prefill of DeepSeek-class MLA
// models (K = 128 decompressed "nope" dims + 64 rope, V = 128), SGLang's MHA / one-shot /
// chunked-KV methods and vLLM's forward_mha. 16-bit caches only (a 192-value FP8 row is 12
// chunks, not whole 128-byte lines). The shapes are the d128 ones resized to shared memory:
// prefill_mma 8 warps x 32 rows over 64-key tiles (180 KB), prefill_wgmma 3 warpgroups over
// 64-key tiles in 3 stages (193 KB; 128-key tiles and a 192-row Q tile would not fit),
// prefill_short 64 rows. Not yet run on a GPU (attn_backend._validation gates it with MLA's).
#include "prefill_kernels.h"

namespace attn_backend {

void add_prefill_configs_d192(std::vector<KernelConfig>& configs) {
  using namespace prefill_configs;
  configs.push_back(config<PrefillShape<192, 128, 2, 64, 2, 8>, false>("prefill_mma"));
  configs.push_back(config<PrefillShape<192, 128, 1, 64, 3, 12, true>, false>("prefill_wgmma"));
  configs.push_back(config<PrefillShape<192, 128, 1, 64, 2>, false>("prefill_short"));
}

}  // namespace attn_backend
