// torch binding of kernels/include/attn_backend/decode.cuh (one launch; split
// requests are merged inside it).
// Readable validation happens in Python (attn_backend/decode.py); these checks
// are the last line of defence.
#include "attn_backend/decode.cuh"
#include "torch_utils.h"

namespace attn_backend {
namespace {

// Ring depth per head dims. Measured on an H200 at d128: 2 stages (3 CTAs per
// SM) beat 3 stages (2 per SM) by 8-15% on balanced grids, and 4 stages (1 per
// SM) lost 30%; more resident warps hide the per-tile barrier better than a
// deeper ring. d64 tiles are half the size, so 3 stages still fit 4 CTAs.
template <int kHeadDimQK, int kHeadDimVO>
struct StagesFor {
  static constexpr int value = (kHeadDimQK + kHeadDimVO) <= 128 ? 3 : 2;
};

template <typename Fn>
void dispatch_head_dims(int64_t head_dim_qk, int64_t head_dim_vo, Fn&& fn) {
  if (head_dim_qk == 64 && head_dim_vo == 64) return fn(std::integral_constant<int, 64>{}, std::integral_constant<int, 64>{});
  if (head_dim_qk == 128 && head_dim_vo == 128) return fn(std::integral_constant<int, 128>{}, std::integral_constant<int, 128>{});
  if (head_dim_qk == 256 && head_dim_vo == 256) return fn(std::integral_constant<int, 256>{}, std::integral_constant<int, 256>{});
  TORCH_CHECK(false, "paged_decode: head dims (", head_dim_qk, ", ", head_dim_vo,
              ") are not compiled; supported: (64, 64), (128, 128), (256, 256)");
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  if (dtype == at::kBFloat16) return fn(__nv_bfloat16{});
  if (dtype == at::kHalf) return fn(__half{});
  TORCH_CHECK(false, "paged_decode supports float16 and bfloat16");
}

template <typename Traits, typename T, bool kSoftCap>
auto* decode_kernel() {
  return &paged_decode_kernel<Traits, T, kSoftCap>;
}

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes) {
  ATTN_BACKEND_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

PagedCacheSide make_side(const at::Tensor& cache) {
  return {static_cast<const char*>(cache.data_ptr()), cache.stride(0), cache.stride(1),
          cache.stride(2)};
}

void paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& page_table, const std::optional<at::Tensor>& row_index,
                  bool table_holds_slots, const at::Tensor& schedule,
                  const at::Tensor& merge_indptr, at::Tensor& merge_counters, int64_t num_work_items,
                  const at::Tensor& partial_out, const at::Tensor& partial_lse, double sm_scale,
                  double logits_soft_cap, at::Tensor& out, const std::optional<at::Tensor>& lse) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3, "q and out must be [batch, heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "caches must be 4-D page views");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  q.scalar_type() == out.scalar_type(),
              "q, caches and out must share one dtype");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1 && k_cache.stride(3) == 1 &&
                  v_cache.stride(3) == 1,
              "last dimensions must be contiguous");
  TORCH_CHECK(page_table.scalar_type() == at::kInt && page_table.dim() == 2 &&
                  page_table.stride(1) == 1,
              "page_table must be a row-contiguous int32 matrix");
  TORCH_CHECK(schedule.scalar_type() == at::kInt && schedule.dim() == 2 && schedule.size(0) == 4 &&
                  schedule.is_contiguous(),
              "schedule must be a contiguous int32 [4, capacity] tensor");
  TORCH_CHECK(num_work_items <= schedule.size(1), "num_work_items exceeds the schedule capacity");
  TORCH_CHECK(merge_indptr.scalar_type() == at::kInt && merge_indptr.numel() >= q.size(0) + 1,
              "merge_indptr must hold batch + 1 int32 entries");
  TORCH_CHECK(merge_counters.scalar_type() == at::kInt && merge_counters.is_contiguous() &&
                  merge_counters.numel() >= q.size(0) * k_cache.size(2),
              "merge_counters must hold batch * num_kv_heads int32 zeros");
  TORCH_CHECK(partial_out.scalar_type() == at::kFloat && partial_lse.scalar_type() == at::kFloat &&
                  partial_out.is_contiguous() && partial_lse.is_contiguous(),
              "partial buffers must be contiguous float32");
  const int64_t num_qo_heads = q.size(1);
  const int64_t num_kv_heads = k_cache.size(2);
  TORCH_CHECK(num_qo_heads % num_kv_heads == 0 && num_qo_heads / num_kv_heads <= 16,
              "group size (qo heads / kv heads) must be an integer in [1, 16]");
  TORCH_CHECK(partial_out.dim() == 3 && partial_out.size(1) == num_qo_heads &&
                  partial_out.size(2) == v_cache.size(3),
              "partial_out must be [capacity, num_qo_heads, head_dim_vo]");
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() &&
                    lse->numel() >= q.size(0) * num_qo_heads,
                "lse must be contiguous float32 [batch, num_qo_heads]");
  }
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  DecodeParams params{};
  params.q = q.data_ptr();
  params.q_stride_token = q.stride(0);
  params.q_stride_head = q.stride(1);
  params.out = out.data_ptr();
  params.out_stride_token = out.stride(0);
  params.out_stride_head = out.stride(1);
  params.lse = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  params.k = make_side(k_cache);
  params.v = make_side(v_cache);
  params.pages.table = page_table.data_ptr<int32_t>();
  params.pages.row_stride = page_table.stride(0);
  params.pages.holds_token_slots = table_holds_slots;
  params.pages.row_index = row_index.has_value() ? row_index->data_ptr() : nullptr;
  params.pages.row_index_is_int64 = row_index.has_value() && row_index->scalar_type() == at::kLong;
  params.page_size = static_cast<int>(k_cache.size(1));
  params.num_pages = static_cast<int>(k_cache.size(0));
  params.num_qo_heads = static_cast<int>(num_qo_heads);
  params.group_size = static_cast<int>(num_qo_heads / num_kv_heads);
  params.sm_scale = static_cast<float>(sm_scale);
  params.soft_cap = static_cast<float>(logits_soft_cap);
  const int32_t* sched = schedule.data_ptr<int32_t>();
  const int64_t capacity = schedule.size(1);
  params.schedule = {sched, sched + capacity, sched + 2 * capacity, sched + 3 * capacity};
  params.partial_out = partial_out.data_ptr<float>();
  params.partial_lse = partial_lse.data_ptr<float>();
  params.merge_indptr = merge_indptr.data_ptr<int32_t>();
  params.merge_counters = merge_counters.data_ptr<int32_t>();

  dispatch_head_dims(q.size(2), v_cache.size(3), [&](auto dqk, auto dvo) {
    constexpr int kQK = decltype(dqk)::value;
    constexpr int kVO = decltype(dvo)::value;
    using Traits = DecodeTraits<kQK, kVO, StagesFor<kQK, kVO>::value>;
    dispatch_dtype(q.scalar_type(), [&](auto type_tag) {
      using T = decltype(type_tag);
      auto* kernel = logits_soft_cap > 0 ? decode_kernel<Traits, T, true>()
                                         : decode_kernel<Traits, T, false>();
      allow_dynamic_smem(kernel, Traits::kSmemBytes);
      if (num_work_items > 0) {
        // x = kv head, so all heads of a work item start together (their rows of
        // a token are adjacent in memory) and the schedule's longest-first
        // order is the dispatch order.
        TORCH_CHECK(num_work_items <= 65535, "paged_decode: at most 65535 work items");
        const dim3 grid(static_cast<unsigned>(num_kv_heads), static_cast<unsigned>(num_work_items));
        kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(params);
        ATTN_BACKEND_CHECK_LAUNCH();
      }
    });
  });
}

