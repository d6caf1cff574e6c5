// torch binding of kernels/include/attn_backend/decode.cuh (one launch; split
// requests are merged inside it).
// Readable validation happens in Python (attn_backend/decode.py); these checks
// are the last line of defence.
#include "decode_launch.h"

namespace attn_backend {
namespace {

// Two CTA shapes per head dims. The deep shape (d64/d128: a 3-stage ring of
// 64-token tiles, 4 warps, 2 CTAs per SM) streams two tiles while it computes
// one; it serves small batches and split-KV. bench/sweep_decode.py on an H100
// (d128, GQA 32/8, page 16), 3 stages x 4 warps against 2 stages x 3 CTAs: 363
// vs 370 us at 64 x 4k, 60 vs 61 us at 1 x 32k. d256 tiles are 64 KB a stage:
// 2 stages, one CTA per SM, for every batch.
template <int kHeadDimQK, int kHeadDimVO>
using DecodeTraitsFor = DecodeTraits<kHeadDimQK, kHeadDimVO, (kHeadDimQK + kHeadDimVO) <= 256 ? 3 : 2>;
// The full-batch shape (d128: 2 stages of 48-token tiles, 3 warps, 4 CTAs per
// SM) for batches whose whole requests fill the deep shape's CTA slots: with
// pages scattered over the cache (page 1 especially) more independent CTAs,
// each waiting on its own tile, keep more rows in flight. Same sweep, page 1:
// 367 vs 377 us at 64 x 4k, 375 vs 389 us at 256 x 1k (FlashInfer 368, 374);
// page 16 level (363 vs 363 us at 64 x 4k); slower at 1 x 32k (68 vs 60 us),
// hence only for full batches.
using FullBatchDecodeTraits128 = DecodeTraits<128, 128, 2, 3>;

template <typename Fn>
void dispatch_head_dims(int64_t head_dim_qk, int64_t head_dim_vo, bool full_batch, Fn&& fn) {
  if (head_dim_qk == 64 && head_dim_vo == 64) return fn(DecodeTraitsFor<64, 64>{});
  if (head_dim_qk == 128 && head_dim_vo == 128) {
    if (full_batch) return fn(FullBatchDecodeTraits128{});
    return fn(DecodeTraitsFor<128, 128>{});
  }
  if (head_dim_qk == 256 && head_dim_vo == 256) return fn(DecodeTraitsFor<256, 256>{});
  TORCH_CHECK(false, "paged_decode: head dims (", head_dim_qk, ", ", head_dim_vo,
              ") are not compiled; supported: (64, 64), (128, 128), (256, 256)");
}

void paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& page_table, const std::optional<at::Tensor>& row_index,
                  const std::optional<at::Tensor>& slot_map,
                  bool table_holds_slots, const at::Tensor& schedule,
                  const at::Tensor& merge_indptr, at::Tensor& merge_counters, int64_t num_work_items,
                  const at::Tensor& partial_out, const at::Tensor& partial_lse, double sm_scale,
                  double logits_soft_cap, bool full_batch, bool enable_pdl, at::Tensor& out,
                  const std::optional<at::Tensor>& lse) {
  const DecodeParams params = make_decode_params(
      q, k_cache, v_cache, page_table, row_index, slot_map, table_holds_slots, schedule, merge_indptr,
      merge_counters, num_work_items, partial_out, partial_lse, sm_scale, logits_soft_cap, out, lse);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t num_kv_heads = k_cache.size(2);
  dispatch_head_dims(q.size(2), v_cache.size(3), full_batch, [&](auto traits) {
    using Traits = decltype(traits);
    if (q.scalar_type() == at::kBFloat16) {
      return launch_decode<Traits, __nv_bfloat16>(params, num_kv_heads, num_work_items, enable_pdl,
                                                   stream);
    }
    if (q.scalar_type() == at::kHalf) {
      return launch_decode<Traits, __half>(params, num_kv_heads, num_work_items, enable_pdl,
                                           stream);
    }
    TORCH_CHECK(false, "paged_decode supports float16 and bfloat16");
  });
}

int64_t paged_decode_ctas_per_sm(int64_t head_dim_qk, int64_t head_dim_vo, bool full_batch) {
  int ctas = 0;
  dispatch_head_dims(head_dim_qk, head_dim_vo, full_batch,
                     [&](auto traits) { ctas = decode_ctas_per_sm<decltype(traits)>(); });
  return ctas;
}

}  // namespace
}  // namespace attn_backend

TORCH_LIBRARY_IMPL(attn_backend, CUDA, m) { m.impl("paged_decode", &attn_backend::paged_decode); }

TORCH_LIBRARY_IMPL(attn_backend, CompositeExplicitAutograd, m) {
  m.impl("paged_decode_ctas_per_sm", &attn_backend::paged_decode_ctas_per_sm);
}
