// The layout of a plan's work list, shared by the host planner (scheduler.h), which writes
// it, and the kernels (common/work_item.cuh), which read it: one record of kWorkRecordInts
// int32 per work item (32 bytes, one memory sector), fields in this order. A CTA loads its
// record with two vector loads at its start, so the test of its request and the key range
// its first loads need arrive in one round trip.
#pragma once

namespace attn_backend {

enum WorkField : int {
  kWorkRequest = 0,     // -1: an unused item of a graph-sized grid
  kWorkRowStart = 1,    // first packed query row (token * group + head in group) of the tile
  kWorkKvStart = 2,     // the tile's keys [kv_start, kv_end)
  kWorkKvEnd = 3,
  kWorkPartial = 4,     // -1: the item writes the output; else the index of its partial state
  kWorkMergeGroup = 5,  // a split tile's index into merge_indptr and the merge counters, or -1
  kWorkFields = 6,
  kWorkRecordInts = 8,  // the fields, padded to 32 bytes
};

}  // namespace attn_backend
