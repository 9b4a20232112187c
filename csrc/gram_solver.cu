// Device side of cdfast._cuda: the persistent Gram-form solver (cooperative
// launch) and the runtime queries used by the binding.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "gram_solver_kernel.cuh"

namespace cdfast {

template <class T>
__global__ void __launch_bounds__(kThreads) gram_kernel(GramParams<T> p) {
  __shared__ GramShared<T> sh;
  gram_body<T>(p, sh, CudaCtx{});
}

namespace {

std::string err(const char* what, cudaError_t e) {
  cudaGetLastError();  // clear a sticky-free error so later calls start clean
  return std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
}

// Selects `device` for this call and restores the caller's device after it.
struct DeviceGuard {
  int prev = -1;
  cudaError_t status = cudaSuccess;
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
    status = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
  }
};

template <class T>
std::string launch_t(const GramArgs& a, int* grid_used) {
  DeviceGuard guard(a.device);
  if (guard.status != cudaSuccess) return err("cudaSetDevice", guard.status);
  int coop = 0, sms = 0, per_sm = 0;
  cudaError_t e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, a.device);
  if (e != cudaSuccess) return err("cudaDeviceGetAttribute", e);
  if (!coop) return "the device does not support cooperative launches";
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device);
  if (e != cudaSuccess) return err("cudaDeviceGetAttribute", e);
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, gram_kernel<T>, kThreads, 0);
  if (e != cudaSuccess) return err("cudaOccupancyMaxActiveBlocksPerMultiprocessor", e);
  if (per_sm < 1) return "the solver kernel does not fit on one multiprocessor";
  GramParams<T> p = make_params<T>(a);
  long long grid = std::min<long long>(p.ntiles, (long long)per_sm * sms);
  if (a.max_blocks > 0) grid = std::min<long long>(grid, a.max_blocks);
  void* args[] = {&p};
  e = cudaLaunchCooperativeKernel(reinterpret_cast<void*>(gram_kernel<T>), dim3(static_cast<unsigned>(grid)),
                                  dim3(kThreads), args, 0, static_cast<cudaStream_t>(a.stream));
  if (e != cudaSuccess) return err("cudaLaunchCooperativeKernel(gram_kernel)", e);
  e = cudaGetLastError();
  if (e != cudaSuccess) return err("gram_kernel launch", e);
  *grid_used = static_cast<int>(grid);
  return "";
}

}  // namespace

std::string launch_gram_solve(const GramArgs& a, int* grid_used) {
  return a.dtype == 0 ? launch_t<float>(a, grid_used) : launch_t<double>(a, grid_used);
}

std::string cuda_device_count(int* count) {
  *count = 0;
  cudaError_t e = cudaGetDeviceCount(count);
  if (e != cudaSuccess) {
    *count = 0;
    return err("cudaGetDeviceCount", e);
  }
  return "";
}

std::string check_device_pointer(const void* p, int device, const char* name) {
  cudaPointerAttributes attr{};
  cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e != cudaSuccess) return std::string(name) + ": " + err("cudaPointerGetAttributes", e);
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return std::string(name) + ": expected CUDA device memory, got a host pointer";
  if (attr.device != device)
    return std::string(name) + ": is on cuda:" + std::to_string(attr.device) + ", expected cuda:" +
           std::to_string(device);
  return "";
}

}  // namespace cdfast
