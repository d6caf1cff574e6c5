// The compiled kernel configurations: each a CTA shape of one kernel family with its tile
// facts and its launcher. A configuration's id is its index in kernel_configs(); plan()
// records the id it planned for and run() launches exactly that configuration, so the
// facts the planner cuts work by (tile rows and keys, CTAs per SM) are the kernel's own.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include <torch/library.h>

#include "attn_backend/plan_info.h"

namespace attn_backend {

struct AttentionParams;
struct DTypes;

// The variant flags a launcher instantiates kernels for.
struct VariantFlags {
  bool soft_cap;
  bool custom_mask;
};

// The kernel instance of `flags`: make(soft_cap, custom_mask), both std::bool_constant, names
// the instance, so all four are compiled (each costs registers only where it is used) and
// the launch picks one.
template <typename Make>
auto variant_kernel(const VariantFlags& flags, const Make& make) {
  using std::false_type;
  using std::true_type;
  return flags.soft_cap
             ? (flags.custom_mask ? make(true_type{}, true_type{}) : make(true_type{}, false_type{}))
             : (flags.custom_mask ? make(false_type{}, true_type{})
                                  : make(false_type{}, false_type{}));
}

struct KernelConfig {
  std::string name;  // decode | decode_full_batch | prefill_mma | prefill_wgmma | prefill_short |
                    // prefill_short_keysplit | prefill_mla | prefill_mla_wide | prefill_mla_wgmma |
                    // prefill_mla_seesaw
  KernelFamily family;
  int64_t head_dim_qk;
  int64_t head_dim_vo;
  int64_t tile_rows;       // packed query rows per CTA
  int64_t kv_tile_tokens;  // keys per K/V pipeline stage
  int64_t threads;
  int64_t smem_bytes;
  bool wgmma;  // needs sm_90a code and an sm_90 GPU
  void (*launch)(const AttentionParams&, const DTypes&, const VariantFlags&, dim3 grid, bool pdl,
                 cudaStream_t);
  // CTAs per SM on the current device, with 16-bit K/V or FP8 K/V (FP8 tiles take half the
  // shared memory, so more CTAs may fit; plans cut split-KV work by it).
  int (*ctas_per_sm)(bool fp8_kv);
  bool (*runs_here)();   // on the current device
  // MLA: V is the first head_dim_vo columns of each K row, read from the K tile, so the run
  // op requires v_cache to be that view of k_cache.
  bool value_in_key = false;

  // A split tile's partial state in keys of streaming, as the planner prices splits
  // (scheduler::TileShape): MLA's configurations only (a row of head_dim_vo floats against a
  // 16-bit latent key row of head_dim_qk values); 0 for the others, whose plans do not count it.
  int64_t partial_tokens() const {
    return value_in_key ? tile_rows * head_dim_vo * 4 / (head_dim_qk * 2) : 0;
  }

  std::vector<int64_t> facts() const {
    return {static_cast<int64_t>(family), head_dim_qk, head_dim_vo, tile_rows, kv_tile_tokens,
            threads, smem_bytes, wgmma ? 1 : 0, partial_tokens()};
  }
  static std::vector<std::string> fact_names() {
    return {"family", "head_dim_qk", "head_dim_vo", "tile_rows", "kv_tile_tokens", "threads",
            "smem_bytes", "wgmma", "partial_tokens"};
  }
};

const std::vector<KernelConfig>& kernel_configs();

// A plan-info record passed to an op, read back (an error names the op on a wrong length).
inline PlanInfo read_plan_info(at::IntArrayRef values, const char* op) {
  PlanInfo info;
  TORCH_CHECK(PlanInfo::from_values(values.data(), values.size(), info), op, ": plan_info has ",
              values.size(), " fields, expected ", PlanInfo::kNumFields);
  return info;
}

const KernelConfig& kernel_config(int64_t id);

// Each kernel family's translation units add their configurations.
void add_decode_configs(std::vector<KernelConfig>& configs);
void add_prefill_configs_d64(std::vector<KernelConfig>& configs);
void add_prefill_configs_d64_wgmma_short(std::vector<KernelConfig>& configs);
void add_prefill_configs_d128(std::vector<KernelConfig>& configs);
void add_prefill_configs_d128_wgmma_short(std::vector<KernelConfig>& configs);
void add_prefill_configs_d256(std::vector<KernelConfig>& configs);
void add_prefill_configs_d192(std::vector<KernelConfig>& configs);
void add_prefill_configs_short_keysplit(std::vector<KernelConfig>& configs);
void add_mla_configs(std::vector<KernelConfig>& configs);
void add_mla_wgmma_configs(std::vector<KernelConfig>& configs);
void add_mla_seesaw_configs(std::vector<KernelConfig>& configs);

}  // namespace attn_backend