// CTAs of the decode kernel that fit on one SM at once: the plan sizes its
// split-KV schedule to fill the GPU with them.
int64_t paged_decode_ctas_per_sm(int64_t head_dim_qk, int64_t head_dim_vo) {
  int ctas = 0;
  dispatch_head_dims(head_dim_qk, head_dim_vo, [&](auto dqk, auto dvo) {
    constexpr int kQK = decltype(dqk)::value;
    constexpr int kVO = decltype(dvo)::value;
    using Traits = DecodeTraits<kQK, kVO, StagesFor<kQK, kVO>::value>;
    auto* kernel = decode_kernel<Traits, __nv_bfloat16, false>();
    allow_dynamic_smem(kernel, Traits::kSmemBytes);
    ATTN_BACKEND_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &ctas, kernel, Traits::kThreads, Traits::kSmemBytes));
  });
  return ctas;
}

}  // namespace
}  // namespace attn_backend

TORCH_LIBRARY_IMPL(attn_backend, CUDA, m) { m.impl("paged_decode", &attn_backend::paged_decode); }

TORCH_LIBRARY_IMPL(attn_backend, CompositeExplicitAutograd, m) {
  m.impl("paged_decode_ctas_per_sm", &attn_backend::paged_decode_ctas_per_sm);
}
