// cdfast._cpu: CPU kernels of the operators that pay for themselves.
//
// * topk_mask (cdfast.layer.constraints.topk_mask): the budget schedules select the
//   k largest of every weight magnitude at each ramp step; a radix select is 5x
//   faster than torch.topk there (1.1-1.2x on a whole distill_layer call with a
//   weight budget, bench/). The other projection operators gained nothing
//   measurable over torch and were removed.
// * sweep_block, coordinate_block (cdfast.layer.solvers.sweep): the column loops of
//   the exact solver's sweeps and coordinate passes. In torch every column costs a
//   handful of operator calls, which on a layer of a few hundred columns is most of
//   the solve; here a block of columns is one call, its rows split over threads.
//
// The function works on raw pointers (tensor.data_ptr()) and sizes; the Python
// wrapper in cdfast/_backends/cpp.py checks dtypes, devices, shapes and
// contiguity before calling.
//
// dtype codes: 0 = float32, 1 = float64.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kSerialBelow = 1 << 15;  // elements: below this, one thread

// This thread's index inside an OpenMP parallel region (0 without OpenMP).
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

int threads_for(int64_t work, int nthreads) {
  if (nthreads < 1) nthreads = 1;
  if (work < kSerialBelow) return 1;
  int64_t useful = work / kSerialBelow;
  return static_cast<int>(std::min<int64_t>(nthreads, std::max<int64_t>(1, useful)));
}

template <class T>
T* ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

void check_ptr(const char* name, int64_t p, int64_t n) {
  if (n > 0 && p == 0) throw std::invalid_argument(std::string(name) + ": null pointer");
}

void check_dtype(int dtype) {
  if (dtype != 0 && dtype != 1)
    throw std::invalid_argument("dtype: expected 0 (float32) or 1 (float64), got " + std::to_string(dtype));
}

// -------------------------------------------------------------------- top-k
// Radix select on order-preserving integer keys: NaN is the largest value (as
// torch.topk), -0.0 == +0.0. The k-th largest key T is found digit by digit
// (11-bit digits, histograms per thread); then every key > T is kept and the
// k - #(> T) lowest-index keys equal to T.
template <class T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using U = uint32_t;
  static constexpr int bits = 32;
  static constexpr int first_digit = 16;  // sign, exponent, 7 mantissa bits
  static U key(float x) {
    x = x + 0.0f;  // -0 -> +0 (round to nearest)
    U u;
    std::memcpy(&u, &x, sizeof u);
    const U flip = (U(0) - (u >> 31)) | 0x80000000u;  // negative: all bits, else the sign bit
    const U k = u ^ flip;
    return x != x ? ~U(0) : k;  // every NaN is the largest
  }
};
template <>
struct KeyOf<double> {
  using U = uint64_t;
  static constexpr int bits = 64;
  static constexpr int first_digit = 16;  // sign, exponent, 4 mantissa bits: few candidates left
  static U key(double x) {
    x = x + 0.0;
    U u;
    std::memcpy(&u, &x, sizeof u);
    const U flip = (U(0) - (u >> 63)) | 0x8000000000000000ull;
    const U k = u ^ flip;
    return x != x ? ~U(0) : k;
  }
};

