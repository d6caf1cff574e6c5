// Operator schemas of torch.ops.attn_backend, their Meta (fake) kernels, and the Python
// module init that lets setup.py's build be imported.
#include <Python.h>
#include <torch/library.h>

namespace {

// Mutates only its cache arguments, so tracing needs no output shapes.
void paged_kv_write_meta(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                         const at::Tensor&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, bool) {}

// Writes into `out` (and `lse`) only.
void attention_meta(const at::Tensor&, at::TensorList, const at::Tensor&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                    const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&, double,
                    double, at::Tensor&, const std::optional<at::Tensor>&) {}

}  // namespace

TORCH_LIBRARY(attn_backend, m) {
  m.def(
      "paged_kv_write(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slots, Tensor? k_scale=None, Tensor? v_scale=None, bool via_input_dtype=False) "
      "-> ()");
  // One launch of the kernel configuration `plan_info` was planned for (decode or prefill;
  // kernels/include/attn_backend/plan_info.h), over the paged cache through the page-table
  // view, reading the schedule from the wrapper's `workspace`; split tiles' partial states
  // are merged in the same launch. `kv`: [k_cache, v_cache], and for an FP8 cache
  // [k_cache, v_cache, k_scale, v_scale] (float32, 1 or num_kv_heads values, read on the
  // device by each launch).
  m.def(
      "attention(Tensor q, Tensor[] kv, Tensor page_table, Tensor? row_index, "
      "Tensor? slot_map, bool table_holds_slots, Tensor(a!) workspace, int[] plan_info, "
      "Tensor? mask_bits, float sm_scale, float logits_soft_cap, Tensor(b!) out, "
      "Tensor(c!)? lse) -> ()");
  // The layout of a wrapper's plan buffers (capacities, workspace offsets) for the setup
  // fields of a plan-info record; returns the record.
  m.def("plan_setup(int[] setup) -> int[]");
  // The scheduler (kernels/include/attn_backend/scheduler.h) on host lengths, writing the
  // plan buffers into the wrapper's host staging buffer; returns the plan-info record.
  m.def("plan_decode(Tensor kv_lens, int window_left, int[] plan_info, Tensor(a!) host_plan) -> int[]");
  m.def(
      "plan_prefill(Tensor qo_indptr, Tensor kv_lens, Tensor? mask_indptr, bool causal, "
      "int window_left, bool has_mask, int graph_num_tokens, int[] plan_info, "
      "Tensor(a!) host_plan) -> int[]");
  m.def("plan_info_fields() -> str[]");
  // The compiled kernel configurations (kernels/csrc/kernel_registry.h): a configuration's
  // id is its index in kernel_config_names().
  m.def("kernel_config_names() -> str[]");
  m.def("kernel_config_fields() -> str[]");
  m.def("kernel_config_facts(int id) -> int[]");
  // CTAs of configuration `id` that fit on one SM of the current device (fp8_kv: its kernel
  // over FP8 caches).
  m.def("kernel_config_occupancy(int id, bool fp8_kv=False) -> int");
  // Whether configuration `id`'s code runs on the current device (wgmma: sm_90a).
  m.def("kernel_config_runs_here(int id) -> bool");
}

TORCH_LIBRARY_IMPL(attn_backend, Meta, m) {
  m.impl("paged_kv_write", &paged_kv_write_meta);
  m.impl("attention", &attention_meta);
}

// The extension is loaded with torch.ops.load_library; this init only exists
// so that `import attn_backend._C` of a setup.py build also succeeds.
#define ATTN_BACKEND_CONCAT_(a, b) a##b
#define ATTN_BACKEND_CONCAT(a, b) ATTN_BACKEND_CONCAT_(a, b)
#define ATTN_BACKEND_STR_(a) #a
#define ATTN_BACKEND_STR(a) ATTN_BACKEND_STR_(a)

extern "C" PyMODINIT_FUNC ATTN_BACKEND_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, ATTN_BACKEND_STR(TORCH_EXTENSION_NAME),
                               nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
