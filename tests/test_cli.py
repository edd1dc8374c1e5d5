"""The `lowbit` command, run as a user runs it: a separate process, exit codes, output."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lowbit import bench, cli

BACKENDS = ("cpu", "cuda", "triton", "reference")


def run(*args, timeout=120):
    # `python -m lowbit` is the console script's entry point without depending on PATH.
    return subprocess.run([sys.executable, "-m", "lowbit", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "LOWBIT_DEBUG": ""})


def test_info_lists_every_backend_and_op():
    p = run("info")
    assert p.returncode == 0, p.stderr
    for name in BACKENDS:
        assert f"\n  {name} " in p.stdout
    assert "int8_weight_only_mm" in p.stdout
    assert torch.__version__ in p.stdout


def test_info_json():
    p = run("info", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert set(BACKENDS) <= set(d["backends"])
    assert all(isinstance(b["available"], bool) and b["reason"] for b in d["backends"].values())
    assert {r["op"] for r in d["kernels"]} >= {"int8_mm", "int8_scaled_mm", "int8_weight_only_mm"}
    assert d["cpu"]["flags"]["avx2"] in (True, False)


def test_bad_argument_exits_2():
    p = run("bench", "--m", "0")
    assert p.returncode == 2
    assert "--m: expected a positive integer" in p.stderr


@pytest.mark.parametrize("args", [("bench", "--shapes", "4096"), ("bench", "--ops", "nope"), ("nope",),
                                  ("info", "--bogus"), ("demo", "--reps", "x")])
def test_bad_arguments_exit_2_in_process(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bench_quick_prints_table_with_ratio_column(tmp_path):
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    p = run("bench", "--quick", "--ops", "int8", "--m", "1", "--shapes", "256x256", "--markdown", str(md),
            "--json", str(js))
    assert p.returncode == 0, p.stderr
    header = next(line for line in p.stdout.splitlines() if line.startswith("op "))
    for col in ("impl", "ms", "GOP/s", "GB/s", "%roof", "vs best"):
        assert col in header
    assert "lowbit int8_weight_only_mm" in p.stdout and "quantize_dynamic qint8" in p.stdout
    rows = json.loads(js.read_text())["rows"]
    assert any(r["role"] == "lowbit" and r["vs_best"] is not None for r in rows)
    assert all((r["m"], r["n"], r["k"]) == (1, 256, 256) for r in rows)
    text = md.read_text()
    assert text.startswith("# lowbit bench: ") and torch.__version__ in text and "| vs best |" in text
    assert "lowbit kernels " in text


def test_runtime_failure_is_one_line_and_exit_1(tmp_path, capsys):
    # An unwritable output is caught before the (long) run starts.
    rc = cli.main(["bench", "--quick", "--m", "1", "--shapes", "64x64", "--markdown", str(tmp_path / "no" / "x.md")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().count("\n") == 0 and err.startswith("lowbit: error: cannot write")


def test_cuda_kernel_rows_name_their_op_and_verified_status(monkeypatch):
    import types

    from lowbit.backends import verified

    fake = types.ModuleType("lowbit.cuda_resources")
    fake.kernel_resources = lambda so: [
        {"kernel": "_Z1aIL1EE", "arch": "sm_90", "registers": 168, "stack": 0, "local": 0, "shared": 0},
        {"kernel": "_Z1b", "arch": "sm_80", "registers": 40, "stack": 0, "local": 0, "shared": 0},
    ]
    names = {"_Z1aIL1EE": "void lowbit::int8_scaled_mm_kernel<1>()", "_Z1b": "void mystery_kernel()"}
    fake.demangle = names.__getitem__
    monkeypatch.setitem(sys.modules, "lowbit.cuda_resources", fake)
    monkeypatch.setattr(cli, "_so_path", lambda: "/fake/_C.so")
    monkeypatch.setitem(verified.VERIFIED, ("cuda", "int8_scaled_mm"), [
        {"capability": (9, 0), "device": "NVIDIA H100", "date": "2026-01-01", "torch": "2.11", "evidence": "x"}])
    d = cli._cuda_kernel_resources()
    a, b = d["kernels"]
    # "int8_scaled_mm" contains "int8_mm" as a substring only loosely: the longer op must win.
    assert (a["op"], a["registers"], a["kernel"]) == ("int8_scaled_mm", 168, names["_Z1aIL1EE"])
    assert "passed on NVIDIA H100" in a["verified"]
    assert b["op"] is None and b["verified"] == "unknown op"
    assert "int8_scaled_mm_kernel" in cli.format_info({**cli.info_data(False), "cuda_kernels": d,
                                                        "triton_aot": {"status": "x", "kernels": []}})


def test_info_names_the_tier_lowbit_kernels_run_at_beside_torch_capability(monkeypatch):
    monkeypatch.delenv("LOWBIT_CPU_ISA", raising=False)
    monkeypatch.setattr(bench.platform, "machine", lambda: "x86_64")
    assert bench.lowbit_cpu_isa({"avx2", "fma", "f16c"}) == "AVX2+FMA+F16C"
    # torch's kernels use AVX-512 here and lowbit's own loops mostly do not: the line must say
    # which do, and name the products lowbit hands to torch's GEMMs instead.
    monkeypatch.delenv("LOWBIT_DECODED_GEMM", raising=False)
    monkeypatch.delenv("LOWBIT_INT8_ONEDNN", raising=False)
    monkeypatch.delenv("LOWBIT_BINARY_LOOP", raising=False)
    fp32_route = "int4/codebook fp32/fp16 and int8 weight-only from M = 96 on torch's AVX-512 GEMM"
    assert bench.lowbit_cpu_isa({"avx2", "fma", "f16c", "avx512f"}) == (
        f"AVX2+FMA+F16C (AVX-512 for the int4 and fp8 small-M kernels; {fp32_route})")
    monkeypatch.delenv("LOWBIT_INT4_AMX", raising=False)
    monkeypatch.delenv("LOWBIT_INT8_WO_AMX", raising=False)
    monkeypatch.delenv("LOWBIT_FP8_AMX", raising=False)
    monkeypatch.delenv("LOWBIT_CODEBOOK_AMX", raising=False)
    monkeypatch.delenv("LOWBIT_SPARSE24_AMX", raising=False)
    amx = {"avx2", "fma", "f16c", "avx512f", "amx_int8", "amx_bf16"}
    assert bench.lowbit_cpu_isa(amx) == (
        "AVX2+FMA+F16C (AVX-512 for the int4 and fp8 small-M kernels and bf16 panels; int4 bf16 from M = 33, codebook "
        f"bf16 from M = 24 on torch's AMX bf16 GEMM; {fp32_route}; W8A8 from M = 10, sparse24 W8A8 from M = 20 "
        "on torch's AMX int8 GEMM)")
    # Without VBMI2, lowbit's own AMX kernels stay off (amx_bf16_ready needs it, and BW and BF16).
    assert "lowbit's AMX kernels" not in bench.lowbit_cpu_isa(amx | {"amx_tile", "avx512bw", "avx512_bf16"})
    # With the AVX-512 BW, BF16 and VBMI2 that lowbit's own AMX kernels decode with (every AMX CPU so far).
    amx = amx | {"amx_tile", "avx512bw", "avx512_bf16", "avx512_vbmi2"}
    assert bench.lowbit_cpu_isa(amx) == (
        "AVX2+FMA+F16C (AVX-512 for the int4 and fp8 small-M kernels and bf16 panels; int4 bf16 M = 5-256 and "
        "int8 weight-only bf16 from M = 5 and fp8 (bf16 weight-only, W8A8; vector scales) from M = 2 and codebook "
        "bf16 M = 10-96 (kmeans4-like: 2-256) and sparse24 bf16 x (bf16/int8 values) M = 3-223 on lowbit's AMX "
        "kernels; int4 bf16 from M = 257, codebook bf16 from M = 97, sparse24 bf16 x from M = 224 on torch's AMX "
        "bf16 GEMM; "
        "int4/codebook fp32/fp16 and int8 weight-only fp32/fp16 from M = 96 on torch's AVX-512 GEMM; W8A8 from "
        "M = 10, sparse24 W8A8 from M = 20 on torch's AMX int8 GEMM)")
    monkeypatch.setenv("LOWBIT_INT4_AMX", "0")
    assert "int4 bf16 from M = 33" in bench.lowbit_cpu_isa(amx) and "int4 bf16 M" not in bench.lowbit_cpu_isa(amx)
    monkeypatch.setenv("LOWBIT_INT8_WO_AMX", "0")
    monkeypatch.setenv("LOWBIT_FP8_AMX", "0")
    monkeypatch.setenv("LOWBIT_CODEBOOK_AMX", "0")
    monkeypatch.setenv("LOWBIT_SPARSE24_AMX", "0")
    assert "AMX kernels" not in bench.lowbit_cpu_isa(amx) and fp32_route in bench.lowbit_cpu_isa(amx)
    monkeypatch.delenv("LOWBIT_INT4_AMX")
    monkeypatch.delenv("LOWBIT_INT8_WO_AMX")
    monkeypatch.delenv("LOWBIT_FP8_AMX")
    monkeypatch.delenv("LOWBIT_CODEBOOK_AMX")
    monkeypatch.delenv("LOWBIT_SPARSE24_AMX")
    monkeypatch.setenv("LOWBIT_INT8_ONEDNN", "0")
    monkeypatch.setenv("LOWBIT_DECODED_GEMM", "0")
    assert bench.lowbit_cpu_isa(amx) == (
        "AVX2+FMA+F16C (AVX-512 for the int4 and fp8 small-M kernels; int4 bf16 M = 5-256 and int8 weight-only "
        "bf16 from M = 5 and fp8 (bf16 weight-only, W8A8; vector scales) from M = 2 and codebook bf16 M = 10-96 "
        "(kmeans4-like: 2-256) and sparse24 bf16 x (bf16/int8 values) from M = 3 on lowbit's AMX kernels)")
    monkeypatch.setenv("LOWBIT_INT4_AMX", "0")
    monkeypatch.setenv("LOWBIT_INT8_WO_AMX", "0")
    monkeypatch.setenv("LOWBIT_FP8_AMX", "0")
    monkeypatch.setenv("LOWBIT_CODEBOOK_AMX", "0")
    monkeypatch.setenv("LOWBIT_SPARSE24_AMX", "0")
    assert bench.lowbit_cpu_isa(amx) == "AVX2+FMA+F16C (AVX-512 for the int4 and fp8 small-M kernels)"
    assert bench.lowbit_cpu_isa(amx | {"avx512_vpopcntdq"}) == (
        "AVX2+FMA+F16C (AVX-512 for the int4 and fp8 small-M kernels, binary vpopcntq)")
    monkeypatch.setenv("LOWBIT_CPU_ISA", "avx2")
    assert bench.lowbit_cpu_isa(amx) == "AVX2+FMA+F16C (AVX-512 present, hidden by LOWBIT_CPU_ISA=avx2)"
    monkeypatch.delenv("LOWBIT_CPU_ISA")
    assert bench.lowbit_cpu_isa({"avx2", "fma"}) == "portable (no AVX2/FMA/F16C)"
    assert bench.lowbit_cpu_isa(set()).startswith("unknown")
    monkeypatch.setattr(bench.platform, "machine", lambda: "aarch64")
    assert bench.lowbit_cpu_isa({"asimd"}) == "portable"
    monkeypatch.setenv("LOWBIT_CPU_ISA", "scalar")
    assert bench.lowbit_cpu_isa({"avx2", "fma", "f16c"}) == "portable (LOWBIT_CPU_ISA=scalar)"
    assert "lowbit kernels portable (LOWBIT_CPU_ISA=scalar)" in cli.format_info(cli.info_data(False))
    # ...and every result file's device line.
    assert bench.device_meta(torch.device("cpu"))["lowbit_isa"] == "portable (LOWBIT_CPU_ISA=scalar)"


def test_demo_accounting_helpers():
    lin = torch.nn.Linear(64, 32)
    model = torch.nn.Sequential(lin, torch.nn.LayerNorm(32))

    class Packed(torch.nn.Module):  # what a 4-bit layer with fp16 group scales would hold
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", torch.zeros(32, 32, dtype=torch.uint8))
            self.register_buffer("scales", torch.zeros(32, 2, dtype=torch.float16))
            self.bias = torch.nn.Parameter(torch.zeros(32))

    q = torch.nn.Sequential(Packed(), torch.nn.LayerNorm(32))
    assert cli.linear_bits_per_weight(model, model) == 32.0
    assert cli.linear_bits_per_weight(model, q) == pytest.approx(8 * (32 * 32 + 32 * 2 * 2) / (32 * 64))
    assert cli.model_nbytes(model) == 4 * (32 * 64 + 32 + 32 + 32)
    ref = torch.ones(100)
    assert cli.sqnr_db(ref, ref) == float("inf")
    assert cli.sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)


def test_demo_report_runs_a_preset_end_to_end():
    from lowbit.configs import PRESETS

    name = next(iter(PRESETS))
    # The demo's own path with a smaller Llama, so the test costs seconds even on a busy machine.
    tiny = {**cli.DEMO_CONFIG, "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256, "vocab_size": 256}
    with open(os.devnull, "w") as devnull:
        rows, text = cli.demo_report(reps=2, presets=[name], stream=devnull, config=tiny)
    assert [r["scheme"] for r in rows] == ["float32", name]
    q = rows[1]
    assert q["error"] is None, q["error"]
    assert q["bits"] < 16 and q["bytes"] < rows[0]["bytes"]
    assert 10 < q["sqnr"] < 200  # quantized: not bit-identical, not garbage
    assert q["latency_ms"] > 0 and q["speedup"] > 0
    assert "SQNR dB" in text and name in text
