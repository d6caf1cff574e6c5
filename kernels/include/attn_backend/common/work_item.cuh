// What one CTA does, as the plan wrote it (kernels/include/attn_backend/scheduler.h):
// a tile of packed query rows of one request, for one kv head, over a range of its keys.
#pragma once

#include <cstdint>

#include "attn_backend/work_record.h"

namespace attn_backend {

struct WorkItem {
  int request;
  int row_start;
  int kv_start;
  int kv_end;
  int partial;
  int merge_group;

  __device__ __forceinline__ bool writes_partial() const { return partial >= 0; }
};

// The plan's work list in a fixed-capacity device buffer (CUDA-graph safe: a replay reads
// what the last plan() copied there): records of work_record.h's layout.
struct WorkList {
  const int32_t* records;  // [capacity, kWorkRecordInts], 32-byte aligned
  int num_items;  // items the launch covers (the grid may round up past them)

  // False past num_items (a graph-sized grid's padding).
  __device__ __forceinline__ bool holds(int item) const { return item < num_items; }

  // Read-only during the kernel (plan() writes it with a copy before), so through the
  // non-coherent path; both halves of the record come from one sector.
  __device__ __forceinline__ WorkItem operator[](int item) const {
    const int32_t* record = records + static_cast<int64_t>(item) * kWorkRecordInts;
    const int4 range = __ldg(reinterpret_cast<const int4*>(record));
    const int2 split = __ldg(reinterpret_cast<const int2*>(record + kWorkPartial));
    static_assert(kWorkRowStart == 1 && kWorkKvStart == 2 && kWorkKvEnd == 3 &&
                      kWorkMergeGroup == kWorkPartial + 1 && kWorkPartial % 2 == 0,
                  "the record's fields as the vector loads take them");
    return {range.x, range.y, range.z, range.w, split.x, split.y};
  }
};

}  // namespace attn_backend
