// GPTQ-style rounding (cdfast.solvers.gptq_round) on the GPU.
//
// Rows are independent: block b rounds rows b*kGptqRows ... (+ kGptqRows) of W in
// place, column by column: q_j = clamp(round(w_j/s*L), -L, L)*(s/L)*support_j on
// weight columns (w_j itself on a bias column), e = (w_j - q_j)/U_jj, then
// W[:, j+1:] -= e * U[j, j+1:] (the error fed forward through the upper Cholesky
// factor U of H^-1). The torch version defers part of the update per 128-column
// block; the sums are the same, the rounding of the float additions differs.
#pragma once

#include "cuda_api.h"
#include "emu.h"

namespace cdfast {

constexpr int kGptqRows = 4;

template <class T>
struct GptqParams {
  int rows, D, wc, bits, scale_per_row;
  T* W;
  const T* U;
  const T* scale;
  const uint8_t* support;
};

template <class T>
inline GptqParams<T> make_gptq_params(const GptqArgs& a) {
  GptqParams<T> p{};
  p.rows = a.rows, p.D = a.D, p.wc = a.weight_cols, p.bits = a.bits, p.scale_per_row = a.scale_per_row;
  p.W = static_cast<T*>(a.W);
  p.U = static_cast<const T*>(a.U);
  p.scale = static_cast<const T*>(a.scale);
  p.support = a.support;
  return p;
}

template <class T>
struct GptqShared {
  T e[kGptqRows];
};

template <class T, class Ctx>
CD_DEV void gptq_body(const GptqParams<T>& p, GptqShared<T>& sh, const Ctx& ctx) {
  const int tid = ctx.tid();
  const T L = static_cast<T>((1 << (p.bits - 1)) - 1);
  for (int r0 = ctx.bid() * kGptqRows; r0 < p.rows; r0 += ctx.nblocks() * kGptqRows) {
    for (int j = 0; j < p.D; ++j) {
      if (tid < kGptqRows) {
        const int r = r0 + tid;
        T e = T(0);
        if (r < p.rows) {
          const long long idx = (long long)r * p.D + j;
          const T w = p.W[idx];
          T q = w;
          if (j < p.wc) {
            const T s = ld_ro(p.scale + (p.scale_per_row ? r : 0));
            q = grid_code(w, s, L) * (s / L) * static_cast<T>(ld_ro(p.support + idx));
          }
          e = (w - q) / ld_ro(p.U + (long long)j * p.D + j);
          p.W[idx] = q;
        }
        sh.e[tid] = e;
      }
      ctx.sync();
      for (int c = j + 1 + tid; c < p.D; c += kThreads) {
        const T u = ld_ro(p.U + (long long)j * p.D + c);
#pragma unroll
        for (int rr = 0; rr < kGptqRows; ++rr)
          if (r0 + rr < p.rows) p.W[(long long)(r0 + rr) * p.D + c] -= sh.e[rr] * u;
      }
      ctx.sync();
    }
  }
}

}  // namespace cdfast
