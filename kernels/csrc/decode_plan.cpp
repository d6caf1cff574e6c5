// Host-side decode schedule in C++: the same result as plan_decode() in
// attn_backend/schedule.py (which documents the cost model and stays the
// specification; tests compare the two on random batches). A CUDA-graph decode
// replans every step on the host, and this runs in a few microseconds where the
// numpy version takes 100-300.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace attn_backend {
namespace {

// schedule.py's constants.
constexpr int64_t kTileTokens = 64;
constexpr int64_t kMinChunkTokens = 64;
constexpr int64_t kItemOverheadTokens = 64;
constexpr int64_t kMaxSplitsConsidered = 128;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// choose_chunk() of schedule.py, over the same candidates in the same order.
int64_t choose_chunk(const std::vector<int64_t>& lengths, int64_t num_kv_heads,
                     int64_t cta_slots, int64_t max_items) {
  int64_t longest = 0, total = 0;
  for (int64_t n : lengths) {
    longest = std::max(longest, n);
    total += n;
  }
  if (longest <= kMinChunkTokens) return std::max<int64_t>(longest, 1);
  const int64_t max_splits =
      std::min({kMaxSplitsConsidered, longest / kMinChunkTokens,
                longest * max_items / std::max<int64_t>(total, 1)});
  std::vector<int64_t> chunks;  // descending, unique, >= kMinChunkTokens
  for (int64_t splits = 1; splits <= std::max<int64_t>(max_splits, 1); ++splits) {
    const int64_t chunk = ceil_div(ceil_div(longest, splits), kTileTokens) * kTileTokens;
    if (chunk >= kMinChunkTokens && (chunks.empty() || chunk < chunks.back())) {
      chunks.push_back(chunk);
    }
  }
  if (chunks.empty() || chunks.front() < longest) chunks.insert(chunks.begin(), longest);
  int64_t best_chunk = chunks.front();
  double best_estimate = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    int64_t items = 0;
    for (int64_t n : lengths) items += std::max<int64_t>(1, ceil_div(n, chunks[i]));
    if (i > 0 && items > max_items) continue;  // one item per request always fits
    const int64_t waves = ceil_div(items * num_kv_heads, cta_slots);
    const double average = static_cast<double>(total) / static_cast<double>(items);
    const double estimate = std::max(static_cast<double>(waves) * (average + kItemOverheadTokens),
                                     static_cast<double>(chunks[i] + kItemOverheadTokens));
    if (i == 0 || estimate < best_estimate) {  // the first (largest) chunk wins ties
      best_estimate = estimate;
      best_chunk = chunks[i];
    }
  }
  return best_chunk;
}

// Writes the schedule of `kv_lens` (int64, CPU) into `schedule` (int32 [4, capacity]:
// request, kv_start, kv_end, partial) and `merge_indptr` (int32, >= batch + 1). A
// CUDA-graph grid has `grid_items` columns (-1: just the schedule's); the ones past the
// schedule are marked unused. Returns [items, chunk].
std::vector<int64_t> plan_decode_schedule(const at::Tensor& kv_lens, int64_t window_left,
                                          int64_t num_kv_heads, int64_t cta_slots,
                                          int64_t max_items, int64_t grid_items,
                                          at::Tensor& schedule, at::Tensor& merge_indptr) {
  TORCH_CHECK(kv_lens.device().is_cpu() && kv_lens.scalar_type() == at::kLong &&
                  kv_lens.dim() == 1 && kv_lens.is_contiguous(),
              "kv_lens must be a contiguous int64 CPU vector");
  TORCH_CHECK(schedule.device().is_cpu() && schedule.scalar_type() == at::kInt &&
                  schedule.dim() == 2 && schedule.size(0) == 4 && schedule.is_contiguous(),
              "schedule must be a contiguous int32 CPU [4, capacity] tensor");
  TORCH_CHECK(merge_indptr.device().is_cpu() && merge_indptr.scalar_type() == at::kInt &&
                  merge_indptr.is_contiguous() && merge_indptr.numel() > kv_lens.numel(),
              "merge_indptr must be a contiguous int32 CPU vector of at least batch + 1");
  TORCH_CHECK(num_kv_heads > 0 && cta_slots > 0, "num_kv_heads and cta_slots must be positive");
  const int64_t batch = kv_lens.numel();
  const int64_t* lens = kv_lens.data_ptr<int64_t>();
  std::vector<int64_t> starts(batch), lengths(batch);
  for (int64_t r = 0; r < batch; ++r) {
    starts[r] = window_left < 0 ? 0 : std::max<int64_t>(lens[r] - 1 - window_left, 0);
    lengths[r] = lens[r] - starts[r];
  }
  const int64_t chunk = choose_chunk(lengths, num_kv_heads, cta_slots, max_items);

  int32_t* indptr = merge_indptr.data_ptr<int32_t>();
  struct Item {
    int64_t request, start, end, partial;
  };
  std::vector<Item> items;
  items.reserve(batch * 2);
  indptr[0] = 0;
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t count = std::max<int64_t>(1, ceil_div(lengths[r], chunk));
    const bool split = count > 1;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t start = starts[r] + i * chunk;
      items.push_back({r, start, std::min(start + chunk, lens[r]), split ? indptr[r] + i : -1});
    }
    indptr[r + 1] = indptr[r] + static_cast<int32_t>(split ? count : 0);
  }
  // Longest first; equal lengths keep request order (numpy's stable argsort).
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.end - a.start > b.end - b.start;
  });

  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t capacity = schedule.size(1);
  if (grid_items < 0) grid_items = num_items;
  TORCH_CHECK(num_items <= grid_items && grid_items <= capacity, "decode schedule of ", num_items,
              " items does not fit its grid of ", grid_items, " (capacity ", capacity, ")");
  int32_t* rows[4];
  for (int k = 0; k < 4; ++k) rows[k] = schedule.data_ptr<int32_t>() + k * capacity;
  for (int64_t i = 0; i < num_items; ++i) {
    rows[0][i] = static_cast<int32_t>(items[i].request);
    rows[1][i] = static_cast<int32_t>(items[i].start);
    rows[2][i] = static_cast<int32_t>(items[i].end);
    rows[3][i] = static_cast<int32_t>(items[i].partial);
  }
  for (int64_t i = num_items; i < grid_items; ++i) {  // unused slots of a graph-sized grid
    rows[0][i] = -1;
    rows[1][i] = rows[2][i] = 0;
    rows[3][i] = -1;
  }
  return {num_items, chunk};
}

}  // namespace
}  // namespace attn_backend

TORCH_LIBRARY_IMPL(attn_backend, CPU, m) {
  m.impl("plan_decode_schedule", &attn_backend::plan_decode_schedule);
}
