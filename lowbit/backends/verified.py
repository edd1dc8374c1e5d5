"""Which GPU kernels have passed their tests on a real GPU.

A kernel written and compiled on a machine without a GPU is *unverified*: it is built,
compiled ahead of time for its targets and resource-checked in CI, but it has never run.
Unverified CUDA C++ kernels are never chosen by default (see lowbit.backends).

An entry is added only by a GPU pass (issue "GPU pass"), with the evidence committed under
benchmarks/results/. Format: (backend, op) -> list of records
    {"capability": (9, 0), "device": "NVIDIA H100 80GB HBM3", "date": "YYYY-MM-DD",
     "torch": "2.11.0+cu130", "evidence": "benchmarks/results/<file>"}
"""

from __future__ import annotations

VERIFIED: dict[tuple[str, str], list[dict]] = {
    # No GPU has been lent to this project yet: nothing is verified.
}


def records(backend: str, op: str) -> list[dict]:
    return VERIFIED.get((backend, op), [])


def is_verified(backend: str, op: str, capability: tuple[int, int]) -> bool:
    return any(tuple(r["capability"]) == tuple(capability) for r in records(backend, op))


def any_verified(backend: str, op: str) -> bool:
    return bool(records(backend, op))


def describe(backend: str, op: str) -> str:
    recs = records(backend, op)
    if not recs:
        return "unverified (never run on a GPU)"
    return "; ".join(f"passed on {r['device']} (sm_{r['capability'][0]}{r['capability'][1]}) {r['date']}" for r in recs)
