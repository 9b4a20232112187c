// cdfast_cuda_emu: the CUDA kernels' code run on the CPU, for the tests only.
//
// Built by tests/test_cuda.py with the host compiler (C++20, -DCDFAST_EMULATE):
// each CUDA thread is a std::thread, __syncthreads and the grid-wide sync are
// barriers, shared memory is one struct per block. Same Python interface as
// cdfast._cuda, with host pointers. Slow by design (hundreds of OS threads), fit
// for small layers and few steps; never installed.
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "gram_solver_kernel.cuh"
#include "bind_common.h"

namespace cdfast {

std::string cuda_device_count(int* count) {
  *count = 0;
  return "emulation";
}

std::string check_device_pointer(const void*, int, const char*) { return ""; }

namespace {

template <class Shared, class Body>
void run_grid(int grid, Body body) {
  EmuBarrier grid_bar(grid * kThreads);
  std::vector<std::unique_ptr<EmuBarrier>> bars;
  std::vector<std::unique_ptr<Shared>> shared;
  for (int b = 0; b < grid; ++b) {
    bars.emplace_back(new EmuBarrier(kThreads));
    shared.emplace_back(new Shared());
  }
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(grid) * kThreads);
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < kThreads; ++t)
      threads.emplace_back([&, b, t] {
        EmuCtx ctx{t, b, grid, bars[b].get(), &grid_bar};
        body(*shared[b], ctx);
      });
  for (auto& th : threads) th.join();
}

template <class T>
std::string gram_t(const GramArgs& a, int* grid_used) {
  const GramParams<T> p = make_params<T>(a);
  const int grid = std::max(1, std::min(p.ntiles, a.max_blocks > 0 ? a.max_blocks : 2));
  run_grid<GramShared<T>>(grid, [&](GramShared<T>& sh, const EmuCtx& ctx) { gram_body<T>(p, sh, ctx); });
  *grid_used = grid;
  return "";
}

}  // namespace

std::string launch_gram_solve(const GramArgs& a, int* grid_used) {
  return a.dtype == 0 ? gram_t<float>(a, grid_used) : gram_t<double>(a, grid_used);
}

}  // namespace cdfast

PYBIND11_MODULE(cdfast_cuda_emu, m) {
  m.doc() = "CPU emulation of the cdfast CUDA kernels (tests only)";
  cdfast::bind_all(m, /*device_ptrs=*/false);
  m.attr("emulated") = true;
}
