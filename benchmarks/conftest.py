"""pytest-benchmark setup for benchmarks/.

The benchmark files are named bench_*.py so that a plain `pytest` (testpaths = tests) never
runs them; this hook makes `pytest benchmarks` collect them.
"""

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
