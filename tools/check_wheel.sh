#!/usr/bin/env bash
# Build the cdfast wheel and check it the way a user gets it.
#
#   tools/check_wheel.sh [--keep]
#
# 1. pip wheel --no-build-isolation --no-deps . (against the installed torch and
#    pybind11; CDFAST_BUILD_CUDA, CUDA_HOME, CDFAST_CUDA_ARCHS are honoured);
# 2. the wheel must carry cdfast/_cpu and (when nvcc is there, or CDFAST_BUILD_CUDA=1)
#    cdfast/_cuda;
# 3. a fresh venv with --system-site-packages (it reuses the installed torch; pip
#    runs with --no-index, so nothing is downloaded), the wheel installed with
#    --no-deps;
# 4. from a directory outside the repository: `import cdfast` must come from the
#    venv, cdfast.backends() must show cpp available and cuda available with a GPU,
#    else a reason; cdfast._cuda must import; the shipped teacher (package data) must load.
# Exits non-zero on any failure. PYTHON selects the interpreter (default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
KEEP=0
[[ "${1:-}" == "--keep" ]] && KEEP=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cdfast-wheel.XXXXXX")"
cleanup() { if [[ $KEEP == 0 ]]; then rm -rf "$WORK"; else echo "kept $WORK"; fi; }
trap cleanup EXIT
fail() { echo "check_wheel: FAIL: $*" >&2; exit 1; }
step() { echo "check_wheel: $*"; }
unset PYTHONPATH
export PYTHONNOUSERSITE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

expect_cuda=0
case "${CDFAST_BUILD_CUDA:-auto}" in
  0|false|no|off) expect_cuda=0 ;;
  1|true|yes|on) expect_cuda=1 ;;
  *) home="${CUDA_HOME:-${CUDA_PATH:-}}"  # the same search as setup.py's find_cuda()
     if [[ -n "$home" ]]; then
       [[ -x "$home/bin/nvcc" ]] && expect_cuda=1
     elif command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
       expect_cuda=1
     fi ;;
esac

t0=$SECONDS
step "building the wheel (expect the CUDA extension: $expect_cuda)"
( cd "$REPO" && "$PY" -m pip wheel --no-build-isolation --no-deps . -w "$WORK/dist" ) > "$WORK/build.log" 2>&1 \
  || { tail -n 60 "$WORK/build.log" >&2; fail "pip wheel failed (log above)"; }
shopt -s nullglob
wheels=("$WORK"/dist/cdfast-*.whl)
[[ ${#wheels[@]} == 1 ]] || fail "expected one cdfast wheel in $WORK/dist, found ${#wheels[@]}"
WHEEL="${wheels[0]}"
step "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB) in $((SECONDS - t0)) s"

"$PY" - "$WHEEL" "$expect_cuda" <<'EOF' || fail "wheel contents"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
want = ["cdfast/_cpu"] + (["cdfast/_cuda"] if sys.argv[2] == "1" else [])
for mod in want:
    hits = [n for n in names if n.startswith(mod + ".") and n.endswith(".so")]
    if not hits:
        sys.exit(f"{mod}: no extension module in the wheel")
    print(f"check_wheel:   {hits[0]}")
for must in ("cdfast/__init__.py", "cdfast/layer/distill.py", "cdfast/model/compress.py", "cdfast/_backends/cpp.py", "cdfast/_backends/cuda.py", "cdfast/kernels/__init__.py",
             "cdfast/model/export.py", "cdfast/experiments/assets/resnet20-fashion-mnist.safetensors"):
    if must not in names:
        sys.exit(f"{must}: missing from the wheel")
EOF

step "creating a venv with --system-site-packages"
"$PY" -m venv --system-site-packages "$WORK/venv" || fail "venv creation"
VPY="$WORK/venv/bin/python"
# When $PY is itself a venv, --system-site-packages reaches only the base interpreter's
# packages: point the new venv at $PY's (torch and the rest) too.
"$PY" -c "import site, sys; print('\n'.join(site.getsitepackages()))" \
  > "$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/outer-site-packages.pth"
"$VPY" -m pip install --no-index --no-deps --force-reinstall --quiet "$WHEEL" > "$WORK/install.log" 2>&1 \
  || { cat "$WORK/install.log" >&2; fail "pip install of the wheel"; }

step "importing from $WORK/run (outside the repository)"
mkdir -p "$WORK/run"
cd "$WORK/run"
"$VPY" - "$REPO" "$WORK/venv" "$expect_cuda" <<'EOF' || fail "import checks"
import os, sys
repo, venv, expect_cuda = sys.argv[1], os.path.realpath(sys.argv[2]), sys.argv[3] == "1"
import cdfast
where = os.path.realpath(cdfast.__file__)
if not where.startswith(venv + os.sep):
    sys.exit(f"cdfast was imported from {where}, not from the venv {venv}")
import cdfast._cpu  # noqa: F401
b = cdfast.backends()
for k, v in b.items():
    print(f"check_wheel:   {k:7s} {v}")
if b["torch"] != "available":
    sys.exit("torch backend unavailable")
if b["cpp"] != "available":
    sys.exit(f"cpp backend unavailable: {b['cpp']}")
if expect_cuda:
    import cdfast._cuda as cu  # must import with or without a GPU
    n, why = cu.device_count()
    import torch
    gpu = n > 0 and not why and torch.cuda.is_available()
    if gpu and b["cuda"] != "available":
        sys.exit(f"a GPU is visible but the cuda backend says: {b['cuda']}")
    if not gpu and (b["cuda"] == "available" or not b["cuda"].strip()):
        sys.exit(f"no GPU, yet the cuda backend gives no reason: {b['cuda']!r}")
# the C++ top-k agrees with the torch oracle on a small input
import torch
from cdfast.layer import constraints as C
from cdfast._backends import cpp
w = torch.randn(5, 37, dtype=torch.float64)
assert torch.equal(cpp.topk_mask(w, 61), C.topk_mask(w, 61))
print("check_wheel:   cpp top-k agrees with torch")
# the demo's teacher is package data: it must come with the wheel
from cdfast.experiments.train import shipped_teacher
model, info = shipped_teacher()
print(f"check_wheel:   shipped teacher: {info['model']}, {info['test_accuracy']}% ({info['command']})")
EOF
step "OK in $((SECONDS - t0)) s"
