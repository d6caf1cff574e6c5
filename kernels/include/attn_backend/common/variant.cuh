// Attention variants: what happens to a score between q.k and the softmax, and which keys
// a query row sees. A kernel composes one logits transform with one visibility rule; the
// output transform (an FP8 cache's V scale) is where the epilogue scales.
//
// Scores stay raw q.k where possible: the max commutes with the positive softmax scale,
// which is folded into the exponent's FMA (OnlineSoftmax, exp_scale = sm_scale * log2 e).
#pragma once

#include "attn_backend/common/math.cuh"
#include "attn_backend/common/params.cuh"
#include "attn_backend/common/ptx.cuh"

namespace attn_backend {

// kSoftCap: score = cap * log2(e) * tanh(q.k * sm_scale / cap), already in the log2 domain
// (exp_scale 1); otherwise the raw q.k. Compiled in only where used: a tanh per score and
// registers. `qk_scale` is what one raw product of the MMAs is worth (the MMA policy's
// qk_scale): sm_scale, times an FP8 cache's K scale, since the kernels multiply the stored
// values.
template <bool kSoftCap_>
struct LogitsTransform {
  static constexpr bool kSoftCap = kSoftCap_;
  float score_scale;
  float cap_scale;
  float exp_scale;  // the softmax runs on exp2(score * exp_scale - max)

  __device__ __forceinline__ LogitsTransform(const AttentionParams& p, float qk_scale)
      : score_scale(qk_scale / p.soft_cap),
        cap_scale(p.soft_cap * kLog2e),
        exp_scale(kSoftCap ? 1.f : qk_scale * kLog2e) {}

  __device__ __forceinline__ float operator()(float qk) const {
    return kSoftCap ? cap_scale * ptx::fast_tanh(qk * score_scale) : qk;
  }
};

// The output after the softmax's normalisation, times an FP8 cache's V scale (1 for 16-bit
// caches): out = sum_j p_j (scale v_j) = scale sum_j p_j v_j. Partial states are written
// scaled too, so the split-KV merge needs no scale.
struct OutputScale {
  float scale;
  __device__ __forceinline__ float operator()(float value) const { return value * scale; }
  __device__ __forceinline__ float4 operator()(float4 value) const {
    return make_float4(value.x * scale, value.y * scale, value.z * scale, value.w * scale);
  }
};

// Decode: a work item's keys are exactly those its one query sees (the plan cut the window
// out of the range), so only the range's end hides keys, on the tile that crosses it.
struct KeyRangeVisibility {
  int kv_end;

  __device__ __forceinline__ bool tile_needs_mask(int first_key, int tile_keys) const {
    return first_key + tile_keys > kv_end;
  }
  __device__ __forceinline__ bool visible(int /*token*/, int key) const { return key < kv_end; }
};

// Prefill: query token i of a request (at position kv_len - q_len + i) sees the keys
// [i's window start, i's causal end) of the work item's range, or where a custom mask says
// (kCustomMask; the window still applies). Whether a K/V tile needs per-element masking is
// CTA-uniform: it does when it reaches below the window of the tile's last row, or past the
// first row's causal end (or the item's end).
template <bool kCustomMask_>
struct PrefillVisibility {
  static constexpr bool kCustomMask = kCustomMask_;
  const AttentionParams& p;
  int kv_end;
  int position_offset;  // position of query 0
  int q_len;
  int kv_len;
  int unmasked_from;
  int unmasked_to;
  int64_t mask_base;

  // Rows [row_start, row_start + num_rows) of a request's packed rows (token * group + head).
  __device__ __forceinline__ PrefillVisibility(const AttentionParams& params, int request,
                                               int item_kv_end, int queries, int keys,
                                               int row_start, int num_rows)
      : p(params), kv_end(item_kv_end), position_offset(keys - queries), q_len(queries),
        kv_len(keys) {
    const int first_position = position_offset + row_start / p.group_size;
    const int last_position = position_offset + (row_start + num_rows - 1) / p.group_size;
    unmasked_from = p.window_left >= 0 ? last_position - p.window_left : 0;
    unmasked_to = p.causal && !kCustomMask ? min(first_position + 1, kv_end) : kv_end;
    mask_base = kCustomMask ? p.mask_offset[request] : 0;
  }

  __device__ __forceinline__ bool tile_needs_mask(int first_key, int tile_keys) const {
    return kCustomMask || first_key < unmasked_from || first_key + tile_keys > unmasked_to;
  }

  __device__ __forceinline__ bool visible(int token, int key) const {
    const int position = position_offset + token;
    bool seen = key < kv_end && (p.window_left < 0 || key >= position - p.window_left);
    if (kCustomMask) {
      if (seen && token < q_len) {
        const int64_t bit = mask_base + static_cast<int64_t>(token) * kv_len + key;
        seen = (__ldg(p.mask_bits + (bit >> 3)) >> (bit & 7)) & 1;
      }
    } else if (p.causal) {
      seen = seen && key <= position;
    }
    return seen;
  }
};

// Scores s[kM][kN][4] in the mma.sync accumulator layout (row lane/4 + 8 (e/2) of m-tile mt,
// column 8 n + 2 (lane % 4) + e % 2): the logits transform, and where `masked`, -inf for the
// keys `visible(mt, n, e)` hides. Nothing to do without a soft-cap on an unmasked tile.
template <typename Logits, int kM, int kN, typename Visible>
__device__ __forceinline__ void transform_scores(float (&s)[kM][kN][4], const Logits& logits,
                                                 bool masked, const Visible& visible) {
  if (!Logits::kSoftCap && !masked) return;
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int n = 0; n < kN; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[mt][n][e];
        if (Logits::kSoftCap) x = logits(x);
        if (masked) x = visible(mt, n, e) ? x : kNegInf;
        s[mt][n][e] = x;
      }
    }
  }
}

}  // namespace attn_backend
