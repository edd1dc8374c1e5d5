"""The benchmark harness's accounting and ratio logic, on made-up numbers: a wrong GOP/s,
byte count or ratio here would make every reported benchmark wrong."""


import time

import pytest
import torch

from lowbit import bench
from lowbit.bench import Candidate, Roofline, Shape, Traffic, TimingPlan


def test_flops_count_one_multiply_and_one_add():
    assert Shape(16, 4096, 11008).flops == 2 * 16 * 4096 * 11008


def test_traffic_int8_weight_only_fp32():
    s = Shape(16, 4096, 1024)
    t = bench.gemm_traffic(s, weight_bits=8, scale_bytes=4, act_bytes=4, out_bytes=4)
    assert t == Traffic(weight=4096 * 1024 + 4096 * 4, activation=16 * 1024 * 4, output=16 * 4096 * 4)
    assert t.total == t.weight + t.activation + t.output


def test_traffic_packed_bits_round_up_and_group_scales():
    s = Shape(1, 3, 5)  # 15 four-bit weights need 8 bytes, not 7.5
    t = bench.gemm_traffic(s, weight_bits=4, scale_bytes=2, scales=3 * 2, act_bytes=2, out_bytes=2)
    assert t.weight == 8 + 12
    assert (t.activation, t.output) == (10, 6)


def test_int8_candidates_account_their_own_formats():
    s = Shape(1, 4096, 4096)
    by = {bench.candidate_id(c): c.traffic(s) for c in bench.candidates(["int8"], torch.device("cpu"))}
    assert by["baseline:fp32 F.linear[float32]"].weight == 4 * 4096 * 4096
    assert by["baseline:bf16 F.linear[bfloat16]"].weight == 2 * 4096 * 4096
    assert by["lowbit:int8_weight_only_mm[float32]"].weight == 4096 * 4096 + 4 * 4096
    raw = by["lowbit:int8_mm (raw)[int8]"]
    assert (raw.activation, raw.output) == (4096, 4 * 4096)  # int8 in, int32 out


def test_parse_nk():
    assert bench.parse_nk("11008x4096") == (11008, 4096)
    assert bench.parse_nk(" 8 X 16 ") == (8, 16)
    for bad in ("4096", "0x4", "ax4", "4x4x4", "-1x4"):
        with pytest.raises(ValueError, match="NxK"):
            bench.parse_nk(bad)


def test_roofline_picks_the_binding_limit():
    roof = Roofline(bandwidth_gbs=20.0, peak_gops={"float": 100.0, "int8": 200.0})
    # 1000 OP over 100 B: intensity 10 OP/B -> memory roof 200 GOP/s; float peak 100 binds.
    assert roof.bound_gops("float", 1000, 100) == 100.0
    assert roof.bound_gops("int8", 1000, 100) == 200.0
    # intensity 1 OP/B: bandwidth binds at 20 GOP/s for every compute class.
    assert roof.bound_gops("int8", 100, 100) == 20.0
    # 100 OP in 10 ns = 10 GOP/s = half of the 20 GOP/s memory roof.
    assert roof.percent("float", 100, 100, 10e-9) == pytest.approx(50.0)


def test_paired_ratio_uses_only_rounds_both_ran():
    base = [2.0, 4.0, None, 8.0]
    cand = [1.0, None, 1.0, 2.0]
    # rounds 0 and 3: ratios 2 and 4 -> median 3
    assert bench.paired_ratio(base, cand) == pytest.approx(3.0)
    assert bench.paired_ratio([None], [1.0]) is None


def test_paired_ratio_cancels_drift_that_separate_medians_keep():
    # The machine slows down 3x half way; the candidate is always exactly 2x faster.
    base = [2.0, 2.0, 6.0, 6.0, 6.0]
    cand = [1.0, 1.0, 3.0, 3.0, 3.0]
    assert bench.paired_ratio(base, cand) == pytest.approx(2.0)
    # whereas a ratio of medians of unequal sample sets would not be 2
    assert bench.median_time(base) / bench.median_time(cand[:2]) != pytest.approx(2.0)


