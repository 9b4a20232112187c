// The persistent Gram-form layer solver: one launch runs every step of
// cdfast.solvers.gram_iterative for one layer.
//
// Work split. The weight (G, R, D) is cut into 64x64 tiles; block b owns tiles
// b, b + nblocks, ... for the whole solve and is the only writer of their
// weight, optimizer state and mask. Step i (0-based), as in the torch solver:
//
//  P0  (own tiles)  delta = Q(W_i)*mask - A (Q the straight-through quantizer, or
//                   the identity), G = F + delta.H (tiled GEMM, 64x64x16 stages),
//                   the loss partial sum(delta*(G + F)), grad = 2s*G*mask, state
//                   masked, one Adam / SGD step into the other weight buffer W_{i+1};
//                   partial column sums of squares for channel norms.
//  ---- grid sync (the next step's gradient needs whole rows of W_{i+1})
//  Q   quantization, from step best_from on (the iterates that already carry the
//      final mask): every block sums the loss partials in the same order and, on a
//      new best, snapshots its tiles of W_i and the scale (best-iterate tracking).
//  C   the schedule, where this step has one: channel norms (distributed), n:m
//      masks, a global radix select for the weight top-k (one histogram pass and
//      grid sync per 11-bit digit), per-group channel top-k (every block selects
//      redundantly from the norms), then on its own tiles: mask update, L1 and
//      group-lasso prox, W *= mask; grid sync.
//  R   every steps/10 steps with quantization: closed-form scale refit
//      s = z.(r - u.H) / z.H.z (a second GEMM with the codes; u the current fitted
//      bias column, held fixed), grid syncs.
//
// Plain steps (no constraint coupling the rows, L1 applied inline) cost one grid
// sync. Ties in the top-k selections are broken by a fixed order (lowest channel
// index; for weights: tile, then thread, then element), so every run gives the
// same iterates.
#pragma once

#include <limits>

#include "cuda_api.h"
#include "emu.h"

namespace cdfast {

template <class T>
struct GramParams {
  int G, R, D, wc, taps, gi, steps, solver;
  int mt, nt, ntiles;
  T one_minus_b1, b2, one_minus_b2, eps, mom, two_s;
  const T* H;
  const T* F;
  const T* A;
  const T* Rq;
  T* W;
  T* Wb;
  T* m;
  T* v;
  uint8_t* mask;
  const double* sched_f;
  const long long* sched_i;
  int nm_step, nm_n, nm_m;
  double l1, gl;
  int l1_first;
  int bits, scale_mode, refit_every, best_from;
  double f0, best_init;
  T* scale;
  T* best_W;
  T* best_scale;
  double* best_val;
  double* log_part;
  // workspace
  int* hist;         // (kMaxPasses, kBins)
  long long* eqcnt;  // (ntiles)
  double* loss_part; // (2, ntiles)
  double* colsq_a;   // (G, mt, D)
  double* colsq_b;
  T* norm_a;         // (G, gi)
  T* norm_b;
  double* num_part;  // (G*R, nt)
  double* den_part;
};

template <class T>
inline GramParams<T> make_params(const GramArgs& a) {
  GramParams<T> p{};
  const GramLayout L = gram_layout(a.G, a.R, a.D, a.group_in, a.dtype);
  p.G = a.G, p.R = a.R, p.D = a.D, p.wc = a.wc, p.taps = a.taps, p.gi = a.group_in, p.steps = a.steps;
  p.solver = a.solver;
  p.mt = L.mt, p.nt = L.nt, p.ntiles = L.ntiles;
  p.one_minus_b1 = static_cast<T>(1.0 - a.beta1);
  p.b2 = static_cast<T>(a.beta2);
  p.one_minus_b2 = static_cast<T>(1.0 - a.beta2);
  p.eps = static_cast<T>(a.eps);
  p.mom = static_cast<T>(a.momentum);
  p.two_s = static_cast<T>(a.two_s);
  p.H = static_cast<const T*>(a.H);
  p.F = static_cast<const T*>(a.F);
  p.A = static_cast<const T*>(a.A);
  p.Rq = static_cast<const T*>(a.Rq);
  p.W = static_cast<T*>(a.W);
  p.Wb = static_cast<T*>(a.Wb);
  p.m = static_cast<T*>(a.m);
  p.v = static_cast<T*>(a.v);
  p.mask = a.mask;
  p.sched_f = a.sched_f;
  p.sched_i = a.sched_i;
  p.nm_step = a.nm_step, p.nm_n = a.nm_n, p.nm_m = a.nm_m;
  p.l1 = a.l1, p.gl = a.gl, p.l1_first = a.l1_first;
  p.bits = a.bits, p.scale_mode = a.scale_mode, p.refit_every = a.refit_every > 0 ? a.refit_every : 1;
  p.best_from = a.best_from;
  p.f0 = a.f0;
  p.best_init = std::numeric_limits<double>::infinity();
  p.scale = static_cast<T*>(a.scale);
  p.best_W = static_cast<T*>(a.best_W);
  p.best_scale = static_cast<T*>(a.best_scale);
  p.best_val = a.best_val;
  p.log_part = a.log_part;
  char* ws = static_cast<char*>(a.workspace);
  p.hist = reinterpret_cast<int*>(ws + L.hist);
  p.eqcnt = reinterpret_cast<long long*>(ws + L.eqcnt);
  p.loss_part = reinterpret_cast<double*>(ws + L.loss_part);
  p.colsq_a = reinterpret_cast<double*>(ws + L.colsq_a);
  p.colsq_b = reinterpret_cast<double*>(ws + L.colsq_b);
  p.norm_a = reinterpret_cast<T*>(ws + L.norm_a);
  p.norm_b = reinterpret_cast<T*>(ws + L.norm_b);
  p.num_part = reinterpret_cast<double*>(ws + L.num_part);
  p.den_part = reinterpret_cast<double*>(ws + L.den_part);
  return p;
}

template <class T>
struct GramShared {
  T Xs[kTileK][kTileM];
  T Hs[kTileK][kTileN];
  int hist[kBins];
  double red[kThreads];
  long long lred[kThreads];
  double rowred[kTileM][16];
  int sel_digit;
  long long sel_above, sel_count;
};

// ------------------------------------------------------------------ helpers
template <class T, class Ctx>
CD_DEV double block_sum(GramShared<T>& sh, const Ctx& ctx, double v) {
  const int tid = ctx.tid();
  sh.red[tid] = v;
  ctx.sync();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) sh.red[tid] += sh.red[tid + s];
    ctx.sync();
  }
  const double r = sh.red[0];
  ctx.sync();
  return r;
}