template <class T>
void topk_mask_impl(const T* __restrict s, bool* __restrict out, int64_t n, int64_t k, int nt) {
  using K = KeyOf<T>;
  using U = typename K::U;
  if (k <= 0) {
    std::memset(out, 0, static_cast<size_t>(n));
    return;
  }
  if (k >= n) {
    std::memset(out, 1, static_cast<size_t>(n));
    return;
  }
  constexpr int kDigit = 11;
  constexpr int kBins = 1 << kDigit;
  const int nthr = threads_for(n, nt);
  // Pass 1 (parallel, over every key): histogram of the top digit.
  constexpr int kBins0 = 1 << K::first_digit;
  const int shift0 = K::bits - K::first_digit;
  std::vector<int64_t> hist(static_cast<size_t>(nthr) * kBins0, 0);
#pragma omp parallel num_threads(nthr)
  {
    const int tid = thread_id();
    const int64_t lo = n * tid / nthr, hi = n * (tid + 1) / nthr;
    int64_t* h = hist.data() + static_cast<size_t>(tid) * kBins0;
    for (int64_t i = lo; i < hi; ++i) ++h[K::key(s[i]) >> shift0];
  }
  int64_t remaining = k;  // keys still to take among those matching the prefix
  int b = kBins0 - 1;
  int64_t in_bucket = 0;
  for (;; --b) {
    int64_t c = 0;
    for (int th = 0; th < nthr; ++th) c += hist[static_cast<size_t>(th) * kBins0 + b];
    if (c >= remaining) {
      in_bucket = c;
      break;
    }
    remaining -= c;
  }
  U prefix = static_cast<U>(b) << shift0;
  // Gather the keys of that bucket (usually a small fraction), then refine them serially.
  std::vector<U> cand(static_cast<size_t>(in_bucket));
  std::vector<int64_t> offset(static_cast<size_t>(nthr) + 1, 0);
  for (int th = 0; th < nthr; ++th) offset[th + 1] = offset[th] + hist[static_cast<size_t>(th) * kBins0 + b];
#pragma omp parallel num_threads(nthr)
  {
    const int tid = thread_id();
    const int64_t lo = n * tid / nthr, hi = n * (tid + 1) / nthr;
    U* dst = cand.data() + offset[tid];
    const U want = static_cast<U>(b);
    for (int64_t i = lo; i < hi; ++i) {
      const U key = K::key(s[i]);
      if ((key >> shift0) == want) *dst++ = key;
    }
  }
  int64_t eq_total = in_bucket;  // keys equal to the threshold
  std::vector<int64_t> h1(kBins);
  for (int shift = shift0 - kDigit; shift > -kDigit; shift -= kDigit) {
    const int sh = std::max(shift, 0);
    const int width = shift >= 0 ? kDigit : kDigit + shift;
    const U dmask = (U(1) << width) - 1;
    std::fill(h1.begin(), h1.end(), 0);
    for (const U key : cand) ++h1[(key >> sh) & dmask];
    int d = static_cast<int>(dmask);
    for (;; --d) {
      if (h1[d] >= remaining) break;
      remaining -= h1[d];
    }
    prefix |= static_cast<U>(d) << sh;
    eq_total = h1[d];
    size_t m = 0;
    for (const U key : cand)
      if (((key >> sh) & dmask) == static_cast<U>(d)) cand[m++] = key;
    cand.resize(m);
  }
  const U thr = prefix;
  const int64_t need_eq = remaining;  // keys equal to thr to keep, lowest index first
  if (need_eq == eq_total) {  // no tie to break: one pass
#pragma omp parallel for schedule(static) num_threads(nthr)
    for (int64_t i = 0; i < n; ++i) out[i] = K::key(s[i]) >= thr;
    return;
  }
  std::vector<int64_t> eq(static_cast<size_t>(nthr) + 1, 0);
#pragma omp parallel num_threads(nthr)
  {
    const int tid = thread_id();
    const int64_t lo = n * tid / nthr, hi = n * (tid + 1) / nthr;
    int64_t c = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const U key = K::key(s[i]);
      out[i] = key > thr;
      c += key == thr;
    }
    eq[tid + 1] = c;
#pragma omp barrier
#pragma omp single
    for (int th = 0; th < nthr; ++th) eq[th + 1] += eq[th];
    int64_t before = eq[tid];
    if (before < need_eq)
      for (int64_t i = lo; i < hi && before < need_eq; ++i)
        if (K::key(s[i]) == thr) {
          out[i] = true;
          ++before;
        }
  }
}

void topk_mask(int64_t scores, int64_t out, int64_t n, int64_t k, int dtype, int nthreads) {
  check_dtype(dtype);
  if (n < 0) throw std::invalid_argument("n: expected >= 0");
  if (k > n) throw std::invalid_argument("k: expected at most " + std::to_string(n) + ", got " + std::to_string(k));
  check_ptr("scores", scores, n);
  check_ptr("out", out, n);
  if (n == 0) return;
  py::gil_scoped_release nogil;
  if (dtype == 0)
    topk_mask_impl(ptr<const float>(scores), ptr<bool>(out), n, k, nthreads);
  else
    topk_mask_impl(ptr<const double>(scores), ptr<bool>(out), n, k, nthreads);
}

