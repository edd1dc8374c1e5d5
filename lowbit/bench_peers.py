"""Peer libraries as baselines of ``lowbit bench``: torchao, bitsandbytes, optimum-quanto, hqq.

Each peer quantizes the same float weight with its own scheme and format and runs its own
Linear; the harness times it in the same interleaved rounds as torch's kernels and lowbit's,
so "vs best" is the ratio to the fastest of all of them on this machine. A peer that is not
installed adds no rows (the run's header lists it as missing); one that is installed but fails
to build or run on this device adds a row whose note says why, as torch's baselines do.

Which rows, and why (CPU numbers: the 2-core Zen 3 of ../shared/CPU-ANCHORS.md, 4096^2, M=1):

* each peer's layer in the activation dtype where it is fastest on this device (bf16 for most
  on the CPU: their fp32 paths dequantize the whole weight, e.g. torchao's Int8WeightOnly
  42 ms fp32 vs 17 ms bf16; bitsandbytes' 8-bit is the exception, 49 vs 106 ms);
* torchao's int4 goes through ``PrototypeInt4WeightOnlyConfig`` (Int4OpaqueTensor, torch's
  ``_weight_int4pack_mm_for_cpu``) on the CPU and ``Int4WeightOnlyConfig(tile_packed_to_4d)``
  on CUDA; its plain int4 needs the mslk package and fails without it;
* hqq only at 4 bits (group 64, as its docs recommend): building one 4096^2 layer takes 14 s,
  and its 8-bit layer is slower than fp32 here;
* no codebook peer: torchao's prototype ``codebook_weight_only`` did not finish quantizing one
  4096^2 layer in 10 minutes on this CPU. No peer offers 2:4 or binary layers on the CPU.

Peers' layers are called under ``torch.no_grad`` with inference mode switched off where their
tensor subclasses reject inference tensors (quanto's qint4 does); the context switch costs
microseconds against their milliseconds.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

# distribution name -> module to import
PACKAGES: dict[str, str] = {
    "torchao": "torchao",
    "bitsandbytes": "bitsandbytes",
    "optimum-quanto": "optimum.quanto",
    "hqq": "hqq",
}


def installed() -> dict[str, str | None]:
    """Version of every peer distribution, None where it is not installed."""
    out = {}
    for dist in PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def describe(versions: dict[str, str | None]) -> str:
    """One line for a run's header: 'torchao 0.18.0, hqq 0.2.8; not installed: bitsandbytes'."""
    have = [f"{d} {v}" for d, v in versions.items() if v]
    missing = [d for d, v in versions.items() if not v]
    text = ", ".join(have) if have else "none installed"
    return text + (f"; not installed: {', '.join(missing)}" if missing and have else "")