template <class T, class Ctx>
CD_DEV long long block_sum_ll(GramShared<T>& sh, const Ctx& ctx, long long v) {
  const int tid = ctx.tid();
  sh.lred[tid] = v;
  ctx.sync();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) sh.lred[tid] += sh.lred[tid + s];
    ctx.sync();
  }
  const long long r = sh.lred[0];
  ctx.sync();
  return r;
}

// Exclusive prefix of v over the threads of the block (thread order).
template <class T, class Ctx>
CD_DEV long long block_exclusive_scan(GramShared<T>& sh, const Ctx& ctx, long long v) {
  const int tid = ctx.tid();
  sh.lred[tid] = v;
  ctx.sync();
  if (tid == 0) {
    long long acc = 0;
    for (int t = 0; t < kThreads; ++t) {
      const long long x = sh.lred[t];
      sh.lred[t] = acc;
      acc += x;
    }
  }
  ctx.sync();
  const long long r = sh.lred[tid];
  ctx.sync();
  return r;
}

// The bin of a histogram (counts per digit) that holds the `remaining`-th largest
// key: scanning from the top bin, `above` counts the keys in higher bins.
template <class T, class Ctx>
CD_DEV void find_bucket(GramShared<T>& sh, const Ctx& ctx, const int* h, bool global, int nbins, long long remaining,
                        int* digit, long long* above, long long* count) {
  const int tid = ctx.tid();
  const int per = (nbins + kThreads - 1) / kThreads;
  long long c = 0;
  const int lo = tid * per, hi = (tid + 1) * per < nbins ? (tid + 1) * per : nbins;
  for (int b = lo; b < hi; ++b) c += global ? ld_cg(h + b) : h[b];
  sh.lred[tid] = c;
  ctx.sync();
  if (tid == 0) {
    long long acc = 0;
    int t = kThreads - 1;
    for (; t > 0; --t) {
      if (acc + sh.lred[t] >= remaining) break;
      acc += sh.lred[t];
    }
    int b = ((t + 1) * per < nbins ? (t + 1) * per : nbins) - 1;
    long long cb = 0;
    for (; b > t * per; --b) {
      cb = global ? ld_cg(h + b) : h[b];
      if (acc + cb >= remaining) break;
      acc += cb;
    }
    cb = global ? ld_cg(h + b) : h[b];
    sh.sel_digit = b;
    sh.sel_above = acc;
    sh.sel_count = cb;
  }
  ctx.sync();
  *digit = sh.sel_digit;
  *above = sh.sel_above;
  *count = sh.sel_count;
  ctx.sync();
}