def test_strongest_ignores_candidates_without_samples():
    samples = {"a": [3.0, 3.0], "b": [None, None], "c": [2.0, 5.0, 1.0]}
    assert bench.strongest(samples, ["a", "b", "c"]) == "c"
    assert bench.strongest(samples, ["b"]) is None


def test_plan_reps_repeats_short_calls_and_trims_slow_ones():
    plan = TimingPlan(reps=11, min_reps=3, budget_s=5.0, min_sample_s=2e-3)
    assert bench.plan_reps(1e-4, plan) == (11, 20, False)
    assert bench.plan_reps(0.1, plan) == (11, 1, False)
    assert bench.plan_reps(1.0, plan) == (5, 1, True)
    assert bench.plan_reps(10.0, plan) == (3, 1, True)


class _FakeTimer:
    device = torch.device("cpu")

    def sync(self):
        pass

    def __call__(self, fn, inner):
        return fn()


def test_time_interleaved_gives_every_round_to_fast_candidates():
    plan = TimingPlan(warmup=1, reps=4, min_reps=2, budget_s=1e9, min_sample_s=0.0)
    samples, slow = bench.time_interleaved({"a": lambda: 1.0, "b": lambda: 2.0}, _FakeTimer(), plan)
    assert samples == {"a": [1.0] * 4, "b": [2.0] * 4}
    assert slow == {"a": False, "b": False}


def _cand(name, role, act="float32", compute="float", family="int8"):
    return Candidate(name, family, role, act, compute, "float", build=None,
                     traffic=lambda s: bench.gemm_traffic(s, weight_bits=8, act_bytes=4, out_bytes=4))


def test_summarize_ratios_against_strongest_baseline_and_control():
    shape = Shape(1, 1000, 1000)
    cands = [_cand("fp32 F.linear", "baseline"), _cand("qd", "baseline", compute="int8"),
             _cand("mine", "lowbit"), _cand("broken", "lowbit")]
    ids = [bench.candidate_id(c) for c in cands]
    samples = {
        ids[0]: [4e-3, 8e-3, 4e-3],
        ids[1]: [1e-3, 2e-3, 1e-3],   # the strongest baseline, 4x the control
        ids[2]: [0.5e-3, 1e-3, 0.5e-3],  # 2x the strongest in every round
    }
    roof = Roofline(bandwidth_gbs=10.0, peak_gops={"float": 1e6, "int8": 1e6})
    rows = bench.summarize(shape, cands, samples, {}, {ids[3]: "RuntimeError: no kernel"},
                           {ids[2]: 0.01}, roof, "fp32 F.linear")
    by = {r.impl: r for r in rows}
    assert by["qd"].vs_best == pytest.approx(1.0)
    assert by["qd"].vs_control == pytest.approx(4.0)
    assert by["mine"].vs_best == pytest.approx(2.0)
    assert by["mine"].vs_control == pytest.approx(8.0)
    assert by["fp32 F.linear"].vs_best == pytest.approx(0.25)
    assert all(r.best_baseline == ids[1] for r in rows)
    mine = by["mine"]
    assert mine.ms == pytest.approx(0.5)
    assert mine.gops == pytest.approx(2 * 1000 * 1000 / 0.5e-3 / 1e9)
    nbytes = 1000 * 1000 + 1000 * 4 + 1000 * 4
    assert mine.gbs == pytest.approx(nbytes / 0.5e-3 / 1e9)
    # memory-bound: roof = 10 GB/s * intensity
    assert mine.roofline_pct == pytest.approx(100 * mine.gops / (10.0 * 2e6 / nbytes))
    assert (mine.rel_err, mine.samples) == (0.01, 3)
    broken = by["broken"]
    assert broken.ms is None and broken.vs_best is None and "no kernel" in broken.error
    table = bench.format_table(rows)
    assert "vs best" in table.splitlines()[0] and "2.00x" in table and "no kernel" in table
    assert "qd *" in table  # the strongest baseline is marked


