// Operator schemas of torch.ops.attn_backend, their Meta (fake) kernels, and
// the Python module init that lets setup.py's build be imported.
#include <Python.h>
#include <torch/library.h>

namespace {

// Mutates only its cache arguments, so tracing needs no output shapes.
void paged_kv_write_meta(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                         const at::Tensor&) {}

// Writes into `out` (and `lse`) only.
void paged_decode_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, const at::Tensor&,
                       const at::Tensor&, at::Tensor&, int64_t, const at::Tensor&,
                       const at::Tensor&, double, double, bool, bool, at::Tensor&,
                       const std::optional<at::Tensor>&) {}

// Writes into `out` (and `lse`) only.
void paged_prefill_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, const at::Tensor&,
                        const at::Tensor&, int64_t, int64_t, const std::optional<at::Tensor>&,
                        const std::optional<at::Tensor>&, const at::Tensor&, at::Tensor&,
                        const at::Tensor&, const at::Tensor&, double, double, int64_t, bool,
                        bool, at::Tensor&, const std::optional<at::Tensor>&) {}

}  // namespace

TORCH_LIBRARY(attn_backend, m) {
  m.def(
      "paged_kv_write(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slots) -> ()");
  // Batch decode over a paged cache with the plan's schedule (see decode.cuh);
  // split requests' partial states are merged in the same launch. `full_batch`
  // picks the CTA shape for batches whose whole requests fill the GPU (the
  // plan was made for that shape's CTA slots; paged_decode.cu). `enable_pdl`: launch
  // with programmatic stream serialization (sm_90+; decode_launch.h).
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, "
      "Tensor? row_index, Tensor? slot_map, bool table_holds_slots, Tensor schedule, "
      "Tensor merge_indptr, Tensor(a!) merge_counters, int num_work_items, "
      "Tensor(b!) partial_out, Tensor(c!) partial_lse, float sm_scale, float logits_soft_cap, "
      "bool full_batch, bool enable_pdl, Tensor(d!) out, Tensor(e!)? lse) -> ()");
  m.def("paged_decode_ctas_per_sm(int head_dim_qk, int head_dim_vo, bool full_batch) -> int");
  // The decode schedule (attn_backend/schedule.py's plan_decode) computed on the host in
  // C++, written into host buffers; returns [items, chunk tokens].
  m.def(
      "plan_decode_schedule(Tensor kv_lens, int window_left, int num_kv_heads, int cta_slots, "
      "int max_items, int grid_items, Tensor(a!) schedule, Tensor(b!) merge_indptr) -> int[]");
  // Ragged queries over a paged cache with the plan's tile schedule (see
  // prefill.cuh); split tiles' partial states are merged in the same launch.
  // `enable_pdl` as for paged_decode.
  m.def(
      "paged_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, "
      "Tensor? row_index, Tensor? slot_map, bool table_holds_slots, Tensor request_info, "
      "Tensor schedule, int num_work_items, int tile_rows, Tensor? mask_bits, "
      "Tensor? mask_offset, "
      "Tensor merge_indptr, Tensor(a!) merge_counters, Tensor(b!) partial_out, "
      "Tensor(c!) partial_lse, float sm_scale, float logits_soft_cap, int window_left, "
      "bool causal, bool enable_pdl, Tensor(d!) out, Tensor(e!)? lse) -> ()");
  // [tile rows, kv tile, CTAs per SM, threads] of the tile shape for long or short queries.
  m.def("paged_prefill_config(int head_dim_qk, int head_dim_vo, bool short_queries) -> int[]");
  // Whether long queries may use the wgmma tile shape on sm_90 GPUs (default: yes).
  m.def("prefill_allow_wgmma(bool allowed) -> ()");
}

TORCH_LIBRARY_IMPL(attn_backend, Meta, m) {
  m.impl("paged_kv_write", &paged_kv_write_meta);
  m.impl("paged_decode", &paged_decode_meta);
  m.impl("paged_prefill", &paged_prefill_meta);
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