CD_HOST_DEV int digit_shift(int bits, int pass) {
  const int s = bits - 11 * (pass + 1);
  return s > 0 ? s : 0;
}
CD_HOST_DEV int digit_width(int bits, int pass) {
  const int s = bits - 11 * (pass + 1);
  return s >= 0 ? 11 : 11 + s;
}
CD_HOST_DEV int digit_passes(int bits) { return (bits + 10) / 11; }

// Radix select inside one block: the key of the k-th largest of vals[0..n), how
// many keys equal to it are to be kept (need) and how many there are (eqtot).
template <class T, class Ctx>
CD_DEV void block_select(GramShared<T>& sh, const Ctx& ctx, const T* vals, int n, long long k,
                         typename Key<T>::U* thr, long long* need, long long* eqtot) {
  using U = typename Key<T>::U;
  const int tid = ctx.tid();
  U prefix = 0, pmask = 0;
  long long rem = k, cnt = n;
  const int passes = digit_passes(Key<T>::bits);
  for (int ps = 0; ps < passes; ++ps) {
    const int sh_ = digit_shift(Key<T>::bits, ps), width = digit_width(Key<T>::bits, ps);
    const U dmask = (U(1) << width) - 1;
    for (int b = tid; b < kBins; b += kThreads) sh.hist[b] = 0;
    ctx.sync();
    for (int e = tid; e < n; e += kThreads) {
      const U key = key_of(ld_cg(vals + e));
      if ((key & pmask) == prefix) atomic_add(&sh.hist[(key >> sh_) & dmask], 1);
    }
    ctx.sync();
    int digit;
    long long above, count;
    find_bucket(sh, ctx, sh.hist, false, 1 << width, rem, &digit, &above, &count);
    rem -= above;
    cnt = count;
    prefix |= static_cast<U>(digit) << sh_;
    pmask |= dmask << sh_;
  }
  *thr = prefix;
  *need = rem;
  *eqtot = cnt;
}

template <class T>
CD_DEV T scale_of(const GramParams<T>& p, int g, int r) {
  return p.scale_mode == 1 ? ld_cg(p.scale + (long long)g * p.R + r) : ld_cg(p.scale);
}

template <class T>
CD_DEV T soft(T w, T t) {
  T a = cd_fabs(w) - t;
  a = a > T(0) ? a : T(0);
  T r = cd_copysign(a, w);
  r = w == T(0) ? T(0) : r;
  return w != w ? w : r;
}

// delta(g, r, k) = Q(W[g, r, k]) * mask - A[g, r, k]  (plain W - A without quantization)
template <class T>
CD_DEV T delta_at(const GramParams<T>& p, const T* Wc, int g, int r, int k, T L) {
  const long long idx = ((long long)g * p.R + r) * p.D + k;
  T w = ld_cg(Wc + idx);
  if (p.bits > 0) {
    const T mk = static_cast<T>(ld_cg(p.mask + idx));
    if (k < p.wc) {
      const T s = scale_of(p, g, r);
      w = grid_code(w, s, L) * (s / L);
    }
    w = w * mk;
  }
  return w - ld_ro(p.A + idx);
}

// z(g, r, k) = code(W[g, r, k]) / L on the weight columns, 0 on a bias column.
template <class T>
CD_DEV T z_at(const GramParams<T>& p, const T* Wn, int g, int r, int k, T L) {
  if (k >= p.wc) return T(0);
  const long long idx = ((long long)g * p.R + r) * p.D + k;
  return grid_code(ld_cg(Wn + idx), scale_of(p, g, r), L) / L;
}

// acc[i][j] = sum_k X[r0 + 4ty + i, k] * H[g][k, c0 + 4tx + j], X = delta (mode 0) or z (mode 1).
template <class T, class Ctx>
CD_DEV void gemm_tile(const GramParams<T>& p, GramShared<T>& sh, const Ctx& ctx, const T* Wsrc, int mode, int g,
                      int r0, int c0, T L, T acc[4][4]) {
  const int tid = ctx.tid();
  const int ty = tid / 16, tx = tid % 16;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);
  const T* Hg = p.H + (long long)g * p.D * p.D;
  for (int k0 = 0; k0 < p.D; k0 += kTileK) {
    for (int e = tid; e < kTileM * kTileK; e += kThreads) {
      const int r = e / kTileK, k = e % kTileK;
      T x = T(0);
      if (r0 + r < p.R && k0 + k < p.D)
        x = mode == 0 ? delta_at(p, Wsrc, g, r0 + r, k0 + k, L) : z_at(p, Wsrc, g, r0 + r, k0 + k, L);
      sh.Xs[k][r] = x;
    }
    for (int e = tid; e < kTileK * kTileN; e += kThreads) {
      const int k = e / kTileN, c = e % kTileN;
      T h = T(0);
      if (k0 + k < p.D && c0 + c < p.D) h = ld_ro(Hg + (long long)(k0 + k) * p.D + c0 + c);
      sh.Hs[k][c] = h;
    }
    ctx.sync();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      T a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sh.Xs[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sh.Hs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    ctx.sync();
  }
}

