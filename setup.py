"""Build script for cdfast.

The pure-Python package lives in ``cdfast/``; the Triton sources in ``kernels/`` are
installed as the subpackage ``cdfast.kernels``. Compiled extensions (``csrc/``) are
added by :func:`extensions` below:

* ``cdfast._cpu`` (always): the budget top-k selection in C++17 with OpenMP.
* ``cdfast._cuda`` (when ``nvcc`` is found): the persistent Gram-form solver. The
  ``.cu`` files are compiled by ``nvcc`` (see :class:`BuildExt`), the
  pybind11 binding by the host compiler, and the CUDA runtime is linked statically,
  so the module imports on a machine without a GPU or a CUDA build of torch.

Environment:

``CDFAST_BUILD_CUDA``   ``0``: never build ``_cuda``; ``1``: build it or fail (no nvcc is
                        an error); unset: build it when nvcc is found.
``CUDA_HOME``           the CUDA toolkit (``CUDA_PATH`` too); else ``nvcc`` on ``PATH``,
                        else ``/usr/local/cuda``.
``CDFAST_CUDA_ARCHS``   targets, separated by ``;``, ``,`` or spaces: ``sm_80`` (or ``80``,
                        ``8.0``) builds SASS, ``compute_90`` PTX. Default
                        ``sm_80;sm_90;sm_90a;compute_90``.
``CDFAST_NVCC_FLAGS``   extra nvcc flags.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# cdfast._backends must be listed: without it the wheel has no backends at all.
PACKAGES = ["cdfast", "cdfast.layer", "cdfast.layer.solvers", "cdfast.model", "cdfast.experiments",
            "cdfast._backends", "cdfast.kernels"]
PACKAGE_DIR = {"cdfast": "cdfast", "cdfast.kernels": "kernels"}
# The demo's teacher (cdfast.experiments.train.SHIPPED_TEACHER) travels with the package.
PACKAGE_DATA = {"cdfast.experiments": ["assets/*.safetensors"]}

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
DEFAULT_ARCHS = "sm_80;sm_90;sm_90a;compute_90"
CUDA_SOURCES = ["csrc/cuda_bindings.cpp", "csrc/gram_solver.cu"]
CUDA_DEPENDS = ["csrc/gram_solver_kernel.cuh", "csrc/cuda_api.h", "csrc/emu.h",
                "csrc/bind_common.h"]


def _log(msg: str) -> None:
    print(f"cdfast setup: {msg}", file=sys.stderr, flush=True)


def _pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as exc:  # pragma: no cover - pyproject lists it
        raise RuntimeError("building cdfast needs pybind11 (pip install pybind11), then "
                           "pip install --no-build-isolation .") from exc
    return pybind11.get_include()


def _cuda_mode() -> str | None:
    v = os.environ.get("CDFAST_BUILD_CUDA", "").strip().lower()
    if v in ("", "auto"):
        return None
    if v in ("0", "false", "no", "off"):
        return "off"
    if v in ("1", "true", "yes", "on"):
        return "on"
    raise RuntimeError(f"CDFAST_BUILD_CUDA: expected 0 or 1, got {v!r}")


def find_cuda() -> tuple[str, str] | str:
    """``(nvcc, cuda_home)``, or a string saying why there is none."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        nvcc = os.path.join(home, "bin", "nvcc")
        if not os.path.isfile(nvcc):
            return f"CUDA_HOME={home!r} has no bin/nvcc"
        return nvcc, home
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            if nvcc is None:
                nvcc = os.path.join(home, "bin", "nvcc")
                if not os.path.isfile(nvcc):
                    continue
            return nvcc, home
    return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"


def _cuda_libdir(home: str) -> str:
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                os.path.join("targets", "sbsa-linux", "lib")):
        d = os.path.join(home, sub)
        if os.path.isfile(os.path.join(d, "libcudart_static.a")):
            return d
    raise RuntimeError(f"no libcudart_static.a under {home} (lib64/, lib/, targets/*/lib)")


def cuda_targets(spec: str | None = None) -> list[str]:
    """``CDFAST_CUDA_ARCHS`` → canonical targets: ``sm_80`` (machine code), ``compute_90`` (PTX).

    ``sm_90+ptx`` gives both ``sm_90`` and ``compute_90``. The list is compiled into
    ``cdfast._cuda`` (its ``targets``), so the backend can tell at run time whether a
    device has a kernel.
    """
    spec = spec if spec is not None else os.environ.get("CDFAST_CUDA_ARCHS", DEFAULT_ARCHS)
    targets = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(sm_|compute_)?(\d+)\.?(\d)?([af])?(\+ptx)?", item.strip().lower())
        if not m:
            raise RuntimeError(f"CDFAST_CUDA_ARCHS: cannot read {item!r} (expected e.g. sm_90, 90a, compute_90)")
        kind, major, minor, suffix, ptx = m.groups()
        num = major + (minor or "") + (suffix or "")
        new = [f"compute_{num}"] if kind == "compute_" else [f"sm_{num}"] + ([f"compute_{num}"] if ptx else [])
        targets += [t for t in new if t not in targets]
    if not targets:
        raise RuntimeError("CDFAST_CUDA_ARCHS: no architecture given")
    return targets


