// The online softmax of a warp's rows, in the log2 domain, over scores in the mma.sync
// accumulator layout: a thread holds rows lane/4 and lane/4 + 8 of each of kM 16-row
// m-tiles (half 0 and 1), and a row's 4 quad lanes share its state.
#pragma once

#include "attn_backend/common/math.cuh"
#include "attn_backend/common/ptx.cuh"

namespace attn_backend {

template <int kM, int kN>
struct OnlineSoftmax {
  float row_max[kM][2];  // max * exp_scale so far (log2 domain)
  float row_sum[kM][2];  // this thread's share of the row's sum of exp2

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
      row_max[mt][0] = row_max[mt][1] = kNegInf;
      row_sum[mt][0] = row_sum[mt][1] = 0.f;
    }
  }

  // Turns the scores s (kN 8-key column tiles) into probabilities exp2(s * exp_scale - max)
  // and rescales the output accumulators o by how much each row's max moved.
  template <int kVONTiles>
  __device__ __forceinline__ void update(float (&s)[kM][kN][4], float (&o)[kM][kVONTiles][4],
                                         float exp_scale) {
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
      float reference[2], correction[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        reference[half] = fold_max(s, mt, half, exp_scale, correction[half]);
      }
      rescale_rows(o[mt], correction[0], correction[1]);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        exponentiate(s, mt, half, exp_scale, reference[half], correction[half]);
      }
    }
  }

  // update() in two steps, for kernels whose output MMA still runs while the next tile's
  // probabilities are made: probabilities() turns s into them and returns each row's
  // correction; rescale() applies the corrections to o once the MMA has completed.
  __device__ __forceinline__ void probabilities(float (&s)[kM][kN][4], float exp_scale,
                                                float (&correction)[kM][2]) {
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float reference = fold_max(s, mt, half, exp_scale, correction[mt][half]);
        exponentiate(s, mt, half, exp_scale, reference, correction[mt][half]);
      }
    }
  }

  template <int kVONTiles>
  __device__ __forceinline__ static void rescale(float (&o)[kM][kVONTiles][4],
                                                 const float (&correction)[kM][2]) {
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) rescale_rows(o[mt], correction[mt][0], correction[mt][1]);
  }

  // After the last tile: the row's whole sum (its quad's shares added).
  __device__ __forceinline__ float total(int mt, int half) const {
    float t = row_sum[mt][half];
    t += __shfl_xor_sync(0xffffffff, t, 1);
    t += __shfl_xor_sync(0xffffffff, t, 2);
    return t;
  }

  // Natural-log LSE of a row with sum `total`, -inf for a row that saw no key.
  __device__ __forceinline__ float lse(int mt, int half, float total) const {
    return total != 0.f ? (row_max[mt][half] + __log2f(total)) * kLn2 : kNegInf;
  }

  // The steps of update(), for kernels whose rows' running max lives elsewhere (mla_seesaw.cuh:
  // shared by two warpgroups). Row (mt, half)'s raw max over the tile (its quad's lanes agree).
  __device__ __forceinline__ static float tile_max(const float (&s)[kM][kN][4], int mt,
                                                   int half) {
    float m = kNegInf;
#pragma unroll
    for (int n = 0; n < kN; ++n) m = fmaxf(m, fmaxf(s[mt][n][2 * half], s[mt][n][2 * half + 1]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
    return fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
  }

  // The reference a row's probabilities are taken against for running max `max`: with nothing
  // seen yet the max is -inf, and subtracting 0 keeps exp2 at 0 (never inf - inf).
  __device__ __forceinline__ static float reference_of(float max) {
    return max == kNegInf ? 0.f : max;
  }

  // Row (mt, half)'s scores become exp2(s * exp_scale - reference); returns this thread's sum.
  __device__ __forceinline__ static float exponentiate_row(float (&s)[kM][kN][4], int mt,
                                                           int half, float exp_scale,
                                                           float reference) {
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < kN; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float prob = ptx::fast_exp2(fmaf(s[mt][n][2 * half + e], exp_scale, -reference));
        s[mt][n][2 * half + e] = prob;
        sum += prob;
      }
    }
    return sum;
  }

 private:
  // Folds row (mt, half)'s max over the tile into its running max; returns the reference the
  // tile's probabilities are taken against and sets the correction of the rows' past.
  __device__ __forceinline__ float fold_max(const float (&s)[kM][kN][4], int mt, int half,
                                            float exp_scale, float& correction) {
    const float new_max = fmaxf(row_max[mt][half], tile_max(s, mt, half) * exp_scale);
    const float reference = reference_of(new_max);
    correction = ptx::fast_exp2(row_max[mt][half] - reference);
    row_max[mt][half] = new_max;
    return reference;
  }

  // Row (mt, half)'s scores become exp2(s * exp_scale - reference); its sum, corrected, adds them.
  __device__ __forceinline__ void exponentiate(float (&s)[kM][kN][4], int mt, int half,
                                               float exp_scale, float reference,
                                               float correction) {
    row_sum[mt][half] =
        row_sum[mt][half] * correction + exponentiate_row(s, mt, half, exp_scale, reference);
  }

  // Once the running maxima settle most tiles leave them unchanged; then the m-tile's outputs
  // need no rescaling (a warp-uniform test, so no divergence).
  template <int kVONTiles>
  __device__ __forceinline__ static void rescale_rows(float (&o)[kVONTiles][4], float low,
                                                      float high) {
    if (__any_sync(0xffffffff, low != 1.f || high != 1.f)) {
#pragma unroll
      for (int n = 0; n < kVONTiles; ++n) {
        o[n][0] *= low;
        o[n][1] *= low;
        o[n][2] *= high;
        o[n][3] *= high;
      }
    }
  }
};

}  // namespace attn_backend