template <class T>
CD_DEV void tile_coords(const GramParams<T>& p, int tile, int* g, int* mi, int* ni) {
  const int per_group = p.mt * p.nt;
  *g = tile / per_group;
  const int rem = tile % per_group;
  *mi = rem / p.nt;
  *ni = rem % p.nt;
}

// ------------------------------------------------------------------ P0
template <class T, class Ctx>
CD_DEV void grad_step_tile(const GramParams<T>& p, GramShared<T>& sh, const Ctx& ctx, int i, int tile, const T* Wc,
                           T* Wn, bool need_loss, long long log_slot, bool colsq_pre, bool colsq_post,
                           bool l1_inline, T l1t, T lr, T step_size, T bc2, T L) {
  const int tid = ctx.tid();
  const int ty = tid / 16, tx = tid % 16;
  int g, mi, ni;
  tile_coords(p, tile, &g, &mi, &ni);
  const int r0 = mi * kTileM, c0 = ni * kTileN;
  T acc[4][4];
  gemm_tile(p, sh, ctx, Wc, 0, g, r0, c0, L, acc);
  double lsum = 0.0;
  for (int ii = 0; ii < 4; ++ii) {
    const int r = r0 + ty * 4 + ii;
    if (r >= p.R) continue;
    for (int jj = 0; jj < 4; ++jj) {
      const int c = c0 + tx * 4 + jj;
      if (c >= p.D) continue;
      const long long idx = ((long long)g * p.R + r) * p.D + c;
      const T Fv = ld_ro(p.F + idx);
      const T Gr = acc[ii][jj] + Fv;
      if (need_loss) lsum += static_cast<double>(delta_at(p, Wc, g, r, c, L)) * static_cast<double>(Gr + Fv);
      const T mk = static_cast<T>(ld_cg(p.mask + idx));
      const T grad = (Gr * p.two_s) * mk;
      const T w = ld_cg(Wc + idx);
      T wn;
      if (p.solver == 0) {
        T mm = p.m[idx] * mk;
        T vv = p.v[idx] * mk;
        mm = mm + p.one_minus_b1 * (grad - mm);
        vv = vv * p.b2 + p.one_minus_b2 * grad * grad;
        const T denom = cd_sqrt(vv) / bc2 + p.eps;
        wn = w + (-step_size) * (mm / denom);
        p.m[idx] = mm;
        p.v[idx] = vv;
      } else {
        T mm = p.m[idx] * mk;
        mm = (i == 0) ? grad : mm * p.mom + grad;
        wn = w + (-lr) * mm;
        p.m[idx] = mm;
      }
      if (l1_inline && c < p.wc) wn = soft(wn, l1t);
      Wn[idx] = wn;
    }
  }
  if (need_loss) {
    const double s = block_sum(sh, ctx, lsum);
    if (tid == 0) {
      p.loss_part[(i & 1) * p.ntiles + tile] = s;
      if (log_slot >= 0) p.log_part[log_slot * p.ntiles + tile] = s;
    }
  }
  if (colsq_pre || colsq_post) {
    ctx.sync();  // this block's writes of Wn are visible to the block
    if (tid < kTileN) {
      const int c = c0 + tid;
      if (c < p.wc) {
        double sa = 0.0, sb = 0.0;
        for (int rr = 0; rr < kTileM && r0 + rr < p.R; ++rr) {
          const T w = Wn[((long long)g * p.R + r0 + rr) * p.D + c];
          const double d = static_cast<double>(w);
          sa += d * d;
          const double e = static_cast<double>(soft(w, l1t));
          sb += e * e;
        }
        const long long o = ((long long)g * p.mt + mi) * p.D + c;
        if (colsq_pre) p.colsq_a[o] = sa;
        if (colsq_post) p.colsq_b[o] = sb;
      }
    }
    ctx.sync();
  }
}

// ------------------------------------------------------------------ C: apply
struct WeightSel {
  unsigned long long thr;
  long long need, eqtot;
};

