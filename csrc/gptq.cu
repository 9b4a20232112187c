// Device side of the GPTQ-style rounding pass (see gptq_kernel.cuh).
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "gptq_kernel.cuh"

namespace cdfast {

template <class T>
__global__ void __launch_bounds__(kThreads) gptq_kernel(GptqParams<T> p) {
  __shared__ GptqShared<T> sh;
  gptq_body<T>(p, sh, CudaCtx{});
}

namespace {

template <class T>
std::string launch_t(const GptqArgs& a) {
  int prev = -1;
  if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
  cudaError_t e = cudaSetDevice(a.device);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("cudaSetDevice: ") + cudaGetErrorString(e);
  }
  GptqParams<T> p = make_gptq_params<T>(a);
  const int blocks = std::max(1, std::min((a.rows + kGptqRows - 1) / kGptqRows, 65535));
  gptq_kernel<T><<<blocks, kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(p);
  e = cudaGetLastError();
  if (prev >= 0) cudaSetDevice(prev);
  if (e != cudaSuccess) return std::string("gptq_kernel launch: ") + cudaGetErrorString(e);
  return "";
}

}  // namespace

std::string launch_gptq(const GptqArgs& a) { return a.dtype == 0 ? launch_t<float>(a) : launch_t<double>(a); }

}  // namespace cdfast
