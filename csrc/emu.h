// Portability layer of the CUDA kernels (gram_solver_kernel.cuh).
//
// The kernel bodies are written once, against a small context object `ctx`
// (thread/block ids, __syncthreads, grid-wide sync) and the helpers below. Compiled
// by nvcc (__CUDACC__) they are ordinary device code. Compiled by a host C++20
// compiler with CDFAST_EMULATE defined, every CUDA thread becomes a std::thread and
// the barriers are real barriers: tests/test_cuda.py builds that emulation and
// runs the solver's exact code path against the torch oracle on a machine without
// a GPU. The emulation is for testing only; it is never part of the wheel.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cooperative_groups.h>
#define CD_DEV __device__ __forceinline__
#define CD_HOST_DEV __host__ __device__ __forceinline__
#else
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#define CD_DEV inline
#define CD_HOST_DEV inline
#endif

namespace cdfast {

constexpr int kThreads = 256;  // threads per block, every kernel

template <class T>
struct Limits;
template <>
struct Limits<float> {
  static constexpr float tiny = 1.17549435e-38f;  // FLT_MIN
};
template <>
struct Limits<double> {
  static constexpr double tiny = 2.2250738585072014e-308;  // DBL_MIN
};

#if defined(__CUDACC__)
// ------------------------------------------------------------------- device
struct CudaCtx {
  __device__ int tid() const { return threadIdx.x; }
  __device__ int bid() const { return blockIdx.x; }
  __device__ int nblocks() const { return gridDim.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ void grid_sync() const { cooperative_groups::this_grid().sync(); }
};

// Data written by other blocks during the kernel is read through L2 (ld.global.cg),
// never through the non-coherent L1 / read-only paths.
template <class T>
__device__ __forceinline__ T ld_cg(const T* p) {
  return __ldcg(p);
}
__device__ __forceinline__ unsigned char ld_cg(const unsigned char* p) {
  return static_cast<unsigned char>(__ldcg(reinterpret_cast<const char*>(p)));
}
// Inputs that never change during the kernel.
template <class T>
__device__ __forceinline__ T ld_ro(const T* p) {
  return __ldg(p);
}
__device__ __forceinline__ int atomic_add(int* p, int v) { return atomicAdd(p, v); }
__device__ __forceinline__ float cd_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double cd_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float cd_fabs(float x) { return fabsf(x); }
__device__ __forceinline__ double cd_fabs(double x) { return fabs(x); }
__device__ __forceinline__ float cd_rint(float x) { return rintf(x); }  // half to even
__device__ __forceinline__ double cd_rint(double x) { return rint(x); }
__device__ __forceinline__ float cd_copysign(float a, float b) { return copysignf(a, b); }
__device__ __forceinline__ double cd_copysign(double a, double b) { return copysign(a, b); }
__device__ __forceinline__ uint32_t cd_bits(float x) { return __float_as_uint(x); }
__device__ __forceinline__ uint64_t cd_bits(double x) { return static_cast<uint64_t>(__double_as_longlong(x)); }
#else
// --------------------------------------------------------------- emulation
// A barrier for `count` threads that aborts the process when a thread waits
// longer than the timeout (a deadlock in the kernel would otherwise hang a test).
class EmuBarrier {
 public:
  explicit EmuBarrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = gen_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(120), [&] { return gen_ != gen; })) {
      std::fprintf(stderr, "cdfast emulation: barrier timeout (a kernel deadlock)\n");
      std::abort();
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  long gen_ = 0;
};

struct EmuCtx {
  int tid_, bid_, nblocks_;
  EmuBarrier* block_bar;
  EmuBarrier* grid_bar;
  int tid() const { return tid_; }
  int bid() const { return bid_; }
  int nblocks() const { return nblocks_; }
  void sync() const { block_bar->wait(); }
  void grid_sync() const { grid_bar->wait(); }
};

template <class T>
inline T ld_cg(const T* p) {
  return std::atomic_ref<T>(*const_cast<T*>(p)).load(std::memory_order_relaxed);
}
template <class T>
inline T ld_ro(const T* p) {
  return *p;
}
inline int atomic_add(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v, std::memory_order_relaxed); }
inline float cd_sqrt(float x) { return std::sqrt(x); }
inline double cd_sqrt(double x) { return std::sqrt(x); }
inline float cd_fabs(float x) { return std::fabs(x); }
inline double cd_fabs(double x) { return std::fabs(x); }
inline float cd_rint(float x) { return std::nearbyint(x); }
inline double cd_rint(double x) { return std::nearbyint(x); }
inline float cd_copysign(float a, float b) { return std::copysign(a, b); }
inline double cd_copysign(double a, double b) { return std::copysign(a, b); }
inline uint32_t cd_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
inline uint64_t cd_bits(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
#endif

// Order-preserving unsigned keys: every NaN is the largest value (as torch.topk),
// -0.0 == +0.0.
template <class T>
struct Key;
template <>
struct Key<float> {
  using U = uint32_t;
  static constexpr int bits = 32;
};
template <>
struct Key<double> {
  using U = unsigned long long;
  static constexpr int bits = 64;
};

template <class T>
CD_DEV typename Key<T>::U key_of(T x) {
  using U = typename Key<T>::U;
  x = x + T(0);  // -0 -> +0
  const U u = static_cast<U>(cd_bits(x));
  const U sign = u >> (Key<T>::bits - 1);
  const U flip = (U(0) - sign) | (U(1) << (Key<T>::bits - 1));
  return (x != x) ? ~U(0) : (u ^ flip);
}

// The grid code of w for scale s and L levels: clamp(round(w/s*L), -L, L), round half
// to even, as torch.round. Every CUDA kernel that rounds to the grid calls this one.
template <class T>
CD_DEV T grid_code(T w, T s, T L) {
  T y = cd_rint(w / s * L);
  y = y < -L ? -L : y;
  y = y > L ? L : y;
  return y;
}

}  // namespace cdfast