template <class T, class Ctx>
CD_DEV void apply_tile(const GramParams<T>& p, GramShared<T>& sh, const Ctx& ctx, int tile, T* Wn, long long chan_k,
                       bool chan_sel_valid, typename Key<T>::U chan_thr, long long chan_need, long long chan_eqtot,
                       bool wsel_on, WeightSel ws, long long tile_eq_before, bool mask_op, bool l1_on, bool gl_on,
                       T l1t, double glt) {
  using U = typename Key<T>::U;
  const int tid = ctx.tid();
  int g, mi, ni;
  tile_coords(p, tile, &g, &mi, &ni);
  const int r0 = mi * kTileM, c0 = ni * kTileN;
  const U wthr = static_cast<U>(ws.thr);
  const bool wties = wsel_on && ws.need != ws.eqtot;
  long long before = 0;
  if (wties) {  // this thread's rank start among the tied keys (tile, thread, element order)
    long long c = 0;
    for (int e = tid; e < kTileM * kTileN; e += kThreads) {
      const int r = r0 + e / kTileN, col = c0 + e % kTileN;
      if (r >= p.R || col >= p.wc) continue;
      const long long idx = ((long long)g * p.R + r) * p.D + col;
      c += key_of(cd_fabs(Wn[idx])) == wthr;
    }
    before = tile_eq_before + block_exclusive_scan(sh, ctx, c);
  }
  const T* na = p.norm_a + (long long)g * p.gi;
  const T* nb = (l1_on && p.l1_first) ? p.norm_b + (long long)g * p.gi : na;
  for (int e = tid; e < kTileM * kTileN; e += kThreads) {
    const int r = r0 + e / kTileN, col = c0 + e % kTileN;
    if (r >= p.R || col >= p.D) continue;
    const long long idx = ((long long)g * p.R + r) * p.D + col;
    T w = Wn[idx];
    uint8_t mk = ld_cg(p.mask + idx);  // n:m masks come from other blocks
    if (col < p.wc) {
      if (chan_k > 0 && chan_sel_valid) {
        const int ci = col / p.taps;
        const U key = key_of(ld_cg(na + ci));
        bool keep = key > chan_thr;
        if (key == chan_thr) {
          if (chan_need == chan_eqtot) {
            keep = true;
          } else {  // rank among the tied channels by index
            long long rank = 0;
            for (int cj = 0; cj < ci; ++cj) rank += key_of(ld_cg(na + cj)) == chan_thr;
            keep = rank < chan_need;
          }
        }
        if (!keep) mk = 0;
      }
      if (wsel_on) {
        const U key = key_of(cd_fabs(w));
        bool keep = key > wthr;
        if (key == wthr) keep = wties ? (before++ < ws.need) : true;
        if (!keep) mk = 0;
      }
      // penalties, in the order of the constraint list
      if (l1_on && p.l1_first) w = soft(w, l1t);
      if (gl_on) {
        const double n = static_cast<double>(ld_cg(nb + col / p.taps));
        const double f = 1.0 - glt / (n > Limits<T>::tiny ? n : static_cast<double>(Limits<T>::tiny));
        w = w * static_cast<T>(f > 0.0 ? f : 0.0);
      }
      if (l1_on && !p.l1_first) w = soft(w, l1t);
    }
    if (mask_op) {
      w = w * static_cast<T>(mk);
      p.mask[idx] = mk;
    }
    Wn[idx] = w;
  }
}

