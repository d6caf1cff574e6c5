// The host-side planner: which CTA computes which rows of which request over which keys.
// Host C++ only, framework-free; kernels/csrc/plan_ops.cpp binds it as plan() runs it.
// attn_backend/schedule.py is its specification in numpy (the tests compare the two item
// for item). The tile facts (rows and keys per tile) and the CTA slots come from the
// kernel configuration being planned for, never from constants here.
//
// A tile is `rows` packed query rows (token * group + head in group) of one request; its
// keys are the ones some row of it can see. When the tiles underfill the GPU the plan cuts
// their key ranges into chunks, whole K/V tiles each, so that the CTAs come out in
// near-whole waves: the chunk minimises the estimated makespan
//
//     waves(c) * (average item length + per-item overhead),  waves = ceil(CTAs(c) / slots)
//
// bounded below by one chunk. A split tile is a merge group: its chunks write partial
// states [merge_indptr[g], merge_indptr[g + 1]) that its last chunk merges. Items are
// ordered longest first, so the hardware's in-order CTA dispatch balances unequal work.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "attn_backend/work_record.h"

namespace attn_backend {
namespace scheduler {

// A CTA's fixed cost (pipeline fill, epilogue) in keys of streaming.
constexpr int64_t kItemOverheadTokens = 64;
constexpr int64_t kMaxSplitsConsidered = 128;

struct TileShape {
  int64_t rows;       // packed query rows per tile
  int64_t kv_tokens;  // keys per K/V tile: the chunk granularity and the smallest chunk
  // A split tile's partial state in keys of streaming (its bytes over a key row's), where the
  // split's own cost enters the chunk choice (0: it does not; see choose_chunk).
  int64_t partial_tokens = 0;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The chunk (keys) with the smallest estimated makespan for pieces of `lengths` keys, each
// chunk `ctas_per_chunk` CTAs, at most `max_chunks` chunks in all (one per length always fits).
// With partial_tokens > 0 a split also costs its partial states: each chunk writes one (that
// many keys of streaming), and the longest range's last chunk merges all of its own, at
// about 2/5 of that per partial (an estimate: the merge reads them from L2 with 8 loads of
// 16 bytes in flight per thread, about 2.5x a CTA's share of the DRAM stream at L2 latency).
// MLA's 512-wide partials make this the cost that bounds its splits; the other kernels' small
// partials plan with 0 until a before/after on the GPU says otherwise.
inline int64_t choose_chunk(const std::vector<int64_t>& lengths, int64_t ctas_per_chunk,
                            int64_t cta_slots, int64_t max_chunks, int64_t tile_tokens,
                            int64_t partial_tokens = 0) {
  int64_t longest = 0, total = 0;
  for (int64_t n : lengths) {
    longest = std::max(longest, n);
    total += n;
  }
  if (longest <= tile_tokens) return std::max<int64_t>(longest, 1);
  // A chunk c makes at least total / c items, so more than longest * max_chunks / total
  // splits of the longest length cannot fit: at large batches few candidates remain.
  const int64_t max_splits = std::min({kMaxSplitsConsidered, longest / tile_tokens,
                                       longest * max_chunks / std::max<int64_t>(total, 1)});
  std::vector<int64_t> chunks;  // descending, unique, >= one tile
  for (int64_t splits = 1; splits <= std::max<int64_t>(max_splits, 1); ++splits) {
    const int64_t chunk = ceil_div(ceil_div(longest, splits), tile_tokens) * tile_tokens;
    if (chunk >= tile_tokens && (chunks.empty() || chunk < chunks.back())) chunks.push_back(chunk);
  }
  if (chunks.empty() || chunks.front() < longest) chunks.insert(chunks.begin(), longest);
  int64_t best_chunk = chunks.front();
  double best_estimate = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    int64_t items = 0;
    for (int64_t n : lengths) items += std::max<int64_t>(1, ceil_div(n, chunks[i]));
    if (i > 0 && items > max_chunks) continue;
    const int64_t waves = ceil_div(items * ctas_per_chunk, cta_slots);
    const double average = static_cast<double>(total) / static_cast<double>(items);
    const int64_t splits = ceil_div(longest, chunks[i]);
    const int64_t write = splits > 1 ? partial_tokens : 0;
    const int64_t merge = splits > 1 ? 2 * partial_tokens * splits / 5 : 0;
    const double estimate =
        std::max(static_cast<double>(waves) * (average + kItemOverheadTokens + write),
                 static_cast<double>(chunks[i] + kItemOverheadTokens + write)) +
        static_cast<double>(merge);
    if (i == 0 || estimate < best_estimate) {  // the first (largest) chunk wins ties
      best_estimate = estimate;
      best_chunk = chunks[i];
    }
  }
  return best_chunk;
}

// ---- capacities: what any batch of a given size can need (sizes buffers and graph grids) ----

// Row tiles of one decode request: its group's heads in tiles of `tile_rows`.
inline int64_t decode_row_tiles(int64_t group_size, int64_t tile_rows) {
  return ceil_div(group_size, tile_rows);
}

// Chunks (of requests) a decode schedule may cut: two per request plus four waves' worth.
inline int64_t max_decode_chunks(int64_t batch, int64_t num_kv_heads, int64_t row_tiles,
                                 int64_t cta_slots) {
  return 2 * batch + 4 * ceil_div(cta_slots, num_kv_heads * row_tiles);
}

inline int64_t max_decode_items(int64_t batch, int64_t num_kv_heads, int64_t group_size,
                                const TileShape& shape, int64_t cta_slots) {
  const int64_t row_tiles = decode_row_tiles(group_size, shape.rows);
  return max_decode_chunks(batch, num_kv_heads, row_tiles, cta_slots) * row_tiles;
}

// Partial states per kv head of a prefill schedule: split-KV only fills the GPU, so about
// two waves' worth.
inline int64_t max_prefill_partials(int64_t num_kv_heads, int64_t cta_slots) {
  return 2 * ceil_div(cta_slots, num_kv_heads);
}

inline int64_t max_prefill_tiles(int64_t num_tokens, int64_t batch, int64_t group_size,
                                 const TileShape& shape) {
  return ceil_div(num_tokens * group_size, shape.rows) + batch;
}

inline int64_t prefill_grid_size(int64_t num_tokens, int64_t batch, int64_t group_size,
                                 const TileShape& shape, int64_t num_kv_heads, int64_t cta_slots) {
  return max_prefill_tiles(num_tokens, batch, group_size, shape) +
         max_prefill_partials(num_kv_heads, cta_slots);
}

// ---- schedules ---------------------------------------------------------------------------

// Where a schedule goes: the work list rows [6, capacity] (request, row_start, kv_start,
// kv_end, partial, merge_group) and merge_indptr.
struct WorkListBuffers {
  int32_t* records;  // [capacity, kWorkRecordInts] (work_record.h)
  int64_t capacity;
  int32_t* merge_indptr;
  int64_t merge_indptr_capacity;

