#!/usr/bin/env bash
# Compile one CUDA source the way setup.py does, without building the whole extension, and
# print ptxas's registers / spills per kernel. For iterating on one family's .cu on a machine
# without a GPU; the full check of the built .so is tests/test_cuda_build.py.
#   bash scripts/check_cu.sh csrc/cuda/int8.cu            # sm_80 and sm_90a
#   ARCHS="80 89 90a" bash scripts/check_cu.sh csrc/cuda/fp8.cu
#   KEEP_OBJ=/tmp/x.o ARCHS=80 bash scripts/check_cu.sh csrc/cuda/codebook.cu   # keep the object
set -euo pipefail
src=${1:?usage: check_cu.sh FILE.cu}
archs=${ARCHS:-"80 90a"}
root=$(cd "$(dirname "$0")/.." && pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
incs=$(python3 - "$root" <<'PY'
import glob, os, sys, sysconfig
root = sys.argv[1]
site = sysconfig.get_paths()["purelib"]
import torch.utils.cpp_extension as ce
dirs = [os.path.join(root, "csrc", "include")]
try:
    import cutlass_library
    src = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    dirs += [os.path.join(src, "include"), os.path.join(src, "tools", "util", "include")]
except ImportError:
    pass
dirs += glob.glob(os.path.join(site, "nvidia", "cu1*", "include"))
dirs += ce.include_paths(device_type="cuda") if "device_type" in ce.include_paths.__code__.co_varnames else ce.include_paths(cuda=True)
import sysconfig as s
dirs.append(s.get_paths()["include"])
print(" ".join("-I" + d for d in dirs))
PY
)
std=$(python3 -c "import torch; v=tuple(int(x) for x in torch.__version__.split('.')[:2]); print('-std=c++20' if v >= (2, 10) else '-std=c++17')")
gencode=""
for a in $archs; do gencode="$gencode -gencode=arch=compute_$a,code=sm_$a"; done
out=$(mktemp -d)
"$CUDA_HOME/bin/nvcc" $incs -c "$src" -o "$out/obj.o" \
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -D__CUDA_NO_HALF2_OPERATORS__ --compiler-options -fPIC -O3 $std --expt-relaxed-constexpr \
  --expt-extended-lambda -lineinfo -Xptxas=-v -DLOWBIT_WITH_CUDA=1 -DCUTLASS_ENABLE_TENSOR_CORE_MMA=1 \
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C $gencode 2>&1 \
  | grep -E "error|warning|Compiling entry|registers|spill" | sed -E 's/^ptxas info *: //'
echo "--- spills (non-zero lines; empty means none):"
cuobjdump=$(command -v cuobjdump || python3 -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")
"$cuobjdump" --dump-resource-usage "$out/obj.o" | grep -E "STACK:[1-9]|LOCAL:[1-9]" || true
[ -n "${KEEP_OBJ:-}" ] && cp "$out/obj.o" "$KEEP_OBJ"  # e.g. to read its SASS with cuobjdump -sass
rm -rf "$out"
