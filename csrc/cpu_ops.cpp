// cdfast._cpu: the projection operators of cdfast.constraints on the CPU.
//
// Every function works on raw pointers (tensor.data_ptr()) and sizes; the Python
// wrappers in cdfast/_backends/cpp.py check dtypes, devices, shapes and
// contiguity before calling. The semantics are those of the torch oracle
// (cdfast.constraints): same formulas, same order of the floating-point
// operations where it matters for bitwise equality (soft_threshold, quantize),
// double accumulation for the channel norms.
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

// ------------------------------------------------------------- soft threshold
// sign(w) * max(|w| - t, 0), t cast to T first (as torch does with a Python scalar).
template <class T>
void soft_threshold_impl(const T* __restrict in, T* __restrict out, int64_t n, double threshold, int nt) {
  const T t = static_cast<T>(threshold);
  const T zero = T(0);
#pragma omp parallel for schedule(static) num_threads(threads_for(n, nt))
  for (int64_t i = 0; i < n; ++i) {
    // Branch-free (random signs would defeat the branch predictor): selects only.
    const T w = in[i];
    T a = std::fabs(w) - t;
    a = a > zero ? a : zero;
    T r = std::copysign(a, w);
    r = w == zero ? zero : r;  // sign(0) = 0, whatever t
    out[i] = w != w ? w : r;   // NaN stays NaN
  }
}

void soft_threshold(int64_t in, int64_t out, int64_t n, double threshold, int dtype, int nthreads) {
  check_dtype(dtype);
  if (n < 0) throw std::invalid_argument("n: expected >= 0");
  check_ptr("w", in, n);
  check_ptr("out", out, n);
  py::gil_scoped_release nogil;
  if (dtype == 0)
    soft_threshold_impl(ptr<const float>(in), ptr<float>(out), n, threshold, nthreads);
  else
    soft_threshold_impl(ptr<const double>(in), ptr<double>(out), n, threshold, nthreads);
}

// ---------------------------------------------------------------- group shrink
// W: (G, R, C) rows, the first group_in*taps columns are the weight (input
// channel major, then tap), a trailing bias column (C = group_in*taps + 1) is
// left as it is. norm_{g,i} = ||W[g, :, i*taps:(i+1)*taps]||_2 (accumulated in
// double), factor = max(1 - t / max(norm, tiny), 0).
template <class T>
void group_shrink_impl(const T* __restrict in, T* __restrict out, int64_t G, int64_t R, int64_t C,
                       int64_t group_in, int64_t taps, double threshold, int nt) {
  const int64_t wc = group_in * taps;
  const int64_t rows = G * R;
  const int nthr = threads_for(rows * C, nt);
  std::vector<double> sq(static_cast<size_t>(nthr) * G * wc, 0.0);
  std::vector<T> factor(static_cast<size_t>(G * C));
  const double tiny = static_cast<double>(std::numeric_limits<T>::min());
#pragma omp parallel num_threads(nthr)
  {
    const int tid = thread_id();
    double* mine = sq.data() + static_cast<size_t>(tid) * G * wc;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = r / R;
      const T* row = in + r * C;
      double* acc = mine + g * wc;
      for (int64_t j = 0; j < wc; ++j) {
        const double v = static_cast<double>(row[j]);
        acc[j] += v * v;
      }
    }
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < G * group_in; ++gi) {
      const int64_t g = gi / group_in, i = gi % group_in;
      double s = 0.0;
      for (int th = 0; th < nthr; ++th) {
        const double* a = sq.data() + (static_cast<size_t>(th) * G + g) * wc + i * taps;
        for (int64_t t = 0; t < taps; ++t) s += a[t];
      }
      const double norm = std::max(std::sqrt(s), tiny);
      const double f = std::max(1.0 - threshold / norm, 0.0);
      const T fT = static_cast<T>(f);
      for (int64_t t = 0; t < taps; ++t) factor[g * C + i * taps + t] = fT;
      if (i == 0)
        for (int64_t j = wc; j < C; ++j) factor[g * C + j] = T(1);
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = r / R;
      const T* row = in + r * C;
      const T* f = factor.data() + g * C;
      T* o = out + r * C;
      for (int64_t j = 0; j < C; ++j) o[j] = row[j] * f[j];
    }
  }
}