// ------------------------------------------------------------ column blocks
// A block is n columns of the transposed weight: rows of R contiguous elements. Each array
// has its own group stride (gs_*); square n x n blocks (V, U, H) have row stride ld; inv
// and step are (G, R) with group stride gr; pivots and neg_inv (G, n) with group stride gp.
// Every operation is elementwise along a row r, so rows are split over threads.
template <class T>
inline T fix_value(T w, const T* inv, const T* step, int64_t r, T levels, bool grid, const T* mrow) {
  if (grid) {
    T q = std::nearbyint(w * inv[r]);
    q = q < -levels ? -levels : (q > levels ? levels : q);
    w = q * step[r];
  }
  if (mrow) w = w * mrow[r];
  return w;
}

template <class T>
inline T* at(T* p, int64_t g, int64_t stride) {
  return p ? p + g * stride : nullptr;
}

constexpr int64_t kRowChunk = 256;

template <class T>
void sweep_block_impl(T* W, int64_t gsW, const T* Tg, int64_t gsT, const T* V, int64_t gsV, T* D, int64_t gsD, T* Y,
                      int64_t gsY, T* M, int64_t gsM, const T* inv, const T* step, int64_t gr, T levels, int64_t grid,
                      int64_t nm_m, int64_t nm_keep, const T* U, int64_t gsU, const T* piv, int64_t gp,
                      int64_t nm_cols, int64_t G, int64_t n, int64_t R, int64_t ld, int nthreads) {
  const int64_t chunks = (R + kRowChunk - 1) / kRowChunk;
  const int nthr = threads_for(G * n * n * R, nthreads);
#pragma omp parallel for schedule(static) num_threads(nthr)
  for (int64_t job = 0; job < G * chunks; ++job) {
    const int64_t g = job / chunks, r0 = (job % chunks) * kRowChunk, r1 = std::min(R, r0 + kRowChunk);
    T* Wg = at(W, g, gsW);
    const T* Tq = at(Tg, g, gsT);
    const T* Vg = at(V, g, gsV);
    T* Dg = at(D, g, gsD);
    T* Yg = at(Y, g, gsY);
    T* Mg = at(M, g, gsM);
    const T* ig = at(inv, g, gr);
    const T* sg = at(step, g, gr);
    const T* Ug = at(U, g, gsU);
    const T* pg = at(piv, g, gp);
    // per N:M group, for the job's rows: x = the group's values minus t, sc = the scores,
    // above = how many of the group's scores beat each (row-contiguous, so the loops vectorise)
    const int64_t width = r1 - r0, m = std::max<int64_t>(nm_m, 1);
    std::vector<T> x(static_cast<size_t>(m * width)), sc(x.size());
    std::vector<int32_t> above(nm_m > 0 ? static_cast<size_t>(width) : 0);
    for (int64_t i = 0; i < n; ++i) {
      T* wi = Wg + i * R;
      if (nm_m > 0 && i % nm_m == 0 && i < nm_cols) {
        // the group's values with every earlier column fixed: t + (Ũ_wwᵀ)⁻¹·(d·(w − t))
        for (int64_t k = 0; k < nm_m; ++k) {
          const T dk = Ug[(i + k) * ld + i + k];
          const T* wk = Wg + (i + k) * R + r0;
          const T* tk = Tq + (i + k) * R + r0;
          T* xk = x.data() + k * width;
          for (int64_t r = 0; r < width; ++r) xk[r] = (wk[r] - tk[r]) * dk;
          for (int64_t l = 0; l < k; ++l) {
            const T c = Ug[(i + l) * ld + i + k];
            const T* xl = x.data() + l * width;
            for (int64_t r = 0; r < width; ++r) xk[r] -= c * xl[r];
          }
          const T p = pg[i + k];
          T* sk = sc.data() + k * width;
          for (int64_t r = 0; r < width; ++r) {
            xk[r] /= dk;
            const T v = tk[r] + xk[r];
            sk[r] = v * v * p;
          }
        }
        for (int64_t k = 0; k < nm_m; ++k) {  // kept: fewer than nm_keep scores beat it (ties: lower index)
          const T* sk = sc.data() + k * width;
          std::fill(above.begin(), above.end(), 0);
          for (int64_t l = 0; l < nm_m; ++l) {
            const T* sl = sc.data() + l * width;
            if (l < k)
              for (int64_t r = 0; r < width; ++r) above[r] += sl[r] >= sk[r];
            else if (l > k)
              for (int64_t r = 0; r < width; ++r) above[r] += sl[r] > sk[r];
          }
          T* mk = Mg + (i + k) * R + r0;
          for (int64_t r = 0; r < width; ++r) mk[r] = above[r] < nm_keep ? T(1) : T(0);
        }
      }
      const bool gridded = ig && i < grid;
      const T* mrow = Mg ? Mg + i * R : nullptr;
      T* di = Dg + i * R;
      const T* ti = Tq + i * R;
      T* yi = Yg ? Yg + i * R : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        const T w = wi[r];
        const T q = fix_value(w, ig, sg, r, levels, gridded, mrow);
        wi[r] = q;
        di[r] = ti[r] - q;
        if (yi) yi[r] = w - q;
      }
      for (int64_t k = i + 1; k < n; ++k) {
        const T c = Vg[i * ld + k];
        T* wk = Wg + k * R;
        for (int64_t r = r0; r < r1; ++r) wk[r] += c * di[r];
      }
    }
  }
}

