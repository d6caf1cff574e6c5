// The run op: one launch of the kernel configuration a plan was made for, over the
// tensors it reads (query, caches, page table view), the wrapper's plan workspace and its
// plan-info record (kernels/include/attn_backend/plan_info.h); attention_params.h checks them.
#include <atomic>

#include "attention_params.h"
#include "kernel_registry.h"

namespace attn_backend {

bool sm90a_kernel_runs_here(const void* kernel) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int8_t> cached[kMaxDevices] = {};  // 0: unknown, 1: yes, 2: no
  int device = 0;
  ATTN_BACKEND_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kMaxDevices && cached[device].load() != 0) return cached[device].load() == 1;
  int major = 0;
  ATTN_BACKEND_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  bool runs = false;
  if (major == 9) {
    cudaFuncAttributes attributes{};
    ATTN_BACKEND_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    runs = attributes.binaryVersion == 90;
  }
  if (device < kMaxDevices) cached[device].store(runs ? 1 : 2);
  return runs;
}

namespace {

void attention(const at::Tensor& q, at::TensorList kv, const at::Tensor& page_table,
               const std::optional<at::Tensor>& row_index,
               const std::optional<at::Tensor>& slot_map, bool table_holds_slots,
               const at::Tensor& workspace, at::IntArrayRef plan_info,
               const std::optional<at::Tensor>& mask_bits, double sm_scale,
               double logits_soft_cap, at::Tensor& out, const std::optional<at::Tensor>& lse) {
  const PlanInfo info = read_plan_info(plan_info, "attention");
  TORCH_CHECK(info.planned_config_id >= 0, "attention: plan_info is not planned");
  const KernelConfig& config = kernel_config(info.planned_config_id);
  TORCH_CHECK(config.family == info.kernel_family(), "attention: plan_info names a ",
              config.name, " configuration for another kernel family");
  TORCH_CHECK(!config.value_in_key ||
                  (kv[1].data_ptr() == kv[0].data_ptr() && kv[1].dim() == 4 && kv[0].dim() == 4 &&
                   kv[1].stride(0) == kv[0].stride(0) && kv[1].stride(1) == kv[0].stride(1) &&
                   kv[1].stride(2) == kv[0].stride(2)),
              "attention: ", config.name, " reads V as the first ", config.head_dim_vo,
              " columns of each K row; v_cache must be that view of k_cache "
              "(PagedKVCache.from_mla)");
  const AttentionParams params = make_attention_params(
      info, config.head_dim_qk, config.head_dim_vo, config.tile_rows, q, kv, page_table,
      row_index, slot_map, table_holds_slots, workspace, mask_bits, sm_scale, logits_soft_cap,
      out, lse);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  config.launch(params, DTypes{q.scalar_type(), kv[0].scalar_type(), out.scalar_type()},
                VariantFlags{logits_soft_cap > 0, mask_bits.has_value()},
                work_grid(info.num_work_items, info.num_kv_heads), info.enable_pdl != 0, stream);
}

int64_t kernel_config_occupancy(int64_t id, bool fp8_kv) {
  return kernel_config(id).ctas_per_sm(fp8_kv);
}

bool kernel_config_runs_here(int64_t id) { return kernel_config(id).runs_here(); }

}  // namespace
}  // namespace attn_backend

TORCH_LIBRARY_IMPL(attn_backend, CUDA, m) { m.impl("attention", &attn_backend::attention); }

TORCH_LIBRARY_IMPL(attn_backend, CompositeExplicitAutograd, m) {
  m.impl("kernel_config_occupancy", &attn_backend::kernel_config_occupancy);
  m.impl("kernel_config_runs_here", &attn_backend::kernel_config_runs_here);
}
