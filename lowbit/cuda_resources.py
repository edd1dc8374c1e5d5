"""Per-kernel GPU resources of a built extension, read with ``cuobjdump`` (no GPU needed).

``kernel_resources(so_path)`` lists, for every kernel and every architecture embedded in the
file, the registers, stack, local memory and static shared memory that ptxas assigned. CI
asserts on them (tests/test_cuda_build.py: no spills, shared memory within the chip) and
``lowbit info --kernels`` prints them.

Dynamic shared memory (what CUTLASS kernels use) is decided at launch and is not in the
binary: those kernels show ``shared == 0`` here and are bounded by static_asserts in
csrc/include/lowbit/cuda/int8_cutlass.cuh instead.

The ``cuobjdump`` used is the one bundled with Triton, so no CUDA toolkit is needed.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess

#: Largest shared memory one block may use, in bytes (opt-in maximum), per SM architecture.
SHARED_LIMIT = {
    "sm_80": 163 * 1024,
    "sm_86": 99 * 1024,
    "sm_87": 163 * 1024,
    "sm_89": 99 * 1024,
    "sm_90": 227 * 1024,
    "sm_90a": 227 * 1024,
}

_ARCH = re.compile(r"^arch = (sm_\w+)")
_FUNCTION = re.compile(r"^\s*Function (\S+?):?$")
_FIELD = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def cuobjdump_path() -> str | None:
    """Triton's bundled cuobjdump, else one on PATH or in $CUDA_HOME/bin; None if there is none."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(bundled, os.X_OK):
            return bundled
    except Exception:  # triton missing or broken: look elsewhere
        pass
    found = shutil.which("cuobjdump")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(cuda_home, "bin", "cuobjdump")
    return candidate if os.access(candidate, os.X_OK) else None


def parse_resource_usage(text: str) -> list[dict]:
    """Parse the output of ``cuobjdump --dump-resource-usage``.

    One dict per (kernel, arch): kernel (mangled name), arch ("sm_80"), registers, stack,
    local, shared (static shared memory, bytes).
    """
    rows = []
    arch = None
    kernel = None
    for line in text.splitlines():
        m = _ARCH.match(line.strip())
        if m:
            arch, kernel = m.group(1), None
            continue
        m = _FUNCTION.match(line)
        if m:
            kernel = m.group(1)
            continue
        if kernel is not None and "REG:" in line:
            fields = {k: int(v) for k, v in _FIELD.findall(line)}
            rows.append({
                "kernel": kernel,
                "arch": arch,
                "registers": fields.get("REG", 0),
                "stack": fields.get("STACK", 0),
                "local": fields.get("LOCAL", 0),
                "shared": fields.get("SHARED", 0),
            })
            kernel = None
    return rows