@contextlib.contextmanager
def _quiet():
    # Peers warn on import and on every build (deprecations, torch._pytree notices through
    # logging); the result rows, not those, are what a run reports.
    loggers = [logging.getLogger(n) for n in ("torch.utils._pytree", "torch.utils.cpp_extension")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _import(module: str):
    with _quiet():
        return importlib.import_module(module)


def _float_linear(inp, dtype: torch.dtype) -> torch.nn.Linear:
    """A fresh nn.Linear holding inp.w in `dtype` on inp's device: each peer converts its own."""
    with torch.inference_mode(False):
        lin = torch.nn.Linear(inp.shape.k, inp.shape.n, bias=False, device="meta")
        lin.weight = torch.nn.Parameter(inp.w.detach().clone().to(dtype), requires_grad=False)
    return lin


def _runner(layer: Callable, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """layer(x) under inference mode where the layer allows it, else under no_grad."""
    try:
        layer(x)
        return lambda: layer(x)
    except RuntimeError as e:
        if "inference" not in str(e).lower():
            raise

    def run():
        with torch.inference_mode(False), torch.no_grad():
            return layer(x)
    return run


def _activations(inp, dtype: torch.dtype) -> torch.Tensor:
    from . import bench

    # The same bf16 x tensor torch's baselines and lowbit's rows use (bench._bf16's cache key).
    return inp.x if dtype == torch.float32 else bench._bf16(inp, "x16", lambda: inp.x)


@dataclass(frozen=True)
class Peer:
    """One peer layer: `make(linear, device) -> module` quantizes a float nn.Linear."""

    name: str
    dist: str                   # distribution in PACKAGES
    family: str                 # lowbit bench family whose table it joins
    act: torch.dtype
    make: Callable[[torch.nn.Linear, torch.device], Callable]
    # Traffic accounting, in the peer's own format: bits per weight, plus scale_bytes (scale and
    # zero together) per output channel (group None) or per `group` weights along K.
    bits: int
    scale_bytes: int
    group: int | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")

    def traffic(self, shape):
        from . import bench

        act_bytes = 4 if self.act == torch.float32 else 2
        scales = shape.n if self.group is None else shape.n * -(-shape.k // self.group)
        return bench.gemm_traffic(shape, weight_bits=self.bits, scale_bytes=self.scale_bytes, scales=scales,
                                  act_bytes=act_bytes, out_bytes=act_bytes)


# ---- torchao
def _torchao(config_fn):
    def make(lin, device):
        q = _import("torchao.quantization")
        with _quiet(), torch.inference_mode(False):
            q.quantize_(lin, config_fn())
        return lin
    return make


def _ao_int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig
    return Int8WeightOnlyConfig(set_inductor_config=False)


def _ao_int8_dynamic():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


def _ao_int4_cpu():
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    return PrototypeInt4WeightOnlyConfig(group_size=128)


def _ao_int4_cuda():
    from torchao.quantization import Int4WeightOnlyConfig
    return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)


def _ao_fp8_weight_only():
    from torchao.quantization import Float8WeightOnlyConfig
    return Float8WeightOnlyConfig(set_inductor_config=False)


# ---- bitsandbytes
def _bnb_int8(lin, device):
    bnb = _import("bitsandbytes")
    with torch.inference_mode(False):
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        return q.to(device)  # quantizes on the move, as its docs do


def _bnb_nf4(lin, device):
    bnb = _import("bitsandbytes")
    with torch.inference_mode(False):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, quant_type="nf4",
                              compute_dtype=lin.weight.dtype)
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        return q.to(device)


# ---- optimum-quanto
def _quanto(weights: str):
    def make(lin, device):
        quanto = _import("optimum.quanto")
        model = torch.nn.Sequential(lin)
        with _quiet(), torch.inference_mode(False):
            quanto.quantize(model, weights=getattr(quanto, weights))
            quanto.freeze(model)
        return model
    return make


# ---- hqq
def _hqq(nbits: int, group_size: int):
    def make(lin, device):
        core = _import("hqq.core.quantize")
        with _quiet(), torch.inference_mode(False):
            return core.HQQLinear(lin, core.BaseQuantizeConfig(nbits=nbits, group_size=group_size),
                                  compute_dtype=lin.weight.dtype, device=str(device))
    return make


BF16, F32 = torch.bfloat16, torch.float32
PEERS: list[Peer] = [
    Peer("torchao Int8WeightOnly", "torchao", "int8", BF16, _torchao(_ao_int8_weight_only), 8, 2),
    Peer("torchao Int8DynAct-Int8W", "torchao", "int8", BF16, _torchao(_ao_int8_dynamic), 8, 2),
    Peer("bnb Linear8bitLt", "bitsandbytes", "int8", F32, _bnb_int8, 8, 4),
    Peer("quanto qint8 weights", "optimum-quanto", "int8", BF16, _quanto("qint8"), 8, 2),
    Peer("torchao Int4 g128 (opaque, CPU)", "torchao", "int4", BF16, _torchao(_ao_int4_cpu), 4, 4, 128, ("cpu",)),
    Peer("torchao Int4 g128 (tile_packed_to_4d)", "torchao", "int4", BF16, _torchao(_ao_int4_cuda), 4, 4, 128,
         ("cuda",)),
    Peer("bnb Linear4bit nf4", "bitsandbytes", "int4", BF16, _bnb_nf4, 4, 4, 64),  # fp32 absmax per 64
    Peer("quanto qint4 weights g128", "optimum-quanto", "int4", BF16, _quanto("qint4"), 4, 4, 128),
    Peer("hqq 4-bit g64", "hqq", "int4", BF16, _hqq(4, 64), 4, 4, 64),
    Peer("torchao Float8WeightOnly", "torchao", "fp8", BF16, _torchao(_ao_fp8_weight_only), 8, 4),
    Peer("quanto qfloat8 weights", "optimum-quanto", "fp8", BF16, _quanto("qfloat8"), 8, 2),
]


def peer_build(peer: Peer):
    """The Candidate.build of a peer: quantize inp.w with the peer, return the timed call."""
    def build(inp):
        lin = _float_linear(inp, peer.act)
        layer = peer.make(lin, inp.device)
        return _runner(layer, _activations(inp, peer.act))
    return build


def peer_candidates(family: str, versions: dict[str, str | None] | None = None) -> list:
    """bench.Candidate rows (role "baseline") of the installed peers for `family`."""
    from . import bench

    versions = installed() if versions is None else versions
    return [bench.Candidate(p.name, family, "baseline", str(p.act).replace("torch.", ""), "float", "float",
                            peer_build(p), p.traffic, p.devices)
            for p in PEERS if p.family == family and versions.get(p.dist)]
