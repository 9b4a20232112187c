// The host-side interface of the CUDA kernels: argument structs, workspace layout,
// launchers. Shared by the pybind11 binding (cuda_bindings.cpp, host compiler),
// the kernels (.cu, nvcc) and the CPU emulation used by the tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace cdfast {

constexpr int kTileM = 64;    // rows of a solver tile
constexpr int kTileN = 64;    // columns of a solver tile
constexpr int kTileK = 16;    // depth of one shared-memory stage
constexpr int kBins = 2048;   // radix-select histogram (11-bit digits)
constexpr int kMaxPasses = 6; // 11-bit digits of a 64-bit key
constexpr int kMaxNM = 32;    // largest m of n:m sparsity handled

// Everything the persistent Gram-form solver needs; pointers are device pointers
// (host pointers in the emulation). Shapes: H (G, D, D); F, A, Rq, W, Wb, m, v,
// mask, best_W (G, R, D) row-major; scale/best_scale (G*R) per row or (1) per layer.
struct GramArgs {
  int dtype = 0;  // 0 float32, 1 float64
  int G = 0, R = 0, D = 0;
  int wc = 0;  // weight columns (D, or D - 1 with a fitted bias)
  int taps = 1, group_in = 0;
  int steps = 0;
  int solver = 0;  // 0 adam, 1 sgd
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, momentum = 0.9;
  double two_s = 0.0;  // gradient scale 2/(M*C_out)
  const void* H = nullptr;
  const void* F = nullptr;
  const void* A = nullptr;
  const void* Rq = nullptr;  // R = A*H - F (quantization refits); may be null without bits
  void* W = nullptr;   // in: start point; out: final latent weight
  void* Wb = nullptr;  // second buffer
  void* m = nullptr;   // optimizer state, zero on entry
  void* v = nullptr;   // (adam only)
  uint8_t* mask = nullptr;  // in/out
  // Per step i: sched_f[3i..3i+2] = lr_i, adam step size lr_i/(1-b1^(i+1)), sqrt(1-b2^(i+1));
  // sched_i[3i..3i+2] = channel top-k (0: none), weight top-k (-1: none), history slot (-1: none).
  const double* sched_f = nullptr;
  const long long* sched_i = nullptr;
  int nm_step = -1, nm_n = 0, nm_m = 0;
  double l1 = 0.0, gl = 0.0;  // penalty strengths (0: off); threshold = lr_i * strength
  int l1_first = 0;           // L1 before the group lasso (their order in the constraint list)
  int bits = 0;               // 0: no quantization
  int scale_mode = 0;         // 1 per row, 2 per layer
  int refit_every = 1;
  int best_from = 0;          // first step whose iterate carries the final mask (best-iterate candidates)
  double f0 = 0.0;
  void* scale = nullptr;
  void* best_W = nullptr;
  void* best_scale = nullptr;
  double* best_val = nullptr;  // (1)
  double* log_part = nullptr;  // (nlog, ntiles) partial sums of the loss at history steps
  int nlog = 0;
  void* workspace = nullptr;  // gram_workspace_bytes(), zeroed
  size_t workspace_bytes = 0;
  int device = 0;
  void* stream = nullptr;
  int max_blocks = 0;  // 0: as many as fit (tests use small grids)
};

struct GramLayout {
  int mt = 0, nt = 0, ntiles = 0;
  size_t hist = 0, eqcnt = 0, loss_part = 0, colsq_a = 0, colsq_b = 0, norm_a = 0, norm_b = 0, num_part = 0,
         den_part = 0, total = 0;
};

inline size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

inline GramLayout gram_layout(int G, int R, int D, int group_in, int dtype) {
  GramLayout L;
  L.mt = (R + kTileM - 1) / kTileM;
  L.nt = (D + kTileN - 1) / kTileN;
  L.ntiles = G * L.mt * L.nt;
  const size_t ts = dtype == 0 ? 4 : 8;
  size_t off = 0;
  L.hist = off;
  off = align_up(off + sizeof(int) * kBins * kMaxPasses);
  L.eqcnt = off;
  off = align_up(off + sizeof(long long) * L.ntiles);
  L.loss_part = off;
  off = align_up(off + sizeof(double) * 2 * L.ntiles);
  L.colsq_a = off;
  off = align_up(off + sizeof(double) * size_t(G) * L.mt * D);
  L.colsq_b = off;
  off = align_up(off + sizeof(double) * size_t(G) * L.mt * D);
  L.norm_a = off;
  off = align_up(off + ts * size_t(G) * group_in);
  L.norm_b = off;
  off = align_up(off + ts * size_t(G) * group_in);
  L.num_part = off;
  off = align_up(off + sizeof(double) * size_t(G) * R * L.nt);
  L.den_part = off;
  off = align_up(off + sizeof(double) * size_t(G) * R * L.nt);
  L.total = off;
  return L;
}

// Launchers; they return an empty string on success, else the error.
std::string launch_gram_solve(const GramArgs& a, int* grid_used);
std::string cuda_device_count(int* count);
std::string check_device_pointer(const void* p, int device, const char* name);

}  // namespace cdfast
