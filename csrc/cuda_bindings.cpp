// cdfast._cuda: pybind11 binding of the CUDA kernels (gram_solver.cu).
// Compiled by the host compiler; the CUDA runtime is linked statically, so the
// module imports where there is no GPU, no libcudart and no CUDA build of torch.
#include <cuda_runtime.h>

#include "bind_common.h"

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "cdfast CUDA kernels: the persistent Gram-form solver (see cdfast/_backends/cuda.py)";
  cdfast::bind_all(m, /*device_ptrs=*/true);
  m.attr("emulated") = false;
  m.attr("cudart_version") = CUDART_VERSION;
}
