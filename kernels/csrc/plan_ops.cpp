// plan() on the host: the scheduler (kernels/include/attn_backend/scheduler.h) over the
// tile facts of the kernel configurations a wrapper was built for, writing the plan
// buffers into the wrapper's host staging buffer (one host-to-device copy follows) and
// returning the plan-info record that run() takes. Also the facts of the compiled
// configurations, for the Python wrappers.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "attn_backend/plan_info.h"
#include "attn_backend/scheduler.h"
#include "kernel_registry.h"

namespace attn_backend {
namespace {

scheduler::TileShape tile_shape(int64_t config_id) {
  const KernelConfig& config = kernel_config(config_id);
  return {config.tile_rows, config.kv_tile_tokens, config.partial_tokens()};
}

// Workspace regions start on 256-byte boundaries: a partial state's rows and the merge
// counters (atomics) never share a cache line with another region.
int64_t align_region(int64_t bytes) { return (bytes + 255) / 256 * 256; }

// Fills the layout fields of `setup` (its family, head counts, sizes, options and
// configurations already set): buffer capacities that any batch up to the wrapper's
// maxima fits, and where each buffer sits in the workspace.
std::vector<int64_t> plan_setup(at::IntArrayRef setup) {
  PlanInfo info = read_plan_info(setup, "plan_setup");
  TORCH_CHECK(info.num_kv_heads > 0 && info.group_size > 0 && info.max_batch > 0 &&
                  info.cta_slots > 0,
              "plan_setup: num_kv_heads, group_size, max_batch and cta_slots must be positive");
  const bool prefill = info.kernel_family() == KernelFamily::kPrefill;
  std::vector<std::pair<int64_t, int64_t>> configs{{info.config_id, info.cta_slots}};
  if (info.alt_config_id >= 0) configs.emplace_back(info.alt_config_id, info.alt_cta_slots);
  if (info.narrow_config_id >= 0) {
    TORCH_CHECK(prefill, "plan_setup: a narrow short-query shape is a prefill plan's only");
    configs.emplace_back(info.narrow_config_id, info.narrow_cta_slots);
  }
  int64_t work = 0, partials = 0, merge_groups = 0, partial_rows = 0;
  for (const auto& [id, slots] : configs) {
    const KernelConfig& config = kernel_config(id);
    TORCH_CHECK(config.family == info.kernel_family() &&
                    config.head_dim_vo == info.head_dim_vo,
                "plan_setup: configuration ", id, " (", config.name, ") does not fit the wrapper");
    TORCH_CHECK(slots > 0, "plan_setup: CTA slots must be positive");
    const scheduler::TileShape shape = tile_shape(id);
    if (prefill) {
      TORCH_CHECK(info.max_num_tokens > 0, "plan_setup: max_num_tokens must be positive");
      work = std::max(work, scheduler::prefill_grid_size(info.max_num_tokens, info.max_batch,
                                                         info.group_size, shape,
                                                         info.num_kv_heads, slots));
      partials = std::max(partials, scheduler::max_prefill_partials(info.num_kv_heads, slots));
      partial_rows = std::max(partial_rows, shape.rows);
    } else {
      const int64_t items = scheduler::max_decode_items(info.max_batch, info.num_kv_heads,
                                                        info.group_size, shape, slots);
      work = std::max(work, items);
      partials = std::max(partials, items);
      merge_groups = std::max(
          merge_groups, info.max_batch * scheduler::decode_row_tiles(info.group_size, shape.rows));
      partial_rows = std::max(partial_rows, std::min(info.group_size, shape.rows));
    }
  }
  if (prefill) merge_groups = partials;  // a split tile has at least two partials
  info.work_capacity = work;
  info.work_record_ints = kWorkRecordInts;
  info.partial_capacity = partials;
  info.merge_group_capacity = merge_groups;
  info.partial_row_capacity = partial_rows;
  int64_t offset = 0;
  auto place = [&](int64_t bytes) {
    const int64_t at = offset;
    offset = align_region(offset + bytes);
    return at;
  };
  info.schedule_offset = place(work * kWorkRecordInts * 4);
  info.merge_indptr_offset = place((merge_groups + 1) * 4);
  info.request_info_offset = prefill ? place(3 * info.max_batch * 4) : -1;
  info.mask_offsets_offset = prefill ? place(info.max_batch * 8) : -1;
  info.upload_bytes = offset;
  info.merge_counters_offset = place(merge_groups * info.num_kv_heads * 4);
  const int64_t partial_slots = partials * info.num_kv_heads * partial_rows;
  info.partial_lse_offset = place(partial_slots * 4);
  info.partial_out_offset = place(partial_slots * info.head_dim_vo * 4);
  info.workspace_bytes = offset;
  info.planned_config_id = -1;
  return info.to_vector();
}

void check_host_lengths(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 &&
                  t.is_contiguous(),
              name, " must be a contiguous int64 CPU vector");
}

uint8_t* staging(const at::Tensor& host_plan, const PlanInfo& info) {
  TORCH_CHECK(host_plan.device().is_cpu() && host_plan.scalar_type() == at::kByte &&
                  host_plan.is_contiguous() && host_plan.numel() >= info.upload_bytes,
              "host_plan must be the wrapper's contiguous uint8 CPU staging buffer of ",
              info.upload_bytes, " bytes");
  return host_plan.data_ptr<uint8_t>();
}

scheduler::WorkListBuffers work_list(uint8_t* host, const PlanInfo& info) {
  return {reinterpret_cast<int32_t*>(host + info.schedule_offset), info.work_capacity,
          reinterpret_cast<int32_t*>(host + info.merge_indptr_offset),
          info.merge_group_capacity + 1};
}

// The grid and the plan fields of `info` for `summary`; graph-sized grids get their unused
// columns marked.
void finish_plan(PlanInfo& info, const scheduler::ScheduleSummary& summary, int64_t config_id,
                 int64_t grid, const scheduler::WorkListBuffers& out) {
  TORCH_CHECK(summary.num_items <= grid && grid <= info.work_capacity, "the schedule of ",
              summary.num_items, " items does not fit its grid of ", grid, " (capacity ",
              info.work_capacity, ")");
  TORCH_CHECK(summary.num_partials <= info.partial_capacity, "the schedule needs ",
              summary.num_partials, " partial states; capacity ", info.partial_capacity);
  scheduler::mark_unused(out, summary.num_items, grid);
  info.planned_config_id = config_id;
  info.num_work_items = grid;
  info.num_items = summary.num_items;
  info.num_tiles = summary.num_tiles;
  info.num_partials = summary.num_partials;
  info.num_merge_groups = summary.num_merge_groups;
  info.chunk_tokens = summary.chunk_tokens;
}

// One query token per request; kv_lens counts each request's keys, its new token included.
std::vector<int64_t> plan_decode(const at::Tensor& kv_lens, int64_t window_left,
                                 at::IntArrayRef plan_info, at::Tensor& host_plan) {
  PlanInfo info = read_plan_info(plan_info, "plan_decode");
  TORCH_CHECK(info.kernel_family() == KernelFamily::kDecode, "plan_decode: a prefill plan_info");
  check_host_lengths(kv_lens, "kv_lens");
  const int64_t batch = kv_lens.numel();
  TORCH_CHECK(batch >= 1 && batch <= info.max_batch, "plan_decode: ", batch,
              " requests; the wrapper holds 1..", info.max_batch);
  const int64_t* lens = kv_lens.data_ptr<int64_t>();
  // The full-batch shape once whole requests fill the split shape's CTA slots; the choice
  // depends on the batch size only, so a CUDA graph keeps its kernel across replays.
  const int64_t row_tiles = scheduler::decode_row_tiles(info.group_size, tile_shape(info.config_id).rows);
  const bool full_batch =
      info.alt_config_id >= 0 && batch * info.num_kv_heads * row_tiles >= info.cta_slots;
  const int64_t config_id = full_batch ? info.alt_config_id : info.config_id;
  const int64_t slots = full_batch ? info.alt_cta_slots : info.cta_slots;
  const scheduler::TileShape shape = tile_shape(config_id);
  uint8_t* host = staging(host_plan, info);
  const scheduler::WorkListBuffers out = work_list(host, info);
  const scheduler::ScheduleSummary summary = scheduler::plan_decode(
      lens, batch, window_left, info.num_kv_heads, info.group_size, shape, slots, out);
  const int64_t grid = info.use_cuda_graph ? scheduler::max_decode_items(
                                                 batch, info.num_kv_heads, info.group_size, shape, slots)
                                           : summary.num_items;
  finish_plan(info, summary, config_id, grid, out);
  info.partial_rows = std::min(info.group_size, shape.rows);
  info.batch = batch;
  info.num_query_rows = batch;
  info.max_kv_len = *std::max_element(lens, lens + batch);
  info.causal = 1;
  info.window_left = window_left;
  info.has_mask = 0;
  return info.to_vector();
}

// Ragged queries: request r's queries are rows [qo_indptr[r], qo_indptr[r + 1]) of q, the
// last of its kv_lens[r] keys. `graph_num_tokens` (CUDA-graph wrappers): the query tokens
// the graph's grid is sized for. Custom-mask offsets: mask_indptr, or the blocks
// [q_len, kv_len] back to back.
std::vector<int64_t> plan_prefill(const at::Tensor& qo_indptr, const at::Tensor& kv_lens,
                                  const std::optional<at::Tensor>& mask_indptr, bool causal,
                                  int64_t window_left, bool has_mask, int64_t graph_num_tokens,
                                  at::IntArrayRef plan_info, at::Tensor& host_plan) {
  PlanInfo info = read_plan_info(plan_info, "plan_prefill");
  TORCH_CHECK(info.kernel_family() == KernelFamily::kPrefill, "plan_prefill: a decode plan_info");
  check_host_lengths(qo_indptr, "qo_indptr");
  check_host_lengths(kv_lens, "kv_lens");
  const int64_t batch = kv_lens.numel();
  TORCH_CHECK(batch >= 1 && batch <= info.max_batch && qo_indptr.numel() == batch + 1,
              "plan_prefill: ", batch, " requests (wrapper: 1..", info.max_batch,
              ") with qo_indptr of batch + 1 entries");
  const int64_t* qo = qo_indptr.data_ptr<int64_t>();
  const int64_t* lens = kv_lens.data_ptr<int64_t>();
  const int64_t num_tokens = qo[batch];
  const int64_t grid_tokens = info.use_cuda_graph ? graph_num_tokens : num_tokens;
  TORCH_CHECK(num_tokens <= grid_tokens && grid_tokens <= info.max_num_tokens, "plan_prefill: ",
              num_tokens, " query tokens (grid ", grid_tokens, "); the wrapper holds ",
              info.max_num_tokens);
  // A tile never spans requests: batches whose requests have at most a short shape's rows
  // take it (with graphs: the rows per request of the captured tokens, fixed per graph), the
  // narrowest that holds them, else the long-query shape, which reads each K/V tile for more
  // rows. The tiers are the wrapper's configurations: head dim 128 has the 16-row key-split
  // tiles (a verify of 4 drafts x group 4), then the 64-row short tile (several 16-row tiles
  // per request read the same keys once each: at 32 and 64 rows the 64-row tile is faster;
  // bench/NOTES.md, session 18); MLA's latent rows on sm_90 the 16-row mma.sync kernel, then
  // the 64-row warpgroup one of 32-key tiles, then the seesaw one (session 23).
  int64_t config_id = info.config_id, slots = info.cta_slots;
  if (info.alt_config_id >= 0 || info.narrow_config_id >= 0) {
    int64_t rows_per_request = 0;
    if (info.use_cuda_graph) {
      rows_per_request = scheduler::ceil_div(grid_tokens, batch) * info.group_size;
    } else {
      for (int64_t r = 0; r < batch; ++r) {
        rows_per_request = std::max(rows_per_request, (qo[r + 1] - qo[r]) * info.group_size);
      }
    }
    const std::pair<int64_t, int64_t> narrowest_first[] = {
        {info.narrow_config_id, info.narrow_cta_slots}, {info.alt_config_id, info.alt_cta_slots}};
    for (const auto& [id, id_slots] : narrowest_first) {
      if (id >= 0 && rows_per_request <= tile_shape(id).rows) {
        config_id = id;
        slots = id_slots;
        break;
      }
    }
  }
  const scheduler::TileShape shape = tile_shape(config_id);
  uint8_t* host = staging(host_plan, info);
  const scheduler::WorkListBuffers out = work_list(host, info);
  const scheduler::ScheduleSummary summary =
      scheduler::plan_prefill(qo, lens, batch, causal, window_left, has_mask, info.num_kv_heads,
                              info.group_size, shape, slots, out);
  const int64_t grid = info.use_cuda_graph
                           ? scheduler::prefill_grid_size(grid_tokens, batch, info.group_size,
                                                          shape, info.num_kv_heads, slots)
                           : summary.num_items;
  finish_plan(info, summary, config_id, grid, out);
  int32_t* requests = reinterpret_cast<int32_t*>(host + info.request_info_offset);
  int64_t* mask_offsets = reinterpret_cast<int64_t*>(host + info.mask_offsets_offset);
  const int64_t* given_offsets = nullptr;
  if (mask_indptr.has_value()) {
    check_host_lengths(*mask_indptr, "mask_indptr");
    TORCH_CHECK(mask_indptr->numel() >= batch, "mask_indptr needs one offset per request");
    given_offsets = mask_indptr->data_ptr<int64_t>();
  }
  int64_t mask_offset = 0, max_kv_len = 0;
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t q_len = qo[r + 1] - qo[r];
    requests[r] = static_cast<int32_t>(qo[r]);
    requests[info.max_batch + r] = static_cast<int32_t>(q_len);
    requests[2 * info.max_batch + r] = static_cast<int32_t>(lens[r]);
    if (has_mask) {
      mask_offsets[r] = given_offsets != nullptr ? given_offsets[r] : mask_offset;
      mask_offset += q_len * lens[r];
    }
    max_kv_len = std::max(max_kv_len, lens[r]);
  }
  info.partial_rows = shape.rows;
  info.batch = batch;
  info.num_query_rows = num_tokens;
  info.max_kv_len = max_kv_len;
  info.causal = causal ? 1 : 0;
  info.window_left = window_left;
  info.has_mask = has_mask ? 1 : 0;
  return info.to_vector();
}

std::vector<std::string> plan_info_fields() { return PlanInfo::field_names(); }

std::vector<std::string> kernel_config_names() {
  std::vector<std::string> names;
  for (const KernelConfig& config : kernel_configs()) names.push_back(config.name);
  return names;
}

std::vector<std::string> kernel_config_fields() { return KernelConfig::fact_names(); }

std::vector<int64_t> kernel_config_facts(int64_t id) { return kernel_config(id).facts(); }

}  // namespace
}  // namespace attn_backend

TORCH_LIBRARY_IMPL(attn_backend, CPU, m) {
  m.impl("plan_decode", &attn_backend::plan_decode);
  m.impl("plan_prefill", &attn_backend::plan_prefill);
}

TORCH_LIBRARY_IMPL(attn_backend, CompositeExplicitAutograd, m) {
  m.impl("plan_setup", &attn_backend::plan_setup);
  m.impl("plan_info_fields", &attn_backend::plan_info_fields);
  m.impl("kernel_config_names", &attn_backend::kernel_config_names);
  m.impl("kernel_config_fields", &attn_backend::kernel_config_fields);
  m.impl("kernel_config_facts", &attn_backend::kernel_config_facts);
}