def kernel_resources(so_path: str) -> list[dict]:
    """Resources of every kernel in ``so_path`` for every embedded SASS architecture."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump was not found (install triton, or set CUDA_HOME to a CUDA toolkit)")
    proc = subprocess.run([tool, "--dump-resource-usage", so_path], capture_output=True, text=True)
    if proc.returncode != 0:
        # cuobjdump exits non-zero on a file with no device code: report that as "no kernels".
        if "does not contain device code" in proc.stderr:
            return []
        raise RuntimeError(f"{tool} failed on {so_path}: {proc.stderr.strip()}")
    rows = parse_resource_usage(proc.stdout)
    for row in rows:
        # The mangled name first: the demangled one elides CUTLASS's template arguments
        # (cutlass::Kernel2<...>), which is where lowbit's wrapper types name the op.
        row["op"] = op_for_kernel(row["kernel"]) or op_for_kernel(demangle(row["kernel"]))
    return rows


#: Which ops a CUDA kernel serves, by a substring of its (demangled) name. Kernel names are
#: chosen for what they do, not for the op, and CUTLASS names are its own; this is the map.
#: Each family appends its kernels here.
KERNEL_OPS: tuple[tuple[str, str], ...] = (
    ("int8_quantize", "int8_quantize_dynamic, int8_quantize_static"),
    ("int8_amax", "int8_quantize_dynamic"),
    ("int8_wo_", "int8_weight_only_mm"),
    ("int8_gemm_simt", "int8_mm, int8_scaled_mm"),
    ("int4_wo_", "int4_weight_only_mm"),
    ("fp8_quantize", "fp8_quantize_dynamic, fp8_quantize_static"),
    ("fp8_amax", "fp8_quantize_dynamic"),
    ("fp8_gemv", "fp8_scaled_mm, fp8_weight_only_mm"),
    ("fp8_mm_wmma", "fp8_scaled_mm, fp8_weight_only_mm"),
    ("fp8_wo_", "fp8_weight_only_mm"),
    # ---- sparse24 (before the generic CUTLASS entries, which would claim its SparseGemm)
    ("SparseGemm", "sparse24_mm, sparse24_int8_scaled_mm"),
    ("sparse24_simt_float", "sparse24_mm"),
    ("sparse24_float_epilogue", "sparse24_mm"),
    ("sparse24_simt_int8", "sparse24_int8_scaled_mm"),
    ("sparse24_int8_epilogue", "sparse24_int8_scaled_mm"),
    ("sparse24_", "sparse24_mm, sparse24_int8_scaled_mm"),
    ("cutlass::Kernel", "int8_mm, int8_scaled_mm"),
    ("_ZN7cutlass6Kernel", "int8_mm, int8_scaled_mm"),  # when c++filt gives up on a long name
    # ---- fp8 native tensor-core GEMMs (CUTLASS; matched on the mangled name, see kernel_resources)
    ("fp8_sm908Sm90Only", "fp8_scaled_mm"),  # sm_90a: TMA + wgmma, 3.x device_kernel<...>
    ("fp8_sm898Sm89Only", "fp8_scaled_mm"),  # sm_89: mma.sync e4m3/e5m2, 2.x Kernel2<...>
)
# ---- binary
KERNEL_OPS += (
    # CUTLASS's b1 GEMM: cutlass::uint1b_t is integer_subbyte<1, false> in the mangled name
    ("integer_subbyteILi1ELb0E", "binary_mm, binary_scaled_mm"),
    ("binary_prep_kernel", "binary_mm, binary_scaled_mm"),
    ("binary_gemv_kernel", "binary_mm, binary_scaled_mm"),
    ("binary_quantize_kernel", "binary_quantize"),
    # ---- codebook
    ("codebook_gemv", "codebook_mm"),
    ("codebook_tile", "codebook_mm"),
    ("codebook_word_gemv", "codebook_mm"),
    ("codebook_wmma", "codebook_mm"),
    ("codebook_dequant", "codebook_dequant"),
)
# ---- int4 cutlass_sm90 (mangled names: int4_sm908Sm90Only is CUTLASS's 3.x device_kernel<...>)
KERNEL_OPS += (
    ("int4_sm90_repack", "int4_repack_cutlass_sm90"),
    ("int4_sm90_dequant", "int4_cutlass_sm90_mm"),
    ("int4_sm908Sm90Only", "int4_cutlass_sm90_mm"),
    ("int4_sm90::Sm90Only", "int4_cutlass_sm90_mm"),
)


def op_for_kernel(demangled_name: str) -> str | None:
    for fragment, ops in KERNEL_OPS:
        if fragment in demangled_name:
            return ops
    return None


@functools.lru_cache(maxsize=4096)
def demangle(name: str) -> str:
    """A readable kernel name: c++filt's, with long template argument lists elided."""
    tool = shutil.which("c++filt")
    full = name
    if tool is not None:
        try:
            full = subprocess.run([tool, name], capture_output=True, text=True, timeout=10).stdout.strip() or name
        except (OSError, subprocess.SubprocessError):
            full = name
    if full == name:  # c++filt missing, or it gave up (it does on some deep CUTLASS names)
        return name if len(name) <= 100 else name[:97] + "..."
    return short_name(full)


def short_name(demangled: str, max_len: int = 100) -> str:
    """`void ns::kernel<T, 8>(args)` -> `ns::kernel<T, 8>`; template arguments elided if too long:
    below the first level if that fits (`cutlass::device_kernel<lowbit::...::Sm90Only<...>>`
    still names the wrapper), else all of them."""
    s = demangled.replace("(anonymous namespace)::", "")
    if s.startswith("void "):
        s = s[len("void "):]
    full, elided, elided_deep, depth = [], [], [], 0
    for ch in s:
        if ch == "(" and depth == 0:
            break
        full.append(ch)
        if ch == "<":
            if depth == 0:
                elided.append("<...>")
            if depth == 1:
                elided_deep.append("<...>")
            elif depth == 0:
                elided_deep.append(ch)
            depth += 1
        elif ch == ">":
            depth -= 1
            if depth == 0:
                elided_deep.append(ch)
        else:
            if depth == 0:
                elided.append(ch)
            if depth <= 1:
                elided_deep.append(ch)
    name = "".join(full)
    if len(name) <= max_len:
        return name
    deep = "".join(elided_deep)
    return deep if len(deep) <= max_len and "<...>" in deep else "".join(elided)


def extension_path() -> str | None:
    """The built lowbit._C shared object, if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    return found[0] if found else None


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of kernel_resources() rows, for `lowbit info --kernels`."""
    header = f"{'arch':<7} {'regs':>4} {'stack':>5} {'local':>5} {'shared':>7}  kernel"
    lines = [header]
    for r in sorted(rows, key=lambda r: (r["arch"] or "", demangle(r["kernel"]))):
        lines.append(f"{r['arch']:<7} {r['registers']:>4} {r['stack']:>5} {r['local']:>5} {r['shared']:>7}  "
                     f"{demangle(r['kernel'])}")
    return "\n".join(lines)