  void write(int64_t item, int64_t request, int64_t row_start, int64_t kv_start, int64_t kv_end,
             int64_t partial, int64_t merge_group) const {
    int32_t* record = records + item * kWorkRecordInts;
    record[kWorkRequest] = static_cast<int32_t>(request);
    record[kWorkRowStart] = static_cast<int32_t>(row_start);
    record[kWorkKvStart] = static_cast<int32_t>(kv_start);
    record[kWorkKvEnd] = static_cast<int32_t>(kv_end);
    record[kWorkPartial] = static_cast<int32_t>(partial);
    record[kWorkMergeGroup] = static_cast<int32_t>(merge_group);
    for (int f = kWorkFields; f < kWorkRecordInts; ++f) record[f] = 0;
  }
};

struct ScheduleSummary {
  int64_t num_items = 0;
  int64_t num_tiles = 0;
  int64_t num_partials = 0;
  int64_t num_merge_groups = 0;
  int64_t chunk_tokens = 0;
};

// Marks the columns [from, to) of a graph-sized grid unused (request -1).
inline void mark_unused(const WorkListBuffers& out, int64_t from, int64_t to) {
  for (int64_t i = from; i < to; ++i) {
    out.write(i, -1, 0, 0, 0, -1, -1);
  }
}

namespace detail {

// Keys [kv_start, kv_end) that `row_tiles` consecutive row tiles of a request share,
// starting at packed row row_start (a prefill tile: one row tile; a decode request: its
// group's row tiles).
struct KeyRange {
  int64_t request;
  int64_t row_start;
  int64_t kv_start;
  int64_t kv_end;
};

struct Piece {
  int64_t range;  // index into the key ranges
  int64_t start;  // keys [start, end)
  int64_t end;
  int64_t index;  // chunk index within its range
};

// Cuts each key range into chunks of at most `chunk` keys (an empty range still gets one)
// and writes one item per chunk and row tile: longest first, equal lengths in range order
// (numpy's stable argsort), the row tiles of a chunk adjacent. Each row tile of a split
// range is a merge group (in range order) with its chunks' partials in merge_indptr.
inline ScheduleSummary schedule_ranges(const std::vector<KeyRange>& ranges, int64_t row_tiles,
                                       int64_t tile_rows, int64_t chunk,
                                       const WorkListBuffers& out) {
  const int64_t num_ranges = static_cast<int64_t>(ranges.size());
  std::vector<int64_t> first_group(num_ranges, -1);
  std::vector<Piece> pieces;
  pieces.reserve(num_ranges + 8);
  int64_t groups = 0, partials = 0;
  if (out.merge_indptr_capacity < 1) throw std::length_error("merge_indptr has no room");
  out.merge_indptr[0] = 0;
  for (int64_t r = 0; r < num_ranges; ++r) {
    const KeyRange& range = ranges[r];
    const int64_t count = std::max<int64_t>(1, ceil_div(range.kv_end - range.kv_start, chunk));
    for (int64_t i = 0; i < count; ++i) {
      const int64_t start = range.kv_start + i * chunk;
      pieces.push_back({r, start, std::min(start + chunk, range.kv_end), i});
    }
    if (count == 1) continue;
    if (groups + row_tiles + 1 > out.merge_indptr_capacity) {
      throw std::length_error("the schedule's merge groups exceed merge_indptr's capacity of " +
                              std::to_string(out.merge_indptr_capacity - 1));
    }
    first_group[r] = groups;
    for (int64_t t = 0; t < row_tiles; ++t) {
      partials += count;
      out.merge_indptr[++groups] = static_cast<int32_t>(partials);
    }
  }
  std::stable_sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) {
    return a.end - a.start > b.end - b.start;
  });
  const int64_t num_items = static_cast<int64_t>(pieces.size()) * row_tiles;
  if (num_items > out.capacity) {
    throw std::length_error("the schedule's " + std::to_string(num_items) +
                            " work items exceed the work list's capacity of " +
                            std::to_string(out.capacity));
  }
  int64_t i = 0;
  for (const Piece& piece : pieces) {
    const KeyRange& range = ranges[piece.range];
    for (int64_t t = 0; t < row_tiles; ++t, ++i) {
      const int64_t group = first_group[piece.range] < 0 ? -1 : first_group[piece.range] + t;
      out.write(i, range.request, range.row_start + t * tile_rows, piece.start, piece.end,
                group < 0 ? -1 : out.merge_indptr[group] + piece.index, group);
    }
  }
  ScheduleSummary summary;
  summary.num_items = num_items;
  summary.num_tiles = num_ranges * row_tiles;
  summary.num_partials = partials;
  summary.num_merge_groups = groups;
  summary.chunk_tokens = chunk;
  return summary;
}

}  // namespace detail

