// The pybind11 interface of the CUDA kernels, shared by the real module
// (cdfast._cuda, cuda_bindings.cpp) and the CPU emulation the tests build
// (emu_bindings.cpp). Arguments come from Python as a dict of ints and floats,
// pointers as ints (tensor.data_ptr()); every one is checked here, so bad
// arguments raise TypeError / ValueError / RuntimeError instead of crashing.
#pragma once

#include <pybind11/pybind11.h>

#include <climits>
#include <string>

#include "cuda_api.h"

namespace cdfast {
namespace py = pybind11;

inline bool dict_has(const py::dict& d, const char* key) { return d.contains(py::str(key)); }

inline long long dict_int(const py::dict& d, const char* key, bool required = true, long long dflt = 0) {
  if (!dict_has(d, key)) {
    if (required) throw py::value_error(std::string(key) + ": missing from the arguments");
    return dflt;
  }
  py::object o = d[py::str(key)];
  if (py::isinstance<py::bool_>(o) || !py::isinstance<py::int_>(o))
    throw py::type_error(std::string(key) + ": expected an int, got " +
                         std::string(py::str(py::type::of(o).attr("__name__"))));
  return o.cast<long long>();
}

inline double dict_float(const py::dict& d, const char* key, bool required = true, double dflt = 0.0) {
  if (!dict_has(d, key)) {
    if (required) throw py::value_error(std::string(key) + ": missing from the arguments");
    return dflt;
  }
  py::object o = d[py::str(key)];
  if (py::isinstance<py::bool_>(o) || !(py::isinstance<py::float_>(o) || py::isinstance<py::int_>(o)))
    throw py::type_error(std::string(key) + ": expected a number");
  return o.cast<double>();
}

inline int dict_dim(const py::dict& d, const char* key, long long lo, long long hi = INT_MAX, bool required = true,
                    long long dflt = 0) {
  const long long v = dict_int(d, key, required, dflt);
  if (v < lo || v > hi)
    throw py::value_error(std::string(key) + ": expected an int in [" + std::to_string(lo) + ", " +
                          std::to_string(hi) + "], got " + std::to_string(v));
  return static_cast<int>(v);
}

// Pointers: non-null when required; on the GPU also device memory of `device`.
inline void* dict_ptr(const py::dict& d, const char* key, bool required, bool device_ptrs, int device) {
  const long long v = dict_int(d, key, required, 0);
  if (v == 0) {
    if (required) throw py::value_error(std::string(key) + ": null pointer");
    return nullptr;
  }
  void* p = reinterpret_cast<void*>(static_cast<uintptr_t>(v));
  if (device_ptrs) {
    const std::string why = check_device_pointer(p, device, key);
    if (!why.empty()) throw py::value_error(why);
  }
  return p;
}

inline void require_gpu(bool device_ptrs) {
  if (!device_ptrs) return;
  int n = 0;
  const std::string why = cuda_device_count(&n);
  if (!why.empty()) throw std::runtime_error("no usable CUDA device: " + why);
  if (n < 1) throw std::runtime_error("no CUDA device is visible");
}

inline GramArgs parse_gram(const py::dict& d, bool device_ptrs) {
  GramArgs a;
  a.dtype = dict_dim(d, "dtype", 0, 1);
  a.device = dict_dim(d, "device", 0, 1 << 16);
  require_gpu(device_ptrs);
  a.G = dict_dim(d, "G", 1);
  a.R = dict_dim(d, "R", 1);
  a.D = dict_dim(d, "D", 1);
  a.wc = dict_dim(d, "wc", 1, a.D);
  if (a.wc != a.D && a.wc != a.D - 1) throw py::value_error("wc: expected D or D - 1 (a bias column)");
  a.taps = dict_dim(d, "taps", 1);
  a.group_in = dict_dim(d, "group_in", 1);
  if ((long long)a.group_in * a.taps != a.wc) throw py::value_error("group_in, taps: group_in*taps must equal wc");
  // 32-bit histogram counts and tile indices in the kernel
  if ((long long)a.G * a.R * a.D >= (1LL << 31) || (long long)a.G * a.D * a.D >= (1LL << 40))
    throw py::value_error("G, R, D: the layer is too large for the CUDA solver (G*R*D must be < 2^31)");
  a.steps = dict_dim(d, "steps", 1);
  a.solver = dict_dim(d, "solver", 0, 1);
  a.beta1 = dict_float(d, "beta1", false, 0.9);
  a.beta2 = dict_float(d, "beta2", false, 0.999);
  a.eps = dict_float(d, "eps", false, 1e-8);
  a.momentum = dict_float(d, "momentum", false, 0.9);
  a.two_s = dict_float(d, "two_s");
  a.nm_step = dict_dim(d, "nm_step", -1, INT_MAX, false, -1);
  if (a.nm_step >= 0) {
    a.nm_m = dict_dim(d, "nm_m", 1, kMaxNM);
    a.nm_n = dict_dim(d, "nm_n", 1, a.nm_m);
    if (a.group_in % a.nm_m) throw py::value_error("nm_m: must divide group_in");
  }
  a.l1 = dict_float(d, "l1", false, 0.0);
  a.gl = dict_float(d, "gl", false, 0.0);
  if (!(a.l1 >= 0.0) || !(a.gl >= 0.0)) throw py::value_error("l1, gl: expected strengths >= 0");
  a.l1_first = dict_int(d, "l1_first", false, 0) != 0;
  a.bits = dict_dim(d, "bits", 0, 8, false, 0);
  if (a.bits != 0 && (a.bits < 2 || a.bits > 8)) throw py::value_error("bits: expected 0 or an int in 2..8");
  const bool quant = a.bits > 0;
  if (quant) {
    a.scale_mode = dict_dim(d, "scale_mode", 1, 2);
    a.refit_every = dict_dim(d, "refit_every", 1);
    a.best_from = dict_dim(d, "best_from", 0, INT_MAX, false, 0);
  }
  a.f0 = dict_float(d, "f0", false, 0.0);
  a.nlog = dict_dim(d, "nlog", 0, INT_MAX, false, 0);
  a.max_blocks = dict_dim(d, "max_blocks", 0, INT_MAX, false, 0);
  const bool dp = device_ptrs;
  const int dev = a.device;
  a.H = dict_ptr(d, "H", true, dp, dev);
  a.F = dict_ptr(d, "F", true, dp, dev);
  a.A = dict_ptr(d, "A", true, dp, dev);
  a.W = dict_ptr(d, "W", true, dp, dev);
  a.Wb = dict_ptr(d, "Wb", true, dp, dev);
  a.m = dict_ptr(d, "m", true, dp, dev);
  a.v = dict_ptr(d, "v", a.solver == 0, dp, dev);
  a.mask = static_cast<uint8_t*>(dict_ptr(d, "mask", true, dp, dev));
  a.sched_f = static_cast<const double*>(dict_ptr(d, "sched_f", true, dp, dev));
  a.sched_i = static_cast<const long long*>(dict_ptr(d, "sched_i", true, dp, dev));
  a.Rq = dict_ptr(d, "Rq", quant, dp, dev);
  a.scale = dict_ptr(d, "scale", quant, dp, dev);
  a.best_W = dict_ptr(d, "best_W", quant, dp, dev);
  a.best_scale = dict_ptr(d, "best_scale", quant, dp, dev);
  a.best_val = static_cast<double*>(dict_ptr(d, "best_val", quant, dp, dev));
  a.log_part = static_cast<double*>(dict_ptr(d, "log_part", a.nlog > 0, dp, dev));
  a.workspace = dict_ptr(d, "workspace", true, dp, dev);
  a.workspace_bytes = static_cast<size_t>(dict_int(d, "workspace_bytes"));
  const GramLayout L = gram_layout(a.G, a.R, a.D, a.group_in, a.dtype);
  if (a.workspace_bytes < L.total)
    throw py::value_error("workspace_bytes: expected at least " + std::to_string(L.total) + ", got " +
                          std::to_string(a.workspace_bytes));
  a.stream = reinterpret_cast<void*>(static_cast<uintptr_t>(dict_int(d, "stream", false, 0)));
  return a;
}

inline void bind_all(py::module_& m, bool device_ptrs) {
  m.def(
      "device_count",
      []() {
        int n = 0;
        const std::string why = cuda_device_count(&n);
        return py::make_tuple(n, why);
      },
      "(number of visible CUDA devices, error message or '')");
  m.def("tile_shape", []() { return py::make_tuple(kTileM, kTileN); });
  m.def(
      "gram_workspace_bytes",
      [](int G, int R, int D, int group_in, int dtype) {
        if (G < 1 || R < 1 || D < 1 || group_in < 1) throw py::value_error("G, R, D, group_in: expected >= 1");
        if (dtype != 0 && dtype != 1) throw py::value_error("dtype: expected 0 or 1");
        return gram_layout(G, R, D, group_in, dtype).total;
      },
      py::arg("G"), py::arg("R"), py::arg("D"), py::arg("group_in"), py::arg("dtype"));
  m.def(
      "gram_solve",
      [device_ptrs](const py::dict& d) {
        const GramArgs a = parse_gram(d, device_ptrs);
        int grid = 0;
        std::string why;
        {
          py::gil_scoped_release nogil;
          why = launch_gram_solve(a, &grid);
        }
        if (!why.empty()) throw std::runtime_error(why);
        return grid;
      },
      py::arg("args"), "Launch the persistent Gram-form solver; returns the grid size (blocks).");
}

}  // namespace cdfast