template <class T>
void coordinate_block_impl(T* W, int64_t gsW, T* g, int64_t gsg, const T* H, int64_t gsH, const T* neg_inv,
                           int64_t gp, T* D, int64_t gsD, const T* M, int64_t gsM, const T* inv, const T* step,
                           int64_t gr, T levels, int64_t grid, int64_t G, int64_t n, int64_t R, int64_t ld,
                           int nthreads) {
  const int64_t chunks = (R + kRowChunk - 1) / kRowChunk;
  const int nthr = threads_for(G * n * n * R, nthreads);
#pragma omp parallel for schedule(static) num_threads(nthr)
  for (int64_t job = 0; job < G * chunks; ++job) {
    const int64_t b = job / chunks, r0 = (job % chunks) * kRowChunk, r1 = std::min(R, r0 + kRowChunk);
    T* Wg = at(W, b, gsW);
    T* gg = at(g, b, gsg);
    const T* Hg = at(H, b, gsH);
    const T* ng = at(neg_inv, b, gp);
    T* Dg = at(D, b, gsD);
    const T* Mg = at(M, b, gsM);
    const T* ig = at(inv, b, gr);
    const T* sg = at(step, b, gr);
    for (int64_t i = 0; i < n; ++i) {
      T* wi = Wg + i * R;
      const T* gi = gg + i * R;
      T* di = Dg + i * R;
      const T ni = ng[i];
      const bool gridded = ig && i < grid;
      const T* mrow = Mg ? Mg + i * R : nullptr;
      for (int64_t r = r0; r < r1; ++r) {
        const T w = wi[r];
        const T q = fix_value(T(w + gi[r] * ni), ig, sg, r, levels, gridded, mrow);
        wi[r] = q;
        di[r] = q - w;
      }
      for (int64_t k = i + 1; k < n; ++k) {
        const T c = Hg[k * ld + i];
        T* gk = gg + k * R;
        for (int64_t r = r0; r < r1; ++r) gk[r] += c * di[r];
      }
    }
  }
}

void check_block(int64_t G, int64_t n, int64_t R, int64_t ld) {
  if (G < 1 || n < 1 || R < 1) throw std::invalid_argument("G, n, R: expected >= 1");
  if (ld < n) throw std::invalid_argument("ld: expected at least n");
}

