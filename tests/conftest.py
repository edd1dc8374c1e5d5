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