def test_vs_best_is_per_family_whatever_shares_the_run():
    shape = Shape(1, 64, 64)
    int8 = [_cand("fp32 F.linear", "baseline"), _cand("qd", "baseline"), _cand("w8", "lowbit")]
    int4 = [_cand("fp32 F.linear", "baseline", family="int4"), _cand("int4pack", "baseline", family="int4"),
            _cand("w4", "lowbit", family="int4")]
    t = {"fp32 F.linear": 4e-3, "qd": 1e-3, "w8": 1e-3, "int4pack": 2e-3, "w4": 1e-3}
    samples = {bench.candidate_id(c): [t[c.name]] * 3 for c in int8 + int4}
    alone = {r.impl: r for r in bench.summarize(shape, int4, samples, {}, {}, {}, None, "fp32 F.linear")}
    both = bench.summarize(shape, int8 + int4, samples, {}, {}, {}, None, "fp32 F.linear")
    w4 = next(r for r in both if r.impl == "w4")
    # The int8 family's faster baseline (qd, 1 ms) must not become the int4 rows' "best".
    assert w4.vs_best == pytest.approx(2.0) == alone["w4"].vs_best
    assert w4.best_baseline == bench.candidate_id(int4[1])
    assert next(r for r in both if r.impl == "w8").vs_best == pytest.approx(1.0)
    table = bench.format_table(both)
    assert "int4pack *" in table and "qd *" in table  # each family's strongest baseline is marked


def test_rel_err():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert bench.rel_err(torch.tensor([3.0, 4.0]), ref) == 0.0
    assert bench.rel_err(torch.tensor([3.0, 3.0]), ref) == pytest.approx(1 / 5)


def test_device_slug_names_results_files():
    meta = {"device": "cpu", "cpu": "AMD EPYC 7763 64-Core Processor", "cores": 2, "date": "2026-11-23"}
    assert bench.device_slug(meta) == "cpu-amd-epyc-7763-64-core-processor-2c_2026-11-23"
    gpu = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-24"}
    assert bench.device_slug(gpu) == "nvidia-h100-80gb-hbm3_2026-11-24"


def test_run_shape_measures_and_checks_small_problem():
    dev = torch.device("cpu")
    plan = TimingPlan(warmup=1, reps=2, min_reps=1, budget_s=1.0, min_sample_s=0.0)
    rows = bench.run_shape(Shape(2, 64, 32), bench.candidates(["int8"], dev), dev, plan, None)
    by = {bench.candidate_id_row(r): r for r in rows}
    for r in rows:
        assert r.error is None, (r.impl, r.error)
        assert r.ms > 0 and r.vs_best > 0 and r.samples == 2
    # Exact integer ops must be exact; float ones within int8 quantization error.
    assert by["lowbit:int8_mm (raw)[int8]"].rel_err == 0
    assert by["baseline:torch._int_mm (raw)[int8]"].rel_err == 0
    assert by["baseline:fp32 F.linear[float32]"].rel_err < 1e-6
    assert by["lowbit:int8_weight_only_mm[float32]"].rel_err < 0.02
    assert by["lowbit:w8a8 (quantize_dynamic+scaled_mm)[float32]"].rel_err < 0.03


def test_roofline_best_keeps_the_highest_measurement_of_each_limit():
    start = Roofline(bandwidth_gbs=25.0, peak_gops={"float": 40.0, "int8": 170.0},
                     how={"bandwidth": "a", "float": "a", "int8": "a"})
    end = Roofline(bandwidth_gbs=20.0, peak_gops={"float": 150.0, "int8": 160.0},
                   how={"bandwidth": "b", "float": "b", "int8": "b"})
    best = Roofline.best(start, end)
    assert best.bandwidth_gbs == 25.0 and best.how["bandwidth"] == "a"
    assert best.peak_gops == {"float": 150.0, "int8": 170.0}
    assert best.how["float"] == "b" and best.how["int8"] == "a"