void sweep_block(int64_t W, int64_t gsW, int64_t T, int64_t gsT, int64_t V, int64_t gsV, int64_t D, int64_t gsD,
                 int64_t Y, int64_t gsY, int64_t M, int64_t gsM, int64_t inv, int64_t step, int64_t gr, double levels,
                 int64_t grid, int64_t nm_m, int64_t nm_keep, int64_t U, int64_t gsU, int64_t piv, int64_t gp,
                 int64_t nm_cols, int64_t G, int64_t n, int64_t R, int64_t ld, int dtype, int nthreads) {
  check_dtype(dtype);
  check_block(G, n, R, ld);
  check_ptr("W", W, 1);
  check_ptr("T", T, 1);
  check_ptr("V", V, 1);
  check_ptr("D", D, 1);
  if ((inv == 0) != (step == 0)) throw std::invalid_argument("inv, step: give both or neither");
  // an N:M group starts at every m-th column before cols and must end inside the block
  // (columns from cols on, a fitted bias, are never grouped)
  const int64_t groups = nm_m > 0 ? (std::max<int64_t>(0, std::min(n, nm_cols)) + nm_m - 1) / nm_m : 0;
  if (nm_m > 0 && (M == 0 || U == 0 || piv == 0 || nm_keep < 0 || nm_keep > nm_m || groups * nm_m > n))
    throw std::invalid_argument("nm: needs the mask, U and pivots, 0 <= keep <= m, and whole groups in the block");
  py::gil_scoped_release nogil;
  if (dtype == 0)
    sweep_block_impl(ptr<float>(W), gsW, ptr<const float>(T), gsT, ptr<const float>(V), gsV, ptr<float>(D), gsD,
                     ptr<float>(Y), gsY, ptr<float>(M), gsM, ptr<const float>(inv), ptr<const float>(step), gr,
                     float(levels), grid, nm_m, nm_keep, ptr<const float>(U), gsU, ptr<const float>(piv), gp, nm_cols,
                     G, n, R, ld, nthreads);
  else
    sweep_block_impl(ptr<double>(W), gsW, ptr<const double>(T), gsT, ptr<const double>(V), gsV, ptr<double>(D), gsD,
                     ptr<double>(Y), gsY, ptr<double>(M), gsM, ptr<const double>(inv), ptr<const double>(step), gr,
                     levels, grid, nm_m, nm_keep, ptr<const double>(U), gsU, ptr<const double>(piv), gp, nm_cols, G,
                     n, R, ld, nthreads);
}

void coordinate_block(int64_t W, int64_t gsW, int64_t g, int64_t gsg, int64_t H, int64_t gsH, int64_t neg_inv,
                      int64_t gp, int64_t D, int64_t gsD, int64_t M, int64_t gsM, int64_t inv, int64_t step,
                      int64_t gr, double levels, int64_t grid, int64_t G, int64_t n, int64_t R, int64_t ld,
                      int dtype, int nthreads) {
  check_dtype(dtype);
  check_block(G, n, R, ld);
  check_ptr("W", W, 1);
  check_ptr("g", g, 1);
  check_ptr("H", H, 1);
  check_ptr("neg_inv", neg_inv, 1);
  check_ptr("D", D, 1);
  if ((inv == 0) != (step == 0)) throw std::invalid_argument("inv, step: give both or neither");
  py::gil_scoped_release nogil;
  if (dtype == 0)
    coordinate_block_impl(ptr<float>(W), gsW, ptr<float>(g), gsg, ptr<const float>(H), gsH,
                          ptr<const float>(neg_inv), gp, ptr<float>(D), gsD, ptr<const float>(M), gsM,
                          ptr<const float>(inv), ptr<const float>(step), gr, float(levels), grid, G, n, R, ld,
                          nthreads);
  else
    coordinate_block_impl(ptr<double>(W), gsW, ptr<double>(g), gsg, ptr<const double>(H), gsH,
                          ptr<const double>(neg_inv), gp, ptr<double>(D), gsD, ptr<const double>(M), gsM,
                          ptr<const double>(inv), ptr<const double>(step), gr, levels, grid, G, n, R, ld, nthreads);
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "cdfast CPU kernels: top-k selection and the exact solver's column blocks (see cdfast/_backends/cpp.py)";
  m.def("topk_mask", &topk_mask, py::arg("scores"), py::arg("out"), py::arg("n"), py::arg("k"), py::arg("dtype"),
        py::arg("nthreads") = 1, "out (bool) marks the k largest scores; ties by lowest index");
  m.def("sweep_block", &sweep_block, "fix a block of columns of a sweep in place (cdfast.layer.solvers.sweep)");
  m.def("coordinate_block", &coordinate_block, "one block of a coordinate pass in place (cdfast.layer.solvers.sweep)");
  m.def("max_threads", &max_threads);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
