// The plan-info record: what plan() decided and where it put it, passed to every run() as
// a list of integers (like FlashInfer's plan_info_vec). Host code only.
//
// The layout fields are fixed when a wrapper is built (plan_setup: buffer capacities and
// where each plan buffer sits in the wrapper's one device workspace); the plan fields are
// written by each plan() (scheduler.h). The run op reads the record back, checks it against
// the workspace it was given, and launches the kernel configuration it names.
//
// Workspace (bytes, regions 256-byte aligned): the upload region, copied from the host by
// each plan() as one block, holds the work list [work_capacity, work_record_ints] (int32
// records, work_record.h), merge_indptr [merge_group_capacity + 1] (int32), the request info
// [3, max_batch] (int32: qo_start, q_len, kv_len; prefill) and the custom-mask offsets
// [max_batch] (int64; prefill); after it,
// on the device only: the merge counters [merge_group_capacity, num_kv_heads] (int32, zeros
// between launches), partial_lse and partial_out (float32).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace attn_backend {

enum class KernelFamily : int64_t { kDecode = 0, kPrefill = 1 };

#define ATTN_BACKEND_PLAN_INFO_FIELDS(X)                                                    \
  /* layout: fixed per wrapper */                                                           \
  X(family)                /* KernelFamily */                                               \
  X(num_kv_heads)                                                                           \
  X(group_size)                                                                             \
  X(head_dim_vo)                                                                            \
  X(max_batch)                                                                              \
  X(max_num_tokens)        /* prefill: query tokens the buffers hold */                     \
  X(use_cuda_graph)        /* grids sized by the batch, not by the lengths */               \
  X(enable_pdl)                                                                             \
  X(config_id)             /* decode: the split shape; prefill: the long-query shape */     \
  X(cta_slots)             /* CTAs of config_id the GPU runs at once */                     \
  X(alt_config_id)         /* decode: full-batch shape; prefill: short-query shape; or -1 */\
  X(alt_cta_slots)                                                                          \
  X(narrow_config_id)      /* prefill: key-split short shape for requests of <= its rows; -1 */\
  X(narrow_cta_slots)                                                                       \
  X(work_capacity)                                                                          \
  X(work_record_ints)      /* int32 per work-list record (work_record.h) */                 \
  X(partial_capacity)      /* partial states per kv head */                                 \
  X(merge_group_capacity)                                                                   \
  X(partial_row_capacity)  /* rows per partial state the buffers hold */                    \
  X(schedule_offset)                                                                        \
  X(merge_indptr_offset)                                                                    \
  X(request_info_offset)   /* -1: none (decode) */                                          \
  X(mask_offsets_offset)   /* -1: none (decode) */                                          \
  X(upload_bytes)                                                                           \
  X(merge_counters_offset)                                                                  \
  X(partial_lse_offset)                                                                     \
  X(partial_out_offset)                                                                     \
  X(workspace_bytes)                                                                        \
  /* plan: written by each plan() */                                                        \
  X(planned_config_id)     /* the configuration the schedule was cut for, -1 unplanned */   \
  X(num_work_items)        /* grid columns (graph-sized in CUDA-graph mode) */              \
  X(num_items)             /* items of the schedule */                                      \
  X(num_tiles)                                                                              \
  X(num_partials)                                                                           \
  X(num_merge_groups)                                                                       \
  X(partial_rows)          /* rows per partial state of this schedule */                    \
  X(chunk_tokens)          /* the split-KV chunk, in keys */                                \
  X(batch)                                                                                  \
  X(num_query_rows)        /* rows of q the plan reads: batch (decode) or query tokens */   \
  X(max_kv_len)            /* the longest request's keys: page-table columns it needs */    \
  X(causal)                                                                                 \
  X(window_left)                                                                            \
  X(has_mask)

struct PlanInfo {
#define ATTN_BACKEND_DECLARE_FIELD(name) int64_t name = 0;
  ATTN_BACKEND_PLAN_INFO_FIELDS(ATTN_BACKEND_DECLARE_FIELD)
#undef ATTN_BACKEND_DECLARE_FIELD

#define ATTN_BACKEND_COUNT_FIELD(name) +1
  static constexpr size_t kNumFields = 0 ATTN_BACKEND_PLAN_INFO_FIELDS(ATTN_BACKEND_COUNT_FIELD);
#undef ATTN_BACKEND_COUNT_FIELD

  static std::vector<std::string> field_names() {
    return {
#define ATTN_BACKEND_FIELD_NAME(name) #name,
        ATTN_BACKEND_PLAN_INFO_FIELDS(ATTN_BACKEND_FIELD_NAME)
#undef ATTN_BACKEND_FIELD_NAME
    };
  }

  std::vector<int64_t> to_vector() const {
    return {
#define ATTN_BACKEND_FIELD_VALUE(name) name,
        ATTN_BACKEND_PLAN_INFO_FIELDS(ATTN_BACKEND_FIELD_VALUE)
#undef ATTN_BACKEND_FIELD_VALUE
    };
  }

  // False when the record has the wrong length (the record of another build).
  static bool from_values(const int64_t* values, size_t count, PlanInfo& info) {
    if (count != kNumFields) return false;
    size_t i = 0;
#define ATTN_BACKEND_FIELD_READ(name) info.name = values[i++];
    ATTN_BACKEND_PLAN_INFO_FIELDS(ATTN_BACKEND_FIELD_READ)
#undef ATTN_BACKEND_FIELD_READ
    return true;
  }

  KernelFamily kernel_family() const { return static_cast<KernelFamily>(family); }
};

}  // namespace attn_backend