def test_with_roofline_recomputes_percent_from_the_rows_own_traffic():
    shape = Shape(256, 1024, 1024)
    row = bench.Row("int8", "x", "lowbit", "float32", shape.m, shape.n, shape.k)
    t, nbytes = 0.01, 3_000_000
    row.gops, row.gbs = shape.flops / t / 1e9, nbytes / t / 1e9
    low = Roofline(bandwidth_gbs=25.0, peak_gops={"float": 20.0})
    high = Roofline(bandwidth_gbs=25.0, peak_gops={"float": 100.0})
    bench.with_roofline([row], low, {bench.candidate_id_row(row): "float"})
    pct_low = row.roofline_pct
    bench.with_roofline([row], high, {bench.candidate_id_row(row): "float"})
    assert pct_low == pytest.approx(high.percent("float", shape.flops, nbytes, t) * 5)
    assert row.roofline_pct == pytest.approx(100.0 * (shape.flops / t / 1e9) / min(100.0, 25.0 * shape.flops / nbytes))


def test_cold_timer_evicts_before_every_timed_call_and_times_only_the_call():
    timer = bench.CpuTimer(cold=True)
    assert timer._flush.numel() * 4 >= bench.FLUSH_MIN_BYTES
    llc = bench.last_level_cache_bytes()
    if llc:
        assert timer._flush.numel() * 4 >= bench.FLUSH_FACTOR * llc
    calls = []
    timer.evict = lambda: (calls.append("evict"), time.sleep(0.02))
    t = timer(lambda: calls.append("call"), 3)
    assert calls == ["evict", "call"] * 3
    assert t < 0.01  # the 20 ms evictions are outside the timed region


def test_cold_cache_makes_a_cache_resident_weight_slower_than_warm():
    """The point of cold timing: 2 MiB of weights read back to back stay in cache; evicted,
    each call reads them from memory again. One thread and the minimum of many samples: a
    2-thread op on this shared 2-core machine stalls for milliseconds whenever another process
    takes a core, which would swamp the difference."""
    w = torch.randn(512 * 1024)
    fn = lambda: w.sum()  # noqa: E731
    cold, warm = bench.CpuTimer(cold=True), bench.CpuTimer(cold=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_cold = min(cold(fn, 1) for _ in range(21))
        t_warm = min(warm(fn, 1) for _ in range(21))
    finally:
        torch.set_num_threads(threads)
    assert t_cold > 1.2 * t_warm, (t_cold, t_warm)


def test_cold_call_floor_is_the_median_of_cold_timings_of_a_one_element_op(monkeypatch):
    """The floor is timed exactly as candidates are (a cold timer, one call per sample) and
    reported as the median; the op it times really runs (the tensor it adds 0 to stays 0)."""
    seen = {}
    times = iter([5.0, 1.0, 3.0, 2.0, 4.0])

    class FakeTimer:
        def sync(self):
            pass

        def __call__(self, fn, inner):
            assert inner == 1
            fn()
            return next(times)

    def fake_timer_for(device, cold=True):
        seen["cold"] = cold
        return FakeTimer()

    monkeypatch.setattr(bench, "timer_for", fake_timer_for)
    assert bench.cold_call_floor(torch.device("cpu"), reps=5) == 3.0
    assert seen["cold"] is True


def test_cold_call_floor_exceeds_the_warm_call():
    """On a real CPU the floor is what the eviction costs a trivial call: far above its warm time."""
    one = torch.zeros(1)
    warm = min(bench.CpuTimer(cold=False)(lambda: one.add_(0), 1) for _ in range(21))
    assert bench.cold_call_floor(torch.device("cpu"), reps=11) > 2 * warm