void group_shrink(int64_t in, int64_t out, int64_t G, int64_t R, int64_t C, int64_t group_in, int64_t taps,
                  double threshold, int dtype, int nthreads) {
  check_dtype(dtype);
  if (G < 1 || R < 0 || group_in < 1 || taps < 1)
    throw std::invalid_argument("geometry: expected groups, group_in, taps >= 1 and rows >= 0");
  if (C != group_in * taps && C != group_in * taps + 1)
    throw std::invalid_argument("W: expected group_in*taps columns (+1 for a bias), got " + std::to_string(C));
  const int64_t n = G * R * C;
  check_ptr("W", in, n);
  check_ptr("out", out, n);
  if (n == 0) return;
  py::gil_scoped_release nogil;
  if (dtype == 0)
    group_shrink_impl(ptr<const float>(in), ptr<float>(out), G, R, C, group_in, taps, threshold, nthreads);
  else
    group_shrink_impl(ptr<const double>(in), ptr<double>(out), G, R, C, group_in, taps, threshold, nthreads);
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

// ------------------------------------------------------------------ quantize
// codes = clamp(round(W / s * L), -L, L) (round half to even), values = codes * (s / L).
// scale_mode: 0 one scale, 1 one per row of `cols` elements, 2 one per element.
// Round half to even of |x| <= 2^22 without a libm call (vectorizes): adding and
// subtracting 1.5*2^(mantissa bits) rounds in the FPU's default mode, nearest-even.
// Valid because the build never enables -ffast-math (it would fold the two).
inline float rne(float x) {
  const float m = 12582912.0f;  // 1.5 * 2^23
  return (x + m) - m;
}
inline double rne(double x) {
  const double m = 6755399441055744.0;  // 1.5 * 2^52
  return (x + m) - m;
}

template <class T>
inline void quantize_one(T w, T s, T sL, T L, int8_t* code, T* value) {
  // Selects only, so the loop vectorizes; NaN (0/0) gives code 0 and a NaN value as torch.
  const T y = w / s * L;
  const bool nan = y != y;
  T yc = y < -L ? -L : (y > L ? L : y);
  yc = nan ? T(0) : yc;
  const T q = rne(yc);  // |yc| <= 127
  *code = static_cast<int8_t>(static_cast<int32_t>(q));
  *value = nan ? y : q * sL;
}

template <class T>
void quantize_impl(const T* __restrict W, const T* __restrict scale, int scale_mode, int64_t rows, int64_t cols,
                   int bits, int8_t* __restrict codes, T* __restrict values, int nt) {
  const T L = static_cast<T>((1 << (bits - 1)) - 1);
  const int64_t n = rows * cols;
  if (scale_mode == 2) {
#pragma omp parallel for schedule(static) num_threads(threads_for(n, nt))
    for (int64_t i = 0; i < n; ++i) quantize_one(W[i], scale[i], scale[i] / L, L, codes + i, values + i);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(threads_for(n, nt))
  for (int64_t r = 0; r < rows; ++r) {
    const T s = scale_mode == 0 ? scale[0] : scale[r];
    const T sL = s / L;
    const T* w = W + r * cols;
    int8_t* c = codes + r * cols;
    T* v = values + r * cols;
    for (int64_t j = 0; j < cols; ++j) quantize_one(w[j], s, sL, L, c + j, v + j);
  }
}

void quantize(int64_t W, int64_t scale, int scale_mode, int64_t rows, int64_t cols, int bits, int64_t codes,
              int64_t values, int dtype, int nthreads) {
  check_dtype(dtype);
  if (bits < 2 || bits > 8) throw std::invalid_argument("bits: expected an int in 2..8, got " + std::to_string(bits));
  if (scale_mode < 0 || scale_mode > 2) throw std::invalid_argument("scale_mode: expected 0, 1 or 2");
  if (rows < 0 || cols < 0) throw std::invalid_argument("rows, cols: expected >= 0");
  const int64_t n = rows * cols;
  check_ptr("W", W, n);
  check_ptr("scale", scale, n);
  check_ptr("codes", codes, n);
  check_ptr("values", values, n);
  if (n == 0) return;
  py::gil_scoped_release nogil;
  if (dtype == 0)
    quantize_impl(ptr<const float>(W), ptr<const float>(scale), scale_mode, rows, cols, bits, ptr<int8_t>(codes),
                  ptr<float>(values), nthreads);
  else
    quantize_impl(ptr<const double>(W), ptr<const double>(scale), scale_mode, rows, cols, bits,
                  ptr<int8_t>(codes), ptr<double>(values), nthreads);
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
  m.doc() = "cdfast CPU kernels: projection operators on raw pointers (see cdfast/_backends/cpp.py)";
  m.def("soft_threshold", &soft_threshold, py::arg("w"), py::arg("out"), py::arg("n"), py::arg("threshold"),
        py::arg("dtype"), py::arg("nthreads") = 1,
        "out[i] = sign(w[i]) * max(|w[i]| - threshold, 0)");
  m.def("group_shrink", &group_shrink, py::arg("W"), py::arg("out"), py::arg("groups"), py::arg("rows"),
        py::arg("cols"), py::arg("group_in"), py::arg("taps"), py::arg("threshold"), py::arg("dtype"),
        py::arg("nthreads") = 1, "Group-lasso prox over input channels of the (G, R, C) matrix view");
  m.def("topk_mask", &topk_mask, py::arg("scores"), py::arg("out"), py::arg("n"), py::arg("k"), py::arg("dtype"),
        py::arg("nthreads") = 1, "out (bool) marks the k largest scores; ties by lowest index");
  m.def("quantize", &quantize, py::arg("W"), py::arg("scale"), py::arg("scale_mode"), py::arg("rows"),
        py::arg("cols"), py::arg("bits"), py::arg("codes"), py::arg("values"), py::arg("dtype"),
        py::arg("nthreads") = 1, "codes (int8) and values of W on the grid scale*{0, +-1/L, ..., +-1}");
  m.def("max_threads", &max_threads);
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
