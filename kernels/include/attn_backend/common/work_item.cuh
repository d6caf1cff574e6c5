// What one CTA does, as the plan wrote it (kernels/include/attn_backend/scheduler.h):
// a tile of packed query rows of one request, for one kv head, over a range of its keys.
#pragma once

#include <cstdint>

namespace attn_backend {

// Rows of the plan's work list, in this order, each `capacity` entries long.
enum WorkListRow : int {
  kWorkRequest = 0,     // -1: an unused slot of a graph-sized grid
  kWorkRowStart = 1,    // first packed query row (token * group + head in group) of the tile
  kWorkKvStart = 2,     // the tile's keys [kv_start, kv_end)
  kWorkKvEnd = 3,
  kWorkPartial = 4,     // -1: the item writes the output; else the index of its partial state
  kWorkMergeGroup = 5,  // a split tile's index into merge_indptr and the merge counters, or -1
  kWorkListRows = 6,
};

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
// what the last plan() copied there).
struct WorkList {
  const int32_t* rows;  // [kWorkListRows, capacity]
  int capacity;
  int num_items;  // columns the launch covers (the grid may round up past them)

  // -1 for an unused item (a graph-sized grid's padding, or past num_items).
  __device__ __forceinline__ int request(int item) const {
    return item < num_items ? rows[item] : -1;
  }
  __device__ __forceinline__ WorkItem operator[](int item) const {
    const int32_t* column = rows + item;
    return {column[0],
            column[kWorkRowStart * capacity],
            column[kWorkKvStart * capacity],
            column[kWorkKvEnd * capacity],
            column[kWorkPartial * capacity],
            column[kWorkMergeGroup * capacity]};
  }
};

}  // namespace attn_backend