// One query per request over its keys [kv_len - 1 - window_left, kv_len) (all of them
// without a window); the group's heads in row tiles of shape.rows, the row tiles of a
// chunk adjacent items (they read the same keys at about the same time, from L2).
inline ScheduleSummary plan_decode(const int64_t* kv_lens, int64_t batch, int64_t window_left,
                                   int64_t num_kv_heads, int64_t group_size,
                                   const TileShape& shape, int64_t cta_slots,
                                   const WorkListBuffers& out) {
  const int64_t row_tiles = decode_row_tiles(group_size, shape.rows);
  std::vector<detail::KeyRange> ranges(batch);
  std::vector<int64_t> lengths(batch);
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t start = window_left < 0 ? 0 : std::max<int64_t>(kv_lens[r] - 1 - window_left, 0);
    ranges[r] = {r, 0, start, kv_lens[r]};
    lengths[r] = kv_lens[r] - start;
  }
  const int64_t chunk =
      choose_chunk(lengths, num_kv_heads * row_tiles, cta_slots,
                   max_decode_chunks(batch, num_kv_heads, row_tiles, cta_slots), shape.kv_tokens,
                   shape.partial_tokens);
  return detail::schedule_ranges(ranges, row_tiles, shape.rows, chunk, out);
}

// Ragged queries: request r's q_len = qo_indptr[r + 1] - qo_indptr[r] queries are the last
// of its kv_len keys. A tile's keys are those some row of it can see (causal: up to its last
// query; a window: from its first query's window start; a custom mask: all). Split-KV only
// when the tiles' CTAs underfill the GPU.
inline ScheduleSummary plan_prefill(const int64_t* qo_indptr, const int64_t* kv_lens,
                                    int64_t batch, bool causal, int64_t window_left,
                                    bool has_mask, int64_t num_kv_heads, int64_t group_size,
                                    const TileShape& shape, int64_t cta_slots,
                                    const WorkListBuffers& out) {
  std::vector<detail::KeyRange> tiles;
  tiles.reserve(batch);
  int64_t longest = 0;
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t q_len = qo_indptr[r + 1] - qo_indptr[r];
    const int64_t kv_len = kv_lens[r];
    const int64_t offset = kv_len - q_len;  // query i sits at position offset + i
    const int64_t count = ceil_div(q_len * group_size, shape.rows);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t row_start = k * shape.rows;
      const int64_t first_token = row_start / group_size;
      const int64_t last_token = std::min(q_len - 1, (row_start + shape.rows - 1) / group_size);
      const int64_t kv_end = causal && !has_mask ? offset + last_token + 1 : kv_len;
      const int64_t kv_start =
          window_left >= 0 ? std::max<int64_t>(offset + first_token - window_left, 0) : 0;
      tiles.push_back({r, row_start, kv_start, kv_end});
      longest = std::max(longest, kv_end - kv_start);
    }
  }
  const int64_t num_tiles = static_cast<int64_t>(tiles.size());
  int64_t chunk = std::max<int64_t>(1, longest);  // one item per tile
  if (num_tiles > 0 && num_tiles * num_kv_heads < cta_slots) {
    // Fewer CTAs than the GPU holds: cut the kv ranges, as decode does.
    std::vector<int64_t> lengths(num_tiles);
    for (int64_t t = 0; t < num_tiles; ++t) lengths[t] = tiles[t].kv_end - tiles[t].kv_start;
    chunk = choose_chunk(lengths, num_kv_heads, cta_slots,
                         max_prefill_partials(num_kv_heads, cta_slots), shape.kv_tokens,
                         shape.partial_tokens);
  }
  return detail::schedule_ranges(tiles, 1, shape.rows, chunk, out);
}

}  // namespace scheduler
}  // namespace attn_backend