def gencode_flags(spec: str | None = None) -> list[str]:
    """``CDFAST_CUDA_ARCHS`` → nvcc ``-gencode`` flags."""
    flags = []
    for t in cuda_targets(spec):
        kind, _, num = t.partition("_")
        flags += ["-gencode", f"arch=compute_{num},code={t}"]
    return flags


class BuildExt(build_ext):
    """build_ext that compiles ``.cu`` sources with nvcc and links them in."""

    def build_extension(self, ext):
        cu = [s for s in ext.sources if s.endswith(".cu")]
        if cu:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            objects = self._nvcc_compile(ext, cu)
            ext.extra_objects = list(ext.extra_objects or []) + objects
            # relink when a .cu (hence an object) changed, not only a .cpp
            ext.depends = list(ext.depends or []) + cu + objects
        t0 = time.perf_counter()
        super().build_extension(ext)
        _log(f"built {ext.name} in {time.perf_counter() - t0:.1f} s")

    def _nvcc_compile(self, ext, sources):
        nvcc = ext.nvcc  # set by extensions()
        out_dir = os.path.join(self.build_temp, "nvcc")
        os.makedirs(out_dir, exist_ok=True)
        flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--threads", "0",
                 "-cudart=static", "-Xptxas=-warn-spills", "-lineinfo"]
        flags += gencode_flags()
        flags += [f"-I{d}" for d in ext.include_dirs]
        flags += shlex.split(os.environ.get("CDFAST_NVCC_FLAGS", ""))
        objects = []
        deps = [os.path.join(HERE, d) for d in CUDA_DEPENDS if os.path.exists(os.path.join(HERE, d))]
        # Objects are named by a hash of the command line: other flags or targets rebuild.
        tag = hashlib.sha1(" ".join([nvcc] + flags).encode()).hexdigest()[:10]
        for src in sources:
            obj = os.path.join(out_dir, f"{os.path.splitext(os.path.basename(src))[0]}-{tag}.o")
            newest = max([os.path.getmtime(src)] + [os.path.getmtime(d) for d in deps])
            if self.force or not os.path.exists(obj) or os.path.getmtime(obj) < newest:
                cmd = [nvcc, "-c", src, "-o", obj] + flags
                _log(" ".join(shlex.quote(c) for c in cmd))
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True)
                _log(f"nvcc {src}: {time.perf_counter() - t0:.1f} s")
            objects.append(obj)
        return objects


def extensions():
    """The compiled extensions: ``cdfast._cpu`` always, ``cdfast._cuda`` when nvcc is there."""
    pyb = _pybind11_include()
    # -g0: no debug info (Python's CFLAGS carry -g; it would triple the wheel).
    # -ffp-contract=off and never -ffast-math: the operators must round as torch does.
    # -fno-trapping-math lets the selects vectorize; it changes no result.
    cflags = ["-std=c++17", "-O3", "-g0", "-fvisibility=hidden", "-ffp-contract=off", "-fno-math-errno",
              "-fno-trapping-math"]
    lflags = []
    if sys.platform != "darwin":
        cflags.append("-fopenmp")
        lflags.append("-fopenmp")
    exts = [Extension("cdfast._cpu", sources=["csrc/cpu_ops.cpp"], include_dirs=[pyb], language="c++",
                      extra_compile_args=cflags, extra_link_args=lflags)]

    mode = _cuda_mode()
    if mode == "off":
        _log("CDFAST_BUILD_CUDA=0: not building the CUDA extension cdfast._cuda")
        return exts
    found = find_cuda()
    if isinstance(found, str):
        if mode == "on":
            raise RuntimeError(f"CDFAST_BUILD_CUDA=1 but {found}")
        _log(f"{found}: skipping the CUDA extension cdfast._cuda (the cpp and torch backends are "
             "built; CDFAST_BUILD_CUDA=1 makes this an error)")
        return exts
    nvcc, home = found
    _log(f"building cdfast._cuda with {nvcc} (CUDA_HOME={home}), targets "
         f"{os.environ.get('CDFAST_CUDA_ARCHS', DEFAULT_ARCHS)}")
    cuda = Extension(
        "cdfast._cuda",
        sources=list(CUDA_SOURCES),
        include_dirs=[pyb, os.path.join(home, "include"), CSRC],
        library_dirs=[_cuda_libdir(home)],
        # The static runtime: the module imports without libcudart.so on the machine;
        # libcuda.so (the driver) is opened lazily by it at the first CUDA call.
        libraries=["cudart_static", "rt", "pthread", "dl"],
        language="c++",
        extra_compile_args=["-std=c++17", "-O2", "-g0", "-fvisibility=hidden"],
        define_macros=[("CDFAST_CUDA_TARGETS", '"' + " ".join(cuda_targets()) + '"')],
        extra_link_args=["-Wl,--strip-debug"] if sys.platform.startswith("linux") else [],
        depends=CUDA_DEPENDS,
    )
    cuda.nvcc = nvcc
    exts.append(cuda)
    return exts


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, ext_modules=extensions(),
      cmdclass={"build_ext": BuildExt})