// ------------------------------------------------------------------ the kernel body
template <class T, class Ctx>
CD_DEV void gram_body(const GramParams<T>& p, GramShared<T>& sh, const Ctx& ctx) {
  using U = typename Key<T>::U;
  const int tid = ctx.tid(), bid = ctx.bid(), nb = ctx.nblocks();
  const int gtid = bid * kThreads + tid, gstride = nb * kThreads;
  const T L = static_cast<T>(p.bits > 0 ? (1 << (p.bits - 1)) - 1 : 1);
  const bool gl_on = p.gl > 0.0, l1_on = p.l1 > 0.0;
  double best = p.best_init;
  const int passes = digit_passes(Key<T>::bits);

  for (int i = 0; i < p.steps; ++i) {
    const T* Wc = (i & 1) ? p.Wb : p.W;
    T* Wn = (i & 1) ? p.W : p.Wb;
    const double lr_d = ld_ro(p.sched_f + 3 * i);
    const T lr = static_cast<T>(lr_d);
    const T step_size = static_cast<T>(ld_ro(p.sched_f + 3 * i + 1));
    const T bc2 = static_cast<T>(ld_ro(p.sched_f + 3 * i + 2));
    const long long chan_k = ld_ro(p.sched_i + 3 * i);
    const long long weight_k = ld_ro(p.sched_i + 3 * i + 1);
    const long long log_slot = ld_ro(p.sched_i + 3 * i + 2);
    const bool nm_now = (i == p.nm_step);
    const bool wsel_on = weight_k >= 0;
    const bool mask_op = chan_k > 0 || wsel_on || nm_now;
    const bool coupled = mask_op || gl_on;
    const bool need_loss = log_slot >= 0 || p.bits > 0;
    const bool refit = p.bits > 0 && ((i + 1) % p.refit_every == 0);
    const bool colsq_pre = chan_k > 0 || (gl_on && !(l1_on && p.l1_first));
    const bool colsq_post = gl_on && l1_on && p.l1_first;
    const bool l1_inline = l1_on && !coupled;
    const T l1t = static_cast<T>(lr_d * p.l1);
    const double glt = lr_d * p.gl;

    if (bid == 0 && wsel_on)
      for (int b = tid; b < kBins * kMaxPasses; b += kThreads) p.hist[b] = 0;

    // P0: gradient, optimizer step
    for (int tile = bid; tile < p.ntiles; tile += nb)
      grad_step_tile(p, sh, ctx, i, tile, Wc, Wn, need_loss, log_slot, colsq_pre, colsq_post, l1_inline, l1t, lr,
                     step_size, bc2, L);
    ctx.grid_sync();

    // Q: best projected iterate (quantization), among iterates with the final mask
    if (p.bits > 0 && i >= p.best_from) {
      double part = 0.0;
      for (int t = tid; t < p.ntiles; t += kThreads) part += ld_cg(p.loss_part + (i & 1) * p.ntiles + t);
      const double total = block_sum(sh, ctx, part) + p.f0;
      if (total < best) {
        best = total;
        for (int tile = bid; tile < p.ntiles; tile += nb) {
          int g, mi, ni;
          tile_coords(p, tile, &g, &mi, &ni);
          for (int e = tid; e < kTileM * kTileN; e += kThreads) {
            const int r = mi * kTileM + e / kTileN, c = ni * kTileN + e % kTileN;
            if (r >= p.R || c >= p.D) continue;
            const long long idx = ((long long)g * p.R + r) * p.D + c;
            p.best_W[idx] = Wc[idx];
          }
          if (p.scale_mode == 1 && ni == 0 && tid < kTileM && mi * kTileM + tid < p.R) {
            const long long row = (long long)g * p.R + mi * kTileM + tid;
            p.best_scale[row] = ld_cg(p.scale + row);
          }
        }
        if (p.scale_mode != 1 && bid == 0 && tid == 0) p.best_scale[0] = ld_cg(p.scale);
      }
    }

    if (coupled) {
      // C1: channel norms (distributed), n:m masks, first digit of the weight select
      if (colsq_pre || colsq_post) {
        for (long long ch = gtid; ch < (long long)p.G * p.gi; ch += gstride) {
          const long long g = ch / p.gi, ci = ch % p.gi;
          double sa = 0.0, sb = 0.0;
          for (int mi = 0; mi < p.mt; ++mi)
            for (int t = 0; t < p.taps; ++t) {
              const long long o = (g * p.mt + mi) * p.D + ci * p.taps + t;
              if (colsq_pre) sa += ld_cg(p.colsq_a + o);
              if (colsq_post) sb += ld_cg(p.colsq_b + o);
            }
          if (colsq_pre) p.norm_a[ch] = static_cast<T>(cd_sqrt(sa));
          if (colsq_post) p.norm_b[ch] = static_cast<T>(cd_sqrt(sb));
        }
      }
      if (nm_now) {
        const int ngroups = p.gi / p.nm_m;
        const long long items = (long long)p.G * p.R * ngroups * p.taps;
        for (long long it = gtid; it < items; it += gstride) {
          const long long row = it / ((long long)ngroups * p.taps);
          const int q = static_cast<int>(it % ((long long)ngroups * p.taps));
          const int mg = q / p.taps, tap = q % p.taps;
          U keys[kMaxNM];
          for (int j = 0; j < p.nm_m; ++j)
            keys[j] = key_of(cd_fabs(ld_cg(Wn + row * p.D + (long long)(mg * p.nm_m + j) * p.taps + tap)));
          for (int j = 0; j < p.nm_m; ++j) {
            int rank = 0;
            for (int jj = 0; jj < p.nm_m; ++jj) rank += (keys[jj] > keys[j]) || (keys[jj] == keys[j] && jj < j);
            if (rank >= p.nm_n) p.mask[row * p.D + (long long)(mg * p.nm_m + j) * p.taps + tap] = 0;
          }
        }
      }
      U wprefix = 0, wpmask = 0;
      long long wrem = weight_k;
      WeightSel ws{0, 0, 0};
      if (wsel_on) {  // digit 0 of the global radix select
        for (int b = tid; b < kBins; b += kThreads) sh.hist[b] = 0;
        ctx.sync();
        for (int tile = bid; tile < p.ntiles; tile += nb) {
          int g, mi, ni;
          tile_coords(p, tile, &g, &mi, &ni);
          for (int e = tid; e < kTileM * kTileN; e += kThreads) {
            const int r = mi * kTileM + e / kTileN, c = ni * kTileN + e % kTileN;
            if (r >= p.R || c >= p.wc) continue;
            const U key = key_of(cd_fabs(Wn[((long long)g * p.R + r) * p.D + c]));
            atomic_add(&sh.hist[key >> digit_shift(Key<T>::bits, 0)], 1);
          }
        }
        ctx.sync();
        for (int b = tid; b < kBins; b += kThreads)
          if (sh.hist[b]) atomic_add(&p.hist[b], sh.hist[b]);
      }
      if (colsq_pre || colsq_post || nm_now || wsel_on) ctx.grid_sync();

      if (wsel_on) {  // the other digits, one grid sync each
        for (int ps = 0; ps < passes; ++ps) {
          const int sh_ = digit_shift(Key<T>::bits, ps), width = digit_width(Key<T>::bits, ps);
          const U dmask = (U(1) << width) - 1;
          int digit;
          long long above, count;
          find_bucket(sh, ctx, p.hist + ps * kBins, true, 1 << width, wrem, &digit, &above, &count);
          wrem -= above;
          wprefix |= static_cast<U>(digit) << sh_;
          wpmask |= dmask << sh_;
          ws.eqtot = count;
          if (ps + 1 == passes) break;
          const int sh2 = digit_shift(Key<T>::bits, ps + 1), w2 = digit_width(Key<T>::bits, ps + 1);
          const U dmask2 = (U(1) << w2) - 1;
          for (int b = tid; b < kBins; b += kThreads) sh.hist[b] = 0;
          ctx.sync();
          for (int tile = bid; tile < p.ntiles; tile += nb) {
            int g, mi, ni;
            tile_coords(p, tile, &g, &mi, &ni);
            for (int e = tid; e < kTileM * kTileN; e += kThreads) {
              const int r = mi * kTileM + e / kTileN, c = ni * kTileN + e % kTileN;
              if (r >= p.R || c >= p.wc) continue;
              const U key = key_of(cd_fabs(Wn[((long long)g * p.R + r) * p.D + c]));
              if ((key & wpmask) == wprefix) atomic_add(&sh.hist[(key >> sh2) & dmask2], 1);
            }
          }
          ctx.sync();
          for (int b = tid; b < kBins; b += kThreads)
            if (sh.hist[b]) atomic_add(&p.hist[(ps + 1) * kBins + b], sh.hist[b]);
          ctx.grid_sync();
        }
        ws.thr = static_cast<unsigned long long>(wprefix);
        ws.need = wrem;
        if (ws.need != ws.eqtot) {  // ties at the threshold: count them per tile
          for (int tile = bid; tile < p.ntiles; tile += nb) {
            int g, mi, ni;
            tile_coords(p, tile, &g, &mi, &ni);
            long long c = 0;
            for (int e = tid; e < kTileM * kTileN; e += kThreads) {
              const int r = mi * kTileM + e / kTileN, col = ni * kTileN + e % kTileN;
              if (r >= p.R || col >= p.wc) continue;
              c += key_of(cd_fabs(Wn[((long long)g * p.R + r) * p.D + col])) == wprefix;
            }
            c = block_sum_ll(sh, ctx, c);
            if (tid == 0) p.eqcnt[tile] = c;
          }
          ctx.grid_sync();
        }
      }

      // C2: on own tiles: masks, penalties, W *= mask
      int sel_group = -1;
      U chan_thr = 0;
      long long chan_need = 0, chan_eqtot = 0;
      for (int tile = bid; tile < p.ntiles; tile += nb) {
        int g, mi, ni;
        tile_coords(p, tile, &g, &mi, &ni);
        if (chan_k > 0 && g != sel_group) {
          block_select(sh, ctx, p.norm_a + (long long)g * p.gi, p.gi, chan_k, &chan_thr, &chan_need, &chan_eqtot);
          sel_group = g;
        }
        long long tile_before = 0;
        if (wsel_on && ws.need != ws.eqtot) {
          long long part = 0;
          for (int t = tid; t < tile; t += kThreads) part += ld_cg(p.eqcnt + t);
          tile_before = block_sum_ll(sh, ctx, part);
        }
        apply_tile(p, sh, ctx, tile, Wn, chan_k, chan_k > 0, chan_thr, chan_need, chan_eqtot, wsel_on, ws,
                   tile_before, mask_op, l1_on, gl_on, l1t, glt);
        ctx.sync();
      }
      ctx.grid_sync();
    }

    // R: closed-form scale refit with the current codes
    if (refit) {
      for (int tile = bid; tile < p.ntiles; tile += nb) {
        int g, mi, ni;
        tile_coords(p, tile, &g, &mi, &ni);
        const int r0 = mi * kTileM, c0 = ni * kTileN;
        T acc[4][4];
        gemm_tile(p, sh, ctx, Wn, 1, g, r0, c0, L, acc);
        const int ty = tid / 16, tx = tid % 16;
        for (int pass = 0; pass < 2; ++pass) {  // 0: den = z.H.z, 1: num = z.r
          for (int ii = 0; ii < 4; ++ii) {
            const int r = r0 + ty * 4 + ii;
            double s = 0.0;
            if (r < p.R)
              for (int jj = 0; jj < 4; ++jj) {
                const int c = c0 + tx * 4 + jj;
                if (c >= p.D) continue;
                const double z = static_cast<double>(z_at(p, Wn, g, r, c, L));
                if (pass == 0)
                  s += static_cast<double>(acc[ii][jj]) * z;
                else {
                  double rq = static_cast<double>(ld_ro(p.Rq + ((long long)g * p.R + r) * p.D + c));
                  if (p.wc < p.D)  // the fitted bias column u is held fixed: r - u.H
                    rq -= static_cast<double>(ld_cg(Wn + ((long long)g * p.R + r) * p.D + p.wc)) *
                          static_cast<double>(ld_ro(p.H + ((long long)g * p.D + p.wc) * p.D + c));
                  s += z * rq;
                }
              }
            sh.rowred[ty * 4 + ii][tx] = s;
          }
          ctx.sync();
          if (tid < kTileM && r0 + tid < p.R) {
            double s = 0.0;
            for (int t = 0; t < 16; ++t) s += sh.rowred[tid][t];
            const long long row = (long long)g * p.R + r0 + tid;
            (pass == 0 ? p.den_part : p.num_part)[row * p.nt + ni] = s;
          }
          ctx.sync();
        }
      }
      ctx.grid_sync();
      const long long rows = (long long)p.G * p.R;
      if (p.scale_mode == 1) {
        for (long long row = gtid; row < rows; row += gstride) {
          double num = 0.0, den = 0.0;
          for (int t = 0; t < p.nt; ++t) {
            num += ld_cg(p.num_part + row * p.nt + t);
            den += ld_cg(p.den_part + row * p.nt + t);
          }
          if (den > 0.0 && num > 0.0) {
            const double d = den > static_cast<double>(Limits<T>::tiny) ? den : static_cast<double>(Limits<T>::tiny);
            p.scale[row] = static_cast<T>(num / d);
          }
        }
      } else if (bid == 0) {
        double num = 0.0, den = 0.0;
        for (long long j = tid; j < rows * p.nt; j += kThreads) {
          num += ld_cg(p.num_part + j);
          den += ld_cg(p.den_part + j);
        }
        num = block_sum(sh, ctx, num);
        den = block_sum(sh, ctx, den);
        if (tid == 0 && den > 0.0 && num > 0.0) {
          const double d = den > static_cast<double>(Limits<T>::tiny) ? den : static_cast<double>(Limits<T>::tiny);
          p.scale[0] = static_cast<T>(num / d);
        }
      }
      ctx.grid_sync();
    }
  }

  // The final iterate is in W_{steps}: buffer steps & 1.
  if (p.steps & 1) {
    for (int tile = bid; tile < p.ntiles; tile += nb) {
      int g, mi, ni;
      tile_coords(p, tile, &g, &mi, &ni);
      for (int e = tid; e < kTileM * kTileN; e += kThreads) {
        const int r = mi * kTileM + e / kTileN, c = ni * kTileN + e % kTileN;
        if (r >= p.R || c >= p.D) continue;
        const long long idx = ((long long)g * p.R + r) * p.D + c;
        p.W[idx] = p.Wb[idx];
      }
    }
  }
  if (bid == 0 && tid == 0 && p.best_val) *p.best_val = best;
}

}  // namespace cdfast
