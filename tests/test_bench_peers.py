"""Peer libraries as bench baselines (lowbit/bench_peers.py): selection, failures, and the real
peers' layers on a small problem wherever they are installed."""

import os

import pytest
import torch

from lowbit import bench, bench_peers
from lowbit.bench import Shape, TimingPlan

CPU = torch.device("cpu")
PLAN = TimingPlan(warmup=1, reps=2, min_reps=1, budget_s=1.0, min_sample_s=0.0)
ALL = {d: "1.0" for d in bench_peers.PACKAGES}


def test_describe_names_versions_and_missing_packages():
    text = bench_peers.describe({"torchao": "0.18.0", "bitsandbytes": None, "optimum-quanto": "0.2.7", "hqq": None})
    assert text == "torchao 0.18.0, optimum-quanto 0.2.7; not installed: bitsandbytes, hqq"
    assert bench_peers.describe(dict.fromkeys(bench_peers.PACKAGES)) == "none installed"


def test_installed_reads_distribution_versions(monkeypatch):
    def version(dist):
        if dist == "hqq":
            raise bench_peers.importlib.metadata.PackageNotFoundError(dist)
        return "9.9"
    monkeypatch.setattr(bench_peers.importlib.metadata, "version", version)
    got = bench_peers.installed()
    assert got == {"torchao": "9.9", "bitsandbytes": "9.9", "optimum-quanto": "9.9", "hqq": None}


def test_only_installed_peers_of_the_family_become_baselines():
    cands = bench_peers.peer_candidates("int4", {**ALL, "hqq": None})
    names = {c.name for c in cands}
    assert "hqq 4-bit g64" not in names
    assert {"bnb Linear4bit nf4", "quanto qint4 weights g128", "torchao Int4 g128 (opaque, CPU)"} <= names
    assert all(c.role == "baseline" and c.family == "int4" for c in cands)
    assert bench_peers.peer_candidates("binary", ALL) == []
    assert bench_peers.peer_candidates("int4", dict.fromkeys(bench_peers.PACKAGES)) == []


def test_device_specific_peers_are_filtered_by_device(monkeypatch):
    monkeypatch.setattr(bench_peers, "installed", lambda: ALL)
    cpu = {c.name for c in bench.candidates(["int4"], CPU, peers=True)}
    assert "torchao Int4 g128 (opaque, CPU)" in cpu and "torchao Int4 g128 (tile_packed_to_4d)" not in cpu
    assert not any(c.name.startswith(("torchao", "bnb", "quanto", "hqq"))
                   for c in bench.candidates(["int4"], CPU, peers=False))


def test_peer_traffic_counts_its_own_weight_bits():
    (nf4,) = [c for c in bench_peers.peer_candidates("int4", ALL) if c.name == "bnb Linear4bit nf4"]
    t = nf4.traffic(Shape(1, 4096, 4096))
    assert t.weight == 4096 * 4096 * 4.5 / 8  # 4 bits + an fp32 absmax per 64 weights
    assert t.activation == 4096 * 2 and t.output == 4096 * 2
    # Per-channel scales count once per output channel whatever K is; a partial group counts.
    (q8,) = [c for c in bench_peers.peer_candidates("int8", ALL) if c.name == "quanto qint8 weights"]
    assert q8.traffic(Shape(1, 100, 1000)).weight == 100 * 1000 + 100 * 2
    assert nf4.traffic(Shape(1, 10, 100)).weight == 10 * 100 // 2 + 10 * 2 * 4


def test_a_failing_peer_becomes_a_row_saying_why(monkeypatch):
    def broken(lin, device):
        raise ImportError("Requires mslk >= 1.0.0")

    fake = bench_peers.Peer("fake peer", "torchao", "int8", torch.bfloat16, broken, 8, 2)
    monkeypatch.setattr(bench_peers, "PEERS", [fake])
    cands = [c for c in bench.candidates(["int8"], CPU) if c.name == "fp32 F.linear"]
    cands += bench_peers.peer_candidates("int8", ALL)
    rows = bench.run_shape(Shape(2, 64, 32), cands, CPU, PLAN, None)
    by = {r.impl: r for r in rows}
    assert by["fake peer"].error == "ImportError: Requires mslk >= 1.0.0" and by["fake peer"].ms is None
    assert by["fp32 F.linear"].error is None and by["fp32 F.linear"].ms > 0


def test_a_peer_that_rejects_inference_mode_runs_under_no_grad():
    # quanto's qint4 tensors raise on inference tensors: the runner must not lose such a peer.
    class RejectsInference(torch.nn.Module):
        def forward(self, x):
            if torch.is_inference_mode_enabled():
                raise RuntimeError("Cannot set version_counter for inference tensor")
            assert not torch.is_grad_enabled()
            return x * 2

    x = torch.ones(2)
    with torch.inference_mode():
        run = bench_peers._runner(RejectsInference(), x)
        assert torch.equal(run(), torch.full((2,), 2.0))
    with pytest.raises(RuntimeError, match="other"):
        bench_peers._runner(lambda _: (_ for _ in ()).throw(RuntimeError("other failure")), x)


# Each real peer: quantizes the same weight and lands within its format's error of fp32.
MAX_REL_ERR = {"int8": 0.02, "int4": 0.15, "fp8": 0.06}
REAL = [p for p in bench_peers.PEERS if "cpu" in p.devices]


@pytest.mark.parametrize("peer", REAL, ids=[p.name for p in REAL])
def test_installed_peer_runs_the_bench_problem(peer):
    if not bench_peers.installed()[peer.dist]:
        # scripts/install.sh installs every peer, so in CI a missing one is a failed install
        # step (which install.sh lets pass), not a reason to skip.
        if os.environ.get("CI"):
            pytest.fail(f"{peer.dist} is not installed: scripts/install.sh's peer step failed")
        pytest.skip(f"{peer.dist} is not installed")
    (cand,) = [c for c in bench_peers.peer_candidates(peer.family) if c.name == peer.name]
    rows = bench.run_shape(Shape(3, 64, 256), [cand], CPU, PLAN, None)
    (row,) = rows
    assert row.error is None, row.error
    assert row.ms > 0 and row.samples == 2
    assert row.rel_err < MAX_REL_ERR[peer.family], row.rel_err
